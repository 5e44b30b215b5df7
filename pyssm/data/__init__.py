"""Procedural spatial scenes for the grounding study: shapes and real handwritten digits on
plain or textured backgrounds, VQA questions and referring expressions with exact answers
derived from each scene's graph, train/val/test/test_comp splits, and the metrics.

    from pyssm.data import SceneDataset, score
    ds = SceneDataset("train", num_scenes=10_000, size=128)
    image, prompt, answer = ds[0]
"""

from pyssm.data.dataset import TASKS, Example, SceneDataset, scene_batch, vocabulary
from pyssm.data.describe import Description
from pyssm.data.grounding import (GROUNDING_TYPES, Grounding, Referral, format_box, refer,
                                  resolve)
from pyssm.data.metrics import (answer_hit, box_hit, iou, is_correct, mean_interval, score,
                                summarize, t_quantile)
from pyssm.data.questions import QUESTION_TYPES, Question, ask, make_question
from pyssm.data.render import render, render_batch
from pyssm.data.scenes import COLOURS, DIGITS, SHAPES, SIZES, Scene, SceneObject, sample_scene
from pyssm.data.splits import HELD_OUT, SPLITS, make_scene

__all__ = ["COLOURS", "DIGITS", "Description", "Example", "GROUNDING_TYPES", "Grounding",
           "HELD_OUT", "QUESTION_TYPES", "Question", "Referral", "SHAPES", "SIZES", "SPLITS",
           "Scene", "SceneDataset", "SceneObject", "TASKS", "answer_hit", "ask", "box_hit",
           "format_box", "iou", "is_correct", "make_question", "make_scene", "mean_interval",
           "refer", "render", "render_batch", "resolve", "sample_scene", "scene_batch", "score",
           "summarize", "t_quantile", "vocabulary"]
