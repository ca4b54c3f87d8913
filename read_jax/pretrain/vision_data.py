"""The vision stage's data: shapes scenes in CLIP's input crop, and what each patch of the crop shows.

The real LLaVA-1.5 starts from a CLIP pretrained on 400M image-text pairs, whose patch tokens already say
what is where; the LLaVA stage here cannot make one from its captions (a CLIP trained by the text loss alone
tells kinds apart barely better than chance, docs/tiny_chain.md). This stage gives the tiny chain that
starting point the direct way: CLIP is trained, with a linear head per attribute, to say for every patch of
its 8 x 8 grid what covers it.

Per patch p and instance i, c_pi is the fraction of the patch that instance covers (its polygon
rasterised by PIL at `supersample` x the crop side, block-averaged over the patch) and b_p = 1 - sum_i c_pi
is the background share. Each attribute's target at p is the mixture
sum_i c_pi onehot(attr_i) + b_p onehot(background), a distribution over its values plus "background":

  color  the instance's colour (6)                     kind  its shape kind (6)
  size   its radius, in thirds of the generator's range of radii relative to the short side (3)
  place  the 3 x 3 cell of the original image its centre lies in (9), so a token knows where its object is
         even when CLIP's centre crop cut the scene

and the patch's weight is max(1 - b_p, `BACKGROUND_WEIGHT`): covered patches count fully, background ones a
little. Every example is a pure function of (seed, stream, index): the scene comes from
`np.random.default_rng([seed, stream, index])` through `make_shapes.random_scene`. Streams `TRAIN_STREAM`
and `EVAL_STREAM` are this stage's own: no scene of the generated data set (`read_jax.data.shapes.write`,
streams 0-11) is one of them, so no held-out query's picture is ever trained on here.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from read_jax.data.make_shapes import random_scene
from read_jax.data.preprocess import clip_pixels, clip_resize_shape
from read_jax.data.shapes.scene import COLORS, SHAPES

TRAIN_STREAM = 100
EVAL_STREAM = 101
# Radii are drawn uniformly in [0.07, 0.17] of the scene's short side (`scene._scene`): thirds of that range.
RADIUS_RANGE = (0.07, 0.17)
BACKGROUND_WEIGHT = 0.1
# attribute -> number of values; each target has one more slot, the last, for the background.
ATTRIBUTES = {"color": len(COLORS), "kind": len(SHAPES), "size": 3, "place": 9}


def _values(shape: dict, w: int, h: int) -> dict[str, int]:
    lo, hi = RADIUS_RANGE
    rel = (shape["r"] / min(w, h) - lo) / (hi - lo)
    return {
        "color": list(COLORS).index(shape["color"]),
        "kind": list(SHAPES).index(shape["kind"]),
        "size": int(np.clip(np.floor(rel * 3), 0, 2)),
        "place": int(min(3 * shape["cy"] / h, 2.999)) * 3 + int(min(3 * shape["cx"] / w, 2.999)),
    }


def patch_coverage(
    polys, orig_hw: tuple[int, int], size: int, patch: int, supersample: int = 4
) -> np.ndarray:
    """float32 [I, G, G], G = size / patch: the fraction of each patch of CLIP's crop (shortest side resized
    to `size`, centre crop, `preprocess.clip_pixels`) that each polygon covers.

    Args:
      polys: float[N_i, 2] (x, y) vertices in original pixels, one per instance.
      orig_hw: (H, W) of the original image.
    """
    h0, w0 = orig_hw
    nh, nw = clip_resize_shape(h0, w0, size)
    top, left = (nh - size) // 2, (nw - size) // 2
    k, g = int(supersample), size // patch
    scale = np.asarray([nw / w0, nh / h0])
    shift = np.asarray([left, top], np.float64)
    out = np.zeros((len(polys), g, g), np.float32)
    for i, p in enumerate(polys):
        im = Image.new("L", (size * k, size * k))  # PIL's rasteriser: a pixel is in when its centre is
        ImageDraw.Draw(im).polygon([tuple(v) for v in (np.asarray(p) * scale - shift) * k], fill=1)
        m = np.asarray(im, np.int32).reshape(g, patch * k, g, patch * k)
        out[i] = m.sum(axis=(1, 3)) / float((patch * k) ** 2)
    return out


def example(seed: int, stream: int, index: int, size: int, patch: int) -> dict[str, np.ndarray]:
    """One scene: `pixels` uint8 [S, S, 3] (CLIP's crop, normalised on the device), a float32 [P, V + 1]
    target per attribute (P = (S / patch)^2 patches in row-major order, as CLIP's tokens) and `weight`
    float32 [P]."""
    image, shapes = random_scene(np.random.default_rng([seed, stream, index]))
    rgb = np.asarray(image.convert("RGB"))
    h, w = rgb.shape[:2]
    cov = patch_coverage([s["poly"] for s in shapes], (h, w), size, patch).reshape(len(shapes), -1)
    bg = np.clip(1.0 - cov.sum(0), 0.0, 1.0)  # [P]
    out = {
        "pixels": clip_pixels(rgb, size),
        "weight": np.maximum(1.0 - bg, BACKGROUND_WEIGHT).astype(np.float32),
    }
    vals = [_values(s, w, h) for s in shapes]
    for name, n in ATTRIBUTES.items():
        t = np.zeros((cov.shape[1], n + 1), np.float32)
        for c, v in zip(cov, vals):
            t[:, v[name]] += c
        t[:, n] = bg
        out[name] = t / t.sum(-1, keepdims=True)
    return out


def batch_spec(batch_size: int, size: int, patch: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """key -> (shape, dtype) of a training batch."""
    p = (size // patch) ** 2
    spec = {
        "pixels": ((batch_size, size, size, 3), np.dtype(np.uint8)),
        "weight": ((batch_size, p), np.dtype(np.float32)),
    }
    spec.update({k: ((batch_size, p, n + 1), np.dtype(np.float32)) for k, n in ATTRIBUTES.items()})
    return spec


class Example:
    """Picklable `index -> example(...)` for grain's worker processes."""

    def __init__(self, seed: int, stream: int, size: int, patch: int):
        self.args = (seed, stream, size, patch)

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        seed, stream, size, patch = self.args
        return example(seed, stream, int(index), size, patch)


def stack(examples) -> dict[str, np.ndarray]:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
