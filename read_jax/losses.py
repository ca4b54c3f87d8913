"""READ's training losses: shifted text cross-entropy + 2.0 * BCE + 0.5 * Dice on the masks.

Reference: READ `model/READ.py:46-89, 560-598` (read_reference.md §5). Shapes:
  R conversation rows, T text length (expanded), V vocabulary, M mask slots (static, with validity),
  H W a static mask canvas; each mask's valid pixels are those inside its original (H_i, W_i).

Differences from the reference, all numerically invisible at fp32:
  * The reference accumulates `sigmoid_ce(P_i, M_i, n_i) * n_i` per image and divides by `N + 1e-8`,
    i.e. every mask gets the weight n_i / (n_i + 1e-8) / (N + 1e-8). We use 1 / (N + 1e-8): the
    factor n_i / (n_i + 1e-8) differs from 1 by < 1e-8 relative.
  * Masks live on a padded canvas: per-pixel means run over each mask's valid region only, which is
    exactly the reference's mean over the original (H, W).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from read_jax.config import IGNORE_INDEX
from read_jax.read_model import ReadOutput
from read_jax.sam.transforms import pixel_valid


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Loss weights (`train_read.py:93-95`); READ-7B from scratch used dice=4 (README:96)."""

    ce: float = 1.0
    bce: float = 2.0
    dice: float = 0.5
    # Not in READ (0 there): `similarity_loss`, the tiny SESAME stage's stand-in for LLaVA-1.5's image-text
    # alignment (configs/tiny.py:sesame).
    sim: float = 0.0
    # Not in READ either: `peak_loss`, the same KL on the map as SasP reads it (min-max normalised, sharpened
    # by `peak_beta`), so that only the target's cells clear READ's t_pos (configs/tiny.py:points).
    peak: float = 0.0
    peak_beta: float = 10.0

    @property
    def masks(self) -> bool:
        """Whether any term needs the masks (False: a text-only forward, SAM skipped)."""
        return bool(self.bce or self.dice or self.sim or self.peak)


def ce_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """HF causal-LM cross-entropy: position t predicts label t+1, mean over supervised tokens.

    Args:
      logits: float[R, T, V].
      labels: int[R, T], IGNORE_INDEX (-100) where unsupervised.
    Returns:
      (mean loss over the batch's supervised tokens (0 if none), number of supervised tokens).
    """
    return token_ce(logits[:, :-1], labels[:, 1:])


def token_ce(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy of already-aligned logits and targets, mean over the supervised ones.

    Args:
      logits: float[..., V]; targets: int[...], IGNORE_INDEX where unsupervised.
    Returns:
      (mean loss (0 if nothing is supervised), number of supervised targets).
    """
    logits = logits.astype(jnp.float32)
    valid = targets != IGNORE_INDEX
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    nll = jnp.where(valid, logz - picked, 0.0)
    n = valid.sum()
    return nll.sum() / jnp.maximum(n, 1), n


def _pixel_terms(logits: jax.Array, targets: jax.Array, pixel_valid: jax.Array):
    """Per-mask BCE mean and Dice over each mask's valid pixels. All inputs [M, H, W]."""
    logits = logits.astype(jnp.float32)
    t = targets.astype(jnp.float32)
    v = pixel_valid.astype(jnp.float32)
    npix = jnp.maximum(v.sum(axis=(-1, -2)), 1.0)
    # BCE with logits, numerically stable form (as torch's binary_cross_entropy_with_logits).
    bce = jnp.maximum(logits, 0) - logits * t + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    bce = (bce * v).sum(axis=(-1, -2)) / npix
    # Dice with the reference's /1000 scale and eps 1e-6.
    p = jax.nn.sigmoid(logits) * v
    scale = 1000.0
    num = 2.0 * (p / scale * t * v).sum(axis=(-1, -2))
    den = (p / scale).sum(axis=(-1, -2)) + (t * v / scale).sum(axis=(-1, -2))
    dice = 1.0 - (num + 1e-6) / (den + 1e-6)
    return bce, dice


def mask_losses(logits: jax.Array, targets: jax.Array, pixel_valid: jax.Array, mask_valid: jax.Array):
    """Mask BCE and Dice averaged over the batch's valid masks (0 when there are none).

    Args:
      logits: float[M, H, W] mask logits at the original resolution (on a padded canvas).
      targets: {0,1}[M, H, W] GT masks (training uses mask == 1; 255 ignore pixels become 0 upstream).
      pixel_valid: bool[M, H, W] inside each mask's original (H_i, W_i).
      mask_valid: bool[M] which slots hold a real (prediction, GT) pair.
    Returns:
      (bce, dice), unweighted.
    """
    bce, dice = _pixel_terms(logits, targets, pixel_valid)
    w = mask_valid.astype(jnp.float32)
    n = w.sum()
    return (bce * w).sum() / (n + 1e-8), (dice * w).sum() / (n + 1e-8)


def cell_coverage(
    targets: jax.Array, extent_hw: jax.Array, orig_hw: jax.Array, grid: int, sub: int = 4
) -> jax.Array:
    """Fraction of each CLIP grid cell covered by the GT mask: float32[M, grid * grid] (raster order).

    The CLIP view is the centred min(H, W) square of the original image (READ's short-side resize + centre
    crop); each cell is sampled at `sub` x `sub` points, mapped into the GT canvas, whose mask extent
    `extent_hw` may be a downscaled copy of the original (H, W).

    Args:
      targets: {0,1}[M, Hc, Wc] GT masks on a padded canvas.
      extent_hw: int[M, 2] the mask's extent on the canvas; orig_hw: int[M, 2] the original image size.
    """
    m = targets.shape[0]
    ext = extent_hw.astype(jnp.float32)
    orig = orig_hw.astype(jnp.float32)
    side = jnp.min(orig, axis=-1)  # [M]
    start = (orig - side[:, None]) / 2  # [M, 2] (y0, x0) of the crop
    u = (jnp.arange(grid * sub, dtype=jnp.float32) + 0.5) / (grid * sub)  # [G*sub] in (0, 1)
    pos = start[:, None, :] + u[None, :, None] * side[:, None, None]  # [M, G*sub, 2] original pixels
    idx = jnp.floor(pos * (ext / orig)[:, None, :]).astype(jnp.int32)
    idx = jnp.clip(idx, 0, jnp.maximum(extent_hw[:, None, :] - 1, 0))
    rows = jnp.arange(m)[:, None, None]
    samples = targets[rows, idx[:, :, None, 0], idx[:, None, :, 1]].astype(jnp.float32)  # [M, G*sub, G*sub]
    return samples.reshape(m, grid, sub, grid, sub).mean(axis=(2, 4)).reshape(m, grid * grid)


def similarity_loss(sim_logits: jax.Array, coverage: jax.Array, mask_valid: jax.Array) -> jax.Array:
    """KL(coverage distribution || softmax(similarity)) over the CLIP grid, mean over the supervised masks.

    Not part of READ's recipe (weight 0 there). READ starts from a pretrained LLaVA whose [SEG] similarity map
    already peaks on the object; a LLaVA pretrained on the tiny shapes world has no such alignment, and READ's
    fine-tune cannot teach it: the point selection is not differentiable and DtoC only moves points within a
    cell's neighbourhood. This term teaches the map where the target is (the tiny SESAME stage,
    configs/tiny.py). Masks whose target lies outside the CLIP view (zero coverage) are skipped.

    Args:
      sim_logits: float[M, P] scaled [SEG] . image-token similarities; coverage: float[M, P]
        (`cell_coverage`).
      mask_valid: bool[M].
    """
    total = coverage.sum(axis=-1, keepdims=True)
    valid = mask_valid & (total[:, 0] > 0)
    t = coverage / jnp.maximum(total, 1e-8)
    logp = jax.nn.log_softmax(sim_logits.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.where(t > 0, t * (jnp.log(jnp.maximum(t, 1e-30)) - logp), 0.0), axis=-1)
    w = valid.astype(jnp.float32)
    return (kl * w).sum() / jnp.maximum(w.sum(), 1.0)


def peak_loss(sim: jax.Array, coverage: jax.Array, mask_valid: jax.Array, beta: float = 10.0) -> jax.Array:
    """`similarity_loss` of the map SasP thresholds: KL(coverage || softmax(beta * minmax(sim))).

    SasP min-max normalises the map and takes every cell >= t_pos (0.8) as a positive point, so what decides
    the points is where each cell sits between the map's min and max, not the raw logits `similarity_loss`
    matches: a map whose softmax already puts its mass on the target can still have a plateau of distractor
    cells within 20% of the max, and each becomes a positive point. On the normalised map scaled by `beta`, a
    distractor at 0.8 carries exp(-0.2 beta) of a target cell's mass, so the term pushes distractors down
    towards the map's floor and lifts the target's cells to its top. Scale-free; gradients reach the map
    through its min and max too. Masks with no coverage, or with a constant map, are skipped.

    Args:
      sim: float[M, P] [SEG] . image-token similarities (any scale); coverage: float[M, P];
      mask_valid: bool[M].
    """
    x = sim.astype(jnp.float32)
    lo, hi = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
    span = hi - lo
    f = (x - lo) / jnp.maximum(span, 1e-12)
    return similarity_loss(beta * f, coverage, mask_valid & (span[:, 0] > 0))


# ----------------------------------------------------------------------------------------------------
# The READ batch loss: what the train step calls
# ----------------------------------------------------------------------------------------------------
def text_ce(out: ReadOutput) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The text CE of a forward in whichever logits form it computed.

    Returns:
      (ce, supervised tokens, supervised tokens left out of the loss by `max_supervised`); all zero when the
      forward computed no logits (`logits="none"`: the text loss is off).
    """
    zero = jnp.zeros((), jnp.int32)
    if out.supervised is not None:
        ce, n = token_ce(out.supervised.logits, out.supervised.targets)
        return ce, n, out.supervised.dropped
    if out.logits is not None:
        ce, n = ce_loss(out.logits, out.labels)
        return ce, n, zero
    return jnp.zeros((), jnp.float32), zero, zero


def read_batch_loss(
    out: ReadOutput, batch: Mapping[str, jax.Array], weights: LossWeights = LossWeights()
) -> tuple[jax.Array, dict]:
    """READ's loss of a teacher-forced batch: ce * CE + bce * BCE + dice * Dice (+ the similarity terms).

    GT masks come per [SEG] slot: `batch["masks"]` uint8[R, S', Hc, Wc] (or [R, Hc, Wc] for S' = 1, the usual
    one-[SEG]-per-conversation case) on the canvas of the predictions, with `batch["mask_valid"]` bool[R, S']
    (or [R]). Training targets are `mask == 1` (READ's reason_seg_dataset: 255 -> 0). Slots beyond S' or
    without a predicted [SEG] are not supervised.

    Returns:
      (loss, metrics): loss/ce/bce/dice (+ sim, peak), num_tokens, num_masks, ce_dropped_tokens.
    """
    if not weights.masks:  # a text-only stage (the tiny LLaVA pretraining): no SAM in the forward
        ce, n_tok, dropped = text_ce(out)
        loss = weights.ce * ce
        zero = jnp.zeros((), jnp.float32)
        return loss, {
            "loss": loss,
            "ce": ce,
            "bce": zero,
            "dice": zero,
            "num_tokens": n_tok,
            "num_masks": zero.astype(jnp.int32),
            "ce_dropped_tokens": dropped,
        }
    if out.masks is None or out.masks.mask_logits is None:
        raise ValueError("the READ loss needs the forward's masks (compute_masks=True with a canvas)")
    gt, mvalid = batch["masks"], batch["mask_valid"]
    if gt.ndim == 3:
        gt, mvalid = gt[:, None], mvalid[:, None]
    r, s_gt = mvalid.shape
    canvas = gt.shape[-2:]
    logits = out.masks.mask_logits[:, :s_gt]  # [R, S', Hc, Wc]
    if logits.shape[-2:] != canvas:
        raise ValueError(f"mask canvas {logits.shape[-2:]} != GT canvas {canvas}")
    valid = (mvalid & out.seg.valid[:, :s_gt]).reshape(-1)
    conv_image = batch.get("conv_image")
    if conv_image is None:
        conv_image = jnp.arange(r)
    extent = batch["mask_hw"] if "mask_hw" in batch else batch["orig_hw"][conv_image]
    pv = jnp.broadcast_to(pixel_valid(extent, canvas)[:, None], logits.shape).reshape(r * s_gt, *canvas)
    targets = (gt == 1).reshape(r * s_gt, *canvas)

    ce, n_tok, dropped = text_ce(out)
    bce, dice = mask_losses(logits.reshape(r * s_gt, *canvas), targets, pv, valid)
    loss = weights.ce * ce + weights.bce * bce + weights.dice * dice
    metrics = {"ce": ce, "bce": bce, "dice": dice, "num_tokens": n_tok, "num_masks": valid.sum()}
    if weights.sim or weights.peak:
        # The raw similarity scaled like attention logits (1 / sqrt(C)) before the softmax.
        sim = out.masks.similarity[:, :s_gt] * out.hidden.shape[-1] ** -0.5  # [R, S', P]
        grid = math.isqrt(sim.shape[-1])
        orig = jnp.repeat(batch["orig_hw"][conv_image], s_gt, axis=0)
        cov = cell_coverage(targets, jnp.repeat(extent, s_gt, axis=0), orig, grid)
        sim = sim.reshape(r * s_gt, -1)
        if weights.sim:
            metrics["sim"] = similarity_loss(sim, cov, valid)
            loss = loss + weights.sim * metrics["sim"]
        if weights.peak:
            metrics["peak"] = peak_loss(sim, cov, valid, weights.peak_beta)
            loss = loss + weights.peak * metrics["peak"]
    return loss, {"loss": loss, **metrics, "ce_dropped_tokens": dropped}
