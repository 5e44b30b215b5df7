"""Parsing generated answers: short answers and normalised boxes [x1, y1, x2, y2]. An
unparseable or invalid box is a wrong answer (None), never an exception."""

from __future__ import annotations

import re

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)"
_BOX = re.compile(rf"\[\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\]")


def parse_box(text: str) -> list[float] | None:
    """The first "[x1, y1, x2, y2]" in ``text`` if it is a valid normalised box (inside
    [0, 1], x1 < x2, y1 < y2), else None."""
    match = _BOX.search(text or "")
    if match is None:
        return None
    x1, y1, x2, y2 = (float(v) for v in match.groups())
    if not (0.0 <= x1 < x2 <= 1.0 and 0.0 <= y1 < y2 <= 1.0):
        return None
    return [x1, y1, x2, y2]


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed: "The Red." -> "red"."""
    text = re.sub(r"[^\w\s]", " ", (text or "").lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))
