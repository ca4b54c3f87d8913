"""`train.py` under faults (issue "Nothing lost, nothing silent", problems 3, 6, 8, 9): the guard against an
exploding update, skip counts in metrics.jsonl, a resume that neither repeats steps nor accepts another
config's workdir, a learning rate that cannot train.

Runs are `read_jax.cli.train.main` in-process on `configs/tiny.py:read,smoke` (8 fake CPU devices) reading
ReasonSeg only (`DATA`), on the generated shapes set with two truncated images and one query too long for the
192-token bucket.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from read_jax.cli import train as train_cli
from read_jax.data import make_shapes

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny.py") + ":read,smoke"
STEPS = 4
BATCH = 8
# READ's recipe on ReasonSeg alone, 8 images per step, no false-premise draws (a false-premise row asks
# another question of the same scene: the "too long" query would not be drawn); applied by the runs and by
# `expected_skips`' replay alike.
DATA = [
    "--config.data.rates=reason_seg:1",
    f"--config.data.batch_size={BATCH}",
    "--config.data.reason_seg_false_premise=0",
]
LONG_QUERY = " ".join(["which of the coloured shapes in this picture"] * 40) + "?"


def train(data: Path, workdir: Path, *extra: str) -> tuple[int, str]:
    """(exit status, stderr) of `train.py` with the test's settings."""
    argv = ["--config", CONFIG, "--workdir", str(workdir), f"--config.data.root={data}"]
    argv += ["--config.data.make_shapes=False", f"--config.train.total_steps={STEPS}", *DATA]
    argv += ["--config.train.log_every=1", "--config.progress=False", "--config.eval.every_epochs=0"]
    argv += ["--config.checkpoint.every_steps=1", "--config.checkpoint.async_save=False", *extra]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = train_cli.main(argv)
    return code, err.getvalue()


def rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """16 training scenes: two with a truncated JPEG (header intact), one whose every query is too long."""
    d = tmp_path_factory.mktemp("shapes")
    reason_seg = d / "reason_seg" / "ReasonSeg"  # the config's data.reason_seg_dir
    make_shapes.write_split(str(reason_seg), "train", 16, seed=3)
    bad = {}
    for i in (2, 9):
        jpg = reason_seg / "train" / f"shapes_train_{i:05d}.jpg"
        jpg.write_bytes(jpg.read_bytes()[:1500])
        bad[str(jpg)] = "unreadable image"
    js = reason_seg / "train" / "shapes_train_00005.json"
    ann = json.loads(js.read_text())
    ann["text"], ann["is_sentence"] = [LONG_QUERY], True
    js.write_text(json.dumps(ann))
    bad[str(js.with_suffix(".jpg"))] = "query too long"
    return d, bad


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """An exploding run (lr 1e30, a checkpoint every step), then its resume with a sane lr."""
    import jax
    import orbax.checkpoint as ocp

    d, _ = data
    w = tmp_path_factory.mktemp("run") / "w"
    nan = train(d, w, "--config.train.lr=1e30")
    after_nan = {
        "checkpoints": sorted(int(p.name) for p in (w / "checkpoints").iterdir() if p.name.isdigit())
    }
    after_nan["rows"] = rows(w)
    tr = ocp.StandardCheckpointer().restore(
        w / "checkpoints" / str(max(after_nan["checkpoints"])) / "trainable"
    )
    after_nan["trainables"] = [np.asarray(x) for x in jax.tree.leaves(tr)]
    # The resume checkpoints only at its end (keep=1: that removes checkpoint 1).
    resumed = train(d, w, "--config.train.lr=2e-3", f"--config.checkpoint.every_steps={STEPS}")
    return {"workdir": w, "nan": nan, "after_nan": after_nan, "resumed": resumed}


def expected_skips(d: Path, bad: dict, n_examples: int) -> int:
    """The unusable draws of the first `n_examples` training examples, replayed from the mixture's seeded
    draws (example i, attempt a) without the pipeline: a draw of a bad scene is skipped and redrawn."""
    from read_jax.cli import common
    from read_jax.data import loaders
    from read_jax.data import mixture as M
    from read_jax.train import config as run_config

    _, overrides = common.split_overrides([f"--config.data.root={d}", *DATA])
    c = common.load_run_config(CONFIG, overrides)  # the runs' config
    dc = loaders.data_config(c.data, run_config.read_config(c.model))
    sources = M.build_reference_sources(
        str(d), ("reason_seg",), max_convs=dc.max_convs, seed=dc.seed,
        reason_seg_dir=loaders.reason_seg_dir(c.data),
        reason_seg_false_premise=float(c.data.reason_seg_false_premise),
    )  # fmt: skip
    mix = M.Mixture(sources, loaders.parse_rates(c.data.rates), seed=dc.seed)
    skipped = 0
    for i in range(n_examples):
        attempt = 0
        while mix.sample(mix.rng(i, attempt))[1].image_path in bad:
            skipped, attempt = skipped + 1, attempt + 1
    return skipped


# ---- 3: the NaN guard lets an exploding update through ----------------------------------------------------
def test_guard_stops_an_exploding_update_before_its_checkpoint(runs):
    """lr = 1e30: the first real update (warmup: lr(0) = 0) explodes the parameters while its loss and
    gradient are finite; the guard refuses it, no checkpoint holds it, and the message is true."""
    code, err = runs["nan"]
    assert code == 3, err
    msg = next(line for line in err.splitlines() if "non-finite training step" in line)
    figures = msg.split(": ", 2)[2].split(";")[0].split(", ")
    m = {k: float(v) for k, v in (f.split("=") for f in figures)}
    assert msg.startswith("train.py: non-finite training step 1: ")
    assert np.isfinite(m["loss"]) and np.isfinite(m["l2_grads"])  # only the update is non-finite
    assert not (np.isfinite(m["l2_updates"]) and np.isfinite(m["l2_params"]))
    assert "'example_index': [[8, 9, 10, 11, 12, 13, 14, 15]]" in msg and "'sample_id': [[" in msg
    assert "The latest checkpoint, step 1, holds the state before it, untouched" in msg
    # The only checkpoint is the one before the failing update, and its weights are the sane ones.
    assert runs["after_nan"]["checkpoints"] == [1]
    leaves = runs["after_nan"]["trainables"]
    assert leaves and all(np.isfinite(x).all() for x in leaves)
    assert max(float(np.abs(x).max()) for x in leaves) < 100.0
    assert [r["step"] for r in runs["after_nan"]["rows"]] == [1]


def test_guard_stop_resumes_from_the_untouched_checkpoint(runs):
    code, err = runs["resumed"]
    assert code == 0, err
    w = runs["workdir"]
    assert json.loads((w / "summary.json").read_text())["start_step"] == 1
    steps = [r["step"] for r in rows(w) if r["split"] == "train"]
    assert steps == list(range(1, STEPS + 1))  # the stopped run's row 1, then 2..4: each step once
    assert all(np.isfinite(r["loss"]) and r["finite"] == 1.0 for r in rows(w))


def test_guard_refuses_a_learning_rate_that_cannot_train(tmp_path, data):
    d, _ = data
    for lr in ("-1", "0", "nan"):
        code, err = train(d, tmp_path / "w", f"--config.train.lr={lr}")
        assert code == 2 and "Traceback" not in err
        assert err.strip() == f"train.py: error: train.lr={float(lr)}: the learning rate must be a finite " \
            "number > 0 (--config.train.lr)"  # fmt: skip
    assert not (tmp_path / "w").exists()


# ---- 6: training skips are never counted in metrics.jsonl -------------------------------------------------
def test_skipped_training_items_are_counted_in_metrics(runs, data):
    d, bad = data
    train_rows = [r for r in rows(runs["workdir"]) if r["split"] == "train"]
    want = expected_skips(d, bad, STEPS * BATCH)
    assert want > 0
    assert train_rows[-1]["skipped_total"] == want
    assert sum(r["skipped"] for r in train_rows) == want  # the stopped run's row + the resumed run's
    assert [r["skipped_total"] for r in train_rows] == list(np.cumsum([r["skipped"] for r in train_rows]))


# ---- 8: an architecture mismatch on resume is a traceback from orbax -------------------------------------
def test_resume_with_another_config_is_one_line_not_a_traceback(runs, data):
    d, _ = data
    code, err = train(d, runs["workdir"], "--config.model.preset=tiny")
    assert code == 2 and "Traceback" not in err
    assert err.strip() == (
        f"train.py: error: --workdir {runs['workdir']} holds a run of another config (model.preset='smoke' "
        "there, 'tiny' here): pass the config it was trained with, or train this config in another --workdir"
    )


# ---- 9: metrics.jsonl repeats steps after a resume ------------------------------------------------------
def test_resume_drops_metric_rows_after_the_checkpoint_skip_no_step_twice(tmp_path):
    """Rows a killed run wrote after its last checkpoint (and a row cut short by the kill) are dropped when
    the run resumes from that checkpoint, so each step is written once."""
    from read_jax.train.loop import MetricWriter

    path = tmp_path / "metrics.jsonl"
    lines = [
        json.dumps({"step": s, "split": sp, "loss": 1.0}) for s in (1, 2, 3, 4) for sp in ("train", "val")
    ]
    path.write_text("\n".join(lines) + '\n{"step": 5, "spl')
    w = MetricWriter(tmp_path, start_step=2)
    for s in (3, 4):
        w.write(s, "train", {"loss": 2.0})
    w.close()
    got = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["split"], r["loss"]) for r in got] == [
        (1, "train", 1.0),
        (1, "val", 1.0),
        (2, "train", 1.0),
        (2, "val", 1.0),
        (3, "train", 2.0),
        (4, "train", 2.0),
    ]
