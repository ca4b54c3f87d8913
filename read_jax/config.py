"""Architecture configs for READ: frozen dataclasses with named size factories.

One code path, N data records (house style §3): `ReadConfig.read_7b()`, `ReadConfig.read_13b()` and
`ReadConfig.tiny()` build the whole model; the component configs (`LlamaConfig`, `ClipVisionConfig`,
`SamConfig`, `LoraConfig`, `SaspConfig`) are usable on their own.

`from_hf_config()` turns a HF `config.json` dict (LLaVA/READ/SESAME/LISA, llava-hf, or plain LLaMA) into a
`LlamaConfig`. It maps or checks every attribute that changes the computation and **raises** on a value it
cannot honour (a silently ignored `rope_scaling` or `tie_word_embeddings` is the classic conversion bug);
attributes that do not change the computation (bookkeeping, training flags, what newer transformers or LLaVA
releases add) are recorded as unused (`audit_hf_config`), or refused with `strict=True`. That bridge lives in
`read_jax.hf_config`; its names are importable from here too.

Reference: ../shared/docs/read_reference.md §1, §2.1-2.7, §3.6, §6.1, §10.3.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp

# Token ids fixed by the released tokenizer (read_reference.md §2.3).
SEG_TOKEN = "[SEG]"
SEG_TOKEN_ID = 32000
IM_START_TOKEN_ID = 32001
IM_END_TOKEN_ID = 32002
IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100  # label of unsupervised tokens (HF cross-entropy's ignore_index)
VOCAB_SIZE = 32003
# CLIP ViT-L/14-336 as LLaVA-1.5 uses it: crop side, patch side, and the patch grid (24 x 24 = 576 tokens).
CLIP_SIZE = 336
CLIP_PATCH_SIZE = 14
CLIP_GRID = CLIP_SIZE // CLIP_PATCH_SIZE
# "Ignore" pixels of ground-truth masks and semantic label maps (ReasonSeg's labelme "ignore" polygons,
# unlabeled classes): neither intersection nor union. (IGNORE_INDEX is the text-label counterpart.)
IGNORE_LABEL = 255


class ConfigError(ValueError):
    """A configuration that read_jax does not understand or cannot honour."""


def _dtype(name: str):
    try:
        return jnp.dtype(name)
    except TypeError as e:  # pragma: no cover - message clarity only
        raise ConfigError(f"unknown dtype {name!r}") from e


class _DtypeMixin:
    """`dtype` (compute) and `param_dtype` (storage) strings as numpy dtypes."""

    @property
    def compute_dtype(self):
        return _dtype(self.dtype)

    @property
    def weight_dtype(self):
        return _dtype(self.param_dtype)


@dataclasses.dataclass(frozen=True)
class LlamaConfig(_DtypeMixin):
    """LLaMA-2 / Vicuna-v1.5 decoder (HF `LlamaForCausalLM` of transformers 4.31)."""

    vocab_size: int = VOCAB_SIZE
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    # Std of the normal init of every Linear and the embedding (HF `_init_weights`); only used from scratch.
    initializer_range: float = 0.02
    # Compute dtype and parameter dtype: fp32 for parity tests, bf16 for the released sizes.
    dtype: str = "bfloat16"
    param_dtype: str = "bfloat16"
    # Rematerialise each decoder layer in the backward pass (gradient checkpointing, §6.1).
    remat: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        _dtype(self.dtype), _dtype(self.param_dtype)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig(_DtypeMixin):
    """CLIP ViT-L/14-336 vision tower (HF `CLIPVisionModel`), as LLaVA-1.5 uses it."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = CLIP_SIZE
    patch_size: int = CLIP_PATCH_SIZE
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    # LLaVA takes hidden_states[select_layer] and drops CLS ("patch" feature).
    select_layer: int = -2
    dtype: str = "bfloat16"
    param_dtype: str = "bfloat16"

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ConfigError("CLIP image_size must be a multiple of patch_size")
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ConfigError(f"unsupported CLIP hidden_act {self.hidden_act!r}")
        if not -self.num_hidden_layers <= self.select_layer < 0:
            raise ConfigError(f"select_layer {self.select_layer} out of range")

    @property
    def grid_size(self) -> int:
        """Patches per side (24 at full size)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Image tokens handed to the LLM (576 at full size)."""
        return self.grid_size**2


@dataclasses.dataclass(frozen=True)
class SamConfig(_DtypeMixin):
    """SAM ViT-H (Meta's `segment_anything`, `build_sam_vit_h`)."""

    # Image encoder.
    image_size: int = 1024
    patch_size: int = 16
    encoder_embed_dim: int = 1280
    encoder_depth: int = 32
    encoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (7, 15, 23, 31)
    use_rel_pos: bool = True
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    # Prompt encoder / mask decoder.
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    transformer_depth: int = 2
    transformer_mlp_dim: int = 2048
    transformer_num_heads: int = 8
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    # Non-persistent buffers of `Sam` (not in checkpoints).
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    dtype: str = "bfloat16"
    param_dtype: str = "bfloat16"
    # dtype of the random-Fourier positional encoding of points and of the image grid. "" = the compute
    # dtype, as the release computes it (READ's `_pe_encoding` casts the coordinates to the Gaussian matrix's
    # dtype: bf16 in the released models); "float32" = exact fp32 whatever the compute dtype.
    pe_dtype: str = ""

    def __post_init__(self):
        if self.pe_dtype not in ("", "float32", "bfloat16", "float16"):
            raise ConfigError(
                f"SamConfig.pe_dtype must be '', float32, bfloat16 or float16, got {self.pe_dtype!r}"
            )
        if self.image_size % self.patch_size:
            raise ConfigError("SAM image_size must be a multiple of patch_size")
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.encoder_depth]
        if bad:
            raise ConfigError(f"global_attn_indexes {bad} outside encoder depth {self.encoder_depth}")

    @property
    def image_embedding_size(self) -> int:
        """Side of the image embedding grid (64 at full size)."""
        return self.image_size // self.patch_size

    @property
    def low_res_mask_size(self) -> int:
        """Side of the decoder's low-resolution mask logits (256 at full size)."""
        return 4 * self.image_embedding_size


# READ's LoRA targets: q_proj and v_proj of every LLaMA layer, nothing in CLIP/SAM/projector/fcs (§6.1).
LORA_TARGET_REGEX = r"(.*/)?model/layers/\d+/self_attn/(q_proj|v_proj)"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """PEFT-compatible LoRA: W + (alpha / r) * B @ A on the matched Linear layers."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_regex: str = LORA_TARGET_REGEX
    # Number of modules the regex must match; None means 2 x num_hidden_layers (q and v per layer).
    expected_matches: int | None = None

    @property
    def scale(self) -> float:
        return self.alpha / self.r


@dataclasses.dataclass(frozen=True)
class SaspConfig:
    """Similarity-as-Points (READ §3). Everything the paper varies is here, not in the source.

    mode:
      "threshold": the released rule: min-max map on a `grid_size` grid, positives >= t_pos (value desc),
        negatives in [0, t_neg] (value asc), then neutrals in raster order, first `num_points`.
      "topk": Appendix B's "points only": the `num_points // 2` highest cells as positives and the same
        number of lowest cells as negatives.
    """

    grid_size: int = 12
    num_points: int = 30
    # False: no points, SAM is prompted with the [SEG] embedding alone (LISA's and SESAME's prompt, §12).
    enabled: bool = True
    t_pos: float = 0.8
    t_neg: float = 0.2
    use_dtoc: bool = True
    mode: str = "threshold"
    # The reference computes the dot product and the DtoC min-max in bf16 (fp32 accumulation).
    similarity_dtype: str = "bfloat16"
    # Half width (in pixels) of the exact DtoC window: exp(-d^2) < 1e-30 beyond it.
    dtoc_radius: int = 9
    # Epsilon added to the min-max range: a flat map must not give NaN (reference bug §13.8).
    minmax_eps: float = 1e-12

    def __post_init__(self):
        if self.mode not in ("threshold", "topk"):
            raise ConfigError(f"unknown SasP mode {self.mode!r}")
        # Traced thresholds (evaluation sweeps reuse one compile across t_pos/t_neg) skip the range check.
        concrete = all(isinstance(t, (int, float)) for t in (self.t_pos, self.t_neg))
        if concrete and not 0.0 <= self.t_neg < self.t_pos <= 1.0:
            raise ConfigError(f"need 0 <= t_neg < t_pos <= 1, got {self.t_neg}/{self.t_pos}")
        if self.num_points < 1:
            raise ConfigError("num_points must be >= 1")
        if self.num_points > self.grid_size**2:
            raise ConfigError(f"num_points {self.num_points} exceeds the {self.grid_size}^2 grid")
        if self.mode == "topk" and self.num_points % 2:
            raise ConfigError("topk mode needs an even num_points (half positive, half negative)")

    def on_clip_grid(self, clip_grid: int, reference_grid: int = CLIP_GRID) -> SaspConfig:
        """This setting on another CLIP grid: the same downsampling of the similarity map, so the SasP grid
        follows the tower (READ-7B's 24 -> 12 becomes 16 -> 8 on LISA's CLIP-224), and at most as many points
        as the grid has cells."""
        if clip_grid == reference_grid:
            return self
        down = max(1, reference_grid // self.grid_size)
        grid = max(1, clip_grid // down)
        points = min(self.num_points, grid * grid)
        if self.mode == "topk":
            points -= points % 2
        return dataclasses.replace(self, grid_size=grid, num_points=points)

    @classmethod
    def read_7b(cls, **kw) -> SaspConfig:
        """Released READ-7B setting: 12x12 grid, 30 points, 0.8/0.2."""
        return cls(**{"grid_size": 12, "num_points": 30, "t_pos": 0.8, "t_neg": 0.2, **kw})

    @classmethod
    def read_13b_eval(cls, **kw) -> SaspConfig:
        """Released READ-13B evaluation setting: 24x24 grid, 60 points, 0.6/0.2."""
        return cls(**{"grid_size": 24, "num_points": 60, "t_pos": 0.6, "t_neg": 0.2, **kw})


# What READ trains (§6.1 step 7 + LoRA), as path regexes over the ReadModel parameter tree.
READ_TRAINABLE_REGEXES = (
    r"(.*/)?lora_[ab]",
    r"(.*/)?model/embed_tokens/.*",
    r"(.*/)?lm_head/.*",
    r"(.*/)?visual_model/mask_decoder/.*",
    r"(.*/)?text_hidden_fcs/.*",
)


MM_PROJECTOR_TYPES = ("mlp2x_gelu", "linear")


@dataclasses.dataclass(frozen=True)
class ReadConfig:
    """The whole READ model: LLaVA-1.5 (LLaMA + CLIP + projector) + fcs + SasP + SAM."""

    llama: LlamaConfig = LlamaConfig()
    clip: ClipVisionConfig = ClipVisionConfig()
    sam: SamConfig = SamConfig()
    lora: LoraConfig | None = LoraConfig()
    sasp: SaspConfig = SaspConfig()
    # text_hidden_fcs output (the SAM prompt dim).
    out_dim: int = 256
    # Static maximum of [SEG] tokens per conversation row handled under jit (extra ones are dropped).
    max_segs: int = 4
    seg_token_id: int = SEG_TOKEN_ID
    im_start_token_id: int = IM_START_TOKEN_ID
    im_end_token_id: int = IM_END_TOKEN_ID
    image_token_index: int = IMAGE_TOKEN_INDEX
    trainable_regexes: tuple[str, ...] = READ_TRAINABLE_REGEXES
    # READ runs CLIP and SAM's image encoder under no_grad. False lets gradients into them, for towers trained
    # from scratch (the LLaVA stage of configs/tiny.py trains CLIP); the regexes still pick what updates.
    freeze_vision_towers: bool = True
    # LLaVA's vision projector: "mlp2x_gelu" (LLaVA-1.5: Linear, GELU, Linear) or "linear" (LLaVA-v1, LISA).
    mm_projector_type: str = "mlp2x_gelu"
    # The attention kernel of LLaMA, CLIP and SAM: "auto" (the platform's fused kernel where it applies, see
    # `read_jax.layers.attention_backend`), "xla", "cudnn" or "pallas". Not part of the weights.
    attention_implementation: str = "auto"

    def __post_init__(self):
        if self.attention_implementation not in ("auto", "xla", "cudnn", "pallas"):
            raise ConfigError(f"unknown attention_implementation {self.attention_implementation!r}")
        if self.out_dim != self.sam.prompt_embed_dim:
            raise ConfigError(f"out_dim {self.out_dim} != SAM prompt_embed_dim {self.sam.prompt_embed_dim}")
        if self.sasp.grid_size > self.clip.grid_size:
            raise ConfigError("SasP grid cannot be finer than the CLIP patch grid")
        if self.llama.vocab_size <= max(self.seg_token_id, self.im_start_token_id, self.im_end_token_id):
            raise ConfigError("vocab_size must cover [SEG], <im_start>, <im_end>")
        if self.mm_projector_type not in MM_PROJECTOR_TYPES:
            raise ConfigError(
                f"mm_projector_type {self.mm_projector_type!r}: read_jax implements {MM_PROJECTOR_TYPES}"
            )

    @property
    def mm_hidden_size(self) -> int:
        return self.clip.hidden_size

    def replace(self, **kw) -> ReadConfig:
        return dataclasses.replace(self, **kw)

    def with_dtype(self, dtype: str, param_dtype: str | None = None) -> ReadConfig:
        """Same architecture, another compute/parameter dtype for every component."""
        p = param_dtype or dtype
        return self.replace(
            llama=dataclasses.replace(self.llama, dtype=dtype, param_dtype=p),
            clip=dataclasses.replace(self.clip, dtype=dtype, param_dtype=p),
            sam=dataclasses.replace(self.sam, dtype=dtype, param_dtype=p),
        )

    # ---- size factories -------------------------------------------------------------------------
    @classmethod
    def read_7b(cls, **kw) -> ReadConfig:
        return cls(**{"llama": LlamaConfig(), "lora": LoraConfig(r=8), "sasp": SaspConfig.read_7b(), **kw})

    @classmethod
    def read_13b(cls, **kw) -> ReadConfig:
        llama = LlamaConfig(
            hidden_size=5120,
            intermediate_size=13824,
            num_hidden_layers=40,
            num_attention_heads=40,
            num_key_value_heads=40,
        )
        return cls(**{"llama": llama, "lora": LoraConfig(r=64), "sasp": SaspConfig.read_13b_eval(), **kw})

    @classmethod
    def tiny(cls, dtype: str = "float32", **kw) -> ReadConfig:
        """A CPU-sized READ with the real token ids, CLIP grid (24x24 = 576 tokens) and SasP rule.

        The vocabulary stays 32003 so that [SEG]/<im_start>/<im_end> keep their ids; SAM works on a
        256-pixel frame (16x16 embedding, 64x64 low-res masks) with the ViT-H layout in miniature.
        """
        llama = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            dtype=dtype,
            param_dtype=dtype,
        )
        clip = ClipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            dtype=dtype,
            param_dtype=dtype,
        )
        sam = SamConfig(
            image_size=256,
            encoder_embed_dim=32,
            encoder_depth=2,
            encoder_num_heads=2,
            window_size=7,
            global_attn_indexes=(1,),
            prompt_embed_dim=32,
            transformer_mlp_dim=64,
            transformer_num_heads=2,
            iou_head_hidden_dim=32,
            mask_in_chans=4,
            dtype=dtype,
            param_dtype=dtype,
        )
        return cls(
            **{
                "llama": llama,
                "clip": clip,
                "sam": sam,
                "out_dim": 32,
                "lora": LoraConfig(r=4),
                "sasp": SaspConfig.read_7b(),
                **kw,
            }
        )

    @classmethod
    def shapes(cls, dtype: str = "float32", **kw) -> ReadConfig:
        """The generated shapes world's model (the stages of `configs/tiny.py`): `SMALL_PRESETS["shapes"]`."""
        return cls._small("shapes", dtype, **kw)

    @classmethod
    def smoke(cls, dtype: str = "float32", **kw) -> ReadConfig:
        """Every size at its minimum (seconds-sized pipeline tests): `SMALL_PRESETS["smoke"]`."""
        return cls._small("smoke", dtype, **kw)

    @classmethod
    def _small(cls, name: str, dtype: str, **kw) -> ReadConfig:
        """`tiny()` with the component fields of `SMALL_PRESETS[name]`; text_hidden_fcs follows SAM."""
        base = cls.tiny(dtype)
        parts = {c: dataclasses.replace(getattr(base, c), **f) for c, f in SMALL_PRESETS[name].items()}
        return base.replace(**{**parts, "out_dim": parts["sam"].prompt_embed_dim, **kw})


# The small presets, as field overrides of `ReadConfig.tiny()`'s components.
# fmt: off
SMALL_PRESETS = {
    # The generated shapes set's model: a 128-wide LLaMA, CLIP on a 112-pixel crop (8 x 8 = 64 image tokens,
    # SasP on the same 8 x 8 grid; 4 layers x 128, the vision stage's CLIP), SAM on a 128 frame with 8-pixel
    # patches (16 x 16 embedding).
    "shapes": {
        "llama": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512},
        "clip": {"image_size": 112, "patch_size": 14, "hidden_size": 128, "intermediate_size": 256,
                 "num_hidden_layers": 4, "num_attention_heads": 4},
        "sam": {"image_size": 128, "patch_size": 8, "encoder_embed_dim": 32, "encoder_depth": 2,
                "encoder_num_heads": 2, "window_size": 8, "global_attn_indexes": (1,), "prompt_embed_dim": 32,
                "transformer_mlp_dim": 64, "transformer_num_heads": 2, "iou_head_hidden_dim": 32,
                "mask_in_chans": 4},
        "sasp": {"grid_size": 8, "num_points": 10, "similarity_dtype": "float32"},
    },
    # Every size at its minimum: a 2 x 2 CLIP grid on 28 pixels, a 4 x 4 SAM embedding of a 64 frame, a
    # 32-wide one-layer LLaMA.
    "smoke": {
        "llama": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                  "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 256},
        "clip": {"image_size": 28, "patch_size": 14, "hidden_size": 16, "intermediate_size": 32,
                 "num_hidden_layers": 2, "num_attention_heads": 2},
        "sam": {"image_size": 64, "patch_size": 16, "encoder_embed_dim": 16, "encoder_depth": 2,
                "encoder_num_heads": 2, "window_size": 2, "global_attn_indexes": (1,), "prompt_embed_dim": 16,
                "transformer_depth": 1, "transformer_mlp_dim": 32, "transformer_num_heads": 2,
                "iou_head_depth": 2, "iou_head_hidden_dim": 16, "mask_in_chans": 4},
        "sasp": {"grid_size": 2, "num_points": 4, "similarity_dtype": "float32"},
    },
}
# fmt: on


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def read_config_from_dict(d: Mapping[str, Any]) -> ReadConfig:
    """Inverse of `config_to_dict` for a ReadConfig (used by the converter's config json)."""

    def tup(x):
        return tuple(x) if isinstance(x, Sequence) and not isinstance(x, str) else x

    sam = {k: tup(v) for k, v in d["sam"].items()}
    return ReadConfig(
        llama=LlamaConfig(**d["llama"]),
        clip=ClipVisionConfig(**d["clip"]),
        sam=SamConfig(**sam),
        lora=None if d.get("lora") is None else LoraConfig(**d["lora"]),
        sasp=SaspConfig(**d["sasp"]),
        **{k: tup(v) for k, v in d.items() if k not in ("llama", "clip", "sam", "lora", "sasp")},
    )


# The HF config.json bridge, importable from here (`from read_jax.config import from_hf_config`) without an
# import cycle: `read_jax.hf_config` builds on this module.
_HF_CONFIG_NAMES = (
    "HF_ARCHITECTURES",
    "HF_LLAMA_DEFAULTS",
    "HF_USED",
    "HfConfigAudit",
    "audit_hf_config",
    "from_hf_config",
    "hf_architecture",
)


def __getattr__(name: str):
    if name in _HF_CONFIG_NAMES:
        from read_jax import hf_config

        return getattr(hf_config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
