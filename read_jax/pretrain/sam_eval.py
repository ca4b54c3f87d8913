"""What the SAM stage taught: mask IoU on held-out scenes from the prompts READ's stages will give SAM.

Held-out scenes are examples 0..N-1 of the stream `sam_data.EVAL_STREAM` (never trained on). Every instance of
a scene is prompted four ways, each scored by its IoU with the instance's polygon rasterised at the image's
original resolution (`preprocess.polygon_mask`, READ's ground truth), the low-res logits of mask token 0 being
upsampled to that resolution as READ does (`transforms.postprocess_masks_padded`, threshold 0):

  point     one positive point uniformly inside the mask (SAM's first prompt)
  centroid  one positive point at the mask's centroid
  box       the mask's tight box
  sasp      `sasp_pos` positives inside + `sasp_neg` negatives outside the mask (anywhere in the image), in
            the `num_points` slots of SasP's prompt: the kind of prompt READ's SasP gives
  class     the attribute prompt naming the instance's colour and kind (`sam_data.attribute_prompt`, one token
            as SESAME's [SEG] prompt), scored against every instance of that colour and kind: what a [SEG]
            token that knows the object could get from this SAM (scored whether or not the stage trained
            on such prompts)

mIoU is the mean over instances. Beside them, the embedding's attribute readout (`sam_step.attribute_logits`:
each cell against the attribute codes) is scored on every cell one shape owns (`sam_data.cell_attributes`):
`cell_color_acc` / `cell_kind_acc`, what SESAME's one-token prompt can match in this SAM (the plain stage is
not trained for the readout). Prompts come from `default_rng([seed, EVAL_STREAM, index, 2])`.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from read_jax.config import ConfigError
from read_jax.data.preprocess import polygon_mask
from read_jax.pretrain import sam_data
from read_jax.pretrain.sam_step import attribute_logits, decode, embed_images, encode_prompts
from read_jax.sam.transforms import postprocess_masks_padded

KINDS = ("point", "centroid", "box", "sasp", "class")
MAX_INSTANCES = 8  # instances per scene scored (scenes hold 3-6)


def eval_example(index: int, *, seed: int, sam_cfg, pc: sam_data.PromptConfig, ec) -> tuple[dict, list[str]]:
    """Held-out scene `index`: (its instances' GT (original resolution, on a `canvas` square) and the four
    prompts of every instance (slots beyond the scene's instances are padding, `valid` False), the instances'
    shape kinds)."""
    sc = sam_data.scene(seed, sam_data.EVAL_STREAM, index, sam_cfg, pc.supersample)
    n, c = len(sc["polys"]), int(ec.canvas)
    (h0, w0), extent = (int(v) for v in sc["orig_hw"]), tuple(int(v) for v in sc["input_hw"])
    if n > MAX_INSTANCES or max(h0, w0) > c:
        raise ConfigError(
            f"held-out scene {index}: {n} instances / size {(h0, w0)} exceed {MAX_INSTANCES} / "
            f"eval.canvas={c}"
        )
    rng = np.random.default_rng([seed, sam_data.EVAL_STREAM, index, 2])
    inside = sam_data.extent_mask(extent, sam_cfg.image_size)
    slots, m = pc.num_points, MAX_INSTANCES
    out = {
        "images": sc["pixels"],
        "input_hw": sc["input_hw"],
        "orig_hw": sc["orig_hw"],
        "gt": np.zeros((m, c, c), np.uint8),
        "gt_class": np.zeros((m, c, c), np.uint8),
        "valid": np.arange(m) < n,
        "boxes": np.zeros((m, 4), np.float32),
        "class_tokens": np.zeros((m, 1, sam_cfg.prompt_embed_dim), np.float32),
    }
    out["cell_colors"], out["cell_kinds"] = sam_data.cell_attributes(
        sc["frame"], sc["colors"], sc["kinds"], sam_cfg.image_embedding_size
    )
    codes = sam_data.attribute_codes(sam_cfg.prompt_embed_dim)
    for k in ("point", "centroid", "sasp"):
        out[k + "_points"] = np.zeros((m, slots, 2), np.float32)
        out[k + "_labels"] = np.full((m, slots), -1, np.int32)
    for i, (poly, mask) in enumerate(zip(sc["polys"], sc["frame"])):
        out["gt"][i, :h0, :w0] = polygon_mask(poly, h0, w0)
        out["point_points"][i], out["point_labels"][i] = sam_data.point_prompt(rng, mask, inside, 1, 0, slots)
        out["centroid_points"][i], out["centroid_labels"][i] = sam_data.centroid_prompt(mask, slots)
        out["sasp_points"][i], out["sasp_labels"][i] = sam_data.point_prompt(
            rng, mask, inside, int(ec.sasp_pos), int(ec.sasp_neg), slots
        )
        out["boxes"][i] = sam_data.tight_box(mask)
    for i in range(n):
        out["class_tokens"][i], member = sam_data.attribute_prompt(
            sc["colors"], sc["kinds"], i, ("color", "kind"), codes
        )
        out["gt_class"][i] = out["gt"][:n][member].max(axis=0)
    return out, sc["kinds"]


@functools.partial(jax.jit, static_argnums=(0,))
def _scores(graphdef, params, rest, batch: dict) -> dict:
    """(intersection, union) int32[B, I] of every prompt kind; (right, owned) int32[B] cells per attribute."""
    from flax import nnx

    sam = nnx.merge(graphdef, params, rest)
    emb = embed_images(sam, batch["images"], batch["input_hw"])
    b, m = batch["valid"].shape
    canvas = batch["gt"].shape[-2:]
    point_kinds = [k for k in KINDS if k not in ("box", "class")]
    points = jnp.concatenate([batch[k + "_points"] for k in point_kinds], axis=1)
    labels = jnp.concatenate([batch[k + "_labels"] for k in point_kinds], axis=1)
    low, _ = decode(sam, emb, encode_prompts(sam, points, labels, batch["boxes"]))  # [B, 4 I, l, l]
    low_class, _ = decode(sam, emb, batch["class_tokens"])  # [B, I, l, l]
    low = jnp.concatenate([low, low_class], axis=1)
    low = low.reshape(b * len(KINDS) * m, 1, *low.shape[-2:])
    rows = lambda x: jnp.repeat(x, len(KINDS) * m, axis=0)
    up = postprocess_masks_padded(
        low, rows(batch["input_hw"]), rows(batch["orig_hw"]), canvas, sam.cfg.image_size
    )
    pred = up[:, 0].reshape(b, len(KINDS), m, *canvas) > 0.0
    gt = (batch["gt"] > 0)[:, None]
    gt = jnp.concatenate([jnp.repeat(gt, len(KINDS) - 1, axis=1), (batch["gt_class"] > 0)[:, None]], axis=1)
    inter, union = (pred & gt).sum((-2, -1)), (pred | gt).sum((-2, -1))
    # the point kinds come first (in KINDS order), then the boxes, then the attribute prompts
    order = point_kinds + ["box", "class"]
    out = {k: (inter[:, i], union[:, i]) for i, k in enumerate(order)}
    for name, lo in zip(("color", "kind"), attribute_logits(emb)):
        lab = batch[f"cell_{name}s"]
        out[f"cell_{name}"] = (((lo.argmax(-1) == lab) & (lab >= 0)).sum((1, 2)), (lab >= 0).sum((1, 2)))
    return out


def evaluate(setup, params, rest, config, *, progress: bool = False) -> dict:
    """mIoU per prompt kind over `eval.num_scenes` held-out scenes (and per shape kind, point prompt)."""
    from read_jax.pretrain.sam_config import prompt_config

    ec, pc, seed = config.eval, prompt_config(config.data), int(config.data.seed)
    n, bs = int(ec.num_scenes), int(ec.batch_size)
    t0 = time.perf_counter()
    ious = {k: [] for k in KINDS}
    cells = {"color": np.zeros(2, np.int64), "kind": np.zeros(2, np.int64)}  # right, owned
    shape_kinds: list[str] = []
    it = range(0, n, bs)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="held-out", unit="batch")
    for first in it:
        idx = list(range(first, min(first + bs, n)))
        exs = []
        for i in idx:
            ex, kinds = eval_example(i, seed=seed, sam_cfg=setup.cfg, pc=pc, ec=ec)
            exs.append(ex)
            shape_kinds.extend(kinds)
        exs += [exs[-1]] * (bs - len(exs))  # a static batch; the copies are dropped below
        batch = {k: np.stack([e[k] for e in exs]) for k in exs[0]}
        scores = jax.device_get(_scores(setup.graphdef, params, rest, batch))
        valid = batch["valid"][: len(idx)]
        for k in KINDS:
            inter, union = (np.asarray(a)[: len(idx)] for a in scores[k])
            ious[k].extend((inter / np.maximum(union, 1))[valid].tolist())
        for name, acc in cells.items():
            acc += [int(np.asarray(a)[: len(idx)].sum()) for a in scores[f"cell_{name}"]]
    point = np.asarray(ious["point"])
    per_shape = {s: float(point[np.asarray(shape_kinds) == s].mean()) for s in sorted(set(shape_kinds))}
    return {
        "num_scenes": n,
        "num_instances": len(point),
        **{f"mIoU_{k}": float(np.mean(v)) for k, v in ious.items()},
        "mIoU_point_by_shape": per_shape,
        **{f"cell_{k}_acc": float(v[0] / max(v[1], 1)) for k, v in cells.items()},
        "num_owned_cells": int(cells["color"][1]),
        "wall_s": time.perf_counter() - t0,
    }
