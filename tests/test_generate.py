"""The KV-cache decoder against recomputing the whole sequence at every step, on the real
Megatron GPTModel (CPU, one process): Megatron's static inference context (the default) and
the slot cache (`slot_cache=True`) alike, and each against the other."""

import pytest
import torch

from megatron_foresight.config import load_recipe
from megatron_foresight.data.tokenizer import ByteTokenizer
from megatron_foresight.inference.generate import Generator, Sampling
from megatron_foresight.models.provider import build_model
from helpers.run import REPO

RECIPE = REPO / "recipes" / "tiny-cpu" / "lm.yaml"


def _model(seed=7):
    torch.manual_seed(seed)
    (model,) = build_model(load_recipe(RECIPE, [f"seed={seed}"]), 384)
    with torch.no_grad():  # a random init is nearly uniform; sharpen it so argmax is stable
        model.output_layer.weight.mul_(30)
    return model.eval()


def _greedy_without_cache(model, prompt, n):
    """Greedy over the tokenizer's ids (the padded rows of the embedding never win)."""
    vocab = ByteTokenizer().vocab_size
    ids = list(prompt)
    for _ in range(n):
        x = torch.tensor([ids])
        pos = torch.arange(len(ids))[None]
        with torch.no_grad():
            logits = model(x, pos, None)
        ids.append(int(logits[0, -1, :vocab].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("slots", [True, False], ids=["slots", "static"])
def test_batched_cached_greedy_equals_full_recompute_per_row(megatron_cpu, slots):
    model = _model()
    gen = Generator(model, ByteTokenizer(), max_sequence_length=64, slot_cache=slots)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41], [100, 101, 102, 103]]  # different lengths
    out = gen.generate(prompts, Sampling(max_new_tokens=12))
    for prompt, completion in zip(prompts, out):
        assert completion.ids == _greedy_without_cache(model, prompt, 12)
        assert completion.stop == "length" and len(completion.logprobs) == 12
        assert all(lp <= 0 for lp in completion.logprobs)


@pytest.mark.parametrize("slots", [True, False], ids=["slots", "static"])
def test_stop_token_ends_a_row_and_the_others_continue(megatron_cpu, slots):
    model = _model()
    tok = ByteTokenizer()
    gen = Generator(model, tok, max_sequence_length=64, slot_cache=slots)
    prompts = [[5, 6, 7, 8], [40, 41, 42]]
    free = gen.generate(prompts, Sampling(max_new_tokens=10))
    ids = free[0].ids
    k = next(k for k in range(1, len(ids)) if ids[k] not in ids[:k])  # first new token after one
    stop_text = tok.decode([ids[k]])  # a one-token stop string row 0 meets at step k + 1
    out = gen.generate(prompts, Sampling(max_new_tokens=10), stop_texts=(stop_text,))
    assert out[0].ids == ids[:k + 1] and out[0].stop == "stop"
    if stop_text not in tok.decode(free[1].ids):
        assert out[1].ids == free[1].ids and out[1].stop == "length"


@pytest.mark.parametrize("slots", [True, False], ids=["slots", "static"])
def test_sampling_is_seeded_and_top_p_restricts_the_draw(megatron_cpu, slots):
    model = _model()
    gen = Generator(model, ByteTokenizer(), max_sequence_length=64, slot_cache=slots)
    prompts = [[5, 6, 7, 8]] * 4
    a = gen.generate(prompts, Sampling(temperature=1.0, max_new_tokens=8, seed=3))
    b = gen.generate(prompts, Sampling(temperature=1.0, max_new_tokens=8, seed=3))
    assert [c.ids for c in a] == [c.ids for c in b]
    assert len({tuple(c.ids) for c in a}) > 1  # rows draw independently
    tiny_p = gen.generate(prompts, Sampling(temperature=1.0, top_p=1e-6, max_new_tokens=8))
    greedy = gen.generate(prompts[:1], Sampling(max_new_tokens=8))
    assert all(c.ids == greedy[0].ids for c in tiny_p)  # only the top token survives


def test_inverse_cdf_draws_by_probability_and_never_a_zero_probability_token():
    """The device-side draw (`inverse_cdf`, what sampling on CUDA uses): the first token whose
    cumulative probability exceeds u of the row's total; zero-probability tokens (first, inner,
    last) never drawn, even for u at the ends of [0, 1); frequencies follow the probabilities."""
    from megatron_foresight.inference.generate import inverse_cdf

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.25, 0.25, 0.0],  # binary fractions: exact sums
                          [0.125, 0.0, 0.0, 0.0, 0.0, 0.875]])
    edges = torch.tensor([0.0, 0.1249, 0.125, 0.4999, 0.5, 0.8, 1 - 2 ** -53],
                         dtype=torch.float64)
    for row, expected in ((0, [1, 1, 1, 1, 3, 4, 4]), (1, [0, 0, 5, 5, 5, 5, 5])):
        got = inverse_cdf(probs[row].expand(len(edges), -1), edges).tolist()
        assert got == expected, (row, got)
    # rounding past the total falls back to the last token of positive probability
    assert inverse_cdf(probs, torch.tensor([1.0, 1.0], dtype=torch.float64)).tolist() == [4, 5]
    g = torch.Generator().manual_seed(0)
    u = torch.rand(40_000, generator=g, dtype=torch.float64)
    ids = inverse_cdf(probs[:1].expand(len(u), -1), u)
    freq = torch.bincount(ids, minlength=6).double() / len(u)
    assert torch.allclose(freq, probs[0].double(), atol=0.01), freq
    assert freq[[0, 2, 5]].sum() == 0
    # a row of NaN or of zeros is refused, as torch.multinomial refuses it on the host path
    for bad in (float("nan"), 0.0):
        rows = torch.cat([probs[:1], torch.full((1, 6), bad)])
        with pytest.raises(RuntimeError, match=r"row\(s\) \[1\] are not finite or sum to 0"):
            inverse_cdf(rows, torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_device_side_sampling_keeps_each_rows_stream_its_own_forced_on_cpu(monkeypatch):
    """With the device path taken (as on CUDA; forced here, there is no GPU), a row's token
    depends on its own generator only, not on the rows beside it, and its log-probability is
    the drawn token's."""
    from megatron_foresight.inference import generate

    monkeypatch.setattr(generate, "_draws_on_device", lambda device: True)
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    sampling = Sampling(temperature=1.0, max_new_tokens=1)

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    ids, logp = generate._draw(logits, sampling, gens(5, 6, 7))
    alone, _ = generate._draw(logits[1:2], sampling, gens(6))
    assert ids[1] == alone[0]
    assert torch.allclose(logp, torch.log_softmax(logits, -1).gather(-1, ids[:, None])[:, 0])
    again, _ = generate._draw(logits, sampling, gens(5, 6, 7))
    assert again.tolist() == ids.tolist()
    shared, _ = generate._draw(logits, sampling, torch.Generator().manual_seed(5))
    u = torch.rand(3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert shared.tolist() == generate.inverse_cdf(torch.softmax(logits, -1), u).tolist()


@pytest.mark.parametrize("slots", [True, False], ids=["slots", "static"])
def test_sequence_limit_ends_rows_with_context(megatron_cpu, slots):
    gen = Generator(_model(), ByteTokenizer(), max_sequence_length=10, slot_cache=slots)
    out = gen.generate([[1] * 10, [1] * 7], Sampling(max_new_tokens=8))
    assert out[0].ids == [] and out[0].stop == "context"
    assert len(out[1].ids) == 3 and out[1].stop == "context"


def _both(prompts, sampling, **variants):
    """The same generation with the default engine and with `variants` switched."""
    model = _model()
    fast = Generator(model, ByteTokenizer(), max_sequence_length=64).generate(prompts, sampling)
    plain = Generator(model, ByteTokenizer(), max_sequence_length=64, **variants)
    return fast, plain.generate(prompts, sampling)


def _close_logprobs(xs, ys):
    """Equal up to float rounding: a matmul over fewer rows (shared prefill) or attention as two
    matmuls (lean decode) sums in another order (differences seen: 4e-7 to 1e-5, the latter
    where `_model`'s 30x output layer scales a logit's rounding)."""
    for x, y in zip(xs, ys):
        assert len(x.logprobs) == len(y.logprobs)
        assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=5e-5,
                              rtol=0)


def test_shared_prefill_gives_the_rows_of_separate_prefills(megatron_cpu):
    # a GRPO-like batch: repeated prompts of different lengths (left padding), sampled
    a, b, c = [5, 6, 7, 8, 9, 10, 11], [40, 41], [100, 101, 102, 103]
    prompts = [a, b, a, a, c, b]
    for sampling in (Sampling(max_new_tokens=10), Sampling(temperature=1.0, max_new_tokens=10,
                                                           seed=3)):
        shared, separate = _both(prompts, sampling, shared_prefill=False)
        assert [o.ids for o in shared] == [o.ids for o in separate]
        _close_logprobs(shared, separate)
    # sampled rows of one prompt still draw different continuations
    assert len({tuple(shared[i].ids) for i in (0, 2, 3)}) > 1


def test_lean_decode_gives_the_plain_decoders_tokens(megatron_cpu):
    # same-length rows (no mask in decode) and different lengths (the masked two-matmul path)
    for prompts in ([[5, 6, 7], [40, 41, 42], [7, 7, 9]], [[5, 6, 7, 8, 9], [40, 41]]):
        for sampling in (Sampling(max_new_tokens=12),
                         Sampling(temperature=1.0, max_new_tokens=12, seed=5)):
            lean, plain = _both(prompts, sampling, lean_decode=False, shared_prefill=False)
            assert [o.ids for o in lean] == [o.ids for o in plain]
            _close_logprobs(lean, plain)


def test_the_slot_cache_gives_the_static_paths_completions(megatron_cpu):
    """The slot cache against Megatron's static context with both speed-ups off: ragged
    prompts, repeated prompts (shared prefill), a stop string one row meets early;
    greedy, sampled from the batch's stream, and from per-row streams; a prompt that fills
    the context."""
    tok = ByteTokenizer()
    a, b, c = [5, 6, 7, 8, 9, 10, 11], [40, 41], [100, 101, 102, 103]
    prompts = [a, b, a, c, b, [7] * 64]
    model = _model()
    stop = (tok.decode([Generator(model, tok, max_sequence_length=64).generate(
        prompts[:1], Sampling(max_new_tokens=4))[0].ids[3]]),)
    for sampling, seeds in ((Sampling(max_new_tokens=12), None),
                            (Sampling(temperature=1.0, max_new_tokens=12, seed=3), None),
                            (Sampling(temperature=1.0, max_new_tokens=12), [9, 8, 7, 6, 5, 4])):
        gens = [Generator(model, tok, max_sequence_length=64, **options) for options in
                ({"slot_cache": True}, {"lean_decode": False, "shared_prefill": False})]
        slots, static = (g.generate(prompts, sampling, stop, row_seeds=seeds) for g in gens)
        assert gens[0].slot_cache and not gens[1].slot_cache
        assert [(o.ids, o.stop) for o in slots] == [(o.ids, o.stop) for o in static]
        _close_logprobs(slots, static)
        assert len({len(o.ids) for o in slots[:5]}) > 1  # rows ended at different steps
        assert slots[5].stop == "context" and not slots[5].ids


@pytest.mark.parametrize("temperature", [0.5, 1.7])
def test_logit_temperature_scores_what_the_sampler_drew(megatron_cpu, temperature):
    """FC-RL's `tempered_policy`: with `LogitTemperature` on, the model's per-token loss (the
    path the log-prob recomputation and the loss take) gives the log-probs the sampler recorded
    at that temperature; inside `off()` the sampler draws as from the bare model; without
    the temperature the scores are other ones (the check can fail)."""
    from megatron_foresight.models.provider import LogitTemperature, mask_padded_vocab

    torch.manual_seed(11)
    vocab = ByteTokenizer().vocab_size
    (model,) = build_model(load_recipe(RECIPE, ["seed=11"]), 384)
    with torch.no_grad():  # between uniform and one-hot, so the temperature matters
        model.output_layer.weight.mul_(4)
    model.eval()
    mask_padded_vocab(model, vocab)
    prompts = [[5, 6, 7, 8, 9], [40, 41, 42, 43, 44], [7, 7, 9, 100, 3]]
    sampling = Sampling(temperature=temperature, max_new_tokens=16, seed=5)
    bare = Generator(model, ByteTokenizer(), max_sequence_length=128).generate(prompts, sampling)
    tempering = LogitTemperature(model, temperature)
    with tempering.off():  # decoding by the fused step (weights) and by the layers themselves
        drawn = Generator(model, ByteTokenizer(), max_sequence_length=128).generate(prompts,
                                                                                  sampling)
        layered = Generator(model, ByteTokenizer(), max_sequence_length=128,
                            fused_decode=False).generate(prompts, sampling)
    assert [o.ids for o in drawn] == [o.ids for o in bare] == [o.ids for o in layered]

    def scores():
        out = []
        for prompt, o in zip(prompts, drawn):
            ids = torch.tensor([prompt + o.ids])
            with torch.no_grad():
                ce = model(ids[:, :-1], torch.arange(ids.shape[1] - 1)[None], None,
                           labels=ids[:, 1:])
            out.append(-ce[0, len(prompt) - 1:].float())
        return torch.cat(out)

    recorded = torch.tensor([lp for o in drawn for lp in o.logprobs])
    assert torch.allclose(scores(), recorded, atol=5e-5, rtol=0)
    with tempering.off():
        assert (scores() - recorded).abs().max() > 0.05


@pytest.mark.parametrize("slots", [True, False], ids=["slots", "static"])
def test_decoding_runs_without_fp8_mocked_te(megatron_cpu, slots, monkeypatch):
    """A recipe's `model.fp8` makes Megatron's TransformerBlock enter Transformer Engine's FP8
    autocast on every forward, whose GEMMs need row counts that decode batches do not have:
    the decoder takes FP8 off while it decodes and puts it back after. Transformer Engine
    cannot run here (no GPU), so the autocast is replaced by one that fails: decoding must
    not enter it, a plain forward (training) still does."""
    from megatron.core.transformer import transformer_block

    model = _model()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41]]
    expected = [c.ids for c in Generator(model, ByteTokenizer(), max_sequence_length=64,
                                         slot_cache=slots).generate(prompts,
                                                                    Sampling(max_new_tokens=6))]
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    for config in configs.values():
        config.fp8 = "hybrid"

    def fp8_autocast(*args, **kwargs):
        raise AssertionError("entered the FP8 autocast")

    monkeypatch.setattr(transformer_block, "get_fp8_context", fp8_autocast)
    gen = Generator(model, ByteTokenizer(), max_sequence_length=64, slot_cache=slots)
    assert [c.ids for c in gen.generate(prompts, Sampling(max_new_tokens=6))] == expected
    assert all(c.fp8 == "hybrid" for c in configs.values())
    with pytest.raises(AssertionError, match="FP8 autocast"), torch.no_grad():
        model(torch.tensor([prompts[0]]), torch.arange(len(prompts[0]))[None], None)


def test_te_attention_decodes_on_the_slot_cache_mocked_te(megatron_cpu, monkeypatch):
    """Transformer Engine's core attention ignores the explicit mask that hides the static
    path's left padding, so a model with it decodes on the slot cache (which masks each row
    itself) even when not asked to, and a batch of unequal prompts that the slot cache cannot
    run is refused. TE cannot run here: its detection is replaced by one that says yes."""
    from megatron_foresight.errors import UsageError
    from megatron_foresight.inference import generate

    model = _model()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41]]
    sampling = Sampling(max_new_tokens=6)
    static = Generator(model, ByteTokenizer(), max_sequence_length=64)
    assert not static.slot_cache
    expected = [c.ids for c in static.generate(prompts, sampling)]
    monkeypatch.setattr(generate, "_te_core_attention", lambda model: True)
    te = Generator(model, ByteTokenizer(), max_sequence_length=64)
    assert te.slot_cache
    assert [c.ids for c in te.generate(prompts, sampling)] == expected
    te.slot_cache = False  # as when `unsupported_by_slots` names something of the model
    with pytest.raises(UsageError, match="unequal lengths"):
        te.generate(prompts, sampling)
    assert [c.ids for c in te.generate([prompts[0]], sampling)] == expected[:1]
