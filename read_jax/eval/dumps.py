"""Per-sample mask dumps of an evaluation and the re-scoring of a run from them (`test_read.py`'s two steps).

PyTorch reference: rui-qian/READ@2549240 `test_read.py` (`inference` saves every image's predicted and GT
masks as `segmentation_mask/*.npz` with a preds json; `--cmd metrics` re-reads them and computes cIoU and the
See accuracy with `intersectionAndUnionGPU`). Here `evaluate.py --dump-masks` writes one compressed npz per
query, at the resolution it was scored at (the original size by default):

  OUT/masks/<query id>.npz   pred bool[H, W] (the first [SEG]'s mask, all False without one), gt uint8[H, W]
                             (the GT as scored: 255 ignored, RefCOCO's 2 where polygon parts overlap)

and each record of OUT/samples.jsonl names its file (`mask_file`). `rescore(OUT)` recomputes every query's
intersection / union / predicted area / presence from the files alone (numpy, `metrics.intersection_union`)
and the summary from those records with the protocol's own summary function: the figures equal the direct
run's (`python -m read_jax.cli.rescore OUT` checks them against OUT/summary.json).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from read_jax.eval.records import fp_summary_from_records, summary_from_records
from read_jax.metrics import intersection_union, query_iou

MASK_DIR = "masks"
# The figures a re-scoring recomputes (everything else in a summary is bookkeeping: paths, timings, meta).
FIGURES = (
    "gIoU",
    "cIoU",
    "num_queries",
    "short",
    "long",
    "all_foreground",
    "by_query_kind",
    "See",
    "Segment",
    "num_true_premise",
)


def mask_file(query_id: str) -> str:
    """The dump of a query, relative to the run's output directory (ids like 'refcoco/123#2' made safe)."""
    return os.path.join(MASK_DIR, re.sub(r"[^A-Za-z0-9._+-]", "_", query_id) + ".npz")


def write_masks(out_dir: str, record: dict, pred: np.ndarray, gt: np.ndarray) -> None:
    """Write one query's masks (cropped to the scored extent by the caller) and name the file in `record`."""
    rel = mask_file(record["id"])
    path = os.path.join(out_dir, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez_compressed(path, pred=np.asarray(pred, bool), gt=np.asarray(gt, np.uint8))
    record["mask_file"] = rel


def read_masks(out_dir: str, record: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    with np.load(os.path.join(out_dir, record["mask_file"])) as z:
        return z["pred"], z["gt"]


def rescore_records(out_dir: str, records: list[dict]) -> list[dict]:
    """Records with intersection / union / iou / pred_area / presence recomputed from their dumps."""
    out = []
    for rec in records:
        if "mask_file" not in rec:
            raise ValueError(f"{out_dir}: query {rec.get('id')!r} has no mask dump (run with --dump-masks)")
        pred, gt = read_masks(out_dir, rec)
        if pred.shape != gt.shape:
            raise ValueError(f"{rec['mask_file']}: pred {pred.shape} and gt {gt.shape} differ")
        inter, union = intersection_union(pred, gt)
        area = int(pred.sum())
        out.append(
            {
                **rec,
                "intersection": int(inter),
                "union": int(union),
                "iou": float(query_iou(inter, union)),
                "pred_area": area,
                "presence": bool(rec["seg_emitted"] and area > 0),
            }
        )
    return out


def rescore(out_dir: str) -> tuple[dict, list[dict]]:
    """(summary, records) of a dumped run recomputed from OUT/masks and OUT/samples.jsonl (the protocol,
    teacher-forced or generation, is read from OUT/summary.json)."""
    with open(os.path.join(out_dir, "summary.json")) as f:
        direct = json.load(f)
    with open(os.path.join(out_dir, "samples.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    records = rescore_records(out_dir, records)
    fn = fp_summary_from_records if direct.get("protocol") == "generation" else summary_from_records
    return fn(records), records


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def differences(direct: Mapping[str, Any], rescored: Mapping[str, Any], tol: float = 1e-12) -> list[str]:
    """The figures (`FIGURES`, nested ones included) on which two summaries disagree, as 'name: a != b'."""
    a = _flat({k: direct[k] for k in FIGURES if k in direct})
    b = _flat({k: rescored[k] for k in FIGURES if k in rescored})

    def same(x, y):
        if isinstance(x, (int, float)) and isinstance(y, (int, float)):
            return abs(x - y) <= tol
        return x == y

    return [f"{k}: {a.get(k)} != {b.get(k)}" for k in sorted(set(a) | set(b)) if not same(a.get(k), b.get(k))]
