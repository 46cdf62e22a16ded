"""Answer checking: math answers (exact numbers, then math-verify for LaTeX and expressions) and
the open-domain QA metrics."""

import threading
import time

import pytest

from megatron_foresight.answers import exact_match, normalize_answer, token_f1
from megatron_foresight.answers import extract_boxed
from megatron_foresight.envs.verify import answers_match, numbers_match

HALF = ["1/2", "0.5", "\\frac{1}{2}", "$\\frac{1}{2}$", "\\dfrac{1}{2}", "$\\dfrac12$",
        "\\boxed{\\frac{1}{2}}", ".5"]


@pytest.mark.parametrize("predicted", HALF)
@pytest.mark.parametrize("reference", HALF)
def test_every_way_of_writing_a_half_matches_every_other(predicted, reference):
    assert answers_match(predicted, reference)


@pytest.mark.parametrize("predicted, reference", [
    ("72", "72.0"), ("72.", "72"), ("72", "72.00"), ("1,000", "1000"), ("1000", "1,000"),
    ("-1,234,567", "-1234567"), ("$72", "72"), ("\\$72", "72"), ("1{,}000", "1000"),
    ("\\boxed{12}", "12"), ("−3", "-3"), ("+3", "3"), ("1e3", "1000"), ("2/4", "1/2"),
    ("0.333333333333", "1/3"),  # the calculator's 1/3, against an exact reference
    ("1/3", "0.333333"), ("0.666667", "\\frac{2}{3}"),
    ("(x+1)^2", "x^2+2x+1"), ("x^2+2x+1", "(x+1)^2"), ("$x^2 + 2x + 1$", "(x+1)^{2}"),
    ("2\\sqrt{2}", "\\sqrt{8}"), ("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2"),
    ("\\{1, 2\\}", "\\{2, 1\\}"), ("x = 3", "3"), ("The answer is \\boxed{5}.", "5"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
])
def test_equal_answers_match(predicted, reference):
    assert answers_match(predicted, reference)


@pytest.mark.parametrize("predicted, reference", [
    ("1/3", "0.33"), ("0.33", "1/3"), ("0.333", "\\frac{1}{3}"), ("0.666666", "2/3"),
    ("2", "3"), ("2.5", "2.54"), ("1234567.5", "1234567.54"), ("72", "720"), ("1,00", "100"),
    ("-3", "3"), ("x+1", "x+2"), ("(x+1)^2", "x^2+2x+2"), ("(1,2)", "[1,2]"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\3\\end{pmatrix}"),
    ("garbage text", "5"), ("", "1"), ("5", ""), ("}{\\frac{", "1"), ("\\boxed{", "1"),
    ("1" * 2000, "1" * 2000),
])
def test_different_answers_do_not_match(predicted, reference):
    assert not answers_match(predicted, reference)


@pytest.mark.parametrize("huge", [
    "9^9^9", "$9^{9^{9}}$", "\\boxed{10^{10^{10}}}", "2**2**2**2**2**2", "\\boxed{1000000!}",
    "(x+1)^{100000}", "\\binom{10^{9}}{5 \\cdot 10^{8}}",
])
def test_answers_sympy_would_compute_forever_are_wrong_at_once(huge):
    start = time.perf_counter()
    assert not answers_match(huge, "5")
    assert not answers_match("5", huge)
    assert time.perf_counter() - start < 2.0


def test_verification_works_off_the_main_thread():
    # math-verify's default timeouts use signal.alarm, which raises outside the main thread.
    results = []

    def check():
        results.append([answers_match("\\frac{3}{4}", "0.75"),
                        answers_match("(x+1)^2", "x^2+2x+1"),
                        answers_match("(x+1)^2", "x^2+2x+2"),
                        answers_match("$9^{9^{9}}$", "1")])

    thread = threading.Thread(target=check)
    thread.start()
    thread.join(timeout=30)
    assert results == [[True, True, False, False]]


@pytest.mark.parametrize("text, boxed", [
    ("so \\boxed{12}.", "12"),
    ("first \\boxed{1}, then \\boxed{\\frac{2}{3}} at last", "\\frac{2}{3}"),
    ("\\boxed{\\boxed{1} + 2}", "\\boxed{1} + 2"),  # the outer box closes last
    ("\\boxed{x^{2}+\\sqrt{y}}", "x^{2}+\\sqrt{y}"),
    ("\\boxed { 7 }", "7"),
    ("\\boxed{1} and \\boxed{2", "1"),  # an unclosed box is no box
    ("\\boxed{", None),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are not the box's
    ("cut off: \\boxed{\\frac{1}{2}", None),
    ("no box here", None),
])
def test_extract_boxed(text, boxed):
    assert extract_boxed(text) == boxed


def test_normalize_answer():
    assert normalize_answer("The  Red, House!") == "red house"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("Theatre") == "theatre"  # articles are whole words only
    assert normalize_answer("U.S.") == "us"
    assert normalize_answer("  ") == ""


def test_exact_match():
    assert exact_match("the red house", ["Red House"]) == 1.0
    assert exact_match("red", ["Red House", "blue"]) == 0.0
    assert exact_match("Blue.", ["Red House", "blue"]) == 1.0
    assert exact_match("anything", []) == 0.0


def test_token_f1():
    # "red house" against "red house on hill": 2 common tokens, precision 2/2, recall 2/4.
    assert token_f1("the red house", ["red house on the hill"]) == pytest.approx(2 / 3)
    # "red red house" against "red house house": common red x1, house x1 -> P = R = 2/3.
    assert token_f1("red red house", ["red house house"]) == pytest.approx(2 / 3)
    # The best gold counts: 1/2 against "paris", 1.0 against "paris france".
    assert token_f1("Paris, France", ["Paris", "paris france"]) == 1.0
    assert token_f1("Paris, France", ["Paris"]) == pytest.approx(2 / 3)
    assert token_f1("green", ["red house"]) == 0.0
    assert token_f1("the", ["a"]) == 1.0  # both empty after normalization
    assert token_f1("the", ["red"]) == 0.0
    assert token_f1("red", []) == 0.0


@pytest.mark.parametrize("predicted, reference, same", [
    ("15 balls", "15", True), ("9 apples", "9", True), ("15 balls.", "15", True),
    ("15 dollars", "15", True), ("12 cm^2", "12", True), ("5 km/h", "5", True),
    ("1,000 people", "1000", True), ("0.5 liters", "1/2", True), ("15", "15 balls", True),
    ("15 balls", "16", False), ("2 pi", "2", False), ("3x", "3", False),
    ("3 sqrt 2", "3", False),
])
def test_units_after_a_number_are_read_one_way(predicted, reference, same):
    """A unit after the number is dropped whatever the word ("15 balls" used to be read by
    math-verify as a product of symbols while "9 apples" was not); mathematics is not."""
    assert answers_match(predicted, reference) is same
    assert numbers_match(predicted, reference) is (same and "pi" not in predicted)
