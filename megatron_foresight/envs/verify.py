"""Checking a final answer against a reference, symbolically: plain numbers are compared as
exact rationals (fast, and most answers are numbers); anything else goes to Hugging Face's
math-verify (LaTeX and expressions, on sympy)."""

from __future__ import annotations

import logging
import re
import threading
from fractions import Fraction

_NUMBER = re.compile(r"^[+-]?(\d{1,3}(,\d{3})+|\d+)?(\.\d*)?(/\d+)?$")


def _plain_number(text: str) -> Fraction | None:
    text = text.strip().strip("$").strip().rstrip(".")
    if not text or not _NUMBER.match(text) or not any(c.isdigit() for c in text):
        return None
    try:
        return Fraction(text.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def _drop_no_timeout_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    # Off the main thread we run without timeouts knowingly (see below); math-verify would
    # warn on every call.
    logging.getLogger(_name).addFilter(_drop_no_timeout_warning)


def _symbolic(predicted: str, reference: str) -> bool:
    from math_verify import parse, verify

    # Its timeouts use signals, which only the main thread may install; elsewhere (worker
    # threads of a rollout) it runs without them, so a pathological expression could be slow.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        for wrap in ("{}", "${}$"):
            gold = parse(wrap.format(reference), parsing_timeout=timeout)
            pred = parse(wrap.format(predicted), parsing_timeout=timeout)
            if gold and pred and verify(gold, pred, timeout_seconds=timeout):
                return True
    except Exception:  # noqa: BLE001 - malformed model output is a wrong answer, not a crash
        return False
    return False


def answers_match(predicted: str, reference: str) -> bool:
    """Whether `predicted` equals `reference` mathematically (1/2, 0.5, \\frac{1}{2}, ...)."""
    a, b = _plain_number(predicted), _plain_number(reference)
    if a is not None and b is not None:
        return a == b
    return _symbolic(predicted, reference)
