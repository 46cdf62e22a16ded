"""Hugging Face safetensors directories: a streaming writer of shards with their index, and a
reader that opens only the file holding a tensor (never a pickle)."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch

from megatron_foresight.errors import UsageError

INDEX = "model.safetensors.index.json"


class ShardWriter:
    """Writes tensors, given in `plan` order, into `model-0000i-of-0000n.safetensors` files of
    at most `max_bytes` each (a tensor larger than that gets a file of its own), each file as
    soon as its last tensor arrives; then the index that transformers reads."""

    def __init__(self, out: Path, plan: list[tuple[str, tuple[int, ...]]], itemsize: int,
                 max_bytes: int):
        self.out = Path(out)
        shards, size = [[]], 0
        for name, shape in plan:
            nbytes = math.prod(shape) * itemsize
            if shards[-1] and size + nbytes > max_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        n = len(shards)
        self.file_of = {name: f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                        for i, names in enumerate(shards) for name in names}
        self.remaining = {f"model-{i + 1:05d}-of-{n:05d}.safetensors": set(names)
                          for i, names in enumerate(shards)}
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        from safetensors.torch import save_file

        file = self.file_of[name]  # KeyError: a tensor the plan did not list is a bug
        self.pending.setdefault(file, {})[name] = tensor.detach().contiguous()
        self.remaining[file].discard(name)
        self.total_bytes += tensor.numel() * tensor.element_size()
        if not self.remaining[file]:
            save_file(self.pending.pop(file), str(self.out / file), metadata={"format": "pt"})

    def finish(self) -> None:
        unwritten = sorted(f for f, names in self.remaining.items() if names)
        if unwritten:
            raise RuntimeError(f"shards never completed: {unwritten}")
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.file_of}
        (self.out / INDEX).write_text(json.dumps(index, indent=2) + "\n")


class SafetensorsDir:
    """Tensors of a Hugging Face model directory by name: `model.safetensors`, or shards listed
    by `model.safetensors.index.json`."""

    def __init__(self, hf_dir: Path):
        self.dir = Path(hf_dir)
        index = self.dir / INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise UsageError(f"{index}: not a safetensors index ({e})") from None
        elif (self.dir / "model.safetensors").exists():
            with _open(self.dir / "model.safetensors") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            pickles = sorted(p.name for p in self.dir.glob("*.bin"))
            hint = (f" (found {', '.join(pickles)}: pickled weights are not read; save the model "
                    "with save_pretrained(..., safe_serialization=True) first)") if pickles else ""
            raise UsageError(f"{self.dir}: no model.safetensors or {INDEX}{hint}")
        for file in set(weight_map.values()):
            if not (self.dir / file).exists():
                raise UsageError(f"{index}: lists {file}, which is missing")
        self.weight_map = weight_map

    def names(self) -> set[str]:
        return set(self.weight_map)

    def _file(self, name: str) -> Path:
        file = self.weight_map.get(name)
        if file is None:
            raise UsageError(f"{self.dir}: no tensor {name!r} in the safetensors files")
        return self.dir / file

    def get(self, name: str) -> torch.Tensor:
        with self._tensor(name) as f:
            return f.get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        with self._tensor(name) as f:
            return tuple(f.get_slice(name).get_shape())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the file headers alone, opening each file once: reading
        them all up front finds an unreadable file, or a tensor the index places in a file
        that lacks it, before any work starts."""
        by_file: dict[str, list[str]] = {}
        for name, file in self.weight_map.items():
            by_file.setdefault(file, []).append(name)
        shapes = {}
        for file, names in by_file.items():
            with _open(self.dir / file) as f:
                stored = set(f.keys())
                for name in names:
                    _check_stored(name, stored, self.dir / file)
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        return shapes

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop of a tensor, reading only those bytes."""
        with self._tensor(name) as f:
            return f.get_slice(name)[start:stop]

    @contextmanager
    def _tensor(self, name: str):
        """The open file that holds `name`, checked to hold it."""
        path = self._file(name)
        with _open(path) as f:
            _check_stored(name, set(f.keys()), path)
            yield f


@contextmanager
def _open(path: Path):
    """safe_open, with a file that is not safetensors (damaged, truncated, or a download that
    saved an error page) refused naming it; the library's own error says what is wrong."""
    from safetensors import SafetensorError, safe_open

    try:
        f = safe_open(path, framework="pt")
    except (SafetensorError, OSError) as e:
        raise UsageError(f"{path}: not a readable safetensors file ({e}); download it again or "
                         "re-save the model with save_pretrained(..., safe_serialization=True)"
                         ) from None
    with f:
        yield f


def _check_stored(name: str, stored: set[str], path: Path) -> None:
    if name not in stored:
        raise UsageError(f"{path}: has no tensor {name}, which {INDEX} places in it; the index "
                         "and the files disagree (an interrupted download or a mixed-up "
                         "directory): download the model again")
