"""Play a few multi-turn math episodes on the tiny random model, continuously, at the parallel
layout the arguments give, and write the records (rank 0) as JSON:

    [torchrun --nproc_per_node N] continuous_episodes.py OUT.json TP PP

The model is the same at every layout (`models.provider`), so every layout must write the same
records (tests/test_continuous.py)."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main(out: str, tp: str, pp: str) -> None:
    import torch.distributed as dist

    from megatron_foresight.config import ParallelConfig
    from megatron_foresight.runtime.dist import (
        init_distributed, init_parallel_state, read_launch_env, shutdown,
    )
    from test_continuous import episodes

    device = init_distributed(read_launch_env())
    init_parallel_state(ParallelConfig(tensor_model_parallel_size=int(tp),
                                       pipeline_model_parallel_size=int(pp)), device)
    records = episodes(continuous=True, overrides=[f"parallel.tensor_model_parallel_size={tp}",
                                                   f"parallel.pipeline_model_parallel_size={pp}"])
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(records))
    shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))
    main(*sys.argv[1:])
