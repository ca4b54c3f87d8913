"""The generated shapes mix (`read_jax.data.make_shapes`): every source is read by its real reader, and what
the readers return agrees with the scenes; held-out scenes are never training scenes; the writer is
deterministic, resumable and never writes into a directory that is not its own.

The checks interpret the written files on their own terms: instance colours are read back from the pictures,
areas and positions from the polygons, expressions and VQA questions by a small parser written here (not the
generator's tables), and masks are rasterised here with PIL.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re

import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image, ImageDraw

from read_jax.config import ConfigError
from read_jax.data import loaders, make_shapes
from read_jax.data import mixture as M
from read_jax.data import readers as R
from read_jax.data.shapes import write as W

SEED = 4  # its first 10 PACO scenes include classes of several instances
COUNTS = {"train": 10, "val": 6, "test": 6}
COLOR_WORDS = _C = "|".join(make_shapes.COLORS)
KIND_WORDS = _K = "|".join(make_shapes.SHAPES)
HELD_OUT = ("val", "test")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mix") / "dataset")
    W.write_mix(out, COUNTS, SEED, workers=0, progress=False)
    return out


# ---- helpers: geometry read back from the files --------------------------------------------------------
def load_json(path: str):
    with open(path) as f:
        return json.load(f)


def load_pickle(path: str):
    with open(path, "rb") as f:
        return pickle.load(f)


def raster(polys, h: int, w: int) -> np.ndarray:
    im = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(im)
    for p in polys:
        draw.polygon([(float(x), float(y)) for x, y in np.asarray(p).reshape(-1, 2)], fill=1)
    return np.asarray(im).astype(bool)


def shrink(m: np.ndarray) -> np.ndarray:
    """3x3 erosion."""
    p = np.pad(m, 1)
    return np.all(
        [
            p[1 + dy : p.shape[0] - 1 + dy, 1 + dx : p.shape[1] - 1 + dx]
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        ],
        0,
    )


def grow(m: np.ndarray) -> np.ndarray:
    return ~shrink(~m)


def assert_mask_is(mask: np.ndarray, polys, why: str):
    """The reader's mask is the polygons up to the one-pixel boundary two rasterisers disagree on."""
    want = raster(polys, *mask.shape)
    m = mask.astype(bool)
    assert m.any() and not (shrink(want) & ~m).any() and not (m & ~grow(want)).any(), why


def colour_of(img: np.ndarray, poly) -> str:
    """The palette colour nearest the median colour inside the polygon (outline excluded)."""
    inside = shrink(shrink(raster([poly], *img.shape[:2])))
    med = np.median(img[inside], axis=0)
    return min(make_shapes.COLORS, key=lambda c: np.abs(np.asarray(make_shapes.COLORS[c]) - med).sum())


def shoelace(poly) -> float:
    p = np.asarray(poly, float).reshape(-1, 2)
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def objects_from_coco(img: np.ndarray, anns: list[dict], kinds: dict[int, str]) -> list[dict]:
    out = []
    for a in anns:
        poly = np.asarray(a["segmentation"][0], float).reshape(-1, 2)
        c = poly.mean(0)
        out.append(
            {
                "id": a["id"],
                "kind": kinds[a["category_id"]],
                "color": colour_of(img, poly),
                "cx": c[0],
                "cy": c[1],
                "area": shoelace(poly),
                "poly": poly,
            }
        )
    return out


# ---- 1. every source through its real reader -----------------------------------------------------------
def test_every_source_is_read_by_its_real_reader(root):
    sources = M.build_reference_sources(root, M.SOURCES, sub_datasets=make_shapes.SUB_DATASETS)
    n = COUNTS["train"]
    sizes = {r.name: len(r) for src in sources.values() for r in getattr(src, "readers", [src])}
    assert sizes == {
        "mapillary": n, "paco_lvis": n, "refclef": n, "refcoco": n, "refcoco+": n, "refcocog": n,
        "R-refcoco": n, "R-refcoco+": n, "R-refcocog": n, "fprefcoco": n, "fprefcoco+": n, "fprefcocog": n,
        "vqa": n, "reason_seg": n,
    }  # fmt: skip
    assert not any(r.dropped for src in sources.values() for r in getattr(src, "readers", [src]))
    rng = np.random.default_rng(0)
    for name, src in sources.items():
        for _ in range(4):
            ex = src.sample(rng)
            assert ex.conversations and os.path.isfile(ex.image_path), name
    # The eval readers of the held-out splits (the protocols' own readers).
    cfg = ConfigDict({"root": root, "reason_seg_dir": "{root}/reason_seg/ReasonSeg", "seed": 0})
    for split in HELD_OUT:
        assert len(loaders.eval_reader(cfg, "reasonseg", split)) == COUNTS[split]
    unc, umd = ("val", "testA", "testB"), ("val", "test")
    held = {"refcoco": unc, "refcoco+": unc, "refcocog": umd, "fprefcoco": umd, "R-refcoco": unc}
    for ds, splits in held.items():
        got = sum(len(loaders.eval_reader(cfg, ds, s)) for s in splits)
        assert got == COUNTS["val"] + COUNTS["test"], ds
    for split in HELD_OUT:
        rd = R.VqaReader(*make_shapes.vqa_paths(root, split))
        assert len({rd[i].image_path for i in range(len(rd))}) == COUNTS[split]
        assert all(not rd[i].conversations[0].more_rounds for i in range(len(rd)))  # one question per row


# ---- 2. sem_seg: the mask of a class is all its instances ----------------------------------------------
def test_sem_seg_masks_are_every_instance_of_the_class(root):
    group = R.sem_seg_group(root, ("mapillary", "paco_lvis"), mode_weights=(1.0, 0.0, 0.0), max_convs=6)
    mapillary, paco = group.readers
    assert mapillary.classes == list(make_shapes.SHAPES)  # from config_v2.0.json, read by the reader
    kinds = {
        c["id"]: c["name"]
        for c in load_json(os.path.join(root, "vlpart/paco/annotations/paco_lvis_v1_train.json"))[
            "categories"
        ]
    }
    assert len(kinds) == 36 and all(
        re.fullmatch(f"(?:{COLOR_WORDS}) (?:{KIND_WORDS})", k) for k in kinds.values()
    )
    checked = {"mapillary": 0, "paco_lvis": 0}
    for reader, classes in ((mapillary, KIND_WORDS), (paco, f"(?:{COLOR_WORDS}) (?:{KIND_WORDS})")):
        for i in range(len(reader)):
            ex = reader[i]
            img = np.asarray(Image.open(ex.image_path).convert("RGB")).astype(int)
            index = int(re.search(r"_(\d+)\.jpg$", ex.image_path).group(1))
            w, h, shapes = make_shapes.scene_of(SEED, reader.name, "train", index)
            assert img.shape[:2] == (h, w)
            for s in shapes:  # the geometry is the picture's: each instance has its colour there
                assert colour_of(img, s["poly"]) == s["color"]
            for conv in ex.conversations:
                (cls,) = {m.group(0) for m in re.finditer(rf"\b{classes}\b", conv.question)}
                members = [s["poly"] for s in shapes if cls in (s["kind"], f"{s['color']} {s['kind']}")]
                mask = ex.masks[conv.mask_index]
                if reader is mapillary:  # PIL wrote it: the same raster exactly
                    np.testing.assert_array_equal(mask.astype(bool), raster(members, h, w))
                else:
                    assert_mask_is(mask, members, f"{ex.sample_id} {cls}")
                checked[reader.name] += len(members) > 1
    assert min(checked.values()) > 0, checked  # classes of several instances were among them


# ---- 3. referring expressions: each picks exactly the instance of its ref ------------------------------
_LABEL = rf"(?:(?P<color>{COLOR_WORDS}) )?(?P<kind>{KIND_WORDS})"
_LABEL2 = rf"(?:(?P<color2>{COLOR_WORDS}) )?(?P<kind2>{KIND_WORDS})"
_REF = rf"the (?P<rc>{COLOR_WORDS}) (?P<rk>{KIND_WORDS})"
_GRAMMAR = [
    ("name", rf"the (?P<color>{_C}) (?P<kind>{_K})|the (?P<kind2>{_K}) that is (?P<color2>{_C})"),
    ("kind", rf"the (?P<kind>{KIND_WORDS})|the only (?P<kind2>{KIND_WORDS}) in the picture"),
    ("color", rf"the (?P<color>{COLOR_WORDS}) shape|the only (?P<color2>{COLOR_WORDS}) shape in the picture"),
    ("big", rf"the big {_LABEL}|the {_LABEL2} that is bigger than the other .+"),
    ("small", rf"the small {_LABEL}|the {_LABEL2} that is smaller than the other .+"),
    ("left", rf"the {_LABEL} (?:on the left|that is furthest to the left)"),
    ("right", rf"the {_LABEL} (?:on the right|that is furthest to the right)"),
    ("above", rf"the {_LABEL} (?:at the top|closest to the top of the picture)"),
    ("below", rf"the {_LABEL} (?:at the bottom|closest to the bottom of the picture)"),
    ("rel_left", rf"the {_LABEL} (?:that is to the left of|left of) {_REF}"),
    ("rel_right", rf"the {_LABEL} (?:that is to the right of|right of) {_REF}"),
    ("rel_above", rf"the {_LABEL} (?:that is )?above {_REF}"),
    ("rel_below", rf"the {_LABEL} (?:that is )?below {_REF}"),
]  # fmt: skip


def referents(sent: str, objs: list[dict]) -> list[int]:
    """The ids of the objects `sent` describes, by this test's reading of the generated phrasings."""
    for key, pat in _GRAMMAR:
        m = re.fullmatch(pat, sent)
        if m is None:
            continue
        g = {k.rstrip("2"): v for k, v in m.groupdict().items() if v is not None}
        fits = [
            o
            for o in objs
            if o["kind"] == g.get("kind", o["kind"]) and o["color"] == g.get("color", o["color"])
        ]
        if key in ("name", "kind", "color"):
            return [o["id"] for o in fits]
        if not fits:
            return []
        order = {"big": ("area", -1), "small": ("area", 1), "left": ("cx", 1), "right": ("cx", -1),
                 "above": ("cy", 1), "below": ("cy", -1)}  # fmt: skip
        if key in order:
            field, sign = order[key]
            return [min(fits, key=lambda o: sign * o[field])["id"]]
        (ref,) = [o for o in objs if (o["color"], o["kind"]) == (g["rc"], g["rk"])]  # a unique reference
        field, sign = {"rel_left": ("cx", -1), "rel_right": ("cx", 1), "rel_above": ("cy", -1),
                       "rel_below": ("cy", 1)}[key]  # fmt: skip
        return [o["id"] for o in fits if o is not ref and sign * (o[field] - ref[field]) > 0]
    raise AssertionError(f"not a generated phrasing: {sent!r}")


REFER_IMAGES = {"refclef": "refer_seg/images/saiapr_tc-12"}


def test_every_expression_picks_exactly_its_instance(root):
    seen = {"true": 0, "negative": 0, "false_premise": 0}
    images = {}
    for ds in R.REFER_SETS:
        inst = load_json(os.path.join(root, "refer_seg", ds, "instances.json"))
        refs = load_pickle(os.path.join(root, "refer_seg", ds, f"refs({R.split_by(ds)}).p"))
        kinds = {c["id"]: c["name"] for c in inst["categories"]}
        by_image = {}
        for a in inst["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        files = {im["id"]: im["file_name"] for im in inst["images"]}
        img_dir = REFER_IMAGES.get(ds, "refer_seg/images/mscoco/images/train2014")
        for ref in refs:
            key = (img_dir, ref["image_id"])
            if key not in images:
                img = np.asarray(Image.open(os.path.join(root, img_dir, files[ref["image_id"]]))).astype(int)
                images[key] = objects_from_coco(img, by_image[ref["image_id"]], kinds)
            objs = images[key]
            assert ref["split"] in {"train", "val", "test", "testA", "testB"}
            for s in ref["sentences"]:
                got = referents(s["sent"], objs)
                if s.get("is_false_premise") or s.get("exist") is False:
                    assert got == [], (ds, s)
                    seen["false_premise" if "gt_sent" in s else "negative"] += 1
                    if "gt_sent" in s:
                        assert referents(s["gt_sent"], objs) == [ref["ann_id"]], (ds, s)
                else:
                    assert got == [ref["ann_id"]], (ds, s["sent"], got, ref["ann_id"])
                    seen["true"] += 1
                if ds in ("refcoco+", "R-refcoco+", "fprefcoco+"):  # RefCOCO+ has no location words
                    assert not re.search(r"\b(left|right|top|bottom|above|below)\b", s["sent"]), s
    assert min(seen.values()) >= 10, seen
    phrasings = {k for ds in ("refcoco", "refcocog") for k, _ in _GRAMMAR}
    assert len(phrasings) == len(_GRAMMAR)


def test_refer_readers_give_the_instance_masks(root):
    """The real reader's masks are the annotated instances; a false premise's eval GT is empty."""
    rd = R.ReferReader(os.path.join(root, "refer_seg"), "fprefcoco", "val", mode="eval")
    inst = load_json(os.path.join(root, "refer_seg", "fprefcoco", "instances.json"))
    polys = {a["id"]: a["segmentation"][0] for a in inst["annotations"]}
    n_fp = 0
    for i in range(len(rd)):
        ex = rd[i]
        refs = {r["ref_id"]: r for r in rd.img2refs[rd.image_ids[i]]}
        for c, ref_id in zip(ex.conversations, ex.meta["ref_ids"]):
            mask = ex.masks[c.mask_index]
            if c.exists:
                assert_mask_is(mask, [polys[refs[ref_id]["ann_id"]]], ex.sample_id)
            else:
                assert not mask.any()
                n_fp += 1
    assert n_fp >= COUNTS["val"]


# ---- 4. VQA: every answer agrees with the scene --------------------------------------------------------
def _region(o: dict, w: int, h: int) -> str:
    v = ("top", "", "bottom")[min(2, int(3 * o["cy"] / h))]
    u = ("left", "", "right")[min(2, int(3 * o["cx"] / w))]
    return f"{v} {u}".strip() or "center"


def check_answer(q: str, a: str, objs: list[dict], w: int, h: int) -> str:
    """Asserts that answer `a` to `q` is true of the scene; returns the question's kind (this test's)."""

    def named(c, k):
        (o,) = [o for o in objs if (o["color"], o["kind"]) == (c, k)]  # the question names a unique shape
        return o

    def number(text):
        m = re.search(r"\b(no|\d+)\b", text)
        return 0 if m.group(1) == "no" else int(m.group(1))

    if m := re.fullmatch(
        rf"How many (?:(?P<k>{_K})s|(?P<c>{_C}) shapes|shapes) are there(?: in the image)?\?",
        q,
    ):
        n = sum(o["kind"] == (m["k"] or o["kind"]) and o["color"] == (m["c"] or o["color"]) for o in objs)
        assert number(a) == n
        return "count"
    if m := re.fullmatch(rf"What colour is the ({KIND_WORDS})\?", q):
        (o,) = [o for o in objs if o["kind"] == m[1]]
        assert re.findall(COLOR_WORDS, a) == [o["color"]]
        return "color"
    if m := re.fullmatch(rf"What shape is the ({COLOR_WORDS}) object\?", q):
        (o,) = [o for o in objs if o["color"] == m[1]]
        assert re.findall(KIND_WORDS, a) == [o["kind"]]
        return "shape"
    if m := re.fullmatch(rf"Where is the ({COLOR_WORDS}) ({KIND_WORDS}) in the image\?", q):
        assert re.search(r"(?:at the|in the) (.+) of the image", a)[1] == _region(named(m[1], m[2]), w, h)
        return "position"
    if m := re.fullmatch(
        rf"Which is bigger, the ({COLOR_WORDS}) ({KIND_WORDS}) or the ({COLOR_WORDS}) ({KIND_WORDS})\?", q
    ):
        big = max(named(m[1], m[2]), named(m[3], m[4]), key=lambda o: o["area"])
        assert a == f"The {big['color']} {big['kind']} is bigger."
        return "size"
    if m := re.fullmatch(r"What is the (biggest|smallest) shape in the image\?", q):
        o = (max if m[1] == "biggest" else min)(objs, key=lambda o: o["area"])
        assert a.endswith(f"the {o['color']} {o['kind']}.")
        return "size"
    if m := re.fullmatch(rf"How many corners does the ({COLOR_WORDS}) ({KIND_WORDS}) have\?", q):
        o = named(m[1], m[2])
        assert number(a) == (0 if len(o["poly"]) > 12 else len(o["poly"]))  # a circle is a 48-gon
        return "corners"
    if m := re.fullmatch(
        rf"Is the ({COLOR_WORDS}) ({KIND_WORDS}) (to the left of|above) the ({COLOR_WORDS}) ({KIND_WORDS})\?",
        q,
    ):
        oa, ob = named(m[1], m[2]), named(m[4], m[5])
        yes = oa["cx"] < ob["cx"] if m[3] == "to the left of" else oa["cy"] < ob["cy"]
        assert a.split(",")[0] == ("Yes" if yes else "No")
        return "relation"
    if m := re.fullmatch(rf"Is there an? ({COLOR_WORDS}) ({KIND_WORDS}) in the image\?", q):
        n = sum((o["color"], o["kind"]) == (m[1], m[2]) for o in objs)
        assert a.split(",")[0] == ("Yes" if n else "No") and (n < 2 or number(a) == n)
        return "existence"
    assert q in (
        "Describe the image briefly.",
        "What is in this picture?",
        "Give a short description of the image.",
    )
    assert a.startswith(f"The image shows {len(objs)} shapes")
    listed = re.findall(rf"\b({COLOR_WORDS}) ({KIND_WORDS})\b", a)
    assert sorted(listed) == sorted((o["color"], o["kind"]) for o in objs)
    return "caption"


def test_vqa_answers_agree_with_the_scene(root):
    kinds = set()
    for split in ("train", *HELD_OUT):
        path, images = make_shapes.vqa_paths(root, split)
        items = load_json(path)
        assert len({it["image"] for it in items}) == COUNTS[split]
        probed = {}  # held out: the question kinds asked of each scene
        for it in items:
            index = int(re.search(r"_(\d+)\.jpg$", it["image"]).group(1))
            w, h, shapes = make_shapes.scene_of(SEED, "vqa", split, index)
            img = np.asarray(Image.open(os.path.join(images, it["image"]))).astype(int)
            objs = []
            for s in shapes:  # what the picture shows, read back from it
                c = np.asarray(s["poly"]).mean(0)
                objs.append({"kind": s["kind"], "color": colour_of(img, s["poly"]), "cx": c[0], "cy": c[1],
                             "area": shoelace(s["poly"]), "poly": s["poly"]})  # fmt: skip
            turns = it["conversations"]
            assert turns[0]["value"].startswith("<image>\n") and len(turns) % 2 == 0
            assert len(turns) >= 8 if split == "train" else len(turns) == 2
            for q, a in zip(turns[0::2], turns[1::2]):
                assert (q["from"], a["from"]) == ("human", "gpt")
                kind = check_answer(q["value"].replace("<image>\n", ""), a["value"], objs, w, h)
                assert make_shapes.vqa_kind(q["value"]) == kind
                kinds.add(kind)
                probed.setdefault(it["image"], []).append(kind)
        if split != "train":  # every scene is asked each kind at most once, and the kinds every scene has
            assert all(len(k) == len(set(k)) for k in probed.values())
            assert all({"caption", "count", "existence"} <= set(k) for k in probed.values())
    assert kinds == set(make_shapes.VQA_KINDS)


def test_vqa_key_reads_the_scored_part_of_an_answer():
    key = make_shapes.vqa_key
    assert key("How many circles are there?", "There are no circles in the image.") == "0"
    assert key("How many red shapes are there?", "I count 3 of them") == "3"
    assert key("How many corners does the blue star have?", "The blue star has 10 corners.") == "10"
    assert key("What colour is the star?", "It is Blue, I think") == "blue"
    assert key("What shape is the red object?", "a hexagon") == "hexagon"
    assert key("Where is the red circle in the image?", "At the top left.") == "top left"
    assert key("Where is the red circle in the image?", "At the top.") == "top"
    assert key("Which is bigger, the red circle or the blue star?", "The blue star is bigger.") == "blue star"
    assert key("Is the red circle above the blue star?", "No, it is below.") == "no"
    assert key("Is there a red circle in the image?", "Yes.") == "yes"
    assert key("Describe the image briefly.", "Shapes.") is None
    assert key("What colour is the star?", "I cannot tell.") is None
    assert make_shapes.vqa_kind("What colour is the sky?") is None


# ---- 5. held-out scenes are never training scenes ------------------------------------------------------
def _digest(path: str) -> str:
    return hashlib.sha256(np.asarray(Image.open(path)).tobytes()).hexdigest()


def _polygons(root: str) -> dict[str, set]:
    """{"train" | "held_out": rounded instance polygons} of every source's annotations."""
    out = {"train": set(), "held_out": set()}

    def add(where, poly):
        out[where].add(tuple(np.round(np.asarray(poly, float).reshape(-1), 1)))

    reason = make_shapes.default_reason_seg_dir(root)
    for split in make_shapes.SPLITS:
        for f in os.listdir(os.path.join(reason, split)):
            if f.endswith(".json"):
                for s in load_json(os.path.join(reason, split, f))["shapes"]:
                    add("train" if split == "train" else "held_out", s["points"])
    for ds in ("refcoco", "refclef"):
        refs = load_pickle(os.path.join(root, "refer_seg", ds, f"refs({R.split_by(ds)}).p"))
        split_of = {r["image_id"]: "train" if r["split"] == "train" else "held_out" for r in refs}
        for a in load_json(os.path.join(root, "refer_seg", ds, "instances.json"))["annotations"]:
            add(split_of.get(a["image_id"], "train"), a["segmentation"][0])
    for a in load_json(os.path.join(root, "vlpart/paco/annotations/paco_lvis_v1_train.json"))["annotations"]:
        for p in a["segmentation"]:
            add("train", p)
    return out


def test_held_out_scenes_are_never_training_scenes(root):
    def pictures(d):
        return {os.path.join(d, f) for f in os.listdir(d) if f.endswith(".jpg")}

    reason = make_shapes.default_reason_seg_dir(root)
    held = pictures(os.path.join(root, "coco", "val2017"))
    held |= {p for s in HELD_OUT for p in pictures(os.path.join(reason, s))}
    train = pictures(os.path.join(reason, "train")) | pictures(os.path.join(root, "coco", "train2017"))
    train |= pictures(os.path.join(root, "mapillary", "training", "images"))
    train |= pictures(os.path.join(root, "refer_seg", "images", "saiapr_tc-12"))
    for p in pictures(os.path.join(root, "refer_seg", "images", "mscoco", "images", "train2014")):
        (held if "_train_" not in os.path.basename(p) else train).add(p)
    assert len(held) == 3 * (COUNTS["val"] + COUNTS["test"])
    assert len(train) == 6 * COUNTS["train"]  # ReasonSeg, Mapillary, PACO, VQA, RefCOCO, RefCLEF
    held_px, train_px = {_digest(p) for p in held}, {_digest(p) for p in train}
    assert len(held_px) == len(held) and len(train_px) == len(train)
    assert not held_px & train_px
    polys = _polygons(root)
    assert len(polys["held_out"]) > 2 * (COUNTS["val"] + COUNTS["test"])
    assert not polys["held_out"] & polys["train"]  # no held-out instance's geometry in any training source


# ---- 6. determinism, parallel writing, resume, and the marker ------------------------------------------
def _files(d: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(d):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, d)] = f.read()
    return out


def test_same_seed_same_bytes_in_parallel_too(root, tmp_path):
    again = str(tmp_path / "again")
    W.write_mix(again, COUNTS, SEED, workers=2, progress=False)  # 108 scenes: spawned workers
    assert _files(again) == _files(root)
    other = str(tmp_path / "other")
    W.write_mix(
        other, {"train": 2, "val": 1, "test": 1}, SEED + 1, sources=("vqa", "refer_seg"), progress=False
    )
    mine = _files(other)
    assert mine.keys() <= _files(root).keys()
    assert all(mine[k] != _files(root)[k] for k in mine if k.endswith(".jpg"))


def test_an_interrupted_write_resumes_to_the_same_set(root, tmp_path, monkeypatch):
    part = str(tmp_path / "part")
    calls = {"n": 0}
    job = W.scene_job

    def crashing(j):
        calls["n"] += 1
        if calls["n"] > 40:
            raise KeyboardInterrupt
        return job(j)

    monkeypatch.setattr(W, "scene_job", crashing)
    with pytest.raises(KeyboardInterrupt):
        W.write_mix(part, COUNTS, SEED, workers=0, progress=False)
    monkeypatch.setattr(W, "scene_job", job)
    assert 0 < len(_files(part)) < len(_files(root)) and "complete" not in make_shapes.read_marker(part)
    stale = os.path.join(part, "coco", "train2017", "shapes_vqa_train_00009.jpg.tmp12345")  # killed mid-write
    os.makedirs(os.path.dirname(stale), exist_ok=True)
    with open(stale, "wb") as f:
        f.write(b"half a jpeg")
    W.write_mix(part, COUNTS, SEED, workers=0, progress=False)
    assert _files(part) == _files(root)


def test_a_top_up_extends_index_files_but_keeps_hand_edits(tmp_path):
    d = str(tmp_path / "d")
    small = {"train": 2, "val": 1, "test": 0}
    W.write_mix(d, small, SEED, sources=("vqa", "refer_seg"), progress=False)
    llava = os.path.join(d, "llava_dataset", "llava_instruct_150k.json")
    edited = load_json(llava)[:1]
    with open(llava, "w") as f:
        json.dump(edited, f)
    W.write_mix(d, {"train": 4, "val": 1, "test": 0}, SEED, sources=("vqa", "refer_seg"), progress=False)
    assert load_json(llava) == edited  # the hand edit stays
    refs = load_pickle(os.path.join(d, "refer_seg", "refcoco", "refs(unc_exclude_unified).p"))
    assert len({r["image_id"] for r in refs if r["split"] == "train"}) == 4  # the generator's file grew
    # Complete and unchanged: a rerun returns at once, writing nothing.
    before = _files(d)
    W.write_mix(d, {"train": 4, "val": 1, "test": 0}, SEED, sources=("vqa", "refer_seg"), progress=False)
    assert _files(d) == before


def test_never_writes_where_it_does_not_belong(tmp_path, capsys):
    user = tmp_path / "user"
    user.mkdir()
    (user / "mine.txt").write_text("a user's file")
    with pytest.raises(FileExistsError):
        W.write_mix(str(user), COUNTS, SEED, progress=False)
    assert make_shapes.main(["--out", str(user), "--num-train", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds data the shapes generator did not write" in err and len(err.splitlines()) == 1
    assert sorted(os.listdir(user)) == ["mine.txt"]
    own = str(tmp_path / "own")
    W.write_mix(own, {"train": 1, "val": 0, "test": 0}, SEED, sources=("vqa",), progress=False)
    with pytest.raises(ValueError, match=f"seed {SEED}, not {SEED + 1}"):
        W.write_mix(own, {"train": 1}, SEED + 1, sources=("vqa",), progress=False)
    with pytest.raises(ValueError, match="outside the generated root"):
        W.write_mix(own, {"train": 1}, SEED, sources=("reason_seg",), reason_seg_dir=str(tmp_path / "rs"))
    assert not (tmp_path / "rs").exists()


def test_run_config_writes_the_mix_it_reads(tmp_path):
    """`data.make_shapes` writes the sources of `data.rates` and the loaders read them with the configured
    sub-datasets; a sem_seg list the generator does not write is a ConfigError naming it."""
    d = ConfigDict({"make_shapes": True, "root": str(tmp_path / "ds"), "rates": "read_7b"})
    d.num_shapes, d.reason_seg_dir, d.sem_seg_data = (
        (2, 1, 0),
        "{root}/reason_seg/ReasonSeg",
        "ade20k||mapillary",
    )
    with pytest.raises(ConfigError, match=r"sem_seg_data names \['ade20k'\].*mapillary\|\|paco_lvis"):
        loaders.ensure_shapes_data(d)
    d.sem_seg_data = "mapillary||paco_lvis"
    loaders.ensure_shapes_data(d)
    names = loaders.mixture_sources(d)
    sources = M.build_reference_sources(
        d.root, names, reason_seg_dir=loaders.reason_seg_dir(d), sub_datasets=loaders.sub_datasets(d)
    )
    assert set(sources) == set(M.SOURCES) and all(len(s) >= 2 for s in sources.values())
    with pytest.raises(ValueError, match="sub_datasets names sources without sub-datasets"):
        M.build_reference_sources(d.root, names, sub_datasets={"vqa": ("x",)})
