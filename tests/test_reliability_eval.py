"""An evaluation that cannot score every item says so (issue "Nothing lost, nothing silent", problems 4
and 6): `summary.json` counts the items and queries it dropped, and why.

A generated val split of 8 scenes: 4 with a truncated JPEG (unreadable when decoded), 1 whose query is too
long for the 128-token bucket, 1 whose json is unreadable (dropped while reading the split); evaluated by
`read_jax.eval.run.run` with a random smoke-sized model.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from read_jax.build import model_fn
from read_jax.config import ReadConfig
from read_jax.data import make_shapes
from tests.helpers import numpy_random_model

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = str(ROOT / "tests" / "assets" / "tokenizer")
UNREADABLE = (0, 3, 4, 6)
TOO_LONG = 5
BROKEN_JSON = 7


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    make_shapes.write_split(str(d), "val", 8, seed=4)
    for i in UNREADABLE:
        jpg = d / "val" / f"shapes_val_{i:05d}.jpg"
        jpg.write_bytes(jpg.read_bytes()[:1500])  # the header (and the size) stay readable
    js = d / "val" / f"shapes_val_{TOO_LONG:05d}.json"
    ann = json.loads(js.read_text())
    ann["text"], ann["is_sentence"] = [" ".join(["which shape is the one left of the blue star"] * 30)], True
    js.write_text(json.dumps(ann))
    (d / "val" / f"shapes_val_{BROKEN_JSON:05d}.json").write_text("{not json")
    return d


def test_evaluation_summary_counts_skipped_items_and_queries(split, tmp_path, capsys):
    from read_jax.eval import run as evaluate

    cfg = ReadConfig.smoke(max_segs=1, lora=None)
    c = ml_collections.ConfigDict()
    c.data = {
        "root": str(split),
        "reason_seg_dir": "{root}",
        "tokenizer": TOKENIZER,
        "batch_size": 8,
        "max_convs": 1,
        "length_buckets": (128,),
        "max_mask_side": 448,
        "seed": 0,
    }
    c.eval = {"batch_size": 8}
    c.mesh = {"data": -1, "fsdp": 1}
    out = tmp_path / "eval"
    evaluate.run(
        c,
        str(tmp_path),
        "reasonseg_val",
        out=str(out),
        model=numpy_random_model(model_fn(cfg)),
        tokenizer_dir=TOKENIZER,
        progress=False,
    )
    summary = json.loads((out / "summary.json").read_text())
    scored = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    want_scored = sorted(set(range(8)) - {*UNREADABLE, TOO_LONG, BROKEN_JSON})
    assert sorted(int(r["id"].rsplit("_", 1)[1]) for r in scored) == want_scored
    assert summary["num_queries"] == len(want_scored) == 2
    # What was not scored, and why: 6 of the 8 scenes, one query each.
    assert summary["num_dropped_items"] == 6 and summary["num_dropped_queries"] == 6
    assert summary["dropped_by_reason"] == {
        "unreadable json": {"items": 1, "queries": 1, "stage": "reading"},
        "unreadable image": {"items": 4, "queries": 4, "stage": "preprocessing"},
        "query too long": {"items": 1, "queries": 1, "stage": "preprocessing"},
    }
    items = summary["dropped_items"]
    assert [d["reason"] for d in items] == ["unreadable image"] * 3 + ["query too long", "unreadable image"]
    assert all(d["queries"] == 1 and d["first_query"] == 0 and d["message"] for d in items)
    assert "takes" in items[3]["message"] and "largest length bucket holds 128" in items[3]["message"]
    printed = capsys.readouterr().out
    assert (
        "reasonseg_val: warning: 6 items (6 queries) were not scored (unreadable json 1, unreadable image 4, "
        "query too long 1); see dropped_by_reason in summary.json" in printed
    )
    assert np.isfinite(summary["gIoU"])
