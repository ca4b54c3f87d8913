"""transformers' `LlavaForConditionalGeneration` (llava-hf) from a tiny ReadConfig, as the reference for
`read_jax.convert.llava_hf`.

`hf_llava(cfg)` builds the model with llava-hf's vocabulary (LLaMA's 32000 + `<image>` = 32000, `<pad>` =
32001, padded to 32064 rows), its `image_token_index`, feature layer and 'default' (CLS-dropping) strategy,
with O(1) random weights. `hf_forward` runs it the way llava-hf's processor feeds it: the one `<image>` of a
row expanded to the P image-token ids, which the model replaces by the projected CLIP features.

torch and transformers are imported when a function is called.
"""

from __future__ import annotations

from read_jax.config import IMAGE_TOKEN_INDEX, ReadConfig

LLAVA_HF_VOCAB = 32064
LLAVA_HF_IMAGE_TOKEN = 32000
LLAVA_HF_PAD_TOKEN = 32001


def hf_llava(cfg: ReadConfig, seed: int = 0):
    """An eval-mode fp32 `LlavaForConditionalGeneration` with `cfg`'s LLaMA / CLIP sizes (eager attention).

    Seeds torch's global generator with `seed`.
    """
    import torch
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    from torchref.llama import hf_config

    c, v = cfg.clip, cfg.llama
    text = hf_config(v)
    text.vocab_size = LLAVA_HF_VOCAB
    text.pad_token_id = None
    vision = CLIPVisionConfig(
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        image_size=c.image_size,
        patch_size=c.patch_size,
        layer_norm_eps=c.layer_norm_eps,
        hidden_act=c.hidden_act,
        projection_dim=8,
    )
    config = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=LLAVA_HF_IMAGE_TOKEN,
        vision_feature_layer=c.select_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=LLAVA_HF_PAD_TOKEN,
        image_seq_length=c.num_patches,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight", "layer_norm1.weight", "layer_norm2.weight")):
                p.uniform_(0.5, 1.5)
            elif p.ndim == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
            else:
                p.normal_(0.0, 0.1)
    return model


def hf_forward(model, input_ids, pixels_nchw, num_patches: int):
    """(logits [R, E, V], final-norm hidden states [R, E, C]) of llava-hf on rows with one -200 placeholder.

    Args: input_ids int[R, L] numpy with one IMAGE_TOKEN_INDEX per row (no padding); pixels_nchw float
    torch [R, 3, S, S].
    """
    import numpy as np
    import torch

    rows = []
    for row in np.asarray(input_ids):
        i = int(np.flatnonzero(row == IMAGE_TOKEN_INDEX)[0])
        rows.append(np.concatenate([row[:i], np.full(num_patches, LLAVA_HF_IMAGE_TOKEN), row[i + 1 :]]))
    ids = torch.from_numpy(np.stack(rows).astype(np.int64))
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels_nchw, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]
