"""Host-side preprocessing: image loading, CLIP pixels, and ground-truth mask rasterisation.

PyTorch reference: `rui-qian/READ@2549240` `dataloaders/base_dataset.py` (image loading + CLIP),
`dataloaders/data_processing.py` (labelme polygons -> mask), `dataloaders/refer_seg_dataset.py`
(`decode_segmentation`: COCO polygons / RLE via pycocotools). See read_reference.md §7.
SAM preprocessing (resize longest side, normalise, pad) lives in `read_jax/sam/transforms.py`.

Resizes are numpy/PIL on the host, never `jax.image`: the reference resizes with PIL and `jax.image.resize`
does not reproduce PIL's filters (read_reference.md §14). The pipeline ships the resized images as uint8
(`clip_pixels`, `sam_pixels`); the normalisation runs on the device (`clip_normalize`, `sam_normalize`:
table gathers that give the host formula's floats bit for bit).

Shape letters: H, W original image height/width; S CLIP crop side (336); N polygon vertices.

Conventions that matter for parity:
- CLIP: equal to transformers' `CLIPImageProcessor` with the `openai/clip-vit-large-patch14-336` settings
  (the PIL path, which transformers 5 names `CLIPImageProcessorPil`; the torchvision path that
  transformers 5 prefers when torchvision is installed resizes tensors with torch's kernels, not PIL's,
  and is not what the reference (transformers 4.31) ran). Short side -> S with PIL
  bicubic, long side `int(S * long / short)`, centre crop with top `(h - S) // 2`, rescale in float64
  then cast to float32, normalise in float32.
- Masks: the reference draws labelme polygons with `cv2.polylines(..., 1)` + `cv2.fillPoly` on vertices
  truncated to int32 (opencv-python 4.8 pinned). `polygon_mask` re-implements OpenCV 4.x's integer
  rasteriser in numpy (8-connected Bresenham outline with OpenCV's `clipLine`, and a 16.16 fixed-point
  even-odd scanline fill whose span runs from ceil(left crossing) to round-half-up(right crossing), which
  is what OpenCV 4.8-4.10 produce). It is pixel-identical to cv2 4.8/4.10 for polygons inside the image
  (tested on random polygons). When vertices lie outside the image, OpenCV builds the fill edges from its
  clipped outline and we match that only approximately: about 0.1% of the mask pixels differ, all on the
  mask boundary. OpenCV >= 4.11 changed fillPoly's rounding again (opencv#26187); the reference used 4.8.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from read_jax.config import CLIP_SIZE, IGNORE_LABEL

log = logging.getLogger(__name__)

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD (CLIP ViT-L/14-336 preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Refuse decoding anything larger (checked from the header, before decoding). ReasonSeg's largest images
# are ~4k x 3k; a 10k x 10k image costs 300 MB per copy and is almost certainly a broken file.
DEFAULT_MAX_PIXELS = 50_000_000


class ImageError(ValueError):
    """An image that cannot be used: missing, corrupt, too large, or of an unsupported kind."""


# ---- images ---------------------------------------------------------------------------------------------


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    """(h, w) after applying the EXIF orientation (transposed for orientations 5-8)."""
    w, h = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block must not make the image unusable
        orientation = 1
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def image_size(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(h, w) of an image from its header only (EXIF orientation applied); raises ImageError."""
    if not os.path.isfile(path):
        raise ImageError(f"image not found: {path}")
    try:
        with warnings.catch_warnings():  # we apply our own (lower) pixel limit right below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                h, w = _oriented_size(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"unreadable image {path}: {e}") from e
    if h * w > max_pixels:
        raise ImageError(f"image {path} is {w}x{h}: more than max_pixels={max_pixels}")
    if h < 1 or w < 1:
        raise ImageError(f"image {path} has an empty size {w}x{h}")
    return h, w


def to_rgb_uint8(img: Image.Image) -> np.ndarray:
    """PIL image of any mode -> uint8 [H, W, 3] RGB, as `cv2.imread(IMREAD_COLOR)` + BGR->RGB would give.

    Alpha is dropped (not composited), palette/grey images are expanded, and 16/32-bit integer images
    keep their high byte (OpenCV/libpng strip 16-bit samples the same way).
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img).astype(np.int64)
        a = np.clip(a >> 8, 0, 255).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    if img.mode == "F":
        a = np.clip(np.rint(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def load_image(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file to uint8 [H, W, 3] RGB with EXIF orientation applied.

    The reference reads with `cv2.imread` (which applies EXIF orientation for IMREAD_COLOR) and
    converts BGR->RGB. Raises ImageError (before decoding when possible) for a missing, truncated or
    corrupt file, or one above `max_pixels`.
    """
    image_size(path, max_pixels)  # header checks first: never decode a decompression bomb
    try:
        with Image.open(path) as img:
            img.load()  # raises on truncated / corrupt data
            img = ImageOps.exif_transpose(img)
            return to_rgb_uint8(img)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"corrupt image {path}: {e}") from e


# ---- CLIP -----------------------------------------------------------------------------------------------


def clip_resize_shape(h: int, w: int, size: int = CLIP_SIZE) -> tuple[int, int]:
    """(h', w') after resizing the shortest edge to `size` (transformers' `get_resize_output_image_size`)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def clip_pixels(image: np.ndarray, size: int = CLIP_SIZE) -> np.ndarray:
    """CLIP's resize + centre crop, still uint8: uint8 [H, W, 3] RGB -> uint8 [S, S, 3].

    What the data pipeline ships; `clip_normalize` (on the device) or `clip_preprocess` (host) finish it.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"clip_preprocess expects uint8 [H, W, 3], got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    nh, nw = clip_resize_shape(h, w, size)
    # PIL works in (w, h); bicubic as in CLIPImageProcessor.resample=BICUBIC, no reducing_gap.
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), resample=Image.BICUBIC))
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(resized[top : top + size, left : left + size])


def clip_normalize_host(pixels: np.ndarray) -> np.ndarray:
    """Host CLIP normalisation of uint8 crops, transformers' order: rescale in float64, cast to float32,
    normalise in float32."""
    x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def clip_preprocess(image: np.ndarray, size: int = CLIP_SIZE) -> np.ndarray:
    """CLIP pixels for LLaVA: uint8 [H, W, 3] RGB -> float32 [S, S, 3] (NHWC, normalised), on the host.

    Equal (bit for bit) to `CLIPImageProcessor(size={"shortest_edge": S}, crop_size=S, ...)` on the PIL
    path, transposed from NCHW. The pipeline ships `clip_pixels` instead and normalises on the device
    (`clip_normalize`, the same floats).
    """
    return clip_normalize_host(clip_pixels(image, size))


def sam_pixels(image: np.ndarray, sam_cfg) -> tuple[np.ndarray, tuple[int, int]]:
    """SAM's longest-side resize, still uint8, zero-padded bottom/right: uint8 [H, W, 3] -> (uint8 [S, S, 3],
    (h, w) resized extent). `sam_normalize` (device) gives what `read_jax.sam.transforms.preprocess` (host)
    gives: the pixel mean/std inside the extent, exact zeros outside."""
    from read_jax.sam.transforms import resize_longest_side

    s = sam_cfg.image_size
    x = resize_longest_side(image, s)
    h, w = x.shape[:2]
    out = np.zeros((s, s, 3), np.uint8)
    out[:h, :w] = x
    return out, (h, w)


def sam_normalize_host(pixels: np.ndarray, input_hw, pixel_mean, pixel_std) -> np.ndarray:
    """Host SAM normalisation of one uint8 [S, S, 3] frame (`sam_pixels`): `transforms.preprocess`'s
    floats."""
    h, w = (int(v) for v in input_hw)
    out = np.zeros(pixels.shape, np.float32)
    mean, std = np.asarray(pixel_mean, np.float32), np.asarray(pixel_std, np.float32)
    out[:h, :w] = (pixels[:h, :w].astype(np.float32) - mean) / std
    return out


# ---- device-side normalisation ------------------------------------------------------------------------
# Normalising 1024 x 1024 x 3 floats per image on the host, and shipping 4 bytes per channel, is what
# limited the data pipeline (benchmarks/data.py); the pipeline ships uint8 and the model normalises on the
# device. Each table maps (value, channel) to the float the host formula gives, so a gather reproduces the
# host result bit for bit on every backend (no dependence on how a backend divides).


def normalization_table(kind: str, pixel_mean=None, pixel_std=None) -> np.ndarray:
    """float32 [256, 3]: the normalised value of every uint8 value per channel ("clip" or "sam")."""
    v = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    if kind == "clip":
        return clip_normalize_host(v)
    if kind == "sam":  # `read_jax.sam.transforms.preprocess`'s arithmetic, elementwise
        mean, std = np.asarray(pixel_mean, np.float32), np.asarray(pixel_std, np.float32)
        return (v.astype(np.float32) - mean) / std
    raise ValueError(f"unknown normalisation {kind!r}")


def _gather_normalized(pixels, table: np.ndarray):
    import jax.numpy as jnp

    flat = jnp.asarray(table).reshape(-1)  # [256 * 3], index = value * 3 + channel
    idx = pixels.astype(jnp.int32) * 3 + jnp.arange(3, dtype=jnp.int32)
    return flat[idx]


def clip_normalize(pixels):
    """Device side: uint8 [..., S, S, 3] CLIP crops -> float32, equal to `clip_preprocess`'s output."""
    return _gather_normalized(pixels, normalization_table("clip"))


def sam_normalize(pixels, input_hw, pixel_mean, pixel_std):
    """Device side: uint8 [B, S, S, 3] (`sam_pixels`) and int [B, 2] extents -> float32 [B, S, S, 3], equal to
    `read_jax.sam.transforms.preprocess`'s output (normalised inside the extent, 0.0 outside)."""
    import jax.numpy as jnp

    x = _gather_normalized(pixels, normalization_table("sam", pixel_mean, pixel_std))
    s = pixels.shape[1]
    inside = (jnp.arange(s)[None, :, None] < input_hw[:, 0, None, None]) & (
        jnp.arange(pixels.shape[2])[None, None, :] < input_hw[:, 1, None, None]
    )
    return jnp.where(inside[..., None], x, jnp.float32(0.0))


# ---- polygon rasterisation (OpenCV-compatible) ----------------------------------------------------------

_XY_SHIFT = 16  # OpenCV's drawing fixed point


def _c_div(a: int, b: int) -> int:
    """C integer division (rounds toward zero)."""
    q = abs(a) // abs(b)
    return -q if (a < 0) != (b < 0) else q


def _clip_line(w: int, h: int, x1: int, y1: int, x2: int, y2: int):
    """OpenCV's `clipLine(Size2l, Point2l&, Point2l&)`: (inside, x1, y1, x2, y2), same double maths."""
    right, bottom = w - 1, h - 1

    def code(x, y):
        return (x < 0) + (x > right) * 2 + (y < 0) * 4 + (y > bottom) * 8

    c1, c2 = code(x1, y1), code(x2, y2)
    if (c1 & c2) == 0 and (c1 | c2) != 0:
        if c1 & 12:
            a = 0 if c1 < 8 else bottom
            x1 += int(float(a - y1) * (x2 - x1) / (y2 - y1))
            y1 = a
            c1 = (x1 < 0) + (x1 > right) * 2
        if c2 & 12:
            a = 0 if c2 < 8 else bottom
            x2 += int(float(a - y2) * (x2 - x1) / (y2 - y1))
            y2 = a
            c2 = (x2 < 0) + (x2 > right) * 2
        if (c1 & c2) == 0 and (c1 | c2) != 0:
            if c1:
                a = 0 if c1 == 1 else right
                y1 += int(float(a - x1) * (y2 - y1) / (x2 - x1))
                x1 = a
                c1 = 0
            if c2:
                a = 0 if c2 == 1 else right
                y2 += int(float(a - x2) * (y2 - y1) / (x2 - x1))
                x2 = a
                c2 = 0
    return (c1 | c2) == 0, x1, y1, x2, y2


def _line_pixels(p0: tuple[int, int], p1: tuple[int, int], h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (ys, xs) of OpenCV's 8-connected `Line` (LineIterator, left_to_right=True)."""
    x1, y1 = p0
    x2, y2 = p1
    if not (0 <= x1 < w and 0 <= x2 < w and 0 <= y1 < h and 0 <= y2 < h):
        inside, x1, y1, x2, y2 = _clip_line(w, h, x1, y1, x2, y2)
        if not inside:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if x2 < x1:  # iterate left to right
        x1, y1, x2, y2 = x2, y2, x1, y1
    dx, dy = x2 - x1, y2 - y1
    sy = -1 if dy < 0 else 1
    ady = abs(dy)
    major, minor = (ady, dx) if ady > dx else (dx, ady)
    k = np.arange(major + 1, dtype=np.int64)
    # Closed form of the LineIterator recurrence (err = major - 2*minor; step the minor axis when err < 0):
    # minor offset of point k = floor((2*k*minor + major - 1) / (2*major)); ties round down.
    m = (2 * k * minor + major - 1) // (2 * major) if major else np.zeros(1, np.int64)
    if ady > dx:
        ys, xs = y1 + sy * k, x1 + m
    else:
        xs, ys = x1 + k, y1 + sy * m
    keep = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)  # defensive: clipLine can leave 1px overshoot
    return ys[keep], xs[keep]


def _fill_spans(xs: np.ndarray, ys: np.ndarray, h: int, w: int):
    """`CollectPolyEdges` + `FillEdgeCollection` of one contour: inclusive (rows, x0, x1) spans."""
    empty = (np.zeros(0, np.int64),) * 3
    n = len(xs)
    ex, ey0, ey1, edx = [], [], [], []
    for i in range(n):  # edge i runs from vertex i-1 to vertex i (N is small; rows are vectorised below)
        x0, y0, x1, y1 = int(xs[i - 1]), int(ys[i - 1]), int(xs[i]), int(ys[i])
        if y0 == y1:  # horizontal edges only contribute their outline
            continue
        # OpenCV 4.x builds the edge from the *clipped* outline segment when it leaves the image.
        cx0, cy0, cx1, cy1 = x0, y0, x1, y1
        if not (0 <= x0 < w and 0 <= x1 < w and 0 <= y0 < h and 0 <= y1 < h):
            _, tx0, ty0, tx1, ty1 = _clip_line(w, h, x0, y0, x1, y1)
            cx0, cx1 = tx0, tx1
            if ty0 != ty1:
                cy0, cy1 = ty0, ty1
        dx = _c_div((cx1 - cx0) << _XY_SHIFT, cy1 - cy0)
        if y0 < y1:
            ey0.append(y0), ey1.append(y1), ex.append((cx0 << _XY_SHIFT) + (y0 - cy0) * dx)
        else:
            ey0.append(y1), ey1.append(y0), ex.append((cx1 << _XY_SHIFT) + (y1 - cy1) * dx)
        edx.append(dx)
    ex, ey0, ey1, dx = (np.asarray(a, np.int64) for a in (ex, ey0, ey1, edx))
    if len(ex) < 2:
        return empty
    xend = ex + (ey1 - ey0) * dx
    if (
        ey1.max() < 0
        or ey0.min() >= h
        or max(ex.max(), xend.max()) < 0
        or min(ex.min(), xend.min()) >= (w << _XY_SHIFT)
    ):
        return empty
    r0, r1 = max(int(ey0.min()), 0), min(int(ey1.max()), h)
    if r1 <= r0:
        return empty
    rows = np.arange(r0, r1, dtype=np.int64)
    # [E, R]: each edge is active on its half-open row range [y0, y1); x advances by dx per row.
    active = (ey0[:, None] <= rows[None]) & (rows[None] < ey1[:, None])
    xr = ex[:, None] + (rows[None] - ey0[:, None]) * dx[:, None]
    big = np.iinfo(np.int64).max
    xs_sorted = np.sort(np.where(active, xr, big), axis=0)
    if len(xs_sorted) % 2:  # an odd edge count still has an even number active on every row
        xs_sorted = np.concatenate([xs_sorted, np.full((1, len(rows)), big)], axis=0)
    n_active = active.sum(0)
    # Even-odd pairs of the x-sorted crossings, as OpenCV walks its sorted active-edge list.
    left, right = xs_sorted[0::2], xs_sorted[1::2]
    pair = np.arange(left.shape[0])[:, None]
    valid = 2 * pair + 1 < n_active[None]
    xa = (left + (1 << _XY_SHIFT) - 1) >> _XY_SHIFT  # ceil of the left crossing
    xb = (right + (1 << (_XY_SHIFT - 1))) >> _XY_SHIFT  # right crossing, rounded half up
    valid &= (xa < w) & (xb >= 0)
    xa, xb = np.clip(xa, 0, w - 1), np.clip(xb, 0, w - 1)
    valid &= xa <= xb
    rr = np.broadcast_to(rows[None], xa.shape)
    return rr[valid], xa[valid], xb[valid]


def polygon_mask(points: Sequence[Sequence[float]] | np.ndarray, h: int, w: int) -> np.ndarray:
    """bool [H, W]: `cv2.polylines(m, [pts], True, 1, 1)` + `cv2.fillPoly(m, [pts], 1)`, pts = int32(points).

    Args:
      points: [N, 2] (x, y) vertices, float or int; truncated toward zero like `np.array(..., np.int32)`.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(pts) == 0:
        raise ValueError("polygon_mask needs at least one vertex")
    if not np.isfinite(pts).all():
        raise ValueError("polygon has non-finite coordinates")
    pts = pts.astype(np.int32).astype(np.int64)
    mask = np.zeros((h, w), dtype=bool)
    rows, xa, xb = _fill_spans(pts[:, 0], pts[:, 1], h, w)
    if len(rows):
        # Row-wise difference array over the spans' bounding box (spans of one row never overlap).
        r0, c0 = int(rows.min()), int(xa.min())
        nr, nc = int(rows.max()) - r0 + 1, int(xb.max()) - c0 + 1
        diff = np.zeros((nr, nc + 1), np.int32)
        np.add.at(diff, (rows - r0, xa - c0), 1)
        np.add.at(diff, (rows - r0, xb + 1 - c0), -1)
        mask[r0 : r0 + nr, c0 : c0 + nc] = np.cumsum(diff[:, :nc], axis=1) > 0
    n = len(pts)
    for i in range(n):  # outline, edge (i-1 -> i); N is small and each edge is vectorised
        ys, xs = _line_pixels(tuple(pts[i - 1]), tuple(pts[i]), h, w)
        mask[ys, xs] = True
    return mask


# ---- labelme (ReasonSeg) --------------------------------------------------------------------------------


def read_json(path: str) -> Any:
    """json.load with the reference's cp1252 fallback for the few non-UTF-8 ReasonSeg files."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError:
        with open(path, encoding="cp1252") as f:
            return json.load(f)


def usable_shapes(shapes: Iterable[dict]) -> tuple[list[dict], int]:
    """Shapes the mask is built from: not "flag", with >= 3 vertices. Returns (shapes, n_degenerate)."""
    out, bad = [], 0
    for s in shapes:
        label = str(s.get("label", ""))
        if label.lower() == "flag":  # meaningless deprecated annotations (reference skips them)
            continue
        pts = s.get("points") or []
        try:
            arr = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        except (ValueError, TypeError):
            bad += 1
            continue
        if len(arr) < 3 or not np.isfinite(arr).all():
            bad += 1
            continue
        out.append({"label": label, "points": arr})
    return out, bad


def labelme_mask(shapes: Iterable[dict], h: int, w: int) -> tuple[np.ndarray, int]:
    """ReasonSeg GT: uint8 [H, W] with 1 = target, 255 = ignore, 0 = background.

    Polygons are painted largest-area first (area = pixel count of the polygon on its own, as the
    reference measures it), so smaller ones overwrite; labels containing "ignore" paint 255; "flag" is
    skipped; degenerate polygons (< 3 vertices, non-finite) are skipped and counted.

    Returns:
      (mask uint8 [H, W], number of degenerate polygons skipped).
    """
    good, bad = usable_shapes(shapes)
    polys = [polygon_mask(s["points"], h, w) for s in good]
    areas = [int(p.sum()) for p in polys]
    # Same numpy call as the reference (argsort, then reversed): the tie order matches too.
    order = np.argsort(areas)[::-1]
    mask = np.zeros((h, w), np.uint8)
    for i in order:
        mask[polys[i]] = IGNORE_LABEL if "ignore" in good[i]["label"].lower() else 1
    return mask, bad


# ---- COCO polygons / RLE (RefCOCO*, PACO-LVIS, PASCAL-Part) ---------------------------------------------


def coco_mask(segmentation: Any, h: int, w: int, overlaps: str = "union") -> np.ndarray:
    """uint8 [H, W] from a COCO `segmentation` (polygon list, RLE dict, or list of RLE dicts).

    overlaps: "union" gives a binary mask (training targets); "sum" is the reference's
    `decode_segmentation` (the decoded parts summed and cast to uint8: 2 where two parts overlap), which
    its evaluation scores as is (a value-2 pixel is in no GT class but counts in the prediction's union).
    Degenerate polygon parts (< 3 vertices) are dropped; an empty segmentation gives an all-zero mask.
    """
    if overlaps not in ("union", "sum"):
        raise ValueError(f"overlaps must be 'union' or 'sum', got {overlaps!r}")
    from pycocotools import mask as mask_utils

    if segmentation is None or (isinstance(segmentation, (list, tuple)) and len(segmentation) == 0):
        return np.zeros((h, w), np.uint8)
    if isinstance(segmentation, dict):
        segmentation = [segmentation]
    if isinstance(segmentation[0], (list, tuple, np.ndarray)):  # polygons: [[x0, y0, x1, y1, ...], ...]
        polys = [list(map(float, p)) for p in segmentation if len(p) >= 6 and len(p) % 2 == 0]
        if not polys:
            return np.zeros((h, w), np.uint8)
        rles = mask_utils.frPyObjects(polys, h, w)
    else:
        rles = []
        for seg in segmentation:
            counts = seg["counts"]
            if isinstance(counts, list):  # uncompressed RLE
                if sum(counts) != seg["size"][0] * seg["size"][1]:  # pycocotools would read past the end
                    raise ValueError(
                        f"RLE counts sum to {sum(counts)}, not {seg['size'][0]} x {seg['size'][1]}"
                    )
                rles.append(mask_utils.frPyObjects(seg, *seg["size"]))
            else:
                rles.append(
                    {
                        "size": list(seg["size"]),
                        "counts": counts.encode() if isinstance(counts, str) else counts,
                    }
                )
    m = mask_utils.decode(rles)
    if m.ndim == 3:
        m = m.sum(axis=2).astype(np.uint8) if overlaps == "sum" else m.max(axis=2)
    if m.shape != (h, w):
        raise ValueError(f"segmentation decodes to {m.shape}, image is {(h, w)}")
    return m.astype(np.uint8)


def resize_mask_nearest(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W] -> uint8 [h, w] with PIL nearest (keeps the exact label values, 255 included)."""
    if mask.shape == tuple(hw):
        return mask
    return np.asarray(Image.fromarray(mask).resize((hw[1], hw[0]), resample=Image.NEAREST))
