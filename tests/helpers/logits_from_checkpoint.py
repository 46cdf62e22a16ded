"""Logits of a checkpoint on a fixed batch, at whatever TP size the overrides give.

    [torchrun --nproc_per_node N] logits_from_checkpoint.py CKPT_DIR|none OUT.npy [key=value ...]

The recipe comes from the config the checkpoint recorded (or the test recipe for `none`, which
means a freshly initialized model). Full-vocabulary logits are gathered across TP ranks and
written by rank 0."""

import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]


def main(ckpt_arg: str, out: str, overrides: list[str]) -> None:
    from megatron_foresight.config import load_recipe, recipe_from_tree
    from megatron_foresight.models.provider import build_model
    from megatron_foresight.runtime.dist import shutdown
    from megatron_foresight.training import checkpoint as ckpt
    from megatron_foresight.training.loop import start_processes

    path = None if ckpt_arg == "none" else ckpt.find_checkpoint(ckpt_arg)
    if path is None:
        cfg = load_recipe(REPO / "tests/recipes/tiny-test.yaml", overrides)
    else:
        cfg = recipe_from_tree(ckpt.read_common(path)["config"], overrides)
    ctx = start_processes(cfg)
    assert ctx.pp_size == 1, "this helper gathers logits from one pipeline stage"
    (model,) = build_model(cfg, cfg.padded_vocab_size(259), ctx.pg_collection)
    if path is not None:
        ckpt.load_checkpoint(path, chunks=[model], ctx=ctx)
    model.eval()
    tokens = torch.randint(0, 259, (2, 64), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(64).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        logits = model(tokens, positions, None, runtime_gather_output=True)
    if ctx.rank == 0:
        np.save(out, logits.float().numpy())
    shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
