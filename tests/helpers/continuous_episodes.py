"""Play a few multi-turn math episodes on the tiny random model, continuously, at the parallel
layout the arguments give, and write the records (rank 0) as JSON:

    [torchrun --nproc_per_node N] continuous_episodes.py OUT.json TP PP [device-draw]

The model is the same at every layout (`models.provider`), so every layout must write the same
records (tests/test_continuous.py). With `device-draw` the episodes are sampled (temperature 1)
and drawn as on CUDA (`generate._draws_on_device` forced: the inverse-CDF draw, and with TP the
tokens of TP rank 0 broadcast to the group)."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main(out: str, tp: str, pp: str, draw: str = "") -> None:
    import torch.distributed as dist

    from megatron_foresight.inference import generate
    from megatron_foresight.inference.generate import Sampling

    from megatron_foresight.config import ParallelConfig
    from megatron_foresight.runtime.dist import (
        init_distributed, init_parallel_state, read_launch_env, shutdown,
    )
    from test_continuous import episodes

    device = init_distributed(read_launch_env())
    init_parallel_state(ParallelConfig(tensor_model_parallel_size=int(tp),
                                       pipeline_model_parallel_size=int(pp)), device)
    sampling = {}
    if draw == "device-draw":
        generate._draws_on_device = lambda device: True
        sampling = {"sampling": Sampling(temperature=1.0, max_new_tokens=12, seed=11)}
    records = episodes(continuous=True, overrides=[f"parallel.tensor_model_parallel_size={tp}",
                                                   f"parallel.pipeline_model_parallel_size={pp}"],
                       **sampling)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(records))
    shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))
    main(*sys.argv[1:])
