"""Training throughput: the Megatron-Core path against a plain PyTorch loop over Hugging Face
`LlamaForCausalLM` of the same shape, on the same batches, in one run.

    python benchmarks/train_throughput.py [--steps 20] [--warmup 3] [--repeats 3] \
        [--recipe recipes/tiny-cpu/lm.yaml] [--vs section.key=value] [section.key=value ...]

Both sides: the recipe's model shape, fp32 (with `--vs`, the recipe's precision), global batch
split into the same microbatches (gradient accumulation), AdamW with the recipe's betas / weight
decay, gradient clipping at the recipe's value, the recipe's LR schedule, and the same samples read
by the same loader. Each side runs in its own process (the Megatron side needs the CPU
compatibility layer, which the baseline must not pay for), the two alternate `--repeats` times, and
the medians and their ratio are printed. The Megatron side is
`megatron_foresight.training.loop.train_step`, what `foresight train` runs: schedule, DDP, Megatron
optimizer, per-token loss accounting. Its time is also split into forward+backward and optimizer
step, to show where a gap would come from.

With `--vs OVERRIDE` (one override each, repeatable) the baseline is the Megatron path itself
with the same overrides and those added last, instead of the Hugging Face loop: one setting
against another on the same batches, e.g. `--recipe recipes/tiny-cpu/fe_sft.yaml
data.document_masks=true --vs data.document_masks=false`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _recipe(args):
    from megatron_foresight.config import load_recipe

    return load_recipe(args.recipe, ["checkpoint.save_interval=0", "schedule.eval_steps=0",
                                     f"schedule.train_steps={args.steps + args.warmup}",
                                     "schedule.warmup_steps=1", *args.overrides, *args.vs])


def _timed_steps(step_fn, args, split=None) -> dict:
    times, parts = [], []
    for i in range(args.steps + args.warmup):
        started = time.perf_counter()
        part = step_fn()
        if i >= args.warmup:
            times.append(time.perf_counter() - started)
            parts.append(part)
    return {"step_times": times, "parts": parts}


def run_megatron(args) -> dict:
    from megatron_foresight.training import loop

    cfg = _recipe(args)
    ctx = loop.start_processes(cfg)
    run = loop.build_run(cfg, ctx, Path(args.scratch))
    iterators = loop._iterators(run, run.train_data, 0, None)
    original_step = run.optimizer.step

    def timed_optimizer_step():
        started = time.perf_counter()
        out = original_step()
        timed_optimizer_step.seconds = time.perf_counter() - started
        return out

    run.optimizer.step = timed_optimizer_step

    def step():
        started = time.perf_counter()
        metrics = loop.train_step(run, iterators)
        total = time.perf_counter() - started
        return {"loss": metrics["lm_loss"], "optimizer_s": timed_optimizer_step.seconds,
                "forward_backward_s": total - timed_optimizer_step.seconds}

    result = _timed_steps(step, args)
    result["tokens_per_step"] = cfg.schedule.global_batch_size * cfg.data.seq_length
    return result


def run_hf(args) -> dict:
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_foresight.data.tokenizer import build_tokenizer
    from megatron_foresight.training.data import StepSampler, loader
    from megatron_foresight.training.plugin import BuildContext, load_plugin

    cfg = _recipe(args)
    m, s, o = cfg.model, cfg.schedule, cfg.optimizer
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    tokenizer = build_tokenizer(cfg.data.tokenizer_config())
    data = load_plugin(cfg.stage)(cfg).build_data(BuildContext(
        cfg=cfg, stage_cfg=cfg.stage_config, tokenizer=tokenizer,
        num_train_samples=s.train_steps * s.global_batch_size, num_valid_samples=0,
        cache_dir=Path(cfg.data.cache_dir or Path(cfg.logging.runs_root) / "cache")))
    vocab = cfg.padded_vocab_size(tokenizer.vocab_size)
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.query_groups, max_position_embeddings=m.max_position_embeddings,
        rms_norm_eps=m.norm_epsilon, rope_theta=m.rotary_base, tie_word_embeddings=False,
        attention_bias=m.add_qkv_bias))
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=o.lr,
                                  betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps)
    micro = s.global_batch_size // s.micro_batch_size
    batches = loader(data.train, StepSampler(len(data.train), s.global_batch_size,
                                             s.micro_batch_size, 0, 1), 0)

    def step():
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=False)
        total_sum, total_count, sums = 0.0, 0, []
        for _ in range(micro):
            batch = next(batches)
            logits = model(input_ids=batch["tokens"], position_ids=batch["position_ids"]).logits
            per_token = torch.nn.functional.cross_entropy(
                logits.float().view(-1, vocab), batch["labels"].view(-1), reduction="none")
            mask = batch["loss_mask"].view(-1)
            loss_sum = (per_token * mask).sum()
            loss_sum.backward()
            sums.append(loss_sum.detach())
            total_count += int(mask.sum())
        for p in model.parameters():  # per-token mean over the global batch, as Megatron does
            p.grad.div_(total_count)
        fwd_bwd = time.perf_counter() - started
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
        optimizer.step()
        total_sum = float(sum(sums))
        return {"loss": total_sum / total_count,
                "optimizer_s": time.perf_counter() - started - fwd_bwd,
                "forward_backward_s": fwd_bwd}

    result = _timed_steps(step, args)
    result["tokens_per_step"] = s.global_batch_size * cfg.data.seq_length
    return result


def _child(side: str, args) -> dict:
    """One run of a side ("megatron" or "baseline") in its own process."""
    impl = "hf" if side == "baseline" and not args.vs else "megatron"
    vs = [f"--vs={o}" for o in args.vs] if side == "baseline" else []
    cmd = [sys.executable, __file__, "--impl", impl, "--steps",
           str(args.steps), "--warmup", str(args.warmup), "--recipe", str(args.recipe),
           "--scratch", args.scratch, *vs, *args.overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{side} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summary(results: list[dict]) -> dict:
    tokens = results[0]["tokens_per_step"]
    per_run = [tokens / statistics.median(r["step_times"]) for r in results]
    parts = [p for r in results for p in r["parts"]]
    return {"tokens_per_s": statistics.median(per_run), "runs": per_run,
            "forward_backward_s": statistics.median(p["forward_backward_s"] for p in parts),
            "optimizer_s": statistics.median(p["optimizer_s"] for p in parts),
            "first_loss": results[0]["parts"][0]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating")
    parser.add_argument("--recipe", default=str(REPO / "recipes/tiny-cpu/lm.yaml"))
    parser.add_argument("--impl", choices=["megatron", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--scratch", default=str(REPO / "runs" / "benchmark"),
                        help="where the Megatron side may write (nothing is saved)")
    parser.add_argument("--vs", action="append", default=[], metavar="OVERRIDE",
                        help="compare against the Megatron path with this override added "
                             "(repeatable) instead of the Hugging Face loop")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, section.key=value")
    args = parser.parse_args()
    if args.impl:
        print(json.dumps((run_megatron if args.impl == "megatron" else run_hf)(args)))
        return
    results = {"megatron": [], "baseline": []}
    for _ in range(args.repeats):
        for side in results:
            results[side].append(_child(side, args))
    mega, base = _summary(results["megatron"]), _summary(results["baseline"])
    names = ("Megatron-Core path", "HF transformers loop")
    if args.vs:
        names = (" ".join(args.overrides) or "as the recipe", "with " + " ".join(args.vs))
    print(f"train throughput, {args.recipe} {' '.join(args.overrides)}: "
          f"{args.steps} timed steps x {args.repeats} runs each, "
          f"{results['baseline'][0]['tokens_per_step']} tokens/step, "
          f"{torch.get_num_threads()} threads")
    width = max(24, *(len(n) + 2 for n in names))
    print(f"{'':{width}}{'tokens/s':>10}{'fwd+bwd s/step':>16}{'optim s/step':>14}  runs")
    for name, s in zip(names, (mega, base)):
        runs = ", ".join(f"{t:.0f}" for t in s["runs"])
        print(f"{name:{width}}{s['tokens_per_s']:>10.0f}{s['forward_backward_s']:>16.3f}"
              f"{s['optimizer_s']:>14.3f}  [{runs}]")
    label = "ratio tokens/s, first row / second" if args.vs else "ratio Megatron / HF tokens/s"
    print(f"{label}: {mega['tokens_per_s'] / base['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
