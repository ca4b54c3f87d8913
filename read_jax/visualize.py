"""Analysis pictures (Appendix B, Fig. 4 (a) and Fig. 6) with Pillow only.

One PNG per query: a row of equally sized panels, each the query's image at its GT resolution (H, W):

  0 "image"        the image
  1 "similarity"   the [SEG] similarity map (the reference's full-resolution `origin_sm`) as a jet heat map
                   blended over the image (Fig. 4 (a))
  2 "points"       the SasP points: positives as red discs, negatives as blue discs (Fig. 6's colours),
                   neutrals (SAM "not a point") are not drawn, they carry no position
  3 "prediction"   the predicted mask (first [SEG], logits > 0) tinted green over the image
  4 "ground truth" the GT tinted yellow; its 255 "ignore" pixels grey
  5 "points only"  (optional) the mask SAM gives for the similarity points alone, no [SEG] (Fig. 6 (b)),
                   tinted magenta, with its points

Panels are separated by `GAP` columns of white and sit below a `HEADER`-pixel title strip; `panel_boxes`
returns where each panel is, so tests (and users) can crop them. Outside a tinted region every panel's
pixels equal the image's.

Shape letters: H W image (GT) size, Q points.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from read_jax.metrics import query_iou

HEADER = 18
GAP = 4
PANELS = ("image", "similarity", "points", "prediction", "ground truth", "points only")

PRED_COLOR = (0, 200, 0)
GT_COLOR = (255, 210, 0)
IGNORE_COLOR = (128, 128, 128)
PP_COLOR = (220, 0, 220)
POS_COLOR = (230, 0, 0)
NEG_COLOR = (0, 90, 255)
ALPHA = 0.5


def jet(x: np.ndarray) -> np.ndarray:
    """float[...] in [0, 1] -> uint8[..., 3], the classic jet colour map (blue -> cyan -> yellow -> red)."""
    x = np.clip(np.asarray(x, np.float32), 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4.0 * x - 3.0), 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * x - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * x - 1.0), 0.0, 1.0)
    return (np.stack([r, g, b], axis=-1) * 255.0 + 0.5).astype(np.uint8)


def tint(image: np.ndarray, mask: np.ndarray, color: Sequence[int], alpha: float = ALPHA) -> np.ndarray:
    """uint8[H, W, 3] with `mask` pixels blended towards `color`; others unchanged."""
    out = np.asarray(image).copy()
    m = np.asarray(mask, bool)
    blend = (1.0 - alpha) * out[m].astype(np.float32) + alpha * np.asarray(color, np.float32)
    out[m] = np.clip(blend + 0.5, 0, 255).astype(np.uint8)
    return out


def draw_points(
    image: np.ndarray, points: np.ndarray, labels: np.ndarray, radius: int | None = None
) -> np.ndarray:
    """uint8[H, W, 3] with positive (label 1, red) and negative (label 0, blue) points as discs."""
    pil = Image.fromarray(np.asarray(image))
    draw = ImageDraw.Draw(pil)
    h, w = np.asarray(image).shape[:2]
    r = radius if radius is not None else max(2, min(h, w) // 60)
    for (x, y), lab in zip(np.asarray(points, np.float32), np.asarray(labels)):
        if lab == -1:
            continue
        color = POS_COLOR if lab == 1 else NEG_COLOR
        draw.ellipse([x - r, y - r, x + r, y + r], fill=color, outline=(255, 255, 255))
    return np.asarray(pil)


def panel_boxes(h: int, w: int, n: int) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of each of `n` panels in the picture (PIL crop boxes)."""
    return [(k * (w + GAP), HEADER, k * (w + GAP) + w, HEADER + h) for k in range(n)]


def analysis_picture(
    image: np.ndarray,
    sim_map: np.ndarray,
    points: np.ndarray,
    labels: np.ndarray,
    pred_mask: np.ndarray,
    gt: np.ndarray,
    *,
    title: str = "",
    pp_mask: np.ndarray | None = None,
    pp_points: np.ndarray | None = None,
    pp_labels: np.ndarray | None = None,
    heat_alpha: float = 0.6,
) -> Image.Image:
    """The panels described in the module docstring, as one RGB PIL image.

    Args:
      image: uint8[H, W, 3]; sim_map: float[H, W] in [0, 1]; points: float[Q, 2] (x, y); labels: int[Q];
      pred_mask: bool[H, W]; gt: uint8[H, W] in {0, 1, 255}; pp_*: the optional points-only panel.
    """
    image = np.asarray(image, np.uint8)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be uint8[H, W, 3], got {image.shape}")
    h, w = image.shape[:2]
    for name, arr in (("sim_map", sim_map), ("pred_mask", pred_mask), ("gt", gt)):
        if np.shape(arr) != (h, w):
            raise ValueError(f"{name} must be [{h}, {w}] like the image, got {np.shape(arr)}")
    gt = np.asarray(gt)
    heat = jet(sim_map)
    panels = [
        image,
        np.clip((1 - heat_alpha) * image + heat_alpha * heat + 0.5, 0, 255).astype(np.uint8),
        draw_points(image, points, labels),
        tint(image, pred_mask, PRED_COLOR),
        tint(tint(image, gt == 1, GT_COLOR), gt == 255, IGNORE_COLOR),
    ]
    if pp_mask is not None:
        pp = tint(image, pp_mask, PP_COLOR)
        if pp_points is not None:
            pp = draw_points(pp, pp_points, pp_labels)
        panels.append(pp)
    n = len(panels)
    canvas = Image.new("RGB", (n * w + (n - 1) * GAP, HEADER + h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, (box, panel) in enumerate(zip(panel_boxes(h, w, n), panels)):
        canvas.paste(Image.fromarray(panel), box[:2])
        draw.text((box[0] + 2, 3), PANELS[k], fill=(0, 0, 0))
    if title:
        draw.text((2 + (w + GAP) * (n - 1) // 2, 3), title[:80], fill=(90, 90, 90))
    return canvas


def image_from_sam_input(
    images_sam: np.ndarray,
    sam_input_hw: Sequence[int],
    out_hw: Sequence[int],
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
) -> np.ndarray:
    """A uint8[H, W, 3] picture from a SAM input (crop, denormalise a float input, bilinear to (H, W)).

    A fallback for pictures when the original file is not at hand (lossy when SAM's frame is smaller).
    """
    h, w = (int(v) for v in sam_input_hw)
    x = np.asarray(images_sam)[:h, :w]
    if x.dtype != np.uint8:  # a normalised float input: undo the normalisation
        x = x.astype(np.float32) * np.asarray(pixel_std, np.float32) + np.asarray(pixel_mean, np.float32)
        x = np.clip(x + 0.5, 0, 255).astype(np.uint8)
    pil = Image.fromarray(x)
    oh, ow = (int(v) for v in out_hw)
    return np.asarray(pil.resize((ow, oh), Image.BILINEAR))


def save_picture(picture: Image.Image, out_dir: str, name: str) -> str:
    """PNG under out_dir with a file-system-safe name; returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_.#" else "_" for c in name).replace("#", "_q")
    path = os.path.join(out_dir, safe + ".png")
    picture.save(path)
    return path


# ---- pictures of an evaluation run ------------------------------------------------------------------------


def reader_image_fn(reader) -> Callable[[int], np.ndarray] | None:
    """example_index -> the original uint8[H, W, 3] image of a reader item (None without a reader)."""
    from read_jax.data.preprocess import load_image

    if reader is None:
        return None
    items = getattr(reader, "items", None)

    def fn(idx: int) -> np.ndarray:
        if items is not None and hasattr(items[idx], "image"):
            return load_image(items[idx].image)
        return load_image(reader[idx].image_path)

    return fn


class AnalysisPictures:
    """`on_maps` callback of `evaluation.evaluate_reasonseg`: one Appendix B PNG per query.

    Args:
      out_dir: where the PNGs go.
      sam_cfg: SamConfig (to rebuild pictures from SAM inputs when `image_fn` is None).
      image_fn: example_index -> original image (`reader_image_fn(reader)`).
      limit: stop after this many pictures (None: all).
    """

    def __init__(
        self,
        out_dir: str,
        sam_cfg,
        image_fn: Callable[[int], np.ndarray] | None = None,
        limit: int | None = None,
    ):
        self.out_dir, self.sam_cfg, self.image_fn, self.limit = out_dir, sam_cfg, image_fn, limit
        self.paths: list[str] = []
        self._seen: collections.Counter = collections.Counter()

    def __call__(self, batch: Mapping[str, Any], res: dict, rows: np.ndarray) -> None:
        conv_image = np.asarray(batch["conv_image"])
        sample_ids = np.asarray(batch.get("sample_id", np.full(len(conv_image), "", object))).astype(str)
        ex_index = np.asarray(batch.get("example_index", np.full(len(batch["orig_hw"]), -1)))
        for r in rows:
            if self.limit is not None and len(self.paths) >= self.limit:
                return
            b = int(conv_image[r])
            h, w = (int(v) for v in np.asarray(batch["mask_hw"])[r])
            oh, ow = (int(v) for v in np.asarray(batch["orig_hw"])[b])
            if self.image_fn is not None:
                image = self.image_fn(int(ex_index[b]))
                if image.shape[:2] != (h, w):
                    image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
            else:
                image = image_from_sam_input(
                    np.asarray(batch["images_sam"])[b],
                    np.asarray(batch["sam_input_hw"])[b],
                    (h, w),
                    self.sam_cfg.pixel_mean,
                    self.sam_cfg.pixel_std,
                )
            scale = np.array([w / ow, h / oh], np.float32)  # points live in original pixels
            pp = {}
            if "pp_mask" in res:
                pp = {
                    "pp_mask": res["pp_mask"][r, :h, :w],
                    "pp_points": res["pp_points"][r] * scale,
                    "pp_labels": res["pp_labels"][r],
                }
            iou = float(query_iou(res["inter"][r], res["union"][r]))
            pic = analysis_picture(
                image,
                res["sim_map"][r, :h, :w].astype(np.float32),
                res["points"][r] * scale,
                res["labels"][r],
                res["pred_mask"][r, :h, :w],
                np.asarray(batch["masks"])[r, :h, :w],
                title=f"{sample_ids[b]} IoU {100 * iou:.1f}",
                **pp,
            )
            sid = str(sample_ids[b]) or f"row{r}"
            j = self._seen[sid]  # the query's index within its image, as in the evaluation records
            self._seen[sid] += 1
            self.paths.append(save_picture(pic, self.out_dir, sid if j == 0 else f"{sid}#{j}"))
