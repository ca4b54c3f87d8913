"""Key tables: HF `CLIPVisionModel` -> `read_jax.clip.ClipVisionModel`, LLaVA `mm_projector` -> `MmProjector`.

Source keys (openai/clip-vit-large-patch14-336, read_reference.md §10.2):
  vision_model.embeddings.{class_embedding [D], patch_embedding.weight [D,3,14,14],
                           position_embedding.weight [577,D]}
  vision_model.pre_layrnorm.{weight,bias}
  vision_model.encoder.layers.N.{self_attn.{q,k,v,out}_proj, layer_norm1, mlp.fc1, mlp.fc2,
                                 layer_norm2}.{weight,bias}
  vision_model.post_layernorm.{weight,bias}   (kept as a parameter; LLaVA never runs it)
  vision_model.embeddings.position_ids        (a buffer in older transformers: ignored)
Inside a LLaVA/READ state dict the same keys sit under `model.vision_tower.vision_tower.` (`CLIPVisionTower`
wraps `CLIPVisionModel` as `.vision_tower`); the projector is `model.mm_projector.{0,2}.{weight,bias}`.

Pure numpy: no torch import (house style §15).
"""

from __future__ import annotations

import re

from read_jax.convert.common import Rule, conv, linear, prefixed

# Target paths are relative to a ClipVisionModel; `clip_rules(dst_prefix=...)` re-roots them.
CLIP_VISION_RULES = [
    Rule(r"vision_model\.embeddings\.class_embedding", "vision_model/embeddings/class_embedding"),
    Rule(
        r"vision_model\.embeddings\.patch_embedding\.weight",
        "vision_model/embeddings/patch_embedding/kernel",
        conv,
    ),
    Rule(
        r"vision_model\.embeddings\.position_embedding\.weight",
        "vision_model/embeddings/position_embedding/embedding",
    ),
    Rule(r"vision_model\.(pre_layrnorm|post_layernorm)\.weight", r"vision_model/\1/scale"),
    Rule(r"vision_model\.(pre_layrnorm|post_layernorm)\.bias", r"vision_model/\1/bias"),
    Rule(
        r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.weight",
        r"vision_model/encoder/layers/\1/self_attn/\2/kernel",
        linear,
    ),
    Rule(
        r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.bias",
        r"vision_model/encoder/layers/\1/self_attn/\2/bias",
    ),
    Rule(
        r"vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.weight",
        r"vision_model/encoder/layers/\1/mlp/\2/kernel",
        linear,
    ),
    Rule(
        r"vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.bias",
        r"vision_model/encoder/layers/\1/mlp/\2/bias",
    ),
    Rule(
        r"vision_model\.encoder\.layers\.(\d+)\.(layer_norm1|layer_norm2)\.weight",
        r"vision_model/encoder/layers/\1/\2/scale",
    ),
    Rule(
        r"vision_model\.encoder\.layers\.(\d+)\.(layer_norm1|layer_norm2)\.bias",
        r"vision_model/encoder/layers/\1/\2/bias",
    ),
]

# Source keys dropped on purpose: the non-persistent `position_ids` buffer (arange) that some transformers
# versions still save.
CLIP_VISION_IGNORE = [r"vision_model\.embeddings\.position_ids"]

# LLaVA's mlp2x_gelu `nn.Sequential(Linear, GELU, Linear)`: torch indices 0 and 2 stay the NNX list indices.
MM_PROJECTOR_RULES = [
    Rule(r"([02])\.weight", r"layers/\1/kernel", linear),
    Rule(r"([02])\.bias", r"layers/\1/bias"),
]

# LLaVA-v1's single `nn.Linear` projector (LISA's own code): `model.mm_projector.{weight,bias}`.
LINEAR_PROJECTOR_RULES = [
    Rule(r"weight", "layers/0/kernel", linear),
    Rule(r"bias", "layers/0/bias"),
]

# transformers' `LlavaForConditionalGeneration` names the same projector `multi_modal_projector.linear_{1,2}`.
HF_LLAVA_PROJECTOR_RULES = [
    Rule(r"linear_1\.weight", "layers/0/kernel", linear),
    Rule(r"linear_1\.bias", "layers/0/bias"),
    Rule(r"linear_2\.weight", "layers/2/kernel", linear),
    Rule(r"linear_2\.bias", "layers/2/bias"),
]

# Where these modules live in a LLaVA/READ checkpoint and in `read_jax.llava.LlavaModel`.
LLAVA_VISION_TOWER_PREFIX = "model.vision_tower.vision_tower."
LLAVA_MM_PROJECTOR_PREFIX = "model.mm_projector."


def clip_rules(src_prefix: str = "", dst_prefix: str = "") -> list[Rule]:
    """The CLIP table under key prefixes, e.g. `clip_rules(LLAVA_VISION_TOWER_PREFIX, "vision_tower/")`."""
    return prefixed(CLIP_VISION_RULES, src_prefix, dst_prefix)


def clip_ignore(src_prefix: str = "") -> list[str]:
    """`CLIP_VISION_IGNORE` under a source key prefix (regexes, for `Converter(ignore=...)`)."""
    return [re.escape(src_prefix) + p for p in CLIP_VISION_IGNORE]


def mm_projector_rules(
    src_prefix: str = LLAVA_MM_PROJECTOR_PREFIX, dst_prefix: str = "mm_projector/", kind: str = "mlp2x_gelu"
) -> list[Rule]:
    """The projector table (`kind`: "mlp2x_gelu" or "linear"); defaults map a LLaVA/READ checkpoint onto
    `LlavaModel.mm_projector`."""
    table = LINEAR_PROJECTOR_RULES if kind == "linear" else MM_PROJECTOR_RULES
    return prefixed(table, src_prefix, dst_prefix)
