"""The vision stage of the tiny pretraining chain: the CLIP tower of READ's model trained from scratch to say,
for every patch of its grid, what covers it (`vision_data`: colour, kind, size and place of the instance, or
background), as the pretrained CLIP that LLaVA-1.5 starts from already does. The LLaVA stage then starts
its vision tower from this stage's export (`init.clip=RUN/clip`) and keeps it frozen, as LLaVA does.

    python -m read_jax.cli.pretrain_vision --config configs/pretrain_vision.py --workdir runs/tiny/vision

Model: `ClipVisionModel` (LLaVA's feature: hidden_states[select_layer], CLS dropped) and one linear head over
those features giving every attribute's logits (the heads are this stage's alone: they are not exported).
Loss: per attribute, the soft cross-entropy between the head's softmax and the patch's target mixture,
weighted by the patch's weight and averaged over the batch's weights; the attributes' losses summed. The run
is `read_jax.pretrain.runner` (resumable, checkpoints every `checkpoint.every_steps`).

Layout of `RUN/clip` (written atomically at the end of the run):

    clip_config.json  {"stage": "pretrain_vision", "clip": ClipVisionConfig fields, "step", "seed", ...}
    params/           the converted-checkpoint format (`read_jax.checkpoint`), leaves named as in `ReadModel`:
                      `llava/vision_tower/vision_model/...`
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from read_jax.clip import ClipVisionModel
from read_jax.config import ClipVisionConfig, ConfigError
from read_jax.data.preprocess import clip_normalize
from read_jax.pretrain import exports, runner, vision_data
from read_jax.train import config as run_config
from read_jax.train.checkpoints import write_run_summary

STAGE = "pretrain_vision"
COMMAND = "python -m read_jax.cli.pretrain_vision --config configs/pretrain_vision.py --workdir RUN"
CLIP_CONFIG = "clip_config.json"
PREFIX = "llava/vision_tower/"
# ClipVisionConfig fields that do not change the weights.
_FREE = ("dtype", "param_dtype")


# ---- config -----------------------------------------------------------------------------------------------
def default_config() -> ConfigDict:
    c = ConfigDict()
    c.stage = STAGE
    c.model = ConfigDict({"preset": "shapes", "dtype": "float32", "clip": {}})
    c.init = ConfigDict({"seed": 0})
    c.data = ConfigDict({"seed": 0, "batch_size": 64, "num_workers": 0, "read_threads": 2, "prefetch": 8})
    c.train = ConfigDict(
        {
            "lr": 2e-3,
            "warmup_steps": 100,
            "total_steps": 2500,
            "clip_norm": 1.0,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "weight_decay": 0.05,
            "log_every": 25,
            "fast_compile": False,
        }
    )
    c.mesh = ConfigDict({"data": -1, "fsdp": 1, "devices": 0})
    c.checkpoint = ConfigDict({"every_steps": 500, "keep": 2, "async_save": True})
    c.eval = ConfigDict({"num_scenes": 200, "batch_size": 50})
    c.progress = True
    return c


def validate(config) -> None:
    """Unknown sections or keys, another stage, CLIP overrides `ClipVisionConfig` lacks: a ConfigError."""
    runner.validate_sections(config, default_config(), STAGE)
    clip_config(config)
    for key in ("train.total_steps", "data.batch_size", "eval.num_scenes", "eval.batch_size"):
        section, field = key.split(".")
        if int(config[section][field]) < 1:
            raise ConfigError(f"{key} must be >= 1")


def clip_config(config) -> ClipVisionConfig:
    """The CLIP this stage trains: `model.preset`'s CLIP with `model.clip` overrides and `model.dtype`."""
    return run_config.read_config(config.model).clip


# ---- model and loss ---------------------------------------------------------------------------------------
class VisionProbe(nnx.Module):
    """`ClipVisionModel` at `vision_tower` (READ's path, so the export needs no renaming) and one linear
    head over its patch features for every attribute's values + background."""

    def __init__(self, cfg: ClipVisionConfig, *, rngs: nnx.Rngs):
        self.vision_tower = ClipVisionModel(cfg, rngs=rngs)
        width = sum(n + 1 for n in vision_data.ATTRIBUTES.values())
        self.head = nnx.Linear(cfg.hidden_size, width, rngs=rngs)

    def __call__(self, pixels: jax.Array) -> dict[str, jax.Array]:
        """uint8 [B, S, S, 3] crops -> attribute -> float32 logits [B, P, V + 1]."""
        feats = self.vision_tower(clip_normalize(pixels))
        logits = self.head(feats.astype(jnp.float32))
        out, at = {}, 0
        for name, n in vision_data.ATTRIBUTES.items():
            out[name], at = logits[..., at : at + n + 1], at + n + 1
        return out


def stage_loss(model: VisionProbe, batch: dict):
    """(loss, metrics): the attributes' weighted soft cross-entropies, summed; per attribute its term and its
    accuracy on the patches one instance covers more than half of."""
    logits = model(batch["pixels"])
    w = batch["weight"]
    metrics, loss = {}, jnp.float32(0.0)
    for name, n in vision_data.ATTRIBUTES.items():
        t = batch[name]
        ce = -(t * jax.nn.log_softmax(logits[name], axis=-1)).sum(-1)  # [B, P]
        term = (w * ce).sum() / jnp.maximum(w.sum(), 1e-6)
        owned = t[..., :n].max(-1) > 0.5
        right = (logits[name].argmax(-1) == t.argmax(-1)) & owned
        metrics[name] = term
        metrics[f"{name}_acc"] = right.sum() / jnp.maximum(owned.sum(), 1)
        loss = loss + term
    return loss, {"loss": loss, **metrics}


# ---- the run ----------------------------------------------------------------------------------------------
def base_reference(config) -> dict:
    arch = json.dumps(dataclasses.asdict(clip_config(config)), sort_keys=True, default=str)
    return {
        "kind": STAGE,
        "seed": int(config.init.seed),
        "clip_sha256": hashlib.sha256(arch.encode()).hexdigest(),
    }


def stage(config) -> runner.Stage:
    cfg, dc = clip_config(config), config.data
    fn = vision_data.Example(int(dc.seed), vision_data.TRAIN_STREAM, cfg.image_size, cfg.patch_size)
    return runner.Stage(
        name=STAGE,
        make_module=functools.partial(VisionProbe, cfg),
        loss=stage_loss,
        batch_spec=vision_data.batch_spec(int(dc.batch_size), cfg.image_size, cfg.patch_size),
        batches=runner.stage_batches(fn, dc),
        base=base_reference(config),
        postfix={"loss": "loss", "kind": "kind_acc"},
        cfg=cfg,
    )


def train(config, workdir: str | os.PathLike, *, stop_at: int | None = None) -> dict:
    validate(config)
    return runner.train(config, workdir, stage(config), stop_at=stop_at)


def evaluate_held_out(setup: runner.ModuleSetup, params, rest, config) -> dict:
    """Held-out scenes (`vision_data.EVAL_STREAM`): per attribute, the accuracy of the head's argmax on the
    patches one instance covers more than half of, and the mean of the loss terms."""
    cfg, ec = setup.cfg, config.eval
    n, b = int(ec.num_scenes), int(ec.batch_size)
    fn = vision_data.Example(int(config.data.seed), vision_data.EVAL_STREAM, cfg.image_size, cfg.patch_size)

    @jax.jit
    def counts(params, batch):
        model = setup.merge(params, rest)
        logits = model(batch["pixels"])
        out = {}
        for name, k in vision_data.ATTRIBUTES.items():
            t = batch[name]
            owned = (t[..., :k].max(-1) > 0.5) & batch["real"][:, None]
            out[f"{name}_right"] = ((logits[name].argmax(-1) == t.argmax(-1)) & owned).sum()
            out[f"{name}_owned"] = owned.sum()
        return out

    total: dict[str, int] = {}
    for start in range(0, n, b):
        idx = [min(i, n - 1) for i in range(start, start + b)]  # the last batch padded with a copy
        batch = vision_data.stack([fn(i) for i in idx])
        batch["real"] = np.asarray([start + j < n for j in range(b)])
        for k, v in jax.device_get(counts(params, batch)).items():
            total[k] = total.get(k, 0) + int(v)
    res = {"num_scenes": n}
    for name in vision_data.ATTRIBUTES:
        res[f"{name}_acc"] = total[f"{name}_right"] / max(total[f"{name}_owned"], 1)
        res[f"{name}_patches"] = total[f"{name}_owned"]
    return res


def export_clip(state: nnx.State, cfg: ClipVisionConfig, out_dir: str | os.PathLike, info: dict) -> Path:
    """Write the vision tower's variables to `out_dir` (replacing an earlier export of this stage)."""
    meta = {**info, "clip": dataclasses.asdict(cfg)}
    return exports.write(state, out_dir, prefix=PREFIX, stage=STAGE, config_file=CLIP_CONFIG, meta=meta)


def check_clip_stage(path: str | os.PathLike, want: ClipVisionConfig) -> dict:
    """clip_config.json of a vision-stage export, checked against the model's CLIP: clear errors for a
    missing export, another stage's directory or another CLIP architecture."""
    meta = exports.read_meta(
        path,
        config_file=CLIP_CONFIG,
        stage=STAGE,
        flag="init.clip",
        what="the vision stage's export RUN/clip",
        command=COMMAND,
    )
    exports.check_arch(
        meta.get("clip") or {},
        want,
        free=_FREE,
        flag="init.clip",
        path=path,
        remedy="the vision stage trained another CLIP ({diff}): pretrain this model's CLIP (same "
        "model.preset / model.clip) with the vision stage",
    )
    return meta


def load_clip_stage(path: str | os.PathLike, want: ClipVisionConfig) -> dict[str, np.ndarray]:
    """The exported `llava/vision_tower/...` leaves as host arrays (`check_clip_stage` first)."""
    check_clip_stage(path, want)
    return exports.load_leaves(path)


def run(config, workdir: str | os.PathLike, *, evaluate: bool = True, stop_at: int | None = None) -> dict:
    """The stage, end to end: train (or resume), export `workdir/clip`, score the held-out scenes into
    `workdir/eval.json`. Returns the summary written to `workdir/summary.json`."""
    out = train(config, workdir, stop_at=stop_at)
    workdir = Path(workdir).absolute()
    setup, params, rest = out.pop("setup"), out.pop("params"), out.pop("rest")
    if out["final_step"] < out["total_steps"]:
        return out  # stopped early: nothing to export yet
    tower = nnx.state(setup.merge(params, rest).vision_tower)
    info = {"step": out["final_step"], "seed": int(config.init.seed), "data_seed": int(config.data.seed)}
    export_clip(tower, setup.cfg, workdir / "clip", info)
    out["export"] = str(workdir / "clip")
    if evaluate:
        res = evaluate_held_out(setup, params, rest, config)
        (workdir / "eval.json").write_text(json.dumps({"step": out["final_step"], **res}, indent=1))
        out["eval"] = res
    return write_run_summary(workdir, out)
