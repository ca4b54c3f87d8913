"""Host preprocessing: CLIP vs transformers, GT rasterisation vs OpenCV / hand-made masks, bad images."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from read_jax.data import preprocess as P
from tests.helpers import require


def _clip_processor():
    transformers = require("transformers")
    # transformers 5: `CLIPImageProcessor` is the torchvision backend when torchvision is installed (and
    # falls back to the PIL one otherwise); the reference (4.31) used the PIL path, so ask for it by name.
    cls = getattr(transformers, "CLIPImageProcessorPil", None)
    if cls is None:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as cls
    return cls(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=list(P.CLIP_MEAN),
        image_std=list(P.CLIP_STD),
        resample=3,
        do_center_crop=True,
        do_normalize=True,
        do_rescale=True,
        rescale_factor=1 / 255,
    )


@pytest.mark.parametrize("hw", [(480, 640), (640, 480), (336, 336), (100, 700), (1001, 337), (35, 50)])
def test_clip_matches_transformers(hw):
    proc = _clip_processor()
    img = np.random.default_rng(hw[0] * 7 + hw[1]).integers(0, 256, (*hw, 3), dtype=np.uint8)
    ref = np.asarray(proc(img, return_tensors="np")["pixel_values"][0]).transpose(1, 2, 0)
    out = P.clip_preprocess(img)
    assert out.shape == (336, 336, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("hw", [(480, 640), (1001, 337), (35, 50)])
def test_device_normalisation_gives_the_host_floats(hw):
    """The pipeline ships uint8; the device-side normalisations give exactly the host formulas' floats
    (CLIP: transformers' float64 rescale then float32 normalise; SAM: `transforms.preprocess`, both checked
    against their references in this file and in test_sam_transforms), padding included."""
    import jax

    from read_jax.config import SamConfig
    from read_jax.sam import transforms as T

    img = np.random.default_rng(hw[0] + hw[1]).integers(0, 256, (*hw, 3), dtype=np.uint8)
    crop = P.clip_pixels(img)
    assert crop.dtype == np.uint8 and crop.shape == (336, 336, 3)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(P.clip_normalize)(crop[None]))[0], P.clip_preprocess(img)
    )

    cfg = SamConfig(image_size=256)
    pix, (h, w) = P.sam_pixels(img, cfg)
    assert pix.dtype == np.uint8 and (pix[h:] == 0).all() and (pix[:, w:] == 0).all()
    norm = jax.jit(P.sam_normalize, static_argnums=(2, 3))
    got = np.asarray(norm(pix[None], np.array([[h, w]], np.int32), cfg.pixel_mean, cfg.pixel_std))[0]
    want, hw_want = T.preprocess(img, cfg)
    assert (h, w) == hw_want
    np.testing.assert_array_equal(got, want)
    # Every (value, channel) pair, not only those this image happens to contain.
    every = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1).reshape(1, 16, 16, 3)
    mean, std = np.asarray(cfg.pixel_mean, np.float32), np.asarray(cfg.pixel_std, np.float32)
    host = (every.astype(np.float32) - mean) / std
    got = np.asarray(norm(every, np.array([[16, 16]], np.int32), cfg.pixel_mean, cfg.pixel_std))
    np.testing.assert_array_equal(got, host)


def test_clip_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        P.clip_preprocess(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        P.clip_preprocess(np.zeros((10, 10), np.uint8))


# ---- polygon rasterisation --------------------------------------------------------------------------------


def _cv2_mask(cv2, pts, h, w):
    """The reference's drawing: polylines + fillPoly on int32 vertices (data_processing.py)."""
    m = np.zeros((h, w), np.uint8)
    p = np.array([pts], dtype=np.int32)
    cv2.polylines(m, p, True, 1, 1)
    cv2.fillPoly(m, p, 1)
    return m.astype(bool)


def test_polygon_mask_matches_opencv_inside_image():
    cv2 = require("cv2")
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(5, 70, 2))
        pts = rng.uniform(0, min(h, w), (int(rng.integers(3, 12)), 2))
        np.testing.assert_array_equal(P.polygon_mask(pts, h, w), _cv2_mask(cv2, pts, h, w))


def test_polygon_mask_vs_opencv_vertices_outside_image():
    """Vertices outside the image: OpenCV 4.x clips edges in a way we match only approximately.

    Documented deviation: a few boundary pixels differ (about 0.1% of mask pixels on this set); every
    differing pixel lies on the boundary band of OpenCV's mask (the image border counts as boundary).
    """
    cv2 = require("cv2")
    rng = np.random.default_rng(1)
    diff = area = 0
    for _ in range(100):
        h, w = 120, 160
        c, r = rng.uniform([0, 0], [w, h]), rng.uniform(20, 90)
        ang = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(5, 25))))
        pts = np.stack([c[0] + r * np.cos(ang), c[1] + r * np.sin(ang)], 1)
        ref = _cv2_mask(cv2, pts, h, w)
        d = P.polygon_mask(pts, h, w) != ref
        # The boundary band of OpenCV's mask, the image border counting as outside the polygon.
        k = np.ones((3, 3), np.uint8)
        near = cv2.dilate(ref.astype(np.uint8), k).astype(bool) & ~cv2.erode(
            ref.astype(np.uint8), k, borderType=cv2.BORDER_CONSTANT, borderValue=0
        ).astype(bool)
        assert not (d & ~near).any()
        diff, area = diff + d.sum(), area + ref.sum()
    assert diff <= 0.002 * area, (diff, area)


def test_labelme_mask_hand_computed():
    shapes = [
        {"label": "ignore_part", "points": [[3, 2], [4, 2], [4, 3], [3, 3]]},  # smaller: painted last
        {"label": "flag", "points": [[0, 0], [9, 0], [9, 7], [0, 7]]},  # skipped
        {"label": "target", "points": [[1.9, 1.2], [6.7, 1], [6, 5.99], [1, 5]]},  # truncates to a box
        {"label": "target", "points": [[0, 0], [2, 2]]},  # degenerate: skipped, counted
    ]
    mask, bad = P.labelme_mask(shapes, 8, 10)
    expected = np.zeros((8, 10), np.uint8)
    expected[1:6, 1:7] = 1  # integer box (1,1)-(6,5), outline included
    expected[2:4, 3:5] = 255  # the ignore box (3,2)-(4,3)
    np.testing.assert_array_equal(mask, expected)
    assert bad == 1
    # Area order, not list order, decides what is on top.
    mask2, _ = P.labelme_mask(shapes[::-1], 8, 10)
    np.testing.assert_array_equal(mask2, expected)


def test_labelme_larger_ignore_is_overwritten_by_smaller_target():
    shapes = [
        {"label": "target", "points": [[2, 2], [3, 2], [3, 3], [2, 3]]},
        {"label": "ignore", "points": [[0, 0], [5, 0], [5, 5], [0, 5]]},
    ]
    mask, _ = P.labelme_mask(shapes, 6, 6)
    expected = np.full((6, 6), 255, np.uint8)
    expected[2:4, 2:4] = 1
    np.testing.assert_array_equal(mask, expected)


def test_polygon_mask_rejects_bad_points():
    with pytest.raises(ValueError, match="non-finite"):
        P.polygon_mask([[0, 0], [np.nan, 1], [2, 2]], 4, 4)
    with pytest.raises(ValueError, match="vertex"):
        P.polygon_mask(np.zeros((0, 2)), 4, 4)


# ---- COCO segmentations -----------------------------------------------------------------------------------


def test_coco_rle_multi_part_and_polygons():
    from pycocotools import mask as mu

    h, w = 6, 5
    a = np.zeros((h, w), np.uint8)
    a[1:3, 1:4] = 1
    b = np.zeros((h, w), np.uint8)
    b[2:5, 3:5] = 1  # overlaps `a` at (2, 3)
    rle_a = mu.encode(np.asfortranarray(a))
    rle_a["counts"] = rle_a["counts"].decode()  # as stored in json
    rle_b = mu.encode(np.asfortranarray(b))
    union = np.maximum(a, b)
    np.testing.assert_array_equal(P.coco_mask([rle_a, rle_b], h, w), union)  # union, never 2
    np.testing.assert_array_equal(P.coco_mask(rle_b, h, w), b)  # a single dict
    # Uncompressed RLE (iscrowd style): column-major run lengths, written by hand for `a`.
    counts = [7, 2, 4, 2, 4, 2, 9]
    np.testing.assert_array_equal(P.coco_mask({"size": [h, w], "counts": counts}, h, w), a)
    # Polygons go through pycocotools as in the reference; degenerate parts are dropped, empty -> zeros.
    poly = [[0.5, 0.5, 3.5, 0.5, 3.5, 2.5, 0.5, 2.5]]
    ref = mu.decode(mu.frPyObjects(poly, h, w))[:, :, 0]
    np.testing.assert_array_equal(P.coco_mask(poly + [[1.0, 1.0, 2.0, 2.0]], h, w), ref)
    np.testing.assert_array_equal(P.coco_mask([], h, w), np.zeros((h, w), np.uint8))
    with pytest.raises(ValueError, match="counts sum"):
        P.coco_mask({"size": [h, w], "counts": [3, 2]}, h, w)
    with pytest.raises(ValueError, match="decodes to"):
        P.coco_mask(rle_b, h + 1, w)


def test_resize_mask_nearest_keeps_labels():
    m = np.zeros((4, 6), np.uint8)
    m[:, 3:] = 255
    m[0, 0] = 1
    out = P.resize_mask_nearest(m, (2, 3))
    assert set(np.unique(out)) <= {0, 1, 255}
    np.testing.assert_array_equal(out[:, 2], [255, 255])


# ---- bad and unusual images -------------------------------------------------------------------------------


def _jpeg_bytes(arr, **kw):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", **kw)
    return buf.getvalue()


def test_load_image_modes_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(P.load_image(str(tmp_path / "rgb.png")), rgb)
    grey = rng.integers(0, 256, (7, 9), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(P.load_image(str(tmp_path / "grey.png")), np.repeat(grey[..., None], 3, 2))
    rgba = np.concatenate([rgb, rng.integers(0, 256, (7, 9, 1), dtype=np.uint8)], 2)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(P.load_image(str(tmp_path / "rgba.png")), rgb)  # alpha dropped
    deep = rng.integers(0, 65536, (7, 9), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    np.testing.assert_array_equal(
        P.load_image(str(tmp_path / "deep.png")), np.repeat((deep >> 8).astype(np.uint8)[..., None], 3, 2)
    )

    with pytest.raises(P.ImageError, match="not found"):
        P.load_image(str(tmp_path / "missing.jpg"))
    good = _jpeg_bytes(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    (tmp_path / "trunc.jpg").write_bytes(good[: len(good) // 2])
    assert P.image_size(str(tmp_path / "trunc.jpg")) == (64, 64)  # the header is intact
    with pytest.raises(P.ImageError, match="corrupt"):
        P.load_image(str(tmp_path / "trunc.jpg"))
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(P.ImageError, match="unreadable"):
        P.load_image(str(tmp_path / "junk.jpg"))


def test_huge_image_refused_from_header(tmp_path):
    """A 10k x 10k JPEG is refused before decoding (its SOF0 header is patched, the file stays tiny)."""
    data = bytearray(_jpeg_bytes(np.zeros((16, 16, 3), np.uint8)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (10000).to_bytes(2, "big") * 2  # height, width
    path = tmp_path / "huge.jpg"
    path.write_bytes(bytes(data))
    assert os.path.getsize(path) < 2000
    with pytest.raises(P.ImageError, match="max_pixels"):
        P.load_image(str(path))
