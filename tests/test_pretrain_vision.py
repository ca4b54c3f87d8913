"""The vision stage (`read_jax.pretrain.vision_train`, `python -m read_jax.cli.pretrain_vision`): its
per-patch targets against the rendered pictures and exact areas, its loss against numpy, its run (learning,
resuming), its export and READ's LLaVA stage taking it as the frozen vision tower."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from read_jax.config import ConfigError, ReadConfig
from read_jax.data.make_shapes import COLORS, random_scene
from read_jax.data.preprocess import clip_resize_shape
from read_jax.data.shapes.scene import SHAPES
from read_jax.pretrain import runner, vision_data, vision_train
from read_jax.train.config import load_config_file
from read_jax.tree_util import path_str

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "pretrain_vision.py")
S, PATCH = 112, 14  # the shapes preset's CLIP crop


def smoke_config():
    return load_config_file(CONFIG + ":smoke")


@pytest.mark.parametrize("arg", [None, "smoke"])
def test_stage_config_validates_and_trains_its_presets_clip(arg):
    """configs/pretrain_vision.py (covered here, not by test_train_configs: another command's config)."""
    c = load_config_file(CONFIG + (f":{arg}" if arg else ""))
    vision_train.validate(c)
    assert vision_train.clip_config(c) == (ReadConfig.smoke() if arg else ReadConfig.shapes()).clip
    c.train.lrr = 1.0
    with pytest.raises(ConfigError, match="unknown"):
        vision_train.validate(c)


# ---- targets ----------------------------------------------------------------------------------------------
def test_coverage_of_a_rectangle_is_its_exact_area_in_the_crop():
    """A rectangle given in the original picture's pixels, mapped by CLIP's resize + centre crop: two whole
    patches, then half of a patch, covered; nothing else."""
    h0, w0 = 240, 320
    nh, nw = clip_resize_shape(h0, w0, S)
    left = (nw - S) // 2
    assert (nh, left) == (112, 18)

    def rect(x0, y0, x1, y1):  # crop pixels -> original pixels
        sx, sy = nw / w0, nh / h0
        xs, ys = (np.asarray([x0, x1, x1, x0]) + left) / sx, np.asarray([y0, y0, y1, y1]) / sy
        return np.stack([xs, ys], 1)

    cov = vision_data.patch_coverage([rect(14, 28, 42, 42), rect(70, 84, 77, 98)], (h0, w0), S, PATCH)
    want = np.zeros((2, 8, 8))
    want[0, 2, 1:3] = 1.0  # row 2, columns 1-2
    want[1, 6, 5] = 0.5  # the left half of row 6, column 5
    np.testing.assert_allclose(cov, want, atol=0.03)


def test_targets_name_the_drawn_shape_under_each_covered_patch():
    """On generated scenes: where one instance covers a patch almost whole, the crop's pixels there are its
    colour (the geometry agrees with the rendering), and every attribute's target names it: its colour,
    kind, size third and the 3 x 3 cell of its centre, recomputed here from the scene."""
    full = 0
    for index in range(12):
        ex = vision_data.example(0, vision_data.TRAIN_STREAM, index, S, PATCH)
        image, shapes = random_scene(np.random.default_rng([0, vision_data.TRAIN_STREAM, index]))
        w, h = image.size
        cov = vision_data.patch_coverage([s["poly"] for s in shapes], (h, w), S, PATCH)
        cov = cov.reshape(len(shapes), -1)
        for name in vision_data.ATTRIBUTES:
            np.testing.assert_allclose(ex[name].sum(-1), 1.0, atol=1e-5)
        for p in range(64):
            i = int(cov[:, p].argmax())
            if cov[i, p] < 0.97:
                continue
            full += 1
            s = shapes[i]
            r, c = divmod(p, 8)
            pix = ex["pixels"][r * PATCH + 3 : (r + 1) * PATCH - 3, c * PATCH + 3 : (c + 1) * PATCH - 3]
            assert np.abs(pix.reshape(-1, 3).mean(0) - COLORS[s["color"]]).max() < 12, (index, p, s["color"])
            rel = s["r"] / min(w, h)
            size = 0 if rel < 0.07 + 0.1 / 3 else 1 if rel < 0.07 + 0.2 / 3 else 2
            place = int(3 * s["cy"] // h) * 3 + int(3 * s["cx"] // w)
            assert ex["color"][p].argmax() == list(COLORS).index(s["color"])
            assert ex["kind"][p].argmax() == list(SHAPES).index(s["kind"])
            assert ex["size"][p].argmax() == size and ex["place"][p].argmax() == place
            assert ex["weight"][p] > 0.95
        bg = cov.sum(0) < 1e-6
        assert bg.any()
        for name, n in vision_data.ATTRIBUTES.items():
            assert (ex[name][bg].argmax(-1) == n).all()
        np.testing.assert_allclose(ex["weight"][bg], vision_data.BACKGROUND_WEIGHT)
    assert full >= 5, full


def test_examples_are_a_function_of_seed_stream_and_index():
    a = vision_data.example(0, vision_data.TRAIN_STREAM, 5, S, PATCH)
    b = vision_data.example(0, vision_data.TRAIN_STREAM, 5, S, PATCH)
    c = vision_data.example(0, vision_data.EVAL_STREAM, 5, S, PATCH)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["pixels"], c["pixels"])
    from read_jax.data.shapes.write import STREAMS

    assert {vision_data.TRAIN_STREAM, vision_data.EVAL_STREAM}.isdisjoint(STREAMS.values())


# ---- loss and steps ---------------------------------------------------------------------------------------
def test_loss_matches_numpy():
    cfg = ReadConfig.shapes().clip
    model = vision_train.VisionProbe(cfg, rngs=nnx.Rngs(params=0))
    batch = vision_data.stack(
        [vision_data.example(0, vision_data.EVAL_STREAM, i, S, PATCH) for i in range(2)]
    )
    loss, m = vision_train.stage_loss(model, {k: jnp.asarray(v) for k, v in batch.items()})
    logits = {k: np.asarray(v, np.float64) for k, v in model(jnp.asarray(batch["pixels"])).items()}
    w, total = batch["weight"].astype(np.float64), 0.0
    for name, n in vision_data.ATTRIBUTES.items():
        z = logits[name] - logits[name].max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        term = (w * -(batch[name] * logp).sum(-1)).sum() / w.sum()
        np.testing.assert_allclose(float(m[name]), term, rtol=1e-5)
        owned = batch[name][..., :n].max(-1) > 0.5
        acc = ((logits[name].argmax(-1) == batch[name].argmax(-1)) & owned).sum() / owned.sum()
        np.testing.assert_allclose(float(m[f"{name}_acc"]), acc, rtol=1e-6)
        total += term
    np.testing.assert_allclose(float(loss), total, rtol=1e-5)


def test_steps_learn_a_fixed_batch():
    """The stage's own compiled step (as the runner compiles it), repeated on one batch, learns it."""
    from read_jax.train.state import make_optimizer, opt_state_shardings

    config = load_config_file(CONFIG)
    config.data.batch_size, config.train.fast_compile, config.mesh.devices = 4, True, 1
    stage = vision_train.stage(config)
    setup = runner.setup_module(stage.make_module, 0, runner.make_mesh(config.mesh), stage.cfg)
    params, rest = setup.init()
    tx = make_optimizer(config.train)
    opt_sh, opt_abs = opt_state_shardings(tx, setup.params, setup.param_shardings, setup.mesh)
    step = runner.compile_step(config, stage, setup, tx, opt_abs, opt_sh)
    batch = next(stage.batches(start_step=0, num_steps=1))
    opt = tx.init(params)
    first = None
    for _ in range(30):
        params, opt, m = step(params, rest, opt, batch, jnp.float32(2e-3))
        assert float(m["finite"]) == 1.0
        first = first or {k: float(v) for k, v in m.items()}
    assert float(m["loss"]) < 0.5 * first["loss"], (first["loss"], float(m["loss"]))
    assert float(m["kind_acc"]) > first["kind_acc"]


# ---- the command, resuming, the export and the LLaVA stage ------------------------------------------------
@pytest.fixture(scope="module")
def stage_run(tmp_path_factory):
    from read_jax.cli import pretrain_vision

    workdir = tmp_path_factory.mktemp("vision_stage")
    assert pretrain_vision.main(["--config", CONFIG + ":smoke", "--workdir", str(workdir)]) == 0
    return workdir


def _saved(workdir):
    ck = runner.RunCheckpoints(workdir, async_save=False)
    try:
        step = ck.latest_step()
        return step, ck.restore(step, None, None, None)[0]
    finally:
        ck.close()


def test_command_writes_the_tower_and_held_out_figures(stage_run):
    ev = json.loads((stage_run / "eval.json").read_text())
    assert ev["step"] == 4 and ev["num_scenes"] == 3
    for name in vision_data.ATTRIBUTES:
        assert 0.0 <= ev[f"{name}_acc"] <= 1.0
    meta = json.loads((stage_run / "clip" / vision_train.CLIP_CONFIG).read_text())
    assert meta["stage"] == "pretrain_vision" and meta["step"] == 4
    leaves = vision_train.load_clip_stage(stage_run / "clip", ReadConfig.smoke().clip)
    _, saved = _saved(stage_run)
    assert all(k.startswith("llava/vision_tower/vision_model/") for k in leaves)  # the heads stay behind
    np.testing.assert_array_equal(
        leaves["llava/vision_tower/vision_model/embeddings/class_embedding"],
        saved["vision_tower"]["vision_model"]["embeddings"]["class_embedding"],
    )


def test_resume_gives_the_uninterrupted_params(stage_run, tmp_path):
    config = smoke_config()
    part = vision_train.train(config, tmp_path, stop_at=2)
    assert part["final_step"] == 2 and _saved(tmp_path)[0] == 2
    rest = vision_train.train(config, tmp_path)
    assert rest["start_step"] == 2 and rest["final_step"] == 4
    a = jax.tree.leaves(_saved(stage_run)[1])
    b = jax.tree.leaves(nnx.to_pure_dict(rest["params"]))
    assert len(a) == len(b) > 10
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_workdir_of_another_stage_is_refused(tmp_path):
    ck = runner.RunCheckpoints(tmp_path, async_save=False)
    ck.save(3, {"w": np.zeros(2, np.float32)}, None, None, {"stage": "pretrain_sam", "config": {}})
    ck.close()
    with pytest.raises(ConfigError, match=r"'pretrain_sam' stage, not of the pretrain_vision stage"):
        vision_train.train(smoke_config(), tmp_path)


def test_llava_stage_starts_from_the_export_with_the_tower_frozen(stage_run):
    """`init.clip` replaces every vision-tower leaf of READ's model with the export's (the rest keeps its
    init), the LLaVA stage's config keeps the tower out of its trainables, and the run's base reference
    records the export, so a rerun on another export is refused."""
    from read_jax import sharding as shd
    from read_jax.train import checkpoints, state
    from read_jax.train.config import read_config

    leaves = vision_train.load_clip_stage(stage_run / "clip", ReadConfig.smoke().clip)
    config = load_config_file(os.path.join(ROOT, "configs", "tiny.py") + ":llava,smoke")
    config.init.clip = str(stage_run / "clip")
    cfg = read_config(config.model)
    setup = state.setup_model(cfg, shd.make_mesh(1, 1, devices=jax.devices()[:1]))
    tr, fr = state.init_params(setup)
    before = {**_flat(tr), **_flat(fr)}
    tr2, fr2 = state.init_params(setup, **state.stage_inits(config))
    got_tr, got_fr = _flat(tr2), _flat(fr2)
    assert not any(k.startswith(vision_train.PREFIX) for k in got_tr)  # frozen in the LLaVA stage
    assert set(leaves) <= set(got_fr)
    for k, v in {**got_tr, **got_fr}.items():
        np.testing.assert_array_equal(np.asarray(v), leaves[k] if k in leaves else np.asarray(before[k]))
    assert checkpoints.base_reference(config, cfg)["clip"]["path"] == str(stage_run / "clip")


def test_export_errors_name_what_is_wrong(stage_run, tmp_path):
    with pytest.raises(ConfigError, match=r"another CLIP \(hidden_size=16 there, 128 here"):
        vision_train.load_clip_stage(stage_run / "clip", ReadConfig.shapes().clip)
    with pytest.raises(FileNotFoundError, match=r"does not exist.*python -m read_jax\.cli\.pretrain_vision"):
        vision_train.load_clip_stage(tmp_path / "nowhere", ReadConfig.smoke().clip)
    with pytest.raises(FileNotFoundError, match=r"holds no clip_config\.json"):
        vision_train.load_clip_stage(stage_run, ReadConfig.smoke().clip)


def test_llava_stage_without_its_vision_stage_fails_before_building(tmp_path):
    from read_jax.train import train_and_evaluate

    c = load_config_file(os.path.join(ROOT, "configs", "tiny.py") + ":llava,smoke")
    c.init.clip = str(tmp_path / "nowhere")
    with pytest.raises(
        FileNotFoundError, match=r"init\.clip=.*nowhere: does not exist.*cli\.pretrain_vision"
    ):
        train_and_evaluate(c, tmp_path / "run")


def _flat(st) -> dict:
    return {path_str(p): v.get_value() for p, v in nnx.to_flat_state(st)}
