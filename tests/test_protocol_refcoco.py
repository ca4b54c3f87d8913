"""The remaining protocols of `test_read.py`: generation-mode RefCOCO and R-RefCOCO, per-sample mask dumps
and their re-scoring, and the reference's handling of dropped items, COCO overlaps and the 13B preset.

Data: a RefCOCO and an R-RefCOCO set in the reference's on-disk format (our own images and sentences), with
an annotation whose two polygon parts overlap, one with no segmentation, a false premise (R-RefCOCO
`exist: False`) and an unreadable image. Model: the tiny random READ; generation is a stand-in that answers
"[SEG]" on some rows and plain text on the others (a random model would never emit [SEG]).

Checked against independent computations: the GT equals pycocotools' parts summed as the reference's
`decode_segmentation` (value 2 on the overlap); Segment (cIoU) equals a numpy transcription of the
reference's `intersectionAndUnionGPU` (histograms over {0, 1}, 255 ignored: value-2 pixels in no class but
in the prediction's union) on the dumped predictions against that GT; See equals the accuracy of
"emitted [SEG] and non-empty mask" against the premise; re-scoring the dumps gives the direct figures (and a
tampered dump does not).
"""

import json
import os

import jax
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from read_jax import sharding as shd
from read_jax.cli import rescore as rescore_cli
from read_jax.config import SEG_TOKEN_ID, ConfigError, SaspConfig
from read_jax.data import readers as R
from read_jax.data.tokenizer import ReadTokenizer
from read_jax.eval import dumps
from read_jax.eval import run as erun
from read_jax.train.config import default_config, load_config_file, read_config
from tests.protocol_fixtures import ROOT, TOKENIZER, tiny_model, write_reason_seg, write_refer

PART_A = [10.0, 10.0, 80.0, 10.0, 80.0, 60.0, 10.0, 60.0]
PART_B = [50.0, 30.0, 120.0, 30.0, 120.0, 85.0, 50.0, 85.0]


def _sent(text, k, **kw):
    return {"sent": text, "sent_id": k, **kw}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("refer")
    images = [(1, 100, 140), (2, 90, 110), (3, 60, 60)]
    anns = [
        {"id": 11, "image_id": 1, "segmentation": [PART_A, PART_B]},  # overlapping parts
        {"id": 12, "image_id": 2, "segmentation": [[5.0, 5.0, 70.0, 8.0, 60.0, 70.0]]},
        {"id": 13, "image_id": 2, "segmentation": []},  # no segmentation: scored with an empty GT
        {"id": 14, "image_id": 3, "segmentation": [[1.0, 1.0, 30.0, 1.0, 30.0, 30.0]]},
    ]
    refs = [
        {"ref_id": 1, "ann_id": 11, "image_id": 1, "split": "val", "sentences": [_sent("left box", 0)]},
        {"ref_id": 2, "ann_id": 11, "image_id": 1, "split": "val", "sentences": [_sent("the big one", 0)]},
        {"ref_id": 3, "ann_id": 12, "image_id": 2, "split": "val", "sentences": [_sent("triangle", 0)]},
        {"ref_id": 4, "ann_id": 13, "image_id": 2, "split": "val", "sentences": [_sent("nothing drawn", 0)]},
        {"ref_id": 5, "ann_id": 12, "image_id": 2, "split": "train", "sentences": [_sent("not in val", 0)]},
        {"ref_id": 6, "ann_id": 14, "image_id": 3, "split": "val", "sentences": [_sent("broken image", 0)]},
    ]
    rs = write_refer(str(root), "refcoco", "unc_exclude_unified", images, refs, anns)
    r_refs = [
        {
            "ref_id": 1,
            "ann_id": 11,
            "image_id": 1,
            "split": "val",
            "sentences": [_sent("left box", 0, exist=True), _sent("a purple cat", 1, exist=False)],
        },
        {
            "ref_id": 3,
            "ann_id": 12,
            "image_id": 2,
            "split": "val",
            "sentences": [_sent("triangle", 0, exist=True)],
        },
    ]
    write_refer(str(root), "R-refcoco", "unc_exclude_unified", images[:2], r_refs, anns)
    with open(
        os.path.join(rs, "images", "mscoco", "images", "train2014", "COCO_train2014_000000000003.jpg"), "wb"
    ) as f:
        f.write(b"not a jpeg")  # unreadable: the reference would crash, we skip it
    return str(root)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


def _config(root):
    c = default_config()
    c.data.root = root
    c.data.tokenizer = TOKENIZER
    c.data.length_buckets = (128,)
    c.eval.batch_size = 1
    return c


def _stand_in(tokenizer):
    """Greedy-decoding stand-in: '[SEG].</s>' on even rows, 'no.</s>' on odd ones."""
    seg = [SEG_TOKEN_ID, *tokenizer.encode(".", add_special_tokens=False), tokenizer.eos_token_id]
    no = [*tokenizer.encode("no.", add_special_tokens=False), tokenizer.eos_token_id]

    def gen(batch):
        r = len(batch["input_ids"])
        toks = np.zeros((r, 6), np.int32)
        lens = np.zeros((r,), np.int32)
        for i in range(r):
            t = seg if i % 2 == 0 else no
            toks[i, : len(t)], lens[i] = t, len(t)
        return toks, lens

    return gen


def _run(root, model, split, out, config=None, **kw):
    tok = ReadTokenizer(TOKENIZER)
    mesh = shd.make_mesh(1, 1, devices=jax.devices()[:1])
    return erun.run(
        config or _config(root),
        os.path.join(root, "not_a_checkpoint"),
        split,
        out=str(out),
        model=model,
        tokenizer_dir=TOKENIZER,
        mesh=mesh,
        progress=False,
        dump_masks=True,
        generate_fn=_stand_in(tok),
        **kw,
    )


def _reference_iou(pred, gt):
    """`utils.py: intersectionAndUnionGPU(pred, gt, K=2, ignore_index=255)` in numpy, foreground class."""
    out = pred.astype(np.int64).reshape(-1).copy()
    tgt = gt.astype(np.int64).reshape(-1)
    out[tgt == 255] = 255
    inter = out[out == tgt]
    hist = lambda x: np.histogram(x, bins=2, range=(0, 1))[0]
    ai, ao, at = hist(inter), hist(out), hist(tgt)
    return int(ai[1]), int(ao[1] + at[1] - ai[1])


def _reference_gt(segmentation, h, w):
    """The reference's `decode_segmentation`: pycocotools' parts summed, cast to uint8."""
    if not segmentation:
        return np.zeros((h, w), np.uint8)
    return np.sum(mask_utils.decode(mask_utils.frPyObjects(segmentation, h, w)), axis=2).astype(np.uint8)


@pytest.fixture(scope="module")
def refcoco(root, model, tmp_path_factory):
    out = tmp_path_factory.mktemp("refcoco_gen")
    return out, _run(root, model, "refcoco_val", out, generate=True)


SENTENCES = ("left box", "the big one", "triangle", "nothing drawn", "a purple cat")


def _records(out):
    """The run's records, each with `sent`: the referring expression its (templated) question asks about."""
    with open(os.path.join(out, "samples.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    for r in recs:
        (r["sent"],) = [x for x in SENTENCES if x in r["query"]]
    return recs


def test_refcoco_generation_protocol_and_dumps(root, refcoco):
    out, summary = refcoco
    recs = _records(out)
    assert summary["protocol"] == "generation" and summary["resolution"] == "native"
    # Every val sentence of a readable image, each once; the unreadable image is skipped (and counted).
    assert sorted(r["sent"] for r in recs) == sorted(SENTENCES[:4])
    anns = {
        11: ([PART_A, PART_B], 100, 140),
        12: ([[5.0, 5.0, 70.0, 8.0, 60.0, 70.0]], 90, 110),
        13: ([], 90, 110),
    }
    ann_of = {"left box": 11, "the big one": 11, "triangle": 12, "nothing drawn": 13}
    inter = union = correct = 0
    for r in recs:
        pred, gt = dumps.read_masks(str(out), r)
        seg, h, w = anns[ann_of[r["sent"]]]
        want_gt = _reference_gt(seg, h, w)
        np.testing.assert_array_equal(gt, want_gt)
        i, u = _reference_iou(pred, want_gt)
        assert (i, u) == (r["intersection"], r["union"])
        inter, union = inter + i, union + u
        emitted = "[SEG]" in r["answer"]
        assert r["seg_emitted"] == emitted and (pred.any() <= emitted)
        correct += (emitted and pred.any()) == r["gt_presence"]
    assert (_reference_gt([PART_A, PART_B], 100, 140) == 2).sum() > 500  # the overlap is really there
    assert summary["Segment"] == pytest.approx(inter / (union + 1e-10), abs=1e-12)
    assert summary["See"] == pytest.approx(correct / len(recs), abs=1e-12)
    assert 0 < summary["Segment"] < 1 and summary["num_queries"] == 4


def test_refcoco_overlap_pixels_count_in_union_not_gt(root, refcoco):
    out, _ = refcoco
    rec = next(r for r in _records(out) if r["sent"] in ("left box", "the big one") and r["pred_area"])
    pred, gt = dumps.read_masks(str(out), rec)
    two = gt == 2
    assert two.any()
    # value-2 pixels: never in the intersection; predicted ones enlarge the union
    g1 = gt == 1
    assert rec["intersection"] == int((pred & g1).sum())
    assert rec["union"] == int(pred.sum() + g1.sum() - (pred & g1).sum())


def test_rescore_from_dumps_equals_direct(refcoco, capsys):
    out, summary = refcoco
    rescored, _ = dumps.rescore(str(out))
    assert dumps.differences(summary, rescored) == []
    assert rescored["Segment"] == summary["Segment"] and rescored["See"] == summary["See"]
    assert rescore_cli.main([str(out)]) == 0
    assert "equal to summary.json" in capsys.readouterr().out
    # The check can fail: flip a dumped prediction and the re-scored figures move.
    rec = next(r for r in _records(out) if r["seg_emitted"])
    path = os.path.join(out, rec["mask_file"])
    with np.load(path) as z:
        pred, gt = z["pred"], z["gt"]
    np.savez_compressed(path, pred=~pred, gt=gt)
    assert rescore_cli.main([str(out)]) == 1
    assert "differs from summary.json: Segment" in capsys.readouterr().out
    np.savez_compressed(path, pred=pred, gt=gt)


def test_r_refcoco_generation_reader_and_rescore(root, model, tmp_path):
    reader = R.ReferReader(
        os.path.join(root, "refer_seg"), "R-refcoco", "val", mode="eval", eval_answer=False
    )
    ex = reader[0]
    assert [c.exists for c in ex.conversations] == [True, False] and not ex.masks[1].any()
    summary = _run(root, model, "R-refcoco_val", tmp_path)
    recs = _records(tmp_path)
    assert summary["protocol"] == "generation" and summary["num_queries"] == 3
    assert sorted(r["gt_presence"] for r in recs) == [False, True, True]
    absent = next(r for r in recs if not r["gt_presence"])
    assert absent["intersection"] == 0 and absent["union"] == absent["pred_area"]  # all-zero GT
    assert dumps.differences(summary, dumps.rescore(str(tmp_path))[0]) == []


def test_reason_seg_eval_scores_items_without_a_target_polygon(tmp_path):
    write_reason_seg(str(tmp_path), "val", [(40, 50), (30, 30)])
    with open(tmp_path / "val" / "img_001.json") as f:
        d = json.load(f)
    d["shapes"] = [{"label": "target", "points": [[1, 1], [5, 5]]}]  # degenerate: nothing to paint
    with open(tmp_path / "val" / "img_001.json", "w") as f:
        json.dump(d, f)
    ev = R.ReasonSegReader(str(tmp_path), "val", mode="eval")
    assert len(ev) == 2 and ev.empty_gt == 1 and not ev[1].masks.any()  # scored, as the reference does
    tr = R.ReasonSegReader(str(tmp_path), "val", mode="train")
    assert len(tr) == 1 and tr.dropped["no usable target polygon"] == 1  # never a training target


def test_13b_workdir_evaluates_with_the_13b_eval_preset():
    config = load_config_file(os.path.join(ROOT, "configs", "read_13b_reasonseg.py") + ":stage2")
    trained = read_config(config.model).sasp
    assert (trained.num_points, trained.t_pos) == (30, 0.8)
    assert erun.eval_sasp(config, trained) == SaspConfig.read_13b_eval()
    assert erun.eval_sasp(default_config(), trained) == trained  # other configs: the model's own
    config.eval.sasp = "nope"
    with pytest.raises(ConfigError, match=r"eval\.sasp"):
        erun.eval_sasp(config, trained)


def test_generation_protocol_on_the_generated_shapes_set(model, tmp_path):
    """`evaluate.py --split reasonseg_val --generate` on the generated shapes set (test_read.py's generation
    path with LISA's questions and no forced answer): See / Segment from the generated answers, each query's
    figures equal to the reference's metric on its dumped masks, and the dumps re-score to the summary."""
    from read_jax.data import make_shapes

    root = str(tmp_path / "shapes")
    make_shapes.write_split(root, "val", 3, seed=2)
    config = _config(root)
    config.data.reason_seg_dir = "{root}"
    summary = _run(root, model, "reasonseg_val", tmp_path / "out", config=config, generate=True)
    with open(tmp_path / "out" / "samples.jsonl") as f:
        recs = [json.loads(line) for line in f]
    reader = R.ReasonSegReader(root, "val", mode="eval")
    assert summary["protocol"] == "generation" and summary["num_queries"] == len(recs) == 3
    inter = union = correct = 0
    for r in recs:
        pred, gt = dumps.read_masks(str(tmp_path / "out"), r)
        np.testing.assert_array_equal(gt, reader[r["example_index"]].masks[0])  # native GT, 255 kept
        i, u = _reference_iou(pred, gt)
        assert (i, u) == (r["intersection"], r["union"])
        inter, union = inter + i, union + u
        emitted = "[SEG]" in r["answer"]
        assert r["gt_presence"] and r["seg_emitted"] == emitted
        correct += bool(emitted and pred.any())
    assert summary["Segment"] == pytest.approx(inter / (union + 1e-10), abs=1e-12)
    assert summary["See"] == pytest.approx(correct / 3, abs=1e-12)
    assert dumps.differences(summary, dumps.rescore(str(tmp_path / "out"))[0]) == []
