"""A pretraining stage's product on disk, shared by the stages that make one (`sam_export`, `vision_train`):

    <config file>   {"stage": ..., "<component>": its config's fields, "step", "seed", ...}
    params/         the converted-checkpoint format (`read_jax.checkpoint`: manifest + orbax parts), leaves
                    named as in `ReadModel` under the stage's prefix (`visual_model/...`,
                    `llava/vision_tower/...`)

Written atomically; read back with errors that name the flag that pointed at it and the command that makes it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from read_jax import checkpoint as ck
from read_jax.config import ConfigError
from read_jax.tree_util import path_str


def write(state: nnx.State, out_dir, *, prefix: str, stage: str, config_file: str, meta: dict) -> Path:
    """Write `state`'s variables (each leaf under `prefix`) and `config_file` (`meta` + the stage) to
    `out_dir`, replacing an earlier export. Returns the directory."""
    with ck.atomic_directory(out_dir, overwrite=True) as tmp:
        writer = ck.PartWriter(tmp / ck.PARAMS_DIR)
        for path, var in nnx.to_flat_state(state):
            writer.add(prefix + path_str(path), np.asarray(jax.device_get(var.get_value())))
        writer.close(extra={"stage": stage})
        (tmp / config_file).write_text(json.dumps({**meta, "stage": stage}, indent=1, default=str))
    return Path(out_dir)


def read_meta(
    path: str | os.PathLike, *, config_file: str, stage: str, flag: str, what: str, command: str
) -> dict:
    """The export's config file; a clear error naming `flag`, and the command that makes one, when `path`
    is missing or holds no export, and when it is another stage's export."""
    p = Path(path)
    f = p / config_file
    if not f.is_file():
        where = "does not exist" if not p.exists() else f"holds no {config_file}"
        raise FileNotFoundError(f"{flag}={path}: {where}; it must be {what}, made by `{command}`")
    meta = json.loads(f.read_text())
    if meta.get("stage") != stage:
        raise ConfigError(f"{f}: not a {stage} export (stage {meta.get('stage')!r})")
    return meta


def check_arch(stored: dict, want, *, free: tuple[str, ...], flag: str, path, remedy: str) -> None:
    """The export's architecture (`stored`: its config's fields) must be `want`'s, the `free` fields (dtypes)
    aside: otherwise a ConfigError naming the first fields that differ and `remedy`."""
    have = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}
    diff = [
        f"{fl.name}={have.get(fl.name)!r} there, {getattr(want, fl.name)!r} here"
        for fl in dataclasses.fields(want)
        if fl.name not in free and have.get(fl.name) != getattr(want, fl.name)
    ]
    if diff:
        raise ConfigError(f"{flag}={path}: {remedy.format(diff='; '.join(diff[:4]))}")


def load_leaves(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every exported leaf as a host array."""
    out: dict[str, np.ndarray] = {}
    for part in ck.iter_parts(path):
        out.update(part)
    return out
