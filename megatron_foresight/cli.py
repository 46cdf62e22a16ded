"""The `foresight` command.

    foresight train RECIPE [section.key=value ...] [--run-dir DIR] [--resume]
    foresight config RECIPE [section.key=value ...] [--world-size N]
    foresight config --keys [--stage STAGE]
    foresight plan RECIPE --nodes N --gpus-per-node G [section.key=value ...]
    foresight convert from-hf --hf-dir DIR --out CKPT_DIR [--tp N] [--pp M]
    foresight convert to-hf --ckpt CKPT_DIR --out DIR
    foresight data validate|build-world|import|preprocess|index|collect ...

`train` runs one stage on however many processes launched it: plain `foresight train` is one
process; `torchrun --nproc_per_node N -m megatron_foresight train ...` is N; `srun foresight
train ...` is one per Slurm task.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
from pathlib import Path

import yaml

from megatron_foresight.configtree import ConfigError
from megatron_foresight.data.commands import add_data_parser, run_data
from megatron_foresight.data.records import DataFileError
from megatron_foresight.errors import UsageError
from megatron_foresight.runtime import run_lock

OVERRIDES_HELP = ("recipe overrides, e.g. schedule.train_steps=20 "
                  "parallel.tensor_model_parallel_size=2 (see `foresight config --keys`)")


def _add_recipe_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("recipe", nargs=None if required else "?", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help=OVERRIDES_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="foresight",
        description="megatron-foresight: train LLM agents to plan with an internal world model, "
                    "on Megatron-Core.",
        epilog="Run `foresight COMMAND --help` for a command's options. Errors that are "
               "yours to fix print one line; --debug (or FORESIGHT_DEBUG=1) adds the stack.")
    parser.add_argument("--debug", action="store_true",
                        help="print the full stack with an error (also FORESIGHT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = sub.add_parser(
        "train", help="run one training stage from a recipe",
        description="Run one training stage from a recipe. Writes checkpoints, metrics.jsonl, "
                    "TensorBoard events and the resolved config.yaml into one run directory, "
                    "whose path it prints. Under torchrun or srun it runs on every process.",
        epilog="Examples:\n"
               "  foresight train recipes/tiny-cpu/lm.yaml\n"
               "  foresight train recipes/tiny-cpu/lm.yaml schedule.train_steps=20\n"
               "  torchrun --nproc_per_node 2 -m megatron_foresight train "
               "recipes/tiny-cpu/lm.yaml parallel.tensor_model_parallel_size=2\n"
               "  foresight train recipes/tiny-cpu/lm.yaml --run-dir runs/a --resume",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_recipe_args(train)
    train.add_argument("--run-dir", help="run directory (default: <logging.runs_root>/"
                                         "<recipe>-<date>-<time>, or logging.run_name)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the latest checkpoint in the run directory (without "
                            "--run-dir: the newest run of this recipe); starts at step 0 if "
                            "there is none yet, so a requeued job can always pass it")
    train.add_argument("--stop-at-step", type=int, metavar="N",
                       help="save and stop after step N, leaving the schedule as the recipe says "
                            "(to split a run over several jobs; continue with --resume)")
    train.add_argument("--verbose", action="store_true", help="debug logging on every rank")

    ev = sub.add_parser(
        "eval", help="evaluate a checkpoint: stage metrics and agent episodes",
        description="Evaluate a checkpoint with a stage recipe: the stage's validation metrics "
                    "(loss per segment type; next-observation accuracy for wm_amt), then greedy "
                    "episodes on the recipe's task sets (tasks:), or on a one-off task file: "
                    "task success, format validity, rollout fidelity against the real "
                    "environment and value calibration (Brier, log score, ECE, AUROC), over all "
                    "tasks and per set with the environment's own scores (EM and F1 for search, "
                    "accuracy for math).",
        epilog="Examples:\n"
               "  foresight eval recipes/tiny-cpu/fe_sft.yaml --ckpt runs/fe_sft\n"
               "  foresight eval recipes/tiny-cpu/wm_amt.yaml --ckpt runs/wm_amt --tasks 0\n"
               "  foresight eval recipes/8b/fc_rl.yaml --ckpt runs/fc_rl_8b --set nq --tasks 1000\n"
               "  foresight eval R --ckpt C --tasks-file nq_dev.jsonl --env search "
               "--corpus psgs.jsonl\n"
               "  foresight eval R --ckpt C --tasks-file gsm8k_test.jsonl --env math --tasks 500",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_args(ev)

    pipe = sub.add_parser(
        "pipeline", help="run WM-AMT -> FE-SFT -> FC-RL and evaluate each stage",
        description="Run the three stages from a recipe directory (wm_amt.yaml, fe_sft.yaml, "
                    "fc_rl.yaml), each starting from the previous stage's checkpoint, evaluate "
                    "each by playing the validation tasks, and print a table of task success, "
                    "format validity, value Brier / ECE / AUROC and rollout fidelity per stage, "
                    "also written as report.json in the run directory. Re-running with the same "
                    "--run-dir continues where it stopped.",
        epilog="Examples:\n"
               "  foresight pipeline recipes/tiny-cpu\n"
               "  foresight pipeline recipes/tiny-cpu --run-dir runs/demo --tasks 64",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_stages_args(pipe, "", "runs/pipeline", "one subdirectory per stage, eval_<stage>.json "
                     "and report.json", 32, "stage")

    exp = sub.add_parser(
        "experiment", help="the ablation: rows of stage chains over seeds, mean and 95%% CI",
        description="Train and evaluate the rows of the paper's ablation over several seeds "
                    "from a recipe directory (wm_amt.yaml, fe_sft.yaml, fc_rl.yaml): sft "
                    "(format-free SFT on the same trajectories), fe_sft, wm_amt+sft, "
                    "wm_amt+fe_sft, wm_amt+fe_sft+rl (plain rewards: task and format) and "
                    "wm_amt+fe_sft+fc_rl. Rows share runs by prefix (one WM-AMT per seed, the "
                    "FE-SFT after it reused by both RL rows); every row's final model plays the "
                    "same validation tasks. Writes experiment.json, experiment.md (mean and 95% "
                    "t interval per row and metric, each task set's success too; the paper's "
                    "orderings tested on paired per-seed differences), experiment.png and "
                    "runs.jsonl (each training and evaluation performed). Re-running with "
                    "the same --run-dir continues; a run directory trained from another recipe "
                    "is refused (recipes.json keeps each step's).",
        epilog="Examples:\n"
               "  foresight experiment recipes/tiny-cpu --run-dir runs/experiment --seeds 3\n"
               "  foresight experiment recipes/tiny-cpu --rows fe_sft,wm_amt+fe_sft --seeds 5 "
               "--tasks 128",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_stages_args(exp, ", FE-SFT's also to format-free SFT, FC-RL's to plain RL; "
                     "sft:key=value or rl:key=value to that step alone",
                     "runs/experiment", "seed<S>/<chain>/ per run, seed<S>/eval_<row>.json per "
                     "evaluation, and the table", 96, "row")
    exp.add_argument("--seeds", type=int, default=3,
                     help="number of seeds: the recipe's seed and the ones after it (default 3)")
    exp.add_argument("--rows", default=None,
                     help="comma-separated rows to run (default all six), e.g. "
                          "fe_sft,wm_amt+fe_sft")

    report = sub.add_parser(
        "report", help="figures and a static HTML page of one or several runs",
        description="Draw the reliability diagram of the <value> estimates (bin counts, ECE "
                    "and Brier), the value distribution by outcome with its ROC and AUROC, "
                    "rollout fidelity per environment and the learning curves of every stage "
                    "(several runs on the same axes), and write them as PNGs with index.html "
                    "(the metrics table and sampled episodes; static, no server) and metrics.md "
                    "into --out. A RUN is a pipeline run directory, a training run directory or "
                    "a `foresight eval --out` JSON file.",
        epilog="Examples:\n"
               "  foresight report runs/demo --out runs/demo/report\n"
               "  foresight report runs/fe_sft_from_wm runs/fe_sft_scratch --out runs/ablation",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_argument("runs", nargs="+", metavar="RUN",
                        help="pipeline run directory, training run directory or eval JSON")
    report.add_argument("--out", required=True, help="directory for the figures and index.html")

    config = sub.add_parser(
        "config", help="validate a recipe and print it resolved (a dry run), or list all keys",
        description="Validate a recipe with its overrides, as `train` would before starting any "
                    "process, and print every key with its resolved value. Nothing is run.")
    _add_recipe_args(config, required=False)
    config.add_argument("--world-size", type=int, default=None,
                        help="also check the layout against this many processes "
                             "(default: the launcher's WORLD_SIZE, else 1)")
    config.add_argument("--keys", action="store_true",
                        help="list every recipe key with its type, default and meaning")
    config.add_argument("--stage", default=None, help="with --keys: include this stage's section")

    plan = sub.add_parser(
        "plan", help="check a recipe's layout against a cluster and estimate per-GPU memory",
        description="Check the recipe's parallel layout against NODES x GPUS_PER_NODE processes "
                    "and the model's shape, then print per-GPU memory (weights, gradients, "
                    "optimizer state with and without the distributed optimizer, activations "
                    "with the chosen recomputation, and for fc_rl the reference model and the "
                    "rollout KV cache) and the FLOPs of one step. Exits with status 2 and says "
                    "which divisibility or memory limit fails. Starts no process and needs no "
                    "GPU: run it on a login node. The formulas are in "
                    "megatron_foresight/planner.py.",
        epilog="Examples:\n"
               "  foresight plan recipes/70b/wm_amt.yaml --nodes 8 --gpus-per-node 8\n"
               "  foresight plan recipes/8b/fc_rl.yaml --nodes 2 --gpus-per-node 8 "
               "schedule.micro_batch_size=2\n"
               "  foresight plan recipes/tiny-cpu/lm.yaml --gpus-per-node 2 "
               "parallel.tensor_model_parallel_size=2",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_recipe_args(plan)
    plan.add_argument("--nodes", type=int,
                      help="nodes (default: $SLURM_JOB_NUM_NODES inside a job, else the "
                           "recipe's launch.nodes)")
    plan.add_argument("--gpus-per-node", type=int,
                      help="processes per node, one per GPU (default: $SLURM_NTASKS_PER_NODE "
                           "inside a job, else the recipe's launch.gpus_per_node)")
    plan.add_argument("--gpu-memory-gib", type=float,
                      help="memory of one GPU (default: the recipe's launch.gpu_memory_gib, "
                           "80 for an H100 80GB)")
    plan.add_argument("--overhead-gib", type=float,
                      help="allowance for the CUDA context, NCCL buffers and fragmentation "
                           "(default: the recipe's launch.overhead_gib, 5)")
    plan.add_argument("--vocab-size", type=int,
                      help="tokenizer vocabulary, when model.vocab_size is null and the "
                           "tokenizer is not on this machine")
    plan.add_argument("--mfu", type=float, default=0.4,
                      help="model FLOPs utilization assumed for the step-time estimate "
                           "(default 0.4)")
    plan.add_argument("--peak-tflops", type=float, default=989.0,
                      help="peak dense TFLOP/s of one GPU (default 989, H100 SXM BF16)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--skip-data-check", action="store_true",
                      help="do not check that the task files and corpora the stage plays exist "
                           "(planning on a machine without the data)")

    convert = sub.add_parser(
        "convert", help="convert checkpoints to and from Hugging Face",
        description="Convert between Hugging Face model directories and Megatron distributed "
                    "checkpoints (Llama and Qwen2 families). Also available as "
                    "tools/convert_from_hf.py and tools/convert_to_hf.py.")
    direction = convert.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    add_convert_from_hf_args(direction.add_parser(
        "from-hf", help="Hugging Face directory -> Megatron checkpoint at a TP/PP size",
        description=FROM_HF_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter))
    add_convert_to_hf_args(direction.add_parser(
        "to-hf", help="Megatron checkpoint (any TP/PP size) -> Hugging Face directory",
        description=TO_HF_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter))
    add_data_parser(sub)
    return parser


FROM_HF_DESCRIPTION = """\
Convert a Hugging Face model directory (config.json and safetensors, sharded or not; Llama or
Qwen2) into a Megatron distributed checkpoint laid out for --tp x --pp processes. Runs that many
processes itself (or runs under torchrun/srun with exactly that many). Writes
OUT/checkpoints/step_0000000 and OUT/model.yaml, the recipe sections that match it: use it as a
recipe's `base:` and training starts from the converted weights (checkpoint.init_from).

example:
  foresight convert from-hf --hf-dir ~/models/SmolLM2-135M --out ckpt/smollm2 --tp 3"""

TO_HF_DESCRIPTION = """\
Convert a Megatron distributed checkpoint, saved at any TP/PP size, into a Hugging Face
directory (config.json, generation_config.json, safetensors shards with their index, and the
recipe's tokenizer) that transformers.AutoModelForCausalLM.from_pretrained loads without custom
code. Streams one layer at a time: memory stays near one shard.

example:
  foresight convert to-hf --ckpt runs/lm-20261125-101500 --out hf/lm"""


def add_eval_args(p: argparse.ArgumentParser) -> None:
    add_play_args(p)
    p.add_argument("--ckpt", help="run directory or checkpoint to evaluate (default: the "
                                  "recipe's checkpoint.init_from, else its initial weights)")
    p.add_argument("--tasks", type=int, default=64,
                   help="tasks to play, taken from the task sets in turn; 0 reports the stage's "
                        "validation metrics only (default 64)")
    p.add_argument("--out", help="write the metrics as JSON here (episodes beside it)")


def add_play_args(p: argparse.ArgumentParser, split: str = "validation",
                  temperature: float = 0.0) -> None:
    """The flags every command that plays a policy on tasks shares (`eval`, `data collect`):
    the recipe, which tasks, and how the turns are generated. The policy (--ckpt) and how
    many tasks are each command's own."""
    _add_recipe_args(p)
    p.add_argument("--split", default=split,
                   help=f"which split of the task sets to play (default {split})")
    p.add_argument("--set", action="append", default=[], dest="task_sets", metavar="NAME",
                   help="play only this task set of the recipe (repeatable; default: all)")
    p.add_argument("--tasks-file", metavar="F",
                   help="play this task file (JSONL or .jsonl.gz, NQ / HotpotQA / Search-R1 / "
                        "GSM8K / MATH layouts) instead of the recipe's task sets; needs --env")
    p.add_argument("--env", help="with --tasks-file: the environment that plays it (search, "
                                 "math, or one the recipe's extensions register)")
    p.add_argument("--corpus", metavar="C",
                   help="with --tasks-file --env search: the passage corpus (JSONL, .jsonl.gz or "
                        "a directory of shards; indexed into the data cache on first use)")
    p.add_argument("--max-new-tokens", type=int, default=320,
                   help="token budget of one agent turn (default 320)")
    p.add_argument("--batch-size", type=int, default=16, help="episodes generated together")
    p.add_argument("--rollout", choices=["continuous", "rounds"], default="continuous",
                   help="how episodes share the decode batch: continuous (a KV-cache slot per "
                        "episode, refilled as episodes end) or rounds (one turn of every "
                        "episode per batch). eval plays the same episodes either way; data "
                        "collect by rounds plays one task at a time, its batches drawing from "
                        "one random stream, as collections made before this flag were played "
                        "(default continuous)")
    p.add_argument("--temperature", type=float, default=temperature,
                   help=f"sampling temperature, 0 is greedy (default {temperature:g}); the "
                        "seed is the recipe's")


def add_convert_from_hf_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf-dir", required=True, help="Hugging Face model directory")
    p.add_argument("--out", required=True, help="output directory for the checkpoint")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    p.add_argument("--tokenizer", help="Hugging Face tokenizer directory, when --hf-dir has none")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="model.precision of the recipe and checkpoint (default: config.json's "
                        "dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in OUT")


def add_convert_to_hf_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True,
                   help="a run directory, its checkpoints/ directory, or one step_N directory")
    p.add_argument("--out", required=True, help="output Hugging Face directory")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the saved weights (default: the checkpoint's)")
    p.add_argument("--max-shard-size", default="2GB",
                   help="largest safetensors file, e.g. 500MB, 5GB (default 2GB)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def check_inputs(cfg) -> None:
    """What can be checked of a recipe before any process starts beyond what loading it checks:
    for a stage that plays tasks, that its task files and corpora exist and their first records
    read."""
    from megatron_foresight.training.plugin import load_plugin

    if load_plugin(cfg.stage).on_policy:
        from megatron_foresight.tasksets import TaskSets

        TaskSets.of(cfg).check_files()


def _add_stages_args(p, addressed: str, run_dir: str, run_dir_holds: str, tasks: int,
                     evaluated: str) -> None:
    """The arguments `pipeline` and `experiment` share: the recipe directory, overrides, the
    run directory and the number of validation tasks each evaluation plays."""
    p.add_argument("recipe_dir", help="directory with wm_amt.yaml, fe_sft.yaml, fc_rl.yaml")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="overrides applied to every stage's recipe (a stage's section only to "
                        f"that stage; STAGE:key=value only to STAGE's recipe{addressed}), e.g. "
                        "data.world=DIR fe_sft:schedule.train_steps=150")
    p.add_argument("--run-dir", default=run_dir, help=f"{run_dir_holds} (default {run_dir})")
    p.add_argument("--tasks", type=int, default=tasks,
                   help=f"validation tasks each {evaluated}'s evaluation plays (default {tasks})")


def _cmd_train(args) -> int:
    from megatron_foresight.config import load_recipe
    from megatron_foresight.training.loop import train

    cfg = load_recipe(args.recipe, args.overrides)
    check_inputs(cfg)
    train(cfg, run_dir=args.run_dir, resume=args.resume, verbose=args.verbose,
          stop_at_step=args.stop_at_step)
    return 0


def _cmd_eval(args) -> int:
    from megatron_foresight.config import load_recipe
    from megatron_foresight.eval.agent_eval import format_table
    from megatron_foresight.eval.run import (
        EvalOptions, evaluate_checkpoint, policy_path, task_sets_for,
    )

    cfg = load_recipe(args.recipe, args.overrides)
    ckpt = policy_path(cfg, args.ckpt)
    opts = EvalOptions(ckpt=ckpt, tasks=args.tasks, split=args.split,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                       temperature=args.temperature, task_sets=args.task_sets,
                       tasks_file=args.tasks_file, env=args.env, corpus=args.corpus,
                       rollout=args.rollout)
    task_sets = task_sets_for(cfg, opts) if opts.tasks else None
    if args.out and _launch_rank() == 0:
        run_lock.hold_run_of(Path(args.out).parent, "foresight eval")
    metrics = evaluate_checkpoint(cfg, opts, args.out, task_sets)
    if _launch_rank() == 0:
        print(f"{ckpt or 'initial weights'}, split {opts.split}")
        print(format_table(*by_column(metrics, [s.name for s in task_sets.sets]
                                      if task_sets else [])))
        if args.out:
            print(args.out)
    return 0


def by_column(metrics: dict, set_names: list[str]) -> tuple[dict, list]:
    """Metrics as a table: a column for all tasks (and the stage's metrics), one per task set
    (its `<set>/<metric>` keys)."""
    columns: dict[str, dict] = {"all": {}}
    for key, value in metrics.items():
        name, _, metric = key.partition("/")
        column = name if name in set_names else "all"
        columns.setdefault(column, {})[metric if column != "all" else key] = value
    rows = list(dict.fromkeys(m for c in columns.values() for m in c))
    return columns, rows


def _cmd_experiment(args) -> int:
    from megatron_foresight.config import load_recipe
    from megatron_foresight.errors import UsageError
    from megatron_foresight.experiment import Experiment, parse_rows, split_step_only
    from megatron_foresight.pipeline import Stopped, for_stage, stage_recipes

    if args.seeds < 1:
        raise UsageError("--seeds: at least 1")
    rows = parse_rows(args.rows)  # a typo fails before any recipe loads
    first = load_recipe(dict(stage_recipes(Path(args.recipe_dir)))["wm_amt"],
                        for_stage(split_step_only(args.overrides)[0], "wm_amt"))
    try:
        Experiment(args.recipe_dir, args.run_dir, [first.seed + i for i in range(args.seeds)],
                   rows, args.tasks, args.overrides).run()
    except Stopped as stop:
        print(f"foresight experiment: {stop}", file=sys.stderr)
    return 0


def _cmd_pipeline(args) -> int:
    from megatron_foresight.pipeline import Stopped, run_pipeline

    try:
        run_pipeline(args.recipe_dir, args.run_dir, tasks=args.tasks, overrides=args.overrides)
    except Stopped as stop:
        print(f"foresight pipeline: {stop}", file=sys.stderr)
    return 0


def _cmd_report(args) -> int:
    from megatron_foresight.eval.report import write_report

    print(write_report(args.runs, args.out).index)
    return 0


def _cmd_config(args) -> int:
    from megatron_foresight.config import describe_recipe, load_recipe
    from megatron_foresight.training.plugin import available_stages, load_plugin

    if args.keys:
        from megatron_foresight.envs.registry import describe_options

        stages = [args.stage] if args.stage else available_stages()
        print(describe_recipe({s: load_plugin(s).Config for s in stages}))
        print(describe_options())
        return 0
    if not args.recipe:
        raise SystemExit("error: give a RECIPE to validate, or --keys")
    cfg = load_recipe(args.recipe, args.overrides)
    check_inputs(cfg)
    world = args.world_size or int(os.environ.get("WORLD_SIZE", 1))
    cfg.check_world_size(world)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    print(f"# valid for {world} process(es)", file=sys.stderr)
    return 0


def _cmd_plan(args) -> int:
    from megatron_foresight.config import load_recipe
    from megatron_foresight.planner import format_plan, plan, plan_json

    import warnings

    with warnings.catch_warnings():  # loading a stage plugin imports Megatron, which warns
        warnings.simplefilter("ignore")  # about TE / Apex: noise on a login node
        cfg = load_recipe(args.recipe, args.overrides)
    if not args.skip_data_check:
        check_inputs(cfg)
    launch, env = cfg.launch, os.environ
    nodes = args.nodes or int(env.get("SLURM_JOB_NUM_NODES", 0)) or launch.nodes
    per_node = (args.gpus_per_node or int(env.get("SLURM_NTASKS_PER_NODE", "0").split("(")[0])
                or launch.gpus_per_node)
    result = plan(cfg, nodes, per_node,
                  gpu_memory_gib=args.gpu_memory_gib or launch.gpu_memory_gib,
                  overhead_gib=launch.overhead_gib if args.overhead_gib is None
                  else args.overhead_gib, vocab_size=args.vocab_size)
    print(plan_json(result) if args.json else
          format_plan(result, peak_tflops=args.peak_tflops, mfu=args.mfu))
    return 0


def parse_size(text: str) -> int:
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit) and upper[:-len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(upper[:-len(unit)]) * factor)
    if upper.isdigit():
        return int(upper)
    raise UsageError(f"--max-shard-size {text}: give a size such as 500MB or 5GB")


def _launch_rank() -> int:
    """This process's rank as torchrun or srun set it, read without importing torch."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


def _cmd_convert(args) -> int:
    from megatron_foresight.runtime.log import setup_logging

    rank = _launch_rank()
    setup_logging(rank)
    if rank == 0:  # converting from a run, or into one: nobody trains there meanwhile
        run_lock.hold_run_of(args.ckpt if args.direction == "to-hf" else args.out,
                             f"foresight convert {args.direction}",
                             reading=args.direction == "to-hf")
    if args.direction == "from-hf":
        from megatron_foresight.convert.from_hf import convert_from_hf

        out = convert_from_hf(args.hf_dir, args.out, tp=args.tp, pp=args.pp,
                              tokenizer=args.tokenizer, precision=args.precision,
                              overwrite=args.overwrite)
    else:
        from megatron_foresight.convert.to_hf import convert_to_hf

        out = convert_to_hf(args.ckpt, args.out, dtype=args.dtype,
                            max_shard_size=parse_size(args.max_shard_size),
                            overwrite=args.overwrite)
    if rank == 0:
        print(out)
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    """Recipe overrides may follow the options too (`train R --resume a.b=1`), which a
    `nargs="*"` positional alone does not allow once an option has interrupted it."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    return args


def explain(error: BaseException) -> str | None:
    """The one line for an error that is the user's (or the machine's) to fix; None for a bug,
    which keeps its traceback."""
    if isinstance(error, (ConfigError, UsageError, DataFileError)):
        return str(error)
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        where = f" writing {error.filename}" if error.filename else ""
        return f"no space left on device{where}: free space, then run the command again"
    if isinstance(error, OSError) and error.filename:
        return f"{error.strerror or error}: {error.filename}"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    debug = args.debug or os.environ.get("FORESIGHT_DEBUG", "") not in ("", "0")
    try:
        return {"train": _cmd_train, "eval": _cmd_eval, "config": _cmd_config,
                "pipeline": _cmd_pipeline, "experiment": _cmd_experiment, "plan": _cmd_plan,
                "report": _cmd_report, "convert": _cmd_convert,
                "data": run_data}[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        line = explain(e)
        if line is None:
            raise
        if debug:
            traceback.print_exc()
        if _launch_rank() == 0 or debug:
            print(f"error: {line}", file=sys.stderr)
        return 2
    finally:
        run_lock.release_all()


if __name__ == "__main__":
    sys.exit(main())
