"""Tokenizers. Each exposes what Megatron's datasets duck-type on (`vocab_size`, `eod`, `pad`)
plus `encode` / `decode`."""

from __future__ import annotations

from megatron_foresight.config import TokenizerConfig


class ByteTokenizer:
    """UTF-8 bytes (ids 0-255) plus special tokens after them. Needs no files, never fails on any
    text, and is what the tiny default uses until a trained tokenizer is named."""

    SPECIALS = ("<eod>", "<pad>", "<bos>")

    def __init__(self):
        self.eod = 256
        self.pad = 257
        self.bos = 258
        self.vocab_size = 256 + len(self.SPECIALS)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        data = bytes(i for i in ids if i < 256)
        return data.decode("utf-8", errors="replace")

    def describe(self) -> dict:
        return {"type": "byte", "vocab_size": self.vocab_size}

    @property
    def unique_identifiers(self) -> dict:
        """What Megatron's datasets hash into their cache keys."""
        return self.describe()


def build_tokenizer(cfg: TokenizerConfig):
    if cfg.type == "byte":
        return ByteTokenizer()
    raise ValueError(f"data.tokenizer.type: unsupported {cfg.type!r}")
