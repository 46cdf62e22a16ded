"""Importing reasoning-gym's generators as math tasks: deterministic files in the task schema,
answers the verifier accepts, atomic writes and a helpful error for an unknown name."""

import json

import pytest

from megatron_foresight.data.reasoning_gym_import import MATH_DATASETS, import_reasoning_gym
from megatron_foresight.data.task_files import read_tasks
from megatron_foresight.envs.verify import answers_match
from megatron_foresight.errors import UsageError


def test_same_seed_same_bytes_in_the_task_schema(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert import_reasoning_gym("gsm_symbolic", 5, 3, a, progress=False) == 5
    assert import_reasoning_gym("gsm_symbolic", 5, 3, b, progress=False) == 5
    assert a.read_bytes() == b.read_bytes()
    lines = a.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5
    for i, line in enumerate(lines):
        task = json.loads(line)
        assert list(task) == ["id", "type", "question", "answers", "meta"]
        assert task["id"] == f"rg-gsm_symbolic-3-{i}"
        assert task["type"] == "math"
        assert isinstance(task["question"], str) and task["question"].strip()
        assert len(task["answers"]) == 1 and isinstance(task["answers"][0], str)
        assert task["meta"] == {"source": "reasoning-gym", "dataset": "gsm_symbolic", "seed": 3}
        assert answers_match(task["answers"][0], task["answers"][0])
    assert [t.id for t in read_tasks(a)] == [f"rg-gsm_symbolic-3-{i}" for i in range(5)]
    assert sorted(tmp_path.iterdir()) == [a, b]  # no temporary file left behind


def test_another_seed_gives_other_tasks(tmp_path):
    import_reasoning_gym("gsm_symbolic", 5, 3, tmp_path / "a.jsonl", progress=False)
    import_reasoning_gym("gsm_symbolic", 5, 4, tmp_path / "b.jsonl", progress=False)
    questions = [[json.loads(line)["question"] for line in (tmp_path / name).open()]
                 for name in ("a.jsonl", "b.jsonl")]
    assert questions[0] != questions[1]


@pytest.mark.parametrize("name", MATH_DATASETS)
def test_math_datasets_have_answers_the_verifier_judges(tmp_path, name):
    out = tmp_path / f"{name}.jsonl"
    assert import_reasoning_gym(name, 5, 3, out, progress=False) == 5
    for task in read_tasks(out):
        answer = task.answers[0]
        assert answers_match(answer, answer)
        # Judged, not waved through: the answer with a digit appended is wrong.
        assert not answers_match(answer + "7", answer)


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import reasoning_gym

    def broken(name, size, seed):
        class Dataset:
            def __getitem__(self, i):
                if i == 2:
                    raise RuntimeError("generator failed")
                return {"question": "q", "answer": "1", "metadata": {}}
        return Dataset()

    monkeypatch.setattr(reasoning_gym, "create_dataset", broken)
    with pytest.raises(RuntimeError, match="generator failed"):
        import_reasoning_gym("gsm_symbolic", 5, 0, tmp_path / "t.jsonl", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_name_is_a_usage_error_that_helps(tmp_path):
    with pytest.raises(UsageError) as error:
        import_reasoning_gym("gsm_symbolc", 1, 0, tmp_path / "x.jsonl", progress=False)
    message = str(error.value)
    assert "no generator 'gsm_symbolc'" in message
    assert "did you mean gsm_symbolic" in message
    assert "basic_arithmetic" in message and "from reasoning_gym.factory import DATASETS" in message
    assert not (tmp_path / "x.jsonl").exists()


def test_at_least_one_task(tmp_path):
    with pytest.raises(UsageError, match="at least 1"):
        import_reasoning_gym("gsm_symbolic", 0, 0, tmp_path / "x.jsonl", progress=False)
