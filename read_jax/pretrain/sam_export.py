"""The SAM stage's product on disk, and how a later stage loads it as READ's `visual_model`.

Layout of `RUN/sam` (written atomically by `export_sam` at the end of `python -m read_jax.cli.pretrain_sam`):

    sam_config.json   {"stage": "pretrain_sam", "sam": SamConfig fields, "step": ..., "seed": ...}
    params/           the converted-checkpoint format (`read_jax.checkpoint`: manifest + orbax parts), leaves
                      named as in `ReadModel`: `visual_model/image_encoder/...`,
                      `visual_model/prompt_encoder/...`, `visual_model/mask_decoder/...`

A later stage (SESAME) starts its `visual_model` from it with `init.sam=RUN/sam` in its run config
(`read_jax.train.state.init_params` calls `restore_visual_model`); `load_sam_stage` gives the leaves as host
arrays and `assign_sam_stage` writes them into a built `ReadModel`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from read_jax import checkpoint as ck
from read_jax.config import SamConfig
from read_jax.pretrain import exports
from read_jax.pretrain.sam_config import COMMAND, STAGE
from read_jax.tree_util import load_leaves, path_str

SAM_CONFIG = "sam_config.json"
PREFIX = "visual_model/"
# SamConfig fields that do not change the weights (a bf16 READ may load the fp32 stage).
_FREE = ("dtype", "param_dtype", "pe_dtype")


def export_sam(sam_state: nnx.State, sam_cfg: SamConfig, out_dir: str | os.PathLike, info: dict) -> Path:
    """Write SAM's variables (params and buffers of a `Sam` module's state) to `out_dir` (replacing an
    earlier export of this stage); `info` goes into sam_config.json. Returns the directory."""
    meta = {**info, "sam": dataclasses.asdict(sam_cfg)}
    return exports.write(sam_state, out_dir, prefix=PREFIX, stage=STAGE, config_file=SAM_CONFIG, meta=meta)


def read_stage_config(path: str | os.PathLike) -> dict:
    """sam_config.json of a SAM-stage export; a clear error naming the command that makes one."""
    return exports.read_meta(
        path,
        config_file=SAM_CONFIG,
        stage=STAGE,
        flag="init.sam",
        what="the SAM stage's export RUN/sam",
        command=COMMAND,
    )


def check_sam_config(path, stored: dict, want: SamConfig) -> None:
    """The export's SAM architecture must be the model's (dtypes aside)."""
    exports.check_arch(
        stored,
        want,
        free=_FREE,
        flag="init.sam",
        path=path,
        remedy="the SAM stage trained another SAM ({diff}): pretrain this model's SAM (same model.preset / "
        "model.sam) with the SAM stage",
    )


def load_sam_stage(path: str | os.PathLike, sam_cfg: SamConfig | None = None) -> dict[str, np.ndarray]:
    """The exported `visual_model/...` leaves as host arrays (checked against `sam_cfg` when given)."""
    meta = read_stage_config(path)
    if sam_cfg is not None:
        check_sam_config(path, meta["sam"], sam_cfg)
    return exports.load_leaves(path)


def assign_sam_stage(model, path: str | os.PathLike) -> None:
    """Write the SAM stage's weights into a built `ReadModel`'s `visual_model`, in place."""
    leaves = load_sam_stage(path, model.config.sam)
    want = {PREFIX + path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model.visual_model))}
    if set(leaves) != want:
        raise ck.CheckpointError(
            f"init.sam={path}: leaves differ from the model's visual_model: {sorted(set(leaves) ^ want)[:6]}"
        )
    load_leaves(model, leaves)


def restore_visual_model(
    path, sam_cfg: SamConfig, targets: dict[str, Any], shardings: dict[str, Any]
) -> dict:
    """The `visual_model/...` leaves of `targets` ('/'-path -> ShapeDtypeStruct) read from the export, each
    straight into its sharding (the sharded init of a training run)."""
    meta = read_stage_config(path)
    check_sam_config(path, meta["sam"], sam_cfg)
    stored = set(ck.read_manifest(path)["leaves"])
    extra = sorted(stored - set(targets))
    if extra:
        raise ck.CheckpointError(f"init.sam={path}: leaves with no place in the model: {extra[:6]}")
    return ck.restore_leaves(path, targets, shardings)
