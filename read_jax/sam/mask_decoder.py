"""SAM's mask decoder (the part READ fine-tunes), in NNX.

PyTorch reference: segment-anything 1.0 (PyPI, 2023-04), `segment_anything/modeling/mask_decoder.py`
(`MaskDecoder`, `MLP`); READ's copy (`model/segment_anything/modeling/mask_decoder.py:107-116`) is the same
module, and READ calls it with `multimask_output=False`, i.e. **mask 0** (read_reference.md §2.7, §3.5).

Tokens = [iou token (1), mask tokens (M' = num_multimask_outputs + 1), sparse prompts]. The image embedding
(+ the dense prompt) and the tokens go through the two-way transformer; the image side is upscaled 4x by two
stride-2 transposed convs (with LayerNorm2d and exact GELU), each mask token goes through its own
hypernetwork MLP to C/8 weights, and mask m = <hyper_m, upscaled pixel>. The IoU token predicts mask quality.

Layout: image-side tensors are NHWC ([n, h, w, C]); the returned masks keep Meta's [n, M, 4h, 4w].

Shape letters:
  B: image embeddings (1 or n)   n: prompts   Ns: sparse prompt tokens   T: 1 + M' + Ns tokens
  C: prompt_embed_dim (256)      h, w: embedding grid (64)   M': mask tokens (4)   M: masks returned (3 or 1)
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from read_jax.config import SamConfig
from read_jax.layers import gelu_exact
from read_jax.sam.common import LAYER_NORM_2D_EPS, embedding, layer_norm, linear
from read_jax.sam.transformer import TwoWayTransformer


class MLP(nnx.Module):
    """`mask_decoder.MLP`: `num_layers` Linear layers with ReLU between them (no sigmoid in SAM v1)."""

    def __init__(self, din: int, hidden: int, dout: int, num_layers: int, cfg: SamConfig, *, rngs: nnx.Rngs):
        dims = [din] + [hidden] * (num_layers - 1) + [dout]
        self.layers = nnx.List([linear(a, b, cfg, rngs=rngs) for a, b in itertools.pairwise(dims)])

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: float[..., din] -> float[..., dout]."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = jax.nn.relu(x)
        return x


class MaskDecoder(nnx.Module):
    """Predicts mask logits and IoU scores from image and prompt embeddings.

    Params: transformer/..., iou_token (Embed [1, C]), mask_tokens (Embed [M', C]),
    output_upscaling/{0 (ConvT C -> C/4, 2x2 stride 2), 1 (LayerNorm2d), 3 (ConvT C/4 -> C/8)},
    output_hypernetworks_mlps/{0..M'-1}/layers/{0,1,2}, iou_prediction_head/layers/{0..iou_head_depth-1}.
    """

    def __init__(self, cfg: SamConfig, *, rngs: nnx.Rngs):
        c = cfg.prompt_embed_dim
        self.cfg = cfg
        self.num_mask_tokens = cfg.num_multimask_outputs + 1
        self.transformer = TwoWayTransformer(cfg, rngs=rngs)
        self.iou_token = embedding(1, c, cfg, rngs=rngs)
        self.mask_tokens = embedding(self.num_mask_tokens, c, cfg, rngs=rngs)
        convt = {
            "kernel_size": (2, 2),
            "strides": (2, 2),
            "padding": "VALID",
            "dtype": cfg.compute_dtype,
            "param_dtype": cfg.weight_dtype,
            "rngs": rngs,
        }
        # Index-for-index Meta's nn.Sequential (2 and 4 are parameter-free GELUs).
        self.output_upscaling = nnx.List(
            [
                nnx.ConvTranspose(c, c // 4, **convt),
                layer_norm(c // 4, LAYER_NORM_2D_EPS, cfg, rngs=rngs),
                None,
                nnx.ConvTranspose(c // 4, c // 8, **convt),
                None,
            ]
        )
        self.output_hypernetworks_mlps = nnx.List(
            [MLP(c, c, c // 8, 3, cfg, rngs=rngs) for _ in range(self.num_mask_tokens)]
        )
        self.iou_prediction_head = MLP(
            c, cfg.iou_head_hidden_dim, self.num_mask_tokens, cfg.iou_head_depth, cfg, rngs=rngs
        )

    def __call__(
        self,
        image_embeddings: jax.Array,
        image_pe: jax.Array,
        sparse_prompt_embeddings: jax.Array,
        dense_prompt_embeddings: jax.Array,
        multimask_output: bool,
    ) -> tuple[jax.Array, jax.Array]:
        """Decode masks for n prompts.

        Args:
          image_embeddings: float[B, h, w, C] with B == 1 (one image, broadcast to every prompt, as Meta's
            repeat_interleave does) or B == n (one image embedding per prompt).
          image_pe: float[h, w, C] (`PromptEncoder.get_dense_pe()`).
          sparse_prompt_embeddings: float[n, Ns, C].
          dense_prompt_embeddings: float[n or 1, h, w, C].
          multimask_output: True -> the 3 disambiguation masks (tokens 1..3); False -> mask 0 only (READ).
        Returns:
          masks: float[n, M, 4h, 4w] low-resolution mask logits; iou_pred: float[n, M].
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sl], iou_pred[:, sl]

    def predict_masks(
        self, image_embeddings: jax.Array, image_pe: jax.Array, sparse: jax.Array, dense: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """All M' masks and IoU scores: (float[n, M', 4h, 4w], float[n, M']). Arguments as `__call__`."""
        dt = self.cfg.compute_dtype
        n, _, c = sparse.shape
        emb_shape = image_embeddings.shape
        if len(emb_shape) != 4 or emb_shape[0] not in (1, n) or emb_shape[-1] != c:
            raise ValueError(
                f"image_embeddings must be float[1 or {n}, h, w, {c}] (NHWC), got {image_embeddings.shape}"
            )
        hwc = image_embeddings.shape[1:]
        if image_pe.shape != hwc:
            raise ValueError(f"image_pe must be float{list(hwc)}, got {image_pe.shape}")
        if dense.ndim != 4 or dense.shape[0] not in (1, n) or dense.shape[1:] != hwc:
            raise ValueError(
                f"dense_prompt_embeddings must be float[{n}, {', '.join(map(str, hwc))}], got {dense.shape}"
            )
        h, w, _ = hwc

        output_tokens = jnp.concatenate([self.iou_token.embedding[...], self.mask_tokens.embedding[...]])
        output_tokens = jnp.broadcast_to(output_tokens.astype(dt), (n, *output_tokens.shape))
        tokens = jnp.concatenate([output_tokens, sparse.astype(dt)], axis=1)  # [n, T, C]

        # Per-prompt copies of the image side (Meta: repeat_interleave), plus the dense prompt.
        src = jnp.broadcast_to(image_embeddings.astype(dt), (n, h, w, c)) + dense.astype(dt)
        pos_src = jnp.broadcast_to(image_pe.astype(dt), (n, h, w, c))
        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        x = src.reshape(n, h, w, c)
        for layer in self.output_upscaling:
            x = gelu_exact(x) if layer is None else layer(x)  # -> [n, 4h, 4w, C/8]
        # One hypernetwork MLP per mask token: [n, M', C/8].
        hyper_in = jnp.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], axis=1
        )
        masks = jnp.einsum("nmc,nyxc->nmyx", hyper_in, x)
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred
