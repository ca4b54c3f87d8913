"""SAM pre- and post-processing: longest-side resize, normalise + pad, coordinate scaling, mask upsampling.

PyTorch reference: segment-anything 1.0 (PyPI, 2023-04), `segment_anything/utils/transforms.py`
(`ResizeLongestSide`) and `modeling/sam.py` (`Sam.preprocess`, `Sam.postprocess_masks`); READ uses them as
read_reference.md §2.7 and §7.2 describe.

Host side (numpy + PIL, not jit-able): `get_preprocess_shape`, `resize_longest_side`, `preprocess`.
`jax.image.resize` does not reproduce PIL's antialiased bilinear filter, so the image resize stays on the
host.

Device side (jnp, jit-able): `apply_coords`, `get_preprocess_shape_jnp`, `postprocess_masks`,
`postprocess_masks_padded`. Mask post-processing is torch's `F.interpolate(bilinear, align_corners=False,
antialias=False)` to S x S, a crop to the resized extent, and a second such interpolation to the original
(H, W), which may be a *downsample* (still plain 2-tap bilinear, no antialias). Both resizes are separable and
linear, so we fold them into one [H, l] and one [W, l] weight matrix per mask (each row has at most 4 non-zero
taps) and apply them with two matmuls. The matrices are built from *traced* sizes, so one compiled function
serves every image size: the output lives in a static (Hmax, Wmax) canvas, valid in [:H, :W] and zero outside.

Shape letters:
  n: masks/prompts   M: masks per prompt   l: low-res mask side (4 * S / 16 = 256)   S: SAM input side (1024)
  (h, w): resized extent inside S (the image before padding)   (H, W): original image size
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from read_jax.config import SamConfig

_HIGHEST = jax.lax.Precision.HIGHEST


# ---- sizes ----------------------------------------------------------------------------------------------
def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
    """(h, w) after resizing the longest side to `long_side_length`: Meta's float arithmetic, bit for bit."""
    if oldh <= 0 or oldw <= 0:
        raise ValueError(f"image size must be positive, got {(oldh, oldw)}")
    scale = long_side_length * 1.0 / max(oldh, oldw)
    return int(oldh * scale + 0.5), int(oldw * scale + 0.5)


def get_preprocess_shape_jnp(hw: jax.Array, long_side_length: int) -> jax.Array:
    """Traceable `get_preprocess_shape`: int[..., 2] (H, W) -> int32[..., 2] (h, w).

    Uses exact integer arithmetic, floor(x * L / max + 1/2) = (2 x L + max) // (2 max), which equals Meta's
    float64 result for every H, W in [1, 3000] with L in {256, 1024} (checked exhaustively); int32 overflows
    only beyond ~1e6 pixels a side.
    """
    hw = jnp.asarray(hw, jnp.int32)
    m = jnp.max(hw, axis=-1, keepdims=True)
    return (2 * hw * long_side_length + m) // (2 * m)


def apply_coords(coords, original_size, target_length: int):
    """Scale (x, y) pixel coordinates of the original image to the longest-side-`target_length` frame.

    Args:
      coords: float[..., 2] (x, y); numpy (returns float64, as Meta's `apply_coords`) or jax (keeps its
        float dtype, as `apply_coords_torch`; differentiable).
      original_size: (H, W) Python ints, or an int array [..., 2] (per row, traced is fine) broadcastable
        against `coords[..., 0, :]`, e.g. [n, 2] for coords [n, Np, 2].
      target_length: S.
    Returns:
      coords in the resized frame, same shape.
    """
    static = isinstance(original_size, (tuple, list))
    if static and all(isinstance(v, (int, np.integer)) for v in original_size):
        (oh, ow), (nh, nw) = original_size, get_preprocess_shape(*original_size, target_length)
        scale = (nw / ow, nh / oh)
        if isinstance(coords, np.ndarray):
            return coords.astype(np.float64) * np.asarray(scale)
        coords = jnp.asarray(coords)
        dt = coords.dtype if jnp.issubdtype(coords.dtype, jnp.floating) else jnp.float32
        return coords.astype(dt) * jnp.asarray(scale, dt)
    old = jnp.asarray(original_size, jnp.int32)
    new = get_preprocess_shape_jnp(old, target_length)
    coords = jnp.asarray(coords)
    dt = coords.dtype if jnp.issubdtype(coords.dtype, jnp.floating) else jnp.float32
    scale = (new.astype(jnp.float32) / old.astype(jnp.float32))[..., ::-1]  # (W ratio, H ratio) for (x, y)
    return coords.astype(dt) * scale[..., None, :].astype(dt)


# ---- host image preprocessing -------------------------------------------------------------------------
def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"SAM expects an RGB image uint8[H, W, 3], got shape {image.shape} "
            "(convert grayscale/RGBA to RGB first)"
        )
    if image.dtype != np.uint8:
        raise ValueError(f"SAM expects a uint8 image, got dtype {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"empty image of shape {image.shape}")
    return image


def resize_longest_side(image: np.ndarray, target_length: int) -> np.ndarray:
    """`ResizeLongestSide(target_length).apply_image`: PIL bilinear (antialiased) to `get_preprocess_shape`.

    Args:
      image: uint8[H, W, 3] RGB.
    Returns:
      uint8[h, w, 3] with max(h, w) == target_length.
    """
    image = _check_image(image)
    h, w = get_preprocess_shape(image.shape[0], image.shape[1], target_length)
    # torchvision's resize of a PIL image is exactly PIL's resize((w, h), BILINEAR).
    return np.asarray(Image.fromarray(image, mode="RGB").resize((w, h), Image.BILINEAR))


def preprocess(image: np.ndarray, cfg: SamConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """Resize, normalise with SAM's pixel mean/std (0-255 scale) and zero-pad bottom/right to S.

    Args:
      image: uint8[H, W, 3] RGB.
    Returns:
      (float32[S, S, 3] NHWC-ready image, (h, w) resized extent = `input_size` for `postprocess_masks`).
    """
    s = cfg.image_size
    x = resize_longest_side(image, s)
    h, w = x.shape[:2]
    mean = np.asarray(cfg.pixel_mean, np.float32)
    std = np.asarray(cfg.pixel_std, np.float32)
    out = np.zeros((s, s, 3), np.float32)
    out[:h, :w] = (x.astype(np.float32) - mean) / std
    return out, (h, w)


# ---- mask postprocessing ------------------------------------------------------------------------------
def _source_index_np(out_len: int, in_len: int, out_max: int) -> np.ndarray:
    """float32[out_max] source coordinates of torch's bilinear resize (align_corners=False), static sizes.

    ATen's CPU kernel takes scale = float32(in) / float32(out), evaluates scale * (i + 0.5) - 0.5 in
    **double**, rounds it to float32 and clamps at 0 (checked bit-exact against F.interpolate's weights).
    """
    scale = np.float32(in_len) / np.float32(out_len)
    src = np.float64(scale) * (np.arange(out_max) + 0.5) - 0.5
    return np.maximum(src, 0.0).astype(np.float32)


def _source_index_jnp(out_len: jax.Array, in_len: jax.Array, out_max: int) -> jax.Array:
    """Traced `_source_index_np` for int[n] sizes -> float32[n, out_max], without float64.

    With scale = M 2^E (M the 24-bit mantissa) and X = 2i + 1, the double value is exactly
    N 2^(E-1) with the integer N = M X - 2^-E. We build N in int32 as A 2^16 + B (M split into three 8-bit
    limbs, so every partial product is < 2^24), convert A and B exactly to float32 and add them: one IEEE
    addition rounds the exact N once (round-to-nearest-even), which is what the double -> float cast does.
    Scaling by 2^(E-1) is exact. Needs out_max < 2^15 (so X < 2^16) and 1 <= in_len <= 2^13.
    """
    if out_max >= 2**15:
        raise ValueError(f"postprocess canvas side {out_max} must be < 32768")
    scale = in_len.astype(jnp.float32) / out_len.astype(jnp.float32)  # [n]
    bits = jax.lax.bitcast_convert_type(scale, jnp.int32)
    mant = (bits & 0x7FFFFF) | 0x800000
    exp = ((bits >> 23) & 0xFF) - 127 - 23  # scale = mant * 2^exp
    x = 2 * jnp.arange(out_max, dtype=jnp.int32)[None, :] + 1  # [1, out_max]
    m2, m1, m0 = (mant >> 16)[:, None], ((mant >> 8) & 0xFF)[:, None], (mant & 0xFF)[:, None]
    p2, p1, p0 = m2 * x, m1 * x, m0 * x  # each < 2^24
    p1 = p1 + (p0 >> 8)
    hi = p2 + (p1 >> 8)  # mant * x = hi * 2^16 + lo, hi < 2^24
    lo = ((p1 & 0xFF) << 8) | (p0 & 0xFF)
    k = (-exp)[:, None]  # subtract 2^k (the 0.5) from the limb it belongs to
    hi = jnp.where(k >= 16, hi - (1 << jnp.clip(k - 16, 0, 30)), hi)
    lo = jnp.where(k >= 16, lo, lo - (1 << jnp.clip(k, 0, 30)))
    n_units = hi.astype(jnp.float32) * jnp.float32(65536.0) + lo.astype(jnp.float32)
    unit = jax.lax.bitcast_convert_type(((exp - 1 + 127) << 23).astype(jnp.int32), jnp.float32)[:, None]
    return jnp.maximum(n_units * unit, jnp.float32(0.0))


def _bilinear_taps(src, in_len, xp=jnp):
    """torch's two taps and weights for source coordinates `src` (float32[..., out]) into `in_len` samples:
    i0 = min(floor(src), in - 1), lambda = clamp(src - i0, 0, 1), i1 = i0 + (i0 < in - 1) (ATen's
    `guard_index_and_lambda`). Valid for up- and downsampling (no antialias). Returns (i0, i1, w0, w1)."""
    f32 = xp.float32
    in_last = xp.asarray(in_len).astype(xp.int32)[..., None] - 1
    i0 = xp.minimum(xp.floor(src).astype(xp.int32), in_last)
    lam = xp.clip(src - i0.astype(f32), f32(0.0), f32(1.0))
    i1 = i0 + (i0 < in_last).astype(xp.int32)
    return i0, i1, f32(1.0) - lam, lam


def _axis_weights(
    input_len: jax.Array, orig_len: jax.Array, out_max: int, low_len: int, image_size: int
) -> jax.Array:
    """Folded weights of one axis: float32[n, out_max, l] mapping low-res rows to output rows.

    Stage 1 (static): l -> S. Stage 2 (traced): the first `input_len` of those S rows -> `orig_len`.
    Rows >= orig_len are zero.
    """
    # Stage 1 tables over the S upsampled rows (static, numpy).
    u0, u1, v0, v1 = _bilinear_taps(_source_index_np(image_size, low_len, image_size), low_len, xp=np)
    u0, u1, v0, v1 = (jnp.asarray(a) for a in (u0, u1, v0, v1))
    # Stage 2 (traced sizes): output row -> two rows of the cropped upsampled map.
    input_len = jnp.clip(input_len, 1, image_size)
    src = _source_index_jnp(jnp.maximum(orig_len, 1), input_len, out_max)  # [n, out_max]
    j0, j1, m0, m1 = _bilinear_taps(src, input_len)
    weights = jnp.zeros((*j0.shape, low_len), jnp.float32)
    for j, m in ((j0, m0), (j1, m1)):
        for u, v in ((u0, v0), (u1, v1)):
            weights = weights + (m * v[j])[..., None] * jax.nn.one_hot(u[j], low_len, dtype=jnp.float32)
    valid = jnp.arange(out_max)[None, :] < orig_len[:, None]
    return jnp.where(valid[..., None], weights, 0.0)


def pixel_valid(extent_hw: jax.Array, canvas_hw: tuple[int, int]) -> jax.Array:
    """bool[..., Hc, Wc]: the canvas pixels inside each extent (H, W) of `extent_hw` int[..., 2]."""
    ys = jnp.arange(canvas_hw[0])
    xs = jnp.arange(canvas_hw[1])
    return (ys[:, None] < extent_hw[..., 0, None, None]) & (xs[None, :] < extent_hw[..., 1, None, None])


def postprocess_weights(
    input_hw: jax.Array, orig_hw: jax.Array, out_hw: tuple[int, int], low_len: int, image_size: int, n: int
) -> tuple[jax.Array, jax.Array]:
    """The folded per-axis weights of `postprocess_masks_padded`: masks = wh @ low_res @ ww^T.

    Args:
      input_hw, orig_hw: int[n, 2] (broadcastable) resized extent and output size of each mask.
      out_hw: static (Hmax, Wmax) canvas; low_len: l; image_size: S; n: number of masks.
    Returns:
      (wh float32[n, Hmax, l], ww float32[n, Wmax, l]), zero rows beyond each output size. Row bands of the
      canvas are `wh[:, y0:y1] @ low_res @ ww^T` (how evaluation scores large images in bounded memory).
    """
    input_hw = jnp.broadcast_to(jnp.asarray(input_hw, jnp.int32), (n, 2))
    orig_hw = jnp.broadcast_to(jnp.asarray(orig_hw, jnp.int32), (n, 2))
    hmax, wmax = out_hw
    wh = _axis_weights(input_hw[:, 0], orig_hw[:, 0], hmax, low_len, image_size)  # [n, Hmax, l]
    ww = _axis_weights(input_hw[:, 1], orig_hw[:, 1], wmax, low_len, image_size)  # [n, Wmax, l]
    return wh, ww


@functools.partial(jax.jit, static_argnames=("out_hw", "image_size"))
def postprocess_masks_padded(
    low_res: jax.Array, input_hw: jax.Array, orig_hw: jax.Array, out_hw: tuple[int, int], image_size: int
) -> jax.Array:
    """`Sam.postprocess_masks` for a batch of images of different sizes, with static output shapes.

    Args:
      low_res: float[n, M, l, l] mask logits from the decoder.
      input_hw: int[n, 2] resized extent (h, w) of each prompt's image inside the S x S input (traced ok).
      orig_hw: int[n, 2] original (H, W) of each prompt's image (traced ok), H <= Hmax, W <= Wmax.
      out_hw: (Hmax, Wmax) static canvas size.
      image_size: S.
    Returns:
      float32[n, M, Hmax, Wmax]: [..., :H, :W] equals torch's result; zero elsewhere. Differentiable in
      `low_res`. Jitted (one compile per canvas size and input shape; inlined inside an outer jit). Sizes
      out of range are not checked under jit (the caller's data pipeline owns them): H > Hmax crops, and h
      is clamped to [1, S].
    """
    if low_res.ndim != 4 or low_res.shape[-1] != low_res.shape[-2]:
        raise ValueError(f"low_res must be float[n, M, l, l], got {low_res.shape}")
    n, _, l, _ = low_res.shape
    wh, ww = postprocess_weights(input_hw, orig_hw, out_hw, l, image_size, n)
    x = low_res.astype(jnp.float32)
    # HIGHEST: the weights must not be rounded to bf16/TF32 by a GPU matmul pass.
    x = jnp.einsum("nmyx,nwx->nmyw", x, ww, precision=_HIGHEST)
    return jnp.einsum("nhy,nmyw->nmhw", wh, x, precision=_HIGHEST)


def postprocess_masks(
    low_res: jax.Array, input_size: Sequence[int], original_size: Sequence[int], image_size: int
) -> jax.Array:
    """`Sam.postprocess_masks` for one image size (Python ints: one compile per original size).

    Args:
      low_res: float[n, M, l, l] mask logits.
      input_size: (h, w) resized extent (the image inside the padded S x S input).
      original_size: (H, W).
      image_size: S.
    Returns:
      float32[n, M, H, W] mask logits at the original resolution (not cast back to bf16, as READ).
    """
    h, w = (int(v) for v in input_size)
    oh, ow = (int(v) for v in original_size)
    if not (0 < h <= image_size and 0 < w <= image_size):
        raise ValueError(f"input_size {(h, w)} must lie in [1, {image_size}]")
    if oh <= 0 or ow <= 0:
        raise ValueError(f"original_size must be positive, got {(oh, ow)}")
    n = low_res.shape[0]
    input_hw, orig_hw = np.full((n, 2), (h, w), np.int32), np.full((n, 2), (oh, ow), np.int32)
    return postprocess_masks_padded(low_res, input_hw, orig_hw, out_hw=(oh, ow), image_size=image_size)
