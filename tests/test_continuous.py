"""Continuous batching (`inference.continuous`, `inference.slots`) against the engine it
replaces: the slot KV cache gives `Generator.generate`'s completions, and the continuous agent
schedule plays the same episodes as the round schedule while its decode batch stays fuller.
Real Megatron GPTModel on the CPU; one process, and TP=2 / PP=2 under torchrun."""

import json
from dataclasses import asdict

import pytest
import torch

from megatron_foresight.config import load_recipe
from megatron_foresight.data.tokenizer import ByteTokenizer
from megatron_foresight.envs.math import MathEnv
from megatron_foresight.errors import UsageError
from megatron_foresight.inference.agent import run_episodes
from megatron_foresight.inference.continuous import SlotEngine
from megatron_foresight.inference.generate import Generator, Sampling
from megatron_foresight.models.provider import build_model
from megatron_foresight.tasks import Task
from helpers.run import REPO, python
from test_generate import RECIPE, _close_logprobs

TURNS = [1, 3, 2, 4, 1, 2, 3, 1, 4, 2]
"""Each episode's turn budget (MathEnv.max_turns): episodes of different lengths."""


def _model(overrides=()):
    torch.manual_seed(7)
    (model,) = build_model(load_recipe(RECIPE, ["seed=7", *overrides]), 384)
    with torch.no_grad():  # a random init is nearly uniform; sharpen it so argmax is stable
        output = getattr(model, "output_layer", None)
        if output is not None and output.weight is not None:  # tied: the embedding's
            output.weight.mul_(30)
    return model.eval()


class _Bytes:
    """A format with no instruction whose turns end at bytes the random model writes often, so
    that its turns end after different numbers of tokens."""

    @staticmethod
    def prompt(text):
        return text

    @staticmethod
    def stop_texts():
        return tuple("_x2")


def episodes(continuous: bool, sampling=Sampling(max_new_tokens=12), slots=4,
             row_streams=False, overrides=(), generator=None):
    """The records of len(TURNS) math episodes (more than `slots`), as plain data."""
    tasks = [Task(f"m{k}", "math", f"{k + 2} * {k + 3} = ?", (str((k + 2) * (k + 3)),),
                  meta={"turns": t}) for k, t in enumerate(TURNS)]
    generator = generator or Generator(_model(overrides), ByteTokenizer(),
                                       max_sequence_length=512)
    records = run_episodes(
        generator, tasks, lambda task: MathEnv(task.meta["turns"], template="Q: {question}\n"),
        sampling, batch_size=slots, progress=False, fmt=_Bytes(), continuous=continuous,
        row_streams=row_streams)
    return [{**asdict(r), "task": r.task.id} for r in records]


def _same_records(a, b):
    """Equal but for log-probabilities, which may differ by float rounding (the rows of a
    forward differ between the schedules)."""
    for x, y in zip(a, b, strict=True):
        turns_x, turns_y = x.pop("turns"), y.pop("turns")
        assert x == y
        for tx, ty in zip(turns_x, turns_y, strict=True):
            lx, ly = tx.pop("logprobs"), ty.pop("logprobs")
            assert tx == ty
            assert torch.allclose(torch.tensor(lx), torch.tensor(ly), atol=5e-5, rtol=0)


def test_slot_engine_gives_the_generators_completions(megatron_cpu):
    tok = ByteTokenizer()
    gen = Generator(_model(), tok, max_sequence_length=64)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41], [100, 101, 102, 103], [40, 41]]
    free = gen.generate(prompts, Sampling(max_new_tokens=12))
    stop = tok.decode([free[0].ids[3]])  # one row meets it early, others maybe not
    for sampling, stops in ((Sampling(max_new_tokens=12), ()),
                            (Sampling(max_new_tokens=12), (stop, "zz"))):
        want = gen.generate(prompts, sampling, stops)
        engine = SlotEngine(gen, 6, sampling, stops)
        for slot, prompt in zip((5, 0, 2, 3), prompts):  # slots out of order, one left idle
            engine.start(slot, prompt, seed=0)
        got = {}
        while engine.turns:
            got.update(engine.step())
        got = [got[s] for s in (5, 0, 2, 3)]
        assert [(c.ids, c.stop) for c in got] == [(c.ids, c.stop) for c in want]
        _close_logprobs(got, want)
    assert want[0].stop == "stop" and len(want[0].ids) <= 4


def test_continuous_plays_the_round_schedules_episodes(megatron_cpu):
    gen = Generator(_model(), ByteTokenizer(), max_sequence_length=512)
    greedy = episodes(False, generator=gen)
    assert {r["ended"] for r in greedy} >= {"max_turns"}
    assert len({len(t["ids"]) for r in greedy for t in r["turns"]}) > 3  # turns differ in length
    _same_records(episodes(True, generator=gen), greedy)
    sampled = Sampling(temperature=1.0, max_new_tokens=12, seed=11)
    by_rounds = episodes(False, sampled, row_streams=True, generator=gen)
    assert by_rounds != greedy
    _same_records(episodes(True, sampled, generator=gen), by_rounds)


def test_the_continuous_decode_batch_stays_fuller(megatron_cpu):
    gen = Generator(_model(), ByteTokenizer(), max_sequence_length=512)
    counts = {}
    for continuous in (False, True):
        gen.stats.steps = gen.stats.rows = 0
        episodes(continuous, generator=gen)
        counts[continuous] = (gen.stats.steps, gen.stats.rows)
    (round_steps, round_rows), (steps, rows) = counts[False], counts[True]
    assert steps < round_steps
    assert rows / steps > round_rows / round_steps


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_continuous_is_the_same_under_model_parallelism(tmp_path, tp, pp):
    out = {}
    for n, layout in ((1, (1, 1)), (2, (tp, pp))):
        path = tmp_path / f"{n}.json"
        python(["tests/helpers/continuous_episodes.py", str(path), *map(str, layout)], nproc=n)
        out[n] = json.loads(path.read_text())
    _same_records(out[2], out[1])


def test_device_draws_agree_across_tensor_parallel_ranks_forced_on_cpu(tmp_path):
    """Sampled episodes drawn as on CUDA (the device path forced: no GPU here) are the same at
    TP 2 as in one process: the TP ranks take rank 0's tokens (a broadcast every step; on gloo
    their own draws would agree anyway, so this checks the path runs and agrees, not that
    CUDA's cumulative sums differ)."""
    out = {}
    for n, layout in ((1, (1, 1)), (2, (2, 1))):
        path = tmp_path / f"{n}.json"
        python(["tests/helpers/continuous_episodes.py", str(path), *map(str, layout),
                "device-draw"], nproc=n)
        out[n] = json.loads(path.read_text())
    assert len({tuple(t["ids"]) for r in out[1] for t in r["turns"]}) > 1
    _same_records(out[2], out[1])


class _NoHostReads(torch.overrides.TorchFunctionMode):
    """Fails on anything that reads a tensor's value back to the host (or sizes a result by
    it): a captured CUDA graph could not do that."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__,
             torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__,
             torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.nonzero, torch.nonzero,
             torch.Tensor.masked_select, torch.masked_select}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        masks = [a for a in (*args[1:2], *(args[1] if len(args) > 1 and isinstance(
            args[1], tuple) else ())) if isinstance(a, torch.Tensor) and a.dtype == torch.bool]
        if func in self.READS or (func in (torch.Tensor.__getitem__,
                                           torch.Tensor.__setitem__) and masks):
            raise AssertionError(f"a host read inside the graphed decode step: {func}")
        return func(*args, **kwargs)


class _RerunGraphs:
    """Stands in for `torch.cuda.CUDAGraph` (no GPU here): capture runs the step twice (warm-up
    and capture) and a replay runs it again, each under `_NoHostReads`, writing into the
    captured output tensor as a graph does."""

    captures = 0

    def capture(self, run):
        with _NoHostReads():
            run()
            out = run()
        _RerunGraphs.captures += 1

        def replay():
            with _NoHostReads():
                out.copy_(run())
        return replay, out


def test_graphed_decode_plays_the_same_episodes_mocked_cuda_graph(megatron_cpu, monkeypatch):
    """The decode step in the static form a CUDA graph replays (`inference.graphs`: every slot
    a row, keys read up to a bucket, the step's tensors refreshed in place) gives the
    engine's episodes, greedy and sampled, and reads nothing back to the host. The graph
    itself is mocked (no GPU here)."""
    from megatron_foresight.inference import graphs

    assert graphs.key_buckets(512) == [128, 256, 512] and graphs.key_buckets(100) == [100]
    model = _model()
    with pytest.raises(UsageError, match="need a GPU; this model is on cpu"):
        Generator(model, ByteTokenizer(), max_sequence_length=512, cuda_graphs=True)
    gen = Generator(model, ByteTokenizer(), max_sequence_length=512)
    sampled = Sampling(temperature=1.0, max_new_tokens=12, seed=11)
    want = [episodes(True, generator=gen), episodes(True, sampled, generator=gen)]
    monkeypatch.setattr(graphs, "CudaGraphs", _RerunGraphs)
    monkeypatch.setattr(_RerunGraphs, "captures", 0)
    gen.cuda_graphs = True
    got = [episodes(True, generator=gen), episodes(True, sampled, generator=gen)]
    for g, w in zip(got, want):
        _same_records(g, w)
    # one graph per key bucket and engine (one engine per call): a context past 128 tokens
    # needed the second bucket
    assert max(len(r["ids"]) for run in got for r in run) > 128
    assert _RerunGraphs.captures >= 3


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_decode_gives_the_module_paths_completions(megatron_cpu, precision):
    """`inference.fused` decodes the slot cache as Megatron's forward does: same tokens, greedy
    and sampled, log-probs equal to rounding; and it is really the path taken."""
    from megatron_foresight.inference import continuous

    model = _model([f"model.precision={precision}"])
    tok = ByteTokenizer()
    fused = Generator(model, tok, max_sequence_length=64, slot_cache=True)
    modules = Generator(model, tok, max_sequence_length=64, slot_cache=True, fused_decode=False)
    assert fused.fused_decode and not modules.fused_decode
    calls = []
    original = SlotEngine._fused_decode
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41], [100, 101, 102, 103], [40, 41]]
    for sampling in (Sampling(max_new_tokens=16),
                     Sampling(temperature=1.0, max_new_tokens=16, seed=3)):
        want = modules.generate(prompts, sampling)
        try:
            SlotEngine._fused_decode = lambda self, slots: calls.append(slots) or \
                original(self, slots)
            got = fused.generate(prompts, sampling)
        finally:
            SlotEngine._fused_decode = original
        assert [c.ids for c in got] == [c.ids for c in want]
        _close_logprobs(got, want)
    assert len(calls) == 2 * 15  # every decode step of both calls (the first draw: prefill)
    assert continuous.SlotEngine is SlotEngine


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", [
    [], ["model.add_qkv_bias=true"], ["model.normalization=LayerNorm"],
    ["model.activation=gelu"], ["model.untie_embeddings_and_output_weights=false"],
    ["model.kv_channels=48"]], ids=["tiny", "qkv-bias", "layernorm", "gelu", "tied", "kv48"])
def test_fused_decode_step_gives_megatrons_logits_bit_for_bit(megatron_cpu, shape, precision):
    """From the same slot state (ragged: rows at different lengths), one fused decode step and
    one step through Megatron's forward give the same logits and write the same cache."""
    model = _model([*shape, f"model.precision={precision}"])
    with torch.no_grad():  # biases start at zero, where their rounding would not show
        for name, p in model.named_parameters():
            if name.endswith(".bias") and "norm" not in name:
                p.normal_(0, 0.5)
    gen = Generator(model, ByteTokenizer(), max_sequence_length=64)
    assert gen.fused_decode
    engine = SlotEngine(gen, 4, Sampling(max_new_tokens=8), (), shared_seed=0)
    for slot, prompt in enumerate([[5, 6, 7, 8, 9], [40, 41], [100, 101, 102], [7] * 9]):
        engine.start(slot, prompt, None)
    engine.step()  # the prefill
    slots = [0, 2, 3]  # slot 1 idle
    lengths = list(engine.context.lengths)
    with torch.no_grad():
        fused = engine._fused_decode(slots)
        cache = {k: (a.clone(), b.clone()) for k, (a, b) in engine.context.kv.items()}
        engine.context.lengths[:] = lengths
        megatron = engine._run(slots, [engine.turns[s].pending for s in slots])
    assert engine.context.lengths == [n + (s in slots) for s, n in enumerate(lengths)]
    assert fused.dtype == megatron.dtype == torch.float32
    assert torch.equal(fused, megatron)
    for k, (a, b) in engine.context.kv.items():
        assert torch.equal(a, cache[k][0]) and torch.equal(b, cache[k][1])


def test_fused_decode_steps_aside_for_what_it_does_not_implement(megatron_cpu, monkeypatch):
    """The recipes expose no QK norm: the flag is set on the built model's config (a Qwen3-like
    model has it), to check that the engine then keeps Megatron's forward."""
    from megatron_foresight.inference.fused import unsupported

    model = _model()
    assert unsupported(model) == []
    monkeypatch.setattr(model.config, "qk_layernorm", True)
    assert unsupported(model) == ["QK layernorm"]
    assert not Generator(model, ByteTokenizer(), max_sequence_length=64).fused_decode
