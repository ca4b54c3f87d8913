"""SAM's ViT image encoder (ViTDet backbone with windowed + global attention and a conv neck), in NNX.

PyTorch reference: segment-anything 1.0 (PyPI, 2023-04; github.com/facebookresearch/segment-anything),
`segment_anything/modeling/image_encoder.py` (`ImageEncoderViT`, `Block`, `Attention`, `window_partition`,
`window_unpartition`, `get_rel_pos`, `add_decomposed_rel_pos`, `PatchEmbed`); `modeling/common.py`
(`MLPBlock`, `LayerNorm2d`) is `read_jax.sam.common`. Parameter names mirror Meta's state-dict keys
(`blocks.3.attn.qkv.weight` -> `blocks/3/attn/qkv/kernel`); the key table is `read_jax.convert.sam`.

Layout: **NHWC** everywhere. Meta's encoder returns NCHW `[B, 256, 64, 64]`; ours returns `[B, 64, 64, 256]`
(the transformer blocks are NHWC in Meta's code too; only the input image and the neck output differ).

Shape letters:
  B: images            S: input side (1024)         P: patch size (16)
  H, W: token grid (S / P = 64)                     D: encoder width (1280)
  N: heads (16)        K: head dim (D / N = 80)     C: neck output channels (prompt_embed_dim, 256)
  w: window side (14)  Q, T: query / key tokens of one attention call (w*w or H*W)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from read_jax.config import SamConfig
from read_jax.layers import dot_product_attention, gelu_exact
from read_jax.sam.common import LAYER_NORM_2D_EPS, MLPBlock, layer_norm, linear


# ---- windows ------------------------------------------------------------------------------------------
def window_partition(x: jax.Array, window: int) -> tuple[jax.Array, tuple[int, int]]:
    """Split into non-overlapping windows, zero-padding bottom/right first (as Meta does).

    The padded tokens are zeros *after* norm1, and they are not masked in the attention: they act as keys
    whose projection is the qkv bias alone. Meta does exactly that, so we do too.

    Args:
      x: float[B, H, W, D].
      window: w.
    Returns:
      (float[B * H'/w * W'/w, w, w, D], (H', W')) with H', W' the padded sizes.
    """
    b, h, w_, d = x.shape
    ph, pw = (-h) % window, (-w_) % window
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    hp, wp = h + ph, w_ + pw
    x = x.reshape(b, hp // window, window, wp // window, window, d)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window, window, d), (hp, wp)


def window_unpartition(
    windows: jax.Array, window: int, pad_hw: tuple[int, int], hw: tuple[int, int]
) -> jax.Array:
    """Inverse of `window_partition`: float[B * nw, w, w, D] -> float[B, H, W, D] (padding cropped)."""
    hp, wp = pad_hw
    h, w_ = hw
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.reshape(b, hp // window, wp // window, window, window, -1)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w_, :]


def rel_pos_index(q_size: int, k_size: int) -> np.ndarray:
    """Static int[q, k] rows of the relative-position table used by query i for key j (`get_rel_pos`).

    Meta's general form scales coordinates when q_size != k_size; SAM always has q_size == k_size (both the
    window or both the full grid), where it reduces to i - j + (k - 1).
    """
    qc = np.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    kc = np.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    return ((qc - kc) + (k_size - 1) * max(q_size / k_size, 1.0)).astype(np.int32)


# Queries of one attention call at most: a global block attends in chunks of whole grid rows. Its fp32 logits,
# relative-position bias and softmax are [N, Q, T] each, 1 GiB apiece on ViT-H's 64 x 64 grid (16 heads,
# 4096 x 4096) and together most of the 3.1 GiB of temporaries of evaluation's 7B encode on the CPU (issue 16:
# a 24 GB machine then runs out of memory); 1024 queries at a time is a quarter of it. Every query row is
# computed as in one call (the softmax is per row): the same numbers, fewer of them live at once.
QUERY_CHUNK = 1024


def _rows_per_chunk(h: int, w: int, limit: int) -> int:
    """The most whole grid rows (a divisor of h, static) whose r x w queries fit `limit`; at least one."""
    return max([r for r in range(1, h + 1) if h % r == 0 and r * w <= limit], default=1)


# ---- blocks -------------------------------------------------------------------------------------------
class Attention(nnx.Module):
    """Multi-head self-attention with decomposed relative position bias (MViTv2), `image_encoder.Attention`.

    Params: qkv [D, 3D] (+bias), proj [D, D], rel_pos_h [2*Hq - 1, K], rel_pos_w [2*Wq - 1, K] where (Hq, Wq)
    is the window (windowed blocks) or the token grid (global blocks). Grids of more than `query_chunk`
    tokens attend in chunks of whole rows of queries (`QUERY_CHUNK`).
    """

    def __init__(self, cfg: SamConfig, input_size: tuple[int, int], *, rngs: nnx.Rngs):
        dim, heads = cfg.encoder_embed_dim, cfg.encoder_num_heads
        if dim % heads:
            raise ValueError(f"encoder_embed_dim {dim} is not divisible by encoder_num_heads {heads}")
        self.num_heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.input_size = tuple(input_size)
        self.use_rel_pos = cfg.use_rel_pos
        self.compute_dtype = cfg.compute_dtype
        self.qkv = linear(dim, 3 * dim, cfg, rngs=rngs, use_bias=cfg.qkv_bias)
        self.proj = linear(dim, dim, cfg, rngs=rngs)
        if self.use_rel_pos:
            # Meta zero-initialises these; the checkpoint fills them.
            self.rel_pos_h = nnx.Param(jnp.zeros((2 * input_size[0] - 1, self.head_dim), cfg.weight_dtype))
            self.rel_pos_w = nnx.Param(jnp.zeros((2 * input_size[1] - 1, self.head_dim), cfg.weight_dtype))
        self.attention_implementation: str | None = None  # `layers.set_attention_implementation`
        self.query_chunk = QUERY_CHUNK

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: float[B, H, W, D] (B counts windows for windowed blocks) -> float[B, H, W, D]."""
        b, h, w, d = x.shape
        n, k = self.num_heads, self.head_dim
        # Meta's qkv layout: the 3D outputs are (3, N, K) in that order.
        qkv = self.qkv(x).reshape(b, h, w, 3, n, k)
        q, key, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]  # [B, H, W, N, K]
        key, v = key.reshape(b, h * w, n, k), v.reshape(b, h * w, n, k)
        rh = rw = None
        if self.use_rel_pos:
            if (h, w) != self.input_size:
                # Meta would linearly resize the tables here; SAM never needs it at a fixed image size.
                raise ValueError(f"attention grid {(h, w)} != the rel-pos table size {self.input_size}")
            rh = self.rel_pos_h[...][rel_pos_index(h, h)].astype(q.dtype)  # [H, H, K]
            rw = self.rel_pos_w[...][rel_pos_index(w, w)].astype(q.dtype)  # [W, W, K]
        rows = _rows_per_chunk(h, w, self.query_chunk)
        if rows == h:
            out = self._attend(q, key, v, rh, rw)
        else:  # chunks of `rows` query rows, one after the other (static count h // rows)
            qs = jnp.moveaxis(q.reshape(b, h // rows, rows, w, n, k), 1, 0)
            rhs = None if rh is None else rh.reshape(h // rows, rows, h, k)
            out = jax.lax.map(lambda a: self._attend(a[0], key, v, a[1], rw), (qs, rhs))
            out = jnp.moveaxis(out, 0, 1)  # [B, H // rows, rows * W, N, K]
        return self.proj(out.reshape(b, h, w, d))

    def _attend(self, q, key, v, rh, rw):
        """Queries q [B, Hq, W, N, K] (Hq grid rows; rh [Hq, H, K] their rows of the height table) attending
        to all keys [B, T, N, K] -> [B, Hq * W, N, K]."""
        b, hq, w, n, k = q.shape
        bias = None
        if rh is not None:
            # Meta's add_decomposed_rel_pos on the *unscaled* query, added to the scaled logits (fp32 on XLA).
            f32 = jnp.float32
            rel_h = jnp.einsum("bhwnk,hyk->bnhwy", q, rh, preferred_element_type=f32)  # [B, N, Hq, W, H]
            rel_w = jnp.einsum("bhwnk,wxk->bnhwx", q, rw, preferred_element_type=f32)  # [B, N, Hq, W, W]
            bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, n, hq * w, key.shape[1])
        return dot_product_attention(
            q.reshape(b, hq * w, n, k),
            key,
            v,
            bias=bias,
            scale=self.scale,
            implementation=self.attention_implementation,
        )


class Block(nnx.Module):
    """Pre-LN ViT block: windowed attention if `window_size > 0`, else global (`image_encoder.Block`)."""

    def __init__(self, cfg: SamConfig, window_size: int, *, rngs: nnx.Rngs):
        dim = cfg.encoder_embed_dim
        grid = cfg.image_embedding_size
        self.window_size = window_size
        self.norm1 = layer_norm(dim, cfg.layer_norm_eps, cfg, rngs=rngs)
        attn_size = (window_size, window_size) if window_size > 0 else (grid, grid)
        self.attn = Attention(cfg, attn_size, rngs=rngs)
        self.norm2 = layer_norm(dim, cfg.layer_norm_eps, cfg, rngs=rngs)
        self.mlp = MLPBlock(dim, int(dim * cfg.mlp_ratio), gelu_exact, cfg, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: float[B, H, W, D] -> float[B, H, W, D]."""
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
            x = self.attn(x)
            x = window_unpartition(x, self.window_size, pad_hw, (h, w))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nnx.Module):
    """Non-overlapping P x P conv: float[B, S, S, 3] -> float[B, H, W, D] (`image_encoder.PatchEmbed`)."""

    def __init__(self, cfg: SamConfig, in_chans: int = 3, *, rngs: nnx.Rngs):
        p = cfg.patch_size
        self.proj = nnx.Conv(
            in_chans,
            cfg.encoder_embed_dim,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            dtype=cfg.compute_dtype,
            param_dtype=cfg.weight_dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(x)


class ImageEncoderViT(nnx.Module):
    """SAM's image encoder.

    Params (paths as in Meta's state dict): patch_embed/proj, pos_embed [1, H, W, D], blocks/{i}/...,
    neck/0 (1x1 conv D->C, no bias), neck/1 (LayerNorm2d), neck/2 (3x3 conv C->C, pad 1, no bias),
    neck/3 (LayerNorm2d). A LayerNorm2d on NHWC is a LayerNorm over the channel axis.
    """

    def __init__(self, cfg: SamConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, c, g = cfg.encoder_embed_dim, cfg.prompt_embed_dim, cfg.image_embedding_size
        self.patch_embed = PatchEmbed(cfg, rngs=rngs)
        # Absolute position embedding for the pre-training size; Meta zero-initialises it.
        self.pos_embed = nnx.Param(jnp.zeros((1, g, g, d), cfg.weight_dtype))
        self.blocks = nnx.List(
            [
                Block(cfg, 0 if i in cfg.global_attn_indexes else cfg.window_size, rngs=rngs)
                for i in range(cfg.encoder_depth)
            ]
        )
        conv = {"dtype": cfg.compute_dtype, "param_dtype": cfg.weight_dtype, "use_bias": False, "rngs": rngs}
        self.neck = nnx.List(
            [
                nnx.Conv(d, c, kernel_size=(1, 1), padding="VALID", **conv),
                layer_norm(c, LAYER_NORM_2D_EPS, cfg, rngs=rngs),
                # padding=1 on a 3x3 kernel == SAME.
                nnx.Conv(c, c, kernel_size=(3, 3), padding=((1, 1), (1, 1)), **conv),
                layer_norm(c, LAYER_NORM_2D_EPS, cfg, rngs=rngs),
            ]
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        """Encode normalised, padded images.

        Args:
          images: float[B, S, S, 3], `(x - pixel_mean) / pixel_std`, zero-padded bottom/right to S
            (see `read_jax.sam.transforms.preprocess`). NHWC, unlike Meta's NCHW input.
        Returns:
          float[B, H, W, C] image embeddings (Meta: [B, C, H, W]).
        """
        s = self.cfg.image_size
        if images.ndim != 4 or images.shape[1:] != (s, s, 3):
            raise ValueError(f"SAM image encoder expects float[B, {s}, {s}, 3] (NHWC), got {images.shape}")
        x = self.patch_embed(images.astype(self.cfg.compute_dtype))
        x = x + self.pos_embed[...].astype(x.dtype)
        for blk in self.blocks:
            x = blk(x)
        for layer in self.neck:
            x = layer(x)
        return x
