"""Readers on tiny fixtures written in each set's on-disk layout; masks against hand-made expectations."""

import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from read_jax.data import make_shapes
from read_jax.data import readers as R
from read_jax.data.conversation import ANSWER_TEMPLATE


def _img(path, h, w, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def _json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def _box(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


# ---- ReasonSeg --------------------------------------------------------------------------------------------


@pytest.fixture
def reason_root(tmp_path):
    root = str(tmp_path / "ReasonSeg")
    d = os.path.join(root, "train")
    _img(f"{d}/good.jpg", 12, 16)
    _json(
        f"{d}/good.json",
        {
            "text": ["the thing on the left", "the left thing"],
            "is_sentence": False,
            "shapes": [
                {"label": "target", "points": _box(2, 3, 9, 8)},
                {"label": "ignore", "points": _box(4, 4, 5, 5)},
                {"label": "flag", "points": _box(0, 0, 15, 11)},
            ],
            "false_premise_QA": [["the purple cow", False, "There is no purple cow, only a box."]],
        },
    )
    _img(f"{d}/sentence.jpg", 10, 10, seed=1)
    _json(
        f"{d}/sentence.json",
        {
            "text": ["Which object would you sit on?"],
            "is_sentence": True,
            "shapes": [{"label": "target", "points": _box(0, 0, 3, 3)}],
        },
    )
    _img(f"{d}/notext.jpg", 10, 10)
    _json(
        f"{d}/notext.json", {"is_sentence": True, "shapes": [{"label": "target", "points": _box(0, 0, 3, 3)}]}
    )
    _img(f"{d}/nojson.jpg", 10, 10)
    _json(f"{d}/noimage.json", {"text": ["x"], "is_sentence": False, "shapes": []})
    with open(f"{d}/corrupt.jpg", "wb") as f:
        f.write(b"\xff\xd8 definitely not a jpeg")
    _json(
        f"{d}/corrupt.json",
        {"text": ["x"], "is_sentence": False, "shapes": [{"label": "target", "points": _box(0, 0, 3, 3)}]},
    )
    # A 10k x 10k jpg header (SOF0 patched; the file stays tiny): refused from its header.
    import io

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (10000).to_bytes(2, "big") * 2
    with open(f"{d}/huge.jpg", "wb") as f:
        f.write(bytes(data))
    _json(
        f"{d}/huge.json",
        {"text": ["x"], "is_sentence": False, "shapes": [{"label": "target", "points": _box(0, 0, 3, 3)}]},
    )
    _img(f"{d}/degenerate.jpg", 10, 10)
    _json(
        f"{d}/degenerate.json",
        {"text": ["x"], "is_sentence": False, "shapes": [{"label": "target", "points": [[1, 1], [2, 2]]}]},
    )
    return root


def test_reason_seg_layout_and_drops(reason_root):
    rd = R.ReasonSegReader(reason_root, "train", seed=3)
    assert [os.path.basename(a.image) for a in rd.items] == ["good.jpg", "sentence.jpg"]
    assert rd.dropped == {
        "json without text": 1,
        "image without json": 1,
        "json without image": 1,
        "bad image": 2,
        "no usable target polygon": 1,
    }


def test_reason_seg_train_masks_and_conversations(reason_root):
    rd = R.ReasonSegReader(reason_root, "train", mode_weights=(1.0, 0.0), seed=3)
    ex = rd[0]
    expected = np.zeros((12, 16), np.uint8)
    expected[3:9, 2:10] = 1
    expected[4:6, 4:6] = 0  # "ignore" pixels are background in training (mask == 1)
    assert ex.masks.shape == (1, 12, 16)
    np.testing.assert_array_equal(ex.masks[0], expected)
    assert len(ex.conversations) == 2  # both texts (fewer than max_convs)
    for c in ex.conversations:
        assert c.has_seg and c.exists and c.mask_index == 0 and c.answer.count("[SEG]") == 1
        assert "the thing on the left" in c.question or "the left thing" in c.question
    assert rd[0].conversations[0].question == ex.conversations[0].question  # deterministic per index

    fp = R.ReasonSegReader(reason_root, "train", mode_weights=(0.0, 1.0), seed=3)[0]
    assert fp.masks.shape == (0, 12, 16)
    assert [c.answer for c in fp.conversations] == ["There is no purple cow, only a box."]
    assert "the purple cow" in fp.conversations[0].question and not fp.conversations[0].has_seg
    # Without false_premise_QA the correction mode falls back to the true premise.
    assert R.ReasonSegReader(reason_root, "train", mode_weights=(0.0, 1.0))[1].conversations[0].has_seg


def test_reason_seg_eval_protocol(reason_root):
    rd = R.ReasonSegReader(reason_root, "train", mode="eval")
    # Eval keeps degenerate.jpg (no usable target polygon: scored with an empty GT, as the reference does).
    names = [os.path.basename(a.image) for a in rd.items]
    assert names == ["degenerate.jpg", "good.jpg", "sentence.jpg"] and rd.empty_gt == 1
    assert not rd[0].masks.any()
    good, sentence = names.index("good.jpg"), names.index("sentence.jpg")
    ex = rd[good]
    expected = np.zeros((12, 16), np.uint8)
    expected[3:9, 2:10] = 1
    expected[4:6, 4:6] = 255  # eval keeps the ignore label
    np.testing.assert_array_equal(ex.masks[0], expected)
    (c,) = ex.conversations
    assert (
        c.question == "<image>\nWhat is the thing on the left in this image? Please output segmentation mask."
    )
    assert c.answer == ANSWER_TEMPLATE == "Sure, the segmentation result is [SEG]."
    assert ex.meta == {"text": "the thing on the left", "is_sentence": False}
    assert (
        rd[sentence].conversations[0].question
        == "<image>\nWhich object would you sit on? Please output segmentation mask."
    )
    assert (
        R.ReasonSegReader(reason_root, "train", mode="eval", eval_answer=False)[good].conversations[0].answer
        is None
    )


def test_reason_seg_nothing_left_is_an_error(tmp_path):
    d = tmp_path / "R" / "val"
    _json(str(d / "a.json"), {"text": ["x"]})
    _img(str(d / "a.jpg"), 5, 5)
    with pytest.raises(ValueError, match="no usable items"):
        R.ReasonSegReader(str(tmp_path / "R"), "val")


# ---- refer sets -------------------------------------------------------------------------------------------


def _write_refer(root, dataset, refs):
    from pycocotools import mask as mu

    h, w = 8, 10
    rle = np.zeros((h, w), np.uint8)
    rle[5:8, 0:3] = 1
    enc = mu.encode(np.asfortranarray(rle))
    enc["counts"] = enc["counts"].decode()
    inst = {
        "images": [
            {"id": 1, "file_name": "COCO_1.jpg", "height": h, "width": w},
            {"id": 2, "file_name": "COCO_2.jpg", "height": h, "width": w},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "segmentation": [enc]},
            {
                "id": 11,
                "image_id": 1,
                "category_id": 1,
                "segmentation": {"size": [h, w], "counts": [2 * h + 1, 2, h - 2, 2, 53]},
            },
            {"id": 12, "image_id": 2, "category_id": 1, "segmentation": [enc]},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    _json(os.path.join(root, dataset, "instances.json"), inst)
    with open(os.path.join(root, dataset, f"refs({R.split_by(dataset)}).p"), "wb") as f:
        pickle.dump(refs, f)
    img_dir = os.path.join(root, "images", "mscoco", "images", "train2014")
    _img(os.path.join(img_dir, "COCO_1.jpg"), h, w)
    _img(os.path.join(img_dir, "COCO_2.jpg"), h, w)
    return h, w, rle


def _sent(text, **kw):
    return {"sent": text, "sent_id": 0, "tokens": text.split(), **kw}


def test_fp_refcoco_train_and_eval(tmp_path):
    root = str(tmp_path / "refer_seg")
    refs = [
        {
            "ref_id": 1,
            "ann_id": 10,
            "image_id": 1,
            "category_id": 1,
            "split": "train",
            "sentences": [_sent("left dog"), _sent("left cat", is_false_premise=True, gt_sent="left dog")],
        },
        {
            "ref_id": 2,
            "ann_id": 11,
            "image_id": 1,
            "category_id": 1,
            "split": "val",
            "sentences": [_sent("top box", is_false_premise=False)],
        },
        {
            "ref_id": 3,
            "ann_id": 99,
            "image_id": 2,
            "category_id": 1,
            "split": "train",
            "sentences": [_sent("unknown ann")],
        },
    ]
    h, w, rle = _write_refer(root, "fprefcoco", refs)
    rd = R.ReferReader(root, "fprefcoco", "train", seed=0)
    assert len(rd) == 1 and rd.dropped == {"ref with unknown ann_id": 1}
    ex = rd[0]
    assert ex.image_path.endswith("images/mscoco/images/train2014/COCO_1.jpg")
    by_sent = dict(zip(ex.meta["sentences"], ex.conversations))
    assert by_sent["left dog"].has_seg and "[SEG]" in by_sent["left dog"].answer
    fp = by_sent["left cat"]
    assert not fp.has_seg and not fp.exists and "left dog" in fp.answer and "[SEG]" not in fp.answer
    assert ex.masks.shape == (1, h, w)
    np.testing.assert_array_equal(ex.masks[by_sent["left dog"].mask_index], rle)

    ev = R.ReferReader(root, "fprefcoco", "val", mode="eval", eval_answer=False)[0]
    assert [c.answer for c in ev.conversations] == [None]
    expected = np.zeros((h, w), np.uint8)  # uncompressed RLE: 17 zeros, 2 ones, 6 zeros, 2 ones (by column)
    expected[1:3, 2] = 1
    expected[1:3, 3] = 1
    np.testing.assert_array_equal(ev.masks[0], expected)


def test_r_refcoco_exist_and_multi_ann(tmp_path):
    root = str(tmp_path / "refer_seg")
    refs = [
        {
            "ref_id": 1,
            "ann_id": [10, 11],
            "image_id": 1,
            "category_id": 1,
            "split": "val",
            "sentences": [_sent("both things", exist=True)],
        },
        {
            "ref_id": 2,
            "ann_id": [-1],
            "image_id": 1,
            "category_id": 1,
            "split": "val",
            "sentences": [_sent("a unicorn", exist=False)],
        },
    ]
    h, w, rle = _write_refer(root, "R-refcoco", refs)
    ev = R.ReferReader(root, "R-refcoco", "val", mode="eval")
    assert ev.num_conversations(0) == 2
    ex = ev[0]
    union = rle.copy()
    union[1:3, 2:4] = 1
    np.testing.assert_array_equal(ex.masks[0], union)
    np.testing.assert_array_equal(ex.masks[1], np.zeros((h, w), np.uint8))  # false premise: all-zero GT
    assert ex.meta["exists"] == [True, False]
    neg = ex.conversations[1]
    assert not neg.exists and "a unicorn" in neg.answer and "[SEG]" not in neg.answer
    with pytest.raises(ValueError, match="unknown referring dataset"):
        R.ReferReader(root, "refcoco++", "val")


# ---- semantic segmentation --------------------------------------------------------------------------------


def test_ade20k_labels_and_modes(tmp_path):
    root = str(tmp_path)
    _img(f"{root}/ade20k/images/training/ADE_1.jpg", 4, 5)
    lab = np.array([[0, 1, 1, 3, 3]] * 4, np.uint8)
    os.makedirs(f"{root}/ade20k/annotations/training")
    Image.fromarray(lab).save(f"{root}/ade20k/annotations/training/ADE_1.png")
    _img(f"{root}/ade20k/images/training/ADE_2.jpg", 4, 5)  # no label: dropped
    rd = R.LabelMapReader(root, "ade20k", mode_weights=(1, 0, 0))
    assert len(rd) == 1 and rd.dropped == {"missing label": 1}
    ex = rd[0]
    names = {c.question: c for c in ex.conversations}
    assert len(ex.conversations) == 2  # ids 1 -> "wall", 3 -> "sky"; 0 is ignored
    for c in ex.conversations:
        m = ex.masks[c.mask_index]
        if "wall" in c.question:
            np.testing.assert_array_equal(m, (lab == 1).astype(np.uint8))
        else:
            assert "sky" in c.question
            np.testing.assert_array_equal(m, (lab == 3).astype(np.uint8))
    assert names
    den = R.LabelMapReader(root, "ade20k", mode_weights=(0, 1, 0))[0]
    assert den.masks.shape[0] == 0 and all(
        not c.has_seg and "[SEG]" not in c.answer for c in den.conversations
    )
    assert not any("wall" in c.question or " sky" in c.question for c in den.conversations)


def test_cocostuff_ignores_dash_classes_and_mapillary(tmp_path):
    root = str(tmp_path)
    stuff = R.COCO_STUFF_CLASSES
    dash = stuff.index("wall-brick")
    lab = np.array([[0, 0, dash, dash, 255]], np.uint8)
    os.makedirs(f"{root}/cocostuff/train2017")
    Image.fromarray(lab).save(f"{root}/cocostuff/train2017/000001.png")
    _img(f"{root}/coco/train2017/000001.jpg", 1, 5)
    ex = R.LabelMapReader(root, "cocostuff", mode_weights=(1, 0, 0))[0]
    assert len(ex.conversations) == 1 and "person" in ex.conversations[0].question
    np.testing.assert_array_equal(ex.masks[0], [[1, 1, 0, 0, 0]])

    _json(
        f"{root}/mapillary/config_v2.0.json",
        {"labels": [{"readable": "Bird"}, {"readable": "Road"}, {"readable": "Sky"}]},
    )
    os.makedirs(f"{root}/mapillary/training/v2.0/labels")
    Image.fromarray(np.array([[1, 1, 1]], np.uint8)).save(f"{root}/mapillary/training/v2.0/labels/m1.png")
    _img(f"{root}/mapillary/training/images/m1.jpg", 1, 3)
    ex = R.LabelMapReader(root, "mapillary", mode_weights=(0, 0, 1))[0]
    (c,) = ex.conversations  # correction: asks about an absent class, names the present one
    assert ("bird" in c.question or "sky" in c.question) and "road" in c.answer
    assert not c.has_seg and ex.masks.shape[0] == 0


def test_paco_and_pascal_part(tmp_path):
    root = str(tmp_path)
    seg = [[0.5, 0.5, 3.5, 0.5, 3.5, 2.5, 0.5, 2.5]]
    cats = [{"id": 1, "name": "dog:head"}, {"id": 2, "name": "car_(automobile):wheel"}]
    d = {
        "images": [
            {"id": 5, "file_name": "train2017/x.jpg", "height": 4, "width": 6},
            {"id": 6, "file_name": "train2017/y.jpg", "height": 4, "width": 6},
        ],
        "annotations": [{"id": 1, "image_id": 5, "category_id": 2, "segmentation": seg}],
        "categories": cats,
    }
    _json(f"{root}/vlpart/paco/annotations/paco_lvis_v1_train.json", d)
    _img(f"{root}/coco/train2017/x.jpg", 4, 6)
    rd = R.CocoPartReader(root, "paco_lvis", mode_weights=(1, 0, 0))
    assert rd.dropped == {"image without annotations": 1}
    ex = rd[0]
    (c,) = ex.conversations
    assert "car wheel" in c.question or "the wheel of the car" in c.question
    from pycocotools import mask as mu

    np.testing.assert_array_equal(ex.masks[0], mu.decode(mu.frPyObjects(seg, 4, 6))[:, :, 0])
    d["images"] = d["images"][:1]
    d["images"][0]["file_name"] = "2008_000001.jpg"
    _json(f"{root}/vlpart/pascal_part/train.json", d)
    _img(f"{root}/vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/2008_000001.jpg", 4, 6)
    ex = R.CocoPartReader(root, "pascal_part", mode_weights=(0, 1, 0))[0]
    assert "dog head" in ex.conversations[0].question or "the head of the dog" in ex.conversations[0].question


# ---- VQA --------------------------------------------------------------------------------------------------


def test_llava_instruct(tmp_path):
    root = str(tmp_path)
    _img(f"{root}/coco/train2017/a.jpg", 4, 4)
    data = [
        {
            "id": "a",
            "image": "a.jpg",
            "conversations": [
                {"from": "gpt", "value": "stray"},
                {"from": "human", "value": "What is this?\n<image>"},
                {"from": "gpt", "value": "A test."},
                {"from": "human", "value": "Sure?"},
                {"from": "gpt", "value": "Yes."},
            ],
        },
        {
            "id": "b",
            "image": "missing.jpg",
            "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello."}],
        },
    ]
    _json(f"{root}/llava_dataset/llava_instruct_150k.json", data)
    rd = R.VqaReader(f"{root}/llava_dataset/llava_instruct_150k.json", f"{root}/coco/train2017")
    assert len(rd) == 1 and rd.dropped == {"missing image": 1}
    (c,) = rd[0].conversations
    assert c.rounds == [("What is this?", "A test."), ("Sure?", "Yes.")]
    assert not c.has_seg and rd[0].masks.shape[0] == 0


# ---- the generated shapes set -----------------------------------------------------------------------------


def test_make_shapes_is_readable_and_deterministic(tmp_path):
    root = str(tmp_path / "shapes")
    argv = ["--out", root, "--num-train", "6", "--num-val", "3", "--num-test", "2", "--seed", "5"]
    assert make_shapes.main([*argv, "--sources", "reason_seg"]) == 0
    out = os.path.join(root, "reason_seg", "ReasonSeg")
    for split, n in (("train", 6), ("val", 3), ("test", 2)):
        rd = R.ReasonSegReader(out, split, mode="eval")
        assert len(rd) == n and not rd.dropped
        for i in range(n):
            with open(rd.items[i].json) as f:
                ann = json.load(f)
            assert set(ann) >= {"text", "is_sentence", "shapes", "false_premise_QA"}
            assert isinstance(ann["is_sentence"], bool) and all(isinstance(t, str) for t in ann["text"])
            assert all(
                set(s) >= {"label", "points"} and s["label"] in ("target", "ignore", "flag")
                for s in ann["shapes"]
            )
            assert all(len(q) == 3 and isinstance(q[1], bool) for q in ann["false_premise_QA"])
            ex = rd[i]
            mask = ex.masks[0]
            assert (mask == 1).sum() > 30
            # The target is drawn in one saturated colour: its mask pixels match that colour.
            img = np.asarray(Image.open(ex.image_path)).astype(int)
            inner = mask == 1
            colours = np.asarray(list(make_shapes.COLORS.values()))
            mean = img[inner].mean(0)
            assert np.abs(colours - mean).sum(1).min() < 60
    # Same seed, same bytes; another seed, another set.
    _, ann = make_shapes.make_example(5, "val", 1)
    with open(os.path.join(out, "val", "shapes_val_00001.json")) as f:
        assert json.load(f) == json.loads(json.dumps(ann))
    assert make_shapes.make_example(6, "val", 1)[1] != ann


def test_reason_seg_false_premise_share_from_the_mixture(reason_root):
    """`data.reason_seg_false_premise` reaches the ReasonSeg reader: 0 never asks a false premise, 1 always
    does."""
    from read_jax.data import mixture as M

    def reader(share):
        return M.build_reference_sources(
            "unused", ("reason_seg",), reason_seg_dir=reason_root, reason_seg_false_premise=share
        )["reason_seg"]

    assert reader(None).mode_weights == R.REASON_SEG_MODE_WEIGHTS
    never, always = reader(0.0), reader(1.0)
    assert all(c.has_seg for i in range(len(never)) for c in never[i].conversations)
    assert not any(c.has_seg for c in always[0].conversations)  # item 0 has a false_premise_QA
    with pytest.raises(ValueError, match="reason_seg_false_premise"):
        reader(1.5)


def test_query_kind_names_the_maker_of_every_phrasing():
    """`make_shapes.query_kind` recovers the query maker from either phrasing, and nothing else matches."""
    seen = set()
    for i in range(300):
        _, ann, kind = make_shapes._make_example(0, "train", i)
        assert kind in make_shapes.QUERY_KIND_PATTERNS
        assert [make_shapes.query_kind(t) for t in ann["text"]] == [kind] * len(ann["text"])
        assert all(make_shapes.query_kind(q) is None for q, _, _ in ann["false_premise_QA"])
        seen.add(kind)
    assert seen == set(make_shapes.QUERY_KIND_PATTERNS)  # every maker ran, so every pattern was checked
    assert make_shapes.query_kind("the leftmost shape please") is None  # full match only
