"""The calculator, answer verification, QA scoring and reasoning-gym import."""

import json
import threading
import time

import pytest

from megatron_foresight.envs.calculator import CalcError, evaluate
from megatron_foresight.envs.qa_metrics import exact_match, normalize_answer, token_f1
from megatron_foresight.envs.verify import answers_match


@pytest.mark.parametrize("expression, value", [
    ("3 * (2 + 5)", "21"), ("0.1 + 0.2", "0.3"), ("7/2", "3.5"), ("1/3", "0.333333333333"),
    ("6/3", "2"), ("2^3^2", "512"), ("2**10", "1024"), ("-2^2", "-4"), ("10 // 3", "3"),
    ("-7 % 3", "2"), ("sqrt(16)", "4"), ("sqrt(2)", "1.41421356237"), ("abs(-4.5)", "4.5"),
    ("min(3, 1, 2)", "1"), ("max(3, 1, 2)", "3"), ("round(2.567, 2)", "2.57"),
    ("floor(7/2) + ceil(7/2)", "7"), ("3 × 4 ÷ 2 − 1", "5"), ("1e3", "1000"), (".5*4", "2"),
    ("2^-2", "0.25"),
])
def test_calculator_values(expression, value):
    assert evaluate(expression) == value


@pytest.mark.parametrize("expression, offset, words", [
    ("x + 1", 0, "names are not allowed ('x')"),
    ("__import__('os').system('ls')", 11, "strings are not arithmetic"),
    ("(1).real", 3, "attribute access"),
    ("().__class__", 2, "attribute access"),
    ("[1][0]", 0, "subscripts"),
    ("open(1)", 0, "names are not allowed ('open')"),
    ("lambda: 1", 6, "unexpected character ':'"),
    ("1 == 1", 2, "comparisons"),
    ("", 0, "empty expression"),
    ("1/0", 1, "division by zero"),
    ("9^9^9", 1, "exponent 387420489 is too large"),
    ("10**100000", 2, "too large"),
    ("11^999", 2, "more than 1000 digits"),
    ("2 **", 4, "expected a number"),
    ("sqrt(-1)", 0, "negative"),
    ("1,000", 1, "thousands separators"),
    ("(" * 60 + "1" + ")" * 60, 50, "nested deeper than 50"),
    ("1" * 501, 500, "longer than 500"),
])
def test_calculator_refuses_what_is_not_arithmetic(expression, offset, words):
    start = time.perf_counter()
    with pytest.raises(CalcError) as error:
        evaluate(expression)
    assert words in error.value.message and error.value.offset == offset
    assert time.perf_counter() - start < 1.0  # refused before computing anything huge


@pytest.mark.parametrize("predicted, reference", [
    ("0.5", "1/2"), ("\\frac{1}{2}", "0.5"), ("$\\frac{1}{2}$", "1/2"), ("\\dfrac{1}{2}", "0.5"),
    ("72", "72.0"), ("72.", "72"), ("1,000", "1000"), ("\\boxed{12}", "12"),
    ("(x+1)^2", "x^2+2x+1"), ("2\\sqrt{2}", "\\sqrt{8}"),
])
def test_equivalent_answers_match(predicted, reference):
    assert answers_match(predicted, reference)


@pytest.mark.parametrize("predicted, reference", [
    ("1/3", "0.33"), ("2", "3"), ("garbage text", "5"), ("", "1"), ("x+1", "x+2"),
])
def test_different_answers_do_not_match(predicted, reference):
    assert not answers_match(predicted, reference)


def test_verification_works_off_the_main_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append(
        (answers_match("\\frac{3}{4}", "0.75"), answers_match("(x+1)^2", "x^2+2x+2"))))
    thread.start()
    thread.join()
    assert results == [(True, False)]


def test_qa_metrics():
    assert normalize_answer("The  Red, House!") == "red house"
    assert exact_match("the red house", ["Red House"]) == 1.0
    assert exact_match("red", ["Red House", "blue"]) == 0.0
    # "red house" vs "red house on hill": 2 common, precision 1, recall 2/4 -> F1 2/3
    assert token_f1("the red house", ["red house on the hill"]) == pytest.approx(2 / 3)
    assert token_f1("green", ["red house"]) == 0.0
    assert token_f1("x", ["nope", "x"]) == 1.0


def test_reasoning_gym_import_is_deterministic_and_verifiable(tmp_path):
    from megatron_foresight.data.reasoning_gym_import import MATH_DATASETS, import_reasoning_gym
    from megatron_foresight.data.tasks import read_tasks
    from megatron_foresight.errors import UsageError

    for name in MATH_DATASETS:
        a, b = tmp_path / f"{name}-a.jsonl", tmp_path / f"{name}-b.jsonl"
        assert import_reasoning_gym(name, 5, 3, a, progress=False) == 5
        import_reasoning_gym(name, 5, 3, b, progress=False)
        assert a.read_bytes() == b.read_bytes()
        tasks = list(read_tasks(a))
        assert [t.id for t in tasks] == [f"rg-{name}-3-{i}" for i in range(5)]
        first = json.loads(a.read_text().splitlines()[0])
        assert list(first) == ["id", "type", "question", "answers", "meta"]
        for t in tasks:
            assert t.type == "math" and answers_match(t.answers[0], t.answers[0])
    with pytest.raises(UsageError, match="no generator 'nope'"):
        import_reasoning_gym("nope", 1, 0, tmp_path / "x.jsonl", progress=False)
