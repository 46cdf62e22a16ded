"""`model.precision: auto`: bf16 where this machine runs it faster, fp32 where it does not.

On CUDA, auto is bf16 (tensor cores run it several times faster than fp32). On a CPU it depends
on the chip, not on its flags: one thread of a 4096x256 @ 256x704 matmul took 6.5 ms in bf16
against 19.2 ms in fp32 on an AMD EPYC, and 23.5 ms against 16.0 ms on an Intel Xeon that also
reports AVX-512 BF16, where a recipe that hard-codes bf16 trains 2-3x slower. So on a CPU auto
times the model's own forward matmuls (`probe_shapes`) in both dtypes, at this process's thread
count, and takes bf16 only when it is at least `BF16_MIN_SPEEDUP` times faster.

The probe takes well under 2 s; its figures are cached per machine in `precision.json` under
`cache_dir()` (FORESIGHT_CACHE_DIR, else ~/.cache/megatron-foresight), keyed by the CPU, torch
version, thread count and shapes, so a changed model or thread count measures again. `resolve`
turns auto into fp32 or bf16 once, in `training.loop.start_processes`, before any model is
built: rank 0 decides and every rank takes its choice, so the ranks of one job never disagree.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BF16_MIN_SPEEDUP = 1.1
"""bf16 must run the probe at least this much faster than fp32 to be chosen. The probe times
matmuls only: bf16 training also pays for casts, fp32 master weights and their copies in the
optimizer, and rounds activations to 8 mantissa bits, so a near tie (within the probe's few
percent of noise) goes to fp32, the exact one."""
PROBE_MACS = 4e9
"""Multiply-accumulates of one timed pass over the shapes (each projection once): ~40 ms of fp32
on two cores of an AMD EPYC, so warm-up and `PROBE_REPEATS` in both dtypes take ~1 s on a
laptop-class CPU."""
PROBE_REPEATS = 5
"""Timed passes per dtype after a warm-up pass; the median counts."""
MIN_TOKENS, MAX_TOKENS = 64, 4096
"""Rows of the probe's activations: the recipe's micro_batch_size * seq_length, fewer when the
shapes are wide (`PROBE_MACS`), never so few that the matmuls stop looking like training's."""
MAX_WIDTH = 4096
"""A projection wider than this (a vocabulary) is timed on this many output columns and its
time scaled up: matmul time grows linearly in the output width."""
CACHE_VERSION = 1
CACHE_FILE = "precision.json"


@dataclass(frozen=True)
class Projection:
    """One weight matrix of the model, as this rank holds it, and how often a forward uses it."""

    name: str
    fan_in: int
    fan_out: int
    uses: int

    def timed(self) -> tuple[int, float]:
        """(output columns timed, factor from their time to the whole projection's per pass)."""
        width = min(self.fan_out, MAX_WIDTH)
        return width, self.uses * self.fan_out / width


@dataclass(frozen=True)
class ProbeShapes:
    tokens: int
    projections: tuple[Projection, ...]

    def key(self) -> str:
        return f"{self.tokens}t:" + ",".join(
            f"{p.name}={p.fan_in}x{p.fan_out}*{p.uses}" for p in self.projections)


def probe_shapes(cfg) -> ProbeShapes:
    """The forward matmuls of `cfg`'s model (a RecipeConfig) on one rank: per layer the QKV
    projection, the attention output, the MLP's first (SwiGLU: two branches) and second
    projection; then the output layer. Tensor parallelism splits each of them."""
    m = cfg.model
    tp = cfg.parallel.tensor_model_parallel_size
    layers = math.ceil(m.num_layers / cfg.parallel.pipeline_model_parallel_size)  # one stage's
    h, heads = m.hidden_size, m.num_attention_heads * m.head_dim
    qkv = heads + 2 * m.query_groups * m.head_dim
    fc1 = m.ffn_hidden_size * (2 if m.activation == "swiglu" else 1)
    projections = [Projection("qkv", h, max(1, qkv // tp), layers),
                   Projection("proj", max(1, heads // tp), h, layers),
                   Projection("fc1", h, max(1, fc1 // tp), layers),
                   Projection("fc2", max(1, m.ffn_hidden_size // tp), h, layers)]
    if m.vocab_size:  # else the tokenizer sets it, and that is not known before processes start
        vocab = cfg.padded_vocab_size(m.vocab_size)
        projections.append(Projection("output", h, max(1, vocab // tp), 1))
    macs = sum(proj.fan_in * proj.timed()[0] for proj in projections)
    wanted = cfg.schedule.micro_batch_size * cfg.data.seq_length
    tokens = max(MIN_TOKENS, min(wanted, MAX_TOKENS, int(PROBE_MACS // macs)) // 16 * 16)
    return ProbeShapes(tokens, tuple(projections))


def choose(fp32_ms: float, bf16_ms: float, min_speedup: float = BF16_MIN_SPEEDUP) -> str:
    """bf16 when the probe ran at least `min_speedup` times faster in it, else fp32."""
    return "bf16" if bf16_ms > 0 and fp32_ms / bf16_ms >= min_speedup else "fp32"


def measure(shapes: ProbeShapes, repeats: int = PROBE_REPEATS) -> tuple[float, float]:
    """(fp32 ms, bf16 ms): the median over `repeats` of one forward's matmul time at
    `shapes.tokens` tokens, each projection timed once and weighted by its uses and width.
    The dtypes alternate within each repeat, so a load change on the machine hits both."""
    gen = torch.Generator().manual_seed(0)
    operands = {dtype: [(torch.randn(shapes.tokens, p.fan_in, generator=gen).to(dtype),
                         torch.randn(p.timed()[0], p.fan_in, generator=gen).to(dtype),
                         p.timed()[1]) for p in shapes.projections]
                for dtype in (torch.float32, torch.bfloat16)}

    def one_pass(dtype) -> float:
        total = 0.0
        with torch.no_grad():
            for x, w, factor in operands[dtype]:
                start = time.perf_counter()
                torch.nn.functional.linear(x, w)
                total += (time.perf_counter() - start) * factor
        return total * 1e3

    for dtype in operands:
        one_pass(dtype)  # warm-up: kernel selection, page faults on first touch
    times = {dtype: [] for dtype in operands}
    for _ in range(repeats):
        for dtype in operands:
            times[dtype].append(one_pass(dtype))
    return statistics.median(times[torch.float32]), statistics.median(times[torch.bfloat16])


@dataclass
class PrecisionChoice:
    """How `model.precision: auto` was resolved."""

    precision: str
    source: str
    """cuda (auto is bf16 there), measured (probed now), cached (an earlier probe's figures),
    fallback (the probe failed: fp32) or checkpoint (a resumed run keeps its saved precision)."""
    fp32_ms: float | None = None
    bf16_ms: float | None = None
    cpu: str = ""
    threads: int = 0
    tokens: int = 0

    def figures(self) -> str:
        """The probe's figures in words ('' without a probe)."""
        if self.fp32_ms is None or self.bf16_ms is None:
            return ""
        return (f"this model's forward matmuls at {self.tokens} tokens take "
                f"{self.fp32_ms:.2f} ms in fp32, {self.bf16_ms:.2f} ms in bf16: "
                f"{self.fp32_ms / self.bf16_ms:.2f}x (bf16 needs >= {BF16_MIN_SPEEDUP}x) on "
                f"{self.cpu}, {self.threads} thread(s), torch {torch.__version__}")

    def describe(self) -> str:
        """The log line of the decision."""
        where = {"cuda": "CUDA", "measured": "measured now",
                 "cached": f"from the cache {cache_path()}", "fallback": "the probe failed",
                 "checkpoint": "as the checkpoint resumed was saved"}[self.source]
        figures = f"; {self.figures()}" if self.figures() and self.source != "checkpoint" else ""
        return (f"model.precision=auto: {self.precision} ({where}{figures}); set "
                "model.precision=fp32 or bf16 to force one")

    def note(self) -> str:
        """One line for the run's config.yaml."""
        why = {"cuda": "on CUDA", "measured": "by a probe", "cached": "by a cached probe",
               "fallback": "after a failed probe",
               "checkpoint": "to match the checkpoint resumed"}[self.source]
        figures = f" ({self.figures()})" if self.figures() else ""
        return f"model.precision: auto in the recipe; {self.precision} {why}{figures}"


def cpu_name() -> str:
    """The CPU's model name, with its bf16 matrix instruction flags (a shared home directory
    may serve machines whose virtualized CPUs share a name but not those)."""
    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not name:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "unknown CPU"
    extra = sorted(flags & {"avx512_bf16", "amx_bf16"})
    return f"{name} [{' '.join(extra)}]" if extra else name


def cache_dir() -> Path:
    """FORESIGHT_CACHE_DIR, else $XDG_CACHE_HOME/megatron-foresight, else
    ~/.cache/megatron-foresight."""
    if os.environ.get("FORESIGHT_CACHE_DIR"):
        return Path(os.environ["FORESIGHT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "megatron-foresight"


def cache_path() -> Path:
    return cache_dir() / CACHE_FILE


def cache_key(cpu: str, threads: int, shapes: ProbeShapes) -> str:
    return f"{cpu} | torch {torch.__version__} | {threads} threads | {shapes.key()}"


def read_cache(path: Path) -> dict:
    """The cached probes by key; a missing file is empty, an unreadable one is ignored (and
    replaced at the next write) with a warning."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring the precision cache %s (%s: %s); measuring again", path,
                    type(e).__name__, e)
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION \
            or not isinstance(data.get("probes"), dict):
        log.warning("ignoring the precision cache %s: not a version-%d cache file; measuring "
                    "again", path, CACHE_VERSION)
        return {}
    return data["probes"]


def write_cache(path: Path, key: str, entry: dict) -> None:
    """Add `entry` under `key`, atomically (a temporary file renamed over the old one); a
    cache that cannot be written costs a probe next time, not the run."""
    probes = {**read_cache(path), key: entry}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"version": CACHE_VERSION, "probes": probes}, f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        log.warning("cannot write the precision cache %s (%s); the next run measures again",
                    path, e)


def _cached_figures(entry) -> tuple[float, float] | None:
    try:
        fp32, bf16 = float(entry["fp32_ms"]), float(entry["bf16_ms"])
    except (TypeError, KeyError, ValueError):
        return None
    return (fp32, bf16) if fp32 > 0 and bf16 > 0 else None


def decide_on_cpu(cfg) -> PrecisionChoice:
    """fp32 or bf16 for `cfg`'s model on this CPU: from the cache, or measured and cached."""
    shapes, cpu, threads = probe_shapes(cfg), cpu_name(), torch.get_num_threads()
    path, key = cache_path(), cache_key(cpu, threads, shapes)
    figures = _cached_figures(read_cache(path).get(key))
    source = "cached"
    if figures is None:
        figures, source = measure(shapes), "measured"
        write_cache(path, key, {"fp32_ms": round(figures[0], 4), "bf16_ms": round(figures[1], 4),
                                "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return PrecisionChoice(choose(*figures), source, figures[0], figures[1], cpu, threads,
                           shapes.tokens)


def decide(cfg) -> PrecisionChoice:
    """What auto means for `cfg` on this machine (this process alone; see `resolve`)."""
    if torch.cuda.is_available():
        return PrecisionChoice("bf16", "cuda")
    try:
        return decide_on_cpu(cfg)
    except Exception as e:  # a probe that cannot run must not stop the job: fp32 always works
        log.warning("model.precision=auto: the bf16/fp32 probe failed (%s: %s); using fp32",
                    type(e).__name__, e)
        return PrecisionChoice("fp32", "fallback", cpu=cpu_name())


def resolve(cfg) -> PrecisionChoice | None:
    """Turn `cfg.model.precision: auto` into fp32 or bf16, in place, before any model is built:
    rank 0 decides (`decide`) and every rank of the job takes its choice. Returns the choice
    (also kept as `cfg.model.precision_choice`), or None when the recipe named a precision."""
    from megatron_foresight.runtime.dist import broadcast_object, is_rank0

    if cfg.model.precision != "auto":
        return None
    choice = broadcast_object(decide(cfg) if is_rank0() else None)
    log.info("%s", choice.describe())
    cfg.model.precision = choice.precision
    cfg.model.precision_choice = choice
    return choice


def adopt_checkpoint_precision(cfg, saved: str | None, checkpoint) -> None:
    """On --resume of a run whose recipe says auto: keep the precision its checkpoint was
    saved in, whatever this machine would pick, since optimizer state (fp32 master weights
    beside bf16 ones, or none) does not convert between the two."""
    choice = getattr(cfg.model, "precision_choice", None)
    if choice is None or saved not in ("fp32", "bf16", "fp16") or saved == cfg.model.precision:
        return
    log.info("model.precision=auto: %s, the precision of the checkpoints resumed in %s (this "
             "machine would pick %s)", saved, checkpoint, cfg.model.precision)
    cfg.model.precision = saved
    cfg.model.precision_choice = PrecisionChoice(saved, "checkpoint", **{
        k: v for k, v in asdict(choice).items() if k not in ("precision", "source")})
