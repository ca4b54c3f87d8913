"""transformers' `CLIPVisionModel` as the reference for `read_jax.clip`: a tiny model with perturbed weights.

Weights go torch -> JAX only through `read_jax.convert.clip.CLIP_VISION_RULES` (the real converter's table).
torch and transformers are imported when `hf_clip` / `build_pair` are called.
"""

from __future__ import annotations

from flax import nnx

from read_jax.clip import ClipVisionModel
from read_jax.config import ClipVisionConfig
from read_jax.convert.clip import CLIP_VISION_IGNORE, CLIP_VISION_RULES
from read_jax.convert.common import abstract_leaves, convert, load_leaves
from torchref.common import state_dict_numpy


def hf_clip(cfg: ClipVisionConfig):
    """HF `CLIPVisionModel` with the architecture of `cfg` (eager attention, eval mode), weights perturbed.

    Draws from torch's global generator (seed it first).
    """
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    hf_cfg = CLIPVisionConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_channels=cfg.num_channels,
        layer_norm_eps=cfg.layer_norm_eps,
        hidden_act=cfg.hidden_act,
        attn_implementation="eager",
    )
    model = CLIPVisionModel(hf_cfg).eval()
    # HF initialises LayerNorms to (1, 0) and biases to 0; perturb everything so a swapped scale/bias,
    # a missing bias or a transposed kernel cannot hide.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def checkpoint_keys(sd: dict) -> dict:
    """A `CLIPVisionModel` state dict under its checkpoint keys.

    transformers 5 keeps the layers at the top level in memory (its loader strips the on-disk
    `vision_model.` prefix); the openai checkpoint and READ's transformers-4.31 layout carry the prefix,
    and that is what the table maps.
    """
    return {k if k.startswith("vision_model.") else "vision_model." + k: v for k, v in sd.items()}


def load_clip(cfg: ClipVisionConfig, sd: dict) -> ClipVisionModel:
    """A read_jax `ClipVisionModel` filled from checkpoint keys `sd` through `CLIP_VISION_RULES`.

    Built abstractly and filled by the strict converter (every leaf loaded; no eager random init).
    """
    model = nnx.eval_shape(lambda: ClipVisionModel(cfg, rngs=nnx.Rngs(0)))
    load_leaves(model, convert(sd, CLIP_VISION_RULES, abstract_leaves(model), ignore=CLIP_VISION_IGNORE))
    return model


def build_pair(cfg: ClipVisionConfig):
    """(HF `CLIPVisionModel` from `hf_clip`, read_jax `ClipVisionModel` with the same weights).

    Draws from torch's global generator (seed it first).
    """
    ref = hf_clip(cfg)
    return ref, load_clip(cfg, checkpoint_keys(state_dict_numpy(ref)))
