"""LLaVA-1.5 in torch as the reference for `read_jax.llava`: the multimodal merge and the three modules.

`prepare_inputs` transcribes the reference `prepare_inputs_labels_for_multimodal` (read_reference.md §2.4)
row by row with `torch.cat`: the -200 placeholder is replaced in place by the P image tokens, text after it
shifts by P - 1, labels get P IGNORE entries and the attention mask gets P - 1 `True`s prepended.
`reference_modules` builds HF CLIP, the `mlp2x_gelu` projector and HF LLaMA from a `ReadConfig` with O(1)
random weights; `image_tokens` is `encode_images` (selected CLIP layer, CLS dropped, projected).
`build_pair` adds a read_jax `LlavaModel` with the same weights, copied through the real converter's tables
(`llava_rules`) from the three modules' weights under a READ/LLaVA checkpoint's keys (`checkpoint`).

torch and transformers are imported when a function is called.
"""

from __future__ import annotations

from flax import nnx

from read_jax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, ReadConfig
from read_jax.convert.clip import LLAVA_VISION_TOWER_PREFIX, clip_ignore, clip_rules, mm_projector_rules
from read_jax.convert.common import abstract_leaves, convert, load_leaves, prefixed
from read_jax.convert.llama import LLAMA_IGNORE, LLAMA_RULES
from read_jax.llava import LlavaModel
from torchref.common import state_dict_numpy


def prepare_inputs(ids, embed, image_features, labels, mask):
    """Reference merge (llava_arch.py `prepare_inputs_labels_for_multimodal`), one row at a time.

    Args: ids int[R, L], embed the token embedding module, image_features [R, P, C], labels int[R, L],
    mask bool[R, L] (torch tensors).
    Returns (embeds [R, E, C], labels [R, E], mask_prepended [R, E] (the reference's rule),
    mask_inserted [R, E] (the same bits, image inserted in place; differs only for left padding)).
    """
    import torch

    p_tokens = image_features.shape[1]
    out_e, out_l, out_m = [], [], []
    for r in range(ids.shape[0]):
        p = int((ids[r] == IMAGE_TOKEN_INDEX).nonzero()[0][0])
        out_e.append(torch.cat([embed(ids[r, :p]), image_features[r], embed(ids[r, p + 1 :])]))
        out_l.append(torch.cat([labels[r, :p], torch.full((p_tokens,), IGNORE_INDEX), labels[r, p + 1 :]]))
        out_m.append(torch.cat([mask[r, :p], torch.ones(p_tokens, dtype=torch.bool), mask[r, p + 1 :]]))
    prepended = torch.cat([torch.ones(ids.shape[0], p_tokens - 1, dtype=torch.bool), mask], dim=1)
    return torch.stack(out_e), torch.stack(out_l), prepended, torch.stack(out_m)


def reference_modules(cfg: ReadConfig):
    """HF CLIPVisionModel, the mlp2x_gelu Sequential and HF LlamaForCausalLM from `cfg`, random O(1) weights.

    Seeds torch's global generator with 0 (the modules' init and the weights drawn here use it).
    """
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    c, v = cfg.clip, cfg.llama
    torch.manual_seed(0)
    clip = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            image_size=c.image_size,
            patch_size=c.patch_size,
            layer_norm_eps=c.layer_norm_eps,
            hidden_act=c.hidden_act,
            attn_implementation="eager",
        )
    ).eval()
    proj = torch.nn.Sequential(
        torch.nn.Linear(c.hidden_size, v.hidden_size),
        torch.nn.GELU(),
        torch.nn.Linear(v.hidden_size, v.hidden_size),
    )
    llm = HFLlama(
        HFLlamaConfig(
            vocab_size=v.vocab_size,
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_hidden_layers,
            num_attention_heads=v.num_attention_heads,
            num_key_value_heads=v.num_key_value_heads,
            rms_norm_eps=v.rms_norm_eps,
            rope_theta=v.rope_theta,
            max_position_embeddings=v.max_position_embeddings,
            tie_word_embeddings=False,
            attn_implementation="eager",
        )
    ).eval()
    # O(1) activations (HF's std-0.02 init would make 1e-5 a loose bound) and non-trivial norm weights.
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for name, p in list(proj.named_parameters()) + list(llm.named_parameters()):
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif p.ndim == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
            else:
                p.normal_(0.0, 0.1)
    return clip, proj, llm


def image_tokens(clip, proj, pixels_nchw, select_layer: int):
    """LLaVA's `encode_images`: CLIP `hidden_states[select_layer]` without CLS, through the projector."""
    hidden = clip(pixel_values=pixels_nchw, output_hidden_states=True).hidden_states
    feats = hidden[select_layer][:, 1:]
    return proj(feats)


def checkpoint(clip, proj, llm) -> dict:
    """The three modules' weights (numpy) under a READ/LLaVA checkpoint's key layout.

    transformers 5 keeps the CLIP layers at the top level in memory; the on-disk layout has `vision_model.`.
    """
    sd = {LLAVA_VISION_TOWER_PREFIX + "vision_model." + k: v for k, v in state_dict_numpy(clip).items()}
    sd.update({"model.mm_projector." + k: v for k, v in state_dict_numpy(proj).items()})
    sd.update(state_dict_numpy(llm))
    return sd


def llava_rules():
    """The converter's tables for a `LlavaModel`: CLIP under the LLaVA prefix, the projector, LLaMA."""
    return (
        clip_rules(LLAVA_VISION_TOWER_PREFIX, "vision_tower/")
        + mm_projector_rules()
        + prefixed(LLAMA_RULES, "", "language_model/")
    )


def build_pair(cfg: ReadConfig):
    """((clip, proj, llm) from `reference_modules`, read_jax `LlavaModel` with the same weights).

    Seeds torch's global generator with 0 (through `reference_modules`). The model is built abstractly and
    every leaf filled by the strict converter (no eager random init).
    """
    clip, proj, llm = reference_modules(cfg)
    model = nnx.eval_shape(lambda: LlavaModel(cfg, rngs=nnx.Rngs(0)))
    leaves = convert(
        checkpoint(clip, proj, llm),
        llava_rules(),
        abstract_leaves(model),
        ignore=clip_ignore(LLAVA_VISION_TOWER_PREFIX) + LLAMA_IGNORE,
    )
    load_leaves(model, leaves)
    return (clip, proj, llm), model
