"""Checkpoints from elsewhere are untrusted input: loading one must never run code it carries.

A Megatron `torch_dist` checkpoint holds three kinds of pickle, and unpatched, two of them run
whatever a crafted file asks for:

* `.metadata` (and a rank-local `__N.metadata`): torch.distributed.checkpoint's
  `FileSystemReader.read_metadata` reads it with a plain `pickle.load`. Read by every load
  (resume, `checkpoint.init_from`, eval) and directly by `convert to-hf`.
* ShardedObjects (our per-rank `rng_state`, layers' `_extra_state`): the torch_dist format stores
  them as byte items inside the `.distcp` files, and `DefaultLoadPlanner.load_bytes` (which
  Megatron's `MCoreLoadPlanner` inherits) reads them with `torch.load(weights_only=False)`.
* `common.pt` (schedule, progress, layout, config): Megatron's
  `TorchCommonLoadStrategy.load_common` calls `torch.load` without `weights_only`, which is
  torch's safe default since 2.6, unless TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 is set.

`install()` routes each through a loader that can only build data, and refuses anything else
with `UntrustedCheckpointError` (a usage error: one line naming the file and what it asked for):

* `.metadata`: `RestrictedUnpickler` below, which imports only the classes of torch's DCP
  metadata format. Listed from the pickles of real checkpoints (TP, PP, distributed optimizer,
  bf16): the `torch.distributed.checkpoint.metadata` dataclasses; the save plans that torch
  2.13 keeps in `Metadata.all_local_plans` (`planner.SavePlan`, `WriteItem`, `WriteItemType`,
  `TensorWriteData`); `filesystem._StorageInfo` (where each item lies in which file);
  `torch.Size`; torch dtypes (looked up as attributes of `torch`, nothing callable); and
  `torch.serialization._get_layout`, which maps a layout's name such as "torch.strided" to the
  layout object (a dictionary look-up). Each is a plain record or an enum: building one
  assigns fields and calls nothing else.
* byte items and `common.pt`: `torch.load(weights_only=True)`, torch's own restricted
  unpickler: tensors, storages, plain containers and numbers, `collections.OrderedDict`. What we
  store needs nothing more (the RNG state is kept as tensors and numbers for this reason, see
  `runtime/seed.py`), so no class is added with `torch.serialization.add_safe_globals`.

What stays trusted, so still load only checkpoints whose origin you know:

* The classes Megatron-Core itself adds to torch's weights-only allow-list when it is imported
  (`megatron/core/safe_globals.py`: argparse.Namespace, SimpleNamespace, PosixPath, numpy arrays
  and dtypes, io.BytesIO, signal.Signals, OptimizerConfig and a few enums). They are data
  classes, but every `torch.load(weights_only=True)` in the process accepts them.
* ShardedObject `.pt` files of formats other than torch_dist (Megatron's
  `TorchCommonLoadStrategy.load_sharded_objects`; we never write them): torch's default,
  weights_only, applies there too, without the one-line message.
* Checkpoints read through Megatron's multi-storage client (not a local file): Megatron's code.
* Transformer Engine layers (CUDA only, not installed here) pickle their FP8 state into
  `_extra_state`; how their `set_extra_state` reads it back is Transformer Engine's code.
* Data files in a checkpoint carry tensors only; torch reads them with `weights_only=True`.

Megatron's and torch's files are not edited: `install()` replaces four attributes at run time
and filters one log record, each named in its body, and is idempotent.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import pickle
from pathlib import Path

import torch

from megatron_foresight.errors import UntrustedCheckpointError

_DCP = "torch.distributed.checkpoint"
# (module, name) pairs a `.metadata` pickle may import; see the module docstring.
_METADATA_GLOBALS = frozenset(
    [(f"{_DCP}.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "_MEM_FORMAT_ENCODING", "MetadataIndex", "StorageMeta")]
    + [(f"{_DCP}.planner", name) for name in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")]
    + [(f"{_DCP}.filesystem", "_StorageInfo"), ("torch", "Size"),
       ("torch.serialization", "_get_layout")])

_installed = False
# Refusals raised inside the torch.distributed.checkpoint load in progress: torch catches what
# its steps raise and reports it wrapped (or, for metadata, only quoted in another error), so
# `_surfacing_refusals` raises the refusal itself.
_raised: list[UntrustedCheckpointError] = []


def _refusal(file, what: str) -> UntrustedCheckpointError:
    error = UntrustedCheckpointError(
        f"{file}: refused to load: its pickle asks for {what}, which no checkpoint needs; the "
        "checkpoint may be crafted to run code when loaded (nothing of it was run). Load only "
        "checkpoints from a source you trust")
    _raised.append(error)
    return error


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles DCP checkpoint metadata, importing nothing outside `_METADATA_GLOBALS` and the
    torch dtypes. `file` names the source in the refusal."""

    def __init__(self, stream, file):
        super().__init__(stream)
        self.file = file

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        dtype = torch.__dict__.get(name) if module == "torch" else None  # no lazy imports
        if isinstance(dtype, torch.dtype):
            return dtype
        raise _refusal(self.file, f"{module}.{name}")


def load_torch_file(file, where, **kwargs):
    """`torch.load(file, weights_only=True)`; a file that asks for a class or function outside
    torch's allow-list is refused naming it. Other failures (a damaged file) raise as they are."""
    try:
        return torch.load(file, weights_only=True, **kwargs)
    except pickle.UnpicklingError:
        unsafe = _unsafe_globals(file)
        if unsafe:
            raise _refusal(where, ", ".join(unsafe)) from None
        raise


def _unsafe_globals(file) -> list[str]:
    if isinstance(file, io.IOBase):
        file.seek(0)
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(file)
    except Exception:  # not even a readable torch file: the caller re-raises torch's error
        return []


def _read_metadata(self, *args, **kwargs):
    """`FileSystemReader.read_metadata` with `RestrictedUnpickler` instead of `pickle.load`; the
    rest as torch 2.13 does it. `**kwargs` by that name: torch reads the signature to decide
    whether a rank-local metadata file may be tried."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    path = self._get_metadata_path(kwargs.get("rank"))
    with self.fs.create_stream(path, "rb") as stream:
        metadata = RestrictedUnpickler(stream, path).load()
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = self.load_id
    return metadata


def _load_bytes(self, read_item, value: io.BytesIO) -> None:
    """`DefaultLoadPlanner.load_bytes` with `weights_only=True`; the rest as torch 2.13 does it."""
    from torch.distributed.checkpoint._traverse import set_element

    fqn = read_item.dest_index.fqn
    info = self.metadata.storage_data.get(read_item.storage_index)
    where = f"{info.relative_path} (item {fqn})" if info is not None else f"item {fqn}"
    obj = load_torch_file(value, where)
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[fqn], obj)
    else:
        self.state_dict[fqn] = obj


def _load_common(original):
    """Megatron's `load_common` reading a local `common.pt` with `weights_only=True` (explicit,
    so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot turn it off). A path that is not a local file
    (missing, or on the multi-storage client) goes to Megatron's code and its own messages."""

    @functools.wraps(original)
    def load_common(self, checkpoint_dir):
        from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

        path = Path(checkpoint_dir) / COMMON_STATE_FNAME
        if not os.path.isfile(path):
            return original(self, checkpoint_dir)
        return load_torch_file(path, path, map_location="cpu")

    return load_common


def _surfacing_refusals(load_state_dict):
    """torch's `_load_state_dict` (behind `dcp.load`, and `load_state_dict`, which Megatron
    calls), raising a refusal made during it as itself rather than as torch's
    `CheckpointException` or "metadata is None" error."""

    @functools.wraps(load_state_dict)
    def wrapper(*args, **kwargs):
        _raised.clear()
        try:
            return load_state_dict(*args, **kwargs)
        except BaseException as error:
            refused = _raised[:1] or _wrapped_refusals(error)
            if refused:
                raise refused[0] from None
            raise
        finally:
            _raised.clear()

    return wrapper


def _wrapped_refusals(error: BaseException) -> list[UntrustedCheckpointError]:
    """Refusals another rank reported, as torch hands them to this one."""
    failures = getattr(error, "failures", None) or {}
    return [exc for exc, _ in failures.values() if isinstance(exc, UntrustedCheckpointError)]


def _not_a_refusal(record: logging.LogRecord) -> bool:
    """torch logs a failed metadata read with its traceback ("Global metadata is not found")
    before falling back to rank-local metadata; a refusal is raised on its own instead."""
    return not (record.exc_info and isinstance(record.exc_info[1], UntrustedCheckpointError))


def install() -> None:
    """Route every unpickling of checkpoint files through the loaders above (idempotent)."""
    global _installed
    if _installed:
        return
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy
    from torch.distributed.checkpoint import default_planner, filesystem, state_dict_loader

    filesystem.FileSystemReader.read_metadata = _read_metadata
    default_planner.DefaultLoadPlanner.load_bytes = _load_bytes
    TorchCommonLoadStrategy.load_common = _load_common(TorchCommonLoadStrategy.load_common)
    state_dict_loader._load_state_dict = _surfacing_refusals(state_dict_loader._load_state_dict)
    state_dict_loader.logger.addFilter(_not_a_refusal)  # the root logger, as torch uses it
    _installed = True
