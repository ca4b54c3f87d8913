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

import jax
import jax.numpy as jnp

from read_jax.config import IGNORE_INDEX


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Loss weights (`train_read.py:93-95`); READ-7B from scratch used dice=4 (README:96)."""

    ce: float = 1.0
    bce: float = 2.0
    dice: float = 0.5


def ce_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """HF causal-LM cross-entropy: position t predicts label t+1, mean over supervised tokens.

    Args:
      logits: float[R, T, V].
      labels: int[R, T], IGNORE_INDEX (-100) where unsupervised.
    Returns:
      (mean loss over the batch's supervised tokens (0 if none), number of supervised tokens).
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
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


def read_loss(logits, labels, mask_logits, mask_targets, pixel_valid, mask_valid,
              weights: LossWeights = LossWeights()) -> tuple[jax.Array, dict]:
    """The total READ loss and its terms: ce_w * CE + bce_w * BCE + dice_w * Dice."""
    ce, n_tok = ce_loss(logits, labels)
    bce, dice = mask_losses(mask_logits, mask_targets, pixel_valid, mask_valid)
    loss = weights.ce * ce + weights.bce * bce + weights.dice * dice
    return loss, {"loss": loss, "ce": ce, "bce": bce, "dice": dice,
                  "num_tokens": n_tok, "num_masks": mask_valid.sum()}
