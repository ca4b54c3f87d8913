"""SAM's prompt encoder with READ's text-token variant, in NNX.

PyTorch reference: segment-anything 1.0 (PyPI, 2023-04), `segment_anything/modeling/prompt_encoder.py`
(`PromptEncoder`, `PositionEmbeddingRandom`), plus READ's
`model/segment_anything/modeling/prompt_encoder.py:140-187` (read_reference.md §2.7, §3.5), which appends
`text_embeds` (the projected [SEG] vector) as the last sparse tokens:
**[points (+ one padding point when there are no boxes), boxes, text embeddings]**.

Everything has fixed shapes: points are a dense [n, Np, 2] tensor with labels [n, Np], never a list.
Labels follow SAM: 1 foreground, 0 background, -1 "not a point" (its PE is zeroed and `not_a_point_embed`
added; this is also the label of the padding point). Any other label value gets the PE alone, as in Meta.

Coordinates are pixels in the SAM input frame (the longest-side-S resized image, before the +0.5 pixel-centre
shift that happens here). Coordinates outside [0, S) are legal and give a finite (extrapolated) random-Fourier
encoding, as in Meta; nothing here can produce NaN for finite input. Points stay differentiable w.r.t. their
coordinates (READ's DtoC sends gradients through them).

Layout: NHWC. Meta's dense embeddings are [n, C, h, w] and `get_dense_pe()` is [1, C, h, w]; ours are
[n, h, w, C] and [h, w, C].

Shape letters:
  n: prompts (one per [SEG] / mask)   Np: points per prompt    Nb: boxes per prompt   T: text tokens
  C: prompt_embed_dim (256)           h, w: image-embedding grid (64)   S: SAM input side (1024)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from read_jax.config import SamConfig
from read_jax.layers import gelu_exact
from read_jax.sam.common import LAYER_NORM_2D_EPS, embedding, layer_norm


class Buffer(nnx.Variable):
    """A stored, never-trained tensor (torch `register_buffer`, persistent): not an `nnx.Param`, so optimisers
    and `nnx.Param` filters leave it alone, but it is part of the state and of the checkpoint."""


class PositionEmbeddingRandom(nnx.Module):
    """Random-Fourier positional encoding: [sin(2pi (2c - 1) G), cos(...)] with G a fixed Gaussian [2, F].

    The matrix is stored in float32 (Meta's checkpoint dtype). The encoding is computed in `pe_dtype`
    (`SamConfig.pe_dtype`, default the compute dtype) the way the release computes it in that dtype: READ's
    copy of SAM (`model/segment_anything/modeling/prompt_encoder.py`, `_pe_encoding` and `forward`) casts
    the normalised coordinates 2c - 1 to the Gaussian matrix's dtype (bf16 in the released models) before
    the K=2 matmul, and builds the image grid in that dtype too; the products, 2 pi * x and sin / cos then
    round to it. In fp32 every step is exact fp32 (Meta's SAM). In bf16 the point PE moves by RMS ~0.01,
    max ~0.1 from the fp32 one (the phases reach tens of radians): `tests/test_protocol_prompt_encoder.py`
    measures it and checks the bf16 path against Meta's SAM with READ's casts, run in bf16.
    """

    def __init__(self, num_pos_feats: int, cfg: SamConfig, *, rngs: nnx.Rngs, scale: float = 1.0):
        self.compute_dtype = cfg.compute_dtype
        self.pe_dtype = jnp.dtype(cfg.pe_dtype) if cfg.pe_dtype else cfg.compute_dtype
        self.positional_encoding_gaussian_matrix = Buffer(
            scale * jax.random.normal(rngs.params(), (2, num_pos_feats), jnp.float32)
        )

    def _round(self, x: jax.Array) -> jax.Array:
        """x rounded to `pe_dtype` and back to float32 (the identity in fp32)."""
        return x.astype(self.pe_dtype).astype(jnp.float32)

    def _pe_encoding(self, coords: jax.Array) -> jax.Array:
        """coords: float[..., 2] (x, y) normalised to [0, 1] -> float[..., 2F] in `pe_dtype`."""
        f32 = jnp.float32
        g = self._round(self.positional_encoding_gaussian_matrix[...].astype(f32))
        c = self._round(2.0 * coords.astype(f32) - 1.0)
        # A K=2 contraction written out: products of `pe_dtype` values are exact in fp32, one fp32 sum, one
        # rounding (a bf16 GEMM with fp32 accumulation; exact fp32 on every backend, no TF32 passes).
        c = self._round(c[..., 0:1] * g[0] + c[..., 1:2] * g[1])
        c = self._round(c * f32(2.0 * math.pi))
        return jnp.concatenate([jnp.sin(c), jnp.cos(c)], axis=-1).astype(self.pe_dtype)

    def __call__(self, size: tuple[int, int]) -> jax.Array:
        """Encoding of the centres of an (h, w) grid: float[h, w, 2F] (Meta: [2F, h, w]).

        The centres are (cumsum of ones - 0.5) / size, each step rounded to `pe_dtype` as the release does.
        """
        h, w = size
        y = self._round(self._round(jnp.arange(1, h + 1, dtype=jnp.float32) - 0.5) / h)
        x = self._round(self._round(jnp.arange(1, w + 1, dtype=jnp.float32) - 0.5) / w)
        xy = jnp.stack(jnp.broadcast_arrays(x[None, :], y[:, None]), axis=-1)
        return self._pe_encoding(xy).astype(self.compute_dtype)

    def forward_with_coords(self, coords: jax.Array, image_size: tuple[int, int]) -> jax.Array:
        """coords: float[..., 2] (x, y) in pixels of an image of `image_size` = (H, W) -> float[..., 2F].

        The division is fp32 (the release's point coordinates are fp32); `_pe_encoding` casts after it."""
        h, w = image_size
        # Divide rather than multiply by the reciprocal, as Meta does (bit-identical normalised coords).
        coords = coords.astype(jnp.float32) / jnp.asarray([w, h], jnp.float32)
        return self._pe_encoding(coords)


class PromptEncoder(nnx.Module):
    """Encodes points, boxes, masks and READ's text tokens into sparse and dense prompt embeddings.

    Params: pe_layer/positional_encoding_gaussian_matrix [2, C/2] (Buffer), point_embeddings/{0..3}
    (0 negative point, 1 positive point, 2/3 box corners), not_a_point_embed, no_mask_embed (each Embed
    [1, C]), mask_downscaling/{0,1,3,4,6} (conv 2x2/2, LayerNorm2d, GELU, conv 2x2/2, LayerNorm2d, GELU,
    conv 1x1).
    """

    num_point_embeddings = 4

    def __init__(self, cfg: SamConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        c, mic = cfg.prompt_embed_dim, cfg.mask_in_chans
        g = cfg.image_embedding_size
        self.embed_dim = c
        self.image_embedding_size = (g, g)
        self.input_image_size = (cfg.image_size, cfg.image_size)
        self.mask_input_size = (4 * g, 4 * g)
        self.pe_layer = PositionEmbeddingRandom(c // 2, cfg, rngs=rngs)
        self.point_embeddings = nnx.List(
            [embedding(1, c, cfg, rngs=rngs) for _ in range(self.num_point_embeddings)]
        )
        self.not_a_point_embed = embedding(1, c, cfg, rngs=rngs)
        conv = {"dtype": cfg.compute_dtype, "param_dtype": cfg.weight_dtype, "padding": "VALID", "rngs": rngs}
        # Index-for-index Meta's nn.Sequential (the activations, 2 and 5, hold no parameters).
        self.mask_downscaling = nnx.List(
            [
                nnx.Conv(1, mic // 4, kernel_size=(2, 2), strides=(2, 2), **conv),
                layer_norm(mic // 4, LAYER_NORM_2D_EPS, cfg, rngs=rngs),
                None,
                nnx.Conv(mic // 4, mic, kernel_size=(2, 2), strides=(2, 2), **conv),
                layer_norm(mic, LAYER_NORM_2D_EPS, cfg, rngs=rngs),
                None,
                nnx.Conv(mic, c, kernel_size=(1, 1), **conv),
            ]
        )
        self.no_mask_embed = embedding(1, c, cfg, rngs=rngs)

    # ---- pieces ---------------------------------------------------------------------------------------
    def get_dense_pe(self) -> jax.Array:
        """Positional encoding of the image-embedding grid: float[h, w, C] (Meta: [1, C, h, w])."""
        return self.pe_layer(self.image_embedding_size)

    def _weight(self, embed: nnx.Embed) -> jax.Array:
        return embed.embedding[...][0].astype(self.cfg.compute_dtype)  # [C]

    def _embed_points(self, points: jax.Array, labels: jax.Array, pad: bool) -> jax.Array:
        """points float[n, Np, 2], labels int[n, Np] -> float[n, Np (+1 if pad), C]."""
        points = points + 0.5  # pixel centre
        if pad:
            n = points.shape[0]
            points = jnp.concatenate([points, jnp.zeros((n, 1, 2), points.dtype)], axis=1)
            labels = jnp.concatenate([labels, jnp.full((n, 1), -1, labels.dtype)], axis=1)
        pe = self.pe_layer.forward_with_coords(points, self.input_image_size).astype(self.cfg.compute_dtype)
        lab = labels[..., None]
        zero = jnp.zeros((), pe.dtype)
        # Masked selects instead of Meta's in-place boolean indexing: static shapes, and the coordinate
        # gradient of a real point is untouched (a -1 point's PE is replaced, so its gradient is zero).
        pe = jnp.where(lab == -1, zero, pe)
        pe = pe + jnp.where(lab == -1, self._weight(self.not_a_point_embed), zero)
        pe = pe + jnp.where(lab == 0, self._weight(self.point_embeddings[0]), zero)
        pe = pe + jnp.where(lab == 1, self._weight(self.point_embeddings[1]), zero)
        return pe

    def _embed_boxes(self, boxes: jax.Array) -> jax.Array:
        """boxes float[n, Nb, 4] (x0, y0, x1, y1) -> float[n, 2 Nb, C] (two corner tokens per box)."""
        n, nb, _ = boxes.shape
        corners = (boxes + 0.5).reshape(n, nb, 2, 2)
        pe = self.pe_layer.forward_with_coords(corners, self.input_image_size).astype(self.cfg.compute_dtype)
        pe = pe + jnp.stack([self._weight(self.point_embeddings[2]), self._weight(self.point_embeddings[3])])
        return pe.reshape(n, 2 * nb, self.embed_dim)

    def _embed_masks(self, masks: jax.Array) -> jax.Array:
        """masks float[n, 4h, 4w] (low-res logits) -> float[n, h, w, C]."""
        x = masks[..., None].astype(self.cfg.compute_dtype)
        for layer in self.mask_downscaling:
            x = gelu_exact(x) if layer is None else layer(x)
        return x

    # ---- forward --------------------------------------------------------------------------------------
    def __call__(
        self,
        points: jax.Array | None = None,
        labels: jax.Array | None = None,
        text_embeds: jax.Array | None = None,
        boxes: jax.Array | None = None,
        masks: jax.Array | None = None,
        *,
        pad_point: bool = True,
    ) -> tuple[jax.Array, jax.Array]:
        """Embed the prompts of n masks.

        Args:
          points: float[n, Np, 2] (x, y) pixel coordinates in the SAM input frame (after `apply_coords`,
            before the +0.5 shift), or None (LISA-style text-only prompting).
          labels: int[n, Np] in {1, 0, -1}; required with `points`.
          text_embeds: float[n, T, C] READ's projected [SEG] embeddings (T = 1), appended last; or None.
          boxes: float[n, 4] or float[n, Nb, 4] (x0, y0, x1, y1) in the SAM input frame; or None.
          masks: float[n, 4h, 4w] mask logits for the dense prompt; None gives `no_mask_embed` everywhere.
          pad_point: append Meta's padding point (label -1 at (0, 0)) when there are points and no boxes.
            READ always pads (it calls with boxes=None).
        Returns:
          sparse: float[n, Np (+1) + 2 Nb + T, C] in the order [points (+pad), box corners, text].
          dense: float[n, h, w, C].
        """
        n = self._check(points, labels, text_embeds, boxes, masks)
        dt = self.cfg.compute_dtype
        parts = []
        if points is not None:
            parts.append(self._embed_points(points, labels, pad=pad_point and boxes is None))
        if boxes is not None:
            parts.append(self._embed_boxes(boxes if boxes.ndim == 3 else boxes[:, None, :]))
        if text_embeds is not None:
            parts.append(text_embeds.astype(dt))
        sparse = jnp.concatenate(parts, axis=1) if parts else jnp.zeros((n, 0, self.embed_dim), dt)
        if masks is not None:
            dense = self._embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense = jnp.broadcast_to(self._weight(self.no_mask_embed), (n, h, w, self.embed_dim))
        return sparse, dense

    def _check(self, points, labels, text_embeds, boxes, masks) -> int:
        """Validate prompt shapes at trace time (before any compile); returns the prompt count n."""
        c = self.embed_dim
        sizes = {}
        if (points is None) != (labels is None):
            raise ValueError("points and labels must be given together")
        if points is not None:
            if points.ndim != 3 or points.shape[-1] != 2:
                raise ValueError(f"points must be float[n, Np, 2], got shape {points.shape}")
            if labels.shape != points.shape[:2]:
                raise ValueError(f"labels must be int[n, Np] = {points.shape[:2]}, got shape {labels.shape}")
            if not jnp.issubdtype(labels.dtype, jnp.integer):
                raise ValueError(f"labels must be integers in {{1, 0, -1}}, got dtype {labels.dtype}")
            sizes["points"] = points.shape[0]
        if boxes is not None:
            if boxes.ndim not in (2, 3) or boxes.shape[-1] != 4:
                raise ValueError(f"boxes must be float[n, 4] or float[n, Nb, 4], got shape {boxes.shape}")
            sizes["boxes"] = boxes.shape[0]
        if text_embeds is not None:
            if text_embeds.ndim != 3 or text_embeds.shape[-1] != c:
                raise ValueError(f"text_embeds must be float[n, T, {c}], got shape {text_embeds.shape}")
            sizes["text_embeds"] = text_embeds.shape[0]
        if masks is not None:
            if masks.shape[1:] != self.mask_input_size or masks.ndim != 3:
                mh, mw = self.mask_input_size
                raise ValueError(f"masks must be float[n, {mh}, {mw}], got shape {masks.shape}")
            sizes["masks"] = masks.shape[0]
        if len(set(sizes.values())) > 1:
            raise ValueError(f"prompt batch sizes disagree: {sizes}")
        # Meta's convention: with no prompt at all the batch is one (dense no-mask prompt, no sparse tokens).
        return next(iter(sizes.values()), 1)
