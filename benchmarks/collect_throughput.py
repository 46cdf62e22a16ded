"""`foresight data collect` throughput: continuous batching (the default) against rounds (one
task at a time, every episode of a batch advancing one turn per forward), in one run.

    python benchmarks/collect_throughput.py --ckpt runs/demo/fe_sft [--tasks 16] [--samples 4] \
        [--mc 1] [--max-new-tokens 64] [--repeats 3] [--recipe recipes/tiny-cpu/fe_sft.yaml]

Each repeat runs the real command once per schedule, alternating, into fresh output
directories, and reads the collection's own figures from its collect.json (episodes and
continuations per second, generated tokens per second; the model's start-up is not in them) and
the whole command's wall time. Medians and the continuous / rounds ratio are printed. The two
schedules draw differently (rounds: one stream per batch; continuous: one per episode), so
they play other episodes of the same tasks: a throughput comparison, not the same tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROLLOUTS = ("rounds", "continuous")


def run_once(args, rollout: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "megatron_foresight", "data", "collect", args.recipe,
           "--ckpt", args.ckpt, "--out", str(out), "--tasks", str(args.tasks),
           "--samples", str(args.samples), "--mc", str(args.mc),
           "--max-new-tokens", str(args.max_new_tokens), "--rollout", rollout]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    manifest = json.loads((out / "collect.json").read_text())
    counts, speed = manifest["counts"], manifest["throughput"]
    played = counts["episodes"] + counts["continuations"]
    return {"wall": wall, "tokens_per_s": speed["tokens_per_s"],
            "episodes_per_s": played / speed["seconds"], "tokens": counts["tokens"],
            "played": played}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="the policy (e.g. runs/demo/fe_sft)")
    p.add_argument("--recipe", default=str(REPO / "recipes" / "tiny-cpu" / "fe_sft.yaml"),
                   help="the recipe collect plays with (default: tiny-cpu/fe_sft.yaml, the "
                        "built-in world's tasks)")
    p.add_argument("--tasks", type=int, default=16, help="tasks per command (default 16)")
    p.add_argument("--samples", type=int, default=4, help="episodes per task (default 4)")
    p.add_argument("--mc", type=int, default=1,
                   help="continuations per state for the MC estimates (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="token budget of one agent turn (default 64)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each schedule, alternating (default 3)")
    args = p.parse_args()
    runs = {r: [] for r in ROLLOUTS}
    with tempfile.TemporaryDirectory() as scratch:
        for i in range(args.repeats):
            for rollout in ROLLOUTS:
                got = run_once(args, rollout, Path(scratch) / f"{rollout}-{i}")
                runs[rollout].append(got)
                print(f"repeat {i + 1} {rollout:10s} {got['tokens_per_s']:8.1f} tokens/s "
                      f"{got['episodes_per_s']:6.3f} episodes/s (continuations included), "
                      f"{got['tokens']} tokens, {got['played']} played, {got['wall']:.1f} s "
                      "wall", flush=True)
    med = {r: {k: statistics.median(x[k] for x in runs[r])
               for k in ("tokens_per_s", "episodes_per_s", "wall")} for r in ROLLOUTS}
    print(f"\n{args.tasks} tasks x {args.samples} samples, --mc {args.mc}, <= "
          f"{args.max_new_tokens} tokens a turn; medians of {args.repeats}")
    print(f"{'':12s} {'tokens/s':>10s} {'episodes/s':>11s} {'wall s':>8s}")
    for r in ROLLOUTS:
        m = med[r]
        print(f"{r:12s} {m['tokens_per_s']:10.1f} {m['episodes_per_s']:11.3f} {m['wall']:8.1f}")
    c, b = med["continuous"], med["rounds"]
    print(f"{'ratio':12s} {c['tokens_per_s'] / b['tokens_per_s']:9.2f}x "
          f"{c['episodes_per_s'] / b['episodes_per_s']:10.2f}x "
          f"{c['wall'] / b['wall']:7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
