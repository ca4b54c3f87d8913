"""A torch LISA (dvlab-research/LISA `model/LISA.py`, `model/llava/model/llava_arch.py`), tiny random configs.

LISA is READ's ancestor (read_reference.md §12): LLaVA + text_hidden_fcs + SAM, the [SEG] hidden state as
SAM's only prompt token (`prompt_encoder(points=None, boxes=None, masks=None, text_embeds=...)`), no SasP.
Its own code builds LLaVA-v1's single-Linear projector, and its default vision tower is
openai/clip-vit-large-patch14: 224 px, 16 x 16 = 256 image tokens, which is where the hard-coded 255 of its
[SEG]-mask shift comes from (P - 1).

`lisa_config(layout)` is the tiny ReadConfig of a LISA release layout; `TorchLisa(cfg)` is `torchref.read`'s
torch transcription with that config: with `cfg.sasp.enabled` False its forward is LISA's `model_forward`;
with it True, the same weights go through READ's SasP (Appendix E: SasP as a plug-in for LISA).
"""

from __future__ import annotations

import dataclasses

from read_jax.config import ReadConfig
from torchref.read import TorchRead

# CLIP ViT-L/14 at 224 px: the patch grid of LISA's tower.
LISA_CLIP_SIZE = 224
# (projector, vocabulary, [SEG] id) of LISA's release layouts (`read_jax.convert.inputs.LISA_TOKEN_LAYOUTS`).
LAYOUTS = {
    "v1": ("linear", 32004, 32003),  # xinlai/LISA-7B-v1: LLaVA-Lightning-7B-v1-1 base, <im_patch> at 32000
    "llava1.5": ("mlp2x_gelu", 32003, 32000),  # LISA forks on LLaVA-1.5 (LISA-AVS, PliersModel)
}


def lisa_config(layout: str = "v1", *, sasp: bool = False, dtype: str = "float32") -> ReadConfig:
    """A CPU-sized LISA: `ReadConfig.tiny` widths, LISA's 224-pixel CLIP grid, projector and token ids.

    The SasP setting is READ-7B's on the CLIP grid (16 -> 8 x 8) in fp32 (parity), `enabled=sasp`.
    """
    proj, vocab, seg = LAYOUTS[layout]
    base = ReadConfig.tiny(dtype, lora=None, max_segs=2)
    clip = dataclasses.replace(base.clip, image_size=LISA_CLIP_SIZE)
    sasp = dataclasses.replace(
        base.sasp.on_clip_grid(clip.grid_size), enabled=sasp, similarity_dtype="float32"
    )
    return base.replace(
        llama=dataclasses.replace(base.llama, vocab_size=vocab),
        clip=clip,
        sasp=sasp,
        mm_projector_type=proj,
        seg_token_id=seg,
    )


class TorchLisa(TorchRead):
    """The torch LISA reference (fp32): `TorchRead` on a LISA config (see the module docstring)."""

    def __init__(self, cfg: ReadConfig, seed: int = 0):
        if cfg.clip.image_size != LISA_CLIP_SIZE:
            raise ValueError(f"LISA's tower is {LISA_CLIP_SIZE} px, got {cfg.clip.image_size}")
        super().__init__(cfg, seed)
