"""Appendix A.1 threshold search: hand-made similarity maps with the chosen thresholds and cIoU written down,
a brute-force check of the histogram trick, and the full-resolution similarity map against the torch
transcription of the reference's `origin_sm`."""

import jax.numpy as jnp
import numpy as np
import pytest

from read_jax import sasp
from read_jax.eval import analysis
from read_jax.metrics import query_iou
from tests.helpers import require_torch


def _search(maps, gts):
    maps = np.stack(maps).astype(np.float32)
    gts = np.stack(gts).astype(np.uint8)
    valid = np.ones(maps.shape, bool)
    hist_fg, hist_all = analysis.threshold_histograms(jnp.asarray(maps), jnp.asarray(gts), jnp.asarray(valid))
    return analysis.best_thresholds(np.asarray(hist_fg), np.asarray(hist_all))


def test_threshold_search_on_hand_made_maps():
    # Map A: the three GT pixels score 0.95, 0.80, 0.70; the 255 pixel scores 0.60 (ignored either way);
    # the best background pixel scores 0.30. Every t in (0.30, 0.70] gives I = U = 3; the grid's smallest such
    # t is 0.31.
    a = np.array(
        [
            [0.95, 0.80, 0.20, 0.00],
            [0.70, 0.60, 0.10, 0.00],
            [0.30, 0.25, 0.05, 0.00],
            [0.00, 0.00, 0.00, 0.00],
        ]
    )
    ga = np.zeros((4, 4))
    ga[0, 0] = ga[0, 1] = ga[1, 0] = 1
    ga[1, 1] = 255
    # Map B: the one GT pixel (0.5) is outscored by two background pixels (0.9): the best a threshold can do
    # is I = 1, U = 3 for any t in (0, 0.5]; ties go to the smallest, 0.01 (t = 0 would take all 16 pixels).
    b = np.zeros((4, 4))
    b[0, 0] = b[3, 3] = 0.9
    b[2, 1] = 0.5
    gb = np.zeros((4, 4))
    gb[2, 1] = 1
    # Map C: no GT; the best mask is the empty one, first reached at t = 0.41 (the map's max is 0.40): IoU 1.
    c = np.full((4, 4), 0.1)
    c[1, 2] = 0.4
    gc = np.zeros((4, 4))
    thr, inter, union = _search([a, b, c], [ga, gb, gc])
    np.testing.assert_array_equal(thr, np.float32([0.31, 0.01, 0.41]))
    np.testing.assert_array_equal(inter, [3, 1, 0])
    np.testing.assert_array_equal(union, [3, 3, 0])
    ciou = inter.sum() / union.sum()
    giou = np.mean(query_iou(inter, union))
    assert ciou == pytest.approx(4 / 6)
    assert giou == pytest.approx((3 / (3 + 1e-5) + 1 / (3 + 1e-5) + 1.0) / 3)


def test_threshold_search_equals_brute_force():
    rng = np.random.default_rng(0)
    maps = rng.random((5, 9, 11)).astype(np.float32)
    maps[0, :3] = np.float32(0.37)  # values exactly on the grid
    gts = (rng.random((5, 9, 11)) > 0.6).astype(np.uint8)
    gts[1, :2] = 255
    thr, inter, union = _search(list(maps), list(gts))
    for m, g, t, i, u in zip(maps, gts, thr, inter, union, strict=False):
        keep = g != 255
        scores = []
        for tk in analysis.THRESHOLDS:
            p = (m >= tk) & keep
            ii = int((p & (g == 1)).sum())
            uu = int((p | ((g == 1) & keep)).sum())
            scores.append((ii / (uu + 1e-5) + (uu == 0), ii, uu))
        k = int(np.argmax([s[0] for s in scores]))
        assert (t, i, u) == (analysis.THRESHOLDS[k], scores[k][1], scores[k][2])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_threshold_similarity_map_matches_reference_origin_sm(dtype):
    torch = require_torch()
    from torchref.sasp import get_similarity_map

    rng = np.random.default_rng(1)
    sizes = [(240, 320), (300, 117), (97, 97), (401, 150)]
    canvas = (401, 320)
    sim = rng.normal(0, 3, (len(sizes), 576)).astype(np.float32)
    hw = np.array(sizes, np.int32)
    got = np.asarray(
        sasp.similarity_map_full(
            jnp.asarray(sim), jnp.asarray(hw), jnp.asarray(hw), canvas, similarity_dtype=dtype
        )
    )
    for k, (h, w) in enumerate(sizes):
        t = torch.tensor(sim[k]).reshape(1, 576, 1)
        if dtype == "bfloat16":
            t = t.to(torch.bfloat16)  # the reference min-maxes in the similarity's own (bf16) dtype
        want = get_similarity_map(t, (h, w)).numpy()[0, ..., 0]
        # fp32 resizes with different op orders (composed per-axis weights vs two torch resizes): 1e-6.
        np.testing.assert_allclose(got[k, :h, :w], want, atol=2e-6, rtol=0)
        assert not got[k, h:].any() and not got[k, :, w:].any()
        assert got[k, :h, :w].min() >= 0 and got[k, :h, :w].max() <= 1 + 1e-6
