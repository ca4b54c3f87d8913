"""ReasonSeg from the shapes world: one query per scene that needs one step of reasoning to pick a single
object (the most corners, the largest of a colour, the smallest, the nearest object left/right/above/below
another one, the one sharing a colour with another, the one that could roll, the leftmost/...), with
false-premise corrections (`false_premise_QA`), in the labelme json ReasonSeg uses (read_reference.md §9):

    {"text": [query, paraphrase, ...], "is_sentence": bool,
     "shapes": [{"label": "target" | "ignore" | "flag", "points": [[x, y], ...], "shape_type": "polygon",
                 "group_id": null, "flags": {}}, ...],
     "false_premise_QA": [[query, is_sentence, answer], ...]}

Some scenes add a faint "ghost" shape labelled "ignore" (255 in the eval GT, 0 in training) and a
meaningless "flag" polygon (skipped by the reader), exercising both conventions. False-premise queries name a
colour/shape pair that is absent and answer with a correction naming what is there.

`make_example(seed, split, index)` is a pure function: the generator of (seed, split index, index), with
split index 0/1/2 for train/val/test (the streams of the other sources use other ids: `write.STREAMS`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable

import numpy as np
from PIL import Image

from read_jax.data.shapes.files import atomic_bytes, atomic_image
from read_jax.data.shapes.scene import COLORS, SHAPES, SPLITS, _scene, article, points, render_reasonseg


def _name(s: dict) -> str:
    return f"{s['color']} {s['kind']}"


def _a_name(s: dict) -> str:
    """ "a red circle", "an orange star"."""
    return f"{article(s['color'])} {_name(s)}"


def _unique(shapes: list[dict], key: Callable[[dict], object], value) -> list[int]:
    return [i for i, s in enumerate(shapes) if key(s) == value]


# Each query maker returns (target index, [texts], is_sentence) or None when it does not apply uniquely.
def _q_most_corners(rng, shapes):
    c = [s["corners"] for s in shapes]
    top = max(c)
    if c.count(top) != 1 or top == 0:
        return None
    return (
        c.index(top),
        [
            "Which object in the picture has the largest number of corners?",
            "Find the shape that has more corners than any other.",
        ],
        True,
    )


def _q_largest_of_color(rng, shapes):
    colors = [s["color"] for s in shapes]
    cands = [col for col in set(colors) if colors.count(col) >= 2]
    if not cands:
        return None
    col = sorted(cands)[int(rng.integers(len(cands)))]
    idx = [i for i, s in enumerate(shapes) if s["color"] == col]
    areas = sorted(((shapes[i]["area"], i) for i in idx), reverse=True)
    if areas[0][0] < 1.15 * areas[1][0]:
        return None
    return areas[0][1], [f"the largest {col} object", f"biggest {col} shape"], False


def _q_smallest(rng, shapes):
    areas = sorted((s["area"], i) for i, s in enumerate(shapes))
    if areas[1][0] < 1.15 * areas[0][0]:
        return None
    return (
        areas[0][1],
        ["Which shape is the smallest one in this picture?", "Point out the tiniest object in the image."],
        True,
    )


def _distinct_ref(rng, shapes):
    """A reference shape whose colour + kind is unique in the scene."""
    names = [_name(s) for s in shapes]
    refs = [i for i, n in enumerate(names) if names.count(n) == 1]
    return None if not refs else refs[int(rng.integers(len(refs)))]


_DIRS = {
    "left": (lambda s, r: r["cx"] - s["cx"], "to the left of", "on the left side of"),
    "right": (lambda s, r: s["cx"] - r["cx"], "to the right of", "on the right side of"),
    "above": (lambda s, r: r["cy"] - s["cy"], "above", "higher up than"),
    "below": (lambda s, r: s["cy"] - r["cy"], "below", "lower down than"),
}


def _q_relation(rng, shapes):
    ref = _distinct_ref(rng, shapes)
    if ref is None:
        return None
    d = list(_DIRS)[int(rng.integers(len(_DIRS)))]
    gap, phrase, phrase2 = _DIRS[d]
    r = shapes[ref]
    cands = sorted((gap(s, r), i) for i, s in enumerate(shapes) if i != ref and gap(s, r) > 8)
    if not cands or (len(cands) > 1 and cands[1][0] - cands[0][0] < 10):
        return None
    n = _name(r)
    return (
        cands[0][1],
        [f"Which object sits nearest {phrase} the {n}?", f"What is the closest shape {phrase2} the {n}?"],
        True,
    )


def _q_same_color(rng, shapes):
    kinds = [s["kind"] for s in shapes]
    refs = [i for i, k in enumerate(kinds) if kinds.count(k) == 1]
    rng.shuffle(refs)
    for ref in refs:
        same = [i for i, s in enumerate(shapes) if i != ref and s["color"] == shapes[ref]["color"]]
        if len(same) == 1:
            k = shapes[ref]["kind"]
            return (
                same[0],
                [
                    f"Which shape has the same colour as the {k}?",
                    f"Which other object is painted in the colour of the {k}?",
                ],
                True,
            )
    return None


def _q_could_roll(rng, shapes):
    circles = [i for i, s in enumerate(shapes) if s["kind"] == "circle"]
    if len(circles) != 1:
        return None
    return (
        circles[0],
        [
            "Something in the picture would roll if you gave it a push. What is it?",
            "Which object could roll across a table?",
        ],
        True,
    )


_EXTREMES = {
    "leftmost": lambda s: -s["cx"],
    "rightmost": lambda s: s["cx"],
    "topmost": lambda s: -s["cy"],
    "bottom-most": lambda s: s["cy"],
}


def _q_extreme(rng, shapes):
    word = list(_EXTREMES)[int(rng.integers(len(_EXTREMES)))]
    key = _EXTREMES[word]
    order = sorted(((key(s), i) for i, s in enumerate(shapes)), reverse=True)
    if order[0][0] - order[1][0] < 10:
        return None
    return order[0][1], [f"the {word} shape", f"{word} object"], False


QUERIES = (
    _q_extreme,
    _q_most_corners,
    _q_largest_of_color,
    _q_smallest,
    _q_relation,
    _q_same_color,
    _q_could_roll,
)


def _false_premises(rng, shapes) -> list[list]:
    present = {(s["color"], s["kind"]) for s in shapes}
    out = []
    order = list(range(len(shapes)))
    rng.shuffle(order)
    for i in order:
        s = shapes[i]
        others = [c for c in COLORS if (c, s["kind"]) not in present]
        if not others:
            continue
        c = others[int(rng.integers(len(others)))]
        if rng.random() < 0.5:
            out.append(
                [
                    f"the {c} {s['kind']}",
                    False,
                    f"There is no {c} {s['kind']} in this image, but there is {_a_name(s)}.",
                ]
            )
        else:
            out.append(
                [
                    f"Which {s['kind']} here is {c}?",
                    True,
                    f"None of them: no {s['kind']} in the picture is {c}. There is {_a_name(s)}, though.",
                ]
            )
        if len(out) == 2:
            break
    return out


# The query kind of each phrasing the makers above write (full match, case-sensitive): lets an evaluation
# report
# figures per kind from the query text alone (`query_kind`), for sets written before or after this table.
_COLOR = "(?:" + "|".join(COLORS) + ")"
_KIND = "(?:" + "|".join(SHAPES) + ")"
_NAMED = f"{_COLOR} {_KIND}"
_REL = "(?:" + "|".join(p for _, p1, p2 in _DIRS.values() for p in (p1, p2)) + ")"
QUERY_KIND_PATTERNS = {
    "extreme": (f"the (?:{'|'.join(_EXTREMES)}) shape", f"(?:{'|'.join(_EXTREMES)}) object"),
    "most_corners": (
        "Which object in the picture has the largest number of corners\\?",
        "Find the shape that has more corners than any other\\.",
    ),
    "largest_of_color": (f"the largest {_COLOR} object", f"biggest {_COLOR} shape"),
    "smallest": (
        "Which shape is the smallest one in this picture\\?",
        "Point out the tiniest object in the image\\.",
    ),
    "relation": (
        f"Which object sits nearest {_REL} the {_NAMED}\\?",
        f"What is the closest shape {_REL} the {_NAMED}\\?",
    ),
    "same_color": (
        f"Which shape has the same colour as the {_KIND}\\?",
        f"Which other object is painted in the colour of the {_KIND}\\?",
    ),
    "could_roll": (
        "Something in the picture would roll if you gave it a push\\. What is it\\?",
        "Which object could roll across a table\\?",
    ),
}
_KIND_RES = {k: [re.compile(p) for p in ps] for k, ps in QUERY_KIND_PATTERNS.items()}


def query_kind(text: str) -> str | None:
    """The kind of query ("extreme", "most_corners", ... of `QUERIES`) that wrote `text`; else None."""
    for kind, pats in _KIND_RES.items():
        if any(p.fullmatch(text) for p in pats):
            return kind
    return None


def make_example(seed: int, split: str, index: int) -> tuple[Image.Image, dict]:
    """One (image, labelme json) pair, a pure function of (seed, split, index)."""
    return _make_example(seed, split, index)[:2]


def _make_example(seed: int, split: str, index: int) -> tuple[Image.Image, dict, str]:
    """`make_example` and the kind of its query (the maker's name without `_q_`)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    for _ in range(100):
        w, h, shapes = _scene(rng)
        if len(shapes) < 3:
            continue
        makers = list(QUERIES)
        rng.shuffle(makers)
        for make in makers:
            q = make(rng, shapes)
            if q is not None:
                break
        if q is not None:
            break
    else:  # pragma: no cover - 100 scenes without a unique query is practically impossible
        raise RuntimeError(f"could not build a query for {split}/{index}")
    target, texts, is_sentence = q
    kind = make.__name__.removeprefix("_q_")
    ghost = None
    if rng.random() < 0.2:  # a faint ghost shape in free space, labelled "ignore"
        _, _, extra = _scene(rng)
        for g in extra:
            if (
                g["cx"] < w - g["r"]
                and g["cy"] < h - g["r"]
                and all(
                    math.hypot(g["cx"] - s["cx"], g["cy"] - s["cy"]) > g["r"] + s["r"] + 4 for s in shapes
                )
            ):
                ghost = g
                break
    im = render_reasonseg(rng, w, h, shapes, ghost)
    ann_shapes = [
        {
            "label": "target",
            "points": points(shapes[target]["poly"]),
            "group_id": None,
            "shape_type": "polygon",
            "flags": {},
        }
    ]
    if ghost is not None:
        ann_shapes.append(
            {
                "label": "ignore",
                "points": points(ghost["poly"]),
                "group_id": None,
                "shape_type": "polygon",
                "flags": {},
            }
        )
    if rng.random() < 0.05:
        ann_shapes.append(
            {
                "label": "flag",
                "points": [[0.0, 0.0], [4.0, 0.0], [4.0, 4.0]],
                "group_id": None,
                "shape_type": "polygon",
                "flags": {},
            }
        )
    ann = {
        "text": texts,
        "is_sentence": is_sentence,
        "shapes": ann_shapes,
        "false_premise_QA": _false_premises(rng, shapes),
        "imageHeight": h,
        "imageWidth": w,
    }
    return im, ann, kind


def example_paths(out: str, split: str, index: int) -> tuple[str, str]:
    """(jpg, json) of ReasonSeg example `index` of `split` under the ReasonSeg directory `out`."""
    stem = os.path.join(out, split, f"shapes_{split}_{index:05d}")
    return stem + ".jpg", stem + ".json"


def write_example(out: str, split: str, index: int, seed: int, *, missing_only: bool = False) -> str:
    """Write example `index` of `split` (each file atomically; `missing_only`: only the absent ones, files
    already there, hand edits included, stay). Returns the jpg path."""
    jpg, js = example_paths(out, split, index)
    todo = [p for p in (jpg, js) if not (missing_only and os.path.exists(p))]
    if todo:
        im, ann = make_example(seed, split, index)
        if jpg in todo:
            atomic_image(jpg, im, "JPEG")
        if js in todo:
            atomic_bytes(js, json.dumps(ann).encode())
    return jpg


def write_split(
    out: str, split: str, num: int, seed: int, progress=None, *, missing_only: bool = False
) -> list[str]:
    """Write examples 0..num-1 of `split` into the ReasonSeg directory `out` (`write_example`)."""
    os.makedirs(os.path.join(out, split), exist_ok=True)
    paths = []
    for i in range(num):
        paths.append(write_example(out, split, i, seed, missing_only=missing_only))
        if progress is not None:
            progress.update(1)
    return paths
