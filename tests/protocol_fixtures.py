"""Small data sets in the reference's on-disk formats, written by the protocol tests (our own content).

`write_reason_seg(root, split, sizes)`: a ReasonSeg split (`{root}/{split}/*.jpg` + labelme json) with one
image per (H, W) of `sizes`, a target polygon and an "ignore" polygon each. `write_refer(root, dataset, ...)`:
a RefCOCO-family set (`refer_seg/{dataset}/refs(split_by).p`, `instances.json`, images under
`refer_seg/images/mscoco/images/train2014/`). `tiny_model()`: the tiny READ with seeded numpy weights.
"""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "tests", "assets", "tokenizer")


def _image(path: str, h: int, w: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Smooth colour fields (JPEG keeps them), not white noise: CLIP and SAM see some structure.
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack(
        [127 + 100 * np.sin(xx / (20 + 10 * k) + rng.uniform(0, 6)) * np.cos(yy / 37.0) for k in range(3)], -1
    )
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, quality=95)


def _polygon(rng: np.random.Generator, h: int, w: int, n: int = 9) -> list[list[float]]:
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    ry, rx = rng.uniform(0.15, 0.3) * h, rng.uniform(0.15, 0.3) * w
    t = np.sort(rng.uniform(0, 2 * np.pi, n))
    r = rng.uniform(0.7, 1.0, n)
    return [[float(cx + rx * a * np.cos(b)), float(cy + ry * a * np.sin(b))] for a, b in zip(r, t)]


def write_reason_seg(root: str, split: str, sizes, seed: int = 0, texts=None) -> list[str]:
    """One image + labelme json per (H, W); returns the image paths (sorted, the reader's order)."""
    os.makedirs(os.path.join(root, split), exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for k, (h, w) in enumerate(sizes):
        stem = os.path.join(root, split, f"img_{k:03d}")
        _image(stem + ".jpg", h, w, seed + k)
        shapes = [
            {"label": "target", "points": _polygon(rng, h, w)},
            {"label": "ignore", "points": _polygon(rng, h, w, 5)},
        ]
        text = (texts or ["the coloured region"] * len(sizes))[k]
        with open(stem + ".json", "w") as f:
            json.dump({"text": [text], "is_sentence": k % 2 == 1, "shapes": shapes}, f)
        paths.append(stem + ".jpg")
    return paths


def write_refer(root: str, dataset: str, split_by: str, images, refs, anns) -> str:
    """A refer set under `root/refer_seg`. images: [(id, H, W)]; anns: [{id, image_id, segmentation}];
    refs: [{ref_id, ann_id, image_id, split, sentences: [...]}]. Returns the `refer_seg` directory."""
    rs = os.path.join(root, "refer_seg")
    img_dir = os.path.join(rs, "images", "mscoco", "images", "train2014")
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(os.path.join(rs, dataset), exist_ok=True)
    infos = []
    for iid, h, w in images:
        name = f"COCO_train2014_{iid:012d}.jpg"
        if not os.path.isfile(os.path.join(img_dir, name)):
            _image(os.path.join(img_dir, name), h, w, iid)
        infos.append({"id": iid, "height": h, "width": w, "file_name": name})
    anns = [{"category_id": 1, "iscrowd": 0, "area": 1.0, "bbox": [0, 0, 1, 1], **a} for a in anns]
    refs = [{"category_id": 1, **r} for r in refs]
    with open(os.path.join(rs, dataset, "instances.json"), "w") as f:
        json.dump({"images": infos, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}, f)
    with open(os.path.join(rs, dataset, f"refs({split_by}).p"), "wb") as f:
        pickle.dump(refs, f)
    return rs


def tiny_model(seed: int = 0, **kw):
    """ReadConfig.tiny(lora=None, max_segs=1) with seeded numpy weights (no eager init compiles)."""
    from flax import nnx

    from read_jax.config import ReadConfig
    from read_jax.read_model import ReadModel
    from tests.helpers import numpy_random_model

    cfg = ReadConfig.tiny(lora=None, max_segs=1, **kw)
    return numpy_random_model(lambda: ReadModel(cfg, rngs=nnx.Rngs(0)), seed)
