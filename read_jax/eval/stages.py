"""The two jitted stages every evaluation batch goes through, and the `Evaluator` that runs them on a mesh.

`encode` (SasP-independent): the model's teacher-forced forward without SAM (`logits="none"`,
  `compute_masks=False`), the first [SEG] slot's hidden state of every row (`ReadModel.seg_states`), its row's
  image-token states, and the SAM image embeddings.
`decode`: SasP points + SAM mask decoding through the model's one mask path (`ReadModel.masks_from_states`,
  low-res logits), then `score_bands`: each mask upsampled to its row's GT extent (the original image size
  unless capped) and scored `BAND` canvas rows at a time, so device memory stays bounded on large images;
  per-row integer intersection/union and the optional analyses (threshold histograms, points-only SAM
  prompting, maps for pictures, predicted masks for dumps) come out of the same band loop.
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
from read_jax.eval.analysis import THRESHOLDS, threshold_histograms
from read_jax.metrics import intersection_union
from read_jax.sam.transforms import postprocess_weights

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
OPTIONAL_ENCODE_KEYS = ("sam_resize",)  # the pipeline's (hand-made batches may hold resized pixels)
DECODE_KEYS = ("orig_hw", "sam_input_hw", "conv_image", "masks", "mask_valid", "mask_hw")
REQUIRED_KEYS = tuple(sorted(set(ENCODE_KEYS + DECODE_KEYS + ("image_valid",))))
# Canvas rows scored at a time: device memory for the masks is R x BAND x Wc, whatever the image size.
BAND = 128


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """What `decode` computes (hashable: a jit static argument; one compile per distinct value).

    canvas_hw: (Hc, Wc), the GT canvas of the batch.
    sasp: the SasP setting (None: the model's `cfg.sasp`).
    threshold_search: Appendix A.1 histograms of the full-resolution similarity map.
    points_prompt: Appendix B points-only prompting with this SasP setting (mode "topk"); None: skip.
    return_maps: also return the predicted masks and similarity maps (analysis pictures).
    return_pred: also return the predicted masks (per-sample mask dumps).
    """

    canvas_hw: tuple[int, int]
    sasp: SaspConfig | None = None
    threshold_search: bool = False
    points_prompt: SaspConfig | None = None
    return_maps: bool = False
    return_pred: bool = False


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
        image_emb=model.image_embeddings(batch["images_sam"], batch["sam_input_hw"], batch.get("sam_resize")),
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

    The masks are scored at each row's GT extent `mask_hw` (the original size unless the pipeline was told to
    cap it) band by band (`score_bands`): memory is bounded by `BAND` rows of the canvas, whatever the image
    size.

    Returns (all leading dim R):
      inter, union int32 (foreground I/U at `mask_hw`, GT 255 ignored), area int32 (predicted pixels),
      fg_inter, fg_union int32 (the same for an all-foreground prediction), seg_valid bool,
      points float32[R, Q, 2] (x, y original pixels), labels int32[R, Q], points_on_gt bool[R, Q];
      with threshold_search: hist_fg, hist_all int32[R, K + 1];
      with points_prompt: pp_inter, pp_union int32, pp_points, pp_labels;
      with return_maps: pred_mask bool[R, Hc, Wc], sim_map float16[R, Hc, Wc] (+ pp_mask);
      with return_pred: pred_mask.
    """
    cfg = model.config
    sasp_cfg = sasp_override or opts.sasp or cfg.sasp
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
    )
    masks = stage(sasp_cfg=sasp_cfg)  # low-res logits only: upsampled band by band below
    lows = {"": masks.low_res_logits}
    out = {"seg_valid": enc.seg_valid, "points": masks.points, "labels": masks.point_labels}
    out["points_on_gt"] = points_on_gt(batch["masks"], mask_hw, batch["orig_hw"][conv_image], masks.points)
    if opts.points_prompt is not None:
        # Points (+ SAM's padding point) only, as plain SAM prompting: no [SEG] token.
        pp = stage(sasp_cfg=opts.points_prompt, text_prompt=False, sam=points_sam)
        lows["pp_"] = pp.low_res_logits
        out["pp_points"], out["pp_labels"] = pp.points, pp.point_labels
    sim = None
    if opts.threshold_search or opts.return_maps:
        sim = sasp_lib.similarity_map_factors(
            masks.similarity,
            batch["orig_hw"][conv_image],
            mask_hw,
            _padded(opts.canvas_hw),
            similarity_dtype=sasp_cfg.similarity_dtype,
            minmax_eps=sasp_cfg.minmax_eps,
            clip_grid=cfg.clip.grid_size,
            clip_size=cfg.clip.image_size,
        )
    scores, maps = score_bands(
        batch["masks"],
        mask_hw,
        enc.seg_valid,
        lows,
        batch["sam_input_hw"][conv_image],
        cfg.sam.image_size,
        sim_factors=sim,
        threshold_search=opts.threshold_search,
        emit_pred=opts.return_maps or opts.return_pred,
        emit_sim=opts.return_maps,
    )
    out.update(scores)
    if "pred" in maps:
        out["pred_mask"] = maps["pred"]
    if opts.return_maps:
        out["sim_map"] = maps["sim"]  # float16: pictures only, halves the transfer
        if "pp_pred" in maps:
            out["pp_mask"] = maps["pp_pred"]
    return out


def points_on_gt(gt: Array, mask_hw: Array, orig_hw: Array, points: Array) -> Array:
    """Whether each point falls on its row's GT mask: bool[R, Q] (how often SasP points at the target).

    Args:
      gt: u8[R, Hc, Wc] GT canvases (1 target, 255 ignored: off); mask_hw: int32[R, 2] each row's GT extent,
        a possibly downscaled copy of the original image (0: no GT, every point off); orig_hw: int32[R, 2];
      points: float[R, Q, 2] (x, y) in original-image pixels (SasP's, DtoC-refined), each looked up at the
        original pixel nearest to it (SasP's discrete choice: DtoC moves a point by < 0.01 px inside the
        image), whose centre is then mapped into the GT extent.
    """
    orig = orig_hw.astype(jnp.float32)[:, None, :]  # [R, 1, 2] (y, x)
    pix = jnp.clip(jnp.round(points[..., ::-1].astype(jnp.float32)), 0, jnp.maximum(orig - 1, 0))
    yx = jnp.floor((pix + 0.5) * mask_hw[:, None, :].astype(jnp.float32) / jnp.maximum(orig, 1.0))
    yx = jnp.clip(yx.astype(jnp.int32), 0, jnp.maximum(mask_hw[:, None, :] - 1, 0))
    on = gt[jnp.arange(gt.shape[0])[:, None], yx[..., 0], yx[..., 1]] == 1
    return on & (mask_hw[:, None, 0] > 0)


def _padded(canvas_hw: tuple[int, int]) -> tuple[int, int]:
    """The canvas with its rows rounded up to whole `BAND`s (the extra rows are outside every extent)."""
    return -(-canvas_hw[0] // BAND) * BAND, canvas_hw[1]


def score_bands(
    gt: Array,
    mask_hw: Array,
    seg_valid: Array,
    lows: Mapping[str, Array],
    input_hw: Array,
    image_size: int,
    *,
    sim_factors: tuple[Array, Array, Array] | None = None,
    threshold_search: bool = False,
    emit_pred: bool = False,
    emit_sim: bool = False,
) -> tuple[dict, dict]:
    """Score low-res mask logits against GT canvases at full resolution, `BAND` canvas rows at a time.

    Each band's logits are `wh[:, band] @ (low @ ww^T)` (`sam.transforms.postprocess_weights`: the bilinear
    upsample -> crop -> resize of `Sam.postprocess_masks`), thresholded at 0 and compared with the band of
    the GT; the counts are summed over the bands of a `lax.scan`. Device memory holds one band of logits
    (R x BAND x Wc floats), never the whole canvas.

    Args:
      gt: u8[R, Hc, Wc] GT canvases (255 ignored); mask_hw: int32[R, 2] each row's extent (0: no GT);
      seg_valid: bool[R] the row predicts a mask (else its prediction is empty);
      lows: {prefix: float[R, l, l]} low-res logits to score ("" the model's masks, "pp_" points-only);
      input_hw: int32[R, 2] resized extent of each row's image in the SAM frame; image_size: S.
      sim_factors: `sasp.similarity_map_factors` of the rows over the band-padded canvas (threshold search
        histograms / the similarity map).
      emit_pred / emit_sim: also return the predicted masks / the similarity map over the whole canvas.
    Returns:
      ({prefix + "inter" / "union" / "area", "fg_inter", "fg_union"[, "hist_fg", "hist_all"]} int32[R, ...],
       {prefix + "pred": bool[R, Hc, Wc], "sim": float16[R, Hc, Wc]} as asked).
    """
    r, hc, wc = gt.shape
    hp = _padded((hc, wc))[0]
    nb = hp // BAND
    gt = jnp.pad(gt, ((0, 0), (0, hp - hc), (0, 0)))
    cols = jnp.arange(wc)[None, :] < mask_hw[:, 1, None]  # [R, Wc]
    hi = jax.lax.Precision.HIGHEST
    factors = {}
    for name, low in lows.items():
        wh, ww = postprocess_weights(input_hw, mask_hw, (hp, wc), low.shape[-1], image_size, r)
        factors[name] = (wh, jnp.einsum("ryx,rwx->ryw", low.astype(jnp.float32), ww, precision=hi))
    zeros = jnp.zeros((r,), jnp.int32)
    init = {"fg_inter": zeros, "fg_union": zeros}
    for name in lows:
        init.update({name + "inter": zeros, name + "union": zeros, name + "area": zeros})
    if threshold_search:
        k1 = len(THRESHOLDS) + 1
        init.update(hist_fg=jnp.zeros((r, k1), jnp.int32), hist_all=jnp.zeros((r, k1), jnp.int32))

    def band(acc, b):
        y0 = b * BAND
        rows = (y0 + jnp.arange(BAND))[None, :] < mask_hw[:, 0, None]  # [R, BAND]
        pv = rows[:, :, None] & cols[:, None, :]
        g = jax.lax.dynamic_slice_in_dim(gt, y0, BAND, axis=1)
        acc = dict(acc)
        fi, fu = intersection_union(pv, g, pv)
        acc["fg_inter"], acc["fg_union"] = acc["fg_inter"] + fi, acc["fg_union"] + fu
        emitted = {}
        for name, (wh, x) in factors.items():
            logits = jnp.einsum(
                "rhy,ryw->rhw", jax.lax.dynamic_slice_in_dim(wh, y0, BAND, 1), x, precision=hi
            )
            pred = (logits > 0) & pv & seg_valid[:, None, None]
            i, u = intersection_union(pred, g, pv)
            acc[name + "inter"] = acc[name + "inter"] + i
            acc[name + "union"] = acc[name + "union"] + u
            acc[name + "area"] = acc[name + "area"] + pred.sum(axis=(-1, -2), dtype=jnp.int32)
            if emit_pred:
                emitted[name + "pred"] = pred
        if sim_factors is not None:
            ry, v, rx = sim_factors
            m = jnp.einsum("rhi,rij->rhj", jax.lax.dynamic_slice_in_dim(ry, y0, BAND, 1), v, precision=hi)
            m = jnp.einsum("rhj,rwj->rhw", m, rx, precision=hi)  # 0 outside each extent
            if threshold_search:
                hf, ha = threshold_histograms(m, g, pv)
                acc["hist_fg"], acc["hist_all"] = acc["hist_fg"] + hf, acc["hist_all"] + ha
            if emit_sim:
                emitted["sim"] = m.astype(jnp.float16)
        return acc, emitted

    acc, emitted = jax.lax.scan(band, init, jnp.arange(nb))
    maps = {k: jnp.swapaxes(v, 0, 1).reshape(r, hp, wc)[:, :hc] for k, v in emitted.items()}
    return acc, maps


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
            keys = ENCODE_KEYS + tuple(k for k in OPTIONAL_ENCODE_KEYS if k in batch)
            return _encode_jit(self.graphdef, self.state, self._device(batch, keys))

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
