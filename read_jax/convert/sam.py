"""Key table: Meta's segment_anything state dict (`sam_vit_h_4b8939.pth`) -> `read_jax.sam.Sam` state paths.

Also the SAM part of a READ checkpoint (`model.visual_model.*`, read_reference.md §10.2): use
`sam_rules("model.visual_model.", "visual_model/")`. numpy only (no torch here).

Layout changes (transforms from `read_jax.convert.common`):
  nn.Linear.weight [out, in]          -> kernel [in, out]              (`linear`)
  nn.Conv2d.weight [O, I, kh, kw]     -> kernel [kh, kw, I, O]         (`conv`)
  nn.ConvTranspose2d.weight [I,O,kh,kw] -> kernel [kh, kw, I, O], flipped (`conv_transpose`)
  nn.LayerNorm / LayerNorm2d weight   -> scale;  nn.Embedding.weight -> embedding (same layout)
Every source key has a rule (the prompt encoder's `mask_downscaling` is implemented, not ignored), and every
target leaf is filled, so `convert(...)` needs no `ignore` list for a SAM state dict.
"""

from __future__ import annotations

from read_jax.convert.common import Rule, conv, conv_transpose, linear, prefixed

_I = r"(\d+)"
_ENC = r"image_encoder\."
_PE = r"prompt_encoder\."
_DEC = r"mask_decoder\."
_TR = r"mask_decoder\.transformer\."

SAM_RULES: list[Rule] = [
    # ---- image encoder ----
    Rule(_ENC + r"patch_embed\.proj\.weight", "image_encoder/patch_embed/proj/kernel", conv),
    Rule(_ENC + r"patch_embed\.proj\.bias", "image_encoder/patch_embed/proj/bias"),
    Rule(_ENC + r"pos_embed", "image_encoder/pos_embed"),
    Rule(_ENC + rf"blocks\.{_I}\.(norm1|norm2)\.weight", r"image_encoder/blocks/\1/\2/scale"),
    Rule(_ENC + rf"blocks\.{_I}\.(norm1|norm2)\.bias", r"image_encoder/blocks/\1/\2/bias"),
    Rule(
        _ENC + rf"blocks\.{_I}\.attn\.(qkv|proj)\.weight", r"image_encoder/blocks/\1/attn/\2/kernel", linear
    ),
    Rule(_ENC + rf"blocks\.{_I}\.attn\.(qkv|proj)\.bias", r"image_encoder/blocks/\1/attn/\2/bias"),
    Rule(_ENC + rf"blocks\.{_I}\.attn\.(rel_pos_h|rel_pos_w)", r"image_encoder/blocks/\1/attn/\2"),
    Rule(_ENC + rf"blocks\.{_I}\.mlp\.(lin1|lin2)\.weight", r"image_encoder/blocks/\1/mlp/\2/kernel", linear),
    Rule(_ENC + rf"blocks\.{_I}\.mlp\.(lin1|lin2)\.bias", r"image_encoder/blocks/\1/mlp/\2/bias"),
    Rule(_ENC + r"neck\.([02])\.weight", r"image_encoder/neck/\1/kernel", conv),
    Rule(_ENC + r"neck\.([13])\.weight", r"image_encoder/neck/\1/scale"),
    Rule(_ENC + r"neck\.([13])\.bias", r"image_encoder/neck/\1/bias"),
    # ---- prompt encoder ----
    Rule(
        _PE + r"pe_layer\.positional_encoding_gaussian_matrix",
        "prompt_encoder/pe_layer/positional_encoding_gaussian_matrix",
    ),
    Rule(_PE + rf"point_embeddings\.{_I}\.weight", r"prompt_encoder/point_embeddings/\1/embedding"),
    Rule(_PE + r"(not_a_point_embed|no_mask_embed)\.weight", r"prompt_encoder/\1/embedding"),
    Rule(_PE + r"mask_downscaling\.([036])\.weight", r"prompt_encoder/mask_downscaling/\1/kernel", conv),
    Rule(_PE + r"mask_downscaling\.([036])\.bias", r"prompt_encoder/mask_downscaling/\1/bias"),
    Rule(_PE + r"mask_downscaling\.([14])\.weight", r"prompt_encoder/mask_downscaling/\1/scale"),
    Rule(_PE + r"mask_downscaling\.([14])\.bias", r"prompt_encoder/mask_downscaling/\1/bias"),
    # ---- mask decoder: two-way transformer ----
    Rule(
        _TR + rf"layers\.{_I}\.(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"
        r"\.(q_proj|k_proj|v_proj|out_proj)\.weight",
        r"mask_decoder/transformer/layers/\1/\2/\3/kernel",
        linear,
    ),
    Rule(
        _TR + rf"layers\.{_I}\.(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"
        r"\.(q_proj|k_proj|v_proj|out_proj)\.bias",
        r"mask_decoder/transformer/layers/\1/\2/\3/bias",
    ),
    Rule(_TR + rf"layers\.{_I}\.(norm[1-4])\.weight", r"mask_decoder/transformer/layers/\1/\2/scale"),
    Rule(_TR + rf"layers\.{_I}\.(norm[1-4])\.bias", r"mask_decoder/transformer/layers/\1/\2/bias"),
    Rule(
        _TR + rf"layers\.{_I}\.mlp\.(lin1|lin2)\.weight",
        r"mask_decoder/transformer/layers/\1/mlp/\2/kernel",
        linear,
    ),
    Rule(_TR + rf"layers\.{_I}\.mlp\.(lin1|lin2)\.bias", r"mask_decoder/transformer/layers/\1/mlp/\2/bias"),
    Rule(
        _TR + r"final_attn_token_to_image\.(q_proj|k_proj|v_proj|out_proj)\.weight",
        r"mask_decoder/transformer/final_attn_token_to_image/\1/kernel",
        linear,
    ),
    Rule(
        _TR + r"final_attn_token_to_image\.(q_proj|k_proj|v_proj|out_proj)\.bias",
        r"mask_decoder/transformer/final_attn_token_to_image/\1/bias",
    ),
    Rule(_TR + r"norm_final_attn\.weight", "mask_decoder/transformer/norm_final_attn/scale"),
    Rule(_TR + r"norm_final_attn\.bias", "mask_decoder/transformer/norm_final_attn/bias"),
    # ---- mask decoder: tokens, upscaling, heads ----
    Rule(_DEC + r"(iou_token|mask_tokens)\.weight", r"mask_decoder/\1/embedding"),
    Rule(
        _DEC + r"output_upscaling\.([03])\.weight", r"mask_decoder/output_upscaling/\1/kernel", conv_transpose
    ),
    Rule(_DEC + r"output_upscaling\.([03])\.bias", r"mask_decoder/output_upscaling/\1/bias"),
    Rule(_DEC + r"output_upscaling\.(1)\.weight", r"mask_decoder/output_upscaling/\1/scale"),
    Rule(_DEC + r"output_upscaling\.(1)\.bias", r"mask_decoder/output_upscaling/\1/bias"),
    Rule(
        _DEC + rf"output_hypernetworks_mlps\.{_I}\.layers\.{_I}\.weight",
        r"mask_decoder/output_hypernetworks_mlps/\1/layers/\2/kernel",
        linear,
    ),
    Rule(
        _DEC + rf"output_hypernetworks_mlps\.{_I}\.layers\.{_I}\.bias",
        r"mask_decoder/output_hypernetworks_mlps/\1/layers/\2/bias",
    ),
    Rule(
        _DEC + rf"iou_prediction_head\.layers\.{_I}\.weight",
        r"mask_decoder/iou_prediction_head/layers/\1/kernel",
        linear,
    ),
    Rule(
        _DEC + rf"iou_prediction_head\.layers\.{_I}\.bias", r"mask_decoder/iou_prediction_head/layers/\1/bias"
    ),
]


def sam_rules(prefix: str = "", target_prefix: str = "") -> list[Rule]:
    """The SAM key table, optionally under other prefixes.

    Args:
      prefix: source-key prefix, e.g. "model.visual_model." for a READ/LISA checkpoint ("" for the `.pth`).
      target_prefix: state-path prefix of the `Sam` module in the target model, e.g. "visual_model/".
    """
    return prefixed(SAM_RULES, prefix, target_prefix) if (prefix or target_prefix) else list(SAM_RULES)


# Source keys a SAM state dict may carry that have no target: none (Meta's pixel_mean/std are non-persistent).
SAM_IGNORE: tuple[str, ...] = ()

__all__ = ["SAM_IGNORE", "SAM_RULES", "sam_rules"]
