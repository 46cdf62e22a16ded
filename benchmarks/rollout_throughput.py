"""Rollout throughput: the rollout engine's generated tokens/s (our KV-cache decoder over the
Megatron `GPTModel`, `inference.generate.Generator`) against Hugging Face `generate()` on a
`LlamaForCausalLM` of the same shape, same batch, same prompt length, same number of new
tokens (no early stop), in one run; then the split of an FC-RL step's time between
generation, log-prob recomputation and training (the real `on_policy_step` of `foresight train`).

    python benchmarks/rollout_throughput.py [--batch 16] [--prompt 256] [--new 128] \
        [--group 8] [--repeats 3] [--rl-steps 2] [--recipe recipes/tiny-cpu/fc_rl.yaml]

Two tables. Single-turn decode: --batch distinct prompts, greedy. GRPO groups: --batch rows
made of batch/group prompts repeated --group times, sampled at temperature 1 (a group's first
turn). The engine runs on Megatron's static inference context as `plain` (both speed-ups
off), `lean` (lean decode: no mask when nothing is padded, a two-matmul attention for one
query, decode outside the CPU compatibility mode) and `lean+shared` (and a group's prompt
prefilled once), so each gain is attributed, and as `slots` (`Generator`'s `slot_cache`: lean+shared on continuous batching's slot KV cache, the whole batch started
together: its own per-slot layout (keys stored transposed) and RoPE tables shared by the layers,
a row that ends leaving the forward) and `slots+fused` (the same with `fused_decode`: decode
steps as one function over the model's weights, `inference.fused`, the default of the slot
engine); HF is the baseline of both tables. Agent episodes
(with --policy, make demo's FC-RL run): GRPO groups of the built-in world's validation tasks
played to their end, by HF `generate()` driven turn by turn (`HFTurns`: the policy exported
with `convert_to_hf`, each turn's whole context generated again, rows stopping at the
action's closing tag), and by the engine in rounds (static plain, static lean+shared, slot
cache) and continuously (slots refilled as episodes end, the default of FC-RL and eval), with
Megatron's forward for the decode steps and with the fused decode step (the default).

Each side runs in its own process (the Megatron side installs the CPU compatibility layer), the
two alternate `--repeats` times, and medians and their ratio are printed: of the whole
`generate()` call, and of its decode steps alone (the call's time less that of a call for one
new token, the prefill, which is the same forward over the prompts on both sides). Weights are
random: throughput does not depend on them when every row generates exactly --new tokens.

On a GPU both sides run there (HF's model is moved to it; every timed call ends synchronized)
and the slot engine is also timed with its decode steps replayed as CUDA graphs
(`inference.graphs`: `slots+graphs` in the first two tables, `continuous+graphs` in the third).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_foresight.inference.generate import Completion, Generator  # noqa: E402


VARIANTS = ("plain", "lean", "lean+shared", "slots", "slots+fused")
EPISODE_VARIANTS = ("plain", "rounds", "rounds+slots", "continuous", "continuous+fused")
GRAPHS = ("slots+graphs", "continuous+graphs")
"""On a GPU, the slot engine with its decode steps replayed as CUDA graphs (`inference.graphs`)."""
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def _prompts(args, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (args.batch, args.prompt), generator=g).tolist()


def _group_prompts(args, vocab: int) -> list[list[int]]:
    distinct = _prompts(args, vocab)[:args.batch // args.group]
    return [p for p in distinct for _ in range(args.group)]


def _recipe(args, byte: bool = True):
    from megatron_foresight.config import load_recipe

    return load_recipe(args.recipe, ["data.tokenizer.type=byte"] if byte else [])


def run_megatron(args) -> dict:
    from megatron_foresight.data.tokenizer import ByteTokenizer
    from megatron_foresight.inference.generate import Generator, Sampling
    from megatron_foresight.models.provider import build_model
    from megatron_foresight.training import loop

    cfg = _recipe(args)
    loop.start_processes(cfg)
    tok = ByteTokenizer()
    tok.eod = -1  # every row generates exactly --new tokens, as HF's min_new_tokens makes it
    (model,) = build_model(cfg, cfg.padded_vocab_size(tok.vocab_size))
    lean = args.variant != "plain"
    shared = args.variant not in ("plain", "lean")
    gen = Generator(model.eval(), tok, max_sequence_length=args.prompt + args.new,
                    lean_decode=lean, shared_prefill=shared,
                    slot_cache=args.variant.startswith("slots"),
                    fused_decode=args.variant == "slots+fused",
                    cuda_graphs=args.variant == "slots+graphs")
    grouped = args.table == "group"
    prompts = (_group_prompts if grouped else _prompts)(args, tok.vocab_size)

    def call(new: int):
        sampling = Sampling(temperature=1.0 if grouped else 0.0, max_new_tokens=new, seed=1)
        out = gen.generate(prompts, sampling)
        assert all(len(c.ids) == new for c in out)

    return _timed(call, args)


def _timed(call, args) -> dict:
    """Seconds of the timed `call(args.new)`s after the warm-up ones, and of as many
    `call(1)`s: the prefill and the first token, the same work on both sides."""
    out = {}
    for key, new in (("seconds", args.new), ("prefill_seconds", 1)):
        out[key] = []
        for i in range(args.warmup + args.timed):
            started = time.perf_counter()
            call(new)
            if CUDA:  # HF's output stays on the GPU; the engine's tokens are read already
                torch.cuda.synchronize()
            if i >= args.warmup:
                out[key].append(time.perf_counter() - started)
    return out


def run_episodes_table(args) -> dict:
    """GRPO groups of real multi-turn episodes: the recipe's validation tasks (the built-in
    world's search and math), each played --group times, with the policy of --policy."""
    from megatron_foresight.eval.run import load_weights
    from megatron_foresight.inference.generate import Generator
    from megatron_foresight.models.provider import build_model
    from megatron_foresight.training import loop

    cfg = _recipe(args, byte=False)
    ctx = loop.start_processes(cfg)
    tok = loop.recipe_tokenizer(cfg)
    chunks = build_model(cfg, cfg.padded_vocab_size(tok.vocab_size), ctx.pg_collection,
                         initialize=False)
    load_weights(chunks, ctx, args.policy)
    lean, shared = args.variant != "plain", args.variant != "plain"
    gen = Generator(chunks[0].eval(), tok, max_sequence_length=cfg.data.seq_length,
                    pad_id=tok.eod, lean_decode=lean, shared_prefill=shared,
                    slot_cache=args.variant == "rounds+slots",
                    fused_decode=args.variant == "continuous+fused",
                    cuda_graphs=args.variant == "continuous+graphs")
    # all engine variants sample the same episodes (per-row streams)
    return _time_episodes(args, cfg, gen, continuous=args.variant.startswith("continuous"),
                          row_streams=True)


def _time_episodes(args, cfg, gen, **play) -> dict:
    """Play the recipe's first batch/group validation tasks --group times each, timed."""
    from megatron_foresight.inference.agent import run_episodes
    from megatron_foresight.inference.generate import Sampling
    from megatron_foresight.tasksets import TaskSets
    from megatron_foresight.training import loop

    task_sets = TaskSets.of(cfg)
    task_sets.prepare(loop.cache_dir(cfg), progress=False)
    tasks = task_sets.tasks("validation", args.batch // args.group)
    group = [t for t in tasks for _ in range(args.group)]
    times, tokens = [], 0
    for i in range(args.warmup + args.timed):
        started = time.perf_counter()
        records = run_episodes(gen, group, task_sets.make_env,
                               Sampling(temperature=1.0, max_new_tokens=args.turn_tokens,
                                        seed=1), batch_size=args.batch, progress=False,
                               fmt=cfg.format, **play)
        if i >= args.warmup:
            times.append(time.perf_counter() - started)
            tokens = sum(len(t.ids) for r in records for t in r.turns)
    return {"seconds": times, "tokens": tokens,
            "turns": sum(len(r.turns) for r in records) / len(records)}


class HFTurns:
    """Hugging Face `generate()` driven turn by turn, the way an agent loop without an engine
    plays episodes: each turn, every active episode's whole context (left-padded) goes to
    `generate()` again (no cache kept between turns), rows stop at an action's closing tag and
    the call waits for the slowest row. It answers `Generator.generate`'s call (ids in,
    `Completion`s out), so `play_episodes` drives it exactly as it drives the engine."""

    # the engine's own stop rules (they read only `self.tokenizer`): a turn ends where it would
    # end there
    stop_condition = Generator.stop_condition
    _ends_with_stop_text = Generator._ends_with_stop_text
    _ends = Generator._ends

    def __init__(self, model, tokenizer, max_sequence_length: int):
        self.model, self.tokenizer, self.max_len = model, tokenizer, max_sequence_length

    def generate(self, prompts, sampling, stop_texts=(), row_seeds=None):
        from transformers import StoppingCriteria, StoppingCriteriaList

        width = max(map(len, prompts))
        room = min(sampling.max_new_tokens, self.max_len - width)
        if room < 1:
            return [Completion(stop="context") for _ in prompts]
        stop_ids, stop_tail = self.stop_condition(stop_texts)

        def ended(c: Completion) -> bool:
            return self._ends(c, room, sampling, stop_ids, stop_tail)

        class AtTag(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.tensor([ended(Completion(ids=row[width:].tolist()))
                                     for row in input_ids], device=input_ids.device)

        pad = 0
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts],
                           device=self.model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                            device=self.model.device)
        torch.manual_seed(sampling.seed)
        with torch.no_grad():
            out = self.model.generate(
                ids, attention_mask=mask, do_sample=sampling.temperature > 0,
                temperature=sampling.temperature or None, top_p=1.0, top_k=0,
                max_new_tokens=room, stopping_criteria=StoppingCriteriaList([AtTag()]),
                use_cache=True, pad_token_id=pad, eos_token_id=None)
        completions = []
        for row in out[:, width:].tolist():
            c = Completion()
            for t in row:  # up to the token that ended the turn; the rest is padding
                c.ids.append(t)
                if ended(c):
                    break
            completions.append(c)
        return completions


def run_hf_episodes(args) -> dict:
    """The episodes table's baseline: the same policy exported to Hugging Face
    (`convert_to_hf`), the same tasks and turn limit, played by `HFTurns` in rounds."""
    from transformers import LlamaForCausalLM

    from megatron_foresight.convert.to_hf import convert_to_hf
    from megatron_foresight.training import loop

    cfg = _recipe(args, byte=False)
    with tempfile.TemporaryDirectory() as tmp:  # the policy as it is now, exported
        hf_dir = convert_to_hf(args.policy, Path(tmp) / "hf", dtype="float32")
        model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(DEVICE).eval()
    return _time_episodes(args, cfg, HFTurns(model, loop.recipe_tokenizer(cfg),
                                             cfg.data.seq_length))


def run_hf(args) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_foresight.data.tokenizer import ByteTokenizer

    cfg = _recipe(args)
    m, tok = cfg.model, ByteTokenizer()
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.padded_vocab_size(tok.vocab_size), hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.query_groups,
        max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.norm_epsilon,
        rope_theta=m.rotary_base, tie_word_embeddings=False)).to(DEVICE).eval()
    grouped = args.table == "group"
    ids = torch.tensor((_group_prompts if grouped else _prompts)(args, tok.vocab_size),
                       device=DEVICE)

    def call(new: int):
        torch.manual_seed(1)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=grouped,
                                 temperature=1.0, top_p=1.0, top_k=0,
                                 max_new_tokens=new, min_new_tokens=new,
                                 use_cache=True, pad_token_id=0, eos_token_id=None)
        assert out.shape[1] == args.prompt + new

    return _timed(call, args)


def run_rl(args) -> dict:
    """The split of real FC-RL steps (from the recipe's initial weights, its world)."""
    from megatron_foresight.config import load_recipe
    from megatron_foresight.training import loop

    cfg = load_recipe(args.recipe, ["checkpoint.save_interval=0", "schedule.eval_interval=0",
                                    "logging.tensorboard=false", "checkpoint.init_from=null"])
    ctx = loop.start_processes(cfg)
    run = loop.build_run(cfg, ctx, Path(args.scratch))
    steps = [loop.on_policy_step(run) for _ in range(args.rl_steps)]
    keys = ("time/generate_s", "time/logprobs_s", "time/train_s", "step_time_s",
            "rollout/agent_tokens")
    return {k: [s[k] for s in steps] for k in keys}


def _progress(line: str) -> None:
    """Each run's figure as it comes (stderr), so a run stopped by a time limit still shows
    what it measured; the tables follow on stdout once every run is in."""
    print(f"  [measured] {line}", file=sys.stderr, flush=True)


def _child(impl: str, args, variant: str = "lean+shared", table: str = "single") -> dict:
    cmd = [sys.executable, __file__, "--impl", impl, "--variant", variant, "--table", table,
           "--group", str(args.group), "--batch", str(args.batch), "--prompt",
           str(args.prompt), "--new", str(args.new), "--timed", str(args.timed), "--warmup",
           str(args.warmup), "--rl-steps", str(args.rl_steps), "--recipe", str(args.recipe),
           "--scratch", args.scratch, "--policy", args.policy, "--turn-tokens",
           str(args.turn_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{impl} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="rows generated together")
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens per row")
    parser.add_argument("--new", type=int, default=128, help="tokens generated per row")
    parser.add_argument("--timed", type=int, default=2,
                        help="timed generate calls per run (and as many 1-token calls, the "
                             "prefill, for the decode-steps-only figure)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating")
    parser.add_argument("--rl-steps", type=int, default=2,
                        help="FC-RL steps timed for the split (0: skip)")
    parser.add_argument("--recipe", default=str(REPO / "recipes/tiny-cpu/fc_rl.yaml"))
    parser.add_argument("--group", type=int, default=8,
                        help="GRPO group size of the second table (divides --batch)")
    parser.add_argument("--impl", choices=["megatron", "hf", "rl", "episodes", "hf-episodes"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--policy", default=str(REPO / "runs" / "demo" / "fc_rl"),
                        help="checkpoint that plays the episodes table (make demo's FC-RL run); "
                             "the table is skipped when it does not exist")
    parser.add_argument("--turn-tokens", type=int, default=64,
                        help="max new tokens per agent turn in the episodes table")
    parser.add_argument("--variant", choices=VARIANTS + EPISODE_VARIANTS[1:] + GRAPHS,
                        default="lean+shared",
                        help=argparse.SUPPRESS)
    parser.add_argument("--table", choices=["single", "group"], default="single",
                        help=argparse.SUPPRESS)
    parser.add_argument("--tables", default="single,group,episodes,rl",
                        help="which of the tables to measure (comma-separated): single-turn "
                             "decode, GRPO groups, agent episodes, the FC-RL step's split")
    parser.add_argument("--scratch", default=str(REPO / "runs" / "benchmark"),
                        help="where the FC-RL steps may write (nothing is saved)")
    args = parser.parse_args()
    if args.new < 2:
        parser.error(f"--new {args.new}: at least 2 (the decode steps are the tokens after "
                     "the first)")
    if args.batch % args.group:
        parser.error(f"--group {args.group} must divide --batch {args.batch}")
    tables = set(args.tables.split(","))
    unknown = tables - {"single", "group", "episodes", "rl"}
    if unknown:
        parser.error(f"--tables: unknown {', '.join(sorted(unknown))}")
    if args.impl:
        print(json.dumps({"megatron": run_megatron, "hf": run_hf, "rl": run_rl,
                          "episodes": run_episodes_table,
                          "hf-episodes": run_hf_episodes}[args.impl](args)))
        return
    tokens = args.batch * args.new
    print(f"rollout throughput, {args.recipe}: batch {args.batch}, prompt {args.prompt}, "
          f"{args.new} new tokens per row, {args.repeats} alternating runs each, medians")
    graphs = GRAPHS[:1] if CUDA else ()
    for table, variants in (("single", ("plain", "lean", "slots", "slots+fused") + graphs),
                            ("group", VARIANTS + graphs)):
        if table not in tables:
            continue
        sides = [("hf", "HF generate()")] + [(v, f"engine, {v}") for v in variants]
        rates = {side: [] for side, _ in sides}
        phase = {side: [] for side, _ in sides}
        for _ in range(args.repeats):
            for side, _ in sides:
                impl, variant = ("hf", "plain") if side == "hf" else ("megatron", side)
                out = _child(impl, args, variant, table)
                whole, prefill = (statistics.median(out[k]) for k in
                                  ("seconds", "prefill_seconds"))
                rates[side].append(tokens / whole)
                phase[side].append(args.batch * (args.new - 1) / (whole - prefill))
                _progress(f"{table}, {side}: {rates[side][-1]:.0f} tokens/s")
        print("single-turn decode: distinct prompts, greedy" if table == "single" else
              f"GRPO groups: {args.batch // args.group} prompts x {args.group} samples, "
              "temperature 1")
        print(f"  {'':24}{'whole generate() call':>28}    {'decode steps only':>22}")
        hf, hf_phase = statistics.median(rates["hf"]), statistics.median(phase["hf"])
        for side, name in sides:
            med, med_phase = statistics.median(rates[side]), statistics.median(phase[side])
            runs = ", ".join(f"{r:.0f}" for r in rates[side])
            print(f"  {name:24}{med:>8.0f} tokens/s  {med / hf:>5.2f}x HF    "
                  f"{med_phase:>8.0f} tokens/s  {med_phase / hf_phase:>5.2f}x HF  [{runs}]")
        print("  (decode steps only: the tokens after the first over the time a call takes "
              "beyond a 1-token call, which is the prefill)")
    if "episodes" in tables and Path(args.policy).exists():
        sides = ("hf",) + EPISODE_VARIANTS + (GRAPHS[1:] if CUDA else ())
        rates = {v: [] for v in sides}
        for _ in range(args.repeats):
            for variant in sides:
                out = (_child("hf-episodes", args) if variant == "hf" else
                       _child("episodes", args, variant))
                rates[variant].append((out["tokens"] / statistics.median(out["seconds"]), out))
                _progress(f"episodes, {variant}: {rates[variant][-1][0]:.0f} tokens/s")
        print(f"agent episodes: {args.batch // args.group} validation tasks x {args.group} "
              f"samples (GRPO groups), {args.batch} rows or slots, temperature 1, "
              f"<= {args.turn_tokens} tokens per turn, policy {args.policy}")
        hf = statistics.median(r for r, _ in rates["hf"])
        base = statistics.median(r for r, _ in rates["plain"])
        for variant, name in (("hf", "HF generate(), turn by turn"), ("plain", "rounds, plain"),
                              ("rounds", "rounds, lean+shared"),
                              ("rounds+slots", "rounds, slot cache"),
                              ("continuous", "continuous, lean+shared"),
                              ("continuous+fused", "continuous, fused decode"),
                              ("continuous+graphs", "continuous, CUDA graphs")):
            if variant not in rates:
                continue
            med = statistics.median(r for r, _ in rates[variant])
            out = rates[variant][0][1]
            print(f"  {name:28}{med:>8.0f} tokens/s  {med / hf:>5.2f}x HF  {med / base:>5.2f}x "
                  f"plain  ({out['tokens']} tokens, {out['turns']:.2f} turns/episode)")
    elif "episodes" in tables:
        print(f"agent episodes: skipped, no policy at {args.policy} (run make demo first)")
    if args.rl_steps and "rl" in tables:
        rl = _child("rl", args)
        med = {k: statistics.median(v) for k, v in rl.items()}
        total = med["step_time_s"]
        print(f"FC-RL step ({args.rl_steps} steps, median): {total:.1f} s, "
              f"{med['rollout/agent_tokens']:.0f} agent tokens per episode")
        for part, key in (("generation", "time/generate_s"), ("log-prob recompute",
                                                                "time/logprobs_s"),
                          ("training", "time/train_s")):
            print(f"  {part:20}{med[key]:>8.1f} s  {100 * med[key] / total:>5.1f}%")


if __name__ == "__main__":
    main()
