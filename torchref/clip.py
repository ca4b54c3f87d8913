"""transformers' `CLIPVisionModel` as the reference for `read_jax.clip`: a tiny model with perturbed weights.

torch and transformers are imported when `hf_clip` is called.
"""

from __future__ import annotations

from read_jax.config import ClipVisionConfig


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
