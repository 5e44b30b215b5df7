"""Metrics: exact match, Acc@0.5 IoU edge cases, weighting, t-intervals over seeds."""

import math

import pytest

from pyssm.data import answer_hit, box_hit, iou, is_correct, mean_interval, score, summarize
from pyssm.data.metrics import t_quantile


def test_iou_exactly_half_counts():
    assert iou([0, 0, 0.5, 1], [0, 0, 1, 1]) == 0.5
    assert box_hit("[0, 0, 1, 1]", [0, 0, 0.5, 1])
    # 0.2 x 0.2 inside 0.2 x 0.4: exactly 1/2 in hundredths, where float products wobble
    assert box_hit("[0.10, 0.10, 0.30, 0.50]", [0.1, 0.1, 0.3, 0.3])
    assert box_hit("[0.37, 0.11, 0.58, 0.53]", "[0.37, 0.11, 0.58, 0.32]")
    assert not box_hit("[0.10, 0.10, 0.30, 0.51]", [0.1, 0.1, 0.3, 0.3])     # 400 / 820


def test_box_rounded_to_two_decimals():
    assert box_hit("[0.104, 0.1, 0.296, 0.3]", [0.1, 0.1, 0.3, 0.3])
    assert iou([0.104, 0.1, 0.296, 0.3], [0.1, 0.1, 0.3, 0.3]) == 1.0
    # valid before rounding, degenerate after: wrong
    assert not box_hit("[0.101, 0.1, 0.104, 0.5]", [0.1, 0.1, 0.11, 0.5])


@pytest.mark.parametrize("text", [
    "[0.2, 0.2, 0.2, 0.5]",          # x1 == x2
    "[0.2, 0.5, 0.4, 0.5]",          # y1 == y2
    "[0.4, 0.2, 0.2, 0.5]",          # x1 > x2
    "[-0.1, 0.0, 0.5, 0.5]",         # outside [0, 1]
    "[0.1, 0.2, 1.2, 0.5]",
    "[0.1, 0.2, 0.3]", "0.1, 0.2, 0.3, 0.4", "no box", "", None, "[a, b, c, d]",
])
def test_invalid_or_unparseable_boxes_are_wrong(text):
    assert not box_hit(text, [0, 0, 1, 1])


def test_box_found_inside_text_and_invalid_targets():
    assert box_hit("it is at [0.10, 0.20, 0.30, 0.40].", [0.1, 0.2, 0.3, 0.4])
    assert not box_hit("[0.1, 0.2, 0.3, 0.4]", [0.3, 0.2, 0.1, 0.4])      # bad target
    assert iou([0.1, 0.2, 0.1, 0.4], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert iou([0, 0, 0.1, 0.1], [0.5, 0.5, 1, 1]) == 0.0


def test_answer_normalisation():
    assert answer_hit("The Red.", "red")
    assert answer_hit(" Yes! ", "yes")
    assert answer_hit("3", "3") and not answer_hit("three", "3")
    assert not answer_hit("", "no") and not answer_hit(None, "no")
    assert not answer_hit("red circle", "red")


def test_score_weights_examples():
    examples = [{"task": "vqa", "type": "count", "answer": "2"},
                {"task": "vqa", "type": "count", "answer": "3"},
                {"task": "vqa", "type": "colour", "answer": "red"},
                {"task": "grounding", "type": "ref_edge", "answer": "[0.00, 0.00, 0.50, 1.00]"}]
    preds = ["2", "4", "Red", "[0, 0, 1, 1]"]
    s = score(preds, examples)
    assert s["overall"] == 0.75
    assert s["vqa"] == pytest.approx(2 / 3) and s["grounding"] == 1.0
    assert s["by_type"] == {"colour": 1.0, "count": 0.5, "ref_edge": 1.0}
    assert s["counts"]["overall"] == 4 and s["counts"]["count"] == 2
    assert [is_correct(p, e) for p, e in zip(preds, examples)] == [True, False, True, True]
    with pytest.raises(ValueError):
        score(preds[:2], examples)
    with pytest.raises(ValueError):
        is_correct("x", {"task": "caption", "answer": "x"})


def test_t_interval():
    mean, hw = mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and hw == pytest.approx(4.303 / math.sqrt(3))
    mean, hw = mean_interval([0.5, 0.5])
    assert (mean, hw) == (0.5, 0.0)
    assert math.isnan(mean_interval([0.7])[1])
    with pytest.raises(ValueError):
        mean_interval([])
    assert t_quantile(9) == 2.262
    scipy = pytest.importorskip("scipy.stats")
    for dof in (1, 4, 9, 29):
        assert t_quantile(dof) == pytest.approx(scipy.t.ppf(0.975, dof), abs=1e-3)
    assert t_quantile(50) == pytest.approx(scipy.t.ppf(0.975, 50))
    assert t_quantile(4, 0.9) == pytest.approx(scipy.t.ppf(0.95, 4))


def test_summarize_over_seeds():
    runs = [{"overall": 0.5, "vqa": 0.4, "by_type": {"count": 0.2}},
            {"overall": 0.7, "vqa": 0.6, "by_type": {"count": 0.4}}]
    out = summarize(runs)
    assert out["overall"][0] == pytest.approx(0.6)
    assert out["type/count"][0] == pytest.approx(0.3)
    assert out["vqa"][1] == pytest.approx(12.706 * 0.1)   # s = 0.1 * sqrt(2), n = 2
