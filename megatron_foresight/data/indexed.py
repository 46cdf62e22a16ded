"""Tokenized corpora as Megatron indexed datasets (`.bin` / `.idx`), cached by content, and the
GPT datasets Megatron's `BlendedMegatronDatasetBuilder` makes of them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from megatron_foresight.data.records import (
    DataFileError, RecordError, iter_jsonl, iter_raw, text_of,
)
from megatron_foresight.runtime.dist import barrier, is_rank0


def read_text_documents(path: str | Path) -> Iterator[str]:
    """Documents of a `.jsonl` file (a `text` field per line) or a `.txt` file (one per line).
    Streams; a bad line raises `DataFileError` naming the file, line and field."""
    path = Path(path)
    if path.suffix != ".jsonl":
        for _, _, text in iter_raw(path):
            yield text
        return
    for lineno, record in iter_jsonl(path):
        try:
            yield text_of(record)
        except RecordError as e:
            raise DataFileError(path, lineno, e.field, e.message) from None


def _write_indexed(documents: Iterable[str], tokenizer, prefix: Path, desc: str) -> None:
    """Plain-text documents as an indexed dataset with its segment stream (all `Seg.TEXT`),
    the layout `foresight data preprocess` writes, so text and trajectories blend."""
    from megatron_foresight.data.preprocess import SegmentedWriter
    from megatron_foresight.data.render import Seg

    with SegmentedWriter(prefix, tokenizer.vocab_size) as writer:
        for doc in tqdm(documents, desc=f"tokenizing {desc}", unit=" docs", mininterval=2,
                        disable=None):
            ids = np.asarray(tokenizer.encode(doc) + [tokenizer.eod])
            writer.add(ids, np.full(len(ids), int(Seg.TEXT), np.uint8), np.asarray([len(ids)]))
        writer.commit()


def cached_indexed_dataset(key: dict, documents, tokenizer, cache_dir: str | Path,
                           name: str) -> str:
    """Tokenize `documents` (a zero-argument callable returning an iterable of strings) into an
    indexed dataset under `cache_dir`, once per distinct `key`; returns the path prefix. Rank 0
    builds while the others wait."""
    # layout 2: with the segment stream beside the tokens.
    digest = hashlib.sha256(json.dumps({"layout": 2, **key}, sort_keys=True).encode()
                            ).hexdigest()[:16]
    prefix = Path(cache_dir) / f"{name}-{digest}"
    if is_rank0() and not Path(str(prefix) + ".idx").exists():
        prefix.parent.mkdir(parents=True, exist_ok=True)
        _write_indexed(documents(), tokenizer, prefix, name)
    barrier()
    return str(prefix)


def file_fingerprint(path: str | Path) -> dict:
    stat = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def build_gpt_datasets(prefixes: list[str], weights: list[float] | None, *, seq_length: int,
                       seed: int, split: str, num_samples: tuple[int, int], tokenizer,
                       cache_dir: str | Path, dataset_cls=None,
                       valid_prefixes: list[str] | None = None, documents: str | None = None):
    """Train and validation datasets over the blend of `prefixes`, with `num_samples`
    (train, validation) sequences each, built by Megatron's `BlendedMegatronDatasetBuilder`:
    `GPTDataset`s, or `dataset_cls` (e.g. `segmented.SegmentedGPTDataset`). Validation samples
    come from `split` of the same documents, or, when `valid_prefixes` is given, from those
    datasets (held-out files, equally weighted) and the training blend uses all its documents.
    `documents` keeps every token's attention inside its own document (documents end with the
    EOD): "mask", each sample carries Megatron's reset `attention_mask` ([1, seq, seq], True
    where hidden: the local layers' form); "starts", a `document_starts` flag per token
    instead (`dataset_cls` a `segmented.SegmentedGPTDataset`), which the loader turns into
    packed-sequence boundaries (Transformer Engine's THD form, `training.data.collate`)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset

    from megatron_foresight.data.segmented import SegmentedDatasetConfig, SegmentedGPTDataset

    blend = (prefixes, weights) if len(prefixes) > 1 else (prefixes, None)
    layout = dict(blend=blend, split=split)
    if valid_prefixes:
        layout = dict(blend_per_split=[blend, (valid_prefixes, None), None])
    if documents not in (None, "mask", "starts"):
        raise ValueError(f"documents={documents!r}: None, 'mask' or 'starts'")
    if documents == "starts" and not issubclass(dataset_cls or GPTDataset, SegmentedGPTDataset):
        raise ValueError("document starts come from a SegmentedGPTDataset (dataset_cls)")
    masks = documents == "mask"
    config = SegmentedDatasetConfig(
        random_seed=seed, sequence_length=seq_length, tokenizer=tokenizer,
        reset_position_ids=False, reset_attention_mask=masks, eod_mask_loss=False,
        create_attention_mask=masks, document_starts=documents == "starts",
        path_to_cache=str(cache_dir), mmap_bin_files=True, **layout,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        dataset_cls or GPTDataset, [num_samples[0], num_samples[1], 0], lambda: True,
        config).build()
    return train, valid
