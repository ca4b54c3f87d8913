"""Run checkpoints (orbax): trainables + optimizer state + step + data-iterator state; the frozen base by
reference; and the loader of a trained run.

`workdir/checkpoints` keeps the latest N (for resume); `workdir/best` keeps the best-by-metric one (the
reference's best-by-cIoU). The frozen base is never saved: `base_reference` records how to rebuild it (the
converted checkpoint's path and manifest hash, or the scratch seed and architecture), and a run refuses to
resume or load on another base.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from read_jax import checkpoint as ck
from read_jax import sharding as shd
from read_jax.config import ConfigError, ReadConfig
from read_jax.data.loaders import plain
from read_jax.train import config as run_config
from read_jax.train.state import ModelSetup, init_params, setup_model
from read_jax.tree_util import with_shardings


def _pure(state) -> dict:
    return nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state


class RunCheckpoints:
    """`workdir/checkpoints` (latest, keep-N, for resume) and `workdir/best` (best-by-metric, kept
    separately).

    Each checkpoint holds `trainable` (pure dict of arrays), `opt_state`, `data` (the grain iterator state of
    every
    host) and `meta` (json: step, the frozen base's reference, metrics).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        keep: int = 2,
        async_save: bool = True,
        best_metric: str = "cIoU",
        best_mode: str = "max",
    ):
        self.workdir = Path(workdir)
        self.best_metric = best_metric
        opts = {"enable_async_checkpointing": async_save, "create": True}
        self.latest = ocp.CheckpointManager(
            (self.workdir / "checkpoints").absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, **opts),
        )
        self.best = ocp.CheckpointManager(
            (self.workdir / "best").absolute(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, best_fn=lambda m: m[best_metric], best_mode=best_mode, **opts
            ),
        )

    @staticmethod
    def _args(trainable, opt_state, data_iter, meta):
        items = {"trainable": ocp.args.StandardSave(_pure(trainable)), "meta": ocp.args.JsonSave(meta)}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return ocp.args.Composite(**items)

    def save(self, step: int, trainable, opt_state, data_iter, meta: dict) -> None:
        self.latest.save(step, args=self._args(trainable, opt_state, data_iter, {**meta, "step": step}))

    def save_best(self, step: int, trainable, meta: dict, metrics: dict) -> bool:
        """Save the trainables if `metrics[best_metric]` beats the kept one; returns whether it was saved."""
        m = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        args = self._args(trainable, None, None, {**meta, "step": step, "metrics": m})
        return bool(self.best.save(step, args=args, metrics=m))

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def restore(self, step: int, trainable_target, opt_target, data_iter, manager: str = "latest"):
        """(trainable pure dict, opt_state, meta); `data_iter` is restored in place (if given)."""
        mgr = self.latest if manager == "latest" else self.best
        items = {"trainable": ocp.args.StandardRestore(trainable_target), "meta": ocp.args.JsonRestore()}
        if opt_target is not None:
            items["opt_state"] = ocp.args.StandardRestore(opt_target)
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        out = mgr.restore(step, args=ocp.args.Composite(**items))
        return out["trainable"], out.get("opt_state") if opt_target is not None else None, out["meta"]

    def restore_trainables(self, setup: ModelSetup, which: str = "best") -> tuple[nnx.State, dict]:
        """The saved trainables of `which` ('best' falls back to the latest when no best was kept), sharded as
        `setup` says, and the checkpoint's meta. Raises FileNotFoundError without any checkpoint."""
        manager = "best" if which == "best" and self.best.latest_step() is not None else "latest"
        step = (self.best if manager == "best" else self.latest).latest_step()
        if step is None:
            raise FileNotFoundError(f"{self.workdir}: no checkpoint to load")
        target = with_shardings(_pure(setup.trainable_abstract), _pure(setup.trainable_shardings))
        pure, _, meta = self.restore(step, target, None, None, manager=manager)
        return load_into(setup.trainable_abstract, pure, setup.trainable_shardings), meta

    def restore_run(self, step: int, setup: ModelSetup, opt_abstract, opt_shardings, data_iter):
        """Resume: (trainables, optimizer state, meta) of checkpoint `step`, sharded as `setup` says; the data
        iterator is restored in place."""
        target = with_shardings(_pure(setup.trainable_abstract), _pure(setup.trainable_shardings))
        pure, opt_state, meta = self.restore(
            step, target, with_shardings(opt_abstract, opt_shardings), data_iter
        )
        return load_into(setup.trainable_abstract, pure, setup.trainable_shardings), opt_state, meta

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def base_reference(config, cfg: ReadConfig) -> dict:
    """How to rebuild the frozen base: the converted checkpoint path and its manifest hash, or the scratch
    seed."""
    path = config.init.get("checkpoint") or ""
    if path:
        manifest = ck.params_dir(path) / ck.MANIFEST
        digest = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
        return {"kind": "converted", "path": str(Path(path).absolute()), "manifest_sha256": digest}
    # What determines the frozen weights: the architecture and the trainable split, not SasP, max_segs or
    # where
    # gradients stop.
    arch = {
        k: v
        for k, v in dataclasses.asdict(cfg).items()
        if k not in ("sasp", "max_segs", "freeze_vision_towers")
    }
    arch = json.dumps(arch, sort_keys=True, default=str)
    return {
        "kind": "scratch",
        "seed": int(config.init.seed),
        "config_sha256": hashlib.sha256(arch.encode()).hexdigest(),
    }


def check_base(workdir, meta: dict, base: dict) -> None:
    """A run's checkpoints belong to the frozen base they were trained on."""
    if meta.get("base") is not None and meta["base"] != base:
        raise ConfigError(
            f"{workdir} was trained on the frozen base {meta['base']}, but the config now gives {base}: "
            f"use the run's own config (init.checkpoint / init.seed / model), or another workdir"
        )


def load_into(state_abstract, pure: dict, shardings):
    """A pure dict restored by orbax -> nnx.State with the structure of `state_abstract`, placed on
    `shardings`."""
    st = jax.tree.map(lambda x: x, state_abstract)
    nnx.replace_by_pure_dict(st, pure)
    return jax.tree.map(jax.device_put, st, shardings)


def load_trained(config, workdir: str | os.PathLike, *, which: str = "best", mesh=None):
    """The trained model of a run directory: its frozen base (converted or scratch) + its saved trainables.

    Args:
      config: the run's config (ConfigDict).
      workdir: `train.py --workdir`.
      which: 'best' (best-by-metric, falling back to the latest), 'latest', or 'init' (no checkpoint is read:
        the
        config's frozen base with freshly initialised trainables, the untrained baseline).
    Returns:
      (nnx model, meta dict of the restored checkpoint).
    Raises:
      FileNotFoundError without a checkpoint; ConfigError when the config's frozen base is not the run's.
    """
    if which not in ("best", "latest", "init"):
        raise ValueError(f"which must be 'best', 'latest' or 'init', got {which!r}")
    cfg = run_config.read_config(config.model)
    mesh = mesh or shd.make_mesh(int(config.mesh.data), int(config.mesh.fsdp))
    strategy = plain(config.mesh.strategy)
    setup = setup_model(
        cfg,
        mesh,
        strategy=strategy,
        seed=int(config.init.seed),
        trainable_dtype=config.train.get("trainable_dtype") or None,
    )
    base = base_reference(config, cfg)
    tr, fr = init_params(setup, config.init.get("checkpoint") or None, strategy)
    if which == "init":  # the untrained starting point of the run: a baseline
        return nnx.merge(setup.graphdef, tr, fr), {"step": 0, "base": base}
    ckpts = RunCheckpoints(workdir, async_save=False)
    try:
        tr, meta = ckpts.restore_trainables(setup, which)
    finally:
        ckpts.close()
    check_base(workdir, meta, base)
    return nnx.merge(setup.graphdef, tr, fr), meta
