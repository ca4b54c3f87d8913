"""bf16 parity: the tolerance model shared by `tests/test_bf16_*.py`, and their error table.

Two bf16 evaluations of the same computation (read_jax and the torch reference, both in bf16 with the same
bf16 weights) differ because each rounds to bf16 at different places and accumulates in a different order.
Their difference is bounded from bf16's unit roundoff and the computation's depth:

  u = 2^-8 (8 significand bits); a computation whose longest path holds D sequential bf16-rounded stages
  (a matmul or elementwise op rounded to bf16, a norm, a softmax cast, a residual add) has a relative error
  of about lambda * sqrt(D) * u: independent roundings add like a random walk (Higham & Mary, "A new approach
  to probabilistic rounding error analysis", SISC 2019), lambda = 3 for a small failure probability. Two
  independent evaluations differ by at most sqrt(2) times that: `tolerance(D)` = 3 sqrt(2 D) u, applied to
  the normwise relative difference ||a - b|| / ||fp32 reference|| and to the largest element's
  (max |a - b| / max |fp32 reference|).

Each test states D per output (counted from the architecture in its docstring) and also requires read_jax's
bf16 result to be about as accurate as the reference's own bf16 result, both measured against the fp32
reference: err(read_jax bf16) <= 1.5 err(torch bf16) + u. A read_jax bf16 path that rounds more often, or
accumulates in bf16 where the reference uses fp32, fails that even when it passes the bound.

Run `pytest -s -k bf16` to print the error table (one line per output).
"""

from __future__ import annotations

import math

import numpy as np

U = 2.0**-8  # bf16 unit roundoff
LAMBDA = 3.0
ACCURACY_RATIO = 1.5


def tolerance(depth: int) -> float:
    """Bound on the relative difference of two independent bf16 evaluations of depth `depth`."""
    return LAMBDA * math.sqrt(2 * depth) * U


def _f64(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, np.float64).ravel()


def check(name: str, got16, ref16, ref32, depth: int, *, accuracy: bool = True) -> dict:
    """Assert the bf16 parity of one output and print its line of the error table.

    got16: read_jax in bf16; ref16: the torch reference in bf16; ref32: the torch reference in fp32 (same
    weights, rounded to bf16 for the bf16 runs). accuracy=False skips the accuracy-ratio assertion for an
    output too small to average its rounding errors (one SAM mask: a handful of roundings of its few
    tokens dominate, and the ratio of two such draws varies by 3x either way). Returns the figures.
    """
    a, b, t = _f64(got16), _f64(ref16), _f64(ref32)
    assert a.shape == b.shape == t.shape, (name, a.shape, b.shape, t.shape)
    assert np.isfinite(a).all(), f"{name}: non-finite bf16 output"
    norm, peak = np.linalg.norm(t), np.abs(t).max()
    fig = {
        "max_abs": float(np.abs(a - b).max()),
        "max_rel": float(np.abs(a - b).max() / peak),
        "norm_rel": float(np.linalg.norm(a - b) / norm),
        "jax_vs_fp32": float(np.linalg.norm(a - t) / norm),
        "torch_vs_fp32": float(np.linalg.norm(b - t) / norm),
        "tol": tolerance(depth),
        "depth": depth,
    }
    f = fig
    print(
        f"bf16 parity | {name:28s} | D={depth:3d} | max abs {f['max_abs']:.3g} | max rel {f['max_rel']:.2e}"
        f" | norm rel {f['norm_rel']:.2e} | tol {f['tol']:.2e} | vs fp32: read_jax {f['jax_vs_fp32']:.2e}"
        f" torch {f['torch_vs_fp32']:.2e}"
    )
    assert fig["norm_rel"] <= fig["tol"], (
        f"{name}: normwise difference {fig['norm_rel']:.3g} > {fig['tol']:.3g}"
    )
    assert fig["max_rel"] <= fig["tol"], f"{name}: largest difference {fig['max_rel']:.3g} > {fig['tol']:.3g}"
    assert not accuracy or fig["jax_vs_fp32"] <= ACCURACY_RATIO * fig["torch_vs_fp32"] + U, (
        f"{name}: read_jax bf16 is {fig['jax_vs_fp32']:.3g} from fp32, the reference's bf16 "
        f"{fig['torch_vs_fp32']:.3g}"
    )
    return fig


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)
