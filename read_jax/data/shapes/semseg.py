"""Semantic segmentation from the shapes world, in two real layouts that carry their own class lists (ADE20K
and COCO-Stuff have fixed vocabularies of real-world classes, so they are not written):

- Mapillary Vistas (`mapillary/config_v2.0.json` + single-channel label PNGs): a class per shape *kind*
  ("circle", ..., "star"; the label map partitions the picture, background 255 = no class, which the reader
  ignores): "segment the circles" means every circle, whatever its colour.
- PACO-LVIS (COCO json `vlpart/paco/annotations/paco_lvis_v1_train.json`, images under `coco/`): a class per
  *colour + kind* ("red circle", 36 classes), one annotation per class present whose segmentation holds the
  polygons of all its instances: "segment the red circles" means every red circle.

Both teach the model to segment every instance of a named class (SESAME's sem_seg source, false premises
included: the reader asks absent classes too), at two granularities.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from read_jax.data.shapes.scene import COLORS, SHAPES, bbox, flat_polygon, name

MAPILLARY_CLASSES = tuple(SHAPES)
PACO_CLASSES = tuple(f"{c} {k}" for c in COLORS for k in SHAPES)
BACKGROUND = 255  # beyond the class list: the reader treats it as unlabelled


def mapillary_config() -> dict:
    """`config_v2.0.json` in Mapillary's layout (`labels[i]["readable"]` names label id i)."""
    palette = [(40 * i + 30, 200 - 25 * i, 90 + 20 * i) for i in range(len(MAPILLARY_CLASSES))]
    return {
        "labels": [
            {
                "name": f"shape--{k}",
                "readable": k.capitalize(),
                "color": list(col),
                "instances": True,
                "evaluate": True,
            }
            for k, col in zip(MAPILLARY_CLASSES, palette)
        ],
        "version": "2.0",
        "mapping": "public",
        "folder_structure": "{split}/{content}/{image:.*}.{ext}",
    }


def label_map(w: int, h: int, shapes: list[dict]) -> Image.Image:
    """The scene's label PNG ('L'): each instance's pixels hold its kind's class id, the rest `BACKGROUND`."""
    im = Image.new("L", (w, h), BACKGROUND)
    draw = ImageDraw.Draw(im)
    for s in shapes:
        draw.polygon([tuple(p) for p in s["poly"]], fill=MAPILLARY_CLASSES.index(s["kind"]))
    return im


def paco_annotations(shapes: list[dict], image_id: int) -> list[dict]:
    """One COCO annotation per colour + kind present: all its instances' polygons in one segmentation."""
    out = []
    for cls in sorted({name(s) for s in shapes}, key=PACO_CLASSES.index):
        members = [s for s in shapes if name(s) == cls]
        poly = np.concatenate([s["poly"] for s in members])
        out.append(
            {
                "id": image_id * 10 + len(out),
                "image_id": image_id,
                "category_id": PACO_CLASSES.index(cls) + 1,
                "segmentation": [flat_polygon(s["poly"]) for s in members],
                "area": round(float(sum(s["area"] for s in members)), 2),
                "bbox": bbox(poly),
                "iscrowd": 0,
            }
        )
    return out


def paco_categories() -> list[dict]:
    return [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(PACO_CLASSES)]
