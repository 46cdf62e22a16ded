"""Console logging, and the metrics a run writes: `metrics.jsonl`, TensorBoard events and,
when a recipe names a project, the same scalars in a Weights & Biases run."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import sys
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

from megatron_foresight.errors import UsageError

log = logging.getLogger(__name__)

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

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int = 0,
                 wandb: WandbSettings | None = None):
        self.path = run_dir / "metrics.jsonl"
        if resume_step and self.path.exists():
            _replace_lines(self.path, _records_up_to(self.path, resume_step))
        elif not resume_step and self.path.exists():
            self.path.unlink()
        # Unbuffered: each record reaches the file in one write call, so a crash can tear at
        # most the last line, which a resume drops.
        self._file = self.path.open("ab", buffering=0)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(run_dir / "tensorboard"),
                                     purge_step=resume_step + 1 if resume_step else None)
        self._wandb = start_wandb(wandb, run_dir) if wandb is not None else None

    def write(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        line = (json.dumps(record) + "\n").encode()
        with _no_space_is_a_usage_error(self.path):
            if self._file.write(line) != len(line):  # a short write: the disk just filled up
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        scalars = _scalars(record)
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _scalars(record: dict) -> dict[str, float]:
    """What the trackers plot: the finite numbers of a record, step aside."""
    return {k: v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}


@dataclass(frozen=True)
class WandbSettings:
    """Where a run's scalars go in Weights & Biases (the recipe's `logging.wandb_*`)."""

    project: str
    entity: str | None = None
    name: str | None = None
    """None: the run directory's name."""
    group: str | None = None

    @classmethod
    def of(cls, logging_cfg) -> WandbSettings | None:
        """The settings of a recipe's `logging` section; None when it names no project."""
        if not logging_cfg.wandb_project:
            return None
        return cls(logging_cfg.wandb_project, logging_cfg.wandb_entity,
                   logging_cfg.wandb_run_name, logging_cfg.wandb_group)


WANDB_ID_FILE = "wandb_run_id"
"""Beside metrics.jsonl: the W&B run's id, so a resumed run logs on into the same W&B run."""


def start_wandb(settings: WandbSettings, run_dir: Path):
    """A W&B run writing under `run_dir/wandb` (online, or offline with WANDB_MODE=offline,
    the way on a machine without network; `wandb sync` uploads it later)."""
    try:
        import wandb
    except ImportError:
        raise UsageError("logging.wandb_project is set but wandb is not installed: "
                         "pip install -e '.[wandb]' (or set logging.wandb_project=null)"
                         ) from None
    id_file = run_dir / WANDB_ID_FILE
    if not id_file.is_file():
        id_file.write_text(uuid.uuid4().hex[:12] + "\n")
    return wandb.init(project=settings.project, entity=settings.entity,
                      name=settings.name or run_dir.name, group=settings.group,
                      dir=str(run_dir), id=id_file.read_text().strip(), resume="allow")


def _records_up_to(path: Path, step: int) -> list[str]:
    """The lines of `path` whose step is at most `step`. A last line that does not read was torn
    by a crash mid-write and is dropped; a bad line before it is damage the user must see."""
    # Bytes that are not UTF-8 become U+FFFD, so their line fails to read as JSON below.
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    kept = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = _record(line)
        if record is None and lineno == len(lines):
            log.warning("%s: dropped its torn last line %d (the run stopped while writing it)",
                        path, lineno)
        elif record is None:
            raise UsageError(f"{path}:{lineno}: not a metrics record ({line[:60]!r}); repair "
                             "or delete that line, then resume")
        elif record.get("step", 0) <= step:
            kept.append(line)
    return kept


def _record(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _replace_lines(path: Path, lines: list[str]) -> None:
    """Rewrite `path` as `lines` through a temporary file, so a failure leaves it as it was."""
    tmp = path.with_suffix(".jsonl.tmp")
    try:
        with _no_space_is_a_usage_error(path):
            tmp.write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


@contextlib.contextmanager
def _no_space_is_a_usage_error(path: Path):
    """A full disk is the user's to fix: one line, not a traceback."""
    try:
        yield
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise UsageError(f"no space left on device writing {path}: free space and resume"
                         ) from None


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    return value
