"""Pieces shared by SAM's image encoder, prompt encoder, mask decoder and two-way transformer, in NNX.

PyTorch reference: segment-anything 1.0 (PyPI, 2023-04), `segment_anything/modeling/common.py` (`MLPBlock`,
`LayerNorm2d`) and the `nn.Linear` / `nn.LayerNorm` / `nn.Embedding` layers of the other modules. The exact
(erf) GELU SAM uses everywhere is `read_jax.layers.gelu_exact`.
"""

from __future__ import annotations

import jax
from flax import nnx

from read_jax.config import SamConfig

# Meta's LayerNorm2d hard-codes eps=1e-6 (common.py); the encoder's own LayerNorms take it from the config.
LAYER_NORM_2D_EPS = 1e-6
# The two-way transformer's nn.LayerNorm(embedding_dim) use torch's default eps (not in the config: Meta
# hard-codes it).
TORCH_LAYER_NORM_EPS = 1e-5


def layer_norm(num_features: int, eps: float, cfg: SamConfig, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """torch-equivalent LayerNorm over the last axis.

    `use_fast_variance=False`: torch computes mean((x - mean)^2), flax's default E[x^2] - E[x]^2 loses ~1e-4
    when |mean| >> std, which the parity tests would see.
    """
    return nnx.LayerNorm(
        num_features,
        epsilon=eps,
        use_fast_variance=False,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.weight_dtype,
        rngs=rngs,
    )


def linear(din: int, dout: int, cfg: SamConfig, *, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
    return nnx.Linear(
        din, dout, use_bias=use_bias, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs
    )


def embedding(num: int, dim: int, cfg: SamConfig, *, rngs: nnx.Rngs) -> nnx.Embed:
    """torch nn.Embedding(num, dim), N(0, 1) init (the checkpoint overwrites it): `embedding` [num, dim]."""
    return nnx.Embed(
        num,
        dim,
        embedding_init=jax.nn.initializers.normal(1.0),
        dtype=cfg.compute_dtype,
        param_dtype=cfg.weight_dtype,
        rngs=rngs,
    )


class MLPBlock(nnx.Module):
    """`common.MLPBlock`: lin1 -> act -> lin2 (GELU in the encoder, ReLU in the two-way transformer)."""

    def __init__(self, dim: int, mlp_dim: int, act, cfg: SamConfig, *, rngs: nnx.Rngs):
        self.lin1 = linear(dim, mlp_dim, cfg, rngs=rngs)
        self.lin2 = linear(mlp_dim, dim, cfg, rngs=rngs)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: float[..., dim] -> float[..., dim]."""
        return self.lin2(self.act(self.lin1(x)))
