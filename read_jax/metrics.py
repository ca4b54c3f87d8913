"""Segmentation metrics of the READ/LISA protocol: per-query IoU, gIoU, cIoU, and FP-RefCOCO's See.

Reference: `utils.py:80-92` (`intersectionAndUnionGPU`) and `train_read.py:455-506` (read_reference.md §8.1).

  * Pixels whose GT is 255 are ignored (neither intersection nor union).
  * Per query: IoU_fg = I / (U + 1e-5), and an empty-GT + empty-prediction query counts as 1.0.
  * gIoU = mean of per-query IoU_fg over all queries; cIoU = sum(I) / (sum(U) + 1e-10) over the split.

`intersection_union` is jit-able (it works on padded canvases with a validity mask); the accumulation
is host-side numpy in float64 so that data-parallel evaluation reduces exactly.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from read_jax.config import IGNORE_LABEL


def intersection_union(pred, gt, valid=None):
    """Foreground intersection and union per query.

    Args:
      pred: {0,1} or bool[..., H, W] predicted masks (logits > 0).
      gt: uint8/int[..., H, W] in {0, 1, 255}.
      valid: optional bool[..., H, W] canvas validity (padding pixels excluded).
    Returns:
      (intersection, union): int32[...] foreground pixel counts.
    """
    xp = jnp if not isinstance(pred, np.ndarray) or not isinstance(gt, np.ndarray) else np
    keep = gt != IGNORE_LABEL
    if valid is not None:
        keep = keep & valid
    p = (pred > 0) & keep
    g = (gt == 1) & keep
    inter = (p & g).sum(axis=(-1, -2))
    union = p.sum(axis=(-1, -2)) + g.sum(axis=(-1, -2)) - inter
    return inter.astype(xp.int64 if xp is np else xp.int32), union.astype(xp.int64 if xp is np else xp.int32)


def query_iou(inter, union):
    """Per-query IoU as the reference computes it: I/(U+1e-5), +1 where U == 0 (empty vs empty)."""
    inter = np.asarray(inter, np.float64)
    union = np.asarray(union, np.float64)
    return inter / (union + 1e-5) + (union == 0)


@dataclasses.dataclass
class IoUMeter:
    """Accumulates gIoU / cIoU over queries; `merge` combines meters from data-parallel shards exactly."""

    inter_sum: int = 0
    union_sum: int = 0
    iou_sum: float = 0.0
    count: int = 0

    def update(self, inter, union, valid=None) -> None:
        inter = np.asarray(inter).reshape(-1)
        union = np.asarray(union).reshape(-1)
        if valid is not None:
            v = np.asarray(valid, bool).reshape(-1)
            inter, union = inter[v], union[v]
        self.inter_sum += int(inter.sum())
        self.union_sum += int(union.sum())
        self.iou_sum += float(query_iou(inter, union).sum())
        self.count += int(inter.size)

    def merge(self, other: IoUMeter) -> IoUMeter:
        return IoUMeter(
            self.inter_sum + other.inter_sum,
            self.union_sum + other.union_sum,
            self.iou_sum + other.iou_sum,
            self.count + other.count,
        )

    @property
    def giou(self) -> float:
        return self.iou_sum / max(self.count, 1)

    @property
    def ciou(self) -> float:
        return self.inter_sum / (self.union_sum + 1e-10)

    def summary(self) -> dict:
        return {"gIoU": self.giou, "cIoU": self.ciou, "num_queries": self.count}


def see_accuracy(pred_exists, gt_exists) -> float:
    """FP-RefCOCO "See": accuracy of predicted object presence against the premise."""
    pred_exists = np.asarray(pred_exists, bool)
    gt_exists = np.asarray(gt_exists, bool)
    return float((pred_exists == gt_exists).mean()) if pred_exists.size else 0.0
