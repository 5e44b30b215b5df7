"""An independent reading of the generated text: parses prompts and referring expressions with
regular expressions and answers them from the scene graph dict alone (scene.to_dict()), without
pyssm.data's description or relation code."""

from __future__ import annotations

import math
import re

SHAPES = {"circle", "square", "triangle", "diamond", "cross"}
DIGITS = {str(d) for d in range(10)}
COLOURS = {"red", "green", "blue", "yellow", "purple", "orange", "cyan"}
SIZES = {"small", "large"}


def singular(noun: str) -> str:
    if noun.endswith("es") and noun[:-2] in SHAPES:
        return noun[:-2]
    if noun.endswith("s") and noun[:-1] in SHAPES | DIGITS | {"shape", "digit", "object"}:
        return noun[:-1]
    return noun


def parse_phrase(text: str) -> dict:
    """"small red circle" -> {"size": "small", "colour": "red", "noun": "circle"}"""
    *adjs, noun = text.split()
    out = {"size": None, "colour": None, "noun": singular(noun)}
    for w in adjs:
        key = "size" if w in SIZES else "colour" if w in COLOURS else None
        assert key is not None and out[key] is None, f"unexpected word {w!r} in {text!r}"
        out[key] = w
    assert out["noun"] in SHAPES | DIGITS | {"shape", "digit", "object"}, text
    return out


def matching(graph: dict, phrase: str) -> list[int]:
    p = parse_phrase(phrase)
    out = []
    for i, o in enumerate(graph["objects"]):
        is_digit = o["name"] in DIGITS
        noun_ok = {"object": True, "shape": not is_digit, "digit": is_digit}.get(
            p["noun"], o["name"] == p["noun"])
        if noun_ok and p["colour"] in (None, o["colour"]) and p["size"] in (None, o["size"]):
            out.append(i)
    return out


def centre(o) -> tuple[float, float]:
    x1, y1, x2, y2 = o["box"]
    return (x1 + x2) / 2, (y1 + y2) / 2


def holds(a, b, rel: str) -> bool:
    (ax, ay), (bx, by) = centre(a), centre(b)
    return {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[rel]


def the(graph, phrase) -> int:
    hits = matching(graph, phrase)
    assert len(hits) == 1, f"'the {phrase}' matches {hits}"
    return hits[0]



def extreme(graph, candidates, key) -> int:
    """The argmin of key, asserting a clear winner (the generator's margin is 0.05)."""
    order = sorted(candidates, key=key)
    assert len(order) >= 2 and key(order[1]) - key(order[0]) >= 0.05 - 1e-9, order
    return order[0]


def dist(graph, i, j) -> float:
    (ax, ay), (bx, by) = centre(graph["objects"][i]), centre(graph["objects"][j])
    return math.hypot(ax - bx, ay - by)


def answer_vqa(graph: dict, prompt: str) -> str:
    objs = graph["objects"]
    yn = lambda b: "yes" if b else "no"           # noqa: E731
    if m := re.fullmatch(r"Is there an? (.+)\?", prompt):
        return yn(matching(graph, m[1]))
    if m := re.fullmatch(r"How many (.+) are there\?", prompt):
        return str(len(matching(graph, m[1])))
    if m := re.fullmatch(r"Are there (more|fewer) (.+) than (.+)\?", prompt):
        a, b = len(matching(graph, m[2])), len(matching(graph, m[3]))
        return yn(a > b if m[1] == "more" else a < b)
    if m := re.fullmatch(r"What (colour is|is) the object (nearest to|farthest from) the (.+)\?",
                         prompt):
        a = the(graph, m[3])
        sign = 1 if m[2] == "nearest to" else -1
        best = extreme(graph, [i for i in range(len(objs)) if i != a],
                       lambda i: sign * dist(graph, i, a))
        return objs[best]["colour" if m[1] == "colour is" else "name"]
    if m := re.fullmatch(r"What (colour|shape|digit) is the (.+)\?", prompt):
        o = objs[the(graph, m[2])]
        if m[1] == "colour":
            return o["colour"]
        assert (o["name"] in DIGITS) == (m[1] == "digit"), (prompt, o)
        return o["name"]
    if m := re.fullmatch(r"Is the (.+?) (left of|right of|above|below) the (.+)\?", prompt):
        return yn(holds(objs[the(graph, m[1])], objs[the(graph, m[3])], m[2]))
    raise AssertionError(f"unknown question {prompt!r}")


def resolve_expression(graph: dict, prompt: str) -> list[int]:
    """The objects a "Locate the ..." prompt refers to."""
    objs = graph["objects"]
    if m := re.fullmatch(r"Locate the (.+) nearest the (left|right|top|bottom) edge\.", prompt):
        key = {"left": lambda i: centre(objs[i])[0], "right": lambda i: 1 - centre(objs[i])[0],
               "top": lambda i: centre(objs[i])[1], "bottom": lambda i: 1 - centre(objs[i])[1]}
        return [extreme(graph, matching(graph, m[1]), key[m[2]])]
    if m := re.fullmatch(r"Locate the (.+?) (left of|right of|above|below|nearest to|"
                         r"farthest from) the (.+)\.", prompt):
        a = the(graph, m[3])
        cands = [i for i in matching(graph, m[1]) if i != a]
        if m[2] in ("nearest to", "farthest from"):
            sign = 1 if m[2] == "nearest to" else -1
            return [extreme(graph, cands, lambda i: sign * dist(graph, i, a))]
        return [i for i in cands if holds(objs[i], objs[a], m[2])]
    if m := re.fullmatch(r"Locate the (.+)\.", prompt):
        return matching(graph, m[1])
    raise AssertionError(f"unknown expression {prompt!r}")
