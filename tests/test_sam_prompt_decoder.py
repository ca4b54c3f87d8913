"""SAM prompt encoder (incl. READ's text-token variant) and mask decoder: parity with Meta's modules.

Tiny configs with every tensor randomised, weights copied through `read_jax.convert.sam`. fp32, atol 1e-5.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import require_meta_sam, require_torch
from torchref.common import state_dict_numpy, to_np
from torchref.sam import TINY, build_pair

# mask_in_chans 8 (tiny has 4, whose first LayerNorm2d sees a single channel and normalises it away).
CFG = dataclasses.replace(TINY, mask_in_chans=8)
S, G, C = CFG.image_size, CFG.image_embedding_size, CFG.prompt_embed_dim
ATOL = 1e-5


@pytest.fixture(scope="module")
def pair():
    require_torch()
    require_meta_sam()
    return build_pair(CFG)


def _points(torch, n=3, np_=6, seed=0):
    """Coordinates mostly inside the S frame, some outside; labels with all of 1, 0 and -1."""
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(n, np_, 2, generator=g) * (S + 60) - 30
    lab = torch.tensor([1, 0, -1, 1, 0, 1] * n)[: n * np_].reshape(n, np_)
    lab = lab[:, torch.randperm(np_, generator=g)].contiguous()
    return pts, lab


def _j(x):
    return jnp.asarray(to_np(x)) if x.dtype.is_floating_point else jnp.asarray(x.numpy())


def _nhwc(x):
    return to_np(x).transpose(0, 2, 3, 1)


# ---- prompt encoder -------------------------------------------------------------------------------------
def test_dense_pe(pair):
    ref, ours = pair
    want = _nhwc(ref.prompt_encoder.get_dense_pe())[0]
    np.testing.assert_allclose(np.asarray(ours.prompt_encoder.get_dense_pe()), want, atol=ATOL)


def test_points_with_padding_point_all_labels(pair):
    torch = require_torch()
    ref, ours = pair
    pts, lab = _points(torch)
    sparse_ref, dense_ref = ref.prompt_encoder(points=(pts, lab), boxes=None, masks=None)
    sparse, dense = ours.prompt_encoder(_j(pts), _j(lab))
    assert sparse.shape == (3, 7, C)  # 6 points + Meta's padding point
    np.testing.assert_allclose(np.asarray(sparse), to_np(sparse_ref), atol=ATOL)
    np.testing.assert_allclose(np.asarray(dense), _nhwc(dense_ref), atol=ATOL)


def test_points_without_padding_point(pair):
    torch = require_torch()
    ref, ours = pair
    pts, lab = _points(torch, seed=1)
    want = ref.prompt_encoder._embed_points(pts, lab, pad=False)
    sparse, _ = ours.prompt_encoder(_j(pts), _j(lab), pad_point=False)
    np.testing.assert_allclose(np.asarray(sparse), to_np(want), atol=ATOL)


def test_boxes_with_and_without_points(pair):
    torch = require_torch()
    ref, ours = pair
    pts, lab = _points(torch, seed=2)
    boxes = torch.tensor([[10.0, 20.0, 200.0, 150.0], [0.0, 0.0, 255.0, 255.0], [37.5, 5.0, 60.0, 240.0]])
    sparse_ref, _ = ref.prompt_encoder(points=(pts, lab), boxes=boxes, masks=None)  # boxes -> no padding
    sparse, _ = ours.prompt_encoder(_j(pts), _j(lab), boxes=_j(boxes))
    assert sparse.shape == (3, 6 + 2, C)
    np.testing.assert_allclose(np.asarray(sparse), to_np(sparse_ref), atol=ATOL)
    sparse_ref, _ = ref.prompt_encoder(points=None, boxes=boxes, masks=None)
    sparse, _ = ours.prompt_encoder(boxes=_j(boxes))
    np.testing.assert_allclose(np.asarray(sparse), to_np(sparse_ref), atol=ATOL)


def test_read_text_token_variant(pair):
    """READ: [points, padding point, text] (reference = Meta's sparse output + the token, concatenated)."""
    torch = require_torch()
    ref, ours = pair
    pts, lab = _points(torch, seed=3)
    text = torch.randn(3, 1, C, generator=torch.Generator().manual_seed(4))
    sparse_ref, _ = ref.prompt_encoder(points=(pts, lab), boxes=None, masks=None)
    want = torch.cat([sparse_ref, text], dim=1)
    sparse, dense = ours.prompt_encoder(_j(pts), _j(lab), text_embeds=_j(text))
    assert sparse.shape == (3, 6 + 1 + 1, C) and dense.shape == (3, G, G, C)
    np.testing.assert_allclose(np.asarray(sparse), to_np(want), atol=ATOL)
    # LISA style: text only.
    sparse, _ = ours.prompt_encoder(text_embeds=_j(text))
    np.testing.assert_allclose(np.asarray(sparse), to_np(text), atol=0)


def _mask_path_condition(torch, prompt_encoder, masks):
    """kappa[n, h, w]: how strongly the mask path amplifies fp32 rounding, per dense-embedding pixel.

    The path is conv 2x2/2 (1 -> mic/4 channels) -> LayerNorm2d over those mic/4 channels -> GELU -> conv ->
    LayerNorm2d -> GELU -> conv 1x1. The first LayerNorm normalises only mic/4 = 2 channels: its output is
    +-(x0 - x1) / (2 sigma) with sigma = sqrt(var_c(x) + eps), so where the two channels nearly agree (sigma
    down to sqrt(eps) = 1e-3) it turns an input error delta into an output error of up to delta / sigma.
    Its input is a 5-term fp32 sum (4 taps + bias), rounded differently by XLA and by torch: delta is of the
    order of u * (sum(|w m|) + |b|), u = 2^-24. kappa = (sum(|w m|) + |b|) / sigma, the largest over the 2x2
    conv-1 pixels that feed one output pixel (conv 2 has kernel 2 and stride 2, conv 3 is 1x1).
    """
    conv, norm = prompt_encoder.mask_downscaling[0], prompt_encoder.mask_downscaling[1]
    x = conv(masks)  # [n, mic/4, 2h, 2w]
    magnitude = torch.nn.functional.conv2d(masks.abs(), conv.weight.abs(), conv.bias.abs(), stride=2)
    sigma = torch.sqrt(x.var(1, unbiased=False) + norm.eps)  # LayerNorm2d's biased variance
    kappa = magnitude.amax(1) / sigma  # [n, 2h, 2w]
    return to_np(torch.nn.functional.max_pool2d(kappa[:, None], 2)[:, 0])


def test_mask_prompt_and_no_prompt(pair):
    torch = require_torch()
    ref, ours = pair
    masks = torch.randn(2, 1, 4 * G, 4 * G, generator=torch.Generator().manual_seed(5))
    _, dense_ref = ref.prompt_encoder(points=None, boxes=None, masks=masks)
    _, dense = ours.prompt_encoder(masks=_j(masks[:, 0]))
    # The mask path is compared per pixel with ATOL + 2 u kappa (see `_mask_path_condition`): each
    # implementation's conv-1 output is within about u * (sum(|w m|) + |b|) of the exact sum (5 terms whose
    # rounding errors partly cancel), so the two differ by up to ~2 u (sum(|w m|) + |b|); the first LayerNorm
    # scales that by 1 / sigma, and the layers after it have gain ~1 (LayerNorm weights 1 +- 0.2, GELU' <=
    # 1.13, fan-in-scaled convs, the second LayerNorm over 8 channels). kappa here: 9 to 2000, median 51; the
    # allowance exceeds ATOL where kappa > 84, i.e. where the two channels nearly cancel. Measured on an AMD
    # EPYC host: the worst pixel differs by 3.1e-5 at kappa 596 (0.9 u kappa); pixels with small kappa differ
    # by ~1e-6. The no-mask path below keeps ATOL.
    want = _nhwc(dense_ref)
    kappa = _mask_path_condition(torch, ref.prompt_encoder, masks)[..., None]  # [n, h, w, 1]
    tol = ATOL + 1e-7 * np.abs(want) + 2 * 2.0**-24 * kappa  # 1e-7 |want|: assert_allclose's default rtol
    np.testing.assert_array_less(np.abs(np.asarray(dense) - want), tol)
    sparse_ref, dense_ref = ref.prompt_encoder(points=None, boxes=None, masks=None)
    sparse, dense = ours.prompt_encoder()
    assert sparse.shape == tuple(sparse_ref.shape) == (1, 0, C)
    np.testing.assert_allclose(np.asarray(dense), _nhwc(dense_ref), atol=ATOL)


def test_prompt_encoder_bad_input(pair):
    _, ours = pair
    pts = jnp.zeros((2, 3, 2))
    with pytest.raises(ValueError, match="labels must be int"):
        ours.prompt_encoder(pts, jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="integers"):
        ours.prompt_encoder(pts, jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="together"):
        ours.prompt_encoder(pts)
    with pytest.raises(ValueError, match="batch sizes disagree"):
        ours.prompt_encoder(pts, jnp.zeros((2, 3), jnp.int32), text_embeds=jnp.zeros((3, 1, C)))
    # Far outside the image and empty point sets: defined, finite results.
    sparse, _ = ours.prompt_encoder(jnp.full((2, 3, 2), 1e6), jnp.ones((2, 3), jnp.int32))
    assert bool(jnp.isfinite(sparse).all())
    sparse, _ = ours.prompt_encoder(jnp.zeros((2, 0, 2)), jnp.zeros((2, 0), jnp.int32))
    assert sparse.shape == (2, 1, C)  # only the padding point


# ---- mask decoder ---------------------------------------------------------------------------------------
@nnx.jit(static_argnums=(5,))
def _decode(model, emb, pts, lab, text, multimask):
    sparse, dense = model.prompt_encoder(pts, lab, text)
    return model.mask_decoder(emb, model.prompt_encoder.get_dense_pe(), sparse, dense, multimask)


@nnx.jit
def _decode_with_point_grad(model, emb, pts, lab, text):
    """READ's path, both multimask settings, and d mean(sigmoid(mask 0)) / d points: one compile."""

    def f(points):
        sparse, dense = model.prompt_encoder(points, lab, text)
        pe = model.prompt_encoder.get_dense_pe()
        single = model.mask_decoder(emb, pe, sparse, dense, False)
        multi = model.mask_decoder(emb, pe, sparse, dense, True)
        return jnp.mean(jax.nn.sigmoid(single[0])), {False: single, True: multi}

    (_, outs), grad = jax.value_and_grad(f, has_aux=True)(pts)
    return outs, grad


@pytest.fixture(scope="module")
def decoded(pair):
    """READ's call: one image embedding broadcast to n prompts of [points, pad, text]; Meta and ours."""
    torch = require_torch()
    ref, ours = pair
    pts, lab = _points(torch, seed=6)
    lab[:, 0] = 1  # at least one real point per prompt (for the gradient check)
    text = torch.randn(3, 1, C, generator=torch.Generator().manual_seed(7))
    emb = torch.randn(1, C, G, G, generator=torch.Generator().manual_seed(8))
    sparse_ref, dense_ref = ref.prompt_encoder(points=(pts, lab), boxes=None, masks=None)
    sparse_ref = torch.cat([sparse_ref, text], dim=1)
    pe = ref.prompt_encoder.get_dense_pe()
    want = {mm: ref.mask_decoder(emb, pe, sparse_ref, dense_ref, multimask_output=mm) for mm in (False, True)}
    got, grad = _decode_with_point_grad(ours, jnp.asarray(_nhwc(emb)), _j(pts), _j(lab), _j(text))
    return {"want": want, "got": got, "grad": np.asarray(grad), "labels": to_np(lab)}


@pytest.mark.parametrize("multimask", [False, True])
def test_mask_decoder_matches_meta(decoded, multimask):
    masks_ref, iou_ref = decoded["want"][multimask]
    masks, iou = decoded["got"][multimask]
    m = 3 if multimask else 1
    assert masks.shape == (3, m, 4 * G, 4 * G) and iou.shape == (3, m)
    np.testing.assert_allclose(np.asarray(masks), to_np(masks_ref), atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(iou), to_np(iou_ref), atol=ATOL, rtol=1e-5)


def test_mask_decoder_per_prompt_image_embeddings(pair):
    """B == n image embeddings (prompts from different images) == Meta run once per prompt."""
    torch = require_torch()
    ref, ours = pair
    pts, lab = _points(torch, n=2, seed=9)
    emb = torch.randn(2, C, G, G, generator=torch.Generator().manual_seed(10))
    sparse_ref, dense_ref = ref.prompt_encoder(points=(pts, lab), boxes=None, masks=None)
    pe = ref.prompt_encoder.get_dense_pe()
    want = torch.cat(
        [
            ref.mask_decoder(emb[i : i + 1], pe, sparse_ref[i : i + 1], dense_ref[i : i + 1], False)[0]
            for i in range(2)
        ]
    )
    got, _ = _decode(ours, jnp.asarray(_nhwc(emb)), _j(pts), _j(lab), None, False)
    np.testing.assert_allclose(np.asarray(got), to_np(want), atol=ATOL, rtol=1e-5)
    with pytest.raises(ValueError, match="image_embeddings"):
        _decode(ours, jnp.zeros((3, G, G, C)), _j(pts), _j(lab), None, False)


def test_point_coordinate_gradients_reach_the_masks(decoded):
    """READ's DtoC needs d(mask logits)/d(point coordinates): finite and non-zero for real points."""
    grad, lab = decoded["grad"], decoded["labels"]
    assert np.isfinite(grad).all()
    real = lab != -1
    assert (np.abs(grad[real]).sum(-1) > 0).all()
    np.testing.assert_array_equal(grad[~real], 0.0)  # a "not a point" has its PE replaced


def test_bfloat16_pipeline_tracks_meta_float32(pair):
    """The released dtype: bf16 params/compute (fp32 PE, softmax, postprocess) stay close to Meta fp32."""
    torch = require_torch()
    ref, _ = pair
    from read_jax.convert.common import abstract_leaves, convert, load_leaves
    from read_jax.convert.sam import sam_rules
    from read_jax.sam import Sam, transforms

    cfg = dataclasses.replace(CFG, dtype="bfloat16", param_dtype="bfloat16")
    ours = nnx.eval_shape(lambda: Sam(cfg, rngs=nnx.Rngs(0)))
    load_leaves(ours, convert(state_dict_numpy(ref), sam_rules(), abstract_leaves(ours)))  # casts to bf16
    assert ours.mask_decoder.mask_tokens.embedding[...].dtype == jnp.bfloat16
    pts, lab = _points(torch, n=2, seed=12)
    text = torch.randn(2, 1, C, generator=torch.Generator().manual_seed(13))
    img = torch.randn(1, 3, S, S, generator=torch.Generator().manual_seed(14))
    emb_ref = ref.image_encoder(img)
    sparse_ref, dense_ref = ref.prompt_encoder(points=(pts, lab), boxes=None, masks=None)
    sparse_ref = torch.cat([sparse_ref, text], 1)
    low_ref, _ = ref.mask_decoder(emb_ref, ref.prompt_encoder.get_dense_pe(), sparse_ref, dense_ref, False)

    @nnx.jit
    def run(model, img, pts, lab, text):
        emb = model.image_encoder(img)
        sparse, dense = model.prompt_encoder(pts, lab, text)
        low, _ = model.mask_decoder(emb, model.prompt_encoder.get_dense_pe(), sparse, dense, False)
        full = jnp.asarray([[S, S]] * 2)
        return low, transforms.postprocess_masks_padded(low, full, full, out_hw=(S, S), image_size=S)

    low, full = run(ours, jnp.asarray(_nhwc(img)), _j(pts), _j(lab), _j(text))
    assert low.dtype == jnp.bfloat16 and full.dtype == jnp.float32
    low, want = np.asarray(low, np.float32), to_np(low_ref)
    # bf16 keeps 8 mantissa bits: ~0.4% per rounding, compounded over 2+2 blocks: a few % of the range.
    np.testing.assert_allclose(low, want, atol=0.03 * np.abs(want).max())
    assert np.corrcoef(low.ravel(), want.ravel())[0, 1] > 0.999
