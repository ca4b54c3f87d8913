"""Similarity as Points (SasP) and Discrete-to-Continuous (DtoC): READ's point prompts as pure JAX functions.

PyTorch reference: rui-qian/READ `model/READ.py` (commit 2549240): `compute_similarity_map` (:633-653),
`similarity_map_to_points` with its inner `get_similarity_map` and `Discrete_to_Continuous` (:763-895);
read_reference.md §3, §13 items 8/9/15, §14. Test transcription: `torchref/sasp.py`.

Shape legend:
  N  similarity maps, one per [SEG] of a batch; each has its own original image size (H, W)
  P  image tokens, P = g*g (g = CLIP grid side, 24; CLIP crop side 336)
  C  hidden size
  d  SasP grid side (12 for READ-7B, 24 for READ-13B eval); K = d*d grid cells
  Q  points per map (`num_points`)
  S  DtoC window side, 2R+1 (R = `dtoc_radius`)

What the reference does (one Python loop per [SEG]) and how it is batched here:
  * Selection. 24x24 map -> torch bilinear to d x d -> min-max -> pad with -1 to the original aspect ratio
    (integer centre-crop geometry) -> positives >= t_pos by value desc, negatives in [0, t_neg] asc, then
    neutrals in raster order -> first Q -> cell centres in original pixels, clamped, truncated.
    Padding cells are never selected, and padding does not change the raster order of the real cells, so
    the padded grid is never built: the K real cells get one int32 key (category, then +-value), a stable
    sort orders them (ties by raster index), and the traced padding offsets are added to the first Q.
    No static bound on the aspect ratio is needed, and one compile serves every (H, W).
  * The padding sizes come from `int(H * (d / min(H, W)))` in Python *double* arithmetic. That differs
    from the exact floor(H*d/min) for many real sizes (e.g. a short side of 307 px gives 11 instead of
    12 for d=12, i.e. a negative pad that CROPS the grid). `scaled_side` reproduces the double rounding
    exactly with int32 arithmetic and a per-short-side table (checked against CPython on all 33M pairs
    with short side <= 3000 and long side <= 9x, offline; the tests check 240K pairs).
  * DtoC. x_hat = sum g exp(M - |g - p|^2) / sum exp(M - |g - p|^2) over the full-resolution map M
    (24^2 -> 336^2 bilinear -> zero pad to the short-side-336 frame -> bilinear to (H, W)); the global
    softmax normaliser cancels. exp(-d^2) vanishes in float32 beyond ~10 px, so M is evaluated only on an
    S x S window around each point, exactly, by composing the two bilinear resizes into per-pixel weights
    over the 24 source rows/cols (M_win = Ry V Rx^T). M is never built at (H, W).

Dtype policy (`SaspConfig.similarity_dtype`):
  "bfloat16" (the released models): the similarity is an elementwise bf16 product, summed with float32
    accumulation and rounded to bf16; DtoC's min-max runs in bf16 (each op rounded), as the reference
    does; the selection grid is built in float32 from the bf16 similarity. Every bf16 rounding is an
    explicit `lax.reduce_precision`, so XLA's excess-precision rewrites cannot skip it.
  "float32": everything in float32 (used by the parity and gradient tests).

Deliberate differences from the reference:
  * min-max has an epsilon (`minmax_eps`): a flat map gives an all-zero grid (all cells negative, raster
    order) and finite DtoC output instead of NaN (read_reference.md §13.8).
  * Ties: torch.argsort is not stable (tie order undefined, on CPU and CUDA); we break ties by raster
    index. Identical outputs are guaranteed only when the sorted values have no exact ties.
  * If fewer than Q cells are selectable (only possible when the reference's negative padding crops the
    grid and Q is close to d*d), the reference returns fewer points; we return Q with label -1 at (0, 0).
  * Short image sides above MAX_SHORT_SIDE use exact rational geometry, which can differ from CPython's
    double rounding; concrete (H, W) outside the supported range raise ValueError.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from read_jax.config import CLIP_GRID, CLIP_SIZE, SaspConfig
from read_jax.sasp_grid import MAX_LONG_SIDE, MAX_SHORT_SIDE, crop_padding, resize_grid, resize_matrix

# Sort-key layout of `select_points` (int32): see the comment there.
_ONE_BITS = 0x3F800000  # float32 bit pattern of 1.0
_NEG_BASE = 1 << 30
_NEUTRAL_KEY = (1 << 31) - 2
_UNUSABLE_KEY = (1 << 31) - 1

Array = jax.Array
_HI = lax.Precision.HIGHEST  # small f32 contractions: TF32/bf16 passes would cost DtoC its exactness


# ----------------------------------------------------------------------------------------------------
# Numerics helpers
# ----------------------------------------------------------------------------------------------------


def _round_to_bf16(x: jax.Array) -> jax.Array:
    """float32 values rounded to the nearest bfloat16 (ties to even), kept as float32.

    `reduce_precision` rather than `astype(bfloat16)`: XLA may drop f32->bf16->f32 round trips (excess
    precision; on CPU a bf16 `a * b` feeding a sum is NOT rounded), and the reference rounds after every
    bf16 op. Its gradient passes through (rounded like a bf16 tangent).
    """
    return lax.reduce_precision(x.astype(jnp.float32), exponent_bits=8, mantissa_bits=7)


def _minmax(x: jax.Array, eps: float, bf16: bool = False) -> jax.Array:
    """(x - min) / (max - min + eps) over the last axis; `bf16` rounds after every op like a bf16 tensor.

    XLA rewrites `a / broadcast(b)` as `a * broadcast(1 / b)`, which is off by an ulp (the max becomes
    0.99999994, and thresholds and orderings move). The optimisation barrier hides the broadcast so the
    division stays a true IEEE division, as in the reference.
    """
    mn = x.min(axis=-1, keepdims=True)
    mx = x.max(axis=-1, keepdims=True)
    num, den = x - mn, mx - mn
    if bf16:
        num, den = _round_to_bf16(num), _round_to_bf16(den)
    den = lax.optimization_barrier(jnp.broadcast_to(den + eps, x.shape))
    out = num / den
    return _round_to_bf16(out) if bf16 else out


# ----------------------------------------------------------------------------------------------------
# Input checks (static shapes, and concrete sizes when available): before anything is compiled
# ----------------------------------------------------------------------------------------------------


def _check_maps(sim, hw, clip_grid: int, name: str = "sim"):
    """Validates a batch of maps and its sizes; returns `hw` as an array (lists are accepted)."""
    hw = hw if hasattr(hw, "shape") else np.asarray(hw)
    if sim.ndim != 2 or sim.shape[-1] != clip_grid * clip_grid:
        raise ValueError(
            f"{name} must be float[N, {clip_grid * clip_grid}] (a {clip_grid}^2 map), got {sim.shape}"
        )
    if hw.shape != (sim.shape[0], 2):
        raise ValueError(f"hw must be int[N, 2] = (H, W) per map with N = {sim.shape[0]}, got {hw.shape}")
    if not jnp.issubdtype(hw.dtype, jnp.integer):
        raise ValueError(f"hw must hold integer pixel sizes, got dtype {hw.dtype}")
    if not isinstance(hw, jax.core.Tracer):
        hw_np = np.asarray(hw)
        if hw_np.size and (
            hw_np.min() < 1 or hw_np.min(axis=1).max() > MAX_SHORT_SIDE or hw_np.max() > MAX_LONG_SIDE
        ):
            raise ValueError(
                f"image sizes must satisfy 1 <= short side <= {MAX_SHORT_SIDE} and "
                f"long side <= {MAX_LONG_SIDE}, "
                f"got hw range [{hw_np.min()}, {hw_np.max()}]"
            )
    return hw


def _check_cfg(cfg: SaspConfig, clip_grid: int):
    if not isinstance(cfg, SaspConfig):
        raise ValueError(f"cfg must be a SaspConfig, got {type(cfg).__name__}")
    if cfg.grid_size > clip_grid:
        raise ValueError(
            f"grid_size {cfg.grid_size} exceeds the CLIP grid {clip_grid} (the reference only downsamples)"
        )
    if cfg.similarity_dtype not in ("bfloat16", "float32"):
        raise ValueError(f"similarity_dtype must be 'bfloat16' or 'float32', got {cfg.similarity_dtype!r}")
    if cfg.dtoc_radius < 1:
        raise ValueError(f"dtoc_radius must be >= 1, got {cfg.dtoc_radius}")


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


def similarity(image_hidden: jax.Array, seg_hidden: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
    """Raw dot product between image-token and [SEG] hidden states (`compute_similarity_map`).

    Not a cosine: nothing is normalised, and CLIP-Surgery's redundancy weight is exactly 1 for a single
    text vector (read_reference.md §3.1).

    Args:
      image_hidden: float[..., P, C] final hidden states of the image tokens (not projected).
      seg_hidden: float[..., C] hidden state that predicts [SEG].
      dtype: bfloat16 (reference: bf16 elementwise product, float32 accumulation, rounded to bf16;
        returns a bfloat16 array) or float32 (float32 dot product at full precision).
    Returns:
      float[..., P] in `dtype`.
    """
    if image_hidden.shape[:-2] != seg_hidden.shape[:-1] or image_hidden.shape[-1] != seg_hidden.shape[-1]:
        raise ValueError(
            "need image_hidden [..., P, C] and seg_hidden [..., C], "
            f"got {image_hidden.shape}, {seg_hidden.shape}"
        )
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return jnp.einsum(
            "...pc,...c->...p",
            image_hidden.astype(jnp.float32),
            seg_hidden.astype(jnp.float32),
            precision=_HI,
        )
    if dtype != jnp.bfloat16:
        raise ValueError(f"similarity dtype must be bfloat16 or float32, got {dtype}")
    a = _round_to_bf16(image_hidden)  # no-op on bf16 inputs
    b = _round_to_bf16(seg_hidden)
    # The f32 product of two bf16 numbers is exact; rounding it reproduces torch's bf16 `mul`.
    prod = _round_to_bf16(a * b[..., None, :])  # [..., P, C]
    return _round_to_bf16(prod.sum(axis=-1)).astype(jnp.bfloat16)


def select_points(sim: jax.Array, hw: jax.Array, cfg: SaspConfig, clip_grid: int = CLIP_GRID):
    """Discrete point selection (`similarity_map_to_points` up to the integer points), batched.

    Args:
      sim: float[N, P] similarity maps (P = clip_grid**2); rounded to bf16 first when
        cfg.similarity_dtype == "bfloat16" (a no-op on `similarity`'s output). No gradient flows here.
      hw: int[N, 2] original image (H, W), traced: one compile serves all sizes.
      cfg: SaspConfig (grid_size, num_points, t_pos, t_neg, mode, minmax_eps).
      clip_grid: side of the similarity map.
    Returns:
      points_int: int32[N, Q, 2] (x, y) original-image pixels, truncated like the reference.
      labels: int32[N, Q] 1 positive, 0 negative, -1 neutral ("not a point" for SAM).
      aux: dict with 'grid' float[N, d, d] (min-max map before padding), 'cell_valid' bool[N, d, d]
        (not cropped), 'cells' int32[N, Q] (selected cell, d x d raster index), 'values' float[N, Q]
        (their grid values), 'pad' int32[N, 2] (ph, pw), 'padded_shape' int32[N, 2] (h, w).
    """
    _check_cfg(cfg, clip_grid)
    hw = _check_maps(sim, hw, clip_grid)
    n, d, q = sim.shape[0], cfg.grid_size, cfg.num_points
    k = d * d

    s = lax.stop_gradient(sim).astype(jnp.float32)
    if cfg.similarity_dtype == "bfloat16":
        s = _round_to_bf16(s)
    grid = _minmax(resize_grid(s.reshape(n, clip_grid, clip_grid), d).reshape(n, k), cfg.minmax_eps)  # [N, K]

    ph, pw = crop_padding(hw, d)
    idx = jnp.arange(d)
    # A cell survives the (possibly negative) padding iff its padded row/col lies in [0, d + 2p).
    row_ok = (idx[None] + ph[:, None] >= 0) & (idx[None] + ph[:, None] < d + 2 * ph[:, None])
    col_ok = (idx[None] + pw[:, None] >= 0) & (idx[None] + pw[:, None] < d + 2 * pw[:, None])
    valid = (row_ok[:, :, None] & col_ok[:, None, :]).reshape(n, k)
    raster = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (n, k))

    # One int32 sort key per cell. For 0 <= f <= 1 the float32 bit pattern is monotone in f, so
    #   positives: ONE - bits(f)        in [0, 2^30)        (value descending)
    #   negatives: 2^30 + bits(f)       in [2^30, 2^31 - 2)  (value ascending)
    #   neutrals:  2^31 - 2, unusable:  2^31 - 1             (raster order through the stable sort)
    # A stable sort then breaks exact ties by raster index (torch.argsort leaves them undefined).
    bits = jnp.minimum(
        lax.bitcast_convert_type(grid, jnp.int32) & 0x7FFFFFFF, _ONE_BITS
    )  # & drops -0.0's sign
    neutral_key, unusable_key = jnp.int32(_NEUTRAL_KEY), jnp.int32(_UNUSABLE_KEY)

    def first(key, count):
        """Raster indices of the `count` cells with the smallest keys, ties by raster index."""
        sorted_key, order = lax.sort((key, raster), dimension=-1, num_keys=1, is_stable=True)
        return sorted_key[:, :count], order[:, :count]

    t_pos, t_neg = jnp.float32(cfg.t_pos), jnp.float32(cfg.t_neg)
    if cfg.mode == "threshold":
        pos = valid & (grid >= t_pos)
        neg = valid & (grid >= 0) & (grid <= t_neg)
        neu = valid & (grid > t_neg) & (grid < t_pos)
        key = jnp.where(
            pos, _ONE_BITS - bits, jnp.where(neg, _NEG_BASE + bits, jnp.where(neu, neutral_key, unusable_key))
        )
        sorted_key, cells = first(key, q)
        labels = jnp.where(sorted_key < _NEG_BASE, 1, jnp.where(sorted_key < neutral_key, 0, -1)).astype(
            jnp.int32
        )
        usable = sorted_key < unusable_key
    else:  # "topk" (Appendix B, points only): highest half positive, lowest half negative
        half = q // 2
        top_key, top = first(jnp.where(valid, _ONE_BITS - bits, unusable_key), half)
        bot_key, bot = first(jnp.where(valid, bits, unusable_key), half)
        cells = jnp.concatenate([top, bot], axis=1)
        usable = jnp.concatenate([top_key, bot_key], axis=1) < unusable_key
        labels = jnp.where(usable, jnp.repeat(jnp.array([1, 0], jnp.int32), half)[None], -1)

    # Cell centres in the padded grid, scaled to original pixels. The reference computes
    # (idx % w + 0.5) * float(W / w) on float32 tensors, clamps to W-1, and truncates with int().
    hw = hw.astype(jnp.int32)
    h_img, w_img = hw[:, :1], hw[:, 1:]
    rows, cols = cells // d + ph[:, None], cells % d + pw[:, None]
    scale_y = h_img.astype(jnp.float32) / (d + 2 * ph[:, None]).astype(jnp.float32)
    scale_x = w_img.astype(jnp.float32) / (d + 2 * pw[:, None]).astype(jnp.float32)
    x = jnp.minimum((cols.astype(jnp.float32) + 0.5) * scale_x, (w_img - 1).astype(jnp.float32))
    y = jnp.minimum((rows.astype(jnp.float32) + 0.5) * scale_y, (h_img - 1).astype(jnp.float32))
    points = jnp.stack([x.astype(jnp.int32), y.astype(jnp.int32)], axis=-1)
    points = jnp.where(usable[..., None], points, 0)
    aux = {
        "grid": grid.reshape(n, d, d),
        "cell_valid": valid.reshape(n, d, d),
        "cells": cells,
        "values": jnp.take_along_axis(grid, cells, axis=1),
        "pad": jnp.stack([ph, pw], axis=-1),
        "padded_shape": jnp.stack([d + 2 * ph, d + 2 * pw], axis=-1),
    }
    return points, labels, aux


def _axis_weights(pix, out_size, pad, clip_size: int, up: np.ndarray):
    """Weights of the composed map along one axis: output pixel -> the g source cells.

    M = resize(zero_pad(resize(V, clip_size), pad), out_size); along one axis an output pixel reads two
    padded-frame pixels (torch bilinear, traced sizes), each of which is 0 in the padding or a row of the
    static `up` [clip_size, g] matrix of the first resize.

    Args:
      pix: int32[N, Q, S] output pixel indices (may lie outside [0, out_size): masked by the caller).
      out_size, pad: int32[N, 1, 1] output size (H or W) and padding (ph or pw) of the clip frame.
    Returns:
      float32[N, Q, S, g].
    """
    in_size = clip_size + 2 * pad
    scale = in_size.astype(jnp.float32) / out_size.astype(jnp.float32)
    src = jnp.maximum(scale * (pix.astype(jnp.float32) + 0.5) - 0.5, 0.0)
    i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), in_size - 1)
    l1 = jnp.clip(src - i0.astype(jnp.float32), 0.0, 1.0)
    i1 = i0 + (i0 < in_size - 1).astype(jnp.int32)
    up = jnp.asarray(up)

    def tap(i, weight):
        a = i - pad  # padded frame -> clip frame
        inside = (a >= 0) & (a < clip_size)
        return up[jnp.clip(a, 0, clip_size - 1)] * jnp.where(inside, weight, 0.0)[..., None]

    return tap(i0, 1.0 - l1) + tap(i1, l1)


def dtoc(
    sim: jax.Array,
    points_int: jax.Array,
    hw: jax.Array,
    *,
    radius: int = 9,
    similarity_dtype: str = "bfloat16",
    minmax_eps: float = 1e-12,
    clip_grid: int = CLIP_GRID,
    clip_size: int = CLIP_SIZE,
) -> jax.Array:
    """Discrete-to-Continuous: Gaussian x softmax(M) weighted mean of pixel coordinates around each point.

    x_hat = sum_g g * exp(M_g - |g - p|^2) / sum_g exp(M_g - |g - p|^2), g over the pixels of an S x S
    window around p (S = 2 radius + 1) that lie inside the image; M is the reference's `origin_sm` at
    those pixels, computed exactly. Beyond `radius` the weights are < exp(1 - radius^2) relative to the
    centre (radius 9: 1e-35). Differentiable w.r.t. `sim`; the integer points carry no gradient.

    Args:
      sim: float[N, P] similarity maps (P = clip_grid**2). With similarity_dtype "bfloat16" the map is
        rounded to bf16 and min-max normalised in bf16 like the reference; "float32" keeps float32.
      points_int: int[N, Q, 2] (x, y) integer pixels from `select_points`.
      hw: int[N, 2] original (H, W), traced.
    Returns:
      float32[N, Q, 2] continuous (x, y) in original-image pixels.
    """
    hw = _check_maps(sim, hw, clip_grid)
    if points_int.ndim != 3 or points_int.shape[0] != sim.shape[0] or points_int.shape[-1] != 2:
        raise ValueError(f"points_int must be int[N, Q, 2] with N = {sim.shape[0]}, got {points_int.shape}")
    if similarity_dtype not in ("bfloat16", "float32"):
        raise ValueError(f"similarity_dtype must be 'bfloat16' or 'float32', got {similarity_dtype!r}")
    n, g = sim.shape[0], clip_grid
    bf16 = similarity_dtype == "bfloat16"
    s = sim.astype(jnp.float32)
    v = _minmax(_round_to_bf16(s) if bf16 else s, minmax_eps, bf16=bf16).reshape(n, g, g)  # [N, g, g]

    hw = hw.astype(jnp.int32)
    ph, pw = crop_padding(hw, clip_size)
    offs = jnp.arange(-radius, radius + 1, dtype=jnp.int32)  # [S]
    pts = lax.stop_gradient(points_int).astype(jnp.int32)
    px = pts[..., 0:1] + offs  # [N, Q, S] window columns
    py = pts[..., 1:2] + offs  # [N, Q, S] window rows
    h_img, w_img = hw[:, 0, None, None], hw[:, 1, None, None]
    up = resize_matrix(g, clip_size)  # [clip_size, g]
    ry = _axis_weights(py, h_img, ph[:, None, None], clip_size, up)  # [N, Q, S, g]
    rx = _axis_weights(px, w_img, pw[:, None, None], clip_size, up)  # [N, Q, S, g]
    # M on the window: [N, Q, S(rows), S(cols)] = Ry V Rx^T.
    u = jnp.einsum("nij,nqtj->nqit", v, rx, precision=_HI)  # [N, Q, g, S]
    m = jnp.einsum("nqsi,nqit->nqst", ry, u, precision=_HI)

    d2 = (offs**2).astype(jnp.float32)
    inside = ((py >= 0) & (py < h_img))[..., :, None] & ((px >= 0) & (px < w_img))[..., None, :]
    # M lies in [0, 1] and the centre pixel is always inside, so exp needs no max-shift and sum >= 1.
    wts = jnp.where(inside, jnp.exp(m - d2[:, None] - d2[None, :]), 0.0)  # [N, Q, S, S]
    # The three window sums (sum w, sum w*dx, sum w*dy) as one contraction: XLA would otherwise
    # recompute the exp for each reduction. Offsets are relative to the integer point, which is more
    # accurate in float32 than the reference's sum(g * w) with g ~ 1000.
    off = offs.astype(jnp.float32)
    side = off.shape[0]
    basis = jnp.stack(
        [
            jnp.ones((side, side)),
            jnp.broadcast_to(off[None, :], (side, side)),
            jnp.broadcast_to(off[:, None], (side, side)),
        ],
        axis=-1,
    )  # [S, S, 3]
    sums = jnp.einsum("nqst,stk->nqk", wts, basis, precision=_HI)  # [N, Q, 3]
    dx, dy = sums[..., 1] / sums[..., 0], sums[..., 2] / sums[..., 0]
    return jnp.stack([pts[..., 0] + dx, pts[..., 1] + dy], axis=-1)


def sasp(
    image_hidden: jax.Array,
    seg_hidden: jax.Array,
    hw: jax.Array,
    cfg: SaspConfig,
    *,
    clip_grid: int = CLIP_GRID,
    clip_size: int = CLIP_SIZE,
):
    """The whole SasP step for all [SEG]s of a batch: similarity -> points (+ DtoC) -> labels.

    jit with `cfg` static (`jax.jit(sasp, static_argnames=("cfg",))`); (H, W) are traced.

    Args:
      image_hidden: float[N, P, C] image-token hidden states paired with each [SEG].
      seg_hidden: float[N, C] [SEG]-predicting hidden states.
      hw: int[N, 2] original image (H, W) of each [SEG]'s image.
      cfg: SaspConfig.
    Returns:
      points: float32[N, Q, 2] (x, y) original pixels (DtoC output, or the integer points as floats when
        cfg.use_dtoc is False); gradients reach both hidden-state inputs through DtoC.
      labels: int32[N, Q] in {1, 0, -1}.
      aux: `select_points`'s aux plus 'sim' float[N, P] and 'points_int' int32[N, Q, 2].
    """
    _check_cfg(cfg, clip_grid)
    if image_hidden.ndim != 3 or seg_hidden.ndim != 2:
        raise ValueError(
            f"need image_hidden [N, P, C] and seg_hidden [N, C], got {image_hidden.shape}, {seg_hidden.shape}"
        )
    sim = similarity(image_hidden, seg_hidden, dtype=cfg.similarity_dtype)
    points_int, labels, aux = select_points(sim, hw, cfg, clip_grid)
    if cfg.use_dtoc:
        points = dtoc(
            sim,
            points_int,
            hw,
            radius=cfg.dtoc_radius,
            similarity_dtype=cfg.similarity_dtype,
            minmax_eps=cfg.minmax_eps,
            clip_grid=clip_grid,
            clip_size=clip_size,
        )
    else:
        points = points_int.astype(jnp.float32)
    return points, labels, {**aux, "sim": sim, "points_int": points_int}


def similarity_map_full(sim: Array, orig_hw: Array, out_hw: Array, canvas_hw: tuple[int, int], **kw) -> Array:
    """The reference's `origin_sm` (read_reference.md §3.2) on a static canvas: the Fig. 4 (a) heat map.

    v = min-max(sim) (in bf16 like the reference when `similarity_dtype` is "bfloat16"), reshaped to g x g,
    bilinear to clip_size^2, zero-padded to the short-side-clip_size frame of the original (H, W) (the
    integer centre-crop geometry of `sasp_grid.crop_padding`), bilinear to `out_hw`. Computed as
    M = Ry V Rx^T with per-axis weights (the same composition DtoC evaluates on its windows; the factors are
    `similarity_map_factors`, whose arguments these are).

    Returns:
      float32[N, Hc, Wc] in [0, 1] inside each out_hw, 0 outside.
    """
    ry, v, rx = similarity_map_factors(sim, orig_hw, out_hw, canvas_hw, **kw)
    hi = jax.lax.Precision.HIGHEST
    m = jnp.einsum("nyi,nij->nyj", ry, v, precision=hi)
    return jnp.einsum("nyj,nxj->nyx", m, rx, precision=hi)  # [N, Hc, Wc]; Ry, Rx are 0 beyond out_hw


def similarity_map_factors(
    sim: Array,
    orig_hw: Array,
    out_hw: Array,
    canvas_hw: tuple[int, int],
    *,
    similarity_dtype: str = "bfloat16",
    minmax_eps: float = 1e-12,
    clip_grid: int = CLIP_GRID,
    clip_size: int = CLIP_SIZE,
) -> tuple[Array, Array, Array]:
    """`similarity_map_full` = Ry V Rx^T as its factors, so that row bands of the map can be computed one at
    a time (`Ry[:, y0:y1] V Rx^T`, how evaluation bounds its memory on large images).

    Args:
      sim: float[N, P] raw similarity maps (P = g*g).
      orig_hw: int[N, 2] original (H, W): the crop geometry.
      out_hw: int[N, 2] output size (usually == orig_hw; the GT canvas extent otherwise).
      canvas_hw: static (Hc, Wc) >= every out_hw.
    Returns:
      (Ry float32[N, Hc, g], V float32[N, g, g], Rx float32[N, Wc, g]); rows of Ry / Rx beyond out_hw are 0.
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
    # The exact bf16 op sequence DtoC uses (tested against torch there).
    v = _minmax(_round_to_bf16(s) if bf16 else s, minmax_eps, bf16=bf16).reshape(n, g, g)
    orig_hw = orig_hw.astype(jnp.int32)
    out_hw = out_hw.astype(jnp.int32)
    ph, pw = crop_padding(orig_hw, clip_size)
    up = resize_matrix(g, clip_size)  # [clip_size, g]
    hc, wc = canvas_hw
    ys = jnp.broadcast_to(jnp.arange(hc, dtype=jnp.int32), (n, 1, hc))
    xs = jnp.broadcast_to(jnp.arange(wc, dtype=jnp.int32), (n, 1, wc))
    ry = _axis_weights(ys, out_hw[:, 0, None, None], ph[:, None, None], clip_size, up)[:, 0]  # [N, Hc, g]
    rx = _axis_weights(xs, out_hw[:, 1, None, None], pw[:, None, None], clip_size, up)[:, 0]  # [N, Wc, g]
    ry = jnp.where((ys[:, 0] < out_hw[:, 0, None])[..., None], ry, 0.0)
    rx = jnp.where((xs[:, 0] < out_hw[:, 1, None])[..., None], rx, 0.0)
    return ry, v, rx
