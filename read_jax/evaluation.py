"""READ's evaluation protocols and the appendix analyses, data-parallel with exact metric reduction.

PyTorch reference: rui-qian/READ@2549240 `train_read.py:455-506` (`validate`: teacher-forced ReasonSeg and
RefCOCO), `utils.py:80-92` (`intersectionAndUnionGPU`), `test_read.py` + `model/READ.py:900-1012` (FP-RefCOCO
"See"/"Segment" through free generation); read_reference.md §4, §8, §11, §13 items 10-12; the supplementary
material's appendices A.1 (threshold grid search), B (similarity maps and "points as prompt") and C (Table 8).

Shape letters:
  B images of a batch, R conversation rows (= queries; row r uses image `conv_image[r]`), L text length,
  P image tokens (576 at full size), C LLM width, D SAM prompt width, h w SAM embedding grid, l low-res mask side,
  Q SasP points, Hc Wc the static GT/prediction canvas (`batch["masks"]`; each row's valid region is its
  `mask_hw`), K = 101 thresholds of the Appendix A.1 grid (0.00, 0.01, ..., 1.00).

One batch goes through two jitted stages, each compiled once per (shapes, options):
  `encode`: the model's teacher-forced forward without SAM (`ReadModel.__call__(compute_masks=False)`),
    the first [SEG] slot's hidden state of every row (`ReadModel.seg_states`), its row's image-token hidden
    states, and the SAM image embeddings: everything that does not depend on the SasP setting;
  `decode`: SasP points + SAM mask decoding (`ReadModel.masks_from_states`), the mask at each row's GT
    resolution, per-row integer intersection/union, and the optional analyses (threshold histograms,
    points-only SAM prompting, maps for pictures).
Only the first [SEG] slot is decoded (R prompts, not R * max_segs). The Table 8 sweep runs `encode` once per
batch and `decode` once per SasP setting, with traced thresholds (one compile per |P|).
`tests/test_evaluate.py` checks the per-query I/U against `ReadModel.__call__`'s first-slot masks.

Metrics (read_reference.md §8.1): prediction = the first [SEG]'s mask logits > 0 (all zero for a row that has
no [SEG]); per query I and U count foreground pixels inside the row's image, GT 255 ignored; gIoU = mean over
queries of I/(U+1e-5) (+1 when U == 0), cIoU = sum I / sum U. I and U leave the device as int32 per row, and
padding rows (`image_valid`/`conv_valid`/`mask_valid` False) are dropped on the host before anything is
summed, so the figures do not depend on the batch size, the padding or the number of devices.

Deliberate choices (documented where they differ from the reference):
  * Every row is scored at its GT canvas resolution `mask_hw`, which equals the original size unless the
    data pipeline downscaled a GT larger than `DataConfig.max_mask_side` (then the mask is decoded straight
    to that size: set `max_mask_side` >= the largest image for the exact protocol).
  * Appendix A.1 thresholds the reference's full-resolution similarity map (`origin_sm`: min-max
    normalised 24x24 map, bilinear to 336, zero-padded to the short-side-336 frame, bilinear to (H, W)),
    whose values lie in [0, 1]: pixel predicted iff S >= t, t on the 0.01 grid; the best threshold of each
    query maximises that query's IoU; ties go to the smallest threshold.
  * Appendix B's "points as prompt" uses SasP's "topk" mode (the Q/2 highest cells positive, the Q/2 lowest
    negative) as prompts WITHOUT the [SEG] embedding, through a SAM prompt encoder + mask decoder
    (`multimask_output=False`). The default SAM is READ's own (its prompt encoder is SAM's, frozen; its
    mask decoder is fine-tuned); pass `points_sam=` a plain `Sam` for the paper's "original SAM".
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from read_jax import sasp as sasp_lib
from read_jax.config import SaspConfig
from read_jax.metrics import IoUMeter, intersection_union, query_iou, see_accuracy
from read_jax.read_model import pixel_valid
from read_jax.sam.transforms import apply_coords, postprocess_masks_padded

Array = jax.Array

# Appendix A.1: thresholds 0.00, 0.01, ..., 1.00 (float32, as compared on the device).
THRESHOLDS = np.round(np.arange(101) * 0.01, 2).astype(np.float32)
# Appendix C / Table 8: (t_pos, t_neg) rows x |P| columns.
TABLE8_THRESHOLDS = ((0.8, 0.2), (0.7, 0.3), (0.6, 0.4))
TABLE8_NUM_POINTS = (10, 30, 60)

# Batch entries each stage reads (everything else stays on the host).
_ENCODE_KEYS = ("images_clip", "images_sam", "input_ids", "attention_mask", "conv_image", "conv_valid")
_DECODE_KEYS = ("orig_hw", "sam_input_hw", "conv_image", "masks", "mask_valid", "mask_hw")
_REQUIRED = tuple(sorted(set(_ENCODE_KEYS + _DECODE_KEYS + ("image_valid",))))


# ----------------------------------------------------------------------------------------------------
# Static options of the decode stage
# ----------------------------------------------------------------------------------------------------


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


def points_prompt_config(base: SaspConfig, num_points: int | None = None) -> SaspConfig:
    """Appendix B's points-only setting: SasP "topk" (half highest positive, half lowest negative)."""
    n = base.num_points if num_points is None else num_points
    n += n % 2
    return dataclasses.replace(base, mode="topk", num_points=n)


# ----------------------------------------------------------------------------------------------------
# Appendix A.1: the full-resolution similarity map and the threshold grid search
# ----------------------------------------------------------------------------------------------------


def similarity_map_full(
    sim: Array,
    orig_hw: Array,
    out_hw: Array,
    canvas_hw: tuple[int, int],
    *,
    similarity_dtype: str = "bfloat16",
    minmax_eps: float = 1e-12,
    clip_grid: int = sasp_lib.CLIP_GRID,
    clip_size: int = sasp_lib.CLIP_SIZE,
) -> Array:
    """The reference's `origin_sm` (read_reference.md §3.2) on a static canvas: the Fig. 4 (a) heat map.

    v = min-max(sim) (in bf16 like the reference when `similarity_dtype` is "bfloat16"), reshaped to g x g,
    bilinear to clip_size^2, zero-padded to the short-side-clip_size frame of the original (H, W) (the
    integer centre-crop geometry of `sasp.crop_padding`), bilinear to `out_hw`. Computed as
    M = Ry V Rx^T with per-axis weights (the same composition DtoC evaluates on its windows).

    Args:
      sim: float[N, P] raw similarity maps (P = g*g).
      orig_hw: int[N, 2] original (H, W): the crop geometry.
      out_hw: int[N, 2] output size (usually == orig_hw; the GT canvas extent otherwise).
      canvas_hw: static (Hc, Wc) >= every out_hw.
    Returns:
      float32[N, Hc, Wc] in [0, 1] inside each out_hw, 0 outside.
    """
    if sim.ndim != 2 or sim.shape[-1] != clip_grid * clip_grid:
        raise ValueError(f"sim must be float[N, {clip_grid**2}], got {sim.shape}")
    if orig_hw.shape != (sim.shape[0], 2) or out_hw.shape != (sim.shape[0], 2):
        raise ValueError(
            f"orig_hw and out_hw must be int[{sim.shape[0]}, 2], got {orig_hw.shape}, {out_hw.shape}"
        )
    n, g = sim.shape[0], clip_grid
    bf16 = similarity_dtype == "bfloat16"
    s = sim.astype(jnp.float32)
    # `sasp._minmax`/`_round_to_bf16` are the exact bf16 op sequence DtoC uses (tested against torch there).
    v = sasp_lib._minmax(sasp_lib._round_to_bf16(s) if bf16 else s, minmax_eps, bf16=bf16).reshape(n, g, g)
    orig_hw = orig_hw.astype(jnp.int32)
    out_hw = out_hw.astype(jnp.int32)
    ph, pw = sasp_lib.crop_padding(orig_hw, clip_size)
    up = sasp_lib._resize_matrix(g, clip_size)  # [clip_size, g]
    hc, wc = canvas_hw
    ys = jnp.broadcast_to(jnp.arange(hc, dtype=jnp.int32), (n, 1, hc))
    xs = jnp.broadcast_to(jnp.arange(wc, dtype=jnp.int32), (n, 1, wc))
    ry = sasp_lib._axis_weights(ys, out_hw[:, 0, None, None], ph[:, None, None], clip_size, up)[
        :, 0
    ]  # [N, Hc, g]
    rx = sasp_lib._axis_weights(xs, out_hw[:, 1, None, None], pw[:, None, None], clip_size, up)[
        :, 0
    ]  # [N, Wc, g]
    hi = jax.lax.Precision.HIGHEST
    m = jnp.einsum("nyi,nij->nyj", ry, v, precision=hi)
    m = jnp.einsum("nyj,nxj->nyx", m, rx, precision=hi)  # [N, Hc, Wc]
    inside = (ys[:, 0, :, None] < out_hw[:, 0, None, None]) & (xs[:, 0, None, :] < out_hw[:, 1, None, None])
    return jnp.where(inside, m, 0.0)


def threshold_histograms(sim_map: Array, gt: Array, valid: Array) -> tuple[Array, Array]:
    """Per-row histograms that give I and U of `sim_map >= t` for every t of `THRESHOLDS` at once.

    bin(pixel) = #{k : t_k <= S} in [0, K]; the pixel is predicted at threshold k iff k < bin.

    Args:
      sim_map: float[N, Hc, Wc]; gt: int[N, Hc, Wc] in {0, 1, 255}; valid: bool[N, Hc, Wc] image region.
    Returns:
      (hist_fg, hist_all) int32[N, K + 1]: GT-foreground pixels / all non-ignored pixels per bin.
    """
    n = sim_map.shape[0]
    k1 = len(THRESHOLDS) + 1
    bins = jnp.searchsorted(jnp.asarray(THRESHOLDS), sim_map, side="right").astype(jnp.int32)
    keep = valid & (gt != 255)
    fg = keep & (gt == 1)
    seg = (jnp.arange(n, dtype=jnp.int32)[:, None, None] * k1 + bins).reshape(-1)
    hist_fg = jax.ops.segment_sum(fg.reshape(-1).astype(jnp.int32), seg, num_segments=n * k1)
    hist_all = jax.ops.segment_sum(keep.reshape(-1).astype(jnp.int32), seg, num_segments=n * k1)
    return hist_fg.reshape(n, k1), hist_all.reshape(n, k1)


def best_thresholds(hist_fg: np.ndarray, hist_all: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Appendix A.1 per query: the threshold of the 0.01 grid that maximises that query's IoU.

    Args:
      hist_fg, hist_all: int[N, K + 1] from `threshold_histograms`.
    Returns:
      (threshold float32[N], inter int64[N], union int64[N]) at the chosen threshold (ties: smallest t).
    """
    hist_fg = np.asarray(hist_fg, np.int64)
    hist_all = np.asarray(hist_all, np.int64)
    k = len(THRESHOLDS)
    if hist_fg.shape != hist_all.shape or hist_fg.shape[-1] != k + 1:
        raise ValueError(f"need two int[N, {k + 1}] histograms, got {hist_fg.shape}, {hist_all.shape}")
    # Pixels with bin > k are predicted at threshold k: suffix sums from bin k + 1 on.
    suffix_fg = np.cumsum(hist_fg[:, ::-1], axis=1)[:, ::-1]  # [N, K+1]: sum over bins >= b
    suffix_all = np.cumsum(hist_all[:, ::-1], axis=1)[:, ::-1]
    inter = suffix_fg[:, 1:]  # [N, K]
    pred = suffix_all[:, 1:]
    gt = hist_fg.sum(axis=1, keepdims=True)
    union = pred + gt - inter
    best = np.argmax(query_iou(inter, union), axis=1)  # first maximum: the smallest threshold
    rows = np.arange(len(best))
    return THRESHOLDS[best], inter[rows, best], union[rows, best]


# ----------------------------------------------------------------------------------------------------
# The two jitted stages
# ----------------------------------------------------------------------------------------------------


def encode(model, batch: Mapping[str, Array]) -> dict:
    """Stage 1 (SasP-independent): LLaVA forward, first-[SEG] states, SAM image embeddings.

    Returns:
      seg_hidden [R, C] (hidden state predicting the row's first [SEG]), seg_valid bool[R] (the row has a
      [SEG] and holds a conversation), image_hidden [R, P, C], image_emb [B, h, w, D].
    """
    # The model's own teacher-forced forward without SAM; its text logits are dead code under jit.
    _, aux = model(batch, deterministic=True, compute_masks=False)
    seg_hidden, seg_valid, _, image_hidden = model.seg_states(
        aux["llava/hidden"], batch["input_ids"], aux["llava/image_token_start"]
    )
    return {
        "seg_hidden": seg_hidden[:, 0],
        "seg_valid": seg_valid[:, 0] & batch["conv_valid"],
        "image_hidden": image_hidden,
        "image_emb": model.image_embeddings(batch["images_sam"]),
    }


def decode(
    model,
    enc: Mapping[str, Array],
    batch: Mapping[str, Array],
    opts: DecodeOptions,
    points_sam=None,
    sasp_override: SaspConfig | None = None,
) -> dict:
    """Stage 2: SasP + SAM for the first [SEG] of every row, and the per-row figures.

    Returns (all leading dim R):
      inter, union int32 (foreground I/U at `mask_hw`, GT 255 ignored), area int32 (predicted pixels),
      fg_inter, fg_union int32 (the same for an all-foreground prediction), seg_valid bool, points float32[R, Q, 2] (x, y original pixels), labels int32[R, Q];
      with threshold_search: hist_fg, hist_all int32[R, K + 1];
      with points_prompt: pp_inter, pp_union int32, pp_points, pp_labels;
      with return_maps: pred_mask bool[R, Hc, Wc], sim_map float16[R, Hc, Wc] (+ pp_mask).
    """
    cfg = model.config
    sasp_cfg = sasp_override or opts.sasp or cfg.sasp
    canvas = opts.canvas_hw
    conv_image = batch["conv_image"]
    orig_hw = batch["orig_hw"][conv_image]  # [R, 2]
    row_sam_hw = batch["sam_input_hw"][conv_image]
    mask_hw = jnp.where(batch["mask_valid"][:, None], batch["mask_hw"], 0)
    seg_valid = enc["seg_valid"]
    _, aux = model.masks_from_states(
        enc["seg_hidden"],
        enc["image_hidden"],
        conv_image,
        batch["orig_hw"],
        batch["sam_input_hw"],
        enc["image_emb"],
        canvas,
        sasp_cfg,
    )
    # The model decodes to the original size; we decode the same low-res logits to the GT's extent (equal
    # unless the pipeline downscaled the GT). The model's own full-size masks are dead code under jit.
    low = aux["sam/low_res_masks"]  # [R, l, l]
    logits = postprocess_masks_padded(low[:, None], row_sam_hw, mask_hw, canvas, cfg.sam.image_size)[:, 0]
    pv = pixel_valid(mask_hw, canvas)  # [R, Hc, Wc]
    pred = (logits > 0) & seg_valid[:, None, None] & pv
    gt = batch["masks"]
    inter, union = intersection_union(pred, gt, pv)
    # The all-foreground baseline (every pixel of the image predicted): what a model that ignores the query gets.
    fg_inter, fg_union = intersection_union(pv, gt, pv)
    out = {
        "inter": inter,
        "union": union,
        "area": pred.sum(axis=(-1, -2), dtype=jnp.int32),
        "seg_valid": seg_valid,
        "points": aux["sasp/points"],
        "labels": aux["sasp/labels"],
        "fg_inter": fg_inter,
        "fg_union": fg_union,
    }
    sim_map = None
    if opts.threshold_search or opts.return_maps:
        sim_map = similarity_map_full(
            aux["sasp/sim"],
            orig_hw,
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
        sam = points_sam if points_sam is not None else model.visual_model
        pts, labs, _ = sasp_lib.sasp(
            enc["image_hidden"],
            enc["seg_hidden"],
            orig_hw,
            opts.points_prompt,
            clip_grid=cfg.clip.grid_size,
            clip_size=cfg.clip.image_size,
        )
        coords = apply_coords(pts.astype(jnp.float32), orig_hw, cfg.sam.image_size)
        # No text embedding: points (+ SAM's padding point) only, as plain SAM prompting.
        pe = sam.prompt_encoder
        sparse, dense = pe(coords, labs, text_embeds=None)
        pp_low, _ = sam.mask_decoder(
            enc["image_emb"][conv_image], pe.get_dense_pe(), sparse, dense, multimask_output=False
        )  # [R, 1, l, l]
        pp_logits = postprocess_masks_padded(pp_low, row_sam_hw, mask_hw, canvas, cfg.sam.image_size)[:, 0]
        pp_pred = (pp_logits > 0) & seg_valid[:, None, None] & pv
        out["pp_inter"], out["pp_union"] = intersection_union(pp_pred, gt, pv)
        out["pp_points"], out["pp_labels"] = pts, labs
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


# ----------------------------------------------------------------------------------------------------
# Host side: batches in, per-row numpy out
# ----------------------------------------------------------------------------------------------------


def _check_batch(batch: Mapping[str, Any], canvas_hw: tuple[int, int] | None, mesh) -> tuple[int, int]:
    missing = [k for k in _REQUIRED if k not in batch]
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


def _row_valid(batch: Mapping[str, Any]) -> np.ndarray:
    """Rows that count: a real conversation with a GT, on a real image (padding never counts)."""
    conv_image = np.asarray(batch["conv_image"])
    return (
        np.asarray(batch["conv_valid"], bool)
        & np.asarray(batch["mask_valid"], bool)
        & np.asarray(batch["image_valid"], bool)[conv_image]
    )


def _local_rows(x, mesh) -> np.ndarray:
    """The rows of a row-major global array that belong to this process's host batch, as numpy (one host:
    all of them)."""
    if jax.process_count() == 1 or mesh is None:
        return np.asarray(x)
    from jax.experimental import multihost_utils  # pragma: no cover - multi-host only

    from read_jax.sharding import batch_sharding

    sh = batch_sharding(mesh, x.ndim)
    x = jax.jit(lambda a: a, out_shardings=sh)(x)  # rows over the data axes, whatever XLA chose
    return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, sh.spec))


def gather_records(records: list[dict]) -> list[dict]:
    """Every process's records, in process order, on every process (one host: unchanged). Summaries are
    then computed from the whole split on every host, exactly."""
    if jax.process_count() == 1:
        return records
    from jax.experimental import multihost_utils  # pragma: no cover - multi-host only

    blob = np.frombuffer(json.dumps(records, default=_json_default).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([blob.size], np.int32))).reshape(-1)
    buf = np.zeros((int(sizes.max()),), np.uint8)
    buf[: blob.size] = blob
    every = np.asarray(multihost_utils.process_allgather(buf))  # [processes, max bytes]
    out = []
    for k, n in enumerate(sizes):
        out.extend(json.loads(bytes(every[k, : int(n)]).decode()))
    return out


class Evaluator:
    """Runs batches of one model through `_encode` / `_decode` on an optional mesh.

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
        from jax.sharding import NamedSharding

        from read_jax.sharding import replicated

        def put(x):
            sh = getattr(x, "sharding", None)
            if isinstance(sh, NamedSharding) and sh.mesh == self.mesh:
                return x  # already laid out on this mesh (e.g. FSDP from the training loop)
            return jax.device_put(x, replicated(self.mesh))

        return jax.tree_util.tree_map(put, state)

    def _device(self, batch: Mapping[str, Any], keys: Sequence[str]) -> dict:
        sub = {k: np.asarray(batch[k]) for k in keys}
        if self.mesh is None:
            return {k: jnp.asarray(v) for k, v in sub.items()}
        from read_jax.sharding import shard_batch

        return shard_batch(sub, self.mesh)

    def _ctx(self):
        import contextlib

        from read_jax.sharding import use_mesh

        return use_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def encode(self, batch: Mapping[str, Any]) -> dict:
        with self._ctx():
            return _encode_jit(self.graphdef, self.state, self._device(batch, _ENCODE_KEYS))

    def decode(self, enc: dict, batch: Mapping[str, Any], opts: DecodeOptions) -> dict:
        if opts.sasp is not None and opts.sasp == self.config.sasp:
            opts = dataclasses.replace(opts, sasp=None)  # one compile for "the model's own setting"
        with self._ctx():
            out = _decode_jit(
                self.graphdef,
                self.state,
                enc,
                self._device(batch, _DECODE_KEYS),
                opts,
                self.sam_graphdef,
                self.sam_state,
            )
        return {k: _local_rows(v, self.mesh) for k, v in out.items()}

    def decode_thresholds(
        self, enc: dict, batch: Mapping[str, Any], opts: DecodeOptions, t_pos: float, t_neg: float
    ) -> dict:
        """`decode` with `opts.sasp`'s thresholds replaced by (t_pos, t_neg), traced (one compile per |P|)."""
        with self._ctx():
            out = _sweep_decode_jit(
                self.graphdef,
                self.state,
                enc,
                self._device(batch, _DECODE_KEYS),
                opts,
                jnp.float32(t_pos),
                jnp.float32(t_neg),
            )
        return {k: _local_rows(v, self.mesh) for k, v in out.items()}

    def run(self, batch: Mapping[str, Any], opts: DecodeOptions) -> dict:
        """One batch through both stages; per-row numpy results (see `decode`)."""
        return self.decode(self.encode(batch), batch, opts)


# ----------------------------------------------------------------------------------------------------
# Records and summaries
# ----------------------------------------------------------------------------------------------------


def query_text(tokenizer, ids: Sequence[int]) -> str:
    """The user's question of a prompt row (text after the image, before the last " ASSISTANT:")."""
    ids = [int(i) for i in ids if i >= 0]
    im_end = (
        tokenizer.convert_tokens_to_ids("<im_end>") if hasattr(tokenizer, "convert_tokens_to_ids") else None
    )
    if im_end in ids:
        ids = ids[ids.index(im_end) + 1 :]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    text = text.split("USER:")[-1]
    return text.split("ASSISTANT:")[0].strip()


def _points_json(points: np.ndarray, labels: np.ndarray) -> list:
    """[[x, y, label], ...] without SAM's "not a point" entries (label -1 carries no position)."""
    return [
        [round(float(x), 2), round(float(y), 2), int(lab)] for (x, y), lab in zip(points, labels) if lab != -1
    ]


def reason_seg_meta(reader) -> Callable[[int, int], dict]:
    """meta_fn for a `ReasonSegReader`: is_sentence (short/long subsets of ReasonSeg test) and text[0]."""

    def fn(example_index: int, query_index: int) -> dict:
        items = getattr(reader, "items", None)
        if items is None or not 0 <= example_index < len(items):
            return {}
        ann = items[example_index]
        return {"is_sentence": bool(ann.is_sentence), "text": ann.texts[0]}

    return fn


def _records(
    batch: Mapping[str, Any],
    res: dict,
    valid: np.ndarray,
    tokenizer=None,
    meta_fn: Callable[[int, int], dict] | None = None,
    seen: collections.Counter | None = None,
) -> list[dict]:
    """Per-query records of the counted rows of one batch.

    A query's index within its example is `batch["query_index"]` when the pipeline provides it; otherwise it
    is counted in `seen` (per sample id, across the batches of a run): exact on one host, where an image's
    queries (possibly split over several batch slots) arrive in order. Ids: the sample id for query 0,
    "<sample id>#<j>" for query j > 0.
    """
    conv_image = np.asarray(batch["conv_image"])
    sample_ids = np.asarray(batch.get("sample_id", np.full(len(batch["orig_hw"]), "", object))).astype(str)
    ex_index = np.asarray(batch.get("example_index", np.full(len(batch["orig_hw"]), -1)))
    seen = collections.Counter() if seen is None else seen
    recs = []
    for r in np.flatnonzero(valid):
        b = int(conv_image[r])
        sid = str(sample_ids[b])
        if "query_index" in batch:
            j = int(np.asarray(batch["query_index"])[r])
        else:
            j = seen[sid]
            seen[sid] += 1
        inter, union = int(res["inter"][r]), int(res["union"][r])
        rec = {
            "id": sid if j == 0 else f"{sid}#{j}",
            "example_index": int(ex_index[b]),
            "query": query_text(tokenizer, batch["input_ids"][r]) if tokenizer is not None else None,
            "intersection": inter,
            "union": union,
            "iou": float(query_iou(inter, union)),
            "seg_emitted": bool(res["seg_valid"][r]),
            "presence": bool(res["seg_valid"][r] and res["area"][r] > 0),
            "pred_area": int(res["area"][r]),
            "points": _points_json(res["points"][r], res["labels"][r]),
        }
        if "exists" in batch:
            rec["gt_presence"] = bool(np.asarray(batch["exists"])[r])
        if meta_fn is not None:
            rec.update(meta_fn(int(ex_index[b]), j))
        recs.append(rec)
    return recs


def summary_from_records(records: Sequence[Mapping[str, Any]]) -> dict:
    """gIoU / cIoU of the protocol, overall and (when records carry `is_sentence`) short / long, plus the
    optional analyses' figures and (when every record carries `query_kind`) per query kind. A pure function of
    the per-sample records (the JSONL)."""

    def meter(recs, ki="intersection", ku="union"):
        m = IoUMeter()
        m.update(np.array([r[ki] for r in recs], np.int64), np.array([r[ku] for r in recs], np.int64))
        return m.summary()

    out = meter(records)
    if records and all("is_sentence" in r for r in records):
        for name, flag in (("short", False), ("long", True)):
            sub = [r for r in records if r["is_sentence"] == flag]
            if sub:
                out[name] = meter(sub)
    if records and "ts_intersection" in records[0]:
        out["threshold_search"] = meter(records, "ts_intersection", "ts_union")
    if records and "pp_intersection" in records[0]:
        out["points_as_prompt"] = meter(records, "pp_intersection", "pp_union")
    if records and "fg_intersection" in records[0]:
        out["all_foreground"] = meter(records, "fg_intersection", "fg_union")
    if records and all(r.get("query_kind") for r in records):  # the generated shapes set (`evaluate.py`)
        kinds = sorted({r["query_kind"] for r in records})
        out["by_query_kind"] = {k: meter([r for r in records if r["query_kind"] == k]) for k in kinds}
    return out


def fp_summary_from_records(records: Sequence[Mapping[str, Any]]) -> dict:
    """FP-RefCOCO (read_reference.md §8.4): See = accuracy of presence ([SEG] emitted AND mask non-empty)
    against the premise; Segment = cIoU over all queries (false premises have an all-zero GT)."""
    m = IoUMeter()
    m.update(
        np.array([r["intersection"] for r in records], np.int64),
        np.array([r["union"] for r in records], np.int64),
    )
    see = see_accuracy([r["presence"] for r in records], [r["gt_presence"] for r in records])
    return {
        "See": see,
        "Segment": m.ciou,
        "gIoU": m.giou,
        "num_queries": m.count,
        "num_true_premise": int(sum(r["gt_presence"] for r in records)),
    }


def _iterate(batches, total: int | None, desc: str, progress: bool):
    if not progress:
        return batches
    from tqdm import tqdm

    return tqdm(batches, total=total, desc=desc, unit="batch", dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------------
# Protocols
# ----------------------------------------------------------------------------------------------------


def evaluate_reasonseg(
    model,
    batches_or_loader: Iterable[Mapping[str, Any]],
    *,
    mesh=None,
    canvas_hw: tuple[int, int] | None = None,
    sasp_cfg: SaspConfig | None = None,
    threshold_search: bool = False,
    points_prompt: SaspConfig | None = None,
    tokenizer=None,
    meta_fn: Callable[[int, int], dict] | None = None,
    on_maps: Callable[[Mapping[str, Any], dict, np.ndarray], None] | None = None,
    points_sam=None,
    evaluator: Evaluator | None = None,
    progress: bool = True,
    total: int | None = None,
    desc: str = "eval",
) -> tuple[dict, list[dict]]:
    """The teacher-forced protocol (ReasonSeg val/test, RefCOCO/+/g): gIoU and cIoU.

    The batches come from `read_jax.data.pipeline.eval_dataset` (prompt + GT answer, e.g. ReasonSeg's
    "Sure, the segmentation result is [SEG]."); usable from a training loop with the live model.

    Args:
      model: ReadModel.
      batches_or_loader: eval batches (numpy dicts as the pipeline yields them).
      mesh: data-parallel mesh (None: default device). The per-host batch must split over its devices.
      canvas_hw: expected (Hc, Wc) of the batches' GT canvas (checked; default: the batch's).
      sasp_cfg: SasP override (Table 8 sweeps); default the model's.
      threshold_search: Appendix A.1 (adds `threshold`, `ts_intersection`, `ts_union` to the records).
      points_prompt: Appendix B points-only SasP setting (`points_prompt_config`); adds `pp_*` fields.
      tokenizer: fills each record's `query` (decoded question).
      meta_fn: (example_index, query_index) -> extra record fields (`reason_seg_meta(reader)` gives
        `is_sentence`, which enables the short/long figures).
      on_maps: callback(batch, results, valid_rows) with the maps (turns on `return_maps`): pictures.
      evaluator: reuse an `Evaluator` (its model and mesh win over `model`/`mesh`).
    Returns:
      (summary {"gIoU", "cIoU", "num_queries", ["short", "long", "threshold_search", "points_as_prompt"],
      "samples_per_s"}, per-query records).
    """
    ev = evaluator or Evaluator(model, mesh, points_sam)
    records: list[dict] = []
    seen: collections.Counter = collections.Counter()
    t0 = time.perf_counter()
    for batch in _iterate(batches_or_loader, total, desc, progress):
        canvas = _check_batch(batch, canvas_hw, ev.mesh)
        opts = DecodeOptions(
            canvas_hw=canvas,
            sasp=sasp_cfg,
            threshold_search=threshold_search,
            points_prompt=points_prompt,
            return_maps=on_maps is not None,
        )
        res = ev.run(batch, opts)
        valid = _row_valid(batch)
        recs = _records(batch, res, valid, tokenizer, meta_fn, seen)
        rows = np.flatnonzero(valid)
        for rec, r in zip(recs, rows):
            rec.update(fg_intersection=int(res["fg_inter"][r]), fg_union=int(res["fg_union"][r]))
        if threshold_search:
            thr, ti, tu = best_thresholds(res["hist_fg"][rows], res["hist_all"][rows])
            for rec, t, i, u in zip(recs, thr, ti, tu):
                rec.update(
                    threshold=round(float(t), 2),
                    ts_intersection=int(i),
                    ts_union=int(u),
                    ts_iou=float(query_iou(i, u)),
                )
        if points_prompt is not None:
            for rec, r in zip(recs, rows):
                i, u = int(res["pp_inter"][r]), int(res["pp_union"][r])
                rec.update(
                    pp_intersection=i,
                    pp_union=u,
                    pp_iou=float(query_iou(i, u)),
                    pp_points=_points_json(res["pp_points"][r], res["pp_labels"][r]),
                )
        if on_maps is not None:
            on_maps(batch, res, rows)
        records.extend(recs)
    records = gather_records(records)
    wall = time.perf_counter() - t0
    summary = summary_from_records(records)
    summary["wall_s"] = wall
    summary["samples_per_s"] = len(records) / wall if wall > 0 else 0.0
    return summary, records


def sweep_sasp(
    model,
    batches_or_loader: Iterable[Mapping[str, Any]],
    *,
    mesh=None,
    thresholds: Sequence[tuple[float, float]] = TABLE8_THRESHOLDS,
    num_points: Sequence[int] = TABLE8_NUM_POINTS,
    base: SaspConfig | None = None,
    evaluator: Evaluator | None = None,
    progress: bool = True,
    total: int | None = None,
) -> dict[tuple[float, float, int], dict]:
    """Appendix C / Table 8: the protocol for every (t_pos, t_neg) x |P|, LLM forward run once per batch.

    Returns:
      {(t_pos, t_neg, num_points): {"gIoU", "cIoU", "num_queries"}}.
    """
    ev = evaluator or Evaluator(model, mesh)
    base = base or ev.config.sasp
    # Built (and so validated) on the host before anything compiles.
    settings = {
        (tp, tn, n): dataclasses.replace(base, t_pos=tp, t_neg=tn, num_points=n)
        for tp, tn in thresholds
        for n in num_points
    }
    pairs: dict[tuple, list] = {k: [] for k in settings}  # per setting: [(I, U)] of every counted query
    for batch in _iterate(batches_or_loader, total, "sweep", progress):
        canvas = _check_batch(batch, None, ev.mesh)
        valid = _row_valid(batch)
        enc = ev.encode(batch)  # the LLM once per batch
        for tp, tn, n in settings:
            # The static part names |P| only (thresholds of the base), so all (t_pos, t_neg) share a compile.
            opts = DecodeOptions(canvas_hw=canvas, sasp=dataclasses.replace(base, num_points=n))
            res = ev.decode_thresholds(enc, batch, opts, tp, tn)
            pairs[(tp, tn, n)] += [[int(i), int(u)] for i, u in zip(res["inter"][valid], res["union"][valid])]
    out = {}
    for k, iu in pairs.items():
        iu = np.array([p for rec in gather_records([{"iu": iu}]) for p in rec["iu"]], np.int64).reshape(-1, 2)
        m = IoUMeter()
        m.update(iu[:, 0], iu[:, 1])
        out[k] = m.summary()
    return out


def format_table8(results: Mapping[tuple[float, float, int], Mapping[str, float]]) -> str:
    """Table 8's layout: rows t_pos/t_neg, column pairs gIoU/cIoU per |P| (percent, 2 decimals)."""
    pairs = sorted({(tp, tn) for tp, tn, _ in results}, reverse=True)
    counts = sorted({n for _, _, n in results})
    head1 = "t_pos  t_neg  " + "".join(f"|P|={n:<13d}" for n in counts)
    head2 = "             " + "".join(f" {'gIoU':>6s} {'cIoU':>6s} " for _ in counts)
    lines = ["Table 8. Ablation study on points ratios.", head1, head2]
    for tp, tn in pairs:
        cells = "".join(
            f" {100 * results[(tp, tn, n)]['gIoU']:6.2f} {100 * results[(tp, tn, n)]['cIoU']:6.2f} "
            for n in counts
        )
        lines.append(f"{tp:<6.1f} {tn:<6.1f}{cells}")
    return "\n".join(lines)


# ---- FP-RefCOCO: free generation ---------------------------------------------------------------------------


def left_pad(input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded rows -> left-padded rows (the generation convention); pad id 0."""
    ids = np.zeros_like(input_ids)
    mask = np.zeros_like(attention_mask, dtype=bool)
    t = input_ids.shape[1]
    for r in range(len(ids)):
        n = int(np.asarray(attention_mask[r]).sum())
        ids[r, t - n :] = input_ids[r, :n]
        mask[r, t - n :] = True
    return ids, mask


def generate_answers(
    model,
    batch: Mapping[str, Any],
    *,
    max_new_tokens: int,
    eos_token_id: int = 2,
    pad_token_id: int = 0,
    mesh=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy answers for every row of a prompt batch (`LlavaModel.generate`: KV cache, one jitted loop).

    Rows without a conversation get a copy of a real prompt (generation validates every row); their
    output is ignored.
    Returns:
      (tokens int32[R, M], lengths int32[R]) with EOS counted in the length.
    """
    valid = np.asarray(batch["conv_valid"], bool)
    if not valid.any():
        r = len(valid)
        return np.zeros((r, max_new_tokens), np.int32), np.zeros((r,), np.int32)
    ids, mask = left_pad(np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"], bool))
    first = int(np.flatnonzero(valid)[0])
    conv_image = np.asarray(batch["conv_image"]).copy()
    ids[~valid], mask[~valid], conv_image[~valid] = ids[first], mask[first], conv_image[first]
    arrays = {"ids": ids, "mask": mask, "images": np.asarray(batch["images_clip"]), "conv_image": conv_image}
    if mesh is not None:
        from read_jax.sharding import shard_batch, use_mesh

        arrays = shard_batch(arrays, mesh)
        with use_mesh(mesh):
            tokens, lengths, _ = model.llava.generate(
                arrays["ids"],
                arrays["images"],
                arrays["mask"],
                arrays["conv_image"],
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
            )
    else:
        tokens, lengths, _ = model.llava.generate(
            jnp.asarray(ids),
            jnp.asarray(arrays["images"]),
            jnp.asarray(mask),
            jnp.asarray(conv_image),
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
    return _local_rows(tokens, mesh).astype(np.int32), _local_rows(lengths, mesh).astype(np.int32)


def with_answers(batch: Mapping[str, Any], tokens: np.ndarray, lengths: np.ndarray, total_len: int) -> dict:
    """The batch with each row's prompt followed by its generated tokens, right-padded to `total_len`
    (one static length: one compile). The full forward over it gives READ's generation-path hidden states
    (read_reference.md §4: equivalent to the reference's no-cache generation)."""
    ids_in = np.asarray(batch["input_ids"])
    mask_in = np.asarray(batch["attention_mask"], bool)
    r = len(ids_in)
    ids = np.zeros((r, total_len), np.int32)
    mask = np.zeros((r, total_len), bool)
    for i in range(r):
        row = list(ids_in[i, : int(mask_in[i].sum())]) + list(np.asarray(tokens[i, : int(lengths[i])]))
        if len(row) > total_len:
            raise ValueError(f"row {i}: prompt + answer is {len(row)} tokens > total_len {total_len}")
        ids[i, : len(row)] = row
        mask[i, : len(row)] = True
    return {**batch, "input_ids": ids, "attention_mask": mask}


def evaluate_fprefcoco(
    model,
    batches_or_loader: Iterable[Mapping[str, Any]],
    tokenizer,
    *,
    mesh=None,
    max_new_tokens: int = 64,
    total_len: int | None = None,
    generate_fn: Callable[[Mapping[str, Any]], tuple[np.ndarray, np.ndarray]] | None = None,
    evaluator: Evaluator | None = None,
    progress: bool = True,
    total: int | None = None,
) -> tuple[dict, list[dict]]:
    """FP-RefCOCO(+/g) "See" and "Segment" through free greedy generation (read_reference.md §8.4).

    Per query: generate (no forced [SEG]); run one full forward over prompt + answer; presence = a [SEG]
    was generated AND the first [SEG]'s mask is non-empty (an all-zero mask when none was generated).
    See = accuracy of presence against the premise (`batch["exists"]`); Segment = cIoU over all queries,
    with the all-zero GT of false premises (predicted pixels there only enlarge U).

    Args:
      batches_or_loader: prompt batches (readers with `eval_answer=False`, template "vicuna_v1" as
        `test_read.py`), with `exists`.
      max_new_tokens: generation budget (the reference: 512), capped by the model's position table.
      total_len: static length of the full forward (default: prompt length + max_new_tokens).
      generate_fn: batch -> (tokens int[R, M], lengths int[R]); default greedy `generate_answers`.
    Returns:
      (summary {"See", "Segment", "gIoU", "num_queries", ...}, records with `answer`, `presence`,
      `gt_presence`, IoU fields).
    """
    ev = evaluator or Evaluator(model, mesh)

    def default_generate(b):
        # The budget cannot pass the position table: prompt + image tokens + answer <= max_position_embeddings.
        cfg = ev.config
        room = cfg.llama.max_position_embeddings - (np.shape(b["input_ids"])[1] + cfg.clip.num_patches - 1)
        if room < 1:
            raise ValueError(
                f"prompts of {np.shape(b['input_ids'])[1]} tokens leave no room to generate within "
                f"max_position_embeddings={cfg.llama.max_position_embeddings}"
            )
        return generate_answers(
            model,
            b,
            max_new_tokens=min(max_new_tokens, room),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            mesh=ev.mesh,
        )

    gen = generate_fn or default_generate
    records: list[dict] = []
    seen: collections.Counter = collections.Counter()
    t0 = time.perf_counter()
    for batch in _iterate(batches_or_loader, total, "fp-refcoco", progress):
        if "exists" not in batch:
            raise ValueError("FP-RefCOCO batches need `exists` (the premise of each query)")
        tokens, lengths = gen(batch)
        full_len = total_len or (np.shape(batch["input_ids"])[1] + tokens.shape[1])
        full = with_answers(batch, tokens, lengths, full_len)
        canvas = _check_batch(full, None, ev.mesh)
        res = ev.run(full, DecodeOptions(canvas_hw=canvas))
        valid = _row_valid(full)
        recs = _records(full, res, valid, None, None, seen)
        for rec, r in zip(recs, np.flatnonzero(valid)):
            rec["query"] = query_text(tokenizer, batch["input_ids"][r]) if tokenizer is not None else None
            rec["answer"] = (
                tokenizer.decode(tokens[r, : lengths[r]].tolist(), skip_special_tokens=True)
                if tokenizer is not None
                else None
            )
        records.extend(recs)
    records = gather_records(records)
    wall = time.perf_counter() - t0
    summary = fp_summary_from_records(records)
    summary["wall_s"] = wall
    summary["samples_per_s"] = len(records) / wall if wall > 0 else 0.0
    return summary, records


# ---- output files ------------------------------------------------------------------------------------------


def write_results(
    out_dir: str,
    summary: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    name: str = "summary.json",
    samples: str = "samples.jsonl",
) -> tuple[str, str]:
    """`out_dir/summary.json` (indented) and `out_dir/samples.jsonl` (one record per query).

    The records are the whole split's on every process (`gather_records`): only process 0 writes."""
    s_path = os.path.join(out_dir, name)
    r_path = os.path.join(out_dir, samples)
    if jax.process_index() != 0:
        return s_path, r_path
    os.makedirs(out_dir, exist_ok=True)
    with open(s_path, "w") as f:
        json.dump(summary, f, indent=2, default=_json_default)
    with open(r_path, "w") as f:
        f.writelines(json.dumps(rec, default=_json_default) + "\n" for rec in records)
    return s_path, r_path


def read_records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
