"""Data: which samples each rank reads, user corpora and their errors, the indexed-dataset cache."""

import json

import pytest
import torch

from megatron_foresight.data.indexed import (
    DataFileError, cached_indexed_dataset, read_text_documents,
)
from megatron_foresight.world.synthetic import synthetic_documents
from megatron_foresight.data.tokenizer import ByteTokenizer
from megatron_foresight.training.data import StepSampler, collate


def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_each_step_reads_one_global_batch_split_over_data_parallel_ranks(dp):
    g, m = 16, 2
    micro = g // (m * dp)
    for step in (0, 3):
        seen = []
        for rank in range(dp):
            for idx in _take(StepSampler(1000, g, m, rank, dp, start_step=step), micro):
                assert len(idx) == m
                seen += idx
        assert sorted(seen) == list(range(step * g, (step + 1) * g))


def test_resuming_at_a_step_continues_the_same_sequence():
    full = _take(StepSampler(1000, 8, 2, 0, 1), 12)
    resumed = _take(StepSampler(1000, 8, 2, 0, 1, start_step=2), 4)
    assert resumed == full[8:12]


def test_sampler_wraps_and_refuses_a_dataset_smaller_than_a_batch():
    assert _take(StepSampler(10, 8, 4, 0, 1, start_step=1), 1) == [[8, 9, 0, 1]]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepSampler(4, 8, 2, 0, 1)
    assert len(StepSampler(100, 8, 2, 0, 2, num_steps=3)) == 6


def test_collate_stacks_fields():
    batch = collate([{"tokens": torch.arange(3), "x": None}, {"tokens": torch.arange(3)}])
    assert batch["tokens"].shape == (2, 3) and "x" not in batch


def test_bad_corpus_lines_are_reported_with_file_line_and_field(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n\n" + '{"text": 3}\n')
    with pytest.raises(DataFileError, match=r"corpus.jsonl:3: field 'text': must be a string"):
        list(read_text_documents(path))
    path.write_text('{"txt": "x"}\n')
    with pytest.raises(DataFileError, match=r"corpus.jsonl:1: field 'text': missing"):
        list(read_text_documents(path))
    path.write_text('{"text": "x"\n')
    with pytest.raises(DataFileError, match=r"corpus.jsonl:1: not valid JSON"):
        list(read_text_documents(path))
    txt = tmp_path / "c.txt"
    txt.write_text("one\n\ntwo\n")
    assert list(read_text_documents(txt)) == ["one", "two"]


def test_indexed_dataset_round_trips_and_is_cached(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = ByteTokenizer()
    docs = ["héllo world", "second doc"]
    calls = []

    def source():
        calls.append(1)
        return iter(docs)

    prefix = cached_indexed_dataset({"k": 1}, source, tok, tmp_path, "t")
    again = cached_indexed_dataset({"k": 1}, source, tok, tmp_path, "t")
    assert prefix == again and len(calls) == 1
    ds = IndexedDataset(prefix)
    assert len(ds) == 2
    assert tok.decode(ds[0].tolist()) == "héllo world" and ds[0][-1] == tok.eod
    assert not list(tmp_path.glob("*.tmp*"))


def test_synthetic_corpus_is_deterministic_and_varied():
    a = list(synthetic_documents(1, 50))
    assert a == list(synthetic_documents(1, 50))
    assert a != list(synthetic_documents(2, 50))
    assert len(set(a)) == 50 and all(" = " in d for d in a)
