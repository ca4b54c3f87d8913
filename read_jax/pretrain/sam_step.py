"""The SAM stage's model forward and loss (the step is `read_jax.pretrain.runner.update_step`).

Loss as SAM's (Kirillov et al. 2023, appendix A, "Losses"): focal loss and dice loss on the mask logits in the
ratio 20 : 1, plus the mean squared error between the predicted IoU and the IoU of the predicted mask with the
ground truth (weight 1). Here on the decoder's low-res logits (l x l) against the instance masks rasterised in
the same frame, over the pixels of the resized image (the zero padding of the SAM frame is not scored), with
`multimask_output=False` (mask token 0), the output READ uses. The focal loss is torchvision's
`sigmoid_focal_loss` (alpha 0.25, gamma 2) averaged over pixels; the dice loss is DETR's/SAM's
1 - (2 sum p t + 1) / (sum p + sum t + 1) on p = sigmoid(logit).

Shape letters: B images, K prompts per image (Kp point prompts, then Kb box prompts, then Kc attribute
prompts: one token each, `sam_data.attribute_prompt`), Np point slots, S SAM input side, l low-res mask side.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from read_jax.data.preprocess import sam_normalize
from read_jax.pretrain.sam_data import COLORS, attribute_codes
from read_jax.sam import Sam

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """SAM's loss weights (static: part of the jit cache key)."""

    focal: float = 20.0
    dice: float = 1.0
    iou: float = 1.0
    alpha: float = 0.25
    gamma: float = 2.0
    attribute: float = 0.0  # the cells' colour / kind against the attribute codes (`attribute_loss`)


# ---- forward ----------------------------------------------------------------------------------------------
def encode_prompts(sam: Sam, points: Array, labels: Array, boxes: Array) -> Array:
    """Sparse prompt tokens of Kp point prompts and Kb box prompts per image, all Np + 1 tokens long.

    A point prompt is encoded as READ encodes SasP's points (Np slots, labels 1 / 0 / -1, plus SAM's padding
    point); a box prompt is its two corner tokens after Np - 1 "not a point" tokens (the token READ's unused
    SasP slots carry), so that one decoder call serves both kinds.

    Args:
      points / labels: float[B, Kp, Np, 2] / int[B, Kp, Np] in the S frame; boxes: float[B, Kb, 4]
        (x0, y0, x1, y1) in the S frame.
    Returns:
      float[B, Kp + Kb, Np + 1, C]: the point prompts' tokens, then the boxes'.
    """
    pe = sam.prompt_encoder
    b, kp, n_pts = points.shape[:3]
    kb = boxes.shape[1]
    parts = []
    if kp:
        sparse, _ = pe(points.reshape(b * kp, n_pts, 2), labels.reshape(b * kp, n_pts))
        parts.append(sparse.reshape(b, kp, *sparse.shape[1:]))
    if kb:
        none = jnp.zeros((b * kb, n_pts - 1, 2), points.dtype)
        sparse, _ = pe(none, jnp.full(none.shape[:2], -1, jnp.int32), boxes=boxes.reshape(b * kb, 1, 4))
        parts.append(sparse.reshape(b, kb, *sparse.shape[1:]))
    return jnp.concatenate(parts, axis=1)


def decode(sam: Sam, emb: Array, sparse: Array) -> tuple[Array, Array]:
    """Mask logits and predicted IoU of K prompts per image (no mask prompt, as in READ).

    Args:
      emb: float[B, h, w, C] image embeddings; sparse: float[B, K, T, C] prompt tokens (`encode_prompts`).
    Returns:
      (float[B, K, l, l] low-res logits of mask token 0, float[B, K] its predicted IoU).
    """
    b, k = sparse.shape[:2]
    pe = sam.prompt_encoder
    _, dense = pe(None, None)  # the no-mask embedding, [1, h, w, C]
    low, iou = sam.mask_decoder(
        jnp.repeat(emb, k, axis=0),
        pe.get_dense_pe(),
        sparse.reshape(b * k, *sparse.shape[2:]),
        dense,
        multimask_output=False,
    )
    return low[:, 0].reshape(b, k, *low.shape[-2:]), iou[:, 0].reshape(b, k)


def embed_images(sam: Sam, images: Array, input_hw: Array) -> Array:
    """uint8[B, S, S, 3] SAM frames (`preprocess.sam_pixels`) -> float[B, h, w, C], normalised on the device
    as `ReadModel.image_embeddings` does."""
    cfg = sam.cfg
    return sam.image_encoder(sam_normalize(images, input_hw, cfg.pixel_mean, cfg.pixel_std))


def forward(sam: Sam, batch: dict) -> tuple[Array, Array, Array]:
    """A training batch (`sam_data.train_example` stacked) -> (float[B, K, l, l] logits, float[B, K] IoU,
    float[B, h, w, C] the image embeddings).

    The attribute prompts (`class_tokens`, one token each, as SESAME's [SEG] prompt) take their own decoder
    call after the point and box prompts (Np + 1 tokens each)."""
    emb = embed_images(sam, batch["images"], batch["input_hw"])
    low, iou = decode(sam, emb, encode_prompts(sam, batch["points"], batch["labels"], batch["boxes"]))
    tokens = batch.get("class_tokens")
    if tokens is not None and tokens.shape[1]:
        low_c, iou_c = decode(sam, emb, tokens.astype(emb.dtype))
        low, iou = jnp.concatenate([low, low_c], axis=1), jnp.concatenate([iou, iou_c], axis=1)
    return low, iou, emb


# ---- loss -------------------------------------------------------------------------------------------------
def low_res_valid(input_hw: Array, image_size: int, side: int) -> Array:
    """bool[B, l, l]: low-res pixels whose S-frame footprint starts inside the resized image (h, w)."""
    f = image_size // side
    extent = -(-input_hw // f)  # ceil: a partly covered low-res pixel counts
    idx = jnp.arange(side)
    return (idx[None, :, None] < extent[:, 0, None, None]) & (idx[None, None, :] < extent[:, 1, None, None])


def mask_terms(logits: Array, targets: Array, valid: Array, lc: LossConfig) -> dict[str, Array]:
    """Per-mask SAM loss terms over the valid pixels.

    Args:
      logits: float[..., l, l]; targets: {0, 1}[..., l, l]; valid: bool[..., l, l] (broadcastable).
    Returns:
      float32[...] each: focal, dice, iou (of logits > 0 with the target: the IoU head's target).
    """
    x = logits.astype(jnp.float32)
    t = targets.astype(jnp.float32)
    v = jnp.broadcast_to(valid, x.shape).astype(jnp.float32)
    axes = (-2, -1)
    npix = jnp.maximum(v.sum(axes), 1.0)
    p = jax.nn.sigmoid(x)
    ce = optax.sigmoid_binary_cross_entropy(x, t)
    p_t = p * t + (1 - p) * (1 - t)
    alpha_t = lc.alpha * t + (1 - lc.alpha) * (1 - t)
    focal = (alpha_t * ce * (1 - p_t) ** lc.gamma * v).sum(axes) / npix
    dice = 1.0 - (2.0 * (p * t * v).sum(axes) + 1.0) / ((p * v).sum(axes) + (t * v).sum(axes) + 1.0)
    pred = (x > 0).astype(jnp.float32) * v
    inter = (pred * t).sum(axes)
    union = pred.sum(axes) + (t * v).sum(axes) - inter
    return {"focal": focal, "dice": dice, "iou": inter / jnp.maximum(union, 1.0)}


def attribute_logits(emb: Array) -> tuple[Array, Array]:
    """float[B, h, w, C] embeddings -> (float32[B, h, w, colours], float32[B, h, w, kinds]): each cell against
    the attribute codes (`sam_data.attribute_codes`), scaled by 1 / sqrt(C)."""
    codes = jnp.asarray(attribute_codes(emb.shape[-1]))
    logits = jnp.einsum("bhwc,ac->bhwa", emb.astype(jnp.float32), codes) / jnp.sqrt(emb.shape[-1])
    return logits[..., : len(COLORS)], logits[..., len(COLORS) :]


def attribute_loss(emb: Array, cell_colors: Array, cell_kinds: Array) -> tuple[Array, dict[str, Array]]:
    """Cross-entropy of each owned cell's colour and kind, the logits being the cell's embedding against the
    attribute codes (`sam_data.attribute_codes`, no parameters: the codes a prompt naming the object carries)
    scaled by 1 / sqrt(C); the mean over owned cells of the two terms, and the two accuracies.

    Args:
      emb: float[B, h, w, C]; cell_colors / cell_kinds: int[B, h, w], -1 where no shape owns the cell.
    """
    out, terms = {}, []
    color_logits, kind_logits = attribute_logits(emb)
    for name, lo, lab in (("color", color_logits, cell_colors), ("kind", kind_logits, cell_kinds)):
        own = (lab >= 0).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(lo, jnp.maximum(lab, 0))
        cells = jnp.maximum(own.sum(), 1.0)
        terms.append((ce * own).sum() / cells)
        out[f"cell_{name}_acc"] = ((lo.argmax(-1) == lab) * own).sum() / cells
    return terms[0] + terms[1], out


def sam_loss(logits: Array, iou_pred: Array, batch: dict, lc: LossConfig, image_size: int, emb=None):
    """SAM's loss of a batch -> (scalar loss, metrics). Means over every prompt of the batch; with `emb` and
    `lc.attribute` > 0, plus `lc.attribute` x `attribute_loss`."""
    valid = low_res_valid(batch["input_hw"], image_size, logits.shape[-1])[:, None]
    terms = mask_terms(logits, batch["targets"], valid, lc)
    iou_mse = (iou_pred.astype(jnp.float32) - jax.lax.stop_gradient(terms["iou"])) ** 2
    focal, dice, mse = terms["focal"].mean(), terms["dice"].mean(), iou_mse.mean()
    loss = lc.focal * focal + lc.dice * dice + lc.iou * mse
    extra = {}
    if emb is not None and lc.attribute > 0:
        attr, extra = attribute_loss(emb, batch["cell_colors"], batch["cell_kinds"])
        loss = loss + lc.attribute * attr
        extra["attribute"] = attr
    kp, kb = batch["points"].shape[1], batch["boxes"].shape[1]
    kc = terms["iou"].shape[1] - kp - kb
    metrics = {
        "loss": loss,
        "focal": focal,
        "dice": dice,
        "iou_mse": mse,
        "mask_iou": terms["iou"].mean(),
        "point_iou": terms["iou"][:, :kp].mean() if kp else jnp.float32(jnp.nan),
        "box_iou": terms["iou"][:, kp : kp + kb].mean() if kb else jnp.float32(jnp.nan),
        "class_iou": terms["iou"][:, kp + kb :].mean() if kc else jnp.float32(jnp.nan),
        **extra,
    }
    return loss, metrics


# ---- step -------------------------------------------------------------------------------------------------
def stage_loss(sam: Sam, batch: dict, *, lc: LossConfig):
    """The stage's `runner.Stage.loss`: SAM's loss of `batch` (`sam_loss`), with the embedding's attribute
    term when `lc.attribute` > 0."""
    logits, iou_pred, emb = forward(sam, batch)
    return sam_loss(logits, iou_pred, batch, lc, sam.cfg.image_size, emb)
