"""`train.py` end to end on the generated shapes set (smoke sizes, 8 fake devices): kill -9 and resume, the
NaN
guard, what a checkpoint holds, best-by-cIoU, and reloading a run for evaluation.

Every run is a `train.py` subprocess, as a user runs it. They share a persistent XLA compilation cache, so
only
the first run of each distinct step compiles it.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from read_jax.data import make_shapes

ROOT = Path(__file__).resolve().parents[1]
# The SESAME stage's recipe (no LoRA: an export converts back leaf for leaf), smoke-sized.
CONFIG = str(ROOT / "configs" / "tiny.py") + ":sesame,smoke"
STEPS = 12
EPOCH = 4  # steps per epoch: a validation every 4 steps


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("train_loop")
    data = base / "shapes"
    for split, n in (("train", 16), ("val", 8)):  # ReasonSeg only, where the config's reason_seg_dir is
        make_shapes.write_split(str(data / "reason_seg" / "ReasonSeg"), split, n, seed=3)
    e = dict(os.environ)
    e.update(
        JAX_COMPILATION_CACHE_DIR=str(base / "xla_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        JAX_PLATFORMS="cpu",
    )
    e["XLA_FLAGS"] = (e.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    return {"base": base, "data": data, "env": e}


def command(env, workdir, *extra):
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "--config",
        CONFIG,
        "--workdir",
        str(workdir),
        f"--config.data.root={env['data']}",
        "--config.data.make_shapes=False",
        "--config.data.rates=reason_seg:1",
        "--config.data.batch_size=8",  # one image per (fake) device
        f"--config.train.total_steps={STEPS}",
        f"--config.train.steps_per_epoch={EPOCH}",
        "--config.train.log_every=1",
        "--config.progress=False",
        "--config.checkpoint.every_steps=3",
        "--config.checkpoint.keep=2",
        *extra,
    ]


def run(env, workdir, *extra, check=True):
    p = subprocess.run(
        command(env, workdir, *extra),
        env=env["env"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def train_rows(workdir) -> dict[int, dict]:
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["split"] == "train"}


def finished_steps(workdir) -> list[int]:
    d = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


@pytest.fixture(scope="module")
def uninterrupted(env):
    """The reference run: STEPS steps in one go, validating every epoch (EPOCH steps)."""
    w = env["base"] / "uninterrupted"
    run(env, w)
    return w


def test_kill_and_resume_gives_the_uninterrupted_losses(env, uninterrupted):
    ref = train_rows(uninterrupted)
    assert sorted(ref) == list(range(1, STEPS + 1))
    w = env["base"] / "killed"
    proc = subprocess.Popen(
        command(env, w), env=env["env"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 300
        while not finished_steps(w) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before its first checkpoint was seen: cannot test the kill"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    resumed_from = max(finished_steps(w))
    assert resumed_from < STEPS
    before = train_rows(w)
    p = run(env, w)
    assert f"resumed {w} at step {resumed_from}" in p.stderr
    after = {s: r for s, r in train_rows(w).items() if s > resumed_from}
    # Rows written after the restart: the steps after the checkpoint, the same losses as the uninterrupted
    # run.
    assert sorted(after) == list(range(resumed_from + 1, STEPS + 1))
    for s, r in after.items():
        for k in ("loss", "ce", "bce", "dice", "l2_grads"):
            np.testing.assert_allclose(r[k], ref[s][k], rtol=1e-6, err_msg=f"step {s} {k}")
    # The killed process got at least to its checkpoint: its rows up to there matched too.
    for s in range(1, resumed_from + 1):
        np.testing.assert_allclose(before[s]["loss"], ref[s]["loss"], rtol=1e-6)


def test_checkpoint_holds_trainables_optimizer_data_state_and_a_base_reference(uninterrupted):
    import orbax.checkpoint as ocp

    steps = finished_steps(uninterrupted)
    assert steps == [STEPS - 3, STEPS]  # keep-N = 2
    ck = uninterrupted / "checkpoints" / str(STEPS)
    assert {p.name for p in ck.iterdir() if not p.name.startswith("_")} >= {
        "trainable",
        "opt_state",
        "data",
        "meta",
    }
    meta = json.loads((ck / "meta" / "metadata").read_text())
    assert meta["step"] == STEPS and meta["base"]["kind"] == "scratch" and meta["base"]["seed"] == 0
    # The data state is the grain iterator position: STEPS batches consumed.
    assert json.loads((ck / "data" / "process_0-of-1.json").read_text()) == {"next_index": STEPS}
    # Only trainables are saved: no frozen tower, no LLaMA base weight.
    tree = ocp.StandardCheckpointer().metadata(ck / "trainable").item_metadata.tree
    paths = set(_paths(tree))
    assert any(p.startswith("visual_model/mask_decoder/") for p in paths)
    assert not any("vision_tower" in p or "image_encoder" in p for p in paths)
    # Best-by-cIoU is kept separately: the validation with the highest cIoU.
    vals = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in vals if r["split"] == "val"]
    assert len(vals) == STEPS // EPOCH
    best = max(vals, key=lambda r: r["cIoU"])
    best_dirs = [p for p in (uninterrupted / "best").iterdir() if p.name.isdigit()]
    assert [int(p.name) for p in best_dirs] == [best["step"]]
    best_meta = json.loads((best_dirs[0] / "meta" / "metadata").read_text())
    assert best_meta["metrics"]["cIoU"] == pytest.approx(best["cIoU"])
    assert (uninterrupted / "summary.json").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in (uninterrupted / "tb").iterdir())


def _paths(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _paths(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}"


def test_nan_guard_stops_with_step_and_batch_and_keeps_the_last_good_checkpoint(env):
    """A huge learning rate makes the parameters overflow after the first real update (warmup: lr(0) = 0)."""
    w = env["base"] / "nan"
    p = run(env, w, "--config.train.lr=1e30", "--config.checkpoint.every_steps=1", check=False)
    assert p.returncode == 3, p.stderr[-3000:]
    msg = p.stderr
    assert "non-finite training step" in msg and "example_index" in msg and "sample_id" in msg
    bad_step = int(msg.split("non-finite training step ")[1].split(":")[0])
    assert bad_step >= 1
    # Checkpoints stop at the last good step: none was written for the failing update or after it.
    assert max(finished_steps(w)) == bad_step
    rows = train_rows(w)
    assert all(np.isfinite(r["loss"]) for r in rows.values()) and max(rows) <= bad_step


def test_load_trained_restores_the_saved_trainables(uninterrupted):
    import jax
    from flax import nnx

    from configs import tiny
    from read_jax import sharding as shd
    from read_jax.config import ConfigError
    from read_jax.train import checkpoints as ckpts
    from read_jax.train import config as run_config
    from read_jax.train import state as tstate

    c = tiny.get_config("sesame,smoke")
    # Another scratch seed is another frozen base: refused before anything is built.
    other = tiny.get_config("sesame,smoke")
    other.init.seed = 7
    with pytest.raises(ConfigError, match="frozen base"):
        ckpts.load_trained(other, uninterrupted)
    model, meta = ckpts.load_trained(c, uninterrupted, which="latest")
    assert meta["step"] == STEPS
    import orbax.checkpoint as ocp

    saved = ocp.StandardCheckpointer().restore(uninterrupted / "checkpoints" / str(STEPS) / "trainable")
    got = nnx.to_pure_dict(nnx.state(model))
    for path in _paths(jax.tree.map(lambda x: 0, saved)):
        a = _get(saved, path)
        b = _get(got, path)
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=path)
    # which="init": the run's untrained starting point (same frozen base, trainables as initialised), a
    # baseline.
    init_model, init_meta = ckpts.load_trained(c, uninterrupted, which="init")
    setup = tstate.setup_model(run_config.read_config(c.model), shd.make_mesh(), seed=int(c.init.seed))
    tr0, _ = tstate.init_params(setup)
    init_state = nnx.to_pure_dict(nnx.state(init_model))
    moved = 0
    for path in _paths(jax.tree.map(lambda x: 0, saved)):
        np.testing.assert_array_equal(
            np.asarray(_get(init_state, path)), np.asarray(_get(nnx.to_pure_dict(tr0), path)), err_msg=path
        )
        moved += not np.array_equal(np.asarray(_get(init_state, path)), np.asarray(_get(saved, path)))
    assert init_meta["step"] == 0 and moved > 0
    with pytest.raises(ValueError, match="which"):
        ckpts.load_trained(c, uninterrupted, which="newest")


def _get(tree, path):
    for k in path.split("/"):
        tree = tree[int(k)] if isinstance(tree, (list, tuple)) else tree[k if k in tree else int(k)]
    return tree


def _convert_back(hf, back):
    """`convert_weights.py --hf` of an export (with its CLIP directory) into `back`, in fp32."""
    from read_jax.cli import convert as convert_cli

    args = ["--hf", str(hf), "--clip", str(hf / "vision_tower"), "--base", "smoke", "--dtype", "fp32"]
    assert convert_cli.main([*args, "--out", str(back), "--no-progress"]) == 0


def test_export_of_a_workdir_converts_back_to_the_trained_model(uninterrupted, tmp_path):
    """`convert_weights.py --export WORKDIR` (the run's best-else-latest checkpoint, on the config it saved)
    writes the HF READ layout with a release's tokenizer files, and converting that back gives the trained
    model leaf for leaf."""
    from read_jax.build import load_model
    from read_jax.cli import convert as convert_cli
    from read_jax.tree_util import abstract_leaves

    hf, back = tmp_path / "hf", tmp_path / "back"
    assert convert_cli.main(["--export", str(uninterrupted), "--out", str(hf), "--dtype", "fp32"]) == 0
    # The tokenizer files are those a SESAME release publishes (real files, tests/assets/hf_configs/sesame).
    real = ROOT / "tests" / "assets" / "hf_configs" / "sesame"
    for mine, theirs in (
        ("added_tokens.json", "SESAME.added_tokens.json"),
        ("special_tokens_map.json", "SESAME.special_tokens_map.json"),
        ("tokenizer_config.json", "SESAME_minus.tokenizer_config.json"),
    ):
        assert json.loads((hf / mine).read_text()) == json.loads((real / theirs).read_text()), mine
    assert not (hf / "goldens.json").exists()  # only tokenizer files travel with the weights
    _convert_back(hf, back)
    conversion = json.loads((back / "conversion.json").read_text())
    assert conversion["ignored_keys"] == [] and conversion["uninitialized"] == []
    trained = abstract_leaves(load_model(uninterrupted))  # the config the run saved
    converted = abstract_leaves(load_model(back))
    assert set(trained) <= set(converted)
    for path, v in trained.items():
        np.testing.assert_array_equal(np.asarray(converted[path]), np.asarray(v), err_msg=path)


def test_export_which_picks_the_workdir_checkpoint(uninterrupted, tmp_path, capsys):
    """`--export WORKDIR --which latest|init` exports that checkpoint, as `evaluate.py --which` scores it:
    converted back, each equals `load_trained(..., which=...)` leaf for leaf (and the two differ: the run
    trained). `--which` refuses a converted checkpoint and `--hf`, whose inputs hold one set of weights."""
    from read_jax.build import load_model
    from read_jax.cli import convert as convert_cli
    from read_jax.train.checkpoints import load_trained, saved_run_config
    from read_jax.tree_util import abstract_leaves

    config = saved_run_config(uninterrupted)
    got = {}
    for which in ("latest", "init"):
        hf, back = tmp_path / f"hf_{which}", tmp_path / f"back_{which}"
        args = ["--export", str(uninterrupted), "--which", which, "--out", str(hf), "--dtype", "fp32"]
        assert convert_cli.main(args) == 0
        _convert_back(hf, back)
        want = abstract_leaves(load_trained(config, uninterrupted, which=which)[0])
        got[which] = abstract_leaves(load_model(back))
        for path, v in want.items():
            np.testing.assert_array_equal(np.asarray(got[which][path]), np.asarray(v), err_msg=path)
    latest, init = got["latest"], got["init"]
    assert any(not np.array_equal(np.asarray(v), np.asarray(init[k])) for k, v in latest.items())
    back = tmp_path / "back_latest"
    assert convert_cli.main(["--export", str(back), "--which", "best", "--out", str(tmp_path / "x")]) == 2
    assert "is a converted checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        hf = str(tmp_path / "hf_latest")
        convert_cli.main(["--hf", hf, "--which", "latest", "--out", str(tmp_path / "y")])
    assert "--which picks the checkpoint" in capsys.readouterr().err
