"""The SAM stage's run: `train(config, workdir)` trains SAM from scratch on point and box prompts of shapes
scenes, resuming from the workdir's latest checkpoint; `run` also exports the weights and scores held-out
scenes.

Sections as in `read_jax.train.loop`: config -> mesh -> model -> optimizer -> restore -> compile -> loop.
Checkpoints are `read_jax.train.checkpoints.RunCheckpoints` (SAM's parameters + optimizer state; the data
position is the step: batch b is examples [b B, (b+1) B) of the training stream), metrics go to
`metrics.jsonl` + TensorBoard (`read_jax.train.loop.MetricWriter`), and every checkpoint's meta names the
stage, so a workdir of another stage (or another SAM) is refused before anything is built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from read_jax import sharding as shd
from read_jax.config import ConfigError
from read_jax.pretrain import sam_data
from read_jax.pretrain.sam_config import STAGE, loss_config, prompt_config, sam_config, validate
from read_jax.pretrain.sam_step import jit_train_step
from read_jax.sam import Sam
from read_jax.train.checkpoints import RunCheckpoints, check_resumable, load_into, write_run_summary
from read_jax.train.loop import MetricWriter, NonFiniteLossError
from read_jax.train.state import fast_compile_options, make_optimizer, make_schedule, opt_state_shardings
from read_jax.tree_util import with_shardings

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SamSetup:
    """The sharded SAM of a run: graph, abstract params / buffers, their shardings."""

    graphdef: object
    params: object  # nnx.State of ShapeDtypeStruct (fp32)
    rest: object
    param_shardings: object
    rest_shardings: object
    mesh: object
    seed: int
    cfg: object

    def init(self):
        """(params, rest) from the random init of `seed`, sharded (one jit)."""

        def init():
            _, p, r = nnx.split(Sam(self.cfg, rngs=nnx.Rngs(params=self.seed)), nnx.Param, ...)
            return p, r

        fn = jax.jit(init, out_shardings=(self.param_shardings, self.rest_shardings))
        return fn.lower().compile(compiler_options=fast_compile_options())()

    def merge(self, params, rest) -> Sam:
        return nnx.merge(self.graphdef, params, rest)


def make_mesh(mesh_cfg):
    n = int(mesh_cfg.get("devices") or 0)
    devices = jax.devices()[:n] if n else None
    return shd.make_mesh(int(mesh_cfg.data), int(mesh_cfg.fsdp), devices=devices)


def setup_sam(config, mesh) -> SamSetup:
    cfg = sam_config(config)
    seed = int(config.init.seed)
    graphdef, params, rest = nnx.split(
        nnx.eval_shape(lambda: Sam(cfg, rngs=nnx.Rngs(params=seed))), nnx.Param, ...
    )
    psh, rsh = shd.tree_shardings(params, mesh), shd.tree_shardings(rest, mesh)
    return SamSetup(graphdef, params, rest, psh, rsh, mesh, seed, cfg)


def base_reference(config) -> dict:
    """What the run's starting point is (no frozen base: everything trains): the stage, seed, SAM config."""
    arch = json.dumps(dataclasses.asdict(sam_config(config)), sort_keys=True, default=str)
    return {
        "kind": STAGE,
        "seed": int(config.init.seed),
        "sam_sha256": hashlib.sha256(arch.encode()).hexdigest(),
    }


def check_stage(workdir, meta: dict) -> None:
    """A workdir holding another stage's (or a READ run's) checkpoints is refused, naming what it holds."""
    stage = meta.get("stage") or (meta.get("config") or {}).get("stage")
    if stage != STAGE:
        what = f"the {stage!r} stage" if stage else "a train.py READ run"
        raise ConfigError(
            f"--workdir {workdir} holds checkpoints of {what}, not of the {STAGE} stage: "
            "choose another --workdir"
        )


def _check_lr(tc) -> None:
    lr = float(tc.lr)
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"train.lr={tc.lr}: must be a finite number > 0")


def _batch_abstract(config, setup: SamSetup, pc) -> tuple[dict, dict]:
    spec = sam_data.batch_spec(int(config.data.batch_size), setup.cfg, pc)
    sh = {k: shd.batch_sharding(setup.mesh, len(s)) for k, (s, _) in spec.items()}
    return {k: jax.ShapeDtypeStruct(s, d, sharding=sh[k]) for k, (s, d) in spec.items()}, sh


def _restore(ckpts, start, setup: SamSetup, opt_abs, opt_sh):
    target = with_shardings(nnx.to_pure_dict(setup.params), nnx.to_pure_dict(setup.param_shardings))
    pure, opt_state, _ = ckpts.restore(start, target, with_shardings(opt_abs, opt_sh), None)
    return load_into(setup.params, pure, setup.param_shardings), opt_state


def _compile(config, setup: SamSetup, tx, lc, opt_abs, opt_sh, pc):
    """The train step, lowered for the config's batch and compiled (before any data is read)."""
    batch_abs, batch_sh = _batch_abstract(config, setup, pc)
    rep = NamedSharding(setup.mesh, P())
    jitted = jit_train_step(
        setup.graphdef, tx, lc, setup.param_shardings, setup.rest_shardings, opt_sh, batch_sh, rep
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


def open_run(config, workdir: Path) -> tuple[RunCheckpoints, int | None, dict]:
    """The workdir's checkpoints and latest step, refused when they belong to another stage or config."""
    ckpts = RunCheckpoints(
        workdir, keep=int(config.checkpoint.keep), async_save=bool(config.checkpoint.async_save)
    )
    base = base_reference(config)
    start = ckpts.latest_step()
    try:
        if start is not None:
            meta = ckpts.read_meta(start)
            check_stage(workdir, meta)
            check_resumable(workdir, meta, config, base)
    except BaseException:
        ckpts.close()
        raise
    return ckpts, start, {"stage": STAGE, "base": base, "config": json.loads(config.to_json_best_effort())}


def train(config, workdir: str | os.PathLike, *, stop_at: int | None = None) -> dict:
    """Train the SAM stage in `workdir` (resuming from its latest checkpoint). Returns a summary dict with the
    final params/buffers (`params`, `rest`, `setup`) for `run`.

    `stop_at`: stop after this step (checkpointed there; rerun to continue), as if the run were interrupted.
    """
    # ---- config ----------------------------------------------------------------------------------------
    validate(config)
    _check_lr(config.train)
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    t0, cpu0 = time.perf_counter(), time.process_time()
    tc, pc, lc = config.train, prompt_config(config.data), loss_config(config.train)
    total = int(tc.total_steps)
    ckpts, start, meta = open_run(config, workdir)
    # ---- mesh, model, optimizer -------------------------------------------------------------------------
    mesh = make_mesh(config.mesh)
    setup = setup_sam(config, mesh)
    tx = make_optimizer(tc)
    schedule = make_schedule(float(tc.lr), int(tc.warmup_steps), total)
    opt_sh, opt_abs = opt_state_shardings(tx, setup.params, setup.param_shardings, mesh)
    # ---- restore: this run -> scratch -------------------------------------------------------------------
    params, rest = setup.init()
    if start is not None:
        params, opt_state = _restore(ckpts, start, setup, opt_abs, opt_sh)
        log.info("resumed %s at step %d", workdir, start)
    else:
        start = 0
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    # ---- compile, loop ---------------------------------------------------------------------------------
    compile_s, last = 0.0, {}
    try:
        end = total if stop_at is None else max(min(int(stop_at), total), start)
        if start < end:  # a finished run (rerun to export or evaluate again) compiles nothing
            tc0 = time.perf_counter()
            step_fn = _compile(config, setup, tx, lc, opt_abs, opt_sh, pc)
            compile_s = time.perf_counter() - tc0
            log.info("compiled the SAM train step in %.1fs", compile_s)
            params, opt_state, last = _loop(
                config,
                workdir,
                step_fn,
                params,
                rest,
                opt_state,
                schedule,
                setup,
                ckpts,
                (start, end),
                meta,
                pc,
            )
    finally:
        ckpts.wait()
        ckpts.close()
    wall = time.perf_counter() - t0
    summary = {
        "start_step": start,
        "final_step": max(end, start),
        "total_steps": total,
        "compile_s": compile_s,
        "wall_s": wall,
        "cpu_s": time.process_time() - cpu0,
        "train": last,
    }
    return {**summary, "params": params, "rest": rest, "setup": setup}


def _loop(config, workdir, step_fn, params, rest, opt_state, schedule, setup, ckpts, span, meta, pc):
    """The host loop over steps [start, end): batches -> compiled step -> metrics (checked one step late) ->
    checkpoints (every `checkpoint.every_steps`, and at `end`)."""
    start, end = span
    tc, dc = config.train, config.data
    total, log_every = int(tc.total_steps), int(tc.log_every)
    every = int(config.checkpoint.every_steps) or total
    progress = bool(config.get("progress", True)) and jax.process_index() == 0
    batches = sam_data.train_batches(
        seed=int(dc.seed),
        sam_cfg=setup.cfg,
        pc=pc,
        batch_size=int(dc.batch_size),
        start_step=start,
        num_steps=end - start,
        num_workers=int(dc.num_workers),
        read_threads=int(dc.read_threads),
        prefetch=int(dc.prefetch),
    )
    writer = MetricWriter(workdir, start_step=start)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc="sam stage", unit="step", dynamic_ncols=True)
    window, pending, last = [], None, {}
    last_ckpt = start or None
    t_window = time.perf_counter()
    wait_s = 0.0

    def check(p) -> dict:
        step_p, m = p
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        if not m["finite"]:
            raise NonFiniteLossError(step_p, m, {"examples": [step_p * int(dc.batch_size)]}, last_ckpt)
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
                last = {k: _window_mean([w[k] for w in window]) for k in window[0]}
                last.update(
                    steps_per_s=len(window) / dt, data_wait_frac=wait_s / dt, lr=float(schedule(step - 1))
                )
                writer.write(step, "train", last)
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{last['loss']:.3f}",
                        iou=f"{last['mask_iou']:.3f}",
                        sps=f"{last['steps_per_s']:.2f}",
                    )
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


def _window_mean(values) -> float:
    """The mean of a logging window's values of one metric, NaN steps left out (a prompt kind absent from
    this config's batches is NaN at every step: it stays NaN, without numpy's empty-slice warning)."""
    x = np.asarray(values, np.float64)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def run(config, workdir: str | os.PathLike, *, evaluate: bool = True, stop_at: int | None = None) -> dict:
    """The stage, end to end: train (or resume), export `workdir/sam`, score the held-out scenes into
    `workdir/eval.json`. Returns the summary written to `workdir/summary.json`."""
    from read_jax.pretrain import sam_eval, sam_export

    out = train(config, workdir, stop_at=stop_at)
    workdir = Path(workdir).absolute()
    if out["final_step"] < out["total_steps"]:
        out.pop("setup"), out.pop("params"), out.pop("rest")
        return out  # stopped early: nothing to export yet
    setup, params, rest = out.pop("setup"), out.pop("params"), out.pop("rest")
    state = nnx.state(setup.merge(params, rest))
    info = {"step": out["final_step"], "seed": int(config.init.seed), "data_seed": int(config.data.seed)}
    sam_export.export_sam(state, setup.cfg, workdir / "sam", info)
    out["export"] = str(workdir / "sam")
    eval_path = workdir / "eval.json"
    scored = json.loads(eval_path.read_text()) if eval_path.is_file() else {}
    if evaluate and scored.get("step") == out["final_step"] and out["start_step"] == out["final_step"]:
        out["eval"] = {
            k: v for k, v in scored.items() if k != "step"
        }  # a finished stage rerun: scored already
    elif evaluate:
        res = sam_eval.evaluate(setup, params, rest, config, progress=bool(config.get("progress", True)))
        eval_path.write_text(json.dumps({"step": out["final_step"], **res}, indent=1))
        out["eval"] = res
    return write_run_summary(workdir, out)
