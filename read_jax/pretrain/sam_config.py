"""The SAM stage's run config: its defaults, validation, and the static configs it becomes.

Sections: `model` (`preset`: a `ReadConfig` size preset whose SAM is trained, so this stage's SAM is the one
READ's model of that preset holds; `dtype`; `sam`: `SamConfig` field overrides), `init` (`seed` of the
random init), `data` (`sam_data.PromptConfig` fields, the batch, the data seed, grain's threads/workers),
`train` (AdamW, warmup + linear decay, SAM's loss weights), `mesh`, `checkpoint`, `eval` (the held-out
scenes), `progress`. `stage` names the stage in every checkpoint it writes: another stage's workdir is
refused by it. An unknown key is an error naming it (`validate`).
"""

from __future__ import annotations

import dataclasses

from ml_collections import ConfigDict

from read_jax.config import ConfigError, SamConfig
from read_jax.data.loaders import plain
from read_jax.pretrain.sam_data import PromptConfig
from read_jax.pretrain.sam_step import LossConfig
from read_jax.train import config as run_config

STAGE = "pretrain_sam"
# The command that makes this stage's outputs (named by errors of the stages that need them).
COMMAND = "python -m read_jax.cli.pretrain_sam --config configs/pretrain_sam.py --workdir RUN"
_DATA_ONLY = ("seed", "batch_size", "num_workers", "read_threads", "prefetch")


def default_config() -> ConfigDict:
    c = ConfigDict()
    c.stage = STAGE
    c.model = ConfigDict({"preset": "shapes", "dtype": "float32", "sam": {}})
    c.init = ConfigDict({"seed": 0})
    prompts = {f.name: f.default for f in dataclasses.fields(PromptConfig)}
    c.data = ConfigDict(
        {"seed": 0, "batch_size": 8, "num_workers": 0, "read_threads": 2, "prefetch": 8, **prompts}
    )
    c.train = ConfigDict(
        {
            "lr": 1e-3,
            "warmup_steps": 100,
            "total_steps": 2000,
            "clip_norm": 1.0,
            # SAM: AdamW, beta (0.9, 0.999), weight decay 0.1.
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "weight_decay": 0.1,
            "focal_weight": 20.0,
            "dice_weight": 1.0,
            "iou_weight": 1.0,
            "focal_alpha": 0.25,
            "focal_gamma": 2.0,
            "attribute_weight": 0.0,  # sam_step.attribute_loss: cells' colour / kind against the codes
            "log_every": 25,
            "fast_compile": False,  # compile for compile speed (tests, smoke runs)
        }
    )
    # devices: 0 = every device on the ('data', 'fsdp') mesh, else the first N.
    c.mesh = ConfigDict({"data": -1, "fsdp": 1, "devices": 0})
    c.checkpoint = ConfigDict({"every_steps": 500, "keep": 2, "async_save": True})
    # Held-out scenes (stream `sam_data.EVAL_STREAM`); canvas: the static side masks are scored on (the
    # original resolution of every scene must fit); sasp_pos / sasp_neg: the SasP-like prompt's points.
    c.eval = ConfigDict({"num_scenes": 200, "batch_size": 8, "canvas": 448, "sasp_pos": 3, "sasp_neg": 6})
    c.progress = True
    return c


def validate(config) -> None:
    """Unknown sections or keys, another stage, SAM overrides `SamConfig` lacks: a ConfigError naming them."""
    from read_jax.pretrain.runner import validate_sections

    validate_sections(config, default_config(), STAGE)
    sam_config(config)
    pc = prompt_config(config.data)
    if int(config.eval.sasp_pos) < 1 or int(config.eval.sasp_pos) + int(config.eval.sasp_neg) > pc.num_points:
        raise ConfigError(
            f"eval.sasp_pos={config.eval.sasp_pos} + eval.sasp_neg={config.eval.sasp_neg} must fit "
            f"data.num_points={pc.num_points} (and sasp_pos >= 1)"
        )
    if int(config.train.total_steps) < 1:
        raise ConfigError("train.total_steps must be >= 1")
    if int(config.data.batch_size) < 1:
        raise ConfigError("data.batch_size must be >= 1")


def sam_config(config) -> SamConfig:
    """The SamConfig this stage trains: `model.preset`'s SAM with `model.sam` overrides and `model.dtype`."""
    return run_config.read_config(config.model).sam


def prompt_config(data_cfg) -> PromptConfig:
    d = plain(data_cfg)
    try:
        return PromptConfig(**{k: v for k, v in d.items() if k not in _DATA_ONLY})
    except ValueError as e:
        raise ConfigError(f"config.data: {e}") from e


def loss_config(train_cfg) -> LossConfig:
    return LossConfig(
        focal=float(train_cfg.focal_weight),
        dice=float(train_cfg.dice_weight),
        iou=float(train_cfg.iou_weight),
        alpha=float(train_cfg.focal_alpha),
        gamma=float(train_cfg.focal_gamma),
        attribute=float(train_cfg.attribute_weight),
    )
