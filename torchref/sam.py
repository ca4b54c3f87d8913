"""Meta's `segment_anything` as the reference for `read_jax.sam`: imports without torchvision, tiny builders.

Importing Meta's code: the package `__init__` imports the predictor, whose transforms import torchvision;
PyPI's torchvision does not import beside the pinned CPU torch, and the modeling code needs torch alone.
Without torchvision we register a bare package (its `__init__` not run) and import the submodules from it
(`meta_sam`); `meta_transforms` imports `segment_anything.utils.transforms` over a two-function PIL shim of
torchvision.

Builders: `build_meta_sam` (Meta's `Sam` with the architecture of a `SamConfig`, every tensor randomised) and
`build_pair` (that model and a read_jax `Sam` with the same weights, copied through `read_jax.convert.sam`,
the table the real converter uses). `TINY` is the tiny READ's SAM (256 px, 16x16 tokens, window 7 padded to
21, global block 1).

torch, segment_anything: imported when a function is called. A missing package raises ModuleNotFoundError
(`tests.helpers.require_meta_sam` turns that into a skip, or a failure under CI). Nothing here changes torch's
global state (autograd mode, seed): callers that want `no_grad` set it themselves.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
from functools import partial
from types import SimpleNamespace
from unittest import mock

from flax import nnx

from read_jax.config import ReadConfig, SamConfig
from read_jax.convert.common import abstract_leaves, convert, load_leaves
from read_jax.convert.sam import sam_rules
from read_jax.sam import Sam
from torchref.common import state_dict_numpy, to_np

TINY = ReadConfig.tiny().sam


# ---- Meta's code without torchvision -----------------------------------------------------------------------
def meta_sam():
    """(segment_anything.modeling, segment_anything.build_sam).

    Raises ModuleNotFoundError (`name` "torch" or "segment_anything") when either package is missing.
    """
    import torch  # noqa: F401  (a missing torch is reported as such, not as segment_anything's import error)

    try:
        from segment_anything import build_sam, modeling

        return modeling, build_sam
    except ModuleNotFoundError as e:
        if e.name != "torchvision":
            raise
    spec = importlib.util.find_spec("segment_anything")
    if spec is None:
        raise ModuleNotFoundError("No module named 'segment_anything'", name="segment_anything")
    pkg = types.ModuleType("segment_anything")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__ = spec
    sys.modules["segment_anything"] = pkg
    return importlib.import_module("segment_anything.modeling"), importlib.import_module(
        "segment_anything.build_sam"
    )


def _torchvision_pil_shim():
    """torchvision.transforms.functional's PIL path, for machines without torchvision (not in the test extra).

    torchvision 0.28: `to_pil_image(uint8[H, W, 3])` is `Image.fromarray(x, "RGB")` and `resize(pil, [h, w])`
    returns the image itself when the size is unchanged, else `pil.resize((w, h), BILINEAR)`
    (`_functional_pil.resize`). (ResizeLongestSide with the real torchvision 0.28 was checked equal to
    `read_jax.sam.transforms.resize_longest_side` on these and more sizes.)
    """
    from PIL import Image

    tf = types.ModuleType("torchvision.transforms.functional")
    tf.to_pil_image = lambda pic: Image.fromarray(pic, mode="RGB")
    tf.resize = lambda img, size: (
        img if [img.height, img.width] == list(size) else img.resize((size[1], size[0]), Image.BILINEAR)
    )
    tv, tvt = types.ModuleType("torchvision"), types.ModuleType("torchvision.transforms")
    tv.transforms, tvt.functional = tvt, tf
    return {"torchvision": tv, "torchvision.transforms": tvt, "torchvision.transforms.functional": tf}


def meta_transforms():
    """Meta's `segment_anything.utils.transforms` (the torchvision shim only if torchvision is missing)."""
    meta_sam()
    try:
        return importlib.import_module("segment_anything.utils.transforms")
    except ModuleNotFoundError as e:
        if e.name != "torchvision":
            raise
    with mock.patch.dict(sys.modules, _torchvision_pil_shim()):
        sys.modules.pop("segment_anything.utils.transforms", None)
        return importlib.import_module("segment_anything.utils.transforms")


def meta_postprocess(low, input_size, original_size, image_size):
    """Meta's `Sam.postprocess_masks` on numpy low-res masks float[n, m, l, l] -> float32 numpy masks."""
    import torch

    m, _ = meta_sam()
    fake = SimpleNamespace(image_encoder=SimpleNamespace(img_size=image_size))
    return to_np(m.Sam.postprocess_masks(fake, torch.from_numpy(low), input_size, original_size))


# ---- tiny randomised models --------------------------------------------------------------------------------
def build_meta_sam(cfg: SamConfig):
    """Meta's `Sam` with the architecture of `cfg`, fp32, eval mode, every tensor randomised."""
    import torch

    m, _ = meta_sam()
    c, g, s = cfg.prompt_embed_dim, cfg.image_embedding_size, cfg.image_size
    sam = m.Sam(
        image_encoder=m.ImageEncoderViT(
            img_size=s,
            patch_size=cfg.patch_size,
            embed_dim=cfg.encoder_embed_dim,
            depth=cfg.encoder_depth,
            num_heads=cfg.encoder_num_heads,
            mlp_ratio=cfg.mlp_ratio,
            out_chans=c,
            qkv_bias=cfg.qkv_bias,
            norm_layer=partial(torch.nn.LayerNorm, eps=cfg.layer_norm_eps),
            use_rel_pos=cfg.use_rel_pos,
            window_size=cfg.window_size,
            global_attn_indexes=tuple(cfg.global_attn_indexes),
        ),
        prompt_encoder=m.PromptEncoder(
            embed_dim=c, image_embedding_size=(g, g), input_image_size=(s, s), mask_in_chans=cfg.mask_in_chans
        ),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=cfg.num_multimask_outputs,
            transformer=m.TwoWayTransformer(
                depth=cfg.transformer_depth,
                embedding_dim=c,
                mlp_dim=cfg.transformer_mlp_dim,
                num_heads=cfg.transformer_num_heads,
                attention_downsample_rate=cfg.attention_downsample_rate,
            ),
            transformer_dim=c,
            iou_head_depth=cfg.iou_head_depth,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        ),
        pixel_mean=list(cfg.pixel_mean),
        pixel_std=list(cfg.pixel_std),
    )
    randomize_(sam)
    return sam.eval()


def randomize_(module, seed: int = 0):
    """Fill every parameter and buffer with random values (torch zero-inits pos_embed, rel_pos, biases and
    sets LayerNorms to 1/0, which would hide layout bugs). Scales keep activations O(1)."""
    import torch

    meta_sam()
    gen = torch.Generator().manual_seed(seed)

    def randn(t):
        return torch.randn(t.shape, generator=gen, dtype=t.dtype)

    norms = (torch.nn.LayerNorm, importlib.import_module("segment_anything.modeling.common").LayerNorm2d)
    with torch.no_grad():
        for mod in module.modules():
            for name, p in mod.named_parameters(recurse=False):
                if isinstance(mod, norms):
                    p.copy_((1.0 if name == "weight" else 0.0) + 0.2 * randn(p))
                elif name == "weight" and isinstance(
                    mod, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)
                ):
                    fan_in = p[0].numel() if not isinstance(mod, torch.nn.ConvTranspose2d) else p.shape[0]
                    p.copy_(randn(p) / math.sqrt(fan_in))
                elif name == "bias":
                    p.copy_(0.2 * randn(p))
                else:  # pos_embed, rel_pos_h/w, nn.Embedding tokens and point embeddings
                    p.copy_(0.5 * randn(p))
            for name, b in mod.named_buffers(recurse=False):
                if name == "positional_encoding_gaussian_matrix":
                    b.copy_(randn(b))
    return module


def build_pair(cfg: SamConfig = TINY, seed: int = 0):
    """(Meta Sam, read_jax Sam with the same weights copied through `sam_rules()`)."""
    ref = build_meta_sam(cfg)
    # Abstract init + load: eager random init would compile one kernel per parameter shape (~20 s on CPU).
    ours = nnx.eval_shape(lambda: Sam(cfg, rngs=nnx.Rngs(seed)))
    leaves = convert(state_dict_numpy(ref), sam_rules(), abstract_leaves(ours))
    load_leaves(ours, leaves)
    return ref, ours


# ---- READ's positional encoding in the model dtype ---------------------------------------------------------
def release_position_encoding(pe_layer):
    """Give a Meta `PositionEmbeddingRandom` the numerics of READ's copy of SAM (rui-qian/READ@2549240
    `model/segment_anything/modeling/prompt_encoder.py`), which differ from Meta's in two places:

      * the normalised coordinates 2c - 1 are cast to the Gaussian matrix's dtype before the matmul (Meta
        keeps them fp32, which fails outright against a bf16 matrix);
      * the image grid (cumsum of ones - 0.5, divided by the size) is built in the matrix's dtype, not fp32.

    In fp32 both are Meta's code exactly. Returns the layer, its class swapped in place (buffers kept).
    """
    import numpy as np
    import torch

    m, _ = meta_sam()

    class ReleasePositionEmbedding(m.prompt_encoder.PositionEmbeddingRandom):
        def _pe_encoding(self, coords):
            gauss = self.positional_encoding_gaussian_matrix
            phase = (2 * coords - 1).to(gauss.dtype) @ gauss
            phase = 2 * np.pi * phase
            return torch.cat([torch.sin(phase), torch.cos(phase)], dim=-1)

        def forward(self, size):
            h, w = size
            gauss = self.positional_encoding_gaussian_matrix
            ones = torch.ones((h, w), device=gauss.device, dtype=gauss.dtype)
            ys = (ones.cumsum(dim=0) - 0.5) / h
            xs = (ones.cumsum(dim=1) - 0.5) / w
            return self._pe_encoding(torch.stack([xs, ys], dim=-1)).permute(2, 0, 1)

    pe_layer.__class__ = ReleasePositionEmbedding
    return pe_layer
