"""The `foresight data` subcommands: validate, build-world, import, preprocess, index."""

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
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes (default 1)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="records per task sent to a worker (default 256)")


def tokenizer_config(spec: str):
    from megatron_foresight.data.tokenizer import TokenizerConfig

    if spec == "byte":
        return TokenizerConfig("byte")
    path = Path(spec)
    if path.is_dir():
        return TokenizerConfig("hf", spec)
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
            sizes = WorldSizes(noise=noise, **{n: getattr(args, n) for n in SIZE_HELP})
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
    return run_preprocess(args)


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
                      tokenizer_config(args.tokenizer), workers=args.workers,
                      batch_size=args.batch_size)
    print(f"{meta['documents']} documents, {meta['tokens']} tokens -> {args.output_prefix}")
    return 0
