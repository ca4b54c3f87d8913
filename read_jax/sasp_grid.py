"""The reference's grid arithmetic, bit-exact under `jit`: torch's bilinear resize of a similarity map
(ATen's taps and summation order) and the integer centre-crop padding READ computes in CPython doubles from
an image's (H, W). `read_jax.sasp` builds SasP and DtoC on these; they live apart because their exactness
rests on reproducing another runtime's rounding, each proven by `tests/test_sasp.py` against torch or
CPython on every size the reference can produce.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Largest short image side for which the double-rounding tables are built (64 KiB of int32 per grid side).
MAX_SHORT_SIDE = 16384
# Largest long side: keeps every int32 product in `scaled_side` below 2**31 for grid sides up to 336.
MAX_LONG_SIDE = 1 << 20


def torch_linear_taps(in_size: int, out_size: int):
    """Static taps of torch's 1-D bilinear resize (align_corners=False, no antialias), float32 as on CPU.

    Returns (i0, i1, l0, l1): out[o] = x[i0[o]] * l0[o] + x[i1[o]] * l1[o]. Mirrors ATen's
    `area_pixel_compute_source_index` + `guard_index_and_lambda`, including the clamp at src < 0.
    """
    dst = np.arange(out_size)
    if in_size == out_size:  # ATen copies (scale 1) without computing source indices
        return dst, dst, np.ones(out_size, np.float32), np.zeros(out_size, np.float32)
    scale = np.float32(in_size) / np.float32(out_size)
    src = scale * (dst.astype(np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    l1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    i1 = i0 + (i0 < in_size - 1)
    return i0, i1, (np.float32(1) - l1).astype(np.float32), l1


@functools.cache
def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Dense [out, in] float32 matrix of `torch_linear_taps` (two non-zeros per row)."""
    i0, i1, l0, l1 = torch_linear_taps(in_size, out_size)
    a = np.zeros((out_size, in_size), np.float32)
    np.add.at(a, (np.arange(out_size), i0), l0)
    np.add.at(a, (np.arange(out_size), i1), l1)
    return a


def resize_grid(x: jax.Array, d: int) -> jax.Array:
    """torch `F.interpolate(x, (d, d), mode='bilinear')` of float[N, g, g] maps, in ATen's op order.

    ATen's CPU kernel forms the four weight products and sums left to right:
    ((x00*(h0*w0) + x01*(h0*w1)) + x10*(h1*w0)) + x11*(h1*w1). With that order every grid side the
    reference can produce (d = 24 // down_sample: 12 is an exact 2x2 mean, 24 a copy, 8 and 6 too) is
    bit-identical to torch, which the exact thresholds and orderings downstream rely on.
    """
    g = x.shape[-1]
    if d == g:
        return x
    i0, i1, l0, l1 = torch_linear_taps(g, d)
    h0, h1, w0, w1 = l0[:, None], l1[:, None], l0[None, :], l1[None, :]
    r0, r1 = x[:, i0, :], x[:, i1, :]  # [N, d, g]
    return ((r0[..., i0] * (h0 * w0) + r0[..., i1] * (h0 * w1)) + r1[..., i0] * (h1 * w0)) + r1[..., i1] * (
        h1 * w1
    )


# ----------------------------------------------------------------------------------------------------
# Geometry: the reference's integer centre-crop padding, with traced (H, W)
# ----------------------------------------------------------------------------------------------------


@functools.cache
def _double_division_table(d: int) -> tuple[np.ndarray, np.ndarray]:
    """Per short side m: how CPython's double q = d / m misses d/m, for `scaled_side`.

    With q = Q * 2**-E (Q a 53-bit integer, 2**e <= q < 2**(e+1), E = 52 - e), r = Q*m - d*2**E is the
    (exact, small) numerator of q - d/m = r / (m 2**E). Returns (max(-r, 0), e) as int32[MAX_SHORT_SIDE+1].
    """
    neg_r = np.zeros(MAX_SHORT_SIDE + 1, np.int32)
    exp = np.zeros(MAX_SHORT_SIDE + 1, np.int32)
    for m in range(1, MAX_SHORT_SIDE + 1):
        mant, ex = math.frexp(d / m)
        big_q, big_e = int(mant * (1 << 53)), 53 - ex
        neg_r[m] = max(d * (1 << big_e) - big_q * m, 0)
        exp[m] = ex - 1
    return neg_r, exp


def scaled_side(side: jax.Array, short: jax.Array, d: int) -> jax.Array:
    """`int(side * (d / short))` exactly as CPython evaluates it in IEEE double; int32 in, int32 out.

    Let k = side*d/short. If it is not an integer the double result floors correctly (the rounding error,
    ~side*2**-52, is far below the 1/short gap to the next integer). If it is, fl(side*q) = k + delta with
    delta = k*r / (d*2**E) (table above); the result truncates to k-1 iff delta < 0 and |delta| exceeds
    half an ulp below k: 2**(j-53) with j = floor(log2 k), or 2**(j-54) if k is a power of two (k itself
    is an even double, so exact ties round to k). With t = j - 1 - e (- 1 for powers of two) this is
    k*|r| > d * 2**t, which is evaluated on int32 with both sides shifted to non-negative exponents.
    """
    neg_r_np, exp_np = _double_division_table(d)
    m = jnp.clip(short, 1, MAX_SHORT_SIDE)
    num = side * d
    k = num // short
    exact = (num % short) == 0
    a = jnp.asarray(neg_r_np)[m]
    e = jnp.asarray(exp_np)[m]
    j = 31 - lax.clz(jnp.maximum(k, 1))
    pow2 = (k & (k - 1)) == 0
    t = j - 1 - e - pow2.astype(jnp.int32)
    lhs = (k * a) << jnp.maximum(-t, 0)
    rhs = jnp.int32(d) << jnp.maximum(t, 0)
    down = exact & (a > 0) & (lhs > rhs) & (short <= MAX_SHORT_SIDE)
    return k - down.astype(jnp.int32)


def crop_padding(hw: jax.Array, d: int) -> tuple[jax.Array, jax.Array]:
    """The reference's padding of a d x d map back to the original aspect ratio.

    s = d / min(H, W); nh, nw = int(H*s), int(W*s); ph, pw = (nh-d)//2, (nw-d)//2 (python floor division;
    -1 when the double rounding gives nh = d-1, and F.pad then crops one row/col on each side).

    Args:
      hw: int[N, 2] original (H, W).
      d: static map side (the SasP grid side, or 336 for DtoC's frame).
    Returns:
      (ph, pw), int32[N] each; the padded map is (d + 2ph) x (d + 2pw).
    """
    hw = hw.astype(jnp.int32)
    h, w = hw[:, 0], hw[:, 1]
    short = jnp.minimum(h, w)
    ph = (scaled_side(h, short, d) - d) // 2
    pw = (scaled_side(w, short, d) - d) // 2
    return ph, pw
