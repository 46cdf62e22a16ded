"""The `foresight data` subcommands: validate, build-world, import, preprocess, index,
collect."""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_foresight.errors import UsageError

PREPROCESS_DESCRIPTION = """\
Tokenize trajectories (JSONL, webdataset .tar shards, or a directory of shards) rendered by a
named renderer, or plain-text documents (--renderer text: .jsonl with a "text" field, or .txt
one document per line), into a Megatron-Core indexed dataset PREFIX.bin/.idx plus the
segment-type stream PREFIX_segments.bin/.idx and PREFIX.json. Streams the input; several worker
processes tokenize; a bad record stops the run naming its file, line and field.

examples:
  foresight data preprocess --input world/trajectories/train.jsonl \\
      --output-prefix data/traj --tokenizer world/tokenizer/spm.model --workers 2
  foresight data preprocess --input notes.jsonl --renderer text --output-prefix data/text"""

BUILD_WORLD_DESCRIPTION = """\
Generate the built-in world from a seed (no downloads): a fictional knowledge base rendered as
a corpus, 1-hop and 2-hop questions for the search environment, multi-step word problems for
the math environment (train / validation / test, disjoint), trajectories of scripted experts
with tunable noise and Monte-Carlo success estimates of every intermediate state, and a
sentencepiece tokenizer of the world's text. The same seed and sizes give byte-identical files.

example:
  foresight data build-world --out data/world --seed 1 --trajectories 2000"""

INDEX_DESCRIPTION = """\
Index a passage corpus for the search environment once: BM25 (bm25s's scoring: English stems and
stop words), written as a bm25s index directory with the passages beside it, memory-mapped by
every process that searches it. The corpus is JSONL ({id, title, text}, BEIR's {_id, title,
text} or Search-R1's {id, contents}), .jsonl.gz, or a directory of such shards; it is streamed,
so memory stays flat in its size. OUT records the corpus's files and the sha256 of its records:
a search task set with options {index: OUT, corpus: CORPUS} checks that it still matches.
Without this command the index is built on first use into the data cache.

examples:
  foresight data index data/wiki/psgs_w100.jsonl.gz --out data/wiki/index
  foresight data index data/wiki/shards/ --out data/wiki/index --skip-bad"""

COLLECT_DESCRIPTION = """\
Play a policy (any checkpoint: a training run, or `foresight convert from-hf`'s output) on the
recipe's task sets (or a one-off --tasks-file) and write its episodes as trajectories
(foresight.trajectory/1): --samples episodes per task at --temperature, and with --mc M the
Monte-Carlo success estimate of every state before an agent turn (M continuations of the same
policy from that state; the state before the first turn pools M fresh episodes with the task's
other samples). The policy sees the environment's bare task prompt and a turn ends at an
action's closing tag; FE-SFT's hindsight adds the foresight blocks (--foresight asks the policy
for them instead). WM-AMT and FE-SFT train on the output: name OUT (or one of its files) in
their `sources`.

OUT holds collect-RRRRR-of-DDDDD.jsonl per data-parallel rank (under torchrun or srun each
rank plays every D-th task, on the recipe's TP/PP layout) and collect.json (recipe,
checkpoint, options, counts, episodes/s and tokens/s). Each record's id and random seed follow
from the recipe's seed and its task, so the same command gives the same records (with
--rollout continuous, where tasks share the batch, exactly on the same layout, and up to the
float rounding of other batch shapes over another number of ranks), and run again after a
stop it plays only the tasks not yet written. --drop-failed leaves out unsuccessful
episodes (counted); by default they are kept, as WM-AMT learns from failures too.

examples:
  foresight data collect recipes/tiny-cpu/fe_sft.yaml --ckpt runs/fe_sft --out data/collect \\
      --samples 4 --mc 4 --tasks 200
  torchrun --nproc_per_node 8 -m megatron_foresight data collect recipes/8b/wm_amt.yaml \\
      --ckpt ckpt/llama8b --tasks-file nq_train.jsonl --env search --corpus psgs.jsonl \\
      --out data/nq_collect --samples 8 --mc 8
  foresight train recipes/tiny-cpu/wm_amt.yaml 'wm_amt.sources=[data/collect]'"""


SIZE_HELP = {
    "cities": "cities in the knowledge base",
    "people": "people in the knowledge base",
    "guilds": "guilds in the knowledge base",
    "search_tasks": "questions for the search environment, all splits",
    "math_tasks": "word problems for the math environment, all splits",
    "trajectories": "scripted-agent trajectories on training tasks (half search, half math)",
    "validation_trajectories": "trajectories on validation tasks",
    "mc_samples": "continuations per intermediate state for its Monte-Carlo success "
                  "estimate; 0 for none",
    "math_max_steps": "word problems of at most this many calculator steps (2 or 3)",
    "top_k": "passages the search environment returns",
    "vocab_size": "sentencepiece vocabulary of the world's tokenizer; 0 trains none",
}


def add_data_parser(sub) -> None:
    data = sub.add_parser("data", help="trajectories, tasks, the built-in world, preprocessing",
                          description="Data commands. Run `foresight data COMMAND --help`.")
    cmd = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)

    validate = cmd.add_parser(
        "validate", help="check trajectory / task / corpus files and report every problem",
        description="Read each file to the end and report every problem (file:line: field: "
                    "what is wrong), with counts by field. Exits 1 if any file has a problem.")
    validate.add_argument("files", nargs="+", metavar="FILE",
                          help=".jsonl file, .tar shard or directory of shards")
    validate.add_argument("--kind", choices=["trajectories", "tasks", "corpus"],
                          help="what the files hold (default: detected from the first record)")

    from megatron_foresight.world.sizes import WorldSizes

    world = cmd.add_parser("build-world", help="generate the built-in world",
                           description=BUILD_WORLD_DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    world.add_argument("--out", required=True, help="output directory")
    world.add_argument("--seed", type=int, default=1234, help="world seed (default 1234)")
    defaults = WorldSizes()
    for name, meaning in SIZE_HELP.items():
        world.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name),
                           help=f"{meaning} (default {getattr(defaults, name)})")
    world.add_argument("--multi-hop-fraction", type=float, default=defaults.multi_hop_fraction,
                       help="share of search questions that take two hops, the others one "
                            f"(default {defaults.multi_hop_fraction})")
    world.add_argument("--noise", default=",".join(map(str, defaults.noise)),
                       help="the scripted experts' error rates, comma-separated, used in turn "
                            f"(default {','.join(map(str, defaults.noise))})")
    world.add_argument("--workers", type=int, default=1,
                       help="processes playing trajectories (default 1; output is the same)")

    imp = cmd.add_parser("import", help="write task JSONL from a task generator",
                         description="Write math tasks from reasoning-gym's procedural "
                                     "generators (no download), for the math environment.")
    imp.add_argument("source", choices=["reasoning-gym"])
    imp.add_argument("name", help="generator name, e.g. gsm_symbolic, basic_arithmetic")
    imp.add_argument("--n", type=int, required=True, help="number of tasks")
    imp.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    imp.add_argument("--out", required=True, help="output .jsonl")

    pre = cmd.add_parser("preprocess", help="trajectories or text -> indexed dataset",
                         description=PREPROCESS_DESCRIPTION,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    add_preprocess_args(pre)

    index = cmd.add_parser("index", help="index a passage corpus for search (BM25)",
                           description=INDEX_DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    index.add_argument("corpus", nargs="+", metavar="CORPUS",
                       help="corpus file(s) or shard directories, read in order")
    index.add_argument("--out", required=True, help="index directory (replaced if it holds an "
                                                    "index; refused if it holds anything else)")
    index.add_argument("--skip-bad", action="store_true",
                       help="leave out passages that do not read, counted and logged (default: "
                            "stop at the first, naming its file, line and field)")
    index.add_argument("--force", action="store_true",
                       help="build again even when OUT already indexes exactly this corpus")

    add_collect_args(cmd.add_parser(
        "collect", help="play a policy on tasks and write trajectories with MC estimates",
        description=COLLECT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter))


def add_collect_args(p: argparse.ArgumentParser) -> None:
    from megatron_foresight.cli import add_play_args

    add_play_args(p, split="train", temperature=1.0)
    p.add_argument("--ckpt", help="run directory or checkpoint of the policy (default: the "
                                  "recipe's checkpoint.init_from)")
    p.add_argument("--out", required=True, help="output directory (run again to resume)")
    p.add_argument("--tasks", type=int, help="tasks to play, taken from the task sets in turn "
                                             "(default: every task of the split)")
    p.add_argument("--samples", type=int, default=4, help="episodes per task (default 4)")
    p.add_argument("--mc", type=int, default=4,
                   help="continuations per state for its Monte-Carlo success estimate; 0 for "
                        "none (default 4)")
    p.add_argument("--drop-failed", action="store_true",
                   help="leave out unsuccessful episodes (default: keep them)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: draw from the smallest set of tokens with this much "
                        "probability (default 1: all)")
    p.add_argument("--foresight", action="store_true",
                   help="ask the policy for foresight in the recipe's format and keep what it "
                        "writes (default: the bare task prompt; FE-SFT's hindsight adds "
                        "foresight built from the real observations and the MC estimates)")


def add_preprocess_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="input files or shard directories, read in order")
    p.add_argument("--output-prefix", required=True, help="output path prefix")
    p.add_argument("--renderer", default="transcript",
                   help="how a trajectory becomes text: transcript, the stage renderers "
                        "(wm_amt, fe_sft), or text for plain documents (default transcript)")
    p.add_argument("--tokenizer", default="byte",
                   help="byte, a sentencepiece .model file, or a Hugging Face tokenizer "
                        "directory (default byte)")
    p.add_argument("--chat-template", action="store_true",
                   help="with a Hugging Face tokenizer directory: open each trajectory with its "
                        "chat template, as data.tokenizer.chat_template: true plays (the "
                        "recipe's setting must match)")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes (default 1)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="records per task sent to a worker (default 256)")


def tokenizer_config(spec: str, chat_template: bool = False):
    from megatron_foresight.data.tokenizer import TokenizerConfig

    path = Path(spec)
    if chat_template and not path.is_dir():
        raise UsageError(f"--chat-template needs a Hugging Face tokenizer directory as "
                         f"--tokenizer (one with a chat template), not {spec}")
    if spec == "byte":
        return TokenizerConfig("byte")
    if path.is_dir():
        return TokenizerConfig("hf", spec, chat_template=chat_template)
    if path.is_file():
        return TokenizerConfig("sentencepiece", spec)
    raise UsageError(f"--tokenizer {spec}: not 'byte', a .model file or a tokenizer directory")


def run_data(args) -> int:
    if args.data_command == "validate":
        from megatron_foresight.data.validate import main as validate

        return validate(args.files, args.kind)
    if args.data_command == "build-world":
        from megatron_foresight.world.build import build_world
        from megatron_foresight.world.sizes import WorldSizes

        try:
            noise = tuple(float(x) for x in args.noise.split(","))
        except ValueError:
            raise UsageError(f"--noise {args.noise}: give comma-separated numbers in [0, 1]")
        try:
            sizes = WorldSizes(noise=noise, multi_hop_fraction=args.multi_hop_fraction,
                               **{n: getattr(args, n) for n in SIZE_HELP})
            sizes.check()
        except ValueError as e:
            raise UsageError(f"build-world: {e}") from None
        manifest = build_world(args.out, args.seed, sizes, workers=args.workers)
        for split, stats in manifest["success"].items():
            for key, s in stats.items():
                print(f"{split:10s} {key:22s} {s['trajectories']:6d} trajectories, "
                      f"success {s['success_rate']:.3f}")
        print(args.out)
        return 0
    if args.data_command == "import":
        from megatron_foresight.data.reasoning_gym_import import import_reasoning_gym

        n = import_reasoning_gym(args.name, args.n, args.seed, args.out)
        print(f"{n} tasks -> {args.out}")
        return 0
    if args.data_command == "index":
        return run_index(args)
    if args.data_command == "collect":
        return run_collect(args)
    return run_preprocess(args)


def run_collect(args) -> int:
    from megatron_foresight.config import load_recipe
    from megatron_foresight.collect import CollectOptions, check_resumable, collect
    from megatron_foresight.eval.run import find_weights, policy_path, task_sets_for
    from megatron_foresight.runtime import run_lock
    from megatron_foresight.runtime.dist import read_launch_env

    cfg = load_recipe(args.recipe, args.overrides)
    opts = CollectOptions(
        ckpt=args.ckpt, out=args.out, tasks=args.tasks, split=args.split,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        temperature=args.temperature, task_sets=args.task_sets, tasks_file=args.tasks_file,
        env=args.env, corpus=args.corpus, samples=args.samples, mc=args.mc,
        drop_failed=args.drop_failed, foresight=args.foresight, top_p=args.top_p,
        rollout=args.rollout)
    checkpoint = find_weights(policy_path(cfg, opts.ckpt, required=True))
    task_sets = task_sets_for(cfg, opts)
    # refused before any process starts; the tokenizer is checked once they have built it
    check_resumable(Path(opts.out), opts.identity(cfg, checkpoint, task_sets))
    rank = read_launch_env().rank
    if rank == 0:  # two collections appending to one directory would interleave
        run_lock.acquire(opts.out, "foresight data collect", flag="--out")
    totals = collect(cfg, opts, task_sets, checkpoint, args.recipe)
    if rank == 0:
        counts, speed = totals["counts"], totals["throughput"]
        print(f"{counts['written']} trajectories ({counts['dropped']} dropped) of "
              f"{counts['tasks']} tasks, {counts['continuations']} continuations: "
              f"{speed['episodes_per_s']} episodes/s, {speed['tokens_per_s']} tokens/s")
        print(args.out)
    return 0


def run_index(args) -> int:
    from megatron_foresight.envs.bm25_index import build_index, corpus_files, matches
    from megatron_foresight.runtime.log import setup_logging

    setup_logging(0)
    files = corpus_files(args.corpus)
    if not args.force and matches(Path(args.out), files):
        print(f"{args.out} already indexes this corpus (pass --force to build it again)")
        return 0
    manifest = build_index(files, args.out, skip_bad=args.skip_bad)
    skipped = f", {manifest['skipped']} skipped" if manifest["skipped"] else ""
    print(f"{manifest['passages']} passages{skipped} in {manifest['build_seconds']} s "
          f"-> {args.out}")
    return 0


def run_preprocess(args) -> int:
    from megatron_foresight.data.preprocess import preprocess

    meta = preprocess(args.input, args.output_prefix, args.renderer,
                      tokenizer_config(args.tokenizer, args.chat_template),
                      workers=args.workers,
                      batch_size=args.batch_size)
    print(f"{meta['documents']} documents, {meta['tokens']} tokens -> {args.output_prefix}")
    return 0
