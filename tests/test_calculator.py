"""The <calc> calculator: exact values and their text, and refusals that say what and where,
made before anything huge is computed."""

import pickle
import time

import pytest

from megatron_foresight.envs.calculator import CalcError, evaluate


@pytest.mark.parametrize("expression, value", [
    ("3 * (2 + 5)", "21"), ("0.1 + 0.2", "0.3"), ("7/2", "3.5"), ("1/3", "0.333333333333"),
    ("2/3", "0.666666666667"), ("6/3", "2"), ("1/7", "0.142857142857"),
    ("2^3^2", "512"), ("2**10", "1024"), ("(2^3)^2", "64"), ("-2^2", "-4"), ("(-2)^2", "4"),
    ("2^-2", "0.25"), ("- -3", "3"), ("+5", "5"), ("10 // 3", "3"), ("-7 // 2", "-4"),
    ("-7 % 3", "2"), ("7.5 % 2", "1.5"), (".5 * 4", "2"), ("3.25 * 4", "13"), ("1.", "1"),
    ("1e3", "1000"), ("2.5e-3", "0.0025"),
    ("sqrt(16)", "4"), ("sqrt(2)", "1.41421356237"), ("sqrt(2)^2", "2"), ("sqrt(1/4)", "0.5"),
    ("8^(1/3)", "2"), ("2^0.5", "1.41421356237"), ("16^0.75", "8"),
    ("abs(-4.5)", "4.5"), ("min(3, 1, 2)", "1"), ("max(3, 1, 2)", "3"),
    ("round(2.567, 2)", "2.57"), ("round(2.5)", "3"), ("round(-2.5)", "-3"),
    ("round(1234, -2)", "1200"), ("floor(7/2) + ceil(7/2)", "7"), ("floor(-3.5)", "-4"),
    ("3 × 4 ÷ 2 − 1", "5"), ("0^0", "1"),
    ("100000000000/3", "33333333333.3"), ("1/30000", "3.33333333333e-05"),
    ("2^-1000", "9.33263618503e-302"), ("sqrt(10^999)", "3.16227766017e+499"),
    ("10^1000", "1" + "0" * 1000), ("-10^1000", "-1" + "0" * 1000),
])
def test_values(expression, value):
    assert evaluate(expression) == value


@pytest.mark.parametrize("expression, offset, words", [
    ("x + 1", 0, "names are not allowed ('x')"),
    ("1 + x", 4, "names are not allowed ('x')"),
    ("__import__", 0, "names are not allowed ('__import__')"),
    ("__import__('os').system('ls')", 11, "strings are not arithmetic"),
    ("open(1)", 0, "names are not allowed ('open')"),
    ("(1).real", 3, "attribute access"),
    ("().__class__", 2, "attribute access"),
    ("[1][0]", 0, "subscripts"),
    ("[x for x in (1, 2)]", 0, "subscripts and lists"),
    ("lambda: 1", 6, "unexpected character ':'"),
    ("max(1, key=2)", 10, "keyword arguments"),
    ("1 == 1", 2, "comparisons"),
    ("", 0, "empty expression"),
    ("   ", 0, "empty expression"),
    ("1/0", 1, "division by zero"),
    ("5 // (2 - 2)", 2, "division by zero"),
    ("5 % 0", 2, "division by zero"),
    ("0^-1", 1, "division by zero"),
    ("9^9^9", 1, "exponent 387420489 is too large"),
    ("9**9**9", 1, "exponent 387420489 is too large"),
    ("10**100000", 2, "exponent 100000 is too large"),
    ("11^999", 2, "more than 1000 digits"),
    ("((1/3)^1000)^1000", 12, "more than 1000 digits"),
    ("10^1000 + 1", 8, "larger than 10^1000"),
    ("1e1001", 0, "exponent 1001 is too large"),
    ("2 **", 4, "expected a number"),
    ("(1 + 2", 6, "expected ')'"),
    ("1 + 2)", 5, "unmatched ')'"),
    ("sqrt(-1)", 0, "negative"),
    ("(-8)^(1/3)", 4, "not real"),
    ("sqrt(1, 2)", 0, "sqrt takes 1 argument, got 2"),
    ("round(1, 2, 3)", 0, "round takes 1 or 2 arguments, got 3"),
    ("max()", 4, "expected a number"),
    ("round(2.5, 0.5)", 0, "whole number"),
    ("1,000", 1, "thousands separators"),
    ("2(3)", 1, "write 2*(3)"),
    ("2 3", 2, "missing operator"),
    ("(" * 51 + "1" + ")" * 51, 50, "nested deeper than 50"),
    ("abs(" * 51 + "1" + ")" * 51, 200, "nested deeper than 50"),
    ("1" * 501, 500, "longer than 500"),
])
def test_refusals_say_what_and_where(expression, offset, words):
    start = time.perf_counter()
    with pytest.raises(CalcError) as error:
        evaluate(expression)
    assert words in error.value.message
    assert error.value.offset == offset
    assert str(error.value) == f"at offset {offset}: {error.value.message}"
    assert time.perf_counter() - start < 0.5  # refused before computing anything huge


def test_a_refused_name_says_what_is_allowed():
    with pytest.raises(CalcError) as error:
        evaluate("2 * pi")
    assert str(error.value).startswith("at offset 4: names are not allowed ('pi'); use numbers")
    assert "sqrt, abs, round, min, max, floor, ceil" in error.value.message


def test_limits_are_inclusive():
    assert evaluate("(" * 50 + "1" + ")" * 50) == "1"
    assert evaluate("1" * 500) == "1" * 500
    assert evaluate("2^1000") == str(2 ** 1000)
    assert evaluate("-" * 499 + "1") == "-1"  # signs are not nesting


def test_error_survives_pickling():
    # multiprocessing pickles exceptions to send them between processes.
    error = pickle.loads(pickle.dumps(CalcError("division by zero", 3)))
    assert (error.message, error.offset, str(error)) == (
        "division by zero", 3, "at offset 3: division by zero")
