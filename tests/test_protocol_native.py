"""Evaluation at native resolution: every image scored at its original size, in bounded memory.

A ReasonSeg-format split with two images larger than 1024 px (and a small one) through the eval pipeline and
the teacher-forced protocol of a tiny random READ. Checked against an independent computation: the model's
low-res mask logits upsampled by Meta's `Sam.postprocess_masks` (torch) to each image's original size and
compared in numpy with the GT the reader paints at that size. The per-query I/U and the cIoU agree exactly;
the same split scored with an explicit 1024 cap gives another cIoU (and says so in its summary). The band
scorer's compiled temporaries stay far below a full-canvas float map as the canvas grows.
"""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from read_jax.data import pipeline as P
from read_jax.data import readers as R
from read_jax.eval import dumps, protocols, stages
from read_jax.eval.records import summary_from_records
from tests.helpers import require_meta_sam
from tests.protocol_fixtures import TOKENIZER, tiny_model, write_reason_seg

SIZES = [(1300, 1100), (900, 1500), (600, 410)]  # (H, W): two above 1024 px, one small


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("native"))
    write_reason_seg(root, "val", SIZES, seed=5)
    return R.ReasonSegReader(root, "val", mode="eval")


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1)


def _batches(reader, model, side):
    dc = P.DataConfig(batch_size=2, max_convs=1, max_mask_side=side, length_buckets=(128,))
    opts = grain.sharding.ShardOptions(0, 1)
    return list(P.eval_dataset(reader, dc, model.config.sam, TOKENIZER, shard_options=opts))


@pytest.fixture(scope="module")
def native(split, model, tmp_path_factory):
    batches = _batches(split, model, 0)
    out = str(tmp_path_factory.mktemp("native_dump"))
    summary, recs = protocols.evaluate_reasonseg(model, batches, progress=False, dump_dir=out)
    return batches, summary, recs, out


def _low_res(model, batch):
    """The model's low-res mask logits of every row (its teacher-forced forward, no canvas)."""

    @nnx.jit
    def f(m, b):
        return m(b, logits="none").masks.low_res_logits[:, 0]

    return np.asarray(f(model, {k: jnp.asarray(v) for k, v in P.device_batch(batch).items()}))


def test_native_canvas_holds_original_gt(split, native):
    batches, _, _, _ = native
    assert [b["masks"].shape[1:] for b in batches] == [(1536, 1536), (768, 768)]  # the CANVAS_SIDES ladder
    for b in batches:
        for r in np.flatnonzero(b["mask_valid"]):
            i = int(b["example_index"][b["conv_image"][r]])
            gt = split[i].masks[0]
            h, w = gt.shape
            assert tuple(b["mask_hw"][r]) == (h, w) == SIZES[i]
            np.testing.assert_array_equal(b["masks"][r, :h, :w], gt)
            assert not b["masks"][r, h:].any() and not b["masks"][r, :, w:].any()


def test_native_ciou_equals_independent_numpy(split, model, native):
    require_meta_sam()
    from torchref.sam import meta_postprocess

    batches, summary, recs, _ = native
    s = model.config.sam.image_size
    inter, union = {}, {}
    for b in batches:
        low = _low_res(model, b)
        for r in np.flatnonzero(b["mask_valid"] & b["image_valid"][b["conv_image"]]):
            i = int(b["example_index"][b["conv_image"][r]])
            gt = split[i].masks[0]  # the reader's GT, painted at the original size
            logits = meta_postprocess(low[r][None, None], tuple(b["sam_input_hw"][i % 2]), gt.shape, s)[0, 0]
            assert logits.shape == SIZES[i]
            keep = gt != 255
            pred, g = (logits > 0) & keep, (gt == 1) & keep
            inter[i], union[i] = int((pred & g).sum()), int(pred.sum() + g.sum() - (pred & g).sum())
    assert [(r["intersection"], r["union"]) for r in recs] == [(inter[i], union[i]) for i in range(3)]
    assert all(r["scored_hw"] == r["native_hw"] == list(SIZES[i]) for i, r in enumerate(recs))
    ciou = sum(inter.values()) / (sum(union.values()) + 1e-10)
    assert 0 < ciou < 1 and summary["cIoU"] == pytest.approx(ciou, abs=1e-12)
    assert summary["downscaled_queries"] == 0


def test_native_differs_from_capped(split, model, native):
    _, summary, recs, _ = native
    capped, crecs = protocols.evaluate_reasonseg(model, _batches(split, model, 1024), progress=False)
    assert capped["downscaled_queries"] == 2
    assert [r["scored_hw"] for r in crecs][:2] == [[1024, 866], [614, 1024]]
    assert (crecs[2]["intersection"], crecs[2]["union"]) == (recs[2]["intersection"], recs[2]["union"])
    assert abs(capped["cIoU"] - summary["cIoU"]) > 1e-4, (capped["cIoU"], summary["cIoU"])
    # The native union counts every original pixel: far more than the capped canvas can hold.
    assert recs[0]["union"] > 1.2 * crecs[0]["union"]


def test_native_band_scoring_memory_is_bounded():
    """The compiled scorer's temporaries grow with the canvas side (the per-axis weights), not its area."""
    r, l = 2, 64

    def temp_bytes(side):
        args = (
            jax.ShapeDtypeStruct((r, side, side), jnp.uint8),
            jax.ShapeDtypeStruct((r, 2), jnp.int32),
            jax.ShapeDtypeStruct((r,), jnp.bool_),
            {"": jax.ShapeDtypeStruct((r, l, l), jnp.float32)},
            jax.ShapeDtypeStruct((r, 2), jnp.int32),
        )
        f = jax.jit(lambda *a: stages.score_bands(*a, image_size=4 * l))
        return f.lower(*args).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(1024), temp_bytes(4096)
    full_logits = r * 4096 * 4096 * 4  # one float32 map of the large canvas
    assert large < full_logits / 5, (large, full_logits)  # measured: ~21 MB against 134 MB
    assert large < 4.5 * small, (small, large)  # 4x the side, 16x the pixels: linear in the side


def test_native_dump_rescores_to_the_direct_figures(split, native):
    """Teacher-forced dumps hold each query's masks at the original size; re-scoring them from the files
    alone gives the direct summary."""
    _, summary, recs, out = native
    for i, rec in enumerate(recs):
        pred, gt = dumps.read_masks(out, rec)
        assert pred.shape == gt.shape == SIZES[i] and pred.dtype == bool
        np.testing.assert_array_equal(gt, split[i].masks[0])
    rescored = dumps.rescore_records(out, [dict(r) for r in recs])
    assert [(r["intersection"], r["union"]) for r in rescored] == [
        (r["intersection"], r["union"]) for r in recs
    ]
    assert dumps.differences(summary, summary_from_records(rescored)) == []
