"""Tokenizers. Each exposes what Megatron's datasets duck-type on (`vocab_size`, `eod`, `pad`)
plus `encode` / `decode`, and can write itself as a Hugging Face tokenizer directory (what
`foresight convert to-hf` puts beside the weights)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Optional

from megatron_foresight.configtree import check
from megatron_foresight.errors import UsageError


@dataclass
class TokenizerConfig:
    """The tokenizer."""

    type: Literal["byte", "hf", "sentencepiece"] = "byte"
    """byte: UTF-8 bytes plus special tokens, needs no files; hf: a Hugging Face tokenizer
    directory (tokenizer.json / tokenizer_config.json), read from disk, never downloaded;
    sentencepiece: a .model file (`foresight data build-world` trains one on its world)."""
    path: Optional[str] = None
    """Tokenizer file or directory, for types that load one. For sentencepiece, null means the
    tokenizer of the built-in world in data.world (<world>/tokenizer/spm.model)."""
    chat_template: bool = False
    """Open every episode with the tokenizer's chat template (type hf, an instruct model's):
    the task prompt is the user message, and the agent's turns and the observations follow
    inside the assistant message (Search-R1's layout). Training data and the agent loop both
    take the prompt from `episode_prompt`, so the model trains on the prompt tokens it plays
    with. False: the prompt and a newline, as plain text."""

    def __post_init__(self):
        check(self.type != "hf" or bool(self.path), "path",
              "type hf needs the path of a local Hugging Face tokenizer directory")
        check(not self.chat_template or self.type == "hf", "chat_template",
              f"needs type hf (a Hugging Face tokenizer with a chat template), not {self.type}")


def episode_prompt(tokenizer, prompt: str) -> str:
    """The text that opens an episode before the agent's first turn: the task prompt and a
    newline, or, with `chat_template`, the chat's opening (`HFTokenizer.chat_prompt`). The
    agent loop encodes it whole, and preprocessing encodes the prompt segment of a rendered
    trajectory through it, so what the model reads when it plays is what it trained on."""
    if getattr(tokenizer, "chat_template", False):
        return tokenizer.chat_prompt(prompt)
    return prompt + "\n"



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

    def save_hf(self, out: Path) -> None:
        """The same tokenizer for transformers: a byte-level BPE with no merges, so every byte
        is its own token with its byte value as id, and the specials after them."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        chars = _bytes_to_unicode()
        core = Tokenizer(models.BPE({chars[b]: b for b in range(256)}, merges=[]))
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        core.decoder = decoders.ByteLevel()
        core.add_special_tokens(list(self.SPECIALS))
        eod, pad, bos = self.SPECIALS
        # split_special_tokens: text that spells "<eod>" is bytes, as in `encode` above.
        PreTrainedTokenizerFast(tokenizer_object=core, eos_token=eod, pad_token=pad,
                                bos_token=bos, split_special_tokens=True).save_pretrained(out)


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character map of byte-level BPE (GPT-2), which the `tokenizers`
    ByteLevel pre-tokenizer applies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class HFTokenizer:
    """A Hugging Face tokenizer from a local directory. The foresight and environment tags stay
    text: in a BPE vocabulary each is several tokens (SmolLM2: "</search>" is "</", "search",
    ">"), so the embedding and the exported model keep their size, and a tag's last token may
    merge with what follows (">." ); the generator and the reward credit work on decoded text
    for that reason."""

    FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
             "chat_template.jinja")

    def __init__(self, path: str, chat_template: bool = False):
        from transformers import AutoTokenizer

        self.path = Path(path)
        if not self.path.is_dir():
            raise UsageError(f"data.tokenizer.path: {path} is not a directory")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UsageError(f"data.tokenizer.path: {path}: not a Hugging Face tokenizer "
                             f"directory ({e})") from None
        tok = self.tokenizer
        if tok.eos_token_id is None:
            raise UsageError(f"data.tokenizer.path: {path}: the tokenizer has no eos_token, "
                             "which marks the end of each document")
        self.eod = tok.eos_token_id
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.bos = tok.bos_token_id
        # The ids run to the largest one, added tokens included (len() would miss a gap); the
        # model's embedding is padded past it and the generator masks the rest.
        self.vocab_size = max(len(tok), max(tok.get_vocab().values()) + 1)
        if chat_template and not tok.chat_template:
            raise UsageError(f"data.tokenizer.chat_template: the tokenizer in {path} has no "
                             "chat template; set chat_template: false")
        self.chat_template = chat_template
        self._digest = self._vocabulary_digest()

    def _vocabulary_digest(self) -> str:
        """sha256 of the files that define the ids: tokenizer.json (what the fast tokenizer
        reads), else the slow tokenizer's files; with added_tokens.json either way."""
        names = ["tokenizer.json"] if (self.path / "tokenizer.json").is_file() else [
            "tokenizer.model", "vocab.json", "merges.txt"]
        digest = hashlib.sha256()
        for name in [*names, "added_tokens.json"]:
            if (self.path / name).is_file():
                digest.update(name.encode() + b"\0" + (self.path / name).read_bytes())
        return digest.hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def chat_prompt(self, prompt: str) -> str:
        """`prompt` as the user message of the chat template, then the assistant's header (the
        generation prompt): the turns that follow are the assistant's message."""
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                  tokenize=False, add_generation_prompt=True)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def describe(self) -> dict:
        """What identifies the token streams it writes (cache keys, PREFIX.json): the
        vocabulary files' bytes (an edited tokenizer.json of the same size in the same place is
        another tokenizer); the chat template changes the prompt's tokens, and so does an edit
        of the template's text (hence its hash, not just that it is on)."""
        out = {"type": "hf", "path": str(self.path.resolve()), "sha256": self._digest,
               "vocab_size": self.vocab_size}
        if not self.chat_template:
            return out
        template = self.tokenizer.chat_template
        text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
        return {**out, "chat_template": True,
                "chat_template_sha256": hashlib.sha256(text.encode()).hexdigest()[:16]}

    @property
    def unique_identifiers(self) -> dict:
        return self.describe()

    def save_hf(self, out: Path) -> None:
        for name in self.FILES:
            if (self.path / name).exists():
                shutil.copy2(self.path / name, Path(out) / name)


class SentencePieceTokenizer:
    """A sentencepiece model file (`.model`), e.g. the one `foresight data build-world` trains
    for the tiny default, in which every foresight and environment tag is one token."""

    def __init__(self, path: str):
        import sentencepiece

        self.path = Path(path)
        if not self.path.is_file():
            raise UsageError(f"data.tokenizer.path: {path} is not a file (a sentencepiece "
                             ".model, e.g. DIR/tokenizer/spm.model of `foresight data "
                             "build-world --out DIR`)")
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise UsageError(f"data.tokenizer.path: {path}: not a sentencepiece model "
                             f"({e})") from None
        if self.sp.eos_id() < 0:
            raise UsageError(f"data.tokenizer.path: {path}: the model has no end-of-sequence "
                             "piece, which marks the end of each document")
        self.eod = self.sp.eos_id()
        self.pad = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eod
        self.bos = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.vocab_size = self.sp.get_piece_size()
        self._digest = hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def describe(self) -> dict:
        """What identifies the token streams it writes (cache keys, PREFIX.json): the model's
        bytes, not its size (a world rebuilt in the same place trains another model of the
        same vocabulary, often of the same size)."""
        return {"type": "sentencepiece", "path": str(self.path.resolve()),
                "sha256": self._digest, "vocab_size": self.vocab_size}

    @property
    def unique_identifiers(self) -> dict:
        return self.describe()

    def save_hf(self, out: Path) -> None:
        """The same tokenizer for transformers: a `tokenizers` BPE model (merges ranked as
        sentencepiece ranks its pieces) or Unigram model (the pieces and their scores), spaces
        as "▁", byte fallback, and the user-defined pieces (the tags) matched before
        segmentation, as sentencepiece does."""
        from sentencepiece import sentencepiece_model_pb2
        from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
        from transformers import PreTrainedTokenizerFast

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.path.read_bytes())
        spec = proto.trainer_spec
        if spec.model_type not in (spec.UNIGRAM, spec.BPE) or \
                proto.normalizer_spec.add_dummy_prefix or proto.normalizer_spec.name != "identity":
            raise UsageError(f"{self.path}: only BPE or unigram models with identity "
                             "normalization and no dummy prefix (what build-world trains) export "
                             "to Hugging Face")
        piece = proto.SentencePiece
        if spec.model_type == spec.BPE:
            vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
            core = Tokenizer(models.BPE(vocab, _bpe_merges(proto), byte_fallback=True,
                                        unk_token=self.sp.id_to_piece(self.sp.unk_id())))
        else:
            core = Tokenizer(models.Unigram([(p.piece, p.score) for p in proto.pieces],
                                            unk_id=self.sp.unk_id(), byte_fallback=True))
        core.normalizer = normalizers.Replace(" ", "▁")
        core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                          decoders.Fuse()])
        core.add_special_tokens([AddedToken(p.piece, normalized=False, special=True)
                                 for p in proto.pieces if p.type in (piece.UNKNOWN, piece.CONTROL)])
        core.add_tokens([AddedToken(p.piece, normalized=False, special=False)
                         for p in proto.pieces if p.type == piece.USER_DEFINED])
        name = self.sp.id_to_piece
        PreTrainedTokenizerFast(
            tokenizer_object=core, unk_token=name(self.sp.unk_id()), eos_token=name(self.eod),
            pad_token=name(self.pad), bos_token=None if self.bos is None else name(self.bos),
        ).save_pretrained(out)


def _bpe_merges(proto) -> list[tuple[str, str]]:
    """The merges of a sentencepiece BPE model, for `tokenizers.models.BPE`. Sentencepiece
    joins the adjacent pair whose joined piece scores highest (comes first in the model), so
    each ordinary piece of two or more characters is a merge of every split of it into two
    pieces of the model, ranked by the joined piece's place (then by the parts')."""
    normal = proto.SentencePiece.NORMAL
    rank = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == normal}
    merges = []
    for joined, i in rank.items():
        for cut in range(1, len(joined)):
            left, right = joined[:cut], joined[cut:]
            if left in rank and right in rank:
                merges.append((i, rank[left], rank[right], left, right))
    return [(left, right) for *_, left, right in sorted(merges)]


def train_sentencepiece(texts: Iterable[str], out: str | Path, vocab_size: int) -> Path:
    """Train a BPE sentencepiece model on `texts` and write it to `out` (a .model file).
    The foresight and environment tags and the newline are single pieces; unseen characters
    fall back to bytes; text round-trips exactly (no normalization, no added whitespace), so
    a document tokenized in segments decodes to the document. Deterministic: the same texts
    give the same file."""
    import sentencepiece

    from megatron_foresight.foresight.tags import symbols

    def lines():
        for text in texts:
            # sentencepiece skips sentences over max_sentence_length bytes; lines never are.
            yield from (line for line in text.split("\n") if line)

    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=lines(), model_writer=model, vocab_size=vocab_size,
            model_type="bpe", user_defined_symbols=[*symbols(), "\n"], byte_fallback=True,
            split_digits=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, hard_vocab_limit=False, unk_id=0, bos_id=1,
            eos_id=2, pad_id=3, num_threads=1, minloglevel=2)
    except RuntimeError as e:
        needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
        if not needed:
            raise
        raise UsageError(f"a tokenizer vocabulary of {vocab_size} pieces is too small for this "
                         f"text: its characters, the tags and the 256 byte pieces need "
                         f"{needed.group(1)}; ask for at least that many (build-world: "
                         "--vocab-size)") from None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, out)
    return out


def build_tokenizer(cfg: TokenizerConfig):
    if cfg.type == "byte":
        return ByteTokenizer()
    if cfg.type == "hf":
        return HFTokenizer(cfg.path, cfg.chat_template)
    if cfg.type == "sentencepiece":
        return SentencePieceTokenizer(cfg.path)
    raise ValueError(f"data.tokenizer.type: unsupported {cfg.type!r}")
