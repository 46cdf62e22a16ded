"""Open-domain QA scoring as in SQuAD / Natural Questions / Search-R1 evaluation: answers are
compared after normalization (case, punctuation, articles, whitespace), by exact match and by
token F1, taking the best over the gold answers."""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, then the articles a/an/the, and collapse whitespace (in
    SQuAD's order: "The U.S." -> "us")."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golds: list[str]) -> float:
    """1.0 when the normalized prediction equals any normalized gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def _f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred and not ref:
        return 1.0
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, golds: list[str]) -> float:
    """The best token-level F1 (normalized tokens, counted with multiplicity) over the gold
    answers; 0.0 without overlap or without gold answers."""
    return max((_f1(prediction, g) for g in golds), default=0.0)
