"""Per-query records of an evaluation, the summaries computed from them, and the files they are written to.

A record is one query: its id, the question, integer intersection/union at the protocol's resolution, the SasP
points, presence, and the analyses' figures. Summaries are pure functions of the records (the
`samples.jsonl`),
so figures can be recomputed from the file and do not depend on batch size, padding or device count
(read_reference.md §8.1: gIoU = mean over queries of I / (U + 1e-5), +1 when U == 0; cIoU = sum I / sum U).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from read_jax.metrics import IoUMeter, query_iou, see_accuracy


def row_valid(batch: Mapping[str, Any]) -> np.ndarray:
    """Rows that count: a real conversation with a GT, on a real image (padding never counts)."""
    conv_image = np.asarray(batch["conv_image"])
    return (
        np.asarray(batch["conv_valid"], bool)
        & np.asarray(batch["mask_valid"], bool)
        & np.asarray(batch["image_valid"], bool)[conv_image]
    )


def query_text(tokenizer, ids: Sequence[int]) -> str:
    """The user's question of a prompt row (text after the image, before the last " ASSISTANT:")."""
    ids = [int(i) for i in ids if i >= 0]
    im_end = (
        tokenizer.convert_tokens_to_ids("<im_end>") if hasattr(tokenizer, "convert_tokens_to_ids") else None
    )
    if im_end in ids:
        ids = ids[ids.index(im_end) + 1 :]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    text = text.split("USER:")[-1]
    return text.split("ASSISTANT:")[0].strip()


def points_json(points: np.ndarray, labels: np.ndarray) -> list:
    """[[x, y, label], ...] without SAM's "not a point" entries (label -1 carries no position)."""
    return [
        [round(float(x), 2), round(float(y), 2), int(lab)] for (x, y), lab in zip(points, labels) if lab != -1
    ]


def reason_seg_meta(reader) -> Callable[[int, int], dict]:
    """meta_fn for a `ReasonSegReader`: is_sentence (short/long subsets of ReasonSeg test), text[0], and the
    query
    kind of the generated shapes set (`make_shapes.query_kind`) when the text is one of its phrasings (the
    summary then gives gIoU/cIoU per kind)."""
    from read_jax.data.make_shapes import query_kind

    def fn(example_index: int, query_index: int) -> dict:
        items = getattr(reader, "items", None)
        if items is None or not 0 <= example_index < len(items):
            return {}
        ann = items[example_index]
        meta = {"is_sentence": bool(ann.is_sentence), "text": ann.texts[0]}
        kind = query_kind(meta["text"])
        return {**meta, "query_kind": kind} if kind else meta

    return fn


def batch_records(
    batch: Mapping[str, Any],
    res: dict,
    valid: np.ndarray,
    tokenizer=None,
    meta_fn: Callable[[int, int], dict] | None = None,
    seen: collections.Counter | None = None,
) -> list[dict]:
    """Per-query records of the counted rows of one batch.

    A query's index within its example is `batch["query_index"]` when the pipeline provides it; otherwise it
    is counted in `seen` (per sample id, across the batches of a run): exact on one host, where an image's
    queries (possibly split over several batch slots) arrive in order. Ids: the sample id for query 0,
    "<sample id>#<j>" for query j > 0.
    """
    conv_image = np.asarray(batch["conv_image"])
    sample_ids = np.asarray(batch.get("sample_id", np.full(len(batch["orig_hw"]), "", object))).astype(str)
    ex_index = np.asarray(batch.get("example_index", np.full(len(batch["orig_hw"]), -1)))
    seen = collections.Counter() if seen is None else seen
    recs = []
    for r in np.flatnonzero(valid):
        b = int(conv_image[r])
        sid = str(sample_ids[b])
        if "query_index" in batch:
            j = int(np.asarray(batch["query_index"])[r])
        else:
            j = seen[sid]
            seen[sid] += 1
        inter, union = int(res["inter"][r]), int(res["union"][r])
        rec = {
            "id": sid if j == 0 else f"{sid}#{j}",
            "example_index": int(ex_index[b]),
            "query": query_text(tokenizer, batch["input_ids"][r]) if tokenizer is not None else None,
            "intersection": inter,
            "union": union,
            "iou": float(query_iou(inter, union)),
            "seg_emitted": bool(res["seg_valid"][r]),
            "presence": bool(res["seg_valid"][r] and res["area"][r] > 0),
            "pred_area": int(res["area"][r]),
            "points": points_json(res["points"][r], res["labels"][r]),
        }
        if "points_on_gt" in res:
            rec.update(_point_hits(np.asarray(res["labels"][r]), np.asarray(res["points_on_gt"][r])))
        if "exists" in batch:
            rec["gt_presence"] = bool(np.asarray(batch["exists"])[r])
        if meta_fn is not None:
            rec.update(meta_fn(int(ex_index[b]), j))
        recs.append(rec)
    return recs


def _point_hits(labels: np.ndarray, on_gt: np.ndarray) -> dict:
    """Where a row's SasP points fell: its first point (the similarity map's maximum, positive by the rule) on
    the target, and how many of its positive points are. Empty when SasP gave no positive (SasP off)."""
    pos = labels == 1
    if not pos.any():
        return {}
    return {
        "top_point_on_target": bool(pos[0] and on_gt[0]),
        "positive_points": int(pos.sum()),
        "positive_points_on_target": int((pos & on_gt).sum()),
    }


def point_hits_summary(records: Sequence[Mapping[str, Any]]) -> dict | None:
    """How often SasP points at the target, over the queries that have one (`gt_presence`) and SasP points:
    top_on_target (the first point on it: the fraction of queries), positives_on_target (the fraction of all
    positive points), positives_per_query, num_queries, and top_on_target per query kind when the records
    carry one. None when no record has SasP points."""
    recs = [r for r in records if "top_point_on_target" in r and r.get("gt_presence", True)]
    if not recs:
        return None

    def top(rs):
        return float(np.mean([r["top_point_on_target"] for r in rs]))

    pos = sum(r["positive_points"] for r in recs)
    out = {
        "top_on_target": top(recs),
        "positives_on_target": sum(r["positive_points_on_target"] for r in recs) / pos,
        "positives_per_query": pos / len(recs),
        "num_queries": len(recs),
    }
    if all(r.get("query_kind") for r in recs):
        kinds = sorted({r["query_kind"] for r in recs})
        out["by_query_kind"] = {k: top([r for r in recs if r["query_kind"] == k]) for k in kinds}
    return out


def summary_from_records(records: Sequence[Mapping[str, Any]]) -> dict:
    """gIoU / cIoU of the protocol, overall and (when records carry `is_sentence`) short / long, plus the
    optional analyses' figures and (when every record carries `query_kind`) per query kind. A pure function of
    the per-sample records (the JSONL)."""

    def meter(recs, ki="intersection", ku="union"):
        m = IoUMeter()
        m.update(np.array([r[ki] for r in recs], np.int64), np.array([r[ku] for r in recs], np.int64))
        return m.summary()

    out = meter(records)
    if records and all("is_sentence" in r for r in records):
        for name, flag in (("short", False), ("long", True)):
            sub = [r for r in records if r["is_sentence"] == flag]
            if sub:
                out[name] = meter(sub)
    if records and "ts_intersection" in records[0]:
        out["threshold_search"] = meter(records, "ts_intersection", "ts_union")
    if records and "pp_intersection" in records[0]:
        out["points_as_prompt"] = meter(records, "pp_intersection", "pp_union")
    if records and "fg_intersection" in records[0]:
        out["all_foreground"] = meter(records, "fg_intersection", "fg_union")
    if hits := point_hits_summary(records):
        out["sasp_points"] = hits
    if records and all(r.get("query_kind") for r in records):  # the generated shapes set (`evaluate.py`)
        kinds = sorted({r["query_kind"] for r in records})
        out["by_query_kind"] = {k: meter([r for r in records if r["query_kind"] == k]) for k in kinds}
    return out


def fp_summary_from_records(records: Sequence[Mapping[str, Any]]) -> dict:
    """FP-RefCOCO (read_reference.md §8.4): See = accuracy of presence ([SEG] emitted AND mask non-empty)
    against the premise; Segment = cIoU over all queries (false premises have an all-zero GT)."""
    m = IoUMeter()
    m.update(
        np.array([r["intersection"] for r in records], np.int64),
        np.array([r["union"] for r in records], np.int64),
    )
    see = see_accuracy([r["presence"] for r in records], [r["gt_presence"] for r in records])
    return {
        "See": see,
        "Segment": m.ciou,
        "gIoU": m.giou,
        "num_queries": m.count,
        "num_true_premise": int(sum(r["gt_presence"] for r in records)),
    }


class SkippedItems:
    """The eval slots whose item the pipeline skipped (`image_valid` False with `num_skipped` > 0), each with
    its reader index, the queries it held and why, read off the batches as they stream past.

    Slot k of this host's batch t is position `index + (t * B + k) * count` of the chunk list
    (`pipeline.eval_chunks`: the dataset is strided over hosts, then batched in order), which says how many
    queries the skipped chunk held; the reason is the slot's `sample_id` ("<reason>: <message>").
    """

    def __init__(self, chunks: Sequence[tuple[int, int]], num_conversations: Callable[[int], int], max_convs):
        self.chunks, self.num_conversations, self.max_convs = list(chunks), num_conversations, max_convs
        self.index, self.count = jax.process_index(), jax.process_count()
        self.items: list[dict] = []

    def watch(self, batches):
        """`batches`, unchanged, noting the skipped slots of each."""
        for t, batch in enumerate(batches):
            b = len(batch["num_skipped"])
            for k in np.flatnonzero(np.asarray(batch["num_skipped"]) > 0):
                pos = self.index + (t * b + int(k)) * self.count
                idx = int(np.asarray(batch["example_index"])[k])
                start = self.chunks[pos][1] if pos < len(self.chunks) and self.chunks[pos][0] == idx else 0
                reason, _, message = str(np.asarray(batch["sample_id"])[k]).partition(": ")
                n = max(self.num_conversations(idx), 1)
                self.items.append(
                    {
                        "example_index": idx,
                        "first_query": start,
                        "queries": min(self.max_convs, n - start),
                        "reason": reason,
                        "message": message,
                    }
                )
            yield batch


def dropped_summary(
    reader_dropped: Mapping[str, int], skipped: Sequence[Mapping[str, Any]], *, one_query_per_item: bool
) -> dict:
    """What an evaluation did not score, and why: items the reader dropped while reading the split (its
    `dropped` counter; as many queries when every item is one query, as in ReasonSeg) and items the
    pipeline skipped (`SkippedItems`, every process's, e.g. through `gather_records`)."""
    by: dict[str, dict] = {}
    for reason, n in sorted(reader_dropped.items()):
        by[reason] = {"items": int(n), "queries": int(n) if one_query_per_item else None, "stage": "reading"}
    seen: dict[str, set] = collections.defaultdict(set)
    for s in skipped:
        r = by.setdefault(s["reason"], {"items": 0, "queries": 0, "stage": "preprocessing"})
        if s["example_index"] not in seen[s["reason"]]:
            seen[s["reason"]].add(s["example_index"])
            r["items"] += 1
        r["queries"] = (r["queries"] or 0) + int(s["queries"])
    queries = [r["queries"] for r in by.values()]
    return {
        "num_dropped_items": sum(r["items"] for r in by.values()),
        "num_dropped_queries": None if None in queries else int(sum(queries)),
        "dropped_by_reason": by,
        "dropped_items": list(skipped),
    }


def gather_records(records: list[dict]) -> list[dict]:
    """Every process's records, in process order, on every process (one host: unchanged). Summaries are
    then computed from the whole split on every host, exactly."""
    if jax.process_count() == 1:
        return records
    from jax.experimental import multihost_utils  # pragma: no cover - multi-host only

    blob = np.frombuffer(json.dumps(records, default=json_default).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([blob.size], np.int32))).reshape(-1)
    buf = np.zeros((int(sizes.max()),), np.uint8)
    buf[: blob.size] = blob
    every = np.asarray(multihost_utils.process_allgather(buf))  # [processes, max bytes]
    out = []
    for k, n in enumerate(sizes):
        out.extend(json.loads(bytes(every[k, : int(n)]).decode()))
    return out


def write_results(
    out_dir: str,
    summary: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    name: str = "summary.json",
    samples: str = "samples.jsonl",
) -> tuple[str, str]:
    """`out_dir/summary.json` (indented) and `out_dir/samples.jsonl` (one record per query).

    The records are the whole split's on every process (`gather_records`): only process 0 writes."""
    s_path = os.path.join(out_dir, name)
    r_path = os.path.join(out_dir, samples)
    if jax.process_index() != 0:
        return s_path, r_path
    os.makedirs(out_dir, exist_ok=True)
    with open(s_path, "w") as f:
        json.dump(summary, f, indent=2, default=json_default)
    with open(r_path, "w") as f:
        f.writelines(json.dumps(rec, default=json_default) + "\n" for rec in records)
    return s_path, r_path


def json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
