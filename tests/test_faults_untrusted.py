"""A checkpoint from elsewhere is untrusted input: a crafted pickle in it (`.metadata`,
`common.pt`, a ShardedObject such as `rng_state`) is refused with a one-line error naming the
file, and what it asked to run never runs. Our own checkpoints still load (here directly; the
resume and conversion tests cover the rest)."""

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from helpers.run import foresight, train
from megatron_foresight.runtime.untrusted import RestrictedUnpickler, load_torch_file

pytestmark = pytest.mark.slow

# Written by each save since checkpoint manifests exist; a crafted checkpoint need not carry one
# (or carries one made to match), so the copies here have none.
MANIFEST = "foresight_manifest.json"


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _latest_step(run_dir: Path) -> Path:
    root = run_dir / "checkpoints"
    return root / (root / "latest").read_text().strip()


def _copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    (_latest_step(dest) / MANIFEST).unlink(missing_ok=True)
    return _latest_step(dest)


def _assert_refused(proc, file: str, marker: Path) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and file in error[0] and "posix.system" in error[0], proc.stderr[-3000:]
    assert "crafted" in error[0]
    assert "Traceback" not in proc.stderr
    assert not marker.exists(), "the crafted checkpoint ran its command"


def _craft_rng_state(step: Path, payload) -> None:
    """Replace the rng_state item's bytes by `payload` saved with torch.save: appended to the
    data file that held it, with the metadata pointing there (as a crafted checkpoint would)."""
    metadata = pickle.loads((step / ".metadata").read_bytes())
    index = next(i for i in metadata.storage_data if i.fqn.startswith("rng_state/"))
    info = metadata.storage_data[index]
    data = step / info.relative_path
    offset = data.stat().st_size
    with data.open("ab") as f:
        torch.save(payload, f)
    info.offset, info.length = offset, data.stat().st_size - offset
    (step / ".metadata").write_bytes(pickle.dumps(metadata))


def test_crafted_metadata_is_refused_by_convert_to_hf(baseline_run, tmp_path):
    step = _copy_run(baseline_run, tmp_path / "run")
    marker = tmp_path / "pwned"
    (step / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    proc = foresight(["convert", "to-hf", "--ckpt", str(step), "--out", str(tmp_path / "hf")],
                     check=False)
    _assert_refused(proc, str(step / ".metadata"), marker)
    assert not (tmp_path / "hf").exists()


def test_crafted_common_state_is_refused_by_init_from(baseline_run, data_cache, tmp_path):
    step = _copy_run(baseline_run, tmp_path / "source")
    marker = tmp_path / "pwned"
    torch.save({"config": Payload(marker)}, step / "common.pt")
    proc = train(tmp_path / "run", [f"checkpoint.init_from={step}", "schedule.train_steps=2"],
                 cache_dir=data_cache, check=False)
    _assert_refused(proc, str(step / "common.pt"), marker)


@pytest.mark.parametrize("crafted", [".metadata", "rng_state"])
def test_crafted_checkpoint_is_refused_by_resume(crafted, baseline_run, data_cache, tmp_path):
    run_dir = tmp_path / "run"
    step = _copy_run(baseline_run, run_dir)
    marker = tmp_path / "pwned"
    if crafted == ".metadata":  # read inside torch's load, which wraps what its steps raise
        (step / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    else:
        _craft_rng_state(step, [{"python": Payload(marker)}])  # a list, as Megatron saves
    proc = train(run_dir, cache_dir=data_cache, extra=["--resume"], check=False)
    _assert_refused(proc, crafted, marker)


def test_restricted_loaders_read_a_real_checkpoint_exactly(baseline_run):
    step = _latest_step(baseline_run)
    with (step / ".metadata").open("rb") as f:
        restricted = RestrictedUnpickler(f, f.name).load()
    assert restricted == pickle.loads((step / ".metadata").read_bytes())
    common = load_torch_file(step / "common.pt", step / "common.pt", map_location="cpu")
    unrestricted = torch.load(step / "common.pt", map_location="cpu", weights_only=False)
    assert _same(common, unrestricted)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b
