"""The SESAME stage's start from the LLaVA stage (`init.llava`, `read_jax.train.state.with_llava_stage`).

The LLaVA stage is `train.py --config configs/tiny.py:llava,smoke` run in-process (8 fake CPU devices, its
shapes VQA data written at smoke size); the stages after it take every `llava/...` leaf (CLIP, projector,
LLaMA) from that workdir, nothing else, and record where they took it from. The LLaVA stage itself starts its
frozen CLIP from the smoke vision stage (`init.clip`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from read_jax import sharding as shd
from read_jax.cli import common
from read_jax.tree_util import path_str

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
PARTS = ("llava/vision_tower/", "llava/mm_projector/", "llava/language_model/")


def load(stage: str, *overrides: str):
    """`--config configs/tiny.py:<stage> --config.x=y ...` through the commands' own loader."""
    _, pairs = common.split_overrides(list(overrides))
    return common.load_run_config(f"{TINY}:{stage}", pairs)


def flat(state) -> dict:
    return {path_str(p): v.get_value() for p, v in nnx.to_flat_state(state)}


@pytest.fixture(scope="module")
def llava_run(tmp_path_factory) -> Path:
    """The LLaVA stage's workdir: 3 steps of `configs/tiny.py:llava,smoke` (projector and LLaMA train) on the
    smoke vision stage's CLIP (`base/vision/clip`, frozen)."""
    from read_jax.cli import pretrain_vision
    from read_jax.cli import train as train_cli

    base = tmp_path_factory.mktemp("llava_stage")
    vision = str(ROOT / "configs" / "pretrain_vision.py") + ":smoke"
    assert pretrain_vision.main(["--config", vision, "--workdir", str(base / "vision"), "--no-eval"]) == 0
    workdir = base / "llava"
    argv = ["--config", f"{TINY}:llava,smoke", "--workdir", str(workdir)]
    argv += [f"--config.init.clip={base / 'vision' / 'clip'}"]
    argv += [f"--config.data.root={base / 'data'}", "--config.data.batch_size=8"]  # 1 image per device
    argv += ["--config.progress=False", "--config.checkpoint.async_save=False"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = train_cli.main(argv)
    assert code == 0, err.getvalue()[-3000:]
    return workdir


@pytest.fixture(scope="module")
def trained(llava_run) -> tuple[dict, dict]:
    """(the LLaVA stage's trained llava/ leaves, the same leaves at that run's untrained start)."""
    from read_jax.build import load_model

    def llava_leaves(which):
        state = flat(nnx.state(load_model(llava_run, which=which)))
        return {k: np.asarray(v) for k, v in state.items() if k.startswith("llava/")}

    return llava_leaves("latest"), llava_leaves("init")


@pytest.fixture(scope="module")
def mesh():
    return shd.make_mesh(data=2, fsdp=4)


def test_sesame_stage_starts_every_llava_leaf_from_the_llava_workdir(llava_run, trained, mesh):
    """`init.llava` in the SESAME stage's config: every llava/ leaf, the frozen CLIP and projector and the
    trainable LLaMA alike, is the LLaVA workdir's trained value (in the state's dtype and sharding), every
    other leaf is the fresh init's; the run's base reference records the workdir."""
    from read_jax.pretrain import vision_train
    from read_jax.train import checkpoints
    from read_jax.train import config as run_config
    from read_jax.train import state as tstate

    leaves, untrained = trained
    assert all(any(k.startswith(p) for k in leaves) for p in PARTS)
    # What the LLaVA stage moved: projector and LLaMA leaves (the rest got no gradient in 3 steps); its vision
    # tower is the vision stage's export, frozen.
    moved = {k for k in leaves if not np.array_equal(leaves[k], untrained[k])}
    assert all(any(k.startswith(p) for k in moved) for p in PARTS[1:]), sorted(moved)
    clip_cfg = run_config.read_config(load("llava,smoke").model).clip
    clip = vision_train.load_clip_stage(llava_run.parent / "vision" / "clip", clip_cfg)
    assert set(clip) == {k for k in leaves if k.startswith(PARTS[0])}
    assert all(np.array_equal(leaves[k], clip[k]) for k in clip)

    config = load("sesame,smoke", f"--config.init.llava={llava_run}")
    cfg = run_config.read_config(config.model)
    setup = tstate.setup_model(cfg, mesh, seed=int(config.init.seed), min_fsdp_bytes=4096)
    tr0, fr0 = tstate.init_params(setup)  # the fresh init
    tr, fr = tstate.init_params(setup, None, **tstate.stage_inits(config))
    before, got = {**flat(tr0), **flat(fr0)}, {**flat(tr), **flat(fr)}
    assert got.keys() == before.keys()
    assert {k for k in got if k.startswith("llava/")} == set(leaves)
    for k, v in got.items():
        want = leaves[k] if k.startswith("llava/") else np.asarray(before[k])
        np.testing.assert_array_equal(np.asarray(v), want, err_msg=k)
        assert v.dtype == before[k].dtype and v.sharding == before[k].sharding, k
    # The replacement shows: every leaf the LLaVA stage trained differs from the fresh init.
    changed = {k for k in got if not np.array_equal(np.asarray(got[k]), np.asarray(before[k]))}
    assert moved <= changed and changed <= set(leaves)
    # Both states take it: SESAME trains the LLaMA and freezes CLIP and the projector.
    assert any(k.startswith("llava/language_model/") for k in changed & set(flat(tr)))
    assert any(k.startswith("llava/vision_tower/") for k in changed & set(flat(fr)))
    assert any(k.startswith("llava/mm_projector/") for k in changed & set(flat(fr)))

    base = checkpoints.base_reference(config, cfg)
    assert base["llava"] == {"path": str(llava_run.resolve())}
    assert "llava" not in checkpoints.base_reference(load("sesame,smoke"), cfg)


def test_lora_factors_keep_their_init(llava_run, trained, mesh):
    """A model with LoRA on the LLaMA (READ's recipe): the base q/v kernels come from the LLaVA stage, the
    LoRA factors (which the LLaVA stage does not have) stay as initialised."""
    from read_jax.train import config as run_config
    from read_jax.train import state as tstate

    leaves, _ = trained
    config = load("read,smoke")
    cfg = run_config.read_config(config.model)
    assert cfg.lora is not None
    setup = tstate.setup_model(cfg, mesh, seed=int(config.init.seed), min_fsdp_bytes=4096)
    tr0, fr0 = tstate.init_params(setup)
    tr, fr = tstate.with_llava_stage(setup, tr0, fr0, str(llava_run))
    before, got = {**flat(tr0), **flat(fr0)}, {**flat(tr), **flat(fr)}
    lora = {k for k in got if "/lora_" in k}
    assert lora and all(k.startswith("llava/language_model/") for k in lora) and not lora & set(leaves)
    assert {k for k in got if k.startswith("llava/")} == set(leaves) | lora
    for k, v in got.items():
        want = leaves[k] if k in leaves else np.asarray(before[k])
        np.testing.assert_array_equal(np.asarray(v), want, err_msg=k)
    # The LoRA-adapted kernels (LLaMA q/v) themselves took the LLaVA stage's trained values.
    adapted = [
        k
        for k in leaves
        if k.startswith("llava/language_model/") and k.endswith(("/q_proj/kernel", "/v_proj/kernel"))
    ]
    assert adapted and all({k[: -len("kernel")] + f"lora_{x}" for x in "ab"} <= lora for k in adapted)
    assert any(not np.array_equal(np.asarray(before[k]), leaves[k]) for k in adapted)


def _shape_error(err: str) -> tuple[str, str, str]:
    m = re.fullmatch(
        r"init\.llava=(.*): (llava/\S+) is (missing|shape \([\d, ]*\)) there, \(([\d, ]*)\) here: the LLaVA "
        r"stage was trained with other model sizes",
        err,
    )
    assert m, err
    return m.group(2), m.group(3), m.group(4)


def test_errors_name_the_missing_stage_and_the_leaf_that_does_not_fit(llava_run, trained, mesh, tmp_path):
    from read_jax.train import config as run_config
    from read_jax.train import state as tstate

    leaves, _ = trained
    cfg = run_config.read_config(load("sesame,smoke").model)

    def abstract(c):
        setup = tstate.setup_model(c, mesh)
        return setup, setup.trainable_abstract, setup.frozen_abstract

    # No such directory: the message names the command that makes the LLaVA stage.
    nowhere = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as e:
        tstate.with_llava_stage(*abstract(cfg), nowhere)
    assert str(e.value).startswith(f"init.llava={nowhere}: no such directory")
    assert "python train.py --config configs/tiny.py:llava --workdir DIR" in str(e.value)

    # Another LLaMA width of the MLP: the error names a leaf whose shape differs, with both shapes.
    llama = cfg.llama
    wide = cfg.replace(llama=dataclasses.replace(llama, intermediate_size=llama.intermediate_size + 8))
    setup, tr, fr = abstract(wide)
    shapes = {k: tuple(v.shape) for k, v in {**flat(tr), **flat(fr)}.items()}
    differ = {k for k in leaves if shapes[k] != leaves[k].shape}
    assert differ and all("/mlp/" in k for k in differ)
    with pytest.raises(ValueError) as e:
        tstate.with_llava_stage(setup, tr, fr, str(llava_run))
    leaf, there, here = _shape_error(str(e.value))
    assert leaf in differ
    assert there == f"shape {leaves[leaf].shape}" and f"({here})" == str(shapes[leaf])

    # One LLaMA layer more: the error names a leaf the LLaVA stage does not have.
    deep = cfg.replace(llama=dataclasses.replace(llama, num_hidden_layers=llama.num_hidden_layers + 1))
    setup, tr, fr = abstract(deep)
    with pytest.raises(ValueError) as e:
        tstate.with_llava_stage(setup, tr, fr, str(llava_run))
    leaf, there, here = _shape_error(str(e.value))
    assert there == "missing" and leaf not in leaves
    assert leaf.startswith(f"llava/language_model/model/layers/{cfg.llama.num_hidden_layers}/")
    assert f"({here})" == str(tuple(flat(tr if leaf in flat(tr) else fr)[leaf].shape))
