"""Losses vs a torch transcription of READ.py:46-89, 560-598 (read_reference.md §5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from read_jax.losses import (
    LossWeights,
    ce_loss,
    cell_coverage,
    mask_losses,
    peak_loss,
    read_batch_loss,
    similarity_loss,
)
from read_jax.read_model import MaskOutput, ReadOutput, SegStates
from read_jax.sam.transforms import pixel_valid
from tests.helpers import require_torch
from torchref.losses import read_losses


def _canvas(arrs, H, W):
    out = np.zeros((len(arrs), H, W), np.float32)
    valid = np.zeros((len(arrs), H, W), bool)
    for i, a in enumerate(arrs):
        out[i, : a.shape[0], : a.shape[1]] = a
        valid[i, : a.shape[0], : a.shape[1]] = True
    return out, valid


def test_losses_match_torch_reference_with_padding_and_mixed_sizes():
    torch = require_torch()
    rng = np.random.default_rng(0)
    R, T, V = 3, 9, 17
    logits = rng.normal(size=(R, T, V)).astype(np.float32) * 3
    labels = rng.integers(0, V, size=(R, T))
    labels[:, :4] = -100
    labels[2] = -100  # a row with no supervised token
    # Two images: 2 masks of 7x5, 1 mask of 4x9; canvas 8x10 with one empty slot.
    sizes = [(7, 5), (7, 5), (4, 9)]
    preds = [rng.normal(size=s).astype(np.float32) * 4 for s in sizes]
    gts = [(rng.random(s) > 0.6).astype(np.float32) for s in sizes]
    p_can, valid = _canvas([*preds, np.zeros((1, 1), np.float32)], 8, 10)
    g_can, _ = _canvas([*gts, np.zeros((1, 1), np.float32)], 8, 10)
    mask_valid = np.array([True, True, True, False])

    ce_t, bce_t, dice_t = read_losses(
        torch.tensor(logits),
        torch.tensor(labels),
        [torch.tensor(np.stack(preds[:2])), torch.tensor(preds[2][None])],
        [torch.tensor(np.stack(gts[:2])), torch.tensor(gts[2][None])],
    )
    # The batch loss as the train step calls it, on a hand-built model output: 4 mask slots (one per row).
    extents = np.array([*sizes, (1, 1)], np.int32)
    out = ReadOutput(
        hidden=jnp.zeros((R, T, 8)),
        image_token_start=jnp.zeros((R,), jnp.int32),
        labels=jnp.asarray(labels),
        logits=jnp.asarray(logits),
        seg=SegStates(
            hidden=jnp.zeros((4, 1, 8)),
            valid=jnp.ones((4, 1), bool),
            index=jnp.zeros((4, 1), jnp.int32),
            image_hidden=jnp.zeros((4, 4, 8)),
        ),
        masks=MaskOutput(
            pred_embeddings=jnp.zeros((4, 1, 8)),
            points=jnp.zeros((4, 1, 2, 2)),
            point_labels=jnp.zeros((4, 1, 2), jnp.int32),
            similarity=jnp.zeros((4, 1, 4)),
            low_res_logits=jnp.zeros((4, 1, 4, 4)),
            mask_logits=jnp.asarray(p_can)[:, None],
        ),
    )
    batch = {
        "masks": jnp.asarray(g_can, jnp.uint8),
        "mask_valid": jnp.asarray(mask_valid),
        "mask_hw": extents,
    }
    np.testing.assert_array_equal(np.asarray(pixel_valid(jnp.asarray(extents), (8, 10))), valid)
    loss, aux = read_batch_loss(out, batch)
    np.testing.assert_allclose(aux["ce"], ce_t.item(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux["bce"], bce_t.item(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(aux["dice"], dice_t.item(), rtol=1e-5, atol=1e-7)
    w = LossWeights()
    np.testing.assert_allclose(loss, ce_t.item() + w.bce * bce_t.item() + w.dice * dice_t.item(), rtol=1e-5)
    assert int(aux["num_masks"]) == 3


def test_no_masks_gives_zero_mask_loss_and_finite_grads():
    logits = jnp.zeros((2, 6, 6))
    targets = jnp.zeros((2, 6, 6))
    valid = jnp.ones((2, 6, 6), bool)
    bce, dice = mask_losses(logits, targets, valid, jnp.zeros(2, bool))
    assert float(bce) == 0.0 and float(dice) == 0.0
    g = jax.grad(lambda x: sum(mask_losses(x, targets, valid, jnp.zeros(2, bool))))(logits)
    assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).max()) == 0.0


def test_ce_without_supervised_tokens_is_zero():
    ce, n = ce_loss(jnp.ones((1, 4, 5)), jnp.full((1, 4), -100))
    assert float(ce) == 0.0 and int(n) == 0


def test_dice_scale_makes_eps_matter_for_tiny_masks():
    # One GT pixel, prediction strongly off everywhere: with the /1000 scale the eps of 1e-6 is 1e-3
    # pixels, so the dice loss is ~1 (not 0): the reference's behaviour.
    logits = jnp.full((1, 4, 4), -20.0)
    t = jnp.zeros((1, 4, 4)).at[0, 0, 0].set(1.0)
    _, dice = mask_losses(logits, t, jnp.ones((1, 4, 4), bool), jnp.ones(1, bool))
    expected = 1 - (2 * (1 / (1 + np.exp(20))) / 1000 + 1e-6) / (
        16 / (1 + np.exp(20)) / 1000 + 1 / 1000 + 1e-6
    )
    assert float(dice) == pytest.approx(expected, rel=1e-5)


def _coverage_loops(mask, extent_hw, orig_hw, grid, sub):
    """Direct transcription of the rule, one sample at a time: the centred min(H, W) square of the original
    image split into grid x grid cells, each sampled at sub x sub evenly spaced points, mapped into the mask
    extent."""
    (eh, ew), (h, w) = extent_hw, orig_hw
    side = min(h, w)
    y0, x0 = (h - side) / 2, (w - side) / 2
    out = np.zeros((grid, grid))
    for ci in range(grid):
        for cj in range(grid):
            hits = 0
            for a in range(sub):
                for b in range(sub):
                    y = y0 + (ci * sub + a + 0.5) / (grid * sub) * side
                    x = x0 + (cj * sub + b + 0.5) / (grid * sub) * side
                    yi = min(int(np.floor(y * eh / h)), eh - 1)
                    xi = min(int(np.floor(x * ew / w)), ew - 1)
                    hits += mask[yi, xi]
            out[ci, cj] = hits / sub**2
    return out.reshape(-1)


def test_cell_coverage_of_aligned_rectangles_is_exact():
    """A 300x200 (WxH) image: the CLIP view is x in [50, 250). Its top-left quarter is covered exactly by the
    GT, whether the GT is stored at full size or downscaled to half (the pipeline's `mask_hw`)."""
    full = np.zeros((1, 224, 320), np.uint8)
    full[0, :100, 50:150] = 1
    half = np.zeros((1, 224, 320), np.uint8)
    half[0, :50, 25:75] = 1
    want = np.zeros((4, 4))
    want[:2, :2] = 1
    for m, ext in ((full, (200, 300)), (half, (100, 150))):
        got = cell_coverage(jnp.asarray(m), jnp.array([ext]), jnp.array([[200, 300]]), 4)
        np.testing.assert_array_equal(np.asarray(got).reshape(4, 4), want)


def test_cell_coverage_matches_a_per_sample_transcription():
    rng = np.random.default_rng(0)
    cases = [
        ((240, 320), (240, 320)),
        ((300, 117), (300, 117)),
        ((224, 128), (448, 256)),
        ((97, 97), (97, 97)),
    ]
    masks = np.zeros((len(cases), 300, 320), np.uint8)
    for i, (ext, _) in enumerate(cases):
        masks[i, : ext[0], : ext[1]] = rng.random(ext) > 0.6
        masks[i, ext[0] :, :] = 1  # outside the extent: must never be sampled
        masks[i, :, ext[1] :] = 1
    ext = jnp.array([c[0] for c in cases])
    orig = jnp.array([c[1] for c in cases])
    got = np.asarray(cell_coverage(jnp.asarray(masks), ext, orig, grid=6, sub=3))
    for i, (e, o) in enumerate(cases):
        np.testing.assert_allclose(
            got[i], _coverage_loops(masks[i], e, o, 6, 3), atol=1e-6, err_msg=str(cases[i])
        )


def test_similarity_loss_is_the_kl_to_the_coverage_distribution():
    cov = jnp.array([[1.0, 1.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    valid = jnp.array([True, True, True, False])
    # Uniform logits: KL = log(P / k) for k equally covered cells; row 2 (target outside the view) and row 3
    # (invalid) are not averaged in.
    uniform = similarity_loss(jnp.zeros((4, 4)), cov, valid)
    np.testing.assert_allclose(float(uniform), (np.log(4 / 2) + np.log(4 / 1)) / 2, rtol=1e-6)
    # Logits that reproduce the target distribution give 0, whatever the excluded rows hold.
    perfect = jnp.log(jnp.maximum(cov / jnp.maximum(cov.sum(-1, keepdims=True), 1e-8), 1e-12))
    perfect = perfect.at[2:].set(jnp.array([[5.0, -3.0, 2.0, 0.0]] * 2))
    assert float(similarity_loss(perfect, cov, valid)) < 1e-6
    # The gradient raises the covered cells and lowers the others.
    g = np.asarray(jax.grad(similarity_loss)(jnp.zeros((4, 4)), cov, valid))
    assert (g[0, :2] < 0).all() and (g[0, 2:] > 0).all() and not g[2:].any()


def test_peak_loss_scores_the_min_max_map_that_sasp_thresholds():
    cov = jnp.array([[1.0, 0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0]])
    valid = jnp.array([True, True, True])
    beta = 10.0
    # By hand: f = (x - min) / (max - min); the KL to a one-cell target is -log softmax(beta f)_0.
    x = np.array([[3.0, 2.8, -1.0, -1.0, -1.0], [30.0, 10.0, -10.0, -10.0, -10.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    f = (x - x.min(-1, keepdims=True)) / np.maximum(np.ptp(x, -1, keepdims=True), 1e-12)
    z = beta * f
    nll = -(z[:, 0] - np.log(np.exp(z).sum(-1)))
    got = float(peak_loss(jnp.asarray(x), cov, valid, beta))
    # Row 2's map is constant (no min-max): skipped, as SasP would have no points to give.
    np.testing.assert_allclose(got, nll[:2].mean(), rtol=1e-5)
    # Scale-free, as SasP's min-max is: multiplying or shifting the map changes nothing.
    np.testing.assert_allclose(float(peak_loss(jnp.asarray(7.0 * x - 3.0), cov, valid, beta)), got, rtol=1e-5)
    # A distractor within 20% of the max (row 0's cell 1: a SasP positive) costs far more than one at half
    # the range (row 1's cell 1), though both rows put the max on the target.
    assert nll[0] > 0.4 and nll[1] < 0.01
    # The gradient lowers the distractor and raises the target, through the normalisation.
    g = np.asarray(jax.grad(peak_loss)(jnp.asarray(x), cov, valid, beta))
    assert g[0, 1] > 0 and g[0, 0] < 0 and not g[2].any()
