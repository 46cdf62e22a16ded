"""Final answers as text, what every layer that reads one shares: open-domain QA scoring as in
SQuAD / Natural Questions / Search-R1 evaluation (answers compared after normalization of case,
punctuation, articles and whitespace, by exact match and by token F1, the best over the gold
answers), and the last `\\boxed{...}` of a MATH-style solution."""

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


_BOXED = re.compile(r"\\boxed\s*{")


def last_box(text: str) -> tuple[int, int, int] | None:
    """Where the box that closes last starts, where its content starts and where its closing
    brace is; an outer box closes after the boxes inside it."""
    last = None
    for match in _BOXED.finditer(text):
        depth = 1
        for i in range(match.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                if last is None or i > last[2]:
                    last = (match.start(), match.end(), i)
                break
    return last


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text` (braces balanced), or None: how MATH
    solutions state their final answer."""
    box = last_box(text)
    return None if box is None else text[box[1]:box[2]].strip()
