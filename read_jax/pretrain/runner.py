"""The resumable training run of a pretraining stage that trains one module from scratch (the SAM stage, the
vision stage): `train(config, workdir, stage)` resumes from the workdir's latest checkpoint and runs to
`train.total_steps`.

A stage is a `Stage`: the module it trains, its loss, its batches (a pure function of the step, so a resumed
run reads the same batches without any iterator state) and what its checkpoints are tied to. Sections as in
`read_jax.train.loop`: config -> mesh -> module -> optimizer -> restore -> compile -> loop. Checkpoints are
`read_jax.train.checkpoints.RunCheckpoints` (the module's parameters + optimizer state), metrics go to
`metrics.jsonl` + TensorBoard (`read_jax.train.loop.MetricWriter`), and every checkpoint's meta names the
stage, so a workdir of another stage (or of another module) is refused before anything is built.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from read_jax import sharding as shd
from read_jax.config import ConfigError
from read_jax.train.checkpoints import RunCheckpoints, check_resumable, load_into
from read_jax.train.loop import MetricWriter, NonFiniteLossError
from read_jax.train.state import fast_compile_options, make_optimizer, make_schedule, opt_state_shardings
from read_jax.tree_util import with_shardings

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Stage:
    """What a stage trains and on what.

    name: the stage in every checkpoint's meta (another stage's workdir is refused);
    make_module: `(rngs=...) -> module` (all of its `nnx.Param`s train; other variables are buffers);
    loss: `(module, batch) -> (loss, metrics)`, float32 scalars, traced;
    batch_spec: batch key -> (shape, dtype) of one training batch (the step is compiled for it);
    batches: `(start_step=, num_steps=) -> iterator` of host batches (dicts of numpy arrays), batch b being a
      pure function of b;
    base: what the run starts from (seed, architecture digest): a checkpoint of another base is refused;
    postfix: progress-bar label -> metric key;
    cfg: the module's static config, kept on the run's `ModuleSetup` for the stage's export and evaluation.
    """

    name: str
    make_module: Callable[[nnx.Rngs], nnx.Module]
    loss: Callable
    batch_spec: Mapping[str, tuple]
    batches: Callable[[int, int], Iterator[dict]]
    base: Mapping
    postfix: Mapping[str, str] = dataclasses.field(default_factory=lambda: {"loss": "loss"})
    cfg: object = None


@dataclasses.dataclass
class ModuleSetup:
    """The sharded module of a run: graph, abstract params / buffers, their shardings."""

    graphdef: object
    params: object  # nnx.State of ShapeDtypeStruct
    rest: object
    param_shardings: object
    rest_shardings: object
    mesh: object
    seed: int
    make_module: Callable[[nnx.Rngs], nnx.Module]
    cfg: object = None  # the module's static config

    def init(self):
        """(params, rest) from the random init of `seed`, sharded (one jit)."""

        def init():
            _, p, r = nnx.split(self.make_module(rngs=nnx.Rngs(params=self.seed)), nnx.Param, ...)
            return p, r

        fn = jax.jit(init, out_shardings=(self.param_shardings, self.rest_shardings))
        return fn.lower().compile(compiler_options=fast_compile_options())()

    def merge(self, params, rest):
        return nnx.merge(self.graphdef, params, rest)


def make_mesh(mesh_cfg):
    """The ('data', 'fsdp') mesh of `config.mesh`; `devices`: 0 = every device, else the first N."""
    n = int(mesh_cfg.get("devices") or 0)
    devices = jax.devices()[:n] if n else None
    return shd.make_mesh(int(mesh_cfg.data), int(mesh_cfg.fsdp), devices=devices)


def setup_module(make_module, seed: int, mesh, cfg=None) -> ModuleSetup:
    graphdef, params, rest = nnx.split(
        nnx.eval_shape(lambda: make_module(rngs=nnx.Rngs(params=seed))), nnx.Param, ...
    )
    psh, rsh = shd.tree_shardings(params, mesh), shd.tree_shardings(rest, mesh)
    return ModuleSetup(graphdef, params, rest, psh, rsh, mesh, seed, make_module, cfg)


def check_stage(workdir, meta: dict, stage: str) -> None:
    """A workdir holding another stage's (or a READ run's) checkpoints is refused, naming what it holds."""
    have = meta.get("stage") or (meta.get("config") or {}).get("stage")
    if have != stage:
        what = f"the {have!r} stage" if have else "a train.py READ run"
        raise ConfigError(
            f"--workdir {workdir} holds checkpoints of {what}, not of the {stage} stage: "
            "choose another --workdir"
        )


def validate_sections(config, ref, stage: str) -> None:
    """Another stage's config, or a section or key the stage's defaults `ref` lack: a ConfigError naming
    it."""
    from read_jax.train import config as run_config

    if config.get("stage") != stage:
        raise ConfigError(f"this is the {stage} command; the config is for stage {config.get('stage')!r}")
    if set(config.keys()) - set(ref.keys()):
        raise run_config._unknown("the run config", config.keys(), ref.keys())
    for section, fields in ref.items():
        if not hasattr(fields, "keys"):
            continue
        keys = config[section].keys() if section in config else ()
        if set(keys) - set(fields.keys()):
            raise run_config._unknown(f"config.{section}", keys, fields.keys())


def check_lr(train_cfg) -> None:
    lr = float(train_cfg.lr)
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"train.lr={train_cfg.lr}: must be a finite number > 0")


def open_run(config, workdir: Path, stage: Stage) -> tuple[RunCheckpoints, int | None, dict]:
    """The workdir's checkpoints and latest step, refused when they belong to another stage or config."""
    ckpts = RunCheckpoints(
        workdir, keep=int(config.checkpoint.keep), async_save=bool(config.checkpoint.async_save)
    )
    base = dict(stage.base)
    start = ckpts.latest_step()
    try:
        if start is not None:
            meta = ckpts.read_meta(start)
            check_stage(workdir, meta, stage.name)
            check_resumable(workdir, meta, config, base)
    except BaseException:
        ckpts.close()
        raise
    return (
        ckpts,
        start,
        {"stage": stage.name, "base": base, "config": json.loads(config.to_json_best_effort())},
    )


def _norm(tree) -> jax.Array:
    return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def update_step(params, rest, opt_state, batch: dict, lr: jax.Array, *, graphdef, tx, loss):
    """One optimizer step on `loss(module, batch)`, pure.

    Args:
      params: nnx.State of the module's parameters (all trainable); rest: its other variables (buffers).
      opt_state: `tx`'s state over `params` (`read_jax.train.state.make_optimizer`: clipping, Adam, decoupled
        weight decay; the learning rate is applied here).
      batch: a training batch; lr: float32[] this step's learning rate.
    Returns:
      (params, opt_state, metrics): float32 scalars, plus l2 norms and `finite` (1.0 when applied; a
      non-finite loss, gradient or update leaves params and optimizer state unchanged).
    """

    def loss_fn(p):
        return loss(nnx.merge(graphdef, p, rest), batch)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, new_opt = tx.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: -lr * u, updates)
    new_params = optax.apply_updates(params, updates)
    norms = {"l2_grads": _norm(grads), "l2_updates": _norm(updates), "l2_params": _norm(new_params)}
    finite = jnp.isfinite(metrics["loss"])
    for v in norms.values():
        finite &= jnp.isfinite(v)
    new_params = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new_params, params)
    new_opt = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new_opt, opt_state)
    metrics = {k: v.astype(jnp.float32) for k, v in {**metrics, **norms}.items()}
    return new_params, new_opt, {**metrics, "finite": finite.astype(jnp.float32)}


def jit_update_step(graphdef, tx, loss, param_shardings, rest_shardings, opt_shardings, batch_sh, rep):
    """`update_step` jitted with explicit shardings; params and optimizer state are donated."""
    fn = functools.partial(update_step, graphdef=graphdef, tx=tx, loss=loss)
    return jax.jit(
        fn,
        in_shardings=(param_shardings, rest_shardings, opt_shardings, batch_sh, rep),
        out_shardings=(param_shardings, opt_shardings, rep),
        donate_argnums=(0, 2),
    )


def compile_step(config, stage: Stage, setup: ModuleSetup, tx, opt_abs, opt_sh):
    """The train step, lowered for the stage's batch and compiled (before any data is read)."""
    sh = {k: shd.batch_sharding(setup.mesh, len(s)) for k, (s, _) in stage.batch_spec.items()}
    batch_abs = {k: jax.ShapeDtypeStruct(s, d, sharding=sh[k]) for k, (s, d) in stage.batch_spec.items()}
    rep = NamedSharding(setup.mesh, P())
    jitted = jit_update_step(
        setup.graphdef, tx, stage.loss, setup.param_shardings, setup.rest_shardings, opt_sh, sh, rep
    )
    args = (
        with_shardings(setup.params, setup.param_shardings),
        with_shardings(setup.rest, setup.rest_shardings),
        with_shardings(opt_abs, opt_sh),
        batch_abs,
        jax.ShapeDtypeStruct((), jnp.float32, sharding=rep),
    )
    options = fast_compile_options() if config.train.get("fast_compile") else None
    return jitted.lower(*args).compile(compiler_options=options)


def _restore(ckpts, start, setup: ModuleSetup, opt_abs, opt_sh):
    target = with_shardings(nnx.to_pure_dict(setup.params), nnx.to_pure_dict(setup.param_shardings))
    pure, opt_state, _ = ckpts.restore(start, target, with_shardings(opt_abs, opt_sh), None)
    return load_into(setup.params, pure, setup.param_shardings), opt_state


def train(config, workdir: str | os.PathLike, stage: Stage, *, stop_at: int | None = None) -> dict:
    """Train `stage` in `workdir` (resuming from its latest checkpoint) to `config.train.total_steps`. Returns
    a summary dict with the final params/buffers (`params`, `rest`, `setup`) for the stage's export.

    `stop_at`: stop after this step (checkpointed there; rerun to continue), as if the run were interrupted.
    """
    # ---- config ----------------------------------------------------------------------------------------
    check_lr(config.train)
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    t0, cpu0 = time.perf_counter(), time.process_time()
    tc = config.train
    total = int(tc.total_steps)
    ckpts, start, meta = open_run(config, workdir, stage)
    # ---- mesh, module, optimizer ------------------------------------------------------------------------
    try:
        mesh = make_mesh(config.mesh)
        setup = setup_module(stage.make_module, int(config.init.seed), mesh, stage.cfg)
        tx = make_optimizer(tc)
        schedule = make_schedule(float(tc.lr), int(tc.warmup_steps), total)
        opt_sh, opt_abs = opt_state_shardings(tx, setup.params, setup.param_shardings, mesh)
        # ---- restore: this run -> scratch ---------------------------------------------------------------
        params, rest = setup.init()
        if start is not None:
            params, opt_state = _restore(ckpts, start, setup, opt_abs, opt_sh)
            log.info("resumed %s at step %d", workdir, start)
        else:
            start = 0
            opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
        # ---- compile, loop -----------------------------------------------------------------------------
        compile_s, last = 0.0, {}
        end = total if stop_at is None else max(min(int(stop_at), total), start)
        if start < end:  # a finished run (rerun to export or evaluate again) compiles nothing
            tc0 = time.perf_counter()
            step_fn = compile_step(config, stage, setup, tx, opt_abs, opt_sh)
            compile_s = time.perf_counter() - tc0
            log.info("compiled the %s train step in %.1fs", stage.name, compile_s)
            state = (params, rest, opt_state)
            params, opt_state, last = _loop(
                config, workdir, stage, step_fn, state, schedule, setup, ckpts, (start, end), meta
            )
    finally:
        ckpts.wait()
        ckpts.close()
    summary = {
        "start_step": start,
        "final_step": max(end, start),
        "total_steps": total,
        "compile_s": compile_s,
        "wall_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - cpu0,
        "train": last,
    }
    return {**summary, "params": params, "rest": rest, "setup": setup}


def _loop(config, workdir, stage: Stage, step_fn, state, schedule, setup, ckpts, span, meta):
    """The host loop over steps [start, end): batches -> compiled step -> metrics (checked one step late) ->
    checkpoints (every `checkpoint.every_steps`, and at `end`)."""
    start, end = span
    params, rest, opt_state = state
    tc, batch_size = config.train, int(config.data.batch_size)
    total, log_every = int(tc.total_steps), int(tc.log_every)
    every = int(config.checkpoint.every_steps) or total
    progress = bool(config.get("progress", True)) and jax.process_index() == 0
    batches = stage.batches(start_step=start, num_steps=end - start)
    writer = MetricWriter(workdir, start_step=start)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc=stage.name, unit="step", dynamic_ncols=True)
    window, pending, last = [], None, {}
    last_ckpt = start or None
    t_window = time.perf_counter()
    wait_s = 0.0

    def check(p) -> dict:
        step_p, m = p
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        if not m["finite"]:
            raise NonFiniteLossError(step_p, m, {"examples": [step_p * batch_size]}, last_ckpt)
        return m

    step = start
    try:
        while step < end:
            tw = time.perf_counter()
            host = next(batches)
            wait_s += time.perf_counter() - tw
            batch = shd.shard_batch(host, setup.mesh)
            lr = jnp.asarray(schedule(step), jnp.float32)
            params, opt_state, m = step_fn(params, rest, opt_state, batch, lr)
            if pending is not None:
                window.append(check(pending))
            pending = (step, m)
            step += 1
            if step % log_every == 0 or step % every == 0 or step == end:
                window.append(check(pending))
                pending = None
            if window and (step % log_every == 0 or step == end):
                dt = time.perf_counter() - t_window
                last = {k: window_mean([w[k] for w in window]) for k in window[0]}
                last.update(
                    steps_per_s=len(window) / dt, data_wait_frac=wait_s / dt, lr=float(schedule(step - 1))
                )
                writer.write(step, "train", last)
                if bar is not None:
                    post = {label: f"{last[key]:.3f}" for label, key in stage.postfix.items() if key in last}
                    bar.set_postfix(**post, sps=f"{last['steps_per_s']:.2f}")
                window, t_window, wait_s = [], time.perf_counter(), 0.0
            if bar is not None:
                bar.update(1)
            if step % every == 0 or step == end:
                ckpts.save(step, params, opt_state, None, meta)
                last_ckpt = step
    finally:
        if bar is not None:
            bar.close()
        writer.close()
    return params, opt_state, last


def step_batches(
    example,
    *,
    batch_size: int,
    start_step: int = 0,
    num_steps: int = 2**30,
    num_workers: int = 0,
    read_threads: int = 2,
    prefetch: int = 8,
):
    """An iterator of training batches `start_step`, `start_step + 1`, ...: batch b stacks `example(i)` for
    i in [b B, (b+1) B) (grain: `read_threads` threads build examples ahead of the step; `num_workers` > 0
    worker processes, `example` then being picklable). A resumed run reads the same batches."""
    import grain

    first, last = start_step * batch_size, (start_step + num_steps) * batch_size
    ds = grain.MapDataset.range(first, last).map(example)
    ds = ds.batch(batch_size, drop_remainder=True)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))
    if num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (see data.pipeline._finish)
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(it)


def stage_batches(example, data_cfg) -> Callable[[int, int], Iterator[dict]]:
    """`Stage.batches` over `example(i)` with the batch size and grain settings of `config.data`."""
    dc = data_cfg
    return functools.partial(
        step_batches,
        example,
        batch_size=int(dc.batch_size),
        num_workers=int(dc.num_workers),
        read_threads=int(dc.read_threads),
        prefetch=int(dc.prefetch),
    )


def window_mean(values) -> float:
    """The mean of a logging window's values of one metric, NaN steps left out (a metric absent from this
    config's batches is NaN at every step: it stays NaN, without numpy's empty-slice warning)."""
    x = np.asarray(values, np.float64)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")
