"""Console logging, and the metrics a run writes: `metrics.jsonl` and TensorBoard events."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import warnings
from pathlib import Path

# Megatron-Core warns at import that Transformer Engine and Apex are missing and that it falls back
# to torch implementations. On the CPU that is the intended configuration, so these are noise.
_EXPECTED_ON_CPU = (
    r".*Transformer Engine.*", r".*[Aa]pex.*", r".*TE.*not installed.*", r".*nvidia-resiliency.*",
    r".*flash.?attn.*", r".*Falling back.*", r".*fused.*kernel.*", r".*mamba.*", r".*causal_conv1d.*",
    r".*full scope is deprecated.*", r".*CUDA_DEVICE_MAX_CONNECTIONS.*",
)


def setup_logging(rank: int, verbose: bool = False) -> None:
    """INFO on rank 0 (WARNING elsewhere), one format, Megatron's expected CPU warnings muted."""
    level = logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[%(asctime)s rank{rank}] %(message)s", "%H:%M:%S"))
    root = logging.getLogger("megatron_foresight")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    plugins = logging.getLogger("plugins")
    plugins.handlers[:] = [handler]
    plugins.setLevel(level)
    plugins.propagate = False
    logging.getLogger("megatron").setLevel(logging.DEBUG if verbose else logging.WARNING)
    quiet_expected_warnings()


def quiet_expected_warnings() -> None:
    if os.environ.get("FORESIGHT_SHOW_ALL_WARNINGS"):
        return
    for pattern in _EXPECTED_ON_CPU:
        warnings.filterwarnings("ignore", message=pattern)
    # Megatron-Core deprecation chatter about its own internals.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"megatron\..*")


class MetricsWriter:
    """Appends one JSON object per logged step to `metrics.jsonl` and mirrors scalars to
    TensorBoard. On resume from step k it first drops records after k (written by the run that
    crashed after its last checkpoint), so the file reads as one uninterrupted run."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int = 0):
        self.path = run_dir / "metrics.jsonl"
        if resume_step and self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            os.replace(tmp, self.path)
        elif not resume_step and self.path.exists():
            self.path.unlink()
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(run_dir / "tensorboard"),
                                     purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    return value
