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
from ml_collections import ConfigDict

from read_jax import checkpoint as ck
from read_jax import sharding as shd
from read_jax.config import ConfigError, ReadConfig
from read_jax.data.loaders import plain
from read_jax.train import config as run_config
from read_jax.train.state import ModelSetup, init_params, setup_model, stage_inits
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

    def read_meta(self, step: int, manager: str = "latest") -> dict:
        """The json meta of checkpoint `step` alone (step, the frozen base, the run config): cheap, and
        readable whatever the shapes of the arrays beside it."""
        mgr = self.latest if manager == "latest" else self.best
        return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {}

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

    def restore_trainables(
        self, setup: ModelSetup, which: str = "best", check=None
    ) -> tuple[nnx.State, dict]:
        """The saved trainables of `which` ('best' falls back to the latest when no best was kept), sharded as
        `setup` says, and the checkpoint's meta. `check(meta)` runs before any array is read. Raises
        FileNotFoundError without any checkpoint."""
        manager = "best" if which == "best" and self.best.latest_step() is not None else "latest"
        step = (self.best if manager == "best" else self.latest).latest_step()
        if step is None:
            raise FileNotFoundError(f"{self.workdir}: no checkpoint to load")
        if check is not None:
            check(self.read_meta(step, manager))
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


def _manifest_digest(path: str) -> str | None:
    manifest = ck.params_dir(path) / ck.MANIFEST
    return hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None


def base_reference(config, cfg: ReadConfig) -> dict:
    """How to rebuild the frozen base: the converted checkpoint path and its manifest hash, or the scratch
    seed; and the SAM stage's export (`init.sam`) the visual_model starts from, or the vision stage's
    (`init.clip`) the vision tower starts from, when there is one."""
    base = _base_reference(config, cfg)
    for key in ("sam", "clip"):
        if stage := config.init.get(key) or "":
            base[key] = {"path": str(Path(stage).resolve()), "manifest_sha256": _manifest_digest(stage)}
    if llava := config.init.get("llava") or "":
        base["llava"] = {"path": str(Path(llava).resolve())}
    return base


def _base_reference(config, cfg: ReadConfig) -> dict:
    path = config.init.get("checkpoint") or ""
    if path:
        return {
            "kind": "converted",
            "path": str(Path(path).resolve()),
            "manifest_sha256": _manifest_digest(path),
        }
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


# Run-config keys that shape the saved trainables and optimizer state (a resume must keep them): the model
# section except what only steers the computation (orbax casts dtypes on restore).
_FREE_MODEL_KEYS = ("sasp", "max_segs", "remat", "dtype")


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _shape_keys(config: dict) -> dict:
    model = {k: v for k, v in (config.get("model") or {}).items() if k not in _FREE_MODEL_KEYS}
    return _flat(model, "model.")


def check_resumable(workdir, meta: dict, config, base: dict, flag: str = "--workdir") -> None:
    """Before restoring a run's checkpoint: it must come from a config with the same trainables and frozen
    base. Raises one ConfigError naming the keys that differ (orbax would only report mismatched shapes)."""
    saved = meta.get("config")
    if saved:
        now, was = _shape_keys(json.loads(config.to_json_best_effort())), _shape_keys(saved)
        keys = sorted(set(now) | set(was))
        diff = [f"{k}={was.get(k)!r} there, {now.get(k)!r} here" for k in keys if now.get(k) != was.get(k)]
        if diff:
            raise ConfigError(
                f"{flag} {workdir} holds a run of another config ({'; '.join(diff[:4])}"
                f"{'; ...' if len(diff) > 4 else ''}): pass the config it was trained with"
                + (", or train this config in another --workdir" if flag == "--workdir" else "")
            )
    check_base(workdir, meta, base, flag)


def _identity(ref):
    """A base reference as what it holds: where a manifest hash names the content, the path (a moved or
    symlinked copy of the same stage) does not count."""
    if not isinstance(ref, dict):
        return ref
    out = {k: _identity(v) for k, v in ref.items()}
    if "manifest_sha256" in out:
        out.pop("path", None)
    return out


def check_base(workdir, meta: dict, base: dict, flag: str = "--workdir") -> None:
    """A run's checkpoints belong to the frozen base they were trained on."""
    was = meta.get("base")
    if was is not None and _identity(was) != _identity(base):
        what = {
            k: f"{was.get(k)!r} there, {base.get(k)!r} here"
            for k in sorted(set(was) | set(base))
            if was.get(k) != base.get(k)
        }
        raise ConfigError(
            f"{flag} {workdir} holds a run on another frozen base ({what}): pass the run's own config "
            "(init.checkpoint / init.seed / model)"
            + (", or another --workdir" if flag == "--workdir" else "")
        )


def load_into(state_abstract, pure: dict, shardings):
    """A pure dict restored by orbax -> nnx.State with the structure of `state_abstract`, placed on
    `shardings`."""
    st = jax.tree.map(lambda x: x, state_abstract)
    nnx.replace_by_pure_dict(st, pure)
    return jax.tree.map(jax.device_put, st, shardings)


def saved_run_config(workdir: str | os.PathLike) -> ConfigDict:
    """The run config a `train.py --workdir` was trained with, as its latest (else best) checkpoint saved it.

    Raises FileNotFoundError when `workdir` holds no checkpoint.
    """
    ckpts = RunCheckpoints(workdir, async_save=False)
    try:
        for manager in ("latest", "best"):
            step = (ckpts.latest if manager == "latest" else ckpts.best).latest_step()
            if step is not None:
                saved = ckpts.read_meta(step, manager).get("config")
                if saved:
                    return ConfigDict(saved)
    finally:
        ckpts.close()
    raise FileNotFoundError(f"{workdir}: no train.py checkpoint (nothing under checkpoints/ or best/)")


def write_run_summary(workdir: str | os.PathLike, summary: dict) -> dict:
    """Write `workdir/summary.json`; a resumed run (`start_step` > 0) adds this invocation's `wall_s` and
    `cpu_s` to the totals of the invocations before it (`wall_s_total`, `cpu_s_total`), so a run stopped and
    resumed, or rerun once finished, still says what it cost in all."""
    path = Path(workdir) / "summary.json"
    prev = {}
    if summary.get("start_step") and path.is_file():
        try:
            prev = json.loads(path.read_text())
        except (OSError, ValueError):
            prev = {}
    out = dict(summary)
    for key in ("wall_s", "cpu_s"):
        if key in summary:
            out[f"{key}_total"] = float(prev.get(f"{key}_total", prev.get(key, 0.0))) + float(summary[key])
    path.write_text(json.dumps(out, indent=1, default=float))
    return out


def with_run_model(config, workdir: str | os.PathLike) -> ConfigDict:
    """`config` with the model, init and trainable dtype of the run in `workdir` (its own frozen base and
    architecture), keeping `config`'s data, eval and mesh settings: what scoring a run needs."""
    saved = saved_run_config(workdir)
    out = ConfigDict(json.loads(config.to_json_best_effort()))
    out.model, out.init = saved.model, saved.init
    if "trainable_dtype" in saved.get("train", {}):
        out.train.trainable_dtype = saved.train.trainable_dtype
    return out


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
    tr, fr = init_params(setup, config.init.get("checkpoint") or None, strategy, **stage_inits(config))
    if which == "init":  # the untrained starting point of the run: a baseline
        return nnx.merge(setup.graphdef, tr, fr), {"step": 0, "base": base}
    ckpts = RunCheckpoints(workdir, async_save=False)
    try:
        tr, meta = ckpts.restore_trainables(
            setup, which, check=lambda m: check_resumable(workdir, m, config, base, "--checkpoint")
        )
    finally:
        ckpts.close()
    return nnx.merge(setup.graphdef, tr, fr), meta
