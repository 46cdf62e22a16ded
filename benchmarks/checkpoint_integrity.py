"""What the checkpoint manifest costs against the save it protects, in the same run.

    python benchmarks/checkpoint_integrity.py [--mib 1024] [--repeat 3] [--work DIR]

Saves a state of --mib MiB of fp32 tensors (a model's weights and two Adam moments, in
Megatron's ShardedTensors) with dist_checkpointing (torch_dist format, as training saves), then
writes the manifest (SHA-256 of every file) and verifies it, on one process. Printed: medians
of the save, the manifest, the verification, and manifest / save and verify / save. A cluster
spreads the hashing over its ranks, one file share each, as it spreads the save.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def _state(mib: int) -> dict:
    import torch
    from megatron.core.dist_checkpointing import ShardedTensor

    rows = 4096
    cols = mib * (1 << 20) // 4 // rows // 3  # weights + exp_avg + exp_avg_sq
    gen = torch.Generator().manual_seed(0)
    return {name: ShardedTensor.from_rank_offsets(name, torch.randn(rows, cols, generator=gen))
            for name in ("weight", "exp_avg", "exp_avg_sq")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="checkpoint size in MiB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", type=Path, help="where to write (default: a temporary dir)")
    args = parser.parse_args()

    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_foresight.runtime import compat
    from megatron_foresight.training import integrity

    compat.install()
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29517", rank=0, world_size=1)
    work = Path(args.work or tempfile.mkdtemp(prefix="ckpt-integrity-"))
    state = _state(args.mib)
    times: dict[str, list[float]] = {"save": [], "manifest": [], "verify": []}
    for i in range(args.repeat):
        path = work / f"step_{i}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        for name, step in (("save", lambda: dist_checkpointing.save(state, str(path))),
                           ("manifest", lambda: integrity.write_manifest(path, i, True)),
                           ("verify", lambda: integrity.verify(path))):
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
        size = sum(f.stat().st_size for f in path.iterdir()) / (1 << 20)
        shutil.rmtree(path)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"checkpoint of {size:.0f} MiB, {args.repeat} repeats (medians):")
    for name in times:
        print(f"  {name:9s} {med[name]:7.2f} s   {size / med[name]:8.0f} MiB/s")
    print(f"  manifest / save = {med['manifest'] / med['save']:.2f}x, "
          f"verify / save = {med['verify'] / med['save']:.2f}x")
    dist.destroy_process_group()
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
