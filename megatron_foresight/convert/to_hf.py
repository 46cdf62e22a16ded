"""A Megatron distributed checkpoint (saved at any TP/PP size) -> a Hugging Face model directory
that `transformers.AutoModelForCausalLM.from_pretrained` loads without custom code.

Streams: tensors are read from the checkpoint one layer at a time (a slice of each stacked
tensor, so only those bytes are read) and written into safetensors shards of at most
`max_shard_size` bytes; peak memory is about one shard plus one layer, not the model. Output is
written to a fresh hidden directory beside OUT and renamed when complete, so a crash never leaves
a half-written OUT (see convert/replace.py).

The Hugging Face `vocab_size` is the checkpoint's embedding size, padding rows included (as in
many published models, e.g. Qwen2), so Megatron -> HF -> Megatron is exact on every tensor;
tokenizer ids stay below the tokenizer's length.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from tqdm import tqdm

from megatron_foresight.config import recipe_from_tree
from megatron_foresight.convert import layout
from megatron_foresight.convert.hf_config import hf_config_from_model
from megatron_foresight.convert.replace import replace_dir, staging_dir
from megatron_foresight.convert.safetensors_io import ShardWriter
from megatron_foresight.data.tokenizer import build_tokenizer
from megatron_foresight.errors import UsageError
from megatron_foresight.training import checkpoint as ckpt
from megatron_foresight.training import integrity

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


class CheckpointReader:
    """Reads tensors, or one layer's slice of the stacked layer tensors, from a distributed
    checkpoint in their tensor-parallel-1 layout, whatever layout saved it. Reads the torch_dist
    files with torch.distributed.checkpoint directly: no process group, and only the stored
    chunks that overlap the request are read (layers are stored one chunk per layer)."""

    def __init__(self, path: Path):
        self.path = path
        self.storage = dcp.FileSystemReader(str(path))
        try:
            metadata = self.storage.read_metadata()
        except (OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
            raise UsageError(f"{path}: its .metadata cannot be read ({type(e).__name__}: {e}); "
                             "the checkpoint is damaged: convert another step") from None
        _check_files(path, metadata.storage_data)
        self.meta = {k: v for k, v in metadata.state_dict_metadata.items()
                     if hasattr(v, "chunks")}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.meta[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.meta[key].properties.dtype

    def read(self, keys: list[str], layer: int | None = None) -> dict[str, torch.Tensor]:
        out, slices = {}, {}
        for key in keys:
            shape = self.shape(key)
            if layer is None:
                out[key] = torch.empty(shape, dtype=self.dtype(key))
                slices[key] = ((0,) * len(shape), out[key])
            else:
                dest = torch.empty((1, *shape[1:]), dtype=self.dtype(key))
                slices[key] = ((layer,) + (0,) * (len(shape) - 1), dest)
                out[key] = dest[0]
        with warnings.catch_warnings():  # "assuming ... a single process": yes, on purpose
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({}, storage_reader=self.storage, planner=_SlicePlanner(slices),
                     no_dist=True)
        return out


def _check_files(path: Path, storage_data: dict) -> None:
    """Every data file the metadata names is there and long enough to hold what it says it
    holds: a copy or save that was cut short is named here, before anything is written (also
    for a checkpoint saved before manifests, which `integrity.verify` cannot check)."""
    needed: dict[str, int] = {}
    for info in storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0),
                                         info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        have = file.stat().st_size if file.is_file() else None
        if have is None or have < size:
            state = "is missing" if have is None else f"has {have} bytes"
            raise UsageError(f"{file}: {state}, the checkpoint's metadata says it holds {size}: "
                             "truncated (a copy or save cut short); copy the checkpoint again "
                             "or convert another step")


class _SlicePlanner(DefaultLoadPlanner):
    """Loads `{key: (offsets, destination)}`: the box of the stored tensor that starts at
    `offsets` and has the destination's shape, straight into the destination."""

    def __init__(self, slices: dict):
        super().__init__()
        self.slices = slices

    def create_local_plan(self):
        items = []
        for key, (offsets, dest) in self.slices.items():
            box = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key],
                                                      [box])
        return LoadPlan(items)

    def resolve_tensor(self, read_item):
        dest = self.slices[read_item.dest_index.fqn][1]
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, offset, length)
        return dest  # a view of the destination: the read lands in place, nothing to commit


def convert_to_hf(ckpt_path: str | Path, out: str | Path, *, dtype: str | None = None,
                  max_shard_size: int = 2 << 30, overwrite: bool = False) -> Path:
    found = ckpt.find_checkpoint(ckpt_path)
    if found is None:
        raise UsageError(f"--ckpt {ckpt_path}: no complete Megatron checkpoint there (give a run "
                         "directory, its checkpoints/ directory, or one step_N directory)")
    found = found.resolve()
    out = _check_out(Path(out), found, Path(ckpt_path).resolve(), overwrite)
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")

    integrity.verify(found)  # a flipped byte would otherwise be exported without a word
    cfg = recipe_from_tree(ckpt.read_common(found)["config"])
    m = cfg.model
    reader = CheckpointReader(found)
    _check_keys(reader, m, found)
    vocab = reader.shape(layout.EMBEDDING)[0]
    target = DTYPES[dtype] if dtype else reader.dtype(layout.EMBEDDING)
    tokenizer = build_tokenizer(cfg.data.tokenizer_config())
    ids = dict(bos=tokenizer.bos, eos=tokenizer.eod, pad=tokenizer.pad)
    config = hf_config_from_model(m, vocab, dtype=_dtype_name(target), **ids)  # refuses early

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(out)
    try:
        _write_weights(reader, m, tmp, target, max_shard_size)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
                      "pad_token_id": ids["pad"]}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        tokenizer.save_hf(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s (%s, %d layers, vocab %d, %s) from %s", out, m.family, m.num_layers, vocab,
             _dtype_name(target), found)
    return out


def _check_out(out: Path, found: Path, given: Path, overwrite: bool) -> Path:
    """Refuse an --out whose replacement could harm what is read, or a training run."""
    out = out.resolve()
    if out == out.parent:
        raise UsageError(f"--out {out}: give a directory to create, not a filesystem root")
    if out == found or out in found.parents:
        raise UsageError(f"--out {out} contains the checkpoint being converted ({found}); "
                         "choose a directory outside it")
    source = _source_root(found, given)
    if source in out.parents:
        raise UsageError(f"--out {out} is inside {source}, which holds the checkpoint being "
                         f"converted ({found}); choose a directory outside {source}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    if ckpt.find_checkpoint(out) is not None or (out / "checkpoints").is_dir():
        raise UsageError(f"--out {out} holds a Megatron checkpoint or training run, which "
                         "--overwrite does not replace; choose another directory")
    return out


def _source_root(found: Path, given: Path) -> Path:
    """The outermost directory this conversion reads: the run directory when the checkpoint
    sits in one (RUN/checkpoints/step_N), else what --ckpt named (a checkpoints directory or
    the step itself)."""
    if found.parent.name == "checkpoints":
        return found.parent.parent
    return given if given == found or given in found.parents else found


def _write_weights(reader: CheckpointReader, m, tmp: Path, target: torch.dtype,
                   max_shard_size: int) -> None:
    globals_ = layout.hf_global_names(m)
    plan = [(globals_[layout.EMBEDDING], reader.shape(layout.EMBEDDING))]
    layer_shapes = _hf_layer_shapes(reader, m)
    for i in range(m.num_layers):
        plan += [(layout.hf_layer_prefix(i) + name, shape) for name, shape in layer_shapes]
    plan.append((globals_[layout.FINAL_NORM], reader.shape(layout.FINAL_NORM)))
    if layout.OUTPUT in globals_:
        plan.append((globals_[layout.OUTPUT], reader.shape(layout.OUTPUT)))
    writer = ShardWriter(tmp, plan, torch.finfo(target).bits // 8, max_shard_size)

    def emit(name: str, tensor: torch.Tensor) -> None:
        writer.add(name, tensor.to(target))

    with tqdm(total=m.num_layers + 2, desc="to-hf", unit="part", disable=None) as bar:
        emit(globals_[layout.EMBEDDING], reader.read([layout.EMBEDDING])[layout.EMBEDDING])
        bar.update()
        keys = [layout.LAYERS + k for k in layout.layer_keys(m)]
        for i in range(m.num_layers):
            loaded = reader.read(keys, layer=i)
            hf = layout.layer_to_hf({k[len(layout.LAYERS):]: v for k, v in loaded.items()}, m)
            for name, tensor in hf.items():
                emit(layout.hf_layer_prefix(i) + name, tensor)
            bar.update()
        rest = [k for k in (layout.FINAL_NORM, layout.OUTPUT) if k in globals_]
        for key, tensor in reader.read(rest).items():
            emit(globals_[key], tensor)
        bar.update()
    writer.finish()


def _check_keys(reader: CheckpointReader, m, path: Path) -> None:
    expected = {layout.EMBEDDING, layout.FINAL_NORM,
                *(layout.LAYERS + k for k in layout.layer_keys(m))}
    if m.untie_embeddings_and_output_weights:
        expected.add(layout.OUTPUT)
    missing = sorted(expected - set(reader.meta))
    if missing:
        raise UsageError(f"{path}: checkpoint lacks {', '.join(missing)}; it does not hold the "
                         f"{m.family} model its config describes")
    # value_head.*: PPO's critic, trained beside the policy; Hugging Face has no place for it
    model_keys = {k for k in reader.meta if not k.startswith(("optimizer.", "value_head."))
                  and k != "rng_state"}
    unknown = sorted(model_keys - expected - {layout.OUTPUT})
    if unknown:
        raise UsageError(f"{path}: tensors with no Hugging Face {m.family} counterpart: "
                         f"{', '.join(unknown)}")
    layers = reader.shape(layout.LAYERS + layout.FC1)[0]
    if layers != m.num_layers:
        raise UsageError(f"{path}: {layers} layers stored, config says {m.num_layers}")


def _hf_layer_shapes(reader: CheckpointReader, m) -> list[tuple[str, tuple[int, ...]]]:
    """Shapes of one layer's Hugging Face tensors, from the checkpoint metadata alone."""
    fake = {k: torch.empty(reader.shape(layout.LAYERS + k)[1:], device="meta")
            for k in layout.layer_keys(m)}
    return [(name, tuple(t.shape)) for name, t in layout.layer_to_hf(fake, m).items()]
