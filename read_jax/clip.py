"""CLIP ViT-L/14-336 vision tower as LLaVA-1.5 uses it: the selected layer's patch tokens, CLS dropped.

PyTorch reference: transformers `models/clip/modeling_clip.py` (`CLIPVisionModel`: `CLIPVisionEmbeddings`,
`CLIPEncoderLayer`, `CLIPVisionTransformer`), wrapped by LLaVA's
`model/llava/model/multimodal_encoder/clip_encoder.py` (`CLIPVisionTower.feature_select`: the hidden state
`hidden_states[select_layer]`, then `[:, 1:]` for the "patch" feature). read_reference.md §1, §2.2, §10.2.

Parameter paths mirror the HF keys (`vision_model/embeddings/patch_embedding`, `vision_model/pre_layrnorm`
(sic, HF's spelling), `vision_model/encoder/layers/N/self_attn/q_proj`, ...), so `read_jax.convert.clip`
only renames and transposes.

Shape letters:
  B batch (images), P patches (576 at 336/14), T tokens (P + 1 with CLS), D model dim (1024),
  N heads, H head dim, F MLP dim (4096), h w spatial (pixels or patch grid), C channels (3).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from read_jax.config import ClipVisionConfig
from read_jax.layers import dot_product_attention, gelu_exact


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's activation: x * sigmoid(1.702 x) (HF `QuickGELUActivation`)."""
    return x * jax.nn.sigmoid(1.702 * x)


def _activation(name: str):
    if name == "quick_gelu":
        return quick_gelu
    return gelu_exact  # HF "gelu" is torch's nn.GELU(): the exact erf form


def _layer_norm(cfg: ClipVisionConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # eps from the config (flax defaults to 1e-6, torch/HF to 1e-5); two-pass variance as torch computes it
    # (the "fast" E[x^2]-E[x]^2 form loses digits when |mean| >> std, which pre-LN inputs can have).
    return nnx.LayerNorm(
        cfg.hidden_size,
        epsilon=cfg.layer_norm_eps,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.weight_dtype,
        use_fast_variance=False,
        rngs=rngs,
    )


def _linear(cfg: ClipVisionConfig, din: int, dout: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)


class ClipVisionEmbeddings(nnx.Module):
    """Patchify (stride-14 conv, no bias) + class token + learned absolute position embeddings."""

    def __init__(self, cfg: ClipVisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.hidden_size
        self.class_embedding = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (d,), cfg.weight_dtype))
        self.patch_embedding = nnx.Conv(
            cfg.num_channels,
            d,
            kernel_size=(cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.weight_dtype,
            rngs=rngs,
        )
        # One row per token: CLS first, then the patches in raster order (HF `position_ids` = arange).
        self.position_embedding = nnx.Embed(
            cfg.num_patches + 1, d, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs
        )

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """float[B, h, w, C] (NHWC, h = w = image_size) -> float[B, T, D]."""
        b = pixel_values.shape[0]
        x = self.patch_embedding(pixel_values.astype(self.cfg.compute_dtype))
        # [B, h/14, w/14, D] -> [B, P, D]; row-major over (h, w) like torch's flatten(2) of NCHW.
        x = x.reshape(b, -1, x.shape[-1])
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        return x + self.position_embedding.embedding[...].astype(x.dtype)[None]


class ClipAttention(nnx.Module):
    """Bidirectional multi-head self-attention with biased q/k/v/out projections."""

    def __init__(self, cfg: ClipVisionConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = d // cfg.num_attention_heads
        self.q_proj = _linear(cfg, d, d, rngs)
        self.k_proj = _linear(cfg, d, d, rngs)
        self.v_proj = _linear(cfg, d, d, rngs)
        self.out_proj = _linear(cfg, d, d, rngs)
        self.attention_implementation: str | None = None  # `layers.set_attention_implementation`

    def __call__(self, x: jax.Array) -> jax.Array:
        """float[B, T, D] -> float[B, T, D]."""
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)  # [B, T, N, H]
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        # No mask: every image has all T tokens. The scale 1/sqrt(H) is applied here, not folded into q_proj
        # (the converter only renames).
        o = dot_product_attention(
            q, k, v, scale=self.head_dim**-0.5, implementation=self.attention_implementation
        )  # [B, T, N, H]
        return self.out_proj(o.reshape(b, t, -1))


class ClipMlp(nnx.Module):
    def __init__(self, cfg: ClipVisionConfig, *, rngs: nnx.Rngs):
        self.act = _activation(cfg.hidden_act)
        self.fc1 = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, rngs)
        self.fc2 = _linear(cfg, cfg.intermediate_size, cfg.hidden_size, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class ClipEncoderLayer(nnx.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: ClipVisionConfig, *, rngs: nnx.Rngs):
        self.layer_norm1 = _layer_norm(cfg, rngs)
        self.self_attn = ClipAttention(cfg, rngs=rngs)
        self.layer_norm2 = _layer_norm(cfg, rngs)
        self.mlp = ClipMlp(cfg, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nnx.Module):
    def __init__(self, cfg: ClipVisionConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List([ClipEncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])


class ClipVisionTransformer(nnx.Module):
    """HF `CLIPVisionTransformer`: embeddings, pre_layrnorm, encoder, post_layernorm."""

    def __init__(self, cfg: ClipVisionConfig, *, rngs: nnx.Rngs):
        self.embeddings = ClipVisionEmbeddings(cfg, rngs=rngs)
        self.pre_layrnorm = _layer_norm(cfg, rngs)
        self.encoder = ClipEncoder(cfg, rngs=rngs)
        # post_layernorm only feeds CLIP's pooled output, which LLaVA never reads. It stays a parameter so the
        # openai checkpoint converts 1:1 (and parameter counts match HF's CLIPVisionModel); it is never run.
        self.post_layernorm = _layer_norm(cfg, rngs)


class ClipVisionModel(nnx.Module):
    """CLIP vision tower returning LLaVA's image features.

    Args:
      cfg: the CLIP config; `select_layer` picks the hidden state (HF `hidden_states[select_layer]`, where
        index 0 is the pre-LN embedding output and index i the output of layer i).
    """

    def __init__(self, cfg: ClipVisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vision_model = ClipVisionTransformer(cfg, rngs=rngs)

    @property
    def num_layers_run(self) -> int:
        """Encoder layers actually executed: hidden_states has L+1 entries, so [s] needs L+1+s layers.

        With select_layer=-2 the last layer is skipped: its output is unused (1/24 of the compute saved).
        """
        return self.cfg.num_hidden_layers + 1 + self.cfg.select_layer

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """Patch features of the selected layer.

        Args:
          pixel_values: float[B, h, w, C], **NHWC** (not torch's NCHW), h = w = image_size (336), already
            CLIP-normalised (mean/std, read_reference.md §7.1).
        Returns:
          float[B, P, D] in the compute dtype: hidden_states[select_layer] without the CLS token
          ([B, 576, 1024] at full size).
        """
        cfg = self.cfg
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (
            cfg.image_size,
            cfg.image_size,
            cfg.num_channels,
        ):
            raise ValueError(
                f"CLIP expects pixel_values [B, {cfg.image_size}, {cfg.image_size}, "
                f"{cfg.num_channels}] (NHWC), got {tuple(pixel_values.shape)}"
            )
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixel_values))  # [B, T, D] = hidden_states[0]
        # A Python loop over layers (not data): each layer has its own parameters and HF-mirrored path.
        for layer in list(vm.encoder.layers)[: self.num_layers_run]:
            x = layer(x)
        return x[:, 1:]  # drop CLS: LLaVA's "patch" select feature
