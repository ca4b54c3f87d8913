"""The evaluation protocols end to end on the generated shapes set, with a tiny random READ.

What is checked (issue "evaluate.py"): the ReasonSeg-protocol figures equal an independent computation from
the per-sample JSONL; the per-query I/U equal an independent numpy computation from `ReadModel.__call__`'s
masks; data-parallel over 8 fake devices (through the command's `run`) equals the single-device run exactly
with 11 samples (not a multiple of 8); one compile per stage over a split; FP-RefCOCO See/Segment on a
fixture in FP-RefCOCO's on-disk format with hand-checked expectations; the Table 8 sweep's printed shape,
its 0.8/0.2 x 30 cell equal to the protocol; the analysis PNGs show what they say.

The model is random (the protocol's correctness is what is tested) and initialised from numpy on the host:
the tiny model's eager init compiles hundreds of small ops, which would cost most of this file's budget.
"""

import json
import os
import pickle
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from read_jax import visualize as V
from read_jax.config import SEG_TOKEN_ID, ReadConfig
from read_jax.convert.common import path_str
from read_jax.data import make_shapes
from read_jax.data import pipeline as P
from read_jax.data import readers as R
from read_jax.data.tokenizer import ReadTokenizer
from read_jax.eval import analysis, protocols, stages
from read_jax.eval import records as erec
from read_jax.read_model import ReadModel
from read_jax.sharding import make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "tests", "assets", "tokenizer")
NUM_VAL = 11  # not a multiple of the 8 devices: the second batch carries 5 padding images
CANVAS = (448, 448)  # the largest generated image side
LENGTH = 128  # one text bucket: one compile for every batch (FP-RefCOCO's full forward too)
BATCH = 8


def numpy_model(cfg: ReadConfig, seed: int = 0) -> ReadModel:
    """A random ReadModel whose leaves come from numpy (norm scales 1, fan-in scaled kernels)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ReadModel(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    flat = list(nnx.to_flat_state(state))
    for path, var in flat:
        a = var.get_value()
        name = path_str(path).split("/")[-1]
        if name == "scale":
            x = np.ones(a.shape)
        elif name == "kernel":
            x = rng.normal(0, 1 / np.sqrt(max(1, np.prod(a.shape[:-1]))), a.shape)
        elif name == "positional_encoding_gaussian_matrix":
            x = rng.normal(0, 1, a.shape)
        else:
            x = rng.normal(0, 0.5 if name == "embedding" else 0.02, a.shape)
        var.set_value(jnp.asarray(x, a.dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def data_config(**kw) -> P.DataConfig:
    base = {"batch_size": BATCH, "max_convs": 1, "max_mask_side": CANVAS[0], "length_buckets": (LENGTH,)}
    return P.DataConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def cfg():
    return ReadConfig.tiny(lora=None, max_segs=1)


@pytest.fixture(scope="module")
def model(cfg):
    return numpy_model(cfg)


@pytest.fixture(scope="module")
def tokenizer():
    return ReadTokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shapes"))
    make_shapes.write_split(out, "val", NUM_VAL, seed=3)
    return out


@pytest.fixture(scope="module")
def reader(shapes):
    return R.ReasonSegReader(shapes, "val", mode="eval")


@pytest.fixture(scope="module")
def batches(reader, cfg):
    return list(
        P.eval_dataset(
            reader, data_config(), cfg.sam, TOKENIZER, shard_options=grain.sharding.ShardOptions(0, 1)
        )
    )


class CapturingPictures(V.AnalysisPictures):
    """The PNG writer, also keeping what it drew (to check the pictures against)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen = []

    def __call__(self, batch, res, rows):
        n0 = len(self.paths)
        super().__call__(batch, res, rows)
        for k, r in enumerate(rows[: len(self.paths) - n0]):
            h, w = batch["mask_hw"][r]
            self.seen.append(
                {
                    "path": self.paths[n0 + k],
                    "pred": res["pred_mask"][r, :h, :w].copy(),
                    "gt": np.asarray(batch["masks"][r, :h, :w]).copy(),
                    "points": res["points"][r].copy(),
                    "labels": res["labels"][r].copy(),
                    "example_index": int(batch["example_index"][batch["conv_image"][r]]),
                }
            )


@pytest.fixture(scope="module")
def single(model, cfg, batches, reader, tokenizer, tmp_path_factory):
    """The single-device run with every option: (summary, records, jsonl path, pictures, compile deltas)."""

    out = tmp_path_factory.mktemp("single")
    pics = CapturingPictures(str(out / "pictures"), cfg.sam, V.reader_image_fn(reader))
    before = stages.compile_counts()
    summary, records = protocols.evaluate_reasonseg(
        model,
        batches,
        threshold_search=True,
        points_prompt=analysis.points_prompt_config(cfg.sasp),
        tokenizer=tokenizer,
        meta_fn=erec.reason_seg_meta(reader),
        on_maps=pics,
        progress=False,
    )
    after = stages.compile_counts()
    _, jsonl = erec.write_results(str(out), summary, records)
    return summary, records, jsonl, pics, {k: after[k] - before[k] for k in after}


# ---- the ReasonSeg protocol
# ---------------------------------------------------------------------------------


def test_evaluate_reasonseg_figures_equal_independent_computation_from_jsonl(single, reader, batches):
    summary, _, jsonl, _, compiles = single
    gt_stats, gts = {}, {}
    for b in batches:
        for r in np.flatnonzero(b["image_valid"]):
            h, w = b["mask_hw"][r]
            gt = b["masks"][r, :h, :w]
            gt_stats[b["sample_id"][r]] = (int((gt == 1).sum()), int((gt != 255).sum()))
            gts[b["sample_id"][r]] = (gt, b["orig_hw"][r])
    with open(jsonl) as f:
        recs = [json.loads(line) for line in f]
    # Every real sample exactly once, no padding row.
    assert len(recs) == NUM_VAL == summary["num_queries"]
    assert sorted(r["id"] for r in recs) == sorted(os.path.basename(a.image)[:-4] for a in reader.items)

    def figures(rs, ki="intersection", ku="union"):
        ious = [r[ki] / (r[ku] + 1e-5) + (1.0 if r[ku] == 0 else 0.0) for r in rs]
        return sum(ious) / len(ious), sum(r[ki] for r in rs) / sum(r[ku] for r in rs)

    g, c = figures(recs)
    assert summary["gIoU"] == pytest.approx(g, rel=1e-12) and summary["cIoU"] == pytest.approx(c, rel=1e-12)
    short = [r for r in recs if not r["is_sentence"]]
    long_ = [r for r in recs if r["is_sentence"]]
    assert short and long_ and len(short) + len(long_) == NUM_VAL
    assert (summary["short"]["gIoU"], summary["short"]["cIoU"]) == pytest.approx(figures(short), rel=1e-12)
    assert (summary["long"]["gIoU"], summary["long"]["cIoU"]) == pytest.approx(figures(long_), rel=1e-12)
    ts = summary["threshold_search"]
    assert (ts["gIoU"], ts["cIoU"]) == pytest.approx(figures(recs, "ts_intersection", "ts_union"), rel=1e-12)
    pp = summary["points_as_prompt"]
    assert (pp["gIoU"], pp["cIoU"]) == pytest.approx(figures(recs, "pp_intersection", "pp_union"), rel=1e-12)
    fg = summary["all_foreground"]
    assert (fg["gIoU"], fg["cIoU"]) == pytest.approx(figures(recs, "fg_intersection", "fg_union"), rel=1e-12)
    # Per query kind of the generated set: the kind the generator drew for each image, figures per kind.
    drawn = {f"shapes_val_{i:05d}": make_shapes._make_example(3, "val", i)[2] for i in range(NUM_VAL)}
    assert {r["id"]: r["query_kind"] for r in recs} == drawn
    by_kind = summary["by_query_kind"]
    assert set(by_kind) == set(drawn.values())
    for k, m in by_kind.items():
        sub = [r for r in recs if drawn[r["id"]] == k]
        assert m["num_queries"] == len(sub) and (m["gIoU"], m["cIoU"]) == pytest.approx(
            figures(sub), rel=1e-12
        )
    for r in recs:
        assert r["iou"] == pytest.approx(r["intersection"] / (r["union"] + 1e-5) + (r["union"] == 0))
        assert r["query"].endswith("Please output segmentation mask.") and r["seg_emitted"]
        assert r["presence"] == (r["pred_area"] > 0)
        assert 0.0 <= r["threshold"] <= 1.0 and r["points"] and r["pp_points"]
        # The similarity map (in [0, 1]) thresholded at 0 is the whole image: the chosen threshold never does
        # worse than that, and its I/U are those of a mask inside the image.
        fg, keep = gt_stats[r["id"]]
        assert (r["fg_intersection"], r["fg_union"]) == (fg, keep)  # all-foreground: I = GT, U = the image
        assert r["ts_iou"] >= fg / (keep + 1e-5) and r["ts_intersection"] <= fg <= r["ts_union"] <= keep
    # Where SasP's points fell, looked up in the GT at the nearest original pixel (the first point is the
    # map's maximum, always positive); the JSONL's 2 decimals cannot move a point across a half pixel here.
    for r in recs:
        gt, (oh, ow) = gts[r["id"]]
        x, y, lab = r["points"][0]
        assert lab == 1 and r["positive_points"] == sum(p[2] == 1 for p in r["points"])
        assert min(abs(v % 1 - 0.5) for v in (x, y)) > 0.01
        py, px = min(max(round(y), 0), oh - 1), min(max(round(x), 0), ow - 1)
        on = gt[int((py + 0.5) * gt.shape[0] / oh), int((px + 0.5) * gt.shape[1] / ow)] == 1
        assert r["top_point_on_target"] == on, r["id"]
        assert 0 <= r["positive_points_on_target"] <= r["positive_points"]
    hits = summary["sasp_points"]
    assert hits["num_queries"] == NUM_VAL
    assert hits["top_on_target"] == pytest.approx(np.mean([r["top_point_on_target"] for r in recs]))
    on_all = sum(r["positive_points_on_target"] for r in recs) / sum(r["positive_points"] for r in recs)
    assert hits["positives_on_target"] == pytest.approx(on_all)
    # One compile per stage for the whole split (two batches).
    assert compiles["encode"] == 1 and compiles["decode"] == 1


def test_points_on_gt_looks_points_up_in_the_downscaled_gt():
    """Row 0: a 40x60 (HxW) image whose GT is stored at half size (20x30) on a 24x32 canvas, target the GT
    block [5:10, 10:20) = original y in [10, 20), x in [20, 40); a 255 (ignored) pixel is off. Row 1 has no
    GT (mask_hw 0): every point off, even where its canvas holds ones."""
    gt = np.zeros((2, 24, 32), np.uint8)
    gt[0, 5:10, 10:20] = 1
    gt[0, 0, 0] = 255
    gt[1] = 1
    pts = np.array(
        [
            [[20.0, 10.0], [39.4, 19.4], [39.6, 15.0], [19.4, 15.0], [19.6, 15.0], [0.2, 0.2], [59.9, 39.9]],
            [[20.0, 10.0]] * 7,
        ],
        np.float32,
    )
    on = stages.points_on_gt(
        jnp.asarray(gt), jnp.array([[20, 30], [0, 0]]), jnp.array([[40, 60], [40, 60]]), jnp.asarray(pts)
    )
    # nearest original pixels (20, 10), (39, 19), (40, 15), (19, 15), (20, 15), (0, 0), (59, 39)
    want = [[True, True, False, False, True, False, False], [False] * 7]
    np.testing.assert_array_equal(np.asarray(on), want)


def test_point_hits_of_a_record_and_their_summary():
    lab = np.array([1, 1, 0, 1, -1])
    assert erec._point_hits(lab, np.array([True, False, False, True, True])) == {
        "top_point_on_target": True,
        "positive_points": 3,
        "positive_points_on_target": 2,
    }
    assert erec._point_hits(np.full(5, -1), np.ones(5, bool)) == {}  # SasP off: no positive point
    recs = [
        {
            "top_point_on_target": True,
            "positive_points": 3,
            "positive_points_on_target": 2,
            "query_kind": "a",
        },
        {
            "top_point_on_target": False,
            "positive_points": 1,
            "positive_points_on_target": 0,
            "query_kind": "b",
        },
        {
            "top_point_on_target": False,
            "positive_points": 4,
            "positive_points_on_target": 0,
            "query_kind": "b",
        },
        # a false premise (no target) is not counted
        {
            "top_point_on_target": False,
            "positive_points": 2,
            "positive_points_on_target": 0,
            "query_kind": "b",
            "gt_presence": False,
        },
    ]
    hits = erec.point_hits_summary(recs)
    assert hits == {
        "top_on_target": pytest.approx(1 / 3),
        "positives_on_target": pytest.approx(2 / 8),
        "positives_per_query": pytest.approx(8 / 3),
        "num_queries": 3,
        "by_query_kind": {"a": 1.0, "b": 0.0},
    }
    assert erec.point_hits_summary([{"iou": 0.5}]) is None


def test_summary_lines_say_where_sasp_points_fall():
    from read_jax.eval.run import _summary_lines

    summary = {"gIoU": 0.25, "cIoU": 0.2, "num_queries": 200}
    assert "SasP" not in _summary_lines("val", summary)  # SasP off: nothing to say
    summary["sasp_points"] = {
        "top_on_target": 0.115,
        "positives_on_target": 0.1106,
        "positives_per_query": 3.12,
        "num_queries": 200,
    }
    assert _summary_lines("val", summary).splitlines()[1] == (
        "  SasP points: the first on the target for 11.5% of 200 queries; 11.1% of the 3.1 positives a query"
    )


def test_evaluate_per_query_iou_matches_model_call(model, cfg, batches, single):
    """Independent of the two-stage split: `ReadModel.__call__`'s first-slot mask, scored in numpy."""
    _, records, _, _, _ = single
    batch = batches[0]

    @nnx.jit
    def fwd(m, b):
        out = m(b, canvas_hw=CANVAS, logits="none")
        return {"mask_logits": out.masks.mask_logits, "seg_valid": out.seg.valid}

    out = fwd(model, {k: jnp.asarray(v) for k, v in P.device_batch(batch).items()})
    logits = np.asarray(out["mask_logits"][:, 0])
    seg = np.asarray(out["seg_valid"][:, 0])
    by_id = {r["id"]: r for r in records}
    checked = 0
    for r in range(BATCH):
        if not batch["image_valid"][r]:
            continue
        h, w = batch["orig_hw"][r]
        assert tuple(batch["mask_hw"][r]) == (h, w)
        gt = batch["masks"][r, :h, :w]
        pred = (logits[r, :h, :w] > 0) & seg[r]
        keep = gt != 255
        inter = int((pred & (gt == 1) & keep).sum())
        union = int(((pred | (gt == 1)) & keep).sum())
        rec = by_id[batch["sample_id"][r]]
        assert (rec["intersection"], rec["union"]) == (inter, union)
        checked += 1
    assert checked == BATCH


def test_evaluate_cli_data_parallel_8_devices_equals_single_device(model, cfg, shapes, single, tmp_path):
    """`evaluate.py`'s `run` on an 8-device mesh, from a converted checkpoint, == the single-device run."""
    from read_jax.eval import run as evaluate
    from read_jax.inference import save_for_inference

    assert len(jax.devices()) == 8
    ckpt = str(tmp_path / "ckpt")
    save_for_inference(model, ckpt, TOKENIZER)
    summary1, records1, _, _, _ = single
    out = tmp_path / "eval"
    summary8 = evaluate.run(
        _config(shapes),
        ckpt,
        "reasonseg_val",
        out=str(out),
        threshold_search=True,
        analysis_dir=str(tmp_path / "pics"),
        progress=False,
    )
    assert summary8["devices"] == 8
    with open(out / "samples.jsonl") as f:
        records8 = [json.loads(line) for line in f]
    _assert_same_records(records8, json.loads(json.dumps(records1)))
    assert summary8["num_queries"] == summary1["num_queries"]
    for k in ("short", "long", "threshold_search", "points_as_prompt"):
        assert summary8[k]["num_queries"] == summary1[k]["num_queries"], k
        for m in ("gIoU", "cIoU"):
            assert abs(summary8[k][m] - summary1[k][m]) <= 2e-3, (k, m)  # the per-query bound above, averaged
    for m in ("gIoU", "cIoU"):
        assert abs(summary8[m] - summary1[m]) <= 2e-3, m
    with open(out / "summary.json") as f:
        assert json.load(f)["cIoU"] == summary8["cIoU"]
    assert len(os.listdir(tmp_path / "pics")) == NUM_VAL


def test_evaluate_scores_a_converted_checkpoint_in_the_dtype_asked_for(model, shapes, tmp_path):
    """`evaluate.py --dtype bfloat16` on an fp32 conversion loads it in bf16 (recorded in the summary);
    without the flag the checkpoint's own dtype holds. A model passed in cannot take another dtype."""
    from read_jax.eval import run as evaluate
    from read_jax.inference import save_for_inference

    ckpt = str(tmp_path / "ckpt")
    save_for_inference(model, ckpt, TOKENIZER)
    assert model.config.llama.dtype == "float32"
    got = {}
    for dtype in (None, "bfloat16"):
        out = tmp_path / f"eval_{dtype}"
        summary = evaluate.run(
            _config(shapes), ckpt, "reasonseg_val", out=str(out), max_batches=1, progress=False, dtype=dtype
        )
        with open(out / "summary.json") as f:
            assert json.load(f)["dtype"] == summary["dtype"]
        got[dtype] = summary
    assert got[None]["dtype"] == "float32" and got["bfloat16"]["dtype"] == "bfloat16"
    assert got[None]["num_queries"] == got["bfloat16"]["num_queries"] > 0
    with pytest.raises(ValueError, match="dtype"):
        evaluate.run(_config(shapes), ckpt, "reasonseg_val", model=model, dtype="bfloat16", progress=False)


def _assert_same_records(got: list, want: list) -> None:
    """Every field of every query equal, up to the bound of float reductions partitioned another way.

    The 8-device run partitions the batch, and XLA orders the float reductions of the forward (attention,
    layer norms, DtoC's softmax-weighted sums) differently from one device: values agree to ~1e-6 relative,
    not bit for bit (seen on AMD EPYC hosts). What that bounds in the records:
      * point coordinates, rounded to 0.01 px in the records: within one rounding unit (204.0 vs 204.01);
      * point labels, [SEG] presence and every count of a mask whose prompt did not move: exact;
      * pixel counts (I, U, areas) of a mask whose prompt moved by ~1e-6 px: only pixels whose logit lies
        within
        float error of 0 can flip; at most 0.1% of the union (and at least 2 pixels) per query.
    Everything else (ids, queries, presence, the chosen thresholds) is exact.
    """
    assert len(got) == len(want)
    counts = (
        "intersection",
        "union",
        "pred_area",
        "pp_intersection",
        "pp_union",
        "ts_intersection",
        "ts_union",
    )
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for key in g:
            if key in ("points", "pp_points"):
                a, b = np.asarray(g[key], np.float64), np.asarray(w[key], np.float64)
                assert a.shape == b.shape and (a[:, 2] == b[:, 2]).all(), (g["id"], key)
                np.testing.assert_allclose(
                    a[:, :2], b[:, :2], atol=0.0101, rtol=0, err_msg=f"{g['id']} {key}"
                )
            elif key in counts:
                bound = max(2, 1e-3 * max(g.get("union", 0), g.get("pp_union", 0), g.get("ts_union", 0)))
                assert abs(g[key] - w[key]) <= bound, (g["id"], key, g[key], w[key])
            elif key in ("iou", "pp_iou", "ts_iou"):
                assert abs(g[key] - w[key]) <= 2e-3, (g["id"], key)
            else:
                assert g[key] == w[key], (g["id"], key)


def _config(shapes):
    c = ml_collections.ConfigDict()
    c.data = {
        "root": shapes,
        "reason_seg_dir": "{root}",
        "tokenizer": TOKENIZER,
        "batch_size": BATCH,
        "max_convs": 1,
        "length_buckets": (LENGTH,),
        "max_mask_side": CANVAS[0],
        "seed": 0,
    }
    c.eval = {"batch_size": BATCH}
    c.mesh = {"data": -1, "fsdp": 1}
    return c


def test_sweep_prints_table8_shape(model, shapes, single, capsys, tmp_path):
    from read_jax.eval import run as evaluate

    summary1 = single[0]
    results = evaluate.run(
        _config(shapes),
        "unused",
        "reasonseg_val",
        out=str(tmp_path),
        sweep=True,
        model=model,
        tokenizer_dir=TOKENIZER,
        progress=False,
    )
    assert set(results) == {
        (tp, tn, n) for tp, tn in analysis.TABLE8_THRESHOLDS for n in analysis.TABLE8_NUM_POINTS
    }
    # The model's own setting (0.8/0.2, 30 points) through the traced-threshold path == the protocol.
    own = results[(0.8, 0.2, 30)]
    assert (own["gIoU"], own["cIoU"], own["num_queries"]) == (summary1["gIoU"], summary1["cIoU"], NUM_VAL)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    i = next(k for k, ln in enumerate(lines) if ln.startswith("Table 8"))
    head, sub, rows = lines[i + 1], lines[i + 2], lines[i + 3 : i + 6]
    assert [s for s in head.split() if s.startswith("|P|=")] == ["|P|=10", "|P|=30", "|P|=60"]
    assert sub.split() == ["gIoU", "cIoU"] * 3
    for (tp, tn), row in zip(analysis.TABLE8_THRESHOLDS, rows):
        cells = row.split()
        assert [float(cells[0]), float(cells[1])] == [tp, tn] and len(cells) == 8
        for k, n in enumerate(analysis.TABLE8_NUM_POINTS):
            r = results[(tp, tn, n)]
            assert float(cells[2 + 2 * k]) == pytest.approx(100 * r["gIoU"], abs=0.006)
            assert float(cells[3 + 2 * k]) == pytest.approx(100 * r["cIoU"], abs=0.006)
    with open(tmp_path / "sweep.json") as f:
        assert len(json.load(f)["results"]) == 9


def test_evaluate_help_names_the_modes():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "evaluate.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0
    for flag in ("--threshold-search", "--analysis", "--sweep", "--split", "--checkpoint", "--out"):
        assert flag in out.stdout


# ---- analysis pictures
# ---------------------------------------------------------------------------------------


def test_analysis_pngs_show_image_map_points_prediction_gt(single, reader):
    pics = single[3]
    assert len(pics.seen) == NUM_VAL
    for s in pics.seen[:4]:
        im = np.asarray(Image.open(s["path"]).convert("RGB"))
        h, w = s["gt"].shape
        n = 6  # image, similarity, points, prediction, GT, points only
        assert im.shape == (V.HEADER + h, n * w + (n - 1) * V.GAP, 3)
        boxes = V.panel_boxes(h, w, n)
        panel = [im[t:b, l:r] for l, t, r, b in boxes]
        original = np.asarray(Image.open(reader.items[s["example_index"]].image).convert("RGB"))
        np.testing.assert_array_equal(panel[0], original)
        # Prediction panel: changed exactly where the mask is (tinting moves every pixel towards green
        # unless it already is that colour), identical elsewhere.
        diff = (panel[3] != panel[0]).any(-1)
        assert not diff[~s["pred"]].any()
        assert diff[s["pred"]].mean() > 0.99
        gt_region = (s["gt"] == 1) | (s["gt"] == 255)
        diff = (panel[4] != panel[0]).any(-1)
        assert not diff[~gt_region].any() and diff[s["gt"] == 1].mean() > 0.99
        # The heat map covers the whole image; positive points are red discs at their positions.
        assert (panel[1] != panel[0]).any(-1).mean() > 0.9
        x, y = s["points"][s["labels"] == 1][0].astype(int)
        np.testing.assert_array_equal(panel[2][min(y, h - 1), min(x, w - 1)], V.POS_COLOR)


def test_analysis_picture_on_hand_made_inputs():
    h, w = 30, 40
    image = np.full((h, w, 3), 100, np.uint8)
    sim = np.zeros((h, w), np.float32)
    sim[:, 20:] = 1.0
    pred = np.zeros((h, w), bool)
    pred[5:15, 10:30] = True
    gt = np.zeros((h, w), np.uint8)
    gt[0:4, 0:4] = 1
    gt[20:25, 30:35] = 255
    pic = np.asarray(
        V.analysis_picture(image, sim, np.array([[35.0, 25.0], [2.0, 2.0]]), np.array([1, 0]), pred, gt)
    )
    assert pic.shape == (V.HEADER + h, 5 * w + 4 * V.GAP, 3)
    panels = [pic[t:b, l:r] for l, t, r, b in V.panel_boxes(h, w, 5)]
    np.testing.assert_array_equal(panels[0], image)
    np.testing.assert_array_equal((panels[3] != image).any(-1), pred)
    np.testing.assert_array_equal(panels[3][pred][0], [50, 150, 50])  # 0.5 * 100 + 0.5 * (0, 200, 0)
    np.testing.assert_array_equal((panels[4] != image).any(-1), gt > 0)
    np.testing.assert_array_equal(panels[4][2, 2], [178, 155, 50])  # yellow tint on GT
    np.testing.assert_array_equal(panels[4][22, 32], [114, 114, 114])  # grey on "ignore"
    # Jet: 0 -> dark blue, 1 -> dark red, blended 0.6 over the image.
    np.testing.assert_array_equal(panels[1][0, 0], np.round(0.4 * 100 + 0.6 * V.jet(np.float32(0))))
    np.testing.assert_array_equal(panels[1][0, 39], np.round(0.4 * 100 + 0.6 * V.jet(np.float32(1))))
    np.testing.assert_array_equal(panels[2][25, 35], V.POS_COLOR)
    np.testing.assert_array_equal(panels[2][2, 2], V.NEG_COLOR)
    with pytest.raises(ValueError, match="pred_mask"):
        V.analysis_picture(image, sim, np.zeros((0, 2)), np.zeros((0,), int), pred[:5], gt)


# ---- FP-RefCOCO
# ----------------------------------------------------------------------------------------------

# Two images, each with one ref that has a true-premise and a false-premise sentence (FP-RefCOCO's layout:
# refs(berkeley_exclude_unified).p, instances.json, images under images/mscoco/images/train2014).
FP_IMAGES = {1: (30, 40), 2: (20, 50)}  # image id -> (H, W)
FP_BOXES = {1: (5, 15, 10, 20), 2: (2, 7, 30, 38)}  # image id -> GT rows [r0, r1) x cols [c0, c1)
FP_SENTENCES = {1: ("the red box", "the purple cat"), 2: ("the blue circle", "the green dog")}
# Scripted answers: a [SEG] for "red box" (right) and "purple cat" (wrong), none for "blue circle" (wrong)
# and "green dog" (right).
FP_SEG_FOR = ("red box", "purple cat")


def _rle(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE (column-major runs, starting with zeros)."""
    flat = mask.flatten(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    return {"size": list(mask.shape), "counts": [int(x) for x in runs]}


@pytest.fixture(scope="module")
def fp_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("refer_seg")
    img_dir = root / "images" / "mscoco" / "images" / "train2014"
    img_dir.mkdir(parents=True)
    (root / "fprefcoco").mkdir()
    images, anns, refs = [], [], []
    rng = np.random.default_rng(0)
    for iid, (h, w) in FP_IMAGES.items():
        name = f"COCO_train2014_{iid:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(img_dir / name)
        images.append({"id": iid, "file_name": name, "height": h, "width": w})
        m = np.zeros((h, w), np.uint8)
        r0, r1, c0, c1 = FP_BOXES[iid]
        m[r0:r1, c0:c1] = 1
        anns.append({"id": 100 + iid, "image_id": iid, "category_id": 1, "segmentation": _rle(m)})
        true_s, false_s = FP_SENTENCES[iid]
        refs.append(
            {
                "ref_id": iid,
                "ann_id": 100 + iid,
                "image_id": iid,
                "category_id": 1,
                "split": "val",
                "sentences": [
                    {"sent": true_s, "sent_id": 0, "is_false_premise": False},
                    {"sent": false_s, "sent_id": 1, "is_false_premise": True, "gt_sent": true_s},
                ],
            }
        )
    with open(root / "fprefcoco" / "refs(berkeley_exclude_unified).p", "wb") as f:
        pickle.dump(refs, f)
    instances = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    with open(root / "fprefcoco" / "instances.json", "w") as f:
        json.dump(instances, f)
    # The same refs as RefCOCO (every sentence names the box), for the teacher-forced refer protocol.
    (root / "refcoco").mkdir()
    plain = [
        {**r, "sentences": [{"sent": s["sent"], "sent_id": s["sent_id"]} for s in r["sentences"]]}
        for r in refs
    ]
    with open(root / "refcoco" / "refs(unc_exclude_unified).p", "wb") as f:
        pickle.dump(plain, f)
    with open(root / "refcoco" / "instances.json", "w") as f:
        json.dump(instances, f)
    return str(root)


def _fp_batches(fp_root, cfg):
    rd = R.ReferReader(fp_root, "fprefcoco", "val", mode="eval", eval_answer=False)
    return list(
        P.eval_dataset(
            rd,
            data_config(template="vicuna_v1"),
            cfg.sam,
            TOKENIZER,
            shard_options=grain.sharding.ShardOptions(0, 1),
        )
    )


def _all_positive_masks(model):
    """The model with a mask decoder whose logits are > 0 everywhere: every [SEG] mask is the whole image."""
    m = nnx.clone(model)
    dec = m.visual_model.mask_decoder
    up, hyper = dec.output_upscaling[3], dec.output_hypernetworks_mlps[0].layers[-1]
    up.kernel[...] = jnp.zeros_like(up.kernel[...])
    up.bias[...] = jnp.ones_like(up.bias[...])  # GELU(1) > 0 at every low-res pixel
    hyper.kernel[...] = jnp.zeros_like(hyper.kernel[...])
    hyper.bias[...] = jnp.ones_like(hyper.bias[...])
    return m


def test_fprefcoco_see_and_segment_hand_checked(model, cfg, tokenizer, fp_root):
    batches = _fp_batches(fp_root, cfg)
    seg_answer = tokenizer.encode("Sure, it is [SEG].", add_special_tokens=False) + [tokenizer.eos_token_id]
    no_answer = tokenizer.encode("There is none.", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert SEG_TOKEN_ID in seg_answer and SEG_TOKEN_ID not in no_answer

    def scripted(batch):
        r = len(batch["input_ids"])
        tokens = np.zeros((r, 12), np.int32)
        lengths = np.zeros((r,), np.int32)
        for i in range(r):
            if not batch["conv_valid"][i]:
                continue
            q = erec.query_text(tokenizer, batch["input_ids"][i])
            ans = seg_answer if any(s in q for s in FP_SEG_FOR) else no_answer
            tokens[i, : len(ans)] = ans
            lengths[i] = len(ans)
        return tokens, lengths

    summary, records = protocols.evaluate_fprefcoco(
        _all_positive_masks(model), batches, tokenizer, total_len=LENGTH, generate_fn=scripted, progress=False
    )
    by = {next(s for pair in FP_SENTENCES.values() for s in pair if s in r["query"]): r for r in records}
    assert len(records) == 4 and set(by) == {s for pair in FP_SENTENCES.values() for s in pair}
    # Hand-checked: a [SEG] mask is the whole image (1200 px for image 1, 1000 px for image 2); GT boxes are
    # 10 x 10 = 100 px (image 1) and 5 x 8 = 40 px (image 2); false premises have an all-zero GT.
    expect = {  # query: (presence, premise, I, U)
        "the red box": (True, True, 100, 1200),
        "the purple cat": (True, False, 0, 1200),
        "the blue circle": (False, True, 0, 40),
        "the green dog": (False, False, 0, 0),
    }
    for q, (pres, prem, i, u) in expect.items():
        r = by[q]
        assert (r["presence"], r["gt_presence"], r["intersection"], r["union"]) == (pres, prem, i, u), q
        assert r["seg_emitted"] == pres and ("[SEG]" in r["answer"]) == pres
    assert summary["See"] == 0.5  # right on "red box" and "green dog", wrong on the other two
    assert summary["Segment"] == pytest.approx(100 / 2440, rel=1e-9)
    assert summary["gIoU"] == pytest.approx((100 / (1200 + 1e-5) + 0 + 0 + 1.0) / 4, rel=1e-9)
    assert summary["num_queries"] == 4 and summary["num_true_premise"] == 2


def test_fprefcoco_cli_greedy_generation_on_8_devices(model, fp_root, tmp_path):
    """`evaluate.py --split fprefcoco_val`: sharded greedy generation (KV cache) -> full forward ->
    See/Segment,
    the records consistent with the generated text."""
    from read_jax.eval import run as evaluate

    c = _config(fp_root)
    summary = evaluate.run(
        c,
        "unused",
        "fprefcoco_val",
        out=str(tmp_path),
        model=model,
        tokenizer_dir=TOKENIZER,
        max_new_tokens=3,
        progress=False,
    )
    with open(tmp_path / "samples.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 4 == summary["num_queries"] and summary["devices"] == 8
    assert sorted(r["gt_presence"] for r in records) == [False, False, True, True]
    for r in records:
        assert r["seg_emitted"] == ("[SEG]" in r["answer"])
        assert r["presence"] == (r["seg_emitted"] and r["pred_area"] > 0)
    assert summary["See"] == np.mean([r["presence"] == r["gt_presence"] for r in records])
    assert summary["Segment"] == sum(r["intersection"] for r in records) / (
        sum(r["union"] for r in records) + 1e-10
    )


def test_evaluate_cli_refcoco_teacher_forced(model, fp_root, tmp_path):
    """`--split refcoco_val`: every sentence of every ref is a query (two per image here, each in its own
    batch
    slot), teacher-forced, scored against the ref's mask."""
    from read_jax.eval import run as evaluate

    summary = evaluate.run(
        _config(fp_root),
        "unused",
        "refcoco_val",
        out=str(tmp_path),
        model=model,
        tokenizer_dir=TOKENIZER,
        progress=False,
    )
    with open(tmp_path / "samples.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert sorted(r["id"] for r in records) == ["refcoco/1", "refcoco/1#1", "refcoco/2", "refcoco/2#1"]
    gt_area = {"refcoco/1": 100, "refcoco/2": 40}
    for r in records:
        area = gt_area[r["id"].split("#")[0]]
        assert r["seg_emitted"] and r["intersection"] <= min(area, r["pred_area"])
        assert r["union"] == area + r["pred_area"] - r["intersection"]
    assert summary["num_queries"] == 4
    assert summary["cIoU"] == sum(r["intersection"] for r in records) / (
        sum(r["union"] for r in records) + 1e-10
    )


def test_fp_summary_counts_an_empty_mask_as_absent():
    keys = ("presence", "seg_emitted", "pred_area", "gt_presence", "intersection", "union")
    recs = [
        dict(zip(keys, v))
        for v in (
            (False, True, 0, True, 0, 50),  # a [SEG] with an empty mask: absent
            (True, True, 9, True, 9, 10),
            (False, False, 0, False, 0, 0),
        )
    ]
    s = erec.fp_summary_from_records(recs)
    assert s["See"] == pytest.approx(2 / 3) and s["Segment"] == pytest.approx(9 / 60)


def test_left_pad_and_with_answers():
    ids = np.array([[1, 5, 6, 0, 0], [1, 7, 0, 0, 0]], np.int32)
    mask = ids != 0
    lp, lm = protocols.left_pad(ids, mask)
    np.testing.assert_array_equal(lp, [[0, 0, 1, 5, 6], [0, 0, 0, 1, 7]])
    np.testing.assert_array_equal(lm, [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]])
    full = protocols.with_answers(
        {"input_ids": ids, "attention_mask": mask, "x": 3},
        np.array([[9, 2, 0], [2, 0, 0]]),
        np.array([2, 1]),
        6,
    )
    np.testing.assert_array_equal(full["input_ids"], [[1, 5, 6, 9, 2, 0], [1, 7, 2, 0, 0, 0]])
    np.testing.assert_array_equal(full["attention_mask"], full["input_ids"] != 0)
    assert full["x"] == 3
    with pytest.raises(ValueError, match="total_len"):
        protocols.with_answers(
            {"input_ids": ids, "attention_mask": mask}, np.array([[9, 2, 0], [2, 0, 0]]), np.array([3, 1]), 5
        )


# ---- input checks ------------------------------------------------------------------------------------------


def test_evaluate_rejects_bad_batches(model, batches):
    b = dict(batches[0])
    with pytest.raises(ValueError, match="canvas_hw"):
        protocols.evaluate_reasonseg(model, [b], canvas_hw=(320, 320), progress=False)
    with pytest.raises(ValueError, match="lacks"):
        protocols.evaluate_reasonseg(model, [{k: v for k, v in b.items() if k != "mask_hw"}], progress=False)
    with pytest.raises(ValueError, match="does not split"):
        small = {k: v[:3] for k, v in b.items()}  # 3 images, 3 rows: not divisible over 8 devices
        small["conv_image"] = np.arange(3, dtype=np.int32)
        protocols.evaluate_reasonseg(model, [small], mesh=make_mesh(), progress=False)
    with pytest.raises(ValueError, match="unknown split"):
        from read_jax.eval import run as evaluate

        evaluate.parse_split("reasonseg")


def test_evaluation_stages_trace_at_read_7b_shapes():
    """Both stages (all options) at READ-7B's widths and frames, abstractly (house style: full sizes get shape
    tests). Two LLaMA layers and two SAM encoder blocks instead of 32 each: depth changes no shape, and
    tracing 32 + 32 layers would cost most of this file's time budget."""
    import dataclasses

    cfg = ReadConfig.read_7b(lora=None, max_segs=1).with_dtype("bfloat16")
    cfg = cfg.replace(
        llama=dataclasses.replace(cfg.llama, num_hidden_layers=2),
        sam=dataclasses.replace(cfg.sam, encoder_depth=2, global_attn_indexes=(1,)),
    )
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ReadModel(cfg, rngs=nnx.Rngs(0))))
    b, length, canvas = 2, 96, (640, 512)
    sds = jax.ShapeDtypeStruct
    batch = {
        "images_clip": sds((b, 336, 336, 3), jnp.float32),
        "images_sam": sds((b, 1024, 1024, 3), jnp.float32),
        "input_ids": sds((b, length), jnp.int32),
        "attention_mask": sds((b, length), bool),
        "conv_image": sds((b,), jnp.int32),
        "conv_valid": sds((b,), bool),
        "orig_hw": sds((b, 2), jnp.int32),
        "sam_input_hw": sds((b, 2), jnp.int32),
        "masks": sds((b, *canvas), jnp.uint8),
        "mask_valid": sds((b,), bool),
        "mask_hw": sds((b, 2), jnp.int32),
    }
    enc = jax.eval_shape(
        lambda s, x: stages.encode(nnx.merge(graphdef, s), x),
        state,
        {k: batch[k] for k in stages.ENCODE_KEYS},
    )
    assert {k: getattr(enc, k).shape for k in ("seg_hidden", "seg_valid", "image_hidden", "image_emb")} == {
        "seg_hidden": (b, 4096),
        "seg_valid": (b,),
        "image_hidden": (b, 576, 4096),
        "image_emb": (b, 64, 64, 256),
    }
    opts = stages.DecodeOptions(
        canvas_hw=canvas,
        threshold_search=True,
        points_prompt=analysis.points_prompt_config(cfg.sasp),
        return_maps=True,
    )
    out = jax.eval_shape(
        lambda s, e, x: stages.decode(nnx.merge(graphdef, s), e, x, opts),
        state,
        enc,
        {k: batch[k] for k in stages.DECODE_KEYS},
    )
    assert out["inter"].shape == out["union"].shape == (b,) and out["inter"].dtype == jnp.int32
    assert out["points"].shape == out["pp_points"].shape == (b, 30, 2)
    assert out["hist_fg"].shape == (b, len(analysis.THRESHOLDS) + 1)
    assert out["pred_mask"].shape == out["sim_map"].shape == out["pp_mask"].shape == (b, *canvas)
