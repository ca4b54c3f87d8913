"""Referring expressions from the shapes world, in the flavours of RefCOCO, RefCOCO+, RefCOCOg and RefCLEF,
with R-RefCOCO's negatives (`exist: false`) and FP-RefCOCO's false premises (`is_false_premise`, `gt_sent`).

Every expression is unique by construction: it names the target's colour + kind when no other instance has
them, its kind or colour alone when unique, or picks it out of the instances sharing its label ("red circle"
or "circle") by size (area ratio >= `SIZE_RATIO` to every other one), by position (beyond every other one by
>= `MARGIN` px in a direction), or by a relation to a uniquely named reference instance (the target lies
>= `MARGIN` px in that direction of it, every other instance with the label lies on the other side of it).
Flavours, as the real sets differ: RefCOCO and RefCLEF short ("the big red circle", "the circle left of the
blue square"), RefCOCO+ without location words, RefCOCOg longer sentences ("the circle that is to the left of
the blue square").

A negative (R-RefCOCO) describes nothing in the scene: an absent colour + kind, kind or colour, or an
existing kind in a relation none of its instances satisfies. A false premise (FP-RefCOCO) is one of a ref's
true expressions with the target's colour or kind swapped for one no instance has; its `gt_sent` is the
true expression.
"""

from __future__ import annotations

from read_jax.data.shapes.scene import COLORS, DIRS, MARGIN, SHAPES, SIZE_RATIO, bbox, flat_polygon, name

SHORT = {
    "name": "the {color} {kind}",
    "kind": "the {kind}",
    "color": "the {color} shape",
    "big": "the big {label}",
    "small": "the small {label}",
    "left": "the {label} on the left",
    "right": "the {label} on the right",
    "above": "the {label} at the top",
    "below": "the {label} at the bottom",
    "rel_left": "the {label} left of the {rc} {rk}",
    "rel_right": "the {label} right of the {rc} {rk}",
    "rel_above": "the {label} above the {rc} {rk}",
    "rel_below": "the {label} below the {rc} {rk}",
}
LONG = {
    "name": "the {kind} that is {color}",
    "kind": "the only {kind} in the picture",
    "color": "the only {color} shape in the picture",
    "big": "the {label} that is bigger than the other {labels}",
    "small": "the {label} that is smaller than the other {labels}",
    "left": "the {label} that is furthest to the left",
    "right": "the {label} that is furthest to the right",
    "above": "the {label} closest to the top of the picture",
    "below": "the {label} closest to the bottom of the picture",
    "rel_left": "the {label} that is to the left of the {rc} {rk}",
    "rel_right": "the {label} that is to the right of the {rc} {rk}",
    "rel_above": "the {label} that is above the {rc} {rk}",
    "rel_below": "the {label} that is below the {rc} {rk}",
}
# dataset -> (templates, location words allowed); R-RefCOCO and FP-RefCOCO extend the set they were built on.
FLAVOURS = {
    "refclef": (SHORT, True),
    "refcoco": (SHORT, True),
    "refcoco+": (SHORT, False),
    "refcocog": (LONG, True),
}
BASE = {
    "R-refcoco": "refcoco",
    "R-refcoco+": "refcoco+",
    "R-refcocog": "refcocog",
    "fprefcoco": "refcoco",
    "fprefcoco+": "refcoco+",
    "fprefcocog": "refcocog",
}
COCO_FAMILY = ("refcoco", "refcoco+", "refcocog", *BASE)  # the sets on RefCOCO's images (train2014)
CATEGORIES = [{"id": i + 1, "name": k, "supercategory": "shape"} for i, k in enumerate(SHAPES)]


LOCATION_KEYS = ("left", "right", "above", "below", "rel_left", "rel_right", "rel_above", "rel_below")


def facts(shapes: list[dict], t: int) -> list[tuple[str, str, str, int | None]]:
    """What picks out instance t and no other, flavour-free: (template key, label, plural label, reference
    instance or None); a label is "{color} {kind}" or "{kind}"."""
    s, out = shapes[t], []
    names = [name(o) for o in shapes]
    for key, vals in (
        ("name", names),
        ("kind", [o["kind"] for o in shapes]),
        ("color", [o["color"] for o in shapes]),
    ):
        if vals.count(vals[t]) == 1:
            out.append((key, "", "", None))
    groups = [
        ("{color} {kind}", [i for i, n in enumerate(names) if n == names[t]]),
        ("{kind}", [i for i, o in enumerate(shapes) if o["kind"] == s["kind"]]),
    ]
    for label, group in groups:
        others = [shapes[i] for i in group if i != t]
        if not others:
            continue
        labels = label if len(others) == 1 else label + "s"
        if s["area"] >= SIZE_RATIO * max(o["area"] for o in others):
            out.append(("big", label, labels, None))
        if s["area"] * SIZE_RATIO <= min(o["area"] for o in others):
            out.append(("small", label, labels, None))
        for d, gap in DIRS.items():
            if all(gap(s, o) >= MARGIN for o in others):
                out.append((d, label, "", None))
    for r, ref in enumerate(shapes):
        if r == t or names.count(names[r]) != 1:
            continue
        for d, gap in DIRS.items():
            if gap(s, ref) < MARGIN:
                continue
            for label, group in reversed(groups):  # the kind alone if it suffices
                if all(gap(shapes[i], ref) < 0 for i in group if i not in (t, r)):
                    out.append(("rel_" + d, label, "", r))
                    break
    return out


def expressions(
    shapes: list[dict], t: int, templates: dict, location: bool, found=None
) -> list[tuple[str, dict]]:
    """Every expression of the flavour that picks out instance t and no other, as (template, slots): the
    template has only the target's colour/kind slots left (a false premise swaps them). `found`: `facts`."""
    s, out = shapes[t], {}
    for key, label, labels, r in facts(shapes, t) if found is None else found:
        if not location and key in LOCATION_KEYS:
            continue
        tpl = templates[key].replace("{label}", label).replace("{labels}", labels)
        if r is not None:
            tpl = tpl.replace("{rc}", shapes[r]["color"]).replace("{rk}", shapes[r]["kind"])
        slots = {"color": s["color"], "kind": s["kind"]}
        out.setdefault(tpl.format(**slots), (tpl, slots))
    return list(out.values())


def negatives(rng, shapes: list[dict], templates: dict, location: bool) -> list[str]:
    """1-2 expressions that describe nothing in the scene (R-RefCOCO's `exist: false`): an absent colour +
    kind, kind or colour, or (with location words) an existing kind in a relation to a uniquely named
    instance that none of its instances satisfies (each on the other side by >= `MARGIN` px)."""
    pairs = {(o["color"], o["kind"]) for o in shapes}
    kinds, colors = {o["kind"] for o in shapes}, {o["color"] for o in shapes}
    cands: list[tuple[str, dict]] = [
        ("name", dict(color=c, kind=k)) for c in COLORS for k in SHAPES if (c, k) not in pairs
    ]
    cands += [("kind", dict(kind=k)) for k in SHAPES if k not in kinds]
    cands += [("color", dict(color=c)) for c in COLORS if c not in colors]
    if location:
        names = [name(o) for o in shapes]
        for r, ref in enumerate(shapes):
            if names.count(names[r]) != 1:
                continue
            for d, gap in DIRS.items():
                for k in sorted(kinds):
                    group = [o for o in shapes if o["kind"] == k and o is not ref]
                    if group and all(gap(o, ref) <= -MARGIN for o in group):
                        cands.append(("rel_" + d, dict(kind=k, rc=ref["color"], rk=ref["kind"])))
    out = []
    for i in rng.permutation(len(cands))[: int(rng.integers(1, 3))]:
        key, slots = cands[i]
        out.append(templates[key].replace("{label}", "{kind}").format(**slots))
    return out


def false_premise(rng, shapes: list[dict], expr: tuple[str, dict]) -> str | None:
    """`expr` with the target's colour or kind swapped so that no instance fits it (None if it cannot)."""
    tpl, slots = expr
    pairs = {(o["color"], o["kind"]) for o in shapes}
    kinds, colors = {o["kind"] for o in shapes}, {o["color"] for o in shapes}
    if "{color}" in tpl and "{kind}" in tpl:
        opts = [dict(slots, color=c) for c in COLORS if (c, slots["kind"]) not in pairs]
    elif "{kind}" in tpl:
        opts = [dict(slots, kind=k) for k in SHAPES if k not in kinds]
    else:
        opts = [dict(slots, color=c) for c in COLORS if c not in colors]
    if not opts:
        return None
    return tpl.format(**opts[int(rng.integers(len(opts)))])


def _sentences(texts: list[str], first_id: int, **extra) -> list[dict]:
    return [
        {"sent": t, "raw": t, "tokens": t.split(), "sent_id": first_id + k, **extra}
        for k, t in enumerate(texts)
    ]


def scene_refs(rng, shapes: list[dict], datasets, split_of, image_id: int, file_name: str) -> dict:
    """{dataset: [ref, ...]} of one scene for each of `datasets` (RefCOCO's refs layout: one ref per
    described instance, ann_id = image_id * 10 + instance index, 1-3 expressions each).

    `split_of(dataset)`: the split name the refs get ("train", "val", "testA", ...).
    """
    base: dict[str, list[tuple[int, list[tuple[str, dict]]]]] = {}
    found = [facts(shapes, t) for t in range(len(shapes))]
    for flavour in dict.fromkeys(BASE.get(d, d) for d in datasets):
        templates, location = FLAVOURS[flavour]
        chosen = []
        for t in range(len(shapes)):
            exprs = expressions(shapes, t, templates, location, found[t])
            if exprs:
                k = min(len(exprs), int(rng.integers(1, 4)))
                chosen.append((t, [exprs[i] for i in rng.permutation(len(exprs))[:k]]))
        base[flavour] = chosen
    out = {}
    for d in datasets:
        flavour = BASE.get(d, d)
        templates, location = FLAVOURS[flavour]
        refs = []
        for t, exprs in base[flavour]:
            ann_id = image_id * 10 + t
            texts = [tpl.format(**sl) for tpl, sl in exprs]
            if d.startswith("fp"):
                sents = _sentences(texts, ann_id * 10, is_false_premise=False)
                fp = false_premise(rng, shapes, exprs[0])
                if fp is not None:
                    sents += _sentences(
                        [fp], ann_id * 10 + len(texts), is_false_premise=True, gt_sent=texts[0]
                    )
            elif d.startswith("R-"):
                sents = _sentences(texts, ann_id * 10, exist=True)
            else:
                sents = _sentences(texts, ann_id * 10)
            refs.append(
                {
                    "ref_id": ann_id,
                    "ann_id": ann_id,
                    "image_id": image_id,
                    "category_id": list(SHAPES).index(shapes[t]["kind"]) + 1,
                    "split": split_of(d),
                    "file_name": file_name,
                    "sentences": sents,
                    "sent_ids": [x["sent_id"] for x in sents],
                }
            )
        if d.startswith("R-") and refs:
            ref = refs[int(rng.integers(len(refs)))]
            neg = _sentences(negatives(rng, shapes, templates, location), ref["ann_id"] * 10 + 5, exist=False)
            ref["sentences"] = ref["sentences"] + neg
            ref["sent_ids"] = [x["sent_id"] for x in ref["sentences"]]
        out[d] = refs
    return out


def split_name(dataset: str, split: str, index: int) -> str:
    """The split label a ref of `split` gets in `dataset`: RefCOCO(+)'s unc split has testA/testB (we
    alternate them by scene index), RefCOCOg's umd and FP-RefCOCO's berkeley splits have "test"."""
    if split != "test":
        return split
    if dataset in ("refcoco", "refcoco+", "R-refcoco", "R-refcoco+"):
        return "testA" if index % 2 == 0 else "testB"
    return "test"


def instances(w: int, h: int, shapes: list[dict], image_id: int, file_name: str) -> tuple[dict, list[dict]]:
    """(COCO image entry, COCO annotations) of a scene: one polygon annotation per instance."""
    image = {"id": image_id, "file_name": file_name, "height": h, "width": w}
    anns = [
        {
            "id": image_id * 10 + k,
            "image_id": image_id,
            "category_id": list(SHAPES).index(s["kind"]) + 1,
            "segmentation": [flat_polygon(s["poly"])],
            "area": round(float(s["area"]), 2),
            "bbox": bbox(s["poly"]),
            "iscrowd": 0,
        }
        for k, s in enumerate(shapes)
    ]
    return image, anns
