"""The model provider: presets become the GPTModel they describe."""

import pytest
import torch

from megatron_foresight.config import load_recipe
from megatron_foresight.models.provider import build_model
from helpers.run import REPO

RECIPE = REPO / "recipes" / "tiny-cpu" / "lm.yaml"


def _expected_params(h, f, layers, heads, groups, vocab, tied, qkv_bias):
    head_dim = h // heads
    qkv = h * (h + 2 * groups * head_dim) + (h + 2 * groups * head_dim if qkv_bias else 0)
    layer = qkv + h * h + h * 2 * f + f * h + 2 * h  # qkv, proj, fc1 (gate+up), fc2, two norms
    return vocab * h + layers * layer + h + (0 if tied else vocab * h)


def test_llama_style_tiny_model_has_the_right_parameters(megatron_cpu):
    cfg = load_recipe(RECIPE)
    (model,) = build_model(cfg, 384)
    n = sum(p.numel() for p in model.parameters())
    assert n == _expected_params(256, 704, 4, 8, 2, 384, tied=False, qkv_bias=False)
    names = dict(model.named_parameters())
    assert "output_layer.weight" in names
    assert not any("bias" in k for k in names)


def test_qwen2_style_has_qkv_bias_and_tied_variant_shares_embeddings(megatron_cpu):
    cfg = load_recipe(RECIPE, ["model.preset=tiny-qwen2", "model.untie_embeddings_and_output_weights=false"])
    (model,) = build_model(cfg, 384)
    names = dict(model.named_parameters())
    assert "decoder.layers.0.self_attention.linear_qkv.bias" in names
    assert "output_layer.weight" not in names
    assert sum(p.numel() for p in model.parameters()) == \
        _expected_params(256, 704, 4, 8, 2, 384, tied=True, qkv_bias=True)


def test_same_seed_same_model_different_seed_different_model(megatron_cpu):
    a = build_model(load_recipe(RECIPE), 384)[0]
    b = build_model(load_recipe(RECIPE), 384)[0]
    c = build_model(load_recipe(RECIPE, ["seed=7"]), 384)[0]
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.decoder.layers[0].mlp.linear_fc1.weight,
                           c.decoder.layers[0].mlp.linear_fc1.weight)
    # building a model leaves the caller's random stream where it was
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    build_model(load_recipe(RECIPE), 384)
    assert torch.equal(torch.rand(1), expected)


def test_forward_gives_per_token_loss_and_causal_logits(megatron_cpu):
    (model,) = build_model(load_recipe(RECIPE), 384)
    tokens = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).unsqueeze(0).expand(2, -1)
    loss = model(tokens, pos, None, labels=tokens)
    assert loss.shape == (2, 16) and torch.isfinite(loss).all()
    logits = model(tokens, pos, None)
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 259
    logits2 = model(changed, pos, None)
    assert torch.allclose(logits[:, :10], logits2[:, :10], atol=1e-5)  # no peeking ahead
    assert not torch.allclose(logits[:, 10:], logits2[:, 10:])


def _attention_pair(cfg_overrides=()):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_foresight.models.attention import SDPADotProductAttention
    from megatron_foresight.models.provider import transformer_config

    config = transformer_config(load_recipe(RECIPE, list(cfg_overrides)), use_te=False)
    args = dict(layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return DotProductAttention(config, **args), SDPADotProductAttention(config, **args)


def test_sdpa_core_attention_equals_megatron_local_attention(megatron_cpu):
    megatron_attn, sdpa_attn = _attention_pair()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(32, 2, 8, 32, generator=g, requires_grad=True)  # [s, b, heads, d]
    k = torch.randn(32, 2, 2, 32, generator=g, requires_grad=True)  # 2 query groups (GQA)
    v = torch.randn(32, 2, 2, 32, generator=g, requires_grad=True)
    ref = megatron_attn(q, k, v, None)
    grads_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    out = sdpa_attn(q, k, v, None)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert out.shape == ref.shape == (32, 2, 256)
    assert torch.allclose(out, ref, atol=1e-5)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, atol=1e-4)


def _document_mask(starts_per_row, s):
    """Megatron's reset attention mask ([b, 1, s, s], True where hidden) for rows whose
    documents begin at `starts_per_row`."""
    pos = torch.arange(s)
    doc_bS = torch.stack([torch.bucketize(pos, torch.tensor(starts), right=True)
                          for starts in starts_per_row])
    return ((doc_bS[:, :, None] != doc_bS[:, None, :]) | (pos[None, :] > pos[:, None]))[:, None]


def test_sdpa_attends_document_by_document_under_a_document_mask(megatron_cpu, monkeypatch):
    """data.document_masks: in training, SDPA runs each document of a row on its own (causal
    kernel) and gives Megatron's local attention under the explicit mask, forward and
    gradients; a mask that is not per-document (here one that hides a key from a later
    query of its own document) takes the explicit-mask path and still agrees."""
    from megatron_foresight.models import attention

    megatron_attn, sdpa_attn = _attention_pair()
    megatron_attn.train(), sdpa_attn.train()
    calls = []
    by_document = attention.SDPADotProductAttention._by_document
    monkeypatch.setattr(attention.SDPADotProductAttention, "_by_document",
                        lambda self, *a: calls.append(a[3]) or by_document(self, *a))
    g = torch.Generator().manual_seed(2)
    q = torch.randn(32, 3, 8, 32, generator=g, requires_grad=True)
    k = torch.randn(32, 3, 2, 32, generator=g, requires_grad=True)
    v = torch.randn(32, 3, 2, 32, generator=g, requires_grad=True)
    documents = _document_mask([[0, 5, 20], [0], [0, 31]], 32)
    other = documents.clone()
    other[1, 0, 9, 3] = True
    for mask, spans in ((documents, [[(0, 5), (5, 20), (20, 32)], [(0, 32)], [(0, 31), (31, 32)]]),
                        (other, None)):
        calls.clear()
        ref = megatron_attn(q, k, v, mask)
        grads_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
        out = sdpa_attn(q, k, v, mask)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        assert calls == ([spans] if spans else [])
        assert attention.document_spans(mask) == spans
        assert torch.allclose(out, ref, atol=1e-5)
        for a, b in zip(grads, grads_ref):
            assert torch.allclose(a, b, atol=1e-4)
    # one mask for the whole batch ([1, 1, s, s]) applies to every row
    shared = _document_mask([[0, 12]], 32)
    calls.clear()
    assert torch.allclose(sdpa_attn(q, k, v, shared), megatron_attn(q, k, v, shared), atol=1e-5)
    assert calls == [[[(0, 12), (12, 32)]]]


def test_sdpa_core_attention_decodes_against_a_longer_key_cache(megatron_cpu):
    """With a KV cache the 3 new queries sit at the end of 10 positions: query i may see keys
    up to 7 + i (bottom-right aligned causal mask), checked against plain softmax attention."""
    _, sdpa_attn = _attention_pair()
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 1, 8, 32, generator=g)
    k = torch.randn(10, 1, 2, 32, generator=g)
    v = torch.randn(10, 1, 2, 32, generator=g)
    out = sdpa_attn(q, k, v, None)
    kx, vx = k.repeat_interleave(4, dim=2), v.repeat_interleave(4, dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, kx) / 32 ** 0.5
    allowed = torch.ones(3, 10, dtype=torch.bool).tril(7)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    ref = torch.einsum("bhqk,kbhd->qbhd", probs, vx).reshape(3, 1, 256)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_rope_equals_megatrons_unfused_rope_bit_for_bit(megatron_cpu, dtype):
    """models/rope.py keeps cos/sin per angle table and rotates with a roll: the same bits as
    Megatron's unfused RoPE, forward and backward, for a prefill's table and a decode step's
    one-position slice of the table Megatron's RotaryEmbedding caches."""
    from types import SimpleNamespace

    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_foresight.models import rope

    rope.install()
    config = SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=False,
                             multi_latent_attention=False)
    table = RotaryEmbedding(kv_channels=32, rotary_percent=1.0, rotary_base=10_000)(40)
    g = torch.Generator().manual_seed(0)
    for freqs in (table[:12], table[37:38], table[37:38]):  # the last: from the cache
        t = torch.randn(freqs.shape[0], 3, 8, 32, generator=g).to(dtype).requires_grad_()
        ref = rope_utils._apply_rotary_pos_emb_bshd(t, freqs)
        out = rope.apply_rotary_pos_emb(t, freqs, config)
        assert out.dtype == ref.dtype == dtype and torch.equal(out, ref)
        weights = torch.randn(out.shape, generator=g).to(dtype)
        (grad_ref,) = torch.autograd.grad((ref * weights).sum(), t)
        (grad,) = torch.autograd.grad((out * weights).sum(), t)
        assert torch.equal(grad, grad_ref)
    # what the cache does not cover goes to Megatron's function (interleaved pairs here)
    interleaved = SimpleNamespace(**{**vars(config), "rotary_interleaved": True})
    t = torch.randn(12, 3, 8, 32, generator=g)
    assert torch.equal(rope.apply_rotary_pos_emb(t, table[:12], interleaved),
                       rope_utils._apply_rotary_pos_emb_bshd(t, table[:12],
                                                             rotary_interleaved=True))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_swiglu_gives_megatrons_unfused_mlp_bit_for_bit(megatron_cpu, precision):
    """models/swiglu.py (the fused SwiGLU call on the local layers) against Megatron's own
    unfused MLP activation (chunk, silu, product, autograd's concatenated gradient): the same
    logits and the same gradient of every parameter, on the tiny model."""
    from megatron.core.transformer import mlp

    from megatron_foresight.models import swiglu

    (model,) = build_model(load_recipe(RECIPE, [f"model.precision={precision}"]), 384)
    assert model.config.bias_activation_fusion and mlp.bias_swiglu_impl is swiglu.bias_swiglu_impl
    tokens = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(24).expand(2, 24)
    results = []
    for fused in (True, False):
        model.config.bias_activation_fusion = fused  # False: Megatron's unfused glu
        model.zero_grad()
        logits = model(tokens, positions, None)
        (logits.float() ** 2).mean().backward()
        grads = {n: (p.main_grad if hasattr(p, "main_grad") else p.grad).clone()
                 for n, p in model.named_parameters()}
        results.append((logits.detach(), grads))
    (ours, ours_grads), (theirs, their_grads) = results
    assert torch.equal(ours, theirs)
    fc1 = [n for n in ours_grads if "linear_fc1" in n]
    assert fc1 and all(ours_grads[n].abs().sum() > 0 for n in fc1)
    assert all(torch.equal(ours_grads[n], their_grads[n]) for n in ours_grads)


def test_document_masks_on_transformer_engine_are_packed_sequences_mocked_cuda(monkeypatch):
    """On a (mocked) CUDA machine with Transformer Engine, data.document_masks gives samples
    document starts (the loader's THD boundaries) instead of a mask TE's causal kernel would
    ignore; it needs TE >= 1.7, else refused naming the key."""
    import sys
    import types

    import megatron.core.utils

    from megatron_foresight.config import ConfigError
    from megatron_foresight.models.provider import document_format, use_transformer_engine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    monkeypatch.setattr(megatron.core.utils, "is_te_min_version", lambda v, **_: True)
    assert use_transformer_engine(load_recipe(RECIPE))
    assert document_format(load_recipe(RECIPE)) is None
    masks = ["data.document_masks=true"]
    one = load_recipe(RECIPE, masks)
    assert use_transformer_engine(one) and document_format(one) == "starts"
    local = load_recipe(RECIPE, masks + ["model.transformer_impl=local"])
    assert not use_transformer_engine(local) and document_format(local) == "mask"
    monkeypatch.setattr(megatron.core.utils, "is_te_min_version", lambda v, **_: False)
    with pytest.raises(ConfigError, match="data.document_masks: .*transformer-engine >= 1.7"):
        document_format(one)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_transformer_engine_config_builds_for_each_activation_te_rope_kernel_mocked(
        monkeypatch, activation):
    """The TransformerConfig a TE run gets (use_te=True) is accepted by Megatron for both
    activations: GeLU has no bias to fuse (Megatron refuses bias-GeLU fusion without one), so
    only SwiGLU asks for the fused activation. TE's fused RoPE kernel is absent here and stood
    in for (Megatron checks it exists); nothing runs on it."""
    from megatron.core.models.common.embeddings import rope_utils

    from megatron_foresight.models.provider import transformer_config

    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", lambda *a, **k: None)
    cfg = load_recipe(RECIPE, [f"model.activation={activation}"])
    config = transformer_config(cfg, use_te=True)
    assert config.bias_activation_fusion == (activation == "swiglu")
    assert config.gated_linear_unit == (activation == "swiglu")
    assert config.apply_rope_fusion and config.masked_softmax_fusion and not config.add_bias_linear
