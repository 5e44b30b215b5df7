"""Scoring: VQA exact match after normalisation, grounding Acc@0.5 IoU, per-type and overall
accuracies, and 95% intervals over seeds.

VQA: a prediction is right when pyssm.vlm.parse.normalize_answer (lower case, punctuation and
articles removed) makes it equal to the normalised answer.

Grounding: the first "[x1, y1, x2, y2]" in the prediction (pyssm.vlm.parse.parse_box) and the
target are rounded to two decimals and compared in whole hundredths, so IoU is exact rational
arithmetic: a hit is IoU >= 0.5 (inclusive: exactly 0.5 counts as correct). A missing or
unparseable box, one outside [0, 1], or one with x1 >= x2 or y1 >= y2 (also after rounding) is
wrong.

Overall scores weight every example equally (micro average over the examples)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

IOU_THRESHOLD = 0.5

# two-sided 95% Student t quantiles, t_{0.975, dof}, dof = 1..30
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def _hundredths(box) -> tuple[int, int, int, int] | None:
    """The box in whole hundredths, or None if it is not a valid normalised box."""
    if box is None or len(box) != 4:
        return None
    try:
        x1, y1, x2, y2 = (round(float(v) * 100) for v in box)
    except (TypeError, ValueError, OverflowError):
        return None
    if not (0 <= x1 < x2 <= 100 and 0 <= y1 < y2 <= 100):
        return None
    return x1, y1, x2, y2


def _overlap(a, b) -> tuple[int, int]:
    """(intersection, union) areas of two boxes in hundredths."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter, union


def iou(a, b) -> float:
    """IoU of two normalised boxes rounded to two decimals; 0.0 if either is invalid."""
    a, b = _hundredths(a), _hundredths(b)
    if a is None or b is None:
        return 0.0
    inter, union = _overlap(a, b)
    return inter / union


def box_hit(prediction: str, target, threshold: float = IOU_THRESHOLD) -> bool:
    """Whether the box in ``prediction`` (text) has IoU >= threshold with ``target`` (a box,
    or its text)."""
    from pyssm.vlm.parse import parse_box

    if isinstance(target, str):
        target = parse_box(target)
    a, b = _hundredths(parse_box(prediction or "")), _hundredths(target)
    if a is None or b is None:
        return False
    inter, union = _overlap(a, b)
    if threshold == 0.5:
        return 2 * inter >= union                   # exact, no rounding at the boundary
    return inter >= threshold * union


def answer_hit(prediction: str, answer: str) -> bool:
    """Exact match after normalize_answer."""
    from pyssm.vlm.parse import normalize_answer

    return normalize_answer(prediction or "") == normalize_answer(answer)


def _field(example, name):
    return example[name] if isinstance(example, Mapping) else getattr(example, name)


def is_correct(prediction: str, example) -> bool:
    """Score one prediction against an example (a dataset Example or a mapping with ``task``
    and ``answer``)."""
    task = _field(example, "task")
    if task == "grounding":
        return box_hit(prediction, _field(example, "answer"))
    if task == "vqa":
        return answer_hit(prediction, _field(example, "answer"))
    raise ValueError(f"unknown task {task!r}")


def score(predictions: Sequence[str], examples: Sequence) -> dict:
    """Accuracies of ``predictions`` on ``examples`` (each with ``task``, ``type`` and
    ``answer``): {"overall", "vqa", "grounding", "by_type": {type: acc}, "counts": {key: n}}.
    Overall and per-task accuracies weight every example equally; a task or type with no
    examples is absent."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    hits: dict[str, list[bool]] = {}
    for pred, ex in zip(predictions, examples):
        ok = is_correct(pred, ex)
        for key in ("overall", _field(ex, "task"), "type/" + _field(ex, "type")):
            hits.setdefault(key, []).append(ok)
    acc = {k: sum(v) / len(v) for k, v in hits.items()}
    out = {k: v for k, v in acc.items() if not k.startswith("type/")}
    out["by_type"] = {k[5:]: v for k, v in sorted(acc.items()) if k.startswith("type/")}
    out["counts"] = {k.removeprefix("type/"): len(v) for k, v in sorted(hits.items())}
    return out


def t_quantile(dof: int, confidence: float = 0.95) -> float:
    """The two-sided Student t quantile t_{(1 + confidence) / 2, dof}."""
    if dof < 1:
        raise ValueError(f"dof must be >= 1, got {dof}")
    if confidence == 0.95 and dof <= len(_T95):
        return _T95[dof - 1]
    from scipy.stats import t

    return float(t.ppf((1 + confidence) / 2, dof))


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of the t-interval over seeds: mean +- t_{n-1} * s / sqrt(n), s the
    sample standard deviation. One value gives a half-width of nan (no spread to estimate)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, t_quantile(n - 1, confidence) * math.sqrt(var / n)


def summarize(runs: Sequence[Mapping], confidence: float = 0.95) -> dict:
    """Per-metric (mean, half-width) over runs (one ``score`` result per seed), for the
    metrics every run has: overall, vqa, grounding and each by_type entry."""
    if not runs:
        raise ValueError("no runs")
    flat = [{**{k: v for k, v in r.items() if isinstance(v, (int, float))},
             **{"type/" + k: v for k, v in r.get("by_type", {}).items()}} for r in runs]
    keys = [k for k in flat[0] if all(k in f for f in flat)]
    return {k: mean_interval([f[k] for f in flat], confidence) for k in keys}
