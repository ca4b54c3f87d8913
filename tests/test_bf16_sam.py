"""bf16 parity of SAM: read_jax in bf16 vs Meta's `segment_anything` in bf16, same bf16 weights.

The reference's bf16 numerics (READ runs SAM from a bf16 checkpoint): every op in bf16, including the
attention logits, the relative-position terms and LayerNorm2d's mean/variance (read_jax keeps attention
logits and LayerNorm statistics in fp32, as fused kernels do), and the mask logits cast to fp32 after the
decoder for postprocessing. One deliberate difference, kept on both sides here: the prompt encoder's
Gaussian PE matrix stays fp32 (`torchref.read.TorchRead.released_dtype`; LISA-style encoders cast the
coordinates to bf16).

Depths (`tests/bf16.py`), tiny SAM (2 encoder blocks, 2 two-way blocks):
  image embeddings: patch conv 1, + pos 1, per block 12 (LayerNorm 1, qkv 1, relative-position terms 1,
    probabilities 1, P.V 1, proj 1, residual 1, LayerNorm 1, lin1 1, GELU 1, lin2 1, residual 1), neck 14
    (conv 1, LayerNorm2d 6, conv 1, LayerNorm2d 6): D = 16 + 12 * 2 = 40;
  low-res mask logits from the same embedding and prompts: sparse prompt 2 (PE cast, + label embedding),
    src + dense 1, per two-way block 26 (self-attention 4 + residual + norm; token->image 5 + residual +
    norm; MLP 3 + residual + norm; image->token 5 + residual + norm), final attention 7, upscaling 10
    (ConvT, LayerNorm2d 6, GELU, ConvT, GELU), hypernetwork MLP 3, the product 1: D = 24 + 26 * 2 = 76.
"""

import copy
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.bf16 import check
from tests.helpers import require_meta_sam, require_torch


@pytest.fixture(scope="module")
def models():
    torch = require_torch()
    require_meta_sam()
    from read_jax.convert.common import abstract_leaves, convert, load_leaves
    from read_jax.convert.sam import sam_rules
    from read_jax.sam import Sam
    from torchref.common import state_dict_numpy
    from torchref.sam import TINY, build_pair

    ref32, _ = build_pair(TINY)
    cfg16 = dataclasses.replace(TINY, dtype="bfloat16", param_dtype="bfloat16")
    ours = nnx.eval_shape(lambda: Sam(cfg16, rngs=nnx.Rngs(0)))
    load_leaves(ours, convert(state_dict_numpy(ref32), sam_rules(), abstract_leaves(ours)))
    ref16 = copy.deepcopy(ref32)
    gauss = ref16.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.clone()
    ref16.to(torch.bfloat16)
    ref16.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix = gauss
    return TINY, ref32, ref16, ours


def test_bf16_sam_image_embeddings(models):
    import torch

    cfg, ref32, ref16, ours = models
    img = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))
    got = nnx.jit(lambda m, x: m.image_encoder(x))(ours, jnp.asarray(img.numpy().transpose(0, 2, 3, 1)))
    assert got.dtype == jnp.bfloat16
    want16 = ref16.image_encoder(img.bfloat16()).permute(0, 2, 3, 1)
    want32 = ref32.image_encoder(img).permute(0, 2, 3, 1)
    check("sam image embeddings", np.asarray(got, np.float32), want16, want32, 40)


def test_bf16_sam_mask_logits_from_the_same_prompts(models):
    """Prompt encoder + mask decoder from the reference's bf16 embedding and the same SasP-like prompts
    (30 points, labels 1/0/-1, a [SEG] text token); the low-res logits leave the decoder in bf16 and are
    cast to fp32, as READ's postprocessing does."""
    import torch

    from read_jax.sam import transforms

    cfg, ref32, ref16, ours = models
    s, c = cfg.image_size, cfg.prompt_embed_dim
    gen = torch.Generator().manual_seed(3)
    img = torch.randn(2, 3, s, s, generator=gen)
    n = 8  # prompts: enough independent decoder runs for the accuracy ratio
    pts = torch.rand(n, 30, 2, generator=gen) * s
    lab = torch.randint(-1, 2, (n, 30), generator=gen)
    text = torch.randn(n, 1, c, generator=gen)
    which = [k % 2 for k in range(n)]  # image of each prompt

    def meta(model, emb, dt):
        sparse, dense = model.prompt_encoder(points=(pts, lab), boxes=None, masks=None)
        sparse = torch.cat([sparse, text.to(sparse.dtype)], 1).to(dt)  # READ.py:306-309: sparse cast to bf16
        pe = model.prompt_encoder.get_dense_pe().to(dt)
        lows = [
            model.mask_decoder(emb[i : i + 1], pe, sparse[k : k + 1], dense[k : k + 1].to(dt), False)[0]
            for k, i in enumerate(which)
        ]
        return torch.cat(lows).float()[:, 0]

    emb16 = ref16.image_encoder(img.bfloat16())
    low16 = meta(ref16, emb16, torch.bfloat16)
    low32 = meta(ref32, emb16.float(), torch.float32)  # the fp32 truth from the same embedding

    @nnx.jit
    def ours_fn(m, emb, p, l, t):
        sparse, dense = m.prompt_encoder(p, l, t)
        low, _ = m.mask_decoder(emb, m.prompt_encoder.get_dense_pe(), sparse, dense, False)
        full = jnp.full((low.shape[0], 2), s, jnp.int32)
        return low, transforms.postprocess_masks_padded(low, full, full, out_hw=(s, s), image_size=s)

    emb = jnp.asarray(emb16.float().numpy().transpose(0, 2, 3, 1), jnp.bfloat16)[jnp.asarray(which)]
    low, masks = ours_fn(
        ours, emb, jnp.asarray(pts.numpy()), jnp.asarray(lab.numpy()), jnp.asarray(text.numpy(), jnp.bfloat16)
    )
    assert low.dtype == jnp.bfloat16 and masks.dtype == jnp.float32
    check("sam low-res mask logits", np.asarray(low, np.float32)[:, 0], low16, low32, 76)
