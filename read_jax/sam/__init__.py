"""SAM (Meta's segment_anything 1.0) in NNX, with READ's prompt-encoder variant. NHWC throughout."""

from read_jax.sam.image_encoder import ImageEncoderViT
from read_jax.sam.mask_decoder import MaskDecoder
from read_jax.sam.prompt_encoder import PromptEncoder
from read_jax.sam.sam import Sam
from read_jax.sam.transformer import TwoWayTransformer

# Alias used by the project layout (house_style.md §4).
SamImageEncoder = ImageEncoderViT

__all__ = ["ImageEncoderViT", "MaskDecoder", "PromptEncoder", "Sam", "SamImageEncoder", "TwoWayTransformer"]
