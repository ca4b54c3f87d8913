"""SAM's two-way transformer (tokens <-> image cross-attention), in NNX.

PyTorch reference: segment-anything 1.0 (PyPI, 2023-04), `segment_anything/modeling/transformer.py`
(`TwoWayTransformer`, `TwoWayAttentionBlock`, `Attention`). Parameter names mirror Meta's state-dict keys
(`transformer.layers.0.cross_attn_token_to_image.q_proj.weight` ->
`transformer/layers/0/cross_attn_token_to_image/q_proj/kernel`).

Every block: (1) token self-attention, (2) tokens -> image cross-attention, (3) token MLP (ReLU), (4) image
-> tokens cross-attention; each followed by a residual add and a LayerNorm (torch default eps 1e-5). The
first block skips the positional encoding in its self-attention and *replaces* the queries instead of adding
a residual.
Cross-attentions project to C / attention_downsample_rate channels.

Shape letters:
  n: prompts   T: tokens (5 output tokens + sparse prompts)   L: image tokens (h * w = 4096)
  C: prompt_embed_dim (256)   N: heads (8)   K: channels per head (C / rate / N)
"""

from __future__ import annotations

import jax
from flax import nnx

from read_jax.config import SamConfig
from read_jax.layers import dot_product_attention
from read_jax.sam.common import TORCH_LAYER_NORM_EPS, MLPBlock, layer_norm, linear


class Attention(nnx.Module):
    """Multi-head attention whose projections may downscale the channels (`transformer.Attention`).

    Params: q_proj, k_proj, v_proj [C, C / rate] (+bias), out_proj [C / rate, C] (+bias).
    """

    def __init__(self, cfg: SamConfig, downsample_rate: int = 1, *, rngs: nnx.Rngs):
        c = cfg.prompt_embed_dim
        self.internal_dim = c // downsample_rate
        self.num_heads = cfg.transformer_num_heads
        if self.internal_dim % self.num_heads:
            raise ValueError(
                f"transformer_num_heads {self.num_heads} must divide {self.internal_dim} "
                f"(prompt_embed_dim / downsample rate)"
            )
        self.compute_dtype = cfg.compute_dtype
        self.q_proj = linear(c, self.internal_dim, cfg, rngs=rngs)
        self.k_proj = linear(c, self.internal_dim, cfg, rngs=rngs)
        self.v_proj = linear(c, self.internal_dim, cfg, rngs=rngs)
        self.out_proj = linear(self.internal_dim, c, cfg, rngs=rngs)
        self.attention_implementation: str | None = None  # `layers.set_attention_implementation`

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """q: float[n, Q, C]; k, v: float[n, S, C] -> float[n, Q, C]."""
        n_heads = self.num_heads
        head = self.internal_dim // n_heads
        q = self.q_proj(q).reshape(*q.shape[:2], n_heads, head)
        k = self.k_proj(k).reshape(*k.shape[:2], n_heads, head)
        v = self.v_proj(v).reshape(*v.shape[:2], n_heads, head)
        # Meta scales the logits (not the query) by 1 / sqrt(K), as the attention core does.
        out = dot_product_attention(q, k, v, implementation=self.attention_implementation)  # [n, Q, h, K]
        return self.out_proj(out.reshape(*out.shape[:2], self.internal_dim))


class TwoWayAttentionBlock(nnx.Module):
    """Self-attn, tokens->image, MLP, image->tokens, each + residual + LayerNorm (`TwoWayAttentionBlock`)."""

    def __init__(self, cfg: SamConfig, skip_first_layer_pe: bool, *, rngs: nnx.Rngs):
        c, rate = cfg.prompt_embed_dim, cfg.attention_downsample_rate
        self.self_attn = Attention(cfg, rngs=rngs)
        self.norm1 = layer_norm(c, TORCH_LAYER_NORM_EPS, cfg, rngs=rngs)
        self.cross_attn_token_to_image = Attention(cfg, rate, rngs=rngs)
        self.norm2 = layer_norm(c, TORCH_LAYER_NORM_EPS, cfg, rngs=rngs)
        self.mlp = MLPBlock(c, cfg.transformer_mlp_dim, jax.nn.relu, cfg, rngs=rngs)
        self.norm3 = layer_norm(c, TORCH_LAYER_NORM_EPS, cfg, rngs=rngs)
        self.norm4 = layer_norm(c, TORCH_LAYER_NORM_EPS, cfg, rngs=rngs)
        self.cross_attn_image_to_token = Attention(cfg, rate, rngs=rngs)
        self.skip_first_layer_pe = skip_first_layer_pe

    def __call__(
        self, queries: jax.Array, keys: jax.Array, query_pe: jax.Array, key_pe: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """queries/query_pe: float[n, T, C]; keys/key_pe: float[n, L, C] -> (queries, keys), same shapes."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))

        queries = self.norm3(queries + self.mlp(queries))

        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nnx.Module):
    """`TwoWayTransformer`: `transformer_depth` blocks, then a final tokens->image attention + LayerNorm."""

    def __init__(self, cfg: SamConfig, *, rngs: nnx.Rngs):
        c = cfg.prompt_embed_dim
        self.layers = nnx.List(
            [
                TwoWayAttentionBlock(cfg, skip_first_layer_pe=(i == 0), rngs=rngs)
                for i in range(cfg.transformer_depth)
            ]
        )
        self.final_attn_token_to_image = Attention(cfg, cfg.attention_downsample_rate, rngs=rngs)
        self.norm_final_attn = layer_norm(c, TORCH_LAYER_NORM_EPS, cfg, rngs=rngs)

    def __call__(
        self, image_embedding: jax.Array, image_pe: jax.Array, point_embedding: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """Run the two-way transformer.

        Args:
          image_embedding: float[n, h, w, C] (NHWC; Meta: [n, C, h, w]).
          image_pe: float[n, h, w, C] positional encoding of the image tokens.
          point_embedding: float[n, T, C] output + prompt tokens (also their positional encoding).
        Returns:
          (queries float[n, T, C], keys float[n, L = h*w, C]).
        """
        n, h, w, c = image_embedding.shape
        keys = image_embedding.reshape(n, h * w, c)
        key_pe = image_pe.reshape(n, h * w, c)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        q, k = queries + point_embedding, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys
