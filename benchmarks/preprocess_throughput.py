"""Preprocessing throughput and memory: built-in trajectories -> indexed dataset.

    python benchmarks/preprocess_throughput.py [--trajectories 100000] [--tokenizer spm|byte]

Builds a world with that many trajectories (no Monte-Carlo estimates, cached in --work), then
runs `foresight data preprocess` on it as the real command line with 1 and 2 workers, and with
2 workers on the first quarter and half of the file, sampling the process tree's memory. The
baseline, measured in the same run, is a process that only imports what preprocessing imports.
Prints trajectories/s, the ratio of 2 workers to 1, and peak memory against input size.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

from proc_memory import MB, REPO, peak_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trajectories", type=int, default=100_000)
    parser.add_argument("--tokenizer", choices=["spm", "byte"], default="spm")
    parser.add_argument("--work", default="/tmp/preprocess-bench")
    args = parser.parse_args()
    work = Path(args.work)
    world = work / f"world-{args.trajectories}"
    if not (world / "manifest.json").exists():
        print(f"building a world with {args.trajectories} trajectories ...", flush=True)
        cmd = [sys.executable, "-m", "megatron_foresight", "data", "build-world",
               "--out", str(world), "--trajectories", str(args.trajectories),
               "--validation-trajectories", "0", "--mc-samples", "0", "--workers", "2"]
        peak_memory(cmd)
    source = world / "trajectories" / "train.jsonl"
    inputs = {args.trajectories: source}
    with source.open() as f:
        lines = f.readlines()
    for fraction in (4, 2):
        part = work / f"part-{args.trajectories // fraction}.jsonl"
        if not part.exists():
            part.write_text("".join(itertools.islice(lines, args.trajectories // fraction)))
        inputs[args.trajectories // fraction] = part
    del lines
    tokenizer = str(world / "tokenizer" / "spm.model") if args.tokenizer == "spm" else "byte"
    print(f"input: {source} ({source.stat().st_size / MB:.0f} MB), tokenizer {tokenizer}")

    def preprocess(path: Path, workers: int) -> list[str]:
        return [sys.executable, "-m", "megatron_foresight", "data", "preprocess",
                "--input", str(path), "--output-prefix", str(work / f"out-{workers}"),
                "--tokenizer", tokenizer, "--workers", str(workers)]

    baseline = [sys.executable, "-c", "import megatron_foresight.data.preprocess, "
                "megatron.core.datasets.indexed_dataset, sentencepiece"]
    _, base_total, base_one = peak_memory(baseline)
    print(f"{'run':32s} {'seconds':>8s} {'traj/s':>8s} {'peak MB (tree)':>15s} "
          f"{'over baseline':>14s}")
    print(f"{'baseline (imports only)':32s} {'':8s} {'':8s} {base_total:15.0f} {'':14s}")
    rates = {}
    for n, workers in [(args.trajectories, 1), (args.trajectories, 2),
                       (args.trajectories // 2, 2), (args.trajectories // 4, 2)]:
        seconds, total, _ = peak_memory(preprocess(inputs[n], workers))
        rates[(n, workers)] = n / seconds
        print(f"{f'{n} trajectories, {workers} worker(s)':32s} {seconds:8.1f} {n / seconds:8.0f} "
              f"{total:15.0f} {total - base_total:+14.0f}", flush=True)
    n = args.trajectories
    print(f"2 workers / 1 worker throughput: {rates[(n, 2)] / rates[(n, 1)]:.2f}x")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
