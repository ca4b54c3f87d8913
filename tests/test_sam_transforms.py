"""SAM pre/post-processing vs Meta's `ResizeLongestSide`, `Sam.preprocess` and `Sam.postprocess_masks`."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from read_jax.config import ReadConfig, SamConfig
from read_jax.sam import transforms as T
from tests.helpers import require_meta_sam, require_torch
from torchref.common import to_np
from torchref.sam import meta_postprocess, meta_transforms

TINY = ReadConfig.tiny().sam
ODD_SIZES = [(37, 53), (480, 640), (1000, 333), (7, 1500), (1, 1), (257, 256), (3, 2)]


# ---- host preprocessing ----------------------------------------------------------------------------------
@pytest.mark.parametrize("target", [1024, 256])
def test_resize_longest_side_is_bit_exact(target):
    require_meta_sam()
    mt = meta_transforms()
    rng = np.random.default_rng(0)
    for h, w in ODD_SIZES:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want = mt.ResizeLongestSide(target).apply_image(img)
        got = T.resize_longest_side(img, target)
        assert got.dtype == np.uint8 and got.shape == want.shape, (h, w)
        np.testing.assert_array_equal(got, want)


def test_preprocess_shapes_match_meta():
    require_meta_sam()
    mt = meta_transforms()
    hs, ws = np.meshgrid(np.arange(1, 400, 7), np.arange(1, 2500, 13), indexing="ij")
    hw = np.stack([hs.ravel(), ws.ravel()], -1)
    for target in (1024, 256):
        want = np.asarray([mt.ResizeLongestSide.get_preprocess_shape(int(h), int(w), target) for h, w in hw])
        np.testing.assert_array_equal([T.get_preprocess_shape(int(h), int(w), target) for h, w in hw], want)
        traced = jax.jit(T.get_preprocess_shape_jnp, static_argnums=1)(hw, target)
        np.testing.assert_array_equal(np.asarray(traced), want)


def test_preprocess_matches_meta_normalise_and_pad():
    torch = require_torch()
    m, _ = require_meta_sam()
    mt = meta_transforms()
    cfg = SamConfig(image_size=256, dtype="float32", param_dtype="float32")
    fake = SimpleNamespace(
        pixel_mean=torch.tensor(cfg.pixel_mean).view(-1, 1, 1),
        pixel_std=torch.tensor(cfg.pixel_std).view(-1, 1, 1),
        image_encoder=SimpleNamespace(img_size=cfg.image_size),
    )
    img = np.random.default_rng(1).integers(0, 256, (300, 171, 3), dtype=np.uint8)
    x = torch.as_tensor(mt.ResizeLongestSide(cfg.image_size).apply_image(img)).permute(2, 0, 1).contiguous()
    want = to_np(m.Sam.preprocess(fake, x[None]))[0].transpose(1, 2, 0)
    got, (h, w) = T.preprocess(img, cfg)
    assert (h, w) == tuple(x.shape[1:]) == (256, 146) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((10, 10), np.uint8), "RGB"),
        (np.zeros((10, 10, 4), np.uint8), "RGB"),
        (np.zeros((10, 10, 3), np.float32), "uint8"),
        (np.zeros((0, 10, 3), np.uint8), "empty"),
    ],
)
def test_bad_images_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        T.preprocess(bad, TINY)


def test_apply_coords_matches_meta():
    torch = require_torch()
    require_meta_sam()
    mt = meta_transforms()
    rng = np.random.default_rng(2)
    sizes = [(480, 640), (1000, 333), (7, 1500)]
    coords = rng.uniform(0, 500, (len(sizes), 5, 2))
    for i, size in enumerate(sizes):
        rls = mt.ResizeLongestSide(1024)
        want64 = rls.apply_coords(coords[i], size)
        np.testing.assert_array_equal(T.apply_coords(coords[i], size, 1024), want64)
        want32 = to_np(rls.apply_coords_torch(torch.from_numpy(coords[i]).float(), size))
        got32 = T.apply_coords(jnp.asarray(coords[i], jnp.float32), size, 1024)
        np.testing.assert_allclose(np.asarray(got32), want32, rtol=1e-6)
    # Per-row traced sizes (READ's batched path): float32, so ~1 ulp from Meta's float64 scale.
    traced = jax.jit(T.apply_coords, static_argnums=2)
    got = traced(jnp.asarray(coords, jnp.float32), jnp.asarray(sizes), 1024)
    want = np.stack([mt.ResizeLongestSide(1024).apply_coords(coords[i], s) for i, s in enumerate(sizes)])
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6)


# ---- mask postprocessing -----------------------------------------------------------------------------------
# (original H, W) in TINY's 256 frame: portrait upsample, landscape slight downsample, tiny (< l = 64) heavy
# downsample, identity, taller than wide with odd sizes, and one pixel wide.
ORIGINALS = [(300, 200), (120, 250), (20, 33), (256, 256), (701, 333), (299, 1)]


def _low(n, m, side, seed=0):
    """float32[n, m, side, side] low-res mask logits."""
    return np.random.default_rng(seed).normal(0, 5, (n, m, side, side)).astype(np.float32)


@pytest.mark.parametrize("image_size, original", [(256, (300, 200)), (256, (20, 33)), (1024, (1500, 1100))])
def test_postprocess_masks_matches_meta(image_size, original):
    require_torch()
    require_meta_sam()
    low = _low(2, 1, image_size // 4)
    input_size = T.get_preprocess_shape(*original, image_size)
    want = meta_postprocess(low, input_size, original, image_size)
    got = T.postprocess_masks(jnp.asarray(low), input_size, original, image_size)
    assert got.shape == want.shape == (2, 1, *original) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_postprocess_masks_padded_matches_torch_for_mixed_sizes():
    """One compiled function, traced sizes: each row's [:H, :W] equals Meta's result, zeros elsewhere."""
    require_torch()
    require_meta_sam()
    s, low_side = TINY.image_size, TINY.low_res_mask_size
    canvas = (704, 336)
    n_compiled = T.postprocess_masks_padded._cache_size()
    fn = T.postprocess_masks_padded  # jitted, canvas and S static
    for batch in (ORIGINALS[:3], ORIGINALS[3:]):
        low = _low(len(batch), 3, low_side, seed=len(batch[0]))
        input_hw = [T.get_preprocess_shape(*o, s) for o in batch]
        got = np.asarray(fn(jnp.asarray(low), jnp.asarray(input_hw), jnp.asarray(batch), canvas, s))
        assert got.shape == (len(batch), 3, *canvas)
        for i, (o, ih) in enumerate(zip(batch, input_hw, strict=False)):
            want = meta_postprocess(low[i : i + 1], ih, o, s)[0]
            np.testing.assert_allclose(got[i, :, : o[0], : o[1]], want, atol=1e-5, err_msg=str(o))
            assert not got[i, :, o[0] :, :].any() and not got[i, :, :, o[1] :].any()
    # The second batch of sizes reused the compiled function (sizes are traced, not static).
    assert fn._cache_size() == n_compiled + 1


def test_postprocess_single_resize_matches_interpolate():
    """The bilinear taps alone (l -> out, no crop) equal F.interpolate, up- and downsampling, odd sizes."""
    torch = require_torch()
    import torch.nn.functional as F

    low = _low(4, 2, 64, seed=3)
    outs = [(256, 256), (37, 91), (64, 64), (13, 5)]
    # input_size = the full l x l map with image_size = l makes the first stage the identity.
    got = np.asarray(
        T.postprocess_masks_padded(
            jnp.asarray(low), jnp.full((4, 2), 64), jnp.asarray(outs), out_hw=(256, 256), image_size=64
        )
    )
    for i, out in enumerate(outs):
        want = F.interpolate(torch.from_numpy(low[i : i + 1]), out, mode="bilinear", align_corners=False)
        want = to_np(want)[0]
        np.testing.assert_allclose(got[i, :, : out[0], : out[1]], want, atol=1e-5, err_msg=str(out))
