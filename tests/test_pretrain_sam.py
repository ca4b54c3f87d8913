"""The SAM stage of the pretraining chain (`read_jax.pretrain`, `python -m read_jax.cli.pretrain_sam`),
smoke-sized: prompts as labelled, masks where the shapes are drawn, SAM's loss against numpy, learning,
resume, the export loaded by READ's model and training, and the errors that name what is missing."""

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
from read_jax.pretrain import runner, sam_data, sam_export, sam_step, sam_train
from read_jax.pretrain.sam_config import prompt_config
from read_jax.train.config import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "pretrain_sam.py")


def smoke_config(arg: str = "smoke", **train):
    c = load_config_file(CONFIG + ":" + arg)
    for k, v in train.items():
        c.train[k] = v
    return c


@pytest.mark.parametrize("arg", [None, "smoke", "attributes", "attributes,smoke"])
def test_stage_config_loads_and_builds_an_abstract_sam(arg):
    """configs/pretrain_sam.py (covered here, not by test_train_configs: another command's config)."""
    from read_jax.pretrain.sam_config import sam_config, validate

    c = load_config_file(CONFIG + (f":{arg}" if arg else ""))
    validate(c)
    cfg = sam_config(c)
    smoke, attributes = "smoke" in (arg or ""), "attributes" in (arg or "")
    assert cfg == (ReadConfig.smoke() if smoke else ReadConfig.shapes()).sam
    assert (c.data.class_prompts > 0) == attributes and (c.train.attribute_weight > 0) == attributes
    setup = sam_train.setup_sam(c, sam_train.make_mesh(c.mesh))
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(setup.params))
    assert {"image_encoder", "prompt_encoder", "mask_decoder"} <= set(nnx.to_pure_dict(setup.params))


# ---- data -------------------------------------------------------------------------------------------------
def _pixel(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the S-frame pixels that hold points (x, y) (a point is jittered within its pixel)."""
    ij = np.floor(points + 0.5).astype(int)
    return ij[:, 1], ij[:, 0]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_masks_cover_the_drawn_shapes(index):
    """Each instance mask in the SAM frame lies on pixels of the instance's colour in the resized image (an
    independent check of scale, orientation and offset), and the low-res mask is the same shape."""
    sam_cfg = ReadConfig.shapes().sam
    sc = sam_data.scene(0, sam_data.TRAIN_STREAM, index, sam_cfg)
    _, instances = random_scene(np.random.default_rng([0, sam_data.TRAIN_STREAM, index]))
    assert len(instances) == len(sc["frame"]) >= 3
    pix = sc["pixels"].astype(int)
    for inst, frame, low in zip(instances, sc["frame"], sc["low"]):
        near = np.abs(pix - np.asarray(COLORS[inst["color"]])).max(-1) <= 40
        # the mask's interior (eroded by a pixel: edges blend with the background and the darker outline)
        interior = frame[1:-1, 1:-1] & frame[:-2, 1:-1] & frame[2:, 1:-1] & frame[1:-1, :-2] & frame[1:-1, 2:]
        assert interior.sum() > 5
        assert near[1:-1, 1:-1][interior].mean() > 0.95, inst["kind"]
        # Nearly every pixel of the colour that is inside the object's disc belongs to the mask.
        yy, xx = np.mgrid[: frame.shape[0], : frame.shape[1]]
        s = sc["input_hw"][1] / sc["orig_hw"][1]
        disc = (xx + 0.5 - inst["cx"] * s) ** 2 + (yy + 0.5 - inst["cy"] * s) ** 2 < (inst["r"] * s) ** 2
        assert frame[near & disc].mean() > 0.9
        # the low-res target is the same shape at half the resolution: set where its 2 x 2 frame block is
        # all in, clear where it is all out (both come from one supersampled raster)
        block = frame.reshape(64, 2, 64, 2).mean((1, 3))
        assert low[block == 1].all() and not low[block == 0].any() and low.sum() > 0


def test_point_prompts_are_labelled_by_the_mask():
    sam_cfg = ReadConfig.shapes().sam
    sc = sam_data.scene(0, sam_data.EVAL_STREAM, 3, sam_cfg)
    inside = sam_data.extent_mask(tuple(sc["input_hw"]), sam_cfg.image_size)
    assert inside.sum() == sc["input_hw"][0] * sc["input_hw"][1]
    rng = np.random.default_rng(0)
    for mask in sc["frame"]:
        for n_pos, n_neg in ((1, 0), (3, 6), (2, 7)):
            pts, lab = sam_data.point_prompt(rng, mask, inside, n_pos, n_neg, 10, near=0.5)
            assert pts.shape == (10, 2) and lab.dtype == np.int32
            assert (lab == 1).sum() == n_pos and (lab == 0).sum() == n_neg
            r, c = _pixel(pts[lab == 1])
            assert mask[r, c].all()
            r, c = _pixel(pts[lab == 0])
            assert (~mask[r, c]).all() and inside[r, c].all()
            assert (pts[lab == -1] == 0).all()
        pts, lab = sam_data.centroid_prompt(mask, 10)
        ys, xs = np.nonzero(mask)
        np.testing.assert_allclose(pts[0], [xs.mean(), ys.mean()], rtol=1e-6)
        assert lab[0] == 1 and (lab[1:] == -1).all()


def test_boxes_bound_the_mask():
    sam_cfg = ReadConfig.shapes().sam
    sc = sam_data.scene(0, sam_data.TRAIN_STREAM, 5, sam_cfg)
    h, w = (int(v) for v in sc["input_hw"])
    rng = np.random.default_rng(1)
    cap = sam_data.BOX_NOISE_CAP_1024 * sam_cfg.image_size / 1024
    for mask in sc["frame"]:
        ys, xs = np.nonzero(mask)
        tight = sam_data.tight_box(mask)
        np.testing.assert_array_equal(tight, [xs.min(), ys.min(), xs.max(), ys.max()])
        assert sam_data.jittered_box(rng, mask, 0.0, cap, (h, w)).tolist() == tight.tolist()
        for _ in range(20):
            box = sam_data.jittered_box(rng, mask, 0.1, cap, (h, w))
            assert np.abs(box - tight).max() <= cap + 1e-5
            assert box[0] <= box[2] and box[1] <= box[3]
            assert box[0] >= 0 and box[1] >= 0 and box[2] <= w - 1 and box[3] <= h - 1


def test_train_example_prompts_match_their_targets():
    """Prompt j of a training example belongs to target j: point prompts lie on that instance (positives in,
    negatives out) and box prompts lie within the noise cap of its tight box."""
    sam_cfg = ReadConfig.shapes().sam
    pc = sam_data.PromptConfig()
    ex = sam_data.train_example(4, seed=0, sam_cfg=sam_cfg, pc=pc)
    sc = sam_data.scene(0, sam_data.TRAIN_STREAM, 4, sam_cfg)
    spec = sam_data.batch_spec(1, sam_cfg, pc)
    assert {k: (v.shape, v.dtype) for k, v in ex.items()} == {k: (s[1:], d) for k, (s, d) in spec.items()}
    which = [next(i for i, low in enumerate(sc["low"]) if np.array_equal(low, t)) for t in ex["targets"]]
    # every instance gets a prompt before any gets a second one
    n = len(sc["low"])
    assert sorted(which[: min(n, pc.prompts)]) == list(range(min(n, pc.prompts)))
    for j in range(pc.point_prompts):
        mask, lab = sc["frame"][which[j]], ex["labels"][j]
        r, c = _pixel(ex["points"][j][lab == 1])
        assert len(r) >= 1 and mask[r, c].all()
        r, c = _pixel(ex["points"][j][lab == 0])
        assert not mask[r, c].any()
    cap = sam_data.BOX_NOISE_CAP_1024 * sam_cfg.image_size / 1024
    for j in range(pc.box_prompts):
        tight = sam_data.tight_box(sc["frame"][which[pc.point_prompts + j]])
        assert np.abs(ex["boxes"][j] - tight).max() <= cap + 1e-5


def test_attribute_prompts_name_every_instance_of_their_attributes():
    """An attribute prompt's target is the union of the scene's instances with the named colour and/or kind
    (checked against the scene generator's own record of each instance), its token the sum of those codes;
    adding attribute prompts leaves the point and box prompts as they were."""
    sam_cfg = ReadConfig.shapes().sam
    base = sam_data.PromptConfig()
    pc = sam_data.PromptConfig(class_prompts=6)
    codes = sam_data.attribute_codes(sam_cfg.prompt_embed_dim)
    assert codes.shape == (len(COLORS) + len(sam_data.SHAPES), sam_cfg.prompt_embed_dim)
    seen_modes = set()
    for index in range(6):
        ex = sam_data.train_example(index, seed=0, sam_cfg=sam_cfg, pc=pc)
        old = sam_data.train_example(index, seed=0, sam_cfg=sam_cfg, pc=base)
        for k in ("points", "labels", "boxes"):
            assert np.array_equal(ex[k], old[k])
        assert np.array_equal(ex["targets"][: base.prompts], old["targets"])
        assert ex["targets"].shape[0] == pc.targets and ex["class_tokens"].shape == (6, 1, codes.shape[1])
        _, instances = random_scene(np.random.default_rng([0, sam_data.TRAIN_STREAM, index]))
        low = sam_data.scene(0, sam_data.TRAIN_STREAM, index, sam_cfg)["low"]
        for token, target in zip(ex["class_tokens"][:, 0], ex["targets"][base.prompts :]):
            # decode the token back to attributes by least squares over the codebook (0/1 weights)
            w = np.linalg.lstsq(codes.T, token, rcond=None)[0]
            named = np.flatnonzero(np.abs(w - 1) < 1e-4)
            assert np.all((np.abs(w) < 1e-4) | (np.abs(w - 1) < 1e-4)) and 1 <= len(named) <= 2
            color = [c for c in named if c < len(COLORS)]
            kind = [k - len(COLORS) for k in named if k >= len(COLORS)]
            seen_modes.add((len(color), len(kind)))
            member = [
                (not color or inst["color"] == list(COLORS)[color[0]])
                and (not kind or inst["kind"] == list(sam_data.SHAPES)[kind[0]])
                for inst in instances
            ]
            assert any(member)
            assert np.array_equal(target > 0, low[np.asarray(member)].any(axis=0))
    assert seen_modes == {(1, 1), (1, 0), (0, 1)}


def test_cell_attributes_take_the_instance_owning_more_than_half_a_cell():
    """A 4 x 4 grid of 4-pixel cells: instance 0 fills cell (0, 0) and half of cell (0, 1) (not more than
    half: unowned), instance 1 fills 9 of cell (1, 1)'s 16 pixels; everything else is background."""
    frame = np.zeros((2, 16, 16), bool)
    frame[0, 0:4, 0:6] = True
    frame[1, 4:7, 4:7] = True
    colors, kinds = ["green", "red"], ["star", "circle"]
    col, kind = sam_data.cell_attributes(frame, colors, kinds, 4)
    want_c, want_k = np.full((4, 4), -1), np.full((4, 4), -1)
    want_c[0, 0], want_k[0, 0] = list(COLORS).index("green"), list(sam_data.SHAPES).index("star")
    want_c[1, 1], want_k[1, 1] = list(COLORS).index("red"), list(sam_data.SHAPES).index("circle")
    assert np.array_equal(col, want_c) and np.array_equal(kind, want_k)


def test_attribute_loss_scores_cells_against_the_codes():
    """Cells whose embedding is their attribute's code (scaled up) are classified right and cost ~0; the loss
    equals a float64 softmax cross-entropy of the scaled dot products; unowned cells do not count."""
    dim = 32
    codes = sam_data.attribute_codes(dim).astype(np.float64)
    n = len(COLORS)
    rng = np.random.default_rng(0)
    col = rng.integers(-1, n, (2, 3, 3)).astype(np.int32)
    kind = rng.integers(-1, len(sam_data.SHAPES), (2, 3, 3)).astype(np.int32)
    kind[col < 0] = -1
    emb = rng.normal(size=(2, 3, 3, dim))
    loss, m = sam_step.attribute_loss(jnp.asarray(emb, jnp.float32), jnp.asarray(col), jnp.asarray(kind))
    want = 0.0
    for lab, block in ((col, codes[:n]), (kind, codes[n:])):
        lo = emb @ block.T / np.sqrt(dim)
        lse = np.log(np.exp(lo).sum(-1))
        ce = lse - np.take_along_axis(lo, np.maximum(lab, 0)[..., None], -1)[..., 0]
        want += ce[lab >= 0].mean()
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    ideal = 10 * (codes[:n][np.maximum(col, 0)] + codes[n:][np.maximum(kind, 0)])
    loss, m = sam_step.attribute_loss(jnp.asarray(ideal, jnp.float32), jnp.asarray(col), jnp.asarray(kind))
    assert float(m["cell_color_acc"]) == 1.0 and float(m["cell_kind_acc"]) == 1.0 and float(loss) < 1e-3


def test_class_iou_is_scored_on_the_attribute_prompts():
    """The loss's per-kind IoUs split the masks as the batch lays them out: points, boxes, attributes."""
    pc = sam_data.PromptConfig(
        point_prompts=1, box_prompts=1, class_prompts=1, num_points=4, max_pos=2, max_neg=2
    )
    t = np.zeros((1, 3, 8, 8), np.uint8)
    t[..., :4, :4] = 1
    x = np.full((1, 3, 8, 8), -5.0, np.float32)
    x[0, 0, :4, :4] = 5.0  # point prompt: exact
    x[0, 1, :4, :2] = 5.0  # box prompt: half
    x[0, 2, :, :] = 5.0  # attribute prompt: a quarter
    batch = {
        "targets": jnp.asarray(t),
        "input_hw": jnp.asarray([[64, 64]], jnp.int32),
        "points": jnp.zeros((1, pc.point_prompts, pc.num_points, 2)),
        "boxes": jnp.zeros((1, pc.box_prompts, 4)),
    }
    _, m = sam_step.sam_loss(jnp.asarray(x), jnp.zeros((1, 3)), batch, sam_step.LossConfig(), 64)
    assert np.allclose([m["point_iou"], m["box_iou"], m["class_iou"]], [1.0, 0.5, 0.25])


def test_train_batches_are_a_function_of_the_step():
    sam_cfg = ReadConfig.smoke().sam
    pc = prompt_config(smoke_config().data)
    example = sam_data.TrainExample(0, sam_cfg, pc)
    it = runner.step_batches(example, batch_size=2, start_step=0, num_steps=3)
    b2 = [next(it) for _ in range(3)][2]
    again = next(runner.step_batches(example, batch_size=2, start_step=2))
    assert all(np.array_equal(b2[k], again[k]) for k in b2)
    ex = sam_data.train_example(5, seed=0, sam_cfg=sam_cfg, pc=pc)
    assert all(np.array_equal(b2[k][1], ex[k]) for k in ex)


# ---- loss -------------------------------------------------------------------------------------------------
def _numpy_loss(x, t, v, iou_pred):
    """SAM's loss written out in float64: torchvision's sigmoid_focal_loss (alpha 0.25, gamma 2) mean over the
    valid pixels, DETR's dice, the IoU head's squared error; 20 : 1 : 1."""
    x, t, v = (np.asarray(a, np.float64) for a in (x, t, v))
    p = 1 / (1 + np.exp(-x))
    ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    focal = (0.25 * t + 0.75 * (1 - t)) * ce * (1 - p_t) ** 2
    focal = (focal * v).sum((-2, -1)) / v.sum((-2, -1))
    dice = 1 - (2 * (p * t * v).sum((-2, -1)) + 1) / ((p * v).sum((-2, -1)) + (t * v).sum((-2, -1)) + 1)
    pred = (x > 0) & (v > 0)
    iou = (pred & (t > 0)).sum((-2, -1)) / (pred | ((t > 0) & (v > 0))).sum((-2, -1))
    return 20 * focal.mean() + dice.mean() + ((iou_pred - iou) ** 2).mean()


def test_loss_matches_numpy():
    rng = np.random.default_rng(0)
    b, k, l, s = 2, 3, 8, 32  # S frame 32, low-res 8: a low-res pixel is 4 frame pixels
    logits = rng.normal(0, 3, (b, k, l, l)).astype(np.float32)
    targets = (rng.random((b, k, l, l)) < 0.3).astype(np.uint8)
    iou_pred = rng.random((b, k)).astype(np.float32)
    input_hw = np.asarray([[32, 21], [13, 32]], np.int32)  # extents 8 x 6 and 4 x 8 low-res pixels
    v = np.zeros((b, 1, l, l))
    v[0, :, :8, :6] = 1
    v[1, :, :4, :8] = 1
    batch = {
        "input_hw": input_hw,
        "targets": targets,
        "points": np.zeros((b, 2, 1, 2)),
        "boxes": np.zeros((b, 1, 4)),
    }
    loss, m = sam_step.sam_loss(jnp.asarray(logits), jnp.asarray(iou_pred), batch, sam_step.LossConfig(), s)
    want = _numpy_loss(logits, targets, np.broadcast_to(v, logits.shape), iou_pred)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert np.array_equal(np.asarray(sam_step.low_res_valid(jnp.asarray(input_hw), s, l))[:, None], v > 0)
    # a perfect prediction: zero dice up to the +1 smoothing, IoU 1
    perfect = jnp.where(jnp.asarray(targets) > 0, 20.0, -20.0)
    _, m = sam_step.sam_loss(perfect, jnp.ones((b, k)), batch, sam_step.LossConfig(), s)
    assert float(m["mask_iou"]) == 1.0 and float(m["iou_mse"]) == 0.0 and float(m["dice"]) < 0.05


# ---- training ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arg", ["smoke", "attributes,smoke"])
def test_steps_decrease_the_loss_on_a_fixed_batch(arg):
    """The stage's own compiled step (as `train` compiles it), repeated on one batch, learns it; with
    attribute prompts, their IoU and the cells' attribute term are part of what it learns."""
    from read_jax.train.state import make_optimizer, opt_state_shardings

    config = smoke_config(arg)
    setup = sam_train.setup_sam(config, sam_train.make_mesh(config.mesh))
    params, rest = setup.init()
    tx = make_optimizer(config.train)
    pc = prompt_config(config.data)
    opt_sh, opt_abs = opt_state_shardings(tx, setup.params, setup.param_shardings, setup.mesh)
    step = runner.compile_step(config, sam_train.stage(config), setup, tx, opt_abs, opt_sh)
    exs = [sam_data.train_example(i, seed=0, sam_cfg=setup.cfg, pc=pc) for i in range(2)]
    batch = {k: np.stack([e[k] for e in exs]) for k in exs[0]}
    if "attributes" in arg:  # the smoke frame's 16-pixel cells are rarely owned by a shape: label them all
        rng = np.random.default_rng(0)
        batch["cell_colors"] = rng.integers(0, len(COLORS), batch["cell_colors"].shape).astype(np.int32)
        batch["cell_kinds"] = rng.integers(0, len(sam_data.SHAPES), batch["cell_kinds"].shape).astype(
            np.int32
        )
    opt = tx.init(params)
    losses, attr = [], []
    for _ in range(25):
        params, opt, m = step(params, rest, opt, batch, jnp.float32(3e-3))
        assert float(m["finite"]) == 1.0
        losses.append(float(m["loss"]))
        attr.append(float(m.get("attribute", np.nan)))
    assert losses[-1] < 0.6 * losses[0], losses
    if "attributes" in arg:
        assert np.isfinite(float(m["class_iou"])) and attr[-1] < 0.8 * attr[0], attr
    else:
        assert np.isnan(float(m["class_iou"])) and "attribute" not in m


def _params(workdir) -> tuple[int, dict]:
    """(latest step, saved SAM parameters) of a stage workdir."""
    ck = sam_train.RunCheckpoints(workdir, async_save=False)
    try:
        step = ck.latest_step()
        return step, ck.restore(step, None, None, None)[0]
    finally:
        ck.close()


def test_workdir_of_another_stage_is_refused(tmp_path):
    from read_jax.train.checkpoints import RunCheckpoints

    ck = RunCheckpoints(tmp_path, async_save=False)
    ck.save(3, {"w": np.zeros(2, np.float32)}, None, None, {"base": {"kind": "scratch"}, "config": {}})
    ck.close()
    with pytest.raises(ConfigError, match=r"train\.py READ run.*choose another --workdir"):
        sam_train.train(smoke_config(), tmp_path)


# ---- the command, the export, and READ loading it ---------------------------------------------------------
@pytest.fixture(scope="module")
def stage_run(tmp_path_factory):
    """The command end to end at smoke size: train, export, held-out evaluation."""
    from read_jax.cli import pretrain_sam

    workdir = tmp_path_factory.mktemp("sam_stage")
    assert pretrain_sam.main(["--config", CONFIG + ":smoke", "--workdir", str(workdir)]) == 0
    return workdir


def test_command_writes_weights_and_held_out_figures(stage_run):
    ev = json.loads((stage_run / "eval.json").read_text())
    assert ev["step"] == 4 and ev["num_scenes"] == 3 and ev["num_instances"] >= 9
    for k in ("point", "centroid", "box", "sasp", "class"):
        assert 0.0 <= ev[f"mIoU_{k}"] <= 1.0
    assert 0.0 <= ev["cell_color_acc"] <= 1.0 and 0.0 <= ev["cell_kind_acc"] <= 1.0
    meta = json.loads((stage_run / "sam" / sam_export.SAM_CONFIG).read_text())
    assert meta["stage"] == "pretrain_sam" and meta["step"] == 4
    # rerunning the finished stage trains nothing and reproduces the export
    before = sam_export.load_sam_stage(stage_run / "sam")
    from read_jax.cli import pretrain_sam

    assert pretrain_sam.main(["--config", CONFIG + ":smoke", "--workdir", str(stage_run), "--no-eval"]) == 0
    after = sam_export.load_sam_stage(stage_run / "sam")
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


def test_held_out_attribute_readout_counts_every_owned_cell_once():
    """On the shapes SAM (16 x 16 cells), 3 held-out scenes in batches of 2: the readout is scored on every
    cell a shape owns, the padding copy of the last batch not counted, and its accuracy is the fraction of
    those cells whose code readout is right (recomputed here from the embeddings)."""
    from read_jax.pretrain import sam_eval

    config = load_config_file(CONFIG + ":attributes")
    config.eval.num_scenes, config.eval.batch_size = 3, 2
    setup = sam_train.setup_sam(config, sam_train.make_mesh(config.mesh))
    params, rest = setup.init()
    ev = sam_eval.evaluate(setup, params, rest, config)
    sam = setup.merge(params, rest)
    right = owned = 0
    for i in range(3):
        ex, _ = sam_eval.eval_example(
            i, seed=0, sam_cfg=setup.cfg, pc=prompt_config(config.data), ec=config.eval
        )
        emb = np.asarray(sam_step.embed_images(sam, ex["images"][None], ex["input_hw"][None]))[0]
        codes = sam_data.attribute_codes(emb.shape[-1])[: len(COLORS)]
        guess = (emb @ codes.T).argmax(-1)
        lab = ex["cell_colors"]
        right += int(((guess == lab) & (lab >= 0)).sum())
        owned += int((lab >= 0).sum())
    assert owned > 0 and ev["num_owned_cells"] == owned
    assert ev["cell_color_acc"] == pytest.approx(right / owned, abs=1e-9)


def test_resume_gives_the_uninterrupted_params(stage_run, tmp_path):
    """Stopped at step 2 and rerun, the stage ends where the uninterrupted command run ended (same seed)."""
    config = smoke_config()
    part = sam_train.train(config, tmp_path, stop_at=2)
    assert part["final_step"] == 2 and _params(tmp_path)[0] == 2
    rest = sam_train.train(config, tmp_path)
    assert rest["start_step"] == 2 and rest["final_step"] == 4
    step, whole = _params(stage_run)
    assert step == 4
    a, b = jax.tree.leaves(whole), jax.tree.leaves(nnx.to_pure_dict(rest["params"]))
    assert len(a) == len(b) > 10
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]


def test_export_loads_into_read_models_visual_model(stage_run):
    """The export is the trained step's SAM, and READ takes it as its visual_model: `init.sam` in a run
    config (the sharded init reads every visual_model leaf from it, the frozen encoder and the trainable
    decoder alike; the run's base reference records it) and `assign_sam_stage` on a built model."""
    from read_jax import sharding as shd
    from read_jax.train import checkpoints, state
    from read_jax.train.config import default_config

    leaves = sam_export.load_sam_stage(stage_run / "sam")
    _, saved = _params(stage_run)
    np.testing.assert_array_equal(
        leaves["visual_model/mask_decoder/iou_token/embedding"],
        saved["mask_decoder"]["iou_token"]["embedding"],
    )
    cfg = ReadConfig.smoke()
    setup = state.setup_model(cfg, shd.make_mesh(1, 1, devices=jax.devices()[:1]))
    tr, fr = state.init_params(setup)
    before = {**_flat(tr), **_flat(fr)}
    tr2, fr2 = state.with_sam_stage(setup, tr, fr, str(stage_run / "sam"))
    got = {**_flat(tr2), **_flat(fr2)}
    assert got.keys() == before.keys() and set(leaves) < set(got)
    for k in got:
        want = leaves[k] if k in leaves else before[k]
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want))
    assert any(k.startswith("visual_model/mask_decoder") for k in _flat(tr2))
    assert any(k.startswith("visual_model/image_encoder") for k in _flat(fr2))
    # the same leaves through a built model (the init's until assigned)
    model = nnx.merge(setup.graphdef, tr, fr)
    init_iou = _flat(nnx.state(model.visual_model))["mask_decoder/iou_token/embedding"]
    assert not np.array_equal(np.asarray(init_iou), leaves["visual_model/mask_decoder/iou_token/embedding"])
    sam_export.assign_sam_stage(model, stage_run / "sam")
    on_model = {"visual_model/" + k: v for k, v in _flat(nnx.state(model.visual_model)).items()}
    assert on_model.keys() == leaves.keys()
    assert all(np.array_equal(np.asarray(on_model[k]), leaves[k]) for k in leaves)
    config = default_config()
    config.init.sam = str(stage_run / "sam")
    assert checkpoints.base_reference(config, cfg)["sam"]["path"] == str(stage_run / "sam")


def test_export_errors_name_what_is_wrong(stage_run, tmp_path):
    with pytest.raises(ConfigError, match=r"another SAM.*image_size=64 there, 256 here"):
        sam_export.load_sam_stage(stage_run / "sam", ReadConfig.tiny().sam)
    with pytest.raises(FileNotFoundError, match=r"does not exist.*python -m read_jax\.cli\.pretrain_sam"):
        sam_export.load_sam_stage(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"holds no sam_config\.json"):
        sam_export.load_sam_stage(stage_run)


def _flat(state) -> dict:
    from read_jax.tree_util import path_str

    return {path_str(p): v.get_value() for p, v in nnx.to_flat_state(state)}


def test_command_errors_are_one_line(tmp_path, capsys):
    from read_jax.cli import pretrain_sam

    code = pretrain_sam.main(
        ["--config", CONFIG + ":smoke", "--workdir", str(tmp_path), "--config.train.lrr=1"]
    )
    assert code == 2 and "unknown config key" in capsys.readouterr().err
    code = pretrain_sam.main(
        ["--config", CONFIG + ":smoke", "--workdir", str(tmp_path), "--config.eval.sasp_neg=9"]
    )
    assert code == 2 and "must fit data.num_points=4" in capsys.readouterr().err


def test_read_run_without_its_sam_stage_fails_before_building(tmp_path):
    """`train.py` with `init.sam` pointing nowhere stops at once, naming the command that makes the export."""
    from read_jax.train import train_and_evaluate

    c = load_config_file(os.path.join(ROOT, "configs", "tiny.py") + ":sesame,smoke")  # the stage after SAM's
    c.init.sam = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"init\.sam=.*nowhere: does not exist.*cli\.pretrain_sam"):
        train_and_evaluate(c, tmp_path / "run")


def test_logged_window_mean_leaves_out_nan_steps_and_keeps_an_absent_metric_nan(recwarn):
    """A metric NaN at some steps is averaged over the others; one NaN at every step (a prompt kind the
    config does not draw) is logged as NaN, quietly."""
    assert runner.window_mean([1.0, np.nan, 4.0]) == 2.5
    assert np.isnan(runner.window_mean([np.nan, np.nan]))
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
