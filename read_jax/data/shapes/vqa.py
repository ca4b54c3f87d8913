"""VQA conversations about a shapes scene, in LLaVA-Instruct-150k's layout (multi-turn, `<image>` in the
first question): dense text supervision for the LLaVA stage.

Question kinds (`VQA_KINDS`): caption (a description listing every shape and where it is), count (shapes,
of a kind, of a colour), color (of the only shape of a kind), shape (of the only shape of a colour),
position (3 x 3 grid region of a uniquely named shape), size (which of two is bigger; the biggest/smallest
shape), corners, relation (left/right, above/below, yes/no), existence (a colour + kind, yes/no).

Every answer is computed from the scene and a question is asked only when its answer is unambiguous
(named shapes are unique in the scene, sizes differ by `SIZE_RATIO`, positions by `MARGIN` px, grid regions
are away from the grid lines). `vqa_kind(question)` names the kind of a question and `vqa_key(question,
answer)` the part of an answer that scoring compares (a number, a colour, yes/no, ...), so the LLaVA stage
can report accuracy per question kind. Training conversations are multi-round (`conversation`); the held-out
splits hold one single-round item per (scene, question kind) (`probe_items`), so a reader that scores the
first round of each item scores every kind of every held-out scene.
"""

from __future__ import annotations

import re

from read_jax.data.shapes.scene import (
    COLORS,
    DIRS,
    MARGIN,
    SHAPES,
    SIZE_RATIO,
    article,
    name,
    plural,
    region,
)

VQA_KINDS = ("caption", "count", "color", "shape", "position", "size", "corners", "relation", "existence")
_CAPTION_QS = (
    "Describe the image briefly.",
    "What is in this picture?",
    "Give a short description of the image.",
)
_NUM = "(?:no|\\d+)"


def _caption(w: int, h: int, shapes: list[dict]) -> str:
    parts = []
    for s in sorted(shapes, key=lambda o: (round(o["cy"] / (h / 3)), o["cx"])):
        where = region(s, w, h)
        at = "" if where is None else (" in the center" if where == "center" else f" at the {where}")
        parts.append(f"{article(s['color'])} {name(s)}{at}")
    return f"The image shows {len(shapes)} shapes on a light background: " + ", ".join(parts) + "."


def _count(n: int, what: str, kind: str | None = None) -> str:
    """ "There are 3 circles." / "There is 1 red shape." / "There are no stars."."""
    noun = plural(kind, n) if kind else what + ("s" if n != 1 else "")
    if n == 0:
        return f"There are no {noun if kind is None else plural(kind, 2)} in the image."
    return f"There {'is' if n == 1 else 'are'} {n} {noun} in the image."


def _unique(shapes: list[dict], key) -> dict[object, dict]:
    vals = [key(s) for s in shapes]
    return {v: s for v, s in zip(vals, shapes) if vals.count(v) == 1}


def questions(w: int, h: int, shapes: list[dict]) -> list[tuple[str, str]]:
    """Every (question, answer) the scene supports unambiguously, in a fixed order (the caller samples)."""
    qa: list[tuple[str, str]] = []
    n = len(shapes)
    qa.append(("How many shapes are there in the image?", _count(n, "shape")))
    for k in SHAPES:
        c = sum(s["kind"] == k for s in shapes)
        qa.append((f"How many {plural(k, 2)} are there?", _count(c, "", k)))
    for col in COLORS:
        c = sum(s["color"] == col for s in shapes)
        qa.append((f"How many {col} shapes are there?", _count(c, f"{col} shape")))
    for k, s in _unique(shapes, lambda o: o["kind"]).items():
        qa.append((f"What colour is the {k}?", f"The {k} is {s['color']}."))
    for col, s in _unique(shapes, lambda o: o["color"]).items():
        qa.append(
            (f"What shape is the {col} object?", f"The {col} object is {article(s['kind'])} {s['kind']}.")
        )
    named = _unique(shapes, name)
    for nm, s in named.items():
        where = region(s, w, h)
        if where is not None:
            at = "in the center" if where == "center" else f"at the {where}"
            qa.append((f"Where is the {nm} in the image?", f"The {nm} is {at} of the image."))
        c = s["corners"]
        qa.append(
            (
                f"How many corners does the {nm} have?",
                f"The {nm} has {'no' if c == 0 else c} corner{'' if c == 1 else 's'}.",
            )
        )
    for a in sorted(named):
        for b in sorted(named):
            if a == b:
                continue
            sa, sb = named[a], named[b]
            if max(sa["area"], sb["area"]) >= SIZE_RATIO * min(sa["area"], sb["area"]):
                big = a if sa["area"] > sb["area"] else b
                qa.append((f"Which is bigger, the {a} or the {b}?", f"The {big} is bigger."))
            for d, phrase, opposite in (
                ("left", "to the left of", "to the right of"),
                ("above", "above", "below"),
            ):
                gap = DIRS[d](sa, sb)
                if abs(gap) >= MARGIN:
                    q = f"Is the {a} {phrase} the {b}?"
                    qa.append(
                        (
                            q,
                            f"Yes, the {a} is {phrase} the {b}."
                            if gap > 0
                            else f"No, the {a} is {opposite} the {b}.",
                        )
                    )
    areas = sorted(shapes, key=lambda o: o["area"])
    for word, s, second in (("biggest", areas[-1], areas[-2]), ("smallest", areas[0], areas[1])):
        ratio = s["area"] / second["area"] if word == "biggest" else second["area"] / s["area"]
        if name(s) in named and ratio >= SIZE_RATIO:
            qa.append((f"What is the {word} shape in the image?", f"The {word} shape is the {name(s)}."))
    for col in COLORS:
        for k in SHAPES:
            c = sum(s["color"] == col and s["kind"] == k for s in shapes)
            if c:
                a = (
                    f"Yes, there is {article(col)} {col} {k}."
                    if c == 1
                    else f"Yes, there are {c} {col} {k}s."
                )
            else:
                a = f"No, there is no {col} {k} in the image."
            qa.append((f"Is there {article(col)} {col} {k} in the image?", a))
    return qa


def conversation(rng, w: int, h: int, shapes: list[dict]) -> list[dict]:
    """A LLaVA-Instruct conversation ([{"from": "human"|"gpt", "value"}], `<image>` first): 4-7 rounds, a
    caption first with probability 0.3, then questions drawn to spread over the kinds (existence and count
    questions are many per scene; each kind is drawn first, then one of its questions)."""
    qa = questions(w, h, shapes)
    by_kind: dict[str, list[tuple[str, str]]] = {}
    for q, a in qa:
        by_kind.setdefault(vqa_kind(q), []).append((q, a))
    rounds = []
    if rng.random() < 0.3:
        rounds.append((_CAPTION_QS[int(rng.integers(len(_CAPTION_QS)))], _caption(w, h, shapes)))
    want = int(rng.integers(4, 8))
    while len(rounds) < want and by_kind:
        kinds = sorted(by_kind)
        k = kinds[int(rng.integers(len(kinds)))]
        pool = by_kind[k]
        rounds.append(pool.pop(int(rng.integers(len(pool)))))
        if not pool:
            del by_kind[k]
    turns = []
    for i, (q, a) in enumerate(rounds):
        turns.append({"from": "human", "value": ("<image>\n" + q) if i == 0 else q})
        turns.append({"from": "gpt", "value": a})
    return turns


def probe_items(rng, w: int, h: int, shapes: list[dict], stem: str, image: str) -> list[dict]:
    """Held-out items for scoring per question kind: one single-round LLaVA item per kind the scene
    supports (a random question of that kind), id "{stem}_{kind}"; a reader then yields one row per
    question, and every kind is asked of every scene that supports it."""
    by_kind: dict[str, list[tuple[str, str]]] = {
        "caption": [(q, _caption(w, h, shapes)) for q in _CAPTION_QS]
    }
    for q, a in questions(w, h, shapes):
        by_kind.setdefault(vqa_kind(q), []).append((q, a))
    out = []
    for kind in VQA_KINDS:
        pool = by_kind.get(kind)
        if pool:
            q, a = pool[int(rng.integers(len(pool)))]
            turns = [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]
            out.append({"id": f"{stem}_{kind}", "image": image, "conversations": turns})
    return out


_C = "(?:" + "|".join(COLORS) + ")"
_K = "(?:" + "|".join(SHAPES) + ")"
_KS = "(?:" + "|".join(plural(k, 2) for k in SHAPES) + ")"
_VQA_PATTERNS = {
    "caption": tuple(re.escape(q) for q in _CAPTION_QS),
    "count": (
        "How many shapes are there in the image\\?",
        f"How many {_KS} are there\\?",
        f"How many {_C} shapes are there\\?",
    ),
    "color": (f"What colour is the {_K}\\?",),
    "shape": (f"What shape is the {_C} object\\?",),
    "position": (f"Where is the {_C} {_K} in the image\\?",),
    "size": (
        f"Which is bigger, the {_C} {_K} or the {_C} {_K}\\?",
        "What is the (?:biggest|smallest) shape in the image\\?",
    ),
    "corners": (f"How many corners does the {_C} {_K} have\\?",),
    "relation": (f"Is the {_C} {_K} (?:to the left of|above) the {_C} {_K}\\?",),
    "existence": (f"Is there an? {_C} {_K} in the image\\?",),
}
_VQA_RES = {k: [re.compile(p) for p in ps] for k, ps in _VQA_PATTERNS.items()}
_REGIONS = (
    "top left",
    "top right",
    "bottom left",
    "bottom right",
    "top",
    "bottom",
    "left",
    "right",
    "center",
)


def vqa_kind(question: str) -> str | None:
    """The kind (one of `VQA_KINDS`) of a generated VQA question (`<image>` and spaces ignored); else None."""
    q = question.replace("<image>", "").strip()
    for kind, pats in _VQA_RES.items():
        if any(p.fullmatch(q) for p in pats):
            return kind
    return None


def _first(pattern: str, text: str) -> str | None:
    m = re.search(pattern, text)
    return None if m is None else m.group(0)


def vqa_key(question: str, answer: str) -> str | None:
    """What scoring compares in an answer to `question`: the number (count, corners; "no" -> "0"), the colour,
    the kind, the grid region, the named shape (size), "yes"/"no" (relation, existence); None for a caption,
    an unknown question or an answer without the key. Case-insensitive; the first match counts."""
    kind = vqa_kind(question)
    a = answer.lower()
    if kind in ("count", "corners"):
        m = _first(f"\\b{_NUM}\\b", a)
        return None if m is None else ("0" if m == "no" else str(int(m)))
    if kind == "color":
        return _first(_C, a)
    if kind == "shape":
        return _first(_K, a)
    if kind == "position":
        return _first("|".join(_REGIONS), a)
    if kind == "size":
        return _first(f"{_C} {_K}", a)
    if kind in ("relation", "existence"):
        return _first("\\b(?:yes|no)\\b", a)
    return None
