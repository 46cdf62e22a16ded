"""Preprocessing into indexed datasets with a segment stream, reading them back through
Megatron's dataset classes, and blending two of them by weight."""

import json

import numpy as np
import pytest
import torch

from megatron_foresight.data.tokenizer import TokenizerConfig
from megatron_foresight.data.preprocess import SEGMENTS_SUFFIX, preprocess
from megatron_foresight.data.records import DataFileError
from megatron_foresight.data.render import Seg, transcript
from megatron_foresight.data.tokenizer import ByteTokenizer
from megatron_foresight.data.trajectory import read_trajectories
from megatron_foresight.world.build import build_world
from megatron_foresight.world.sizes import WorldSizes

BYTE = TokenizerConfig("byte")


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    build_world(out, seed=3, progress=False, sizes=WorldSizes(
        cities=20, people=40, guilds=8, search_tasks=100, math_tasks=100, trajectories=80,
        validation_trajectories=0, mc_samples=0, vocab_size=0))
    return out / "trajectories" / "train.jsonl"


def _read(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(str(prefix)), IndexedDataset(str(prefix) + SEGMENTS_SUFFIX)


def test_tokens_and_segments_match_the_rendered_trajectories(trajectories, tmp_path):
    meta = preprocess([trajectories], tmp_path / "t", "transcript", BYTE, progress=False)
    tokens, segments = _read(tmp_path / "t")
    tok = ByteTokenizer()
    assert len(tokens) == meta["documents"] == 80
    for i, t in enumerate(read_trajectories(trajectories)):
        expected_ids, expected_types = [], []
        for text, seg in transcript(t):
            ids = tok.encode(text)
            expected_ids += ids
            expected_types += [seg] * len(ids)
        assert tokens[i].tolist() == expected_ids + [tok.eod]
        assert segments[i].tolist() == expected_types + [expected_types[-1]]
    assert meta["tokens"] == sum(meta["tokens_by_segment"].values())
    assert set(meta["tokens_by_segment"]) == {"prompt", "think", "action", "observation"}
    assert json.loads((tmp_path / "t.json").read_text()) == meta


def test_two_workers_write_the_same_files_as_one(trajectories, tmp_path):
    preprocess([trajectories], tmp_path / "one", "transcript", BYTE, workers=1, batch_size=7,
               progress=False)
    preprocess([trajectories], tmp_path / "two", "transcript", BYTE, workers=2, batch_size=7,
               progress=False)
    for suffix in (".bin", ".idx", f"{SEGMENTS_SUFFIX}.bin", f"{SEGMENTS_SUFFIX}.idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_bad_record_stops_the_run_and_leaves_nothing(trajectories, tmp_path, workers):
    lines = trajectories.read_text().splitlines()
    bad = json.loads(lines[41])
    bad["turns"][0]["role"] = "user"
    lines[41] = json.dumps(bad)
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileError, match=r"bad.jsonl:42: field 'turns\[0\].role'"):
        preprocess([path], tmp_path / "out", "transcript", BYTE, workers=workers, batch_size=8,
                   progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def _text_corpus(path, letter, n):
    path.write_text("".join(json.dumps({"text": letter * (40 + i % 17)}) + "\n"
                            for i in range(n)))
    return path


def test_blend_of_two_datasets_follows_the_weights(tmp_path, megatron_cpu):
    from megatron_foresight.data.indexed import build_gpt_datasets
    from megatron_foresight.data.segmented import SegmentedGPTDataset, segment_weight_table

    for letter in "ab":
        preprocess([_text_corpus(tmp_path / f"{letter}.jsonl", letter, 300)], tmp_path / letter,
                   "text", BYTE, progress=False)
    train, _ = build_gpt_datasets(
        [str(tmp_path / "a"), str(tmp_path / "b")], [0.7, 0.3], seq_length=32, seed=1,
        split="100,0,0", num_samples=(2000, 0), tokenizer=ByteTokenizer(),
        cache_dir=tmp_path / "cache", dataset_cls=SegmentedGPTDataset)
    from_a = 0
    for i in range(len(train)):
        sample = train[i]
        letters = set(sample["tokens"][sample["tokens"] < 256].tolist())
        assert letters in ({ord("a")}, {ord("b")})
        from_a += letters == {ord("a")}
        assert sample["segments"].shape == sample["labels"].shape
        assert torch.all(sample["segments"][sample["labels"] != ByteTokenizer().eod] ==
                         int(Seg.TEXT))
    assert len(train) >= 2000
    assert from_a / len(train) == pytest.approx(0.7, abs=0.01)
    table = segment_weight_table({"text": 0.5, "observation": 2.0})
    assert table[torch.tensor([0, 1, 4, 3])].tolist() == [0.0, 0.5, 2.0, 0.0]


def test_segments_of_a_trajectory_sample_line_up_with_its_labels(trajectories, tmp_path,
                                                                 megatron_cpu):
    from megatron_foresight.data.indexed import build_gpt_datasets
    from megatron_foresight.data.segmented import SegmentedGPTDataset

    preprocess([trajectories], tmp_path / "t", "transcript", BYTE, progress=False)
    tokens, segments = _read(tmp_path / "t")
    flat_tokens = np.concatenate([tokens[i] for i in range(len(tokens))])
    flat_types = np.concatenate([segments[i] for i in range(len(segments))])
    train, _ = build_gpt_datasets(
        [str(tmp_path / "t")], None, seq_length=64, seed=1, split="100,0,0",
        num_samples=(50, 0), tokenizer=ByteTokenizer(), cache_dir=tmp_path / "cache",
        dataset_cls=SegmentedGPTDataset)
    text = flat_tokens.tobytes()
    found = 0
    for i in range(len(train)):
        sample = train[i]
        labels = sample["labels"].numpy().astype(flat_tokens.dtype)
        # A sample is a window of the shuffled document stream: find it in the file's order
        # (windows that span two documents are not contiguous there, and are skipped).
        at = text.find(labels.tobytes())
        if at < 0 or at % flat_tokens.itemsize:
            continue
        start = at // flat_tokens.itemsize
        assert sample["segments"].tolist() == flat_types[start:start + len(labels)].tolist()
        found += 1
    assert found >= 30


def test_lm_stage_blends_trajectories_with_text_and_weights_segments(trajectories, tmp_path,
                                                                     megatron_cpu):
    from megatron_foresight.config import load_recipe
    from megatron_foresight.errors import UsageError
    from megatron_foresight.training.data import collate
    from megatron_foresight.training.plugin import BuildContext, load_plugin
    from helpers.run import REPO

    preprocess([trajectories], tmp_path / "traj", "transcript", BYTE, progress=False)
    cfg = load_recipe(REPO / "recipes" / "tiny-cpu" / "lm.yaml", [
        "data.seq_length=64", "lm.builtin_docs=300", f"lm.sources=[{tmp_path / 'traj'},builtin]",
        "lm.weights=[0.7,0.3]", "lm.segment_weights={action: 1.0, observation: 0.5}"])
    plugin = load_plugin("lm")(cfg)

    def build():
        return plugin.build_data(BuildContext(
            cfg=cfg, stage_cfg=cfg.stage_config, tokenizer=ByteTokenizer(),
            num_train_samples=64, num_valid_samples=8, cache_dir=tmp_path / "cache"))

    data = build()
    batch = collate([data.train[i] for i in range(64)])
    kinds = set(batch["segments"].unique().tolist())
    assert {int(Seg.TEXT), int(Seg.PROMPT), int(Seg.ACTION), int(Seg.OBSERVATION)} <= kinds
    per_token = torch.rand(batch["labels"].shape)
    loss_sum, num_tokens, _ = plugin.loss(batch, per_token)
    expected = (batch["segments"] == int(Seg.ACTION)).float() + \
        0.5 * (batch["segments"] == int(Seg.OBSERVATION)).float()
    expected *= batch["loss_mask"]
    assert torch.isclose(loss_sum, (per_token * expected).sum())
    assert num_tokens == int((expected > 0).sum())

    meta = json.loads((tmp_path / "traj.json").read_text())
    meta["tokenizer"] = {"type": "hf", "path": "/elsewhere", "vocab_size": 32000}
    (tmp_path / "traj.json").write_text(json.dumps(meta))
    with pytest.raises(UsageError, match="was tokenized with"):
        build()


def test_document_masks_make_a_packed_document_see_only_itself(tmp_path, megatron_cpu):
    """With data.document_masks a sample that packs several documents carries Megatron's
    reset attention mask, and the real model then gives each document's tokens the logits it
    gives that document alone from position 0 (RoPE is relative); without the mask the second
    document's logits depend on the first."""
    from megatron_foresight.config import load_recipe
    from megatron_foresight.data.indexed import build_gpt_datasets
    from megatron_foresight.models.provider import build_model
    from helpers.run import REPO

    docs = ["".join(chr(97 + (i * 7 + j * 3) % 26) for j in range(20 + i % 9)) for i in range(40)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    preprocess([tmp_path / "c.jsonl"], tmp_path / "c", "text", BYTE, progress=False)
    build = lambda masks, cache: build_gpt_datasets(  # noqa: E731
        [str(tmp_path / "c")], None, seq_length=64, seed=1, split="100,0,0",
        num_samples=(4, 0), tokenizer=ByteTokenizer(), cache_dir=tmp_path / cache,
        documents=masks)[0]
    plain, masked = build(None, "plain"), build("mask", "masked")
    assert "attention_mask" not in plain[0]
    sample = masked[0]
    tokens, mask = sample["tokens"], sample["attention_mask"]
    assert mask.shape == (1, 64, 64) and mask.dtype == torch.bool
    eod = (tokens == ByteTokenizer().eod).nonzero().flatten().tolist()
    assert eod and eod[0] + 1 < 64, "the sample must pack a document boundary"
    start, end = eod[0] + 1, (eod[1] if len(eod) > 1 else 64)
    assert mask[0, start, :start].all() and not mask[0, start:end, start:end].tril().any()

    (model,) = build_model(load_recipe(REPO / "recipes" / "tiny-cpu" / "lm.yaml"), 384)
    model.eval()
    pos = torch.arange(64).unsqueeze(0)
    with torch.no_grad():
        alone = model(tokens[None, start:end], pos[:, :end - start], None)
        with_mask = model(tokens[None], pos, mask[None])
        without = model(tokens[None], pos, None)
    assert torch.allclose(with_mask[0, start:end], alone[0], atol=1e-4)
    assert not torch.allclose(without[0, start:end], alone[0], atol=1e-2)
    model.train()  # training attends document by document (the causal kernel per document)
    from megatron_foresight.models.attention import document_spans
    spans = document_spans(mask[None])
    assert spans is not None and spans[0][1][0] == start  # the second document, as packed
    with torch.no_grad():
        trained = model(tokens[None], pos, mask[None])
    assert torch.allclose(trained, with_mask, atol=1e-4)


def test_document_boundaries_of_a_packed_sample():
    """collate turns a sample's document starts into THD boundaries: a document after every
    EOD, the padding after the last one a document of its own, no empty document when the
    sample ends on an EOD; a microbatch of several samples becomes one row."""
    from megatron_foresight.training.data import HOST_KEYS, collate, packed_seq_params, to_device

    eod = 9
    def boundaries(tokens):
        starts = torch.ones(len(tokens), dtype=torch.bool)
        starts[1:] = torch.tensor(tokens[:-1]) == eod
        batch = collate([{"tokens": torch.tensor(tokens), "document_starts": starts}])
        assert "document_starts" not in batch and batch["cu_seqlens"].dtype == torch.int32
        return batch["cu_seqlens"].tolist(), int(batch["max_seqlen"])

    # max_seqlen: the longest document rounded up to 64, at most the sample
    assert boundaries([1, 2, eod, 3, eod, 4, 5, 6]) == ([0, 3, 5, 8], 8)
    assert boundaries([1, 2, eod, 3, 4, eod]) == ([0, 3, 6], 6)  # ends on an EOD
    assert boundaries([1, 2, 3, 4]) == ([0, 4], 4)
    assert boundaries([1, eod, 0, 0, 0, 0]) == ([0, 2, 6], 6)  # padding: its own document
    assert boundaries([1] * 69 + [eod] + [2] * 130) == ([0, 70, 200], 192)
    assert boundaries([1] * 129 + [eod] + [2] * 70) == ([0, 130, 200], 192)
    # a microbatch of two samples: one row, each sample's first token a document start
    rows = [torch.tensor([1, 2, eod, 3]), torch.tensor([4, eod, 5, 6])]
    batch = collate([{"tokens": r, "labels": r + 1, "document_starts": torch.tensor(
        [True, False, False, True] if i == 0 else [True, False, True, False])}
        for i, r in enumerate(rows)])
    assert batch["cu_seqlens"].tolist() == [0, 3, 4, 6, 8] and int(batch["max_seqlen"]) == 4
    assert batch["tokens"].tolist() == [[1, 2, eod, 3, 4, eod, 5, 6]]
    assert torch.equal(batch["labels"], batch["tokens"] + 1)
    with pytest.raises(ValueError, match="per-token entries only, got tokens"):
        collate([{"tokens": torch.zeros(4), "mask": torch.zeros(4, 4),
                  "document_starts": torch.ones(4, dtype=torch.bool)}])
    batch = to_device({"cu_seqlens": torch.tensor([0, 4]), "max_seqlen": torch.tensor(4)},
                      torch.device("meta"))
    assert HOST_KEYS == {"max_seqlen"}
    assert batch["cu_seqlens"].is_meta and not batch["max_seqlen"].is_meta
    params = packed_seq_params({"cu_seqlens": torch.tensor([0, 3, 8], dtype=torch.int32),
                                "max_seqlen": torch.tensor(64)})
    assert params.qkv_format == "thd" and params.cu_seqlens_q is params.cu_seqlens_kv
    assert params.cu_seqlens_q.dtype == torch.int32 and params.cu_seqlens_q.tolist() == [0, 3, 8]
    assert type(params.max_seqlen_q) is int and params.max_seqlen_q == params.max_seqlen_kv == 64
    assert params.cu_seqlens_q_padded is None and params.cu_seqlens_kv_padded is None
    assert packed_seq_params({"tokens": torch.zeros(1, 8)}) is None


@pytest.mark.parametrize("pack", [False, True])
def test_packed_sequences_give_the_document_masks_logits(tmp_path, megatron_cpu, pack,
                                                        monkeypatch):
    """data.document_masks on Transformer Engine: samples carry document starts instead of a
    mask, the loader makes them THD boundaries, and the training step passes Megatron's
    `PackedSeqParams` (no mask). The boundaries are those of Megatron's reset mask, sample by
    sample, and the real model through Megatron's THD path (batch squeezed, RoPE restarted
    per document, output reshaped; the SDPA attention standing in for TE's kernel, which
    needs a GPU) gives the masked path's logits and gradients."""
    from functools import partial

    from megatron_foresight.config import load_recipe
    from megatron_foresight.data.indexed import build_gpt_datasets
    from megatron_foresight.data.segmented import dataset_class
    from megatron_foresight.models.attention import document_spans
    from megatron_foresight.models.provider import build_model
    from megatron_foresight.training import loop
    from megatron_foresight.training.data import collate
    from helpers.run import REPO

    docs = [f"{'abcdefghij'[i % 10] * (3 + i % 17)}" for i in range(60)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    preprocess([tmp_path / "c.jsonl"], tmp_path / "c", "text", BYTE, progress=False)
    build = lambda documents: build_gpt_datasets(  # noqa: E731
        [str(tmp_path / "c")], None, seq_length=64, seed=1, split="100,0,0",
        num_samples=(6, 0), tokenizer=ByteTokenizer(), cache_dir=tmp_path / documents,
        dataset_cls=dataset_class(pack, False), documents=documents)[0]
    masked, packed = build("mask"), build("starts")
    for i in range(len(masked)):
        a, b = masked[i], packed[i]
        assert torch.equal(a["tokens"], b["tokens"]) and "attention_mask" not in b
        cu = collate([b])["cu_seqlens"].tolist()
        assert document_spans(a["attention_mask"][None])[0] == list(zip(cu[:-1], cu[1:]))
    # a microbatch of the two samples with the most documents: one packed row of 128 tokens
    most = sorted(range(len(packed)), key=lambda i: -int(packed[i]["document_starts"].sum()))[:2]
    batch = collate([packed[i] for i in most])
    mask = torch.stack([masked[i]["attention_mask"] for i in most])  # [2, 1, 64, 64]
    assert len(batch["cu_seqlens"]) > 5, "the samples must pack several documents"

    from megatron_foresight.models.attention import SDPADotProductAttention

    packed_calls = []
    original = SDPADotProductAttention._packed
    monkeypatch.setattr(SDPADotProductAttention, "_packed", lambda self, q, *a: (
        packed_calls.append(q.shape), original(self, q, *a))[1])
    cfg = load_recipe(REPO / "recipes" / "tiny-cpu" / "lm.yaml")
    (model,) = build_model(cfg, 384)
    model.train()

    class Plugin:
        def loss(self, batch, output):
            return output

    outputs = []
    rows = {k: v.view(2, 64) for k, v in batch.items() if k not in ("cu_seqlens", "max_seqlen")}
    for b in (batch, {**rows, "attention_mask": mask}):
        model.zero_grad()
        per_token, loss = loop._forward_step(Plugin(), False, iter([b]), model)
        assert isinstance(loss, partial)
        loss.func(*loss.args, per_token).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        outputs.append((per_token.detach(), grads))
    (thd, thd_grads), (masked_loss, masked_grads) = outputs
    heads, d = cfg.model.num_attention_heads, cfg.model.hidden_size // cfg.model.num_attention_heads
    assert packed_calls == [(128, heads, d)] * cfg.model.num_layers  # THD: batch squeezed
    assert thd.shape == (1, 128) and torch.allclose(thd, masked_loss.view(1, 128), atol=1e-5)
    assert thd_grads.keys() == masked_grads.keys() and len(thd_grads) > 10
    assert all(torch.allclose(thd_grads[n], masked_grads[n], atol=1e-5) for n in thd_grads)
    # evaluation's branch (the gathered logits, for the predictions) passes them too
    with torch.no_grad():
        logits = [loop._forward_step(Plugin(), True, iter([b]), model)[0] for b in (
            batch, {**rows, "attention_mask": mask})]
    assert len(packed_calls) == 2 * cfg.model.num_layers
    assert torch.allclose(logits[0], logits[1].view(1, 128, -1), atol=1e-4)
    # without the boundaries the same tokens give other losses: the test can tell
    causal, _ = loop._forward_step(Plugin(), False, iter([rows]), model)
    assert not torch.allclose(causal.detach().view(1, 128), thd, atol=1e-3)


def test_fe_sft_samples_give_no_loss_to_a_trajectory_cut_at_their_start(trajectories, tmp_path,
                                                                         megatron_cpu):
    """A sample is a window of the document stream; the part of a trajectory whose beginning
    lies in an earlier window is learnt without its task. With `mask_cut_documents` (FE-SFT's
    default) exactly that part gets no loss: the labels up to and including the first
    end-of-document, where the tokens before it are the end of a document and not a whole
    one; the rest of the loss mask is the plain dataset's."""
    from megatron_foresight.config import load_recipe
    from megatron_foresight.data.indexed import build_gpt_datasets
    from megatron_foresight.data.segmented import CutStartMaskedGPTDataset, SegmentedGPTDataset
    from helpers.run import REPO

    assert load_recipe(REPO / "recipes/tiny-cpu/fe_sft.yaml").stage_config.mask_cut_documents
    assert not load_recipe(REPO / "recipes/tiny-cpu/wm_amt.yaml").stage_config.mask_cut_documents
    preprocess([trajectories], tmp_path / "t", "transcript", BYTE, progress=False)
    tokens, _ = _read(tmp_path / "t")
    docs = [tokens[i].tobytes() for i in range(len(tokens))]
    eod = ByteTokenizer().eod

    def build(cls):
        return build_gpt_datasets(
            [str(tmp_path / "t")], None, seq_length=256, seed=1, split="100,0,0",
            num_samples=(120, 0), tokenizer=ByteTokenizer(), cache_dir=tmp_path / "cache",
            dataset_cls=cls)[0]

    plain, masked = build(SegmentedGPTDataset), build(CutStartMaskedGPTDataset)
    cut = whole = 0
    for i in range(len(plain)):
        a, b = plain[i], masked[i]
        assert torch.equal(a["tokens"], b["tokens"])
        zeroed = ((a["loss_mask"] > 0) & (b["loss_mask"] == 0)).nonzero().flatten().tolist()
        assert torch.all(b["loss_mask"] <= a["loss_mask"])
        sample = torch.cat([a["tokens"][:1], a["labels"]]).numpy().astype(tokens[0].dtype)
        ends = np.flatnonzero(sample == eod)
        if not len(ends):  # the whole window lies inside one document: cut, or its beginning
            assert b["loss_mask"].sum() == 0 or any(d.startswith(sample.tobytes()) for d in docs)
            continue
        head = sample[:ends[0] + 1].tobytes()
        if zeroed:
            assert zeroed == list(range(ends[0])), (i, zeroed[:3], zeroed[-3:], ends[0])
            assert any(d.endswith(head) and len(d) > len(head) for d in docs)
            cut += 1
        else:  # began at a document's first token, or at the end-of-document before it
            assert ends[0] == 0 or any(d == head for d in docs), i
            whole += 1
    assert cut >= 60, (cut, whole)  # byte-level windows almost never begin a document


def test_packing_places_every_document_once_and_whole_unless_longer_than_a_sample():
    """`pack_documents` + `end_packing` read through Megatron's own sample query: every token of
    every document lies in exactly one sample, in order; a document no longer than a sample is
    in one sample; a sample is its documents, the next sample's first token as its last label
    (none after the last sample), then padding; the padding returned is the padding read."""
    import random
    from types import SimpleNamespace

    from megatron.core.datasets.gpt_dataset import GPTDataset

    from megatron_foresight.data.segmented import end_packing, pack_documents

    class Documents:  # token = document * 10**6 + position, so every token says where it is
        def __init__(self, lengths):
            self.lengths = lengths

        def get(self, doc, offset=0, length=None):
            end = self.lengths[doc] if length is None else int(offset) + int(length)
            assert 0 <= offset <= end <= self.lengths[doc], (doc, offset, length)
            return np.arange(int(offset), end) + doc * 10**6

    rng = random.Random(5)
    for case in range(300):
        seq = rng.choice([4, 7, 16, 32])
        lengths = [rng.choice([rng.randint(1, seq), rng.randint(1, 3 * seq), seq, 2 * seq,
                               seq + 1, 2 * seq + 1]) for _ in range(rng.randint(1, 30))]
        documents = np.array(rng.sample(range(len(lengths)), len(lengths)))
        order, starts, padding = pack_documents(np.array(lengths), documents, seq,
                                                window=rng.choice([1, 3, 64]))
        assert sorted(order) == sorted(documents.tolist())
        end_packing(order, starts, lengths)
        view = SimpleNamespace(shuffle_index=np.arange(len(starts) - 1),
                               sample_index=np.array(starts), document_index=np.array(order),
                               dataset=Documents(lengths), _pad_token_id=-1, config=SimpleNamespace(
                                   sequence_length=seq, add_extra_token_to_sequence=True))
        samples = [GPTDataset._query_document_sample_shuffle_indices(view, i)[0]
                   for i in range(len(starts) - 1)]
        read, pads = [], 0
        for i, text in enumerate(samples):
            real = text[text >= 0]
            assert len(text) == seq + 1 and (text[len(real):] == -1).all(), case
            content = real[:-1] if i + 1 < len(samples) else real
            if i + 1 < len(samples):
                assert real[-1] == samples[i + 1][0], case  # the next sample's first token
            assert len(content) <= seq, case
            pads += seq - len(content)
            read += content.tolist()
            for doc in set(content // 10**6):
                if lengths[doc] <= seq:
                    assert (content[content // 10**6 == doc] % 10**6).tolist() == \
                        list(range(lengths[doc])), case
        assert sorted(read) == sorted(d * 10**6 + p for d in documents
                                      for p in range(lengths[d])), case
        assert len(read) == len(set(read)) and pads == padding, case


def test_packed_samples_hold_whole_trajectories_and_keep_the_loss_that_cutting_masks(
        trajectories, tmp_path, megatron_cpu):
    """`pack_documents`: each sample is whole documents (trajectories) and then padding with no
    loss, or a part of a document longer than a sample (its later parts without loss); every
    document of the first epoch is used in order, and the samples keep more loss tokens than
    cut-and-masked samples of the same length (the point of packing)."""
    from megatron_foresight.config import load_recipe
    from megatron_foresight.data.indexed import build_gpt_datasets
    from megatron_foresight.data.segmented import (
        CutStartMaskedGPTDataset, PackedCutStartMaskedGPTDataset, dataset_class,
    )
    from helpers.run import REPO

    assert dataset_class(True, True) is PackedCutStartMaskedGPTDataset
    assert load_recipe(REPO / "recipes/tiny-cpu/fe_sft.yaml").stage_config.pack_documents
    assert not load_recipe(REPO / "recipes/tiny-cpu/wm_amt.yaml").stage_config.pack_documents
    preprocess([trajectories], tmp_path / "t", "transcript", BYTE, progress=False)
    tokens, _ = _read(tmp_path / "t")
    docs = {tokens[i].tobytes() for i in range(len(tokens))}
    lengths = sorted(len(tokens[i]) for i in range(len(tokens)))
    seq = 2048  # most trajectories fit, a few do not (byte tokens)
    assert lengths[len(lengths) // 2] < seq // 2 and lengths[-1] > seq, lengths[::10]
    eod = ByteTokenizer().eod

    def build(cls, n):
        return build_gpt_datasets(
            [str(tmp_path / "t")], None, seq_length=seq, seed=1, split="100,0,0",
            num_samples=(n, 0), tokenizer=ByteTokenizer(), cache_dir=tmp_path / "cache",
            dataset_cls=cls)[0]

    packed, cut = build(PackedCutStartMaskedGPTDataset, 60), build(CutStartMaskedGPTDataset, 60)
    assert len(packed) >= 60
    whole_docs = parts = 0
    for i in range(60):
        item = packed[i]
        sample = torch.cat([item["tokens"][:1], item["labels"]]).numpy().astype(tokens[0].dtype)
        mask = item["loss_mask"].numpy()
        ends = np.flatnonzero(sample == eod)
        if mask[:1].sum() == 0 and len(ends) and mask[:ends[0]].sum() == 0 \
                and sample[:ends[0] + 1].tobytes() not in docs:
            start = ends[0] + 1  # the last part of a long document, without loss
            parts += 1
        elif not len(ends) or ends[-1] == seq:  # a part of a long document, all of the sample
            assert any(d.startswith(sample[:seq].tobytes()) for d in docs), i
            parts += 1
            continue
        else:
            start = 0
        for a, b in zip([start - 1, *ends[:-1]], ends):  # whole documents up to the last EOD
            if b >= start:
                assert sample[a + 1:b + 1].tobytes() in docs, (i, a, b)
                whole_docs += 1
        # loss on every label of the documents (then the next sample's first token, none after
        # the last sample), and none on padding
        assert mask[start:ends[-1]].all() and mask[ends[-1] + 1:].sum() == 0, i
    assert whole_docs >= 60 and parts >= 1, (whole_docs, parts)
    short = {tokens[i].tobytes() for i in range(len(tokens)) if len(tokens[i]) <= seq}
    seen, repeated = set(), False  # epochs follow each other: all documents before any twice
    for i in range(len(packed)):
        item = packed[i]
        sample = torch.cat([item["tokens"][:1], item["labels"]]).numpy().astype(tokens[0].dtype)
        ends = np.flatnonzero(sample == eod)
        for a, b in zip([-1, *ends[:-1]], ends):
            doc = sample[a + 1:b + 1].tobytes()
            if doc in docs:
                repeated |= doc in seen
                assert not repeated or len(seen) == len(short), (i, len(seen), len(short))
                seen.add(doc)
    assert repeated and seen == short
    loss = lambda ds: sum(float(ds[i]["loss_mask"].sum()) for i in range(60))  # noqa: E731
    assert loss(packed) > 1.1 * loss(cut), (loss(packed), loss(cut))  # 1.21 measured


def test_training_steps_on_packed_rows_match_the_masked_ones(tmp_path, megatron_cpu, monkeypatch):
    """`foresight train`'s loop with data.document_masks as Transformer Engine gets it (samples
    with document starts, one packed THD row a microbatch, the schedule told its shape), the
    SDPA attention standing in for TE's kernel: the same losses and gradient norms, step by
    step, as the loop with the local layers' masks."""
    from megatron_foresight.config import load_recipe
    from megatron_foresight.runtime.seed import seed_all
    from megatron_foresight.training import loop
    from helpers.run import REPO

    cfg = load_recipe(REPO / "recipes" / "tiny-cpu" / "lm.yaml", [
        "data.document_masks=true", "data.seq_length=128", "data.num_workers=0",
        "schedule.train_steps=3", "schedule.global_batch_size=4", "schedule.micro_batch_size=2",
        "schedule.warmup_steps=1", "schedule.eval_steps=0", "checkpoint.save_interval=0",
        "lm.builtin_docs=200",
        f"data.cache_dir={tmp_path / 'cache'}"])
    steps = {}
    for documents in ("mask", "starts"):
        monkeypatch.setattr(loop, "document_format", lambda cfg, d=documents: d)
        seed_all(cfg.seed)
        run = loop.build_run(cfg, megatron_cpu, tmp_path / documents)
        assert run.packed_rows == (documents == "starts")
        batch = next(loop._iterators(run, run.train_data, 0, 1))
        assert ("cu_seqlens" in batch) == (documents == "starts")
        assert batch["tokens"].shape == ((1, 256) if documents == "starts" else (2, 128))
        iterators = loop._iterators(run, run.train_data, 0, None)
        steps[documents] = [loop.train_step(run, iterators) for _ in range(3)]
    for masked, packed in zip(steps["mask"], steps["starts"]):
        assert packed["lm_loss"] == pytest.approx(masked["lm_loss"], rel=1e-4)
        assert packed["grad_norm"] == pytest.approx(masked["grad_norm"], rel=1e-3)
    assert steps["starts"][2]["lm_loss"] < steps["starts"][0]["lm_loss"]
