"""The entries of a stage's `sources` list, each tokenized once into an indexed dataset with its
segment stream (cached by content under the data cache), ready for `build_gpt_datasets`:

    builtin                the generated text corpus (the built-in world's facts)
    world:SPLIT            the built-in world's trajectories (data.world/trajectories/SPLIT.jsonl)
    PREFIX                 a dataset written by `foresight data preprocess` (PREFIX.idx exists)
    FILE or DIRECTORY      trajectories (.jsonl whose records carry a `schema`, .tar shards, a
                           directory of shards or of .jsonl parts, such as the output of
                           `foresight data collect`), rendered by the stage's renderer; or plain
                           text (.jsonl with a "text" field, .txt with one document per line)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from megatron_foresight.data.tokenizer import TokenizerConfig
from megatron_foresight.data.indexed import (
    cached_indexed_dataset, file_fingerprint, read_text_documents,
)
from megatron_foresight.data.preprocess import preprocess
from megatron_foresight.data.render import RENDER_VERSION
from megatron_foresight.data.records import iter_raw, record_files
from megatron_foresight.world.synthetic import synthetic_documents
from megatron_foresight.errors import UsageError
from megatron_foresight.runtime.dist import barrier, is_rank0
from megatron_foresight.world.build import ensure_world

WORLD_PREFIX = "world:"


@dataclass
class SourceContext:
    """What resolving a source needs from the recipe and the runtime."""

    seed: int
    tokenizer: object
    tokenizer_cfg: TokenizerConfig
    cache_dir: Path
    world: str | None
    builtin_docs: int = 6000


def check_tokenizer(prefix: str, tok) -> None:
    """A preprocessed dataset is token ids of one tokenizer; another would read garbage."""
    meta_path = Path(prefix + ".json")
    if not meta_path.is_file():
        raise UsageError(f"{prefix}.json not found: is {prefix} a dataset written by `foresight "
                         "data preprocess`?")
    written_with = json.loads(meta_path.read_text())["tokenizer"]
    if written_with != tok.describe():
        older = (written_with.get("type") in ("sentencepiece", "hf")
                 and "sha256" not in written_with)
        raise UsageError(f"{prefix} was tokenized with {written_with}, but the recipe's "
                         f"tokenizer is {tok.describe()}; set data.tokenizer to match or "
                         "preprocess again with --tokenizer" + (
                             " (it was written before tokenizers were identified by their "
                             "content: if the tokenizer is the same, preprocess again)"
                             if older else ""))


def world_file(world: str | None, split: str, seed: int) -> Path:
    """The world's trajectories of `split`; the world is built there first if it is not (every
    rank calls this)."""
    if not world:
        raise UsageError(f"source {WORLD_PREFIX}{split} needs data.world (the directory of a "
                         "built-in world)")
    ensure_world(world, seed)
    path = Path(world) / "trajectories" / f"{split}.jsonl"
    if not path.is_file():
        raise UsageError(f"{path} not found: the world in {world} has no {split!r} trajectories "
                         "(splits: train, validation)")
    return path


def holds_trajectories(path: Path) -> bool:
    """Shards and directories hold trajectories; a .jsonl does when its first record says so."""
    if path.is_dir() or path.suffix == ".tar":
        return True
    if path.suffix != ".jsonl":
        return False
    for _, _, text in iter_raw(path):
        try:
            return '"schema"' in text and "schema" in json.loads(text)
        except json.JSONDecodeError:
            return False
    return False


def _fingerprint(path: Path) -> list[dict]:
    """The files that will be read (a directory's .tar shards, else its .jsonl parts, such as
    `foresight data collect`'s output): a new or grown part is new data."""
    return [file_fingerprint(f) for f in record_files(path)]


def cached_trajectories(path: Path, renderer: str, sc: SourceContext) -> str:
    """`path` rendered by `renderer` and tokenized, once per content; rank 0 writes it."""
    key = {"trajectories": _fingerprint(path), "renderer": renderer,
           "render_version": RENDER_VERSION, "tokenizer": sc.tokenizer.describe()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    prefix = sc.cache_dir / f"{path.stem}-{renderer}-{digest}"
    if is_rank0() and not Path(f"{prefix}.idx").exists():
        prefix.parent.mkdir(parents=True, exist_ok=True)
        preprocess([path], prefix, renderer, sc.tokenizer_cfg)
    barrier()
    return str(prefix)


def source_prefix(source: str, renderer: str, sc: SourceContext) -> str:
    """The indexed-dataset prefix of one `sources` entry (see the module docstring)."""
    tok = sc.tokenizer
    if source == "builtin":
        key = {"builtin": 1, "seed": sc.seed, "docs": sc.builtin_docs,
               "tokenizer": tok.describe()}
        return cached_indexed_dataset(key, lambda: synthetic_documents(sc.seed, sc.builtin_docs),
                                      tok, sc.cache_dir, "builtin")
    if source.startswith(WORLD_PREFIX):
        return cached_trajectories(world_file(sc.world, source[len(WORLD_PREFIX):], sc.seed),
                                   renderer, sc)
    if Path(source + ".idx").is_file():
        check_tokenizer(source, tok)
        return source
    path = Path(source)
    if not path.exists():
        raise UsageError(f"source {source!r}: no such file, directory or dataset prefix "
                         f"(expected builtin, {WORLD_PREFIX}SPLIT, a file or a PREFIX with "
                         "PREFIX.idx)")
    if holds_trajectories(path):
        return cached_trajectories(path, renderer, sc)
    key = {"file": file_fingerprint(path), "tokenizer": tok.describe()}
    name = source.replace("/", "_").rsplit(".", 1)[0][-40:]
    return cached_indexed_dataset(key, lambda: read_text_documents(path), tok, sc.cache_dir, name)
