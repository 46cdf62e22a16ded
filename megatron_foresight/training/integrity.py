"""Checkpoint integrity: a manifest of every file's size and SHA-256, written into each
checkpoint before it becomes visible and verified before one is loaded.

Why: torch's distributed-checkpoint reader loads a `.distcp` file with bytes flipped inside a
tensor without complaint; the damage surfaces steps later as a NaN loss, or never. The
manifest names the file that differs. Files are hashed by all ranks together (each rank a
share, in file order), so on a cluster the cost is spread like the save itself; a single
process (`convert to-hf`) hashes all of them. `benchmarks/checkpoint_integrity.py` measures it
against the save.

A checkpoint written before manifests existed loads as before, with a warning that it could
not be verified.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch.distributed as dist

from megatron_foresight.errors import UsageError

log = logging.getLogger(__name__)

MANIFEST = "foresight_manifest.json"
FORMAT = "foresight.checkpoint-manifest/1"


class CheckpointDamaged(UsageError):
    """A checkpoint whose files differ from its manifest (or cannot be read at all)."""

    def __init__(self, path: Path, why: str):
        self.path = path
        super().__init__(f"checkpoint {path} is damaged: {why}")


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")
                  if p.is_file() and p.name != MANIFEST)


def _digest(file: Path) -> dict:
    with file.open("rb") as f:
        return {"bytes": file.stat().st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def _shared(path: Path, names: list[str]) -> dict[str, dict]:
    """Digests of `names`, each rank of the default group computing every world-th one."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return {n: _digest(path / n) for n in names}
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {n: _digest(path / n) for n in names[rank::world]}
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    return {n: d for part in everyone for n, d in part.items()}


def write_manifest(path: Path, step: int, finite: bool) -> None:
    """Every rank calls this once the checkpoint's files are complete; rank 0 writes it.
    `finite`: the step's loss and gradient norm were finite (pruning keeps the newest such)."""
    names = _files(path)
    digests = _shared(path, names)
    if not dist.is_initialized() or dist.get_rank() == 0:
        record = {"format": FORMAT, "step": step, "finite": finite, "files": digests}
        (path / MANIFEST).write_text(json.dumps(record, indent=1) + "\n")


def read_manifest(path: Path) -> dict | None:
    """The manifest of a checkpoint; None if it has none (written before manifests)."""
    file = path / MANIFEST
    if not file.exists():
        return None
    try:
        record = json.loads(file.read_text())
        if record.get("format") != FORMAT or not isinstance(record.get("files"), dict):
            raise ValueError(f"not a {FORMAT} record")
        return record
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise CheckpointDamaged(path, f"its manifest {file} cannot be read ({e})") from None


def verify(path: Path) -> bool:
    """Check every file of the checkpoint at `path` against its manifest; raises
    CheckpointDamaged naming the first file that is missing, of another size or another
    content. Returns False for a checkpoint without a manifest (not verifiable). All ranks of
    a process group call it together."""
    manifest = read_manifest(path)
    if manifest is None:
        log.warning("checkpoint %s has no %s (saved before manifests): loading it unverified",
                    path, MANIFEST)
        return False
    expected = manifest["files"]
    for name, want in expected.items():  # sizes first: cheap, and the usual damage
        file = path / name
        if not file.is_file():
            raise CheckpointDamaged(path, f"{file} is missing")
        size = file.stat().st_size
        if size != want["bytes"]:
            raise CheckpointDamaged(path, f"{file} has {size} bytes, {want['bytes']} were "
                                          "written (truncated or overwritten)")
    actual = _shared(path, sorted(expected))
    for name, want in expected.items():
        if actual[name]["sha256"] != want["sha256"]:
            raise CheckpointDamaged(path, f"{path / name} does not hold the bytes that were "
                                          "written (its SHA-256 differs from the manifest)")
    return True
