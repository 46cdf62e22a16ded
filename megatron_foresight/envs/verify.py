"""Checking a final answer against a reference, mathematically. Plain numbers (most answers) are
compared as exact rationals without sympy; anything else (LaTeX, expressions, sets) goes to
Hugging Face's math-verify. Answers come from a policy being trained, so nothing here raises and
nothing may run for long: expressions that would take sympy minutes are judged wrong up front."""

from __future__ import annotations

import logging
import re
from fractions import Fraction
from typing import NamedTuple

from megatron_foresight.answers import last_box

MAX_ANSWER_CHARS = 1000
ROUNDED_DIGITS = 6  # fewest significant digits for a decimal to stand for a fraction (0.333333)
MAX_DIGITS = 100_000  # of a number sympy would compute exactly (9^{9^9} has 370 million)
MAX_SYMBOLIC_EXPONENT = 64  # (x+1)^{1000} takes sympy seconds to expand
MAX_COMBINATORIAL = 1000  # argument of n!, binomial, ...

# A number followed by the words of a unit ("15 balls", "3 hours", "12 cm^2", "5 km/h"): the
# number is the answer. Words that are mathematics ("2 pi", "3 sqrt") are not a unit.
_UNIT_WORD = r"(?:[A-Za-z]{2,}(?:\^\d+)?|°[CF]?)"
_WITH_UNIT = re.compile(rf"(?P<number>\S*\d\.?)\s+(?P<unit>{_UNIT_WORD}"
                        r"(?:[\s/-]+(?:[A-Za-z]+(?:\^\d+)?))*)\.?")
_MATH_WORDS = frozenset({"pi", "inf", "infty", "infinity", "sqrt", "log", "ln", "sin", "cos",
                         "tan", "exp", "mod", "and", "or"})
_NUMBER = re.compile(r"(?P<sign>[+-]?)(?P<int>\d{1,3}(?:,\d{3})+|\d*)(?:\.(?P<frac>\d*))?"
                     r"(?:[eE](?P<exp>[+-]?\d{1,3}))?(?:/(?P<den>\d+))?")


class _Number(NamedTuple):
    value: Fraction
    places: int | None  # decimal places shown (1e-3: 3); None when not written as a decimal
    digits: int  # significant digits shown


def _plain_text(text: str) -> str:
    text = text.strip()
    box = last_box(text)
    if box is not None and box[0] == 0 and box[2] == len(text) - 1:
        text = text[box[1]:box[2]]
    text = text.strip().strip("$").strip().removeprefix("\\$")
    text = text.replace("{,}", ",").replace("−", "-")
    return text[:-1] if re.search(r"\d\.$", text) else text


def _without_unit(text: str) -> str:
    """`text` without the unit words after its number ("15 balls" -> "15"), or as it is."""
    m = _WITH_UNIT.fullmatch(text)
    if m is None or any(w.lower() in _MATH_WORDS for w in re.findall(r"[A-Za-z]+", m["unit"])):
        return text
    return m["number"]


def _plain_number(text: str) -> _Number | None:
    """The number `text` writes ("72", "-1,000", "$0.5", "72.", "1e-3", "3/4", "\\boxed{7}",
    "15 balls"), or None when it is not a plain number."""
    m = _NUMBER.fullmatch(_without_unit(_plain_text(text)))
    if m is None or not (m["int"] + (m["frac"] or "")):
        return None
    if m["den"] is not None and (m["frac"] is not None or m["exp"] is not None or
                                 int(m["den"]) == 0):
        return None
    whole, frac, exp = m["int"].replace(",", ""), m["frac"] or "", int(m["exp"] or 0)
    value = Fraction(int(whole or "0") * 10 ** len(frac) + int(frac or "0"), 10 ** len(frac))
    value *= Fraction(10) ** exp
    if m["den"] is not None:
        value /= int(m["den"])
    decimal = m["frac"] is not None or m["exp"] is not None
    return _Number(-value if m["sign"] == "-" else value, len(frac) - exp if decimal else None,
                   len((whole + frac).lstrip("0")))


def _rounds_to(decimal: _Number, exact: Fraction) -> bool:
    """Whether `decimal` is `exact` rounded to the places it shows, with enough significant
    digits: 0.333333333333 (the calculator's 1/3) or 0.333333 stand for 1/3, 0.33 does not."""
    return (decimal.digits >= ROUNDED_DIGITS
            and abs(decimal.value - exact) * 2 <= Fraction(10) ** -decimal.places)


def _numbers_match(a: _Number, b: _Number) -> bool:
    if a.value == b.value:
        return True
    # Two decimals are compared exactly, as either could have been written in full; a decimal
    # against a fraction may be that fraction rounded, which is all a decimal can say of 1/3.
    if a.places is not None and b.places is None:
        return _rounds_to(a, b.value)
    if b.places is not None and a.places is None:
        return _rounds_to(b, a.value)
    return False


def _drop_no_timeout_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    # We run without math-verify's timeouts knowingly (see `_symbolic`); it would say so in
    # every process.
    logging.getLogger(_name).addFilter(_drop_no_timeout_warning)


def _parse(text: str) -> list:
    from math_verify import parse

    # Bare LaTeX and expressions with variables are only read inside $...$; text without math
    # mode is read as it stands when that fails ("the answer is 5").
    candidates = [text] if "$" in text or "\\boxed" in text else [f"${text}$", text]
    for candidate in candidates:
        parsed = parse(candidate, parsing_timeout=None)
        if any(not isinstance(p, str) for p in parsed):
            return parsed
    return []


def _too_costly(values: list) -> bool:
    """Whether sympy would compute a huge exact number or expand a huge power for these parsed
    answers (9^{9^9}, 1000000!, (x+1)^{1000}). Children are judged before their parents, so
    evaluating a node numerically to judge it is itself cheap."""
    import sympy
    from sympy.functions.combinatorial.factorials import (
        FallingFactorial, RisingFactorial, binomial, factorial, factorial2, subfactorial,
    )

    combinatorial = (factorial, factorial2, subfactorial, binomial, RisingFactorial,
                     FallingFactorial, sympy.gamma)
    for value in values:
        if isinstance(value, str):
            continue
        elements = list(value) if isinstance(value, sympy.MatrixBase) else [value]
        for node in (n for e in elements for n in sympy.postorder_traversal(e)):
            if isinstance(node, combinatorial):
                if any(a.is_number and abs(sympy.N(a)) > MAX_COMBINATORIAL for a in node.args):
                    return True
            elif node.is_Pow and node.exp.is_number:
                exponent = abs(sympy.N(node.exp))
                if not node.base.is_number:
                    if exponent > MAX_SYMBOLIC_EXPONENT:
                        return True
                    continue
                base = abs(sympy.N(node.base))
                if base != 0 and exponent * abs(sympy.N(sympy.log(base, 10))) > MAX_DIGITS:
                    return True
    return False


def _symbolic(predicted: str, reference: str) -> bool:
    from math_verify import verify

    # math-verify's timeouts are signal.alarm: they raise off the main thread and, on it,
    # cancel any other alarm of the process. Without them the result is the same in every
    # thread and process; `_too_costly` keeps out what would run away.
    gold, pred = _parse(reference), _parse(predicted)
    if not gold or not pred or _too_costly(gold) or _too_costly(pred):
        return False
    return verify(gold, pred, timeout_seconds=None)


def answers_match(predicted: str, reference: str) -> bool:
    """Whether `predicted` equals `reference` mathematically: 1/2, 0.5, \\frac{1}{2} and
    $\\dfrac12$ all match; (x+1)^2 matches x^2+2x+1. Never raises: an answer that cannot be
    read is a wrong answer."""
    try:
        if max(len(predicted), len(reference)) > MAX_ANSWER_CHARS:
            return False
        a, b = _plain_number(predicted), _plain_number(reference)
        if a is not None and b is not None:
            return _numbers_match(a, b)
        return _symbolic(predicted, reference)
    except Exception:  # noqa: BLE001 - malformed model output is a wrong answer, not a crash
        return False


def numbers_match(predicted: str, reference: str) -> bool:
    """`answers_match` for plain numbers only ("72", "$1,000", "15 balls", "3/4"): anything
    else is a wrong answer, and nothing is handed to sympy."""
    if max(len(predicted), len(reference)) > MAX_ANSWER_CHARS:
        return False
    a, b = _plain_number(predicted), _plain_number(reference)
    return a is not None and b is not None and _numbers_match(a, b)
