"""The paper's format-capability gap on a real model: FE-SFT from the WM-AMT checkpoint against
FE-SFT from the converted base model (same data, same steps), then FC-RL from each, evaluated
on validation tasks that no stage trained on.

    python benchmarks/format_gap_smollm2.py --work runs/format-gap [--train-tasks 12]
        [--val-tasks 12] [--samples 2] [--mc 1] [--wm-steps 6] [--fe-steps 8] [--rl-steps 2]

Model: SmolLM2-135M-Instruct (`tools/build_smollm2.py`), through `recipes/smollm2-135m/` with
sizes set by the flags. Tasks: reasoning-gym's `gsm_symbolic` word problems (real
grade-school math, generated from a seed, no download) for the math environment; training and
validation tasks come from different generator seeds, and a validation question that also
occurs in training is dropped. Every step is the documented command line (printed as it runs);
a step whose output exists is skipped, so a stopped run continues. Prints the table (task
success, format validity, rollout fidelity, value Brier / ECE / AUROC per arm), collection
throughput and the wall time of each step, and writes them to WORK/format_gap.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "smollm2-135m"
METRICS = ("task_success", "format_validity", "rollout_fidelity", "turns_per_episode",
           "value_brier", "value_ece", "value_auroc")


def run(cmd: list, done: Path, timings: dict, name: str) -> None:
    """`foresight ...` (or any command) unless `done` exists; its wall time in `timings`."""
    if done.exists():
        print(f"[skip] {name}: {done} exists", flush=True)
        return
    cmd = [str(c) for c in cmd]
    print(f"[run] {name}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    timings[name] = round(time.perf_counter() - start, 1)


def foresight(*args) -> list:
    return [sys.executable, "-m", "megatron_foresight", *args]


def tasks(work: Path, n_train: int, n_val: int, timings: dict) -> tuple[Path, Path]:
    train, val = work / "tasks" / "train.jsonl", work / "tasks" / "validation.jsonl"
    run(foresight("data", "import", "reasoning-gym", "gsm_symbolic", "--n", n_train,
                  "--seed", 1, "--out", train), train, timings, "tasks/train")
    raw = work / "tasks" / "validation-all.jsonl"
    run(foresight("data", "import", "reasoning-gym", "gsm_symbolic", "--n", n_val * 2,
                  "--seed", 2, "--out", raw), raw, timings, "tasks/validation")
    if not val.exists():
        seen = {json.loads(line)["question"] for line in train.read_text().splitlines()}
        fresh = [line for line in raw.read_text().splitlines()
                 if json.loads(line)["question"] not in seen]
        val.write_text("".join(line + "\n" for line in fresh[:n_val]))
    return train, val


def overrides(args, hf: Path, train: Path, val: Path) -> list[str]:
    return [f"data.tokenizer.path={hf}", f"data.cache_dir={args.work / 'cache'}",
            "data.world=null", f"data.seq_length={args.seq_length}", f"seed={args.seed}",
            f"tasks=[{{name: gsm, env: math, splits: {{train: {train}, validation: {val}}}, "
            f"options: {{symbolic: false, max_turns: {args.max_turns}}}}}]",
            "logging.tensorboard=false"]


def schedule(steps: int) -> list[str]:
    return [f"schedule.train_steps={steps}", "schedule.global_batch_size=4",
            "schedule.micro_batch_size=1", "schedule.warmup_steps=1", "schedule.eval_interval=0",
            "schedule.eval_steps=2", "checkpoint.save_interval=0"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("runs/format-gap"),
                   help="where everything is written (reused when present)")
    p.add_argument("--train-tasks", type=int, default=12, help="tasks collected for training")
    p.add_argument("--val-tasks", type=int, default=12, help="validation tasks every arm plays")
    p.add_argument("--samples", type=int, default=2, help="collected episodes per task")
    p.add_argument("--mc", type=int, default=1, help="continuations per state (MC estimate)")
    p.add_argument("--wm-steps", type=int, default=6)
    p.add_argument("--fe-steps", type=int, default=8)
    p.add_argument("--rl-steps", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=128, help="per agent turn")
    p.add_argument("--max-turns", type=int, default=2, help="the math environment's budget")
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.7,
                   help="sampling temperature of collection and FC-RL (1.0 makes a 135M model "
                        "write noise)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling of collection")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    timings: dict = {}

    hf, base = args.work / "SmolLM2-135M-Instruct", args.work / "base"
    run([sys.executable, REPO / "tools" / "build_smollm2.py", hf], hf / "config.json", timings,
        "build_smollm2")
    run(foresight("convert", "from-hf", "--hf-dir", hf, "--out", base),
        base / "checkpoints" / "latest", timings, "from-hf")
    train, val = tasks(args.work, args.train_tasks, args.val_tasks, timings)
    common = overrides(args, hf, train, val)
    collected = args.work / "collect"
    gen = ["--max-new-tokens", args.max_new_tokens, "--temperature", args.temperature,
           "--top-p", args.top_p]
    run(foresight("data", "collect", RECIPES / "wm_amt.yaml", *common, "--ckpt", base, "--out",
                  collected / "train", "--split", "train", "--samples", args.samples, "--mc",
                  args.mc, *gen, "--tasks", args.train_tasks),
        collected / "train" / "done", timings, "collect/train")
    (collected / "train" / "done").touch()

    data = [f"wm_amt.sources=[{collected / 'train'}]",
            f"wm_amt.valid_sources=[{collected / 'train'}]"]
    wm = args.work / "wm_amt"
    run(foresight("train", RECIPES / "wm_amt.yaml", *common, *schedule(args.wm_steps), *data,
                  f"checkpoint.init_from={base}", "--run-dir", wm),
        wm / "checkpoints" / "latest", timings, "wm_amt")
    fe_data = [f"fe_sft.sources=[foresight:{collected / 'train'}, {collected / 'train'}]",
               f"fe_sft.valid_sources=[foresight:{collected / 'train'}]"]
    arms = {"wm_amt+fe_sft": wm, "fe_sft (no wm_amt)": base}
    table = {}
    for name, start in arms.items():
        tag = "with_wm" if start == wm else "no_wm"
        fe, rl = args.work / f"fe_sft_{tag}", args.work / f"fc_rl_{tag}"
        run(foresight("train", RECIPES / "fe_sft.yaml", *common, *schedule(args.fe_steps),
                      *fe_data, f"checkpoint.init_from={start}", "--run-dir", fe),
            fe / "checkpoints" / "latest", timings, f"fe_sft/{tag}")
        run(foresight("train", RECIPES / "fc_rl.yaml", *common, *schedule(args.rl_steps),
                      "schedule.eval_at_start=false", f"checkpoint.init_from={fe}",
                      "fc_rl.prompts_per_step=2", "fc_rl.group_size=2",
                      f"fc_rl.temperature={args.temperature}",
                      f"fc_rl.max_new_tokens={args.max_new_tokens}", "fc_rl.validation_tasks=0",
                      "--run-dir", rl), rl / "checkpoints" / "latest", timings, f"fc_rl/{tag}")
        for stage, ckpt in (("fe_sft", fe), ("fc_rl", rl)):
            out = args.work / "eval" / f"{stage}_{tag}.json"
            # an SFT stage's evaluation also scores its validation loss: on the same data
            data_for = fe_data if stage == "fe_sft" else []
            run(foresight("eval", RECIPES / f"{stage}.yaml", *common, *data_for, "--ckpt", ckpt,
                          "--tasks", args.val_tasks, "--max-new-tokens", args.max_new_tokens,
                          "--out", out), out, timings, f"eval/{stage}_{tag}")
            metrics = json.loads(out.read_text())["metrics"]
            table[f"{stage} from {'wm_amt' if tag == 'with_wm' else 'base'}"] = {
                k: metrics.get(k) for k in METRICS}

    collect = json.loads((collected / "train" / "collect.json").read_text())
    print(f"\n{'':32}" + "".join(f"{k[:14]:>15}" for k in METRICS))
    for row, values in table.items():
        print(f"{row:32}" + "".join(f"{'-' if v is None else f'{v:.3f}':>15}"
                                    for v in values.values()))
    print(f"\ncollection: {json.dumps(collect.get('throughput', collect))}")
    print(f"wall time per step (s, this run): {json.dumps(timings)}")
    (args.work / "format_gap.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "table": table,
         "collect": collect, "timings": timings}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
