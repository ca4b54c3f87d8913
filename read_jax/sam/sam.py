"""The SAM container: image encoder + prompt encoder + mask decoder, with Meta's attribute names.

PyTorch reference: segment-anything 1.0 (PyPI, 2023-04), `segment_anything/modeling/sam.py` (`Sam`) and
`build_sam.py` (`build_sam_vit_h`). Only the three sub-modules are state; `pixel_mean`/`pixel_std` are Meta's
non-persistent buffers (not in checkpoints), so here they are plain config constants used by
`read_jax.sam.transforms.preprocess` on the host. State paths: `image_encoder/...`, `prompt_encoder/...`,
`mask_decoder/...` (inside READ: `visual_model/...`).

Typical use (one image, n prompts):
  emb = sam.image_encoder(images)                       # float[1, h, w, C]
  sparse, dense = sam.prompt_encoder(points, labels, text_embeds)
  low, iou = sam.mask_decoder(emb, sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=False)
  masks = transforms.postprocess_masks(low, input_size, original_size, cfg.image_size)

Shape letters (as in the sub-modules): n prompts, h x w image-embedding grid (S / 16), C prompt_embed_dim,
S input side; images and embeddings are NHWC (Meta: NCHW).
"""

from __future__ import annotations

from flax import nnx

from read_jax.config import SamConfig
from read_jax.sam.image_encoder import ImageEncoderViT
from read_jax.sam.mask_decoder import MaskDecoder
from read_jax.sam.prompt_encoder import PromptEncoder


class Sam(nnx.Module):
    """SAM (ViT-H by default), built from a `SamConfig`."""

    mask_threshold: float = 0.0

    def __init__(self, cfg: SamConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.image_encoder = ImageEncoderViT(cfg, rngs=rngs)
        self.prompt_encoder = PromptEncoder(cfg, rngs=rngs)
        self.mask_decoder = MaskDecoder(cfg, rngs=rngs)
