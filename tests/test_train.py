"""The train step on 8 fake CPU devices: sharded init, parameter shardings, 1-device equality, what changes,
gradient accumulation, the NaN guard, the schedule, and the sparse-CE shortcut.

The model is `configs/tiny.py:read,smoke` (every size at its minimum) and the batches are synthetic, in the
layout of `read_jax.data.pipeline` (the loop tests with real data are in `test_train_loop.py`).
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import tiny
from read_jax import sharding as shd
from read_jax.config import IGNORE_INDEX, READ_TRAINABLE_REGEXES, ConfigError, LoraConfig
from read_jax.data import loaders
from read_jax.sam.transforms import get_preprocess_shape
from read_jax.train import checkpoints as ckpts
from read_jax.train import config as run_config
from read_jax.train import state as tstate
from read_jax.train import step as tstep

CANVAS = 32


def _config(**train):
    c = tiny.get_config("read,smoke")
    for k, v in train.items():
        c.train[k] = v
    return c


# No warmup, so that the first step already moves the parameters.
TRAIN = _config(lr=1e-3, warmup_steps=0).train
# The smoke model with READ's own recipe: LoRA on q/v + embed_tokens + lm_head + mask decoder + fcs train.
CFG = run_config.read_config(_config().model).replace(
    lora=LoraConfig(r=4), trainable_regexes=READ_TRAINABLE_REGEXES
)
READ_GROUPS = (
    "/lora_a",
    "/lora_b",
    "embed_tokens/",
    "lm_head/",
    "visual_model/mask_decoder/",
    "text_hidden_fcs/",
)


def make_batch(cfg, num_images: int, seed: int = 0, rows_per_image: int = 1, length: int = 24) -> dict:
    """A pipeline-layout host batch: every row has the same answer length (7 supervised tokens), one mask."""
    rng = np.random.default_rng(seed)
    seg, s, e = cfg.seg_token_id, cfg.im_start_token_id, cfg.im_end_token_id
    r = num_images * rows_per_image
    ids = np.zeros((r, length), np.int32)
    labels = np.full((r, length), IGNORE_INDEX, np.int32)
    mask = np.zeros((r, length), bool)
    for i in range(r):
        q = rng.integers(100, 30000, size=rng.integers(2, 6)).tolist()
        a = rng.integers(100, 30000, size=3).tolist() + [seg, 29889, 2]
        row = [1, 319, s, -200, e] + q + a
        ids[i, : len(row)] = row
        mask[i, : len(row)] = True
        # Labels on the answer and the token before it: 7 supervised next-token targets (shifted CE).
        labels[i, len(row) - len(a) - 1 : len(row)] = row[len(row) - len(a) - 1 :]
    hw = rng.integers(CANVAS // 2, CANVAS + 1, size=(num_images, 2)).astype(np.int32)
    conv_image = np.arange(r, dtype=np.int32) // rows_per_image
    masks = np.zeros((r, CANVAS, CANVAS), np.uint8)
    for i in range(r):
        h, w = hw[conv_image[i]]
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        masks[i, y0 : y0 + h // 3, x0 : x0 + w // 3] = 1
    side = cfg.sam.image_size
    return {
        "images_clip": rng.normal(size=(num_images, cfg.clip.image_size, cfg.clip.image_size, 3)).astype(
            np.float32
        ),
        "images_sam": rng.normal(size=(num_images, side, side, 3)).astype(np.float32),
        "sam_input_hw": np.array([get_preprocess_shape(int(h), int(w), side) for h, w in hw], np.int32),
        "orig_hw": hw,
        "image_valid": np.ones((num_images,), bool),
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
        "conv_image": conv_image,
        "conv_valid": np.ones((r,), bool),
        "masks": masks,
        "mask_valid": np.ones((r,), bool),
        "mask_hw": hw[conv_image],
    }


def stack(*batches):
    """k batches -> the step's [k, ...] layout."""
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def concat(*batches):
    """One batch holding the images and rows of several (row -> image indices rebased)."""
    out = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    offsets = np.cumsum([0] + [len(b["images_clip"]) for b in batches[:-1]])
    out["conv_image"] = np.concatenate([b["conv_image"] + o for b, o in zip(batches, offsets)]).astype(
        np.int32
    )
    return out


class Runner:
    """One compiled step on one mesh, for one batch shape ([k, ...] leaves)."""

    def __init__(self, mesh, batch: dict, *, strategy=shd.DEFAULT_STRATEGY, min_fsdp_bytes=4096):
        self.mesh = mesh
        self.setup = tstate.setup_model(CFG, mesh, strategy=strategy, min_fsdp_bytes=min_fsdp_bytes)
        self.tx = tstate.make_optimizer(TRAIN)
        self.opt_sh, self.opt_abs = tstate.opt_state_shardings(
            self.tx, self.setup.trainable_abstract, self.setup.trainable_shardings, mesh
        )
        self.sc = tstep.StepConfig(canvas_hw=(CANVAS, CANVAS), dropout=False, ce_max_tokens=256)
        spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
        self.bsh = tstep.micro_batch_shardings(spec, mesh)
        jitted = tstep.jit_train_step(self.setup, self.tx, self.sc, self.opt_sh, self.bsh)
        with shd.use_mesh(mesh):
            # Tests run a few steps: compile for compile speed.
            args = tstep.step_arguments(self.setup, self.opt_abs, self.opt_sh, spec, self.bsh)
            self.step_fn, self.stats = tstep.compile_step(
                jitted, args, compiler_options=tstate.fast_compile_options()
            )

    def place(self, tr, fr):
        """Copies of (trainable, frozen) in this mesh's shardings, and a fresh optimizer state."""
        tr = jax.device_put(tr, self.setup.trainable_shardings, may_alias=False)
        fr = jax.device_put(fr, self.setup.frozen_shardings, may_alias=False)
        return tr, fr, jax.jit(self.tx.init, out_shardings=self.opt_sh)(tr)

    def step(self, tr, fr, opt, batch, step=0):
        with shd.use_mesh(self.mesh):
            return self.step_fn(
                tr,
                fr,
                opt,
                shd.shard_batch(batch, self.mesh, batch_axis=1),
                jnp.asarray(step, jnp.int32),
                jnp.asarray(TRAIN.lr, jnp.float32),
            )


def flat(state) -> dict:
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def flat_arrays(state) -> dict:
    return {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}


def assert_adam_close(got: dict, want: dict, steps: int) -> None:
    """Parameters after `steps` AdamW steps from the same state, computed in two summation orders.

    Adam divides by sqrt(v), so an entry whose true gradient is zero (e.g. the key biases of a softmax
    attention,
    which cancel in the softmax) gets a +-lr step from rounding noise whose sign depends on the summation
    order.
    So: every entry within `steps` lr steps, and all but 1% of all entries equal to 1e-6.
    """
    total = close = 0
    for k, w in want.items():
        diff = np.abs(got[k] - w)
        assert diff.max() <= steps * TRAIN.lr * 1.01 + 1e-6, k
        total += diff.size
        close += int((diff <= 1e-6).sum())
    assert close / total > 0.99, close / total


A, B = make_batch(CFG, 8, seed=3), make_batch(CFG, 8, seed=4)
BIG = stack(concat(A, B))  # one batch of 16 images
MICRO = stack(A, B)  # the same 16 images as k = 2 micro-batches of 8


@pytest.fixture(scope="module")
def mesh8():
    return shd.make_mesh(data=2, fsdp=4)


@pytest.fixture(scope="module")
def runner8(mesh8):
    return Runner(mesh8, BIG)


@pytest.fixture(scope="module")
def runner1():
    return Runner(shd.make_mesh(1, 1, devices=jax.devices()[:1]), BIG)


@pytest.fixture(scope="module")
def init8(runner8):
    """The sharded from-scratch init on the 8-device mesh (one jit whose outputs are already sharded)."""
    return tstate.init_params(runner8.setup)


# ---- sharded init and parameter shardings
# --------------------------------------------------------------------


def test_sharded_init_follows_the_strategy(runner8, init8):
    assert jax.device_count() == 8
    tr, fr = init8
    mesh = runner8.mesh
    for state in (tr, fr):
        for path, v in flat_arrays(state).items():
            want = shd.spec_for(path, v.shape, v.dtype, mesh, shd.DEFAULT_STRATEGY, 4096)
            assert v.sharding.spec == want, path
            assert dict(v.sharding.mesh.shape) == {"data": 2, "fsdp": 4}
    # The embedding [32003, 32] is sharded on its (divisible) width, the tiny norms are replicated.
    emb = flat_arrays(tr)["llava/language_model/model/embed_tokens/embedding"]
    assert emb.sharding.spec == P(None, "fsdp")
    assert len(emb.addressable_shards) == 8 and emb.addressable_shards[0].data.shape == (32003, 8)
    assert flat_arrays(fr)["llava/language_model/model/norm/scale"].sharding.spec == P()
    # Trainables are fp32 master copies of exactly READ's trainable groups; only they reach the optimizer.
    paths = flat_arrays(tr)
    assert all(v.dtype == jnp.float32 for v in paths.values())
    assert all(any(g in k for g in READ_GROUPS) for k in paths)
    assert sum(k.endswith("/lora_a") for k in paths) == 2 * CFG.llama.num_hidden_layers
    _, _, opt = runner8.place(tr, fr)
    mu = opt[1].mu
    assert jax.tree.leaves(mu)[0].sharding == jax.tree.leaves(tr)[0].sharding
    assert all(x.sharding.spec == P() for x in jax.tree.leaves(opt) if x.ndim == 0)
    assert len(jax.tree.leaves(mu)) == len(jax.tree.leaves(tr))


def test_strategy_rules_are_applied_by_regex():
    """A config strategy that replicates the LLaMA and FSDP-shards the rest, with no size threshold."""
    mesh = shd.make_mesh(data=1, fsdp=8)
    strategy = ((r"llava/language_model/.*", "replicate"), (r".*", "fsdp"))
    setup = tstate.setup_model(CFG, mesh, strategy=strategy, min_fsdp_bytes=0)
    sh = {"/".join(map(str, p)): s for p, s in nnx.to_flat_state(setup.trainable_shardings)}
    assert sh["llava/language_model/model/embed_tokens/embedding"].spec == P()
    assert sh["llava/language_model/lm_head/kernel"].spec == P()
    assert sh["text_hidden_fcs/layers/0/kernel"].spec == P("fsdp", None)  # [32, 32]
    with pytest.raises(ValueError, match="no sharding rule"):
        tstate.setup_model(CFG, mesh, strategy=((r"llava/.*", "fsdp"),))


# ---- the step: 8 devices == 1 device, only trainables change
# ---------------------------------------------------


def test_eight_device_step_equals_one_device_and_only_trainables_change(runner8, runner1, init8):
    tr8, fr8, opt8 = runner8.place(*init8)
    tr1, fr1, opt1 = runner1.place(*init8)
    init_tr, init_fr = flat(tr1), flat(fr1)
    m8s, m1s = [], []
    for i in range(2):
        tr8, opt8, m8 = runner8.step(tr8, fr8, opt8, BIG, i)
        tr1, opt1, m1 = runner1.step(tr1, fr1, opt1, BIG, i)
        m8s.append({k: float(v) for k, v in m8.items()})
        m1s.append({k: float(v) for k, v in m1.items()})
    for a, b in zip(m8s, m1s):
        assert a["finite"] == b["finite"] == 1.0
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=0, atol=1e-5)
        for name in ("ce", "bce", "dice", "l2_grads"):
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, err_msg=name)
    assert m1s[1]["loss"] != m1s[0]["loss"]  # the first update changed the model
    after8, after1 = flat(tr8), flat(tr1)
    assert_adam_close(after8, after1, steps=2)

    # Only trainables change: the frozen base is bit-identical (and was not donated: it is still readable) ...
    for k, v in flat(fr1).items():
        np.testing.assert_array_equal(v, init_fr[k], err_msg=k)
    # ... and every trainable group moved.
    changed = {k for k in after1 if not np.array_equal(after1[k], init_tr[k])}
    for group in READ_GROUPS:
        assert any(group in k for k in changed), group
    # LoRA B starts at zero and has moved: the LoRA branch is live.
    assert all(np.abs(after1[k]).max() > 0 for k in after1 if k.endswith("/lora_b"))


# ---- gradient accumulation
# ---------------------------------------------------------------------------------------


def test_accumulation_over_k_micro_batches_equals_one_k_times_larger_batch(runner8, mesh8, init8):
    """k = 2 micro-batches of 8 images vs the same 16 images as one batch, one step from the same state.

    READ's loss is a mean over the batch's supervised tokens (CE) and masks (BCE, Dice), and accumulation
    averages
    the micro-batch gradients (as DeepSpeed does). The two agree exactly when every micro-batch has the same
    number of supervised tokens and masks: `make_batch` gives every row 7 supervised tokens and one mask.
    """
    assert (A["labels"] != IGNORE_INDEX).sum() == (B["labels"] != IGNORE_INDEX).sum()
    assert A["mask_valid"].sum() == B["mask_valid"].sum()
    run_k = Runner(mesh8, MICRO)
    tr_k, fr, opt_k = run_k.place(*init8)
    tr_1, _, opt_1 = runner8.place(*init8)
    tr_k, opt_k, mk = run_k.step(tr_k, fr, opt_k, MICRO)
    tr_1, opt_1, m1 = runner8.step(tr_1, fr, opt_1, BIG)
    for name in ("loss", "ce", "bce", "dice", "l2_grads", "l2_updates"):
        np.testing.assert_allclose(float(mk[name]), float(m1[name]), rtol=1e-5, err_msg=name)
    assert float(mk["num_masks"]) == float(m1["num_masks"]) == 16
    assert float(mk["num_tokens"]) == float(m1["num_tokens"]) == 16 * 7
    assert_adam_close(flat(tr_k), flat(tr_1), steps=1)


# ---- NaN guard
# ---------------------------------------------------------------------------------------------------


def test_non_finite_step_is_not_applied(runner1, init8):
    tr, fr, opt = runner1.place(*init8)
    before, opt_before = flat(tr), [np.asarray(x) for x in jax.tree.leaves(opt)]
    bad = {k: v.copy() for k, v in BIG.items()}
    bad["images_sam"][0, 0, 0, 0, 0] = np.nan  # poisons image 0's SAM embedding, its mask logits and the loss
    tr, opt, m = runner1.step(tr, fr, opt, bad)
    assert not np.isfinite(float(m["loss"]))
    assert float(m["finite"]) == 0.0
    for k, v in flat(tr).items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    for x, y in zip(jax.tree.leaves(opt), opt_before):
        np.testing.assert_array_equal(np.asarray(x), y)


# ---- pieces
# ------------------------------------------------------------------------------------------------------


def test_schedule_and_optimizer_follow_the_recipe():
    s = tstate.make_schedule(1e-4, 100, 1000)
    np.testing.assert_allclose(
        [float(s(i)) for i in (0, 50, 100, 550, 1000)], [0.0, 5e-5, 1e-4, 5e-5, 0.0], atol=1e-12
    )
    tc = _config(lr=1e-4, warmup_steps=100).train
    tx, sched = tstate.make_optimizer(tc), tstate.schedule_of(tc, 1000)
    # Global-norm clipping to 1.0, then AdamW(b1=.9, b2=.95, eps=1e-8, wd=0), by hand over two steps; the step
    # applies the scheduled lr (lr(1) = 1e-6) to the optimizer's direction.
    g = {"w": jnp.array([3.0, 4.0])}  # norm 5 -> clipped to [0.6, 0.8]
    p = {"w": jnp.array([1.0, -1.0])}
    st = tx.init(p)
    for _ in range(2):
        up, st = tx.update(g, st, p)
    gc = np.array([0.6, 0.8])
    m_hat = (1 - 0.9**2) * gc / (1 - 0.9**2)
    v_hat = (1 - 0.95**2) * gc**2 / (1 - 0.95**2)
    np.testing.assert_allclose(
        -float(sched(1)) * np.asarray(up["w"]), -1e-6 * m_hat / (np.sqrt(v_hat) + 1e-8), rtol=1e-5
    )
    # ... which is optax.adamw's update.
    ref = optax.adamw(sched, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0)
    rst = ref.init(p)
    for _ in range(2):
        rup, rst = ref.update(optax.clip_by_global_norm(1.0).update(g, None)[0], rst, p)
    np.testing.assert_allclose(np.asarray(rup["w"]), -float(sched(1)) * np.asarray(up["w"]), rtol=1e-6)


def test_sparse_ce_equals_the_full_ce(runner1, init8):
    """The supervised-positions-only CE gives the full-logits loss (and drops nothing when K suffices)."""
    tr, fr, _ = runner1.place(*init8)
    mb = jax.tree.map(lambda x: jnp.asarray(x[0]), stack(A))
    key = jax.random.key(0)
    sc = tstep.StepConfig(canvas_hw=(CANVAS, CANVAS), dropout=False)
    g = runner1.setup.graphdef

    @jax.jit
    def three(tr, fr, mb):  # one compile for the three variants
        return [
            tstep.micro_loss(tr, fr, g, mb, key, dataclasses.replace(sc, ce_max_tokens=k))
            for k in (0, 64, 50)
        ]

    (full, mf), (sparse, ms), (_, mt) = three(tr, fr, mb)
    np.testing.assert_allclose(float(sparse), float(full), rtol=1e-6)
    assert int(ms["num_tokens"]) == int(mf["num_tokens"]) == 56 and int(ms["ce_dropped_tokens"]) == 0
    assert int(mt["ce_dropped_tokens"]) == 6


def test_config_errors_are_raised_before_compiling():
    c = tiny.get_config("read,smoke")
    c.model.trainable_regexes = (r"text_hidden_fcs/.*", r"no_such_module/.*")
    with pytest.raises(ConfigError, match="no_such_module"):
        tstate.setup_model(run_config.read_config(c.model), shd.make_mesh())
    c = tiny.get_config("read,smoke")
    c.model.llama = {"hidden_sise": 8}
    with pytest.raises(ConfigError, match="hidden_sise"):
        run_config.read_config(c.model)
    c = tiny.get_config("read,smoke")
    c.data.clip_size = 56
    with pytest.raises(ConfigError, match="clip_size"):
        loaders.data_config(c.data, CFG)
    with pytest.raises(ValueError, match="not divisible"):
        shd.shard_batch({"x": np.zeros((1, 6, 2))}, shd.make_mesh(), batch_axis=1)
    assert loaders.parse_rates("reason_seg:1,sem_seg:10") == {"reason_seg": 1.0, "sem_seg": 10.0}
    assert loaders.parse_rates("read_7b") == "read_7b"


def test_init_from_a_converted_checkpoint(tmp_path):
    """`init.checkpoint`: every leaf of a converted checkpoint lands in its sharding, the trainables are fp32
    master
    copies of the stored values, LoRA factors (absent from the checkpoint) keep their init, B = 0."""
    from read_jax.checkpoint import PartWriter

    mesh = shd.make_mesh(data=2, fsdp=4)
    setup = tstate.setup_model(CFG, mesh, min_fsdp_bytes=4096)
    rng = np.random.default_rng(0)
    stored = {}
    writer = PartWriter(tmp_path / "params", part_bytes=1 << 20)
    for state in (setup.trainable_abstract, setup.frozen_abstract):
        for path, leaf in nnx.to_flat_state(state):
            p = "/".join(map(str, path))
            if p.endswith(("/lora_a", "/lora_b")):
                continue
            stored[p] = rng.normal(size=leaf.get_value().shape).astype(np.float32)
            writer.add(p, stored[p])
    writer.close()
    tr, fr = tstate.init_params(setup, str(tmp_path))
    for state in (tr, fr):
        for p, v in flat_arrays(state).items():
            if p.endswith("/lora_b"):
                assert not np.asarray(v).any()
            elif not p.endswith("/lora_a"):
                np.testing.assert_array_equal(np.asarray(v), stored[p], err_msg=p)
            assert v.sharding.spec == shd.spec_for(p, v.shape, v.dtype, mesh, shd.DEFAULT_STRATEGY, 4096), p
    assert ckpts.base_reference(_config(), CFG)["kind"] == "scratch"


def test_a_moved_or_linked_stage_is_the_same_base_but_other_content_is_not(tmp_path):
    """A run resumes on its stages wherever they now live when their content is the one it trained on (a
    stage with a manifest hash); a LLaVA stage (no hash) is taken through symlinks, by its real path."""
    was = {
        "kind": "scratch",
        "seed": 0,
        "config_sha256": "a",
        "clip": {"path": "/old/vision/clip", "manifest_sha256": "h"},
        "llava": {"path": str((tmp_path / "llava").resolve())},
    }
    meta = {"base": was}
    moved = {**was, "clip": {"path": "/new/vision/clip", "manifest_sha256": "h"}}
    ckpts.check_base(tmp_path, meta, moved)
    with pytest.raises(ConfigError, match="frozen base"):
        ckpts.check_base(tmp_path, meta, {**was, "clip": {"path": "/old/clip", "manifest_sha256": "g"}})
    with pytest.raises(ConfigError, match="frozen base"):
        ckpts.check_base(tmp_path, meta, {**was, "llava": {"path": "/elsewhere/llava"}})
    (tmp_path / "llava").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "llava")
    c = _config()
    c.init.llava = str(tmp_path / "link")
    assert ckpts.base_reference(c, CFG)["llava"] == was["llava"]


def _reason_seg_only(root, **data):
    """A `data` section that generates ReasonSeg alone into `root`."""
    from ml_collections import ConfigDict

    return ConfigDict(
        {"make_shapes": True, "root": str(root), "reason_seg_dir": "{root}", "rates": "reason_seg:1", **data}
    )


def test_shapes_set_is_written_then_topped_up_identically(tmp_path):
    """`data.make_shapes`: missing splits are written; a split with fewer images than `num_shapes` asks for is
    topped up, and the images already there come out byte-identical (the generator is a function of the
    index)."""
    import glob

    def files(split):
        return {os.path.basename(p): open(p, "rb").read() for p in glob.glob(str(tmp_path / split / "*"))}

    d = _reason_seg_only(tmp_path, num_shapes=(3, 1, 0))
    loaders.ensure_shapes_data(d)
    first = files("train")
    assert len(first) == 6 and len(files("val")) == 2 and not (tmp_path / "test").exists()
    d.num_shapes = (5, 1, 0)
    loaders.ensure_shapes_data(d)
    second = files("train")
    assert len(second) == 10 and all(second[k] == v for k, v in first.items())
    d.make_shapes = False
    d.num_shapes = (9, 1, 0)
    loaders.ensure_shapes_data(d)  # off: nothing written
    assert len(files("train")) == 10


def test_a_source_takes_its_own_training_count(tmp_path):
    """`data.num_train_of`: the sources it names get their own number of training scenes (a pool two sources
    share, the larger); the held-out splits and every other source keep `num_shapes`."""
    import glob

    from read_jax.data.shapes.write import pool_counts

    counts = {"train": 2, "val": 1, "test": 1}
    plan = pool_counts(["refer_seg", "neg_refer_seg", "reason_seg"], counts, {"neg_refer_seg": 5})
    assert plan[("refer", "train")] == 5 and plan[("refclef", "train")] == 2  # refer: shared with refer_seg
    assert plan[("reason_seg", "train")] == 2 and plan[("reason_seg", "test")] == 1
    d = _reason_seg_only(tmp_path, num_shapes=(2, 1, 0), num_train_of="reason_seg:4")
    loaders.ensure_shapes_data(d)
    assert len(glob.glob(str(tmp_path / "train" / "*.json"))) == 4
    assert len(glob.glob(str(tmp_path / "val" / "*.json"))) == 1
    d.num_train_of = "reason_seg=4"
    with pytest.raises(ConfigError, match=r"reason_seg=4.*SOURCE:N"):
        loaders.ensure_shapes_data(d)
