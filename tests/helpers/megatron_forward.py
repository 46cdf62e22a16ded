"""Run a checkpoint on the Megatron side, at whatever TP size the overrides give:

    [torchrun --nproc_per_node N] megatron_forward.py CKPT|none TOKENS.npy OUT.npy [--greedy K]
                                                      [key=value ...]

Writes (rank 0) the full-vocabulary logits of TOKENS (int64, batch x seq), gathered across TP
ranks; or, with --greedy K, TOKENS followed by K greedily chosen tokens (recomputing the whole
sequence each step: a reference, not a fast decoder). The recipe is the config the checkpoint
recorded; `none` means a freshly initialized model of the test recipe."""

import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str]) -> None:
    from megatron_foresight.config import load_recipe, recipe_from_tree
    from megatron_foresight.data.tokenizer import build_tokenizer
    from megatron_foresight.models.provider import build_model
    from megatron_foresight.runtime.dist import shutdown
    from megatron_foresight.training import checkpoint as ckpt
    from megatron_foresight.training.loop import start_processes

    ckpt_arg, tokens_file, out, *rest = argv
    greedy = 0
    if rest[:1] == ["--greedy"]:
        greedy, rest = int(rest[1]), rest[2:]
    path = None if ckpt_arg == "none" else ckpt.find_checkpoint(ckpt_arg)
    if path is None:
        cfg = load_recipe(REPO / "tests/recipes/tiny-test.yaml", rest)
    else:
        cfg = recipe_from_tree(ckpt.read_common(path)["config"], rest)
    ctx = start_processes(cfg)
    assert ctx.pp_size == 1, "this helper gathers logits from one pipeline stage"
    vocab = cfg.padded_vocab_size(build_tokenizer(cfg.data.tokenizer_config()).vocab_size)
    (model,) = build_model(cfg, vocab, ctx.pg_collection)
    if path is not None:
        ckpt.load_checkpoint(path, chunks=[model], ctx=ctx)
    model.eval()
    tokens = torch.from_numpy(np.load(tokens_file)).long()

    def logits_of(ids):
        positions = torch.arange(ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
        return model(ids, positions, None, runtime_gather_output=True).float()

    with torch.no_grad():
        if greedy:
            for _ in range(greedy):
                tokens = torch.cat([tokens, logits_of(tokens)[:, -1].argmax(-1, keepdim=True)], 1)
            result = tokens.numpy()
        else:
            result = logits_of(tokens).numpy()
    if ctx.rank == 0:
        np.save(out, result)
    shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main(sys.argv[1:])
