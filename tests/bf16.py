"""bf16 parity: the assertion of `tests/test_bf16_*.py` on one output of a `torchref.bf16` run.

The runs, the tolerance model (`torchref.bf16.tolerance`: 3 sqrt(2 D) u for two bf16 evaluations of depth D)
and the error figures live in `torchref.bf16`, shared with `benchmarks/bf16.py`, which prints the error table
(README, "bf16 numerics"). `pytest -s -k bf16` prints the same lines as the tests run.
"""

from __future__ import annotations

from torchref.bf16 import ACCURACY_RATIO, Output, U, figures


def check(o: Output) -> dict:
    """Assert the bf16 parity of one output (finite; normwise and largest-element difference within the
    bound of its depth; read_jax's bf16 about as accurate as the reference's, unless `o.accuracy` is False)
    and print its line of the error table. Returns the figures."""
    f = figures(o)
    print(
        f"bf16 parity | {o.name:28s} | D={o.depth:3d} | max abs {f['max_abs']:.3g}"
        f" | max rel {f['max_rel']:.2e} | norm rel {f['norm_rel']:.2e} | tol {f['tol']:.2e}"
        f" | vs fp32: read_jax {f['jax_vs_fp32']:.2e}"
        f" torch {f['torch_vs_fp32']:.2e}"
    )
    assert f["finite"], f"{o.name}: non-finite bf16 output"
    assert f["norm_rel"] <= f["tol"], f"{o.name}: normwise difference {f['norm_rel']:.3g} > {f['tol']:.3g}"
    assert f["max_rel"] <= f["tol"], f"{o.name}: largest difference {f['max_rel']:.3g} > {f['tol']:.3g}"
    assert not o.accuracy or f["jax_vs_fp32"] <= ACCURACY_RATIO * f["torch_vs_fp32"] + U, (
        f"{o.name}: read_jax bf16 is {f['jax_vs_fp32']:.3g} from fp32, the reference's bf16 "
        f"{f['torch_vs_fp32']:.3g}"
    )
    return f
