"""The two jitted stages every evaluation batch goes through, and the `Evaluator` that runs them on a mesh.

`encode` (SasP-independent): the model's teacher-forced forward without SAM (`logits="none"`,
  `compute_masks=False`), the first [SEG] slot's hidden state of every row (`ReadModel.seg_states`), its row's
  image-token states, and the SAM image embeddings.
`decode`: SasP points + SAM mask decoding through the model's one mask path (`ReadModel.masks_from_states`),
  each mask decoded straight to its row's GT extent, per-row integer intersection/union, and the optional
  analyses (threshold histograms, points-only SAM prompting, maps for pictures).
Only the first [SEG] slot is decoded (R prompts, not R * max_segs). The Table 8 sweep runs `encode` once per
batch and `decode` once per SasP setting, with traced thresholds (one compile per |P|).

Shape letters: B images, R rows (= queries; row r uses image `conv_image[r]`), P image tokens, C LLM width,
h w SAM embedding grid, D SAM prompt width, Q SasP points, Hc Wc the batch's GT canvas (each row valid in its
`mask_hw`), K + 1 threshold bins (`analysis.THRESHOLDS`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import NamedSharding

from read_jax import sasp as sasp_lib
from read_jax import sharding as shd
from read_jax.config import SaspConfig
from read_jax.eval.analysis import threshold_histograms
from read_jax.metrics import intersection_union
from read_jax.sam.transforms import pixel_valid

Array = jax.Array

# Batch entries each stage reads (everything else stays on the host).
ENCODE_KEYS = (
    "images_clip",
    "images_sam",
    "sam_input_hw",
    "input_ids",
    "attention_mask",
    "conv_image",
    "conv_valid",
)
DECODE_KEYS = ("orig_hw", "sam_input_hw", "conv_image", "masks", "mask_valid", "mask_hw")
REQUIRED_KEYS = tuple(sorted(set(ENCODE_KEYS + DECODE_KEYS + ("image_valid",))))


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """What `decode` computes (hashable: a jit static argument; one compile per distinct value).

    canvas_hw: (Hc, Wc), the GT canvas of the batch.
    sasp: the SasP setting (None: the model's `cfg.sasp`).
    threshold_search: Appendix A.1 histograms of the full-resolution similarity map.
    points_prompt: Appendix B points-only prompting with this SasP setting (mode "topk"); None: skip.
    return_maps: also return the predicted masks and similarity maps (analysis pictures).
    """

    canvas_hw: tuple[int, int]
    sasp: SaspConfig | None = None
    threshold_search: bool = False
    points_prompt: SaspConfig | None = None
    return_maps: bool = False


@struct.dataclass
class Encoded:
    """`encode`'s result: seg_hidden [R, C] (the state predicting the row's first [SEG]), seg_valid bool[R]
    (the
    row has a [SEG] and holds a conversation), image_hidden [R, P, C], image_emb [B, h, w, D]."""

    seg_hidden: Array
    seg_valid: Array
    image_hidden: Array
    image_emb: Array


def encode(model, batch: Mapping[str, Array]) -> Encoded:
    """Stage 1: the LLM forward (no text logits, no SAM), first-[SEG] states, SAM image embeddings."""
    out = model(batch, logits="none", compute_masks=False)
    seg = model.seg_states(out.hidden, batch["input_ids"], out.image_token_start)
    return Encoded(
        seg_hidden=seg.hidden[:, 0],
        seg_valid=seg.valid[:, 0] & batch["conv_valid"],
        image_hidden=seg.image_hidden,
        image_emb=model.image_embeddings(batch["images_sam"], batch["sam_input_hw"]),
    )


def decode(
    model,
    enc: Encoded,
    batch: Mapping[str, Array],
    opts: DecodeOptions,
    points_sam=None,
    sasp_override: SaspConfig | None = None,
) -> dict:
    """Stage 2: SasP + SAM for the first [SEG] of every row, and the per-row figures.

    Returns (all leading dim R):
      inter, union int32 (foreground I/U at `mask_hw`, GT 255 ignored), area int32 (predicted pixels),
      fg_inter, fg_union int32 (the same for an all-foreground prediction), seg_valid bool,
      points float32[R, Q, 2] (x, y original pixels), labels int32[R, Q];
      with threshold_search: hist_fg, hist_all int32[R, K + 1];
      with points_prompt: pp_inter, pp_union int32, pp_points, pp_labels;
      with return_maps: pred_mask bool[R, Hc, Wc], sim_map float16[R, Hc, Wc] (+ pp_mask).
    """
    cfg = model.config
    sasp_cfg = sasp_override or opts.sasp or cfg.sasp
    canvas = opts.canvas_hw
    conv_image = batch["conv_image"]
    mask_hw = jnp.where(batch["mask_valid"][:, None], batch["mask_hw"], 0)
    stage = functools.partial(
        model.masks_from_states,
        enc.seg_hidden,
        enc.image_hidden,
        conv_image,
        batch["orig_hw"],
        batch["sam_input_hw"],
        enc.image_emb,
        canvas_hw=canvas,
        out_hw=mask_hw,
    )
    masks = stage(sasp_cfg=sasp_cfg)
    pv = pixel_valid(mask_hw, canvas)  # [R, Hc, Wc]
    pred = (masks.mask_logits > 0) & enc.seg_valid[:, None, None] & pv
    gt = batch["masks"]
    inter, union = intersection_union(pred, gt, pv)
    # The all-foreground baseline (every pixel of the image predicted): what a model that ignores the query
    # gets.
    fg_inter, fg_union = intersection_union(pv, gt, pv)
    out = {
        "inter": inter,
        "union": union,
        "area": pred.sum(axis=(-1, -2), dtype=jnp.int32),
        "seg_valid": enc.seg_valid,
        "points": masks.points,
        "labels": masks.point_labels,
        "fg_inter": fg_inter,
        "fg_union": fg_union,
    }
    sim_map = None
    if opts.threshold_search or opts.return_maps:
        sim_map = sasp_lib.similarity_map_full(
            masks.similarity,
            batch["orig_hw"][conv_image],
            mask_hw,
            canvas,
            similarity_dtype=sasp_cfg.similarity_dtype,
            minmax_eps=sasp_cfg.minmax_eps,
            clip_grid=cfg.clip.grid_size,
            clip_size=cfg.clip.image_size,
        )
    if opts.threshold_search:
        out["hist_fg"], out["hist_all"] = threshold_histograms(sim_map, gt, pv)
    if opts.points_prompt is not None:
        # Points (+ SAM's padding point) only, as plain SAM prompting: no [SEG] token.
        pp = stage(sasp_cfg=opts.points_prompt, text_prompt=False, sam=points_sam)
        pp_pred = (pp.mask_logits > 0) & enc.seg_valid[:, None, None] & pv
        out["pp_inter"], out["pp_union"] = intersection_union(pp_pred, gt, pv)
        out["pp_points"], out["pp_labels"] = pp.points, pp.point_labels
        if opts.return_maps:
            out["pp_mask"] = pp_pred
    if opts.return_maps:
        out["pred_mask"] = pred
        out["sim_map"] = sim_map.astype(jnp.float16)  # pictures only: halves the transfer
    return out


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode_jit(graphdef, state, batch):
    return encode(nnx.merge(graphdef, state), batch)


@functools.partial(jax.jit, static_argnames=("graphdef", "opts", "sam_graphdef"))
def _decode_jit(graphdef, state, enc, batch, opts, sam_graphdef=None, sam_state=None):
    sam = None if sam_graphdef is None else nnx.merge(sam_graphdef, sam_state)
    return decode(nnx.merge(graphdef, state), enc, batch, opts, sam)


def _traced_thresholds(base: SaspConfig, t_pos: Array, t_neg: Array) -> SaspConfig:
    """A copy of `base` whose t_pos / t_neg are traced scalars.

    `SaspConfig.__post_init__` validates Python floats, so the copy bypasses `__init__` (the values were
    validated on the host by building the concrete configs first). `sasp.select_points` only uses the
    thresholds in jnp comparisons, so the Table 8 sweep compiles once per |P| instead of once per setting,
    with the same comparisons as a static threshold (tests check the 0.8/0.2 cell against the protocol).
    """
    cfg = copy.copy(base)
    object.__setattr__(cfg, "t_pos", t_pos)
    object.__setattr__(cfg, "t_neg", t_neg)
    return cfg


@functools.partial(jax.jit, static_argnames=("graphdef", "opts"))
def _sweep_decode_jit(graphdef, state, enc, batch, opts, t_pos, t_neg):
    return decode(
        nnx.merge(graphdef, state),
        enc,
        batch,
        opts,
        sasp_override=_traced_thresholds(opts.sasp, t_pos, t_neg),
    )


def compile_counts() -> dict:
    """Compiled variants of each stage so far (tests check "one compile per shape")."""
    return {
        "encode": _encode_jit._cache_size(),
        "decode": _decode_jit._cache_size(),
        "sweep_decode": _sweep_decode_jit._cache_size(),
    }


def local_rows(x, mesh) -> np.ndarray:
    """The rows of a row-major global array that belong to this process's host batch, as numpy (one host:
    all of them)."""
    if jax.process_count() == 1 or mesh is None:
        return np.asarray(x)
    from jax.experimental import multihost_utils  # pragma: no cover - multi-host only

    sh = shd.batch_sharding(mesh, x.ndim)
    x = jax.jit(lambda a: a, out_shardings=sh)(x)  # rows over the data axes, whatever XLA chose
    return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, sh.spec))


def check_batch(batch: Mapping[str, Any], canvas_hw: tuple[int, int] | None, mesh) -> tuple[int, int]:
    missing = [k for k in REQUIRED_KEYS if k not in batch]
    if missing:
        raise ValueError(f"eval batch lacks {missing} (expected a read_jax.data.pipeline eval batch)")
    masks = np.shape(batch["masks"])
    r = np.shape(batch["input_ids"])[0]
    b = np.shape(batch["images_clip"])[0]
    if len(masks) != 3 or masks[0] != r:
        raise ValueError(f"masks must be u8[R={r}, Hc, Wc] (one GT per row), got {masks}")
    canvas = tuple(int(x) for x in masks[1:])
    if canvas_hw is not None and tuple(canvas_hw) != canvas:
        raise ValueError(f"canvas_hw {tuple(canvas_hw)} != the batch's GT canvas {canvas}")
    for k, n in (
        ("conv_image", r),
        ("conv_valid", r),
        ("mask_valid", r),
        ("mask_hw", r),
        ("orig_hw", b),
        ("sam_input_hw", b),
        ("image_valid", b),
    ):
        if np.shape(batch[k])[0] != n:
            raise ValueError(f"batch[{k!r}] has {np.shape(batch[k])[0]} entries, expected {n}")
    if mesh is not None and ((r * jax.process_count()) % mesh.size or (b * jax.process_count()) % mesh.size):
        raise ValueError(
            f"a batch of {b} images / {r} rows does not split over the {mesh.size} devices of the "
            f"mesh: make the per-host batch size a multiple of the local device count"
        )
    return canvas


class Evaluator:
    """Runs batches of one model through `encode` / `decode` on an optional mesh.

    Args:
      model: a ReadModel (its state is split once; leaves not on `mesh` are replicated onto it).
      mesh: a `read_jax.sharding.make_mesh` mesh: the batch's leading axes split over all its devices.
      points_sam: an optional plain `Sam` for Appendix B's points-only prompting.
    """

    def __init__(self, model, mesh=None, points_sam=None):
        self.config = model.config
        self.mesh = mesh
        self.graphdef, self.state = nnx.split(model)
        self.sam_graphdef, self.sam_state = nnx.split(points_sam) if points_sam is not None else (None, None)
        if mesh is not None:
            self.state = self._place(self.state)
            if self.sam_state is not None:
                self.sam_state = self._place(self.sam_state)

    def _place(self, state):
        def put(x):
            sh = getattr(x, "sharding", None)
            if isinstance(sh, NamedSharding) and sh.mesh == self.mesh:
                return x  # already laid out on this mesh (e.g. FSDP from the training loop)
            return jax.device_put(x, shd.replicated(self.mesh))

        return jax.tree_util.tree_map(put, state)

    def _device(self, batch: Mapping[str, Any], keys: Sequence[str]) -> dict:
        sub = {k: np.asarray(batch[k]) for k in keys}
        if self.mesh is None:
            return {k: jnp.asarray(v) for k, v in sub.items()}
        return shd.shard_batch(sub, self.mesh)

    def _ctx(self):
        return shd.use_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def encode(self, batch: Mapping[str, Any]) -> Encoded:
        with self._ctx():
            return _encode_jit(self.graphdef, self.state, self._device(batch, ENCODE_KEYS))

    def decode(self, enc: Encoded, batch: Mapping[str, Any], opts: DecodeOptions) -> dict:
        if opts.sasp is not None and opts.sasp == self.config.sasp:
            opts = dataclasses.replace(opts, sasp=None)  # one compile for "the model's own setting"
        with self._ctx():
            out = _decode_jit(
                self.graphdef,
                self.state,
                enc,
                self._device(batch, DECODE_KEYS),
                opts,
                self.sam_graphdef,
                self.sam_state,
            )
        return {k: local_rows(v, self.mesh) for k, v in out.items()}

    def decode_thresholds(
        self, enc: Encoded, batch: Mapping[str, Any], opts: DecodeOptions, t_pos: float, t_neg: float
    ) -> dict:
        """`decode` with `opts.sasp`'s thresholds replaced by (t_pos, t_neg), traced (one compile per |P|)."""
        with self._ctx():
            out = _sweep_decode_jit(
                self.graphdef,
                self.state,
                enc,
                self._device(batch, DECODE_KEYS),
                opts,
                jnp.float32(t_pos),
                jnp.float32(t_neg),
            )
        return {k: local_rows(v, self.mesh) for k, v in out.items()}

    def run(self, batch: Mapping[str, Any], opts: DecodeOptions) -> dict:
        """One batch through both stages; per-row numpy results (see `decode`)."""
        return self.decode(self.encode(batch), batch, opts)
