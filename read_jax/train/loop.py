"""The training run: `train_and_evaluate(config, workdir)`, read top to bottom in named sections (house style
§13, big_vision's `train.py`): config -> mesh -> data -> model -> optimizer -> step -> restore -> compile ->
evals -> loop.

PyTorch reference: rui-qian/READ@2549240 `train_read.py` (DeepSpeed ZeRO-2 loop, `WarmupDecayLR`, per-epoch
validation, best-by-cIoU checkpoint) and `model/READ.py:1106-1190` (`init_READ_model`: what trains);
read_reference.md §5 (losses), §6 (recipe), §8 (validation metrics).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from read_jax import sharding as shd
from read_jax.config import ConfigError, ReadConfig
from read_jax.data import loaders
from read_jax.train import config as run_config
from read_jax.train.checkpoints import RunCheckpoints, base_reference, check_resumable, write_run_summary
from read_jax.train.state import (
    check_llava_stage,
    check_trainables_from,
    fast_compile_options,
    init_params,
    make_optimizer,
    opt_state_shardings,
    schedule_of,
    setup_model,
    stage_inits,
)
from read_jax.train.step import (
    compile_step,
    jit_train_step,
    micro_batch_shardings,
    step_arguments,
    step_config,
)

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A training step produced a non-finite loss, gradient, update or parameter (not applied)."""

    def __init__(
        self,
        step: int,
        metrics: Mapping[str, float],
        batch_ids: Mapping[str, Any],
        last_checkpoint: int | None = None,
    ):
        self.step, self.metrics, self.batch_ids = step, dict(metrics), dict(batch_ids)
        self.last_checkpoint = last_checkpoint
        figures = ", ".join(f"{k}={metrics.get(k)}" for k in ("loss", "l2_grads", "l2_updates", "l2_params"))
        if last_checkpoint is None:
            saved = "No checkpoint was written; fix the cause (e.g. a smaller train.lr) and rerun."
        else:
            saved = (
                f"The latest checkpoint, step {last_checkpoint}, holds the state before it, untouched: rerun "
                "to resume from it (with a smaller train.lr if the updates explode)."
            )
        super().__init__(
            f"non-finite training step {step}: {figures}; batch {self.batch_ids}. The update was not "
            f"applied and nothing after step {step} was checkpointed. {saved}"
        )


class MetricWriter:
    """metrics.jsonl + TensorBoard event files (tensorboardX), only on process 0.

    `start_step`: the step the run (re)starts from. Rows of later steps, written by a run that stopped
    before its next checkpoint, are dropped (atomically), so that every step appears once after a resume.
    """

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True, *, start_step: int | None = None):
        from tensorboardX import SummaryWriter

        self.enabled = enabled and jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        if self.enabled and start_step is not None:
            self.truncate(start_step)
        self.tb = SummaryWriter(str(Path(workdir) / "tb")) if self.enabled else None

    def truncate(self, step: int) -> int:
        """Drop the rows of steps after `step`; returns how many were dropped."""
        if not self.path.is_file():
            return 0
        lines = self.path.read_text().splitlines(keepends=True)
        keep = []
        for line in lines:
            try:
                later = int(json.loads(line)["step"]) > step
            except (ValueError, KeyError, TypeError):
                later = True  # a row cut short by a kill
            if not later:
                keep.append(line if line.endswith("\n") else line + "\n")
        if len(keep) < len(lines):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(keep))
            os.replace(tmp, self.path)
            log.info(
                "metrics.jsonl: dropped %d rows after step %d (not checkpointed)",
                len(lines) - len(keep),
                step,
            )
        return len(lines) - len(keep)

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {
            "step": int(step),
            "split": split,
            "time": time.time(),
            **{k: float(v) for k, v in metrics.items()},
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in metrics.items():
            self.tb.add_scalar(f"{split}/{k}", float(v), int(step))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def validate(model, config, cfg: ReadConfig, mesh, *, progress: bool = False) -> dict:
    """gIoU / cIoU of `model` on `config.eval` (ReasonSeg protocol), as `evaluate.py` computes them.

    `config.eval.max_batches` (> 0) evaluates only the first batches (a quick look during training).
    """
    from read_jax.eval import protocols

    dataset = config.eval.get("dataset") or "reasonseg"
    reader = loaders.eval_reader(config.data, dataset, config.eval.split)
    batches, total = loaders.eval_iterator(
        reader, loaders.eval_data_config(config, cfg), cfg, config.data.tokenizer
    )
    n = int(config.eval.get("max_batches") or 0)
    if n:
        batches, total = itertools.islice(batches, n), min(total, n)
    summary, _ = protocols.evaluate_reasonseg(
        model, batches, mesh=mesh, progress=progress, desc="val", total=total
    )
    return {k: float(summary[k]) for k in ("gIoU", "cIoU", "num_queries", "wall_s") if k in summary}


def _check_schedule(tc) -> None:
    """A learning rate that cannot train: refused before anything is built."""
    lr = float(tc.lr)
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(
            f"train.lr={tc.lr}: the learning rate must be a finite number > 0 (--config.train.lr)"
        )
    if int(tc.warmup_steps) < 0:
        raise ConfigError(f"train.warmup_steps={tc.warmup_steps}: must be >= 0")


def _global_sum(x: int) -> int:
    """A host count summed over the processes (unchanged on one host)."""
    if jax.process_count() == 1:
        return int(x)
    from jax.experimental import multihost_utils  # pragma: no cover - multi-host only

    return int(np.sum(multihost_utils.process_allgather(np.asarray(x, np.int64))))


def _check_run(cfg: ReadConfig, dc, mesh, accum: int) -> None:
    """Errors a run would otherwise hit after minutes of compiling."""
    n_data = mesh.shape["data"] * mesh.shape["fsdp"]
    global_b = dc.batch_size * jax.process_count()
    if global_b % n_data:
        raise ConfigError(
            f"global batch of {global_b} images is not divisible by the {n_data} data-parallel devices "
            f"(data.batch_size x hosts must be a multiple of mesh data x fsdp)"
        )
    if accum < 1:
        raise ConfigError("train.grad_accum must be >= 1")
    longest = max(dc.length_buckets) + cfg.clip.num_patches - 1
    if longest > cfg.llama.max_position_embeddings:
        raise ConfigError(
            f"the largest length bucket {max(dc.length_buckets)} + {cfg.clip.num_patches - 1} image tokens "
            f"exceeds max_position_embeddings={cfg.llama.max_position_embeddings}"
        )


def _host_scalars(metrics: Mapping[str, jax.Array]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}


def _matches(dev: Mapping[str, np.ndarray], spec: Mapping[str, jax.ShapeDtypeStruct]) -> bool:
    """A host batch has the compiled layout (this host's share of axis 1)."""
    want = {
        k: (v.shape[:1] + (v.shape[1] // jax.process_count(),) + v.shape[2:], v.dtype)
        for k, v in spec.items()
    }
    return {k: (v.shape, v.dtype) for k, v in dev.items()} == want


def train_and_evaluate(config, workdir: str | os.PathLike) -> dict:
    """Train READ as `config` says, checkpointing and validating in `workdir`; resumes automatically.

    Resume order (house style §14): an existing run in `workdir` -> `init.trainables_from` (another run's
    saved
    trainables, e.g. a previous stage) -> `init.checkpoint` (a converted base) -> scratch.

    Returns a summary dict (final step, last metrics, best validation figures, timings).
    """
    # ---- config ------------------------------------------------------------------------------------------
    run_config.validate(config)
    _check_schedule(config.train)
    workdir = Path(workdir).absolute()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(
            f"--workdir {workdir}: cannot create it ({e.strerror}); choose a writable directory"
        ) from e
    t_start, cpu_start = time.perf_counter(), time.process_time()
    tc = config.train
    accum = int(tc.grad_accum)
    cfg = run_config.read_config(config.model)
    if sam := config.init.get("sam") or "":  # a missing or mismatched SAM stage fails now, not after init
        from read_jax.pretrain.sam_export import check_sam_config, read_stage_config

        check_sam_config(sam, read_stage_config(sam)["sam"], cfg.sam)
    if clip := config.init.get("clip") or "":  # so does a missing or mismatched vision stage
        from read_jax.pretrain.vision_train import check_clip_stage

        check_clip_stage(clip, cfg.clip)
    if llava := config.init.get("llava") or "":  # and a missing LLaVA stage
        check_llava_stage(llava)
    total_steps = run_config.total_steps(tc)
    progress = bool(config.get("progress", True)) and jax.process_index() == 0
    # A workdir of another config is refused now (its saved config names the difference), not by orbax
    # after the model is built.
    ckpts = RunCheckpoints(
        workdir,
        keep=int(config.checkpoint.keep),
        async_save=bool(config.checkpoint.async_save),
        best_metric=str(config.checkpoint.best_metric),
    )
    base = base_reference(config, cfg)
    start = ckpts.latest_step()
    try:
        if start is not None:
            check_resumable(workdir, ckpts.read_meta(start), config, base)
        elif src := config.init.get("trainables_from") or "":  # a fresh run needs its predecessor's
            check_trainables_from(src)
    except BaseException:
        ckpts.close()
        raise

    # ---- mesh --------------------------------------------------------------------------------------------
    mesh = shd.make_mesh(int(config.mesh.data), int(config.mesh.fsdp))
    strategy = loaders.plain(config.mesh.strategy)

    # ---- data --------------------------------------------------------------------------------------------
    train_it, dc = loaders.train_iterator(config, cfg)
    _check_run(cfg, dc, mesh, accum)
    # One compile per length bucket; shapes come from the pipeline's own collate.
    specs = {n: loaders.batch_spec(dc, cfg.sam, n, accum, jax.process_count()) for n in dc.length_buckets}
    batch_sh = micro_batch_shardings(specs[dc.length_buckets[0]], mesh)

    # ---- model -------------------------------------------------------------------------------------------
    setup = setup_model(
        cfg,
        mesh,
        strategy=strategy,
        seed=int(config.init.seed),
        trainable_dtype=tc.get("trainable_dtype") or None,
    )
    log.info(
        "model: %s trainable / %s frozen parameters; trainable regex matches %s",
        f"{setup.num_trainable:,}",
        f"{setup.num_frozen:,}",
        setup.regex_counts,
    )

    # ---- optimizer ---------------------------------------------------------------------------------------
    tx = make_optimizer(tc)
    schedule = schedule_of(tc, total_steps)
    opt_sh, opt_abs = opt_state_shardings(tx, setup.trainable_abstract, setup.trainable_shardings, mesh)

    # ---- restore: this run -> init.trainables_from -> init.checkpoint / scratch
    # ------------------------------
    # The data state is restored with the run, before the first batch is drawn.
    meta = {"base": base, "config": json.loads(config.to_json_best_effort())}
    tr, fr = init_params(setup, config.init.get("checkpoint") or None, strategy, **stage_inits(config))
    skipped_base = 0  # unusable training items skipped before this process started (from the checkpoint)
    if start is not None:
        tr, opt_state, saved = ckpts.restore_run(start, setup, opt_abs, opt_sh, train_it)
        skipped_base = int(saved.get("skipped_total", 0))
        log.info("resumed %s at step %d", workdir, start)
    else:
        start = 0
        if src := config.init.get("trainables_from") or "":
            other = RunCheckpoints(src, async_save=False)
            try:
                tr, saved = other.restore_trainables(setup, "best")
            finally:
                other.close()
            log.info("trainables initialised from %s (step %s)", src, saved.get("step"))
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(tr)

    # ---- step: compiled once per length bucket, before any data is read ------------------------------------
    jitted = jit_train_step(setup, tx, step_config(config, (dc.max_mask_side,) * 2), opt_sh, batch_sh)
    options = fast_compile_options() if tc.get("fast_compile") else None
    compiled, compile_stats = {}, {}
    with shd.use_mesh(mesh):
        for length, spec in specs.items() if start < total_steps else ():  # nothing to run: no compile
            args = step_arguments(setup, opt_abs, opt_sh, spec, batch_sh)
            compiled[length], compile_stats[length] = compile_step(jitted, args, compiler_options=options)
            log.info("compiled the train step for L=%d: %s", length, compile_stats[length])

    # ---- evals -------------------------------------------------------------------------------------------
    writer = MetricWriter(workdir, start_step=start)

    def run_eval(step: int) -> dict:
        res = validate(nnx.merge(setup.graphdef, tr, fr), config, cfg, mesh, progress=progress)
        writer.write(step, "val", res)
        log.info("step %d validation: %s", step, res)
        return res

    # ---- loop --------------------------------------------------------------------------------------------
    steps_per_epoch = int(tc.steps_per_epoch)
    ckpt_every = int(config.checkpoint.every_steps) or steps_per_epoch
    log_every = int(tc.log_every)
    every_epochs = int(config.eval.get("every_epochs", 1) or 0)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    window: list[dict] = []
    last_val: dict = {}
    t_window, n_examples = time.perf_counter(), 0
    pending = None  # (step, metrics on device, host ids): checked one step late to keep dispatch async
    summary: dict = {"start_step": start, "compile": compile_stats}
    last_ckpt = start or None  # the step of the latest checkpoint on disk
    skipped_here, skipped_logged = 0, skipped_base  # this process's skips; the total of the last row

    def check(p) -> dict:
        step_p, m, ids = p
        m = _host_scalars(m)
        if not m["finite"]:
            ids = {k: np.asarray(v).tolist() for k, v in ids.items()}
            raise NonFiniteLossError(step_p, m, ids, last_ckpt)
        return m

    def skipped_total() -> int:
        return skipped_base + _global_sum(skipped_here)

    step = start
    try:
        with shd.use_mesh(mesh):
            while step < total_steps:
                # -- one optimizer step: draw, check the layout, dispatch (the previous step is checked now)
                dev, host = loaders.next_step_batch(train_it, accum)
                skipped_here += int(np.sum(host.get("num_skipped", 0)))
                length = dev["input_ids"].shape[2]
                if length not in specs or not _matches(dev, specs[length]):
                    raise ConfigError(
                        f"a training batch does not match the compiled layout: "
                        f"{ {k: v.shape for k, v in dev.items()} }"
                    )
                lr = jnp.asarray(schedule(step), jnp.float32)
                batch = shd.shard_batch(dev, mesh, batch_axis=1)
                tr, opt_state, m = compiled[length](
                    tr, fr, opt_state, batch, jnp.asarray(step, jnp.int32), lr
                )
                if pending is not None:
                    window.append(check(pending))
                pending = (step, m, {k: host[k] for k in ("example_index", "sample_id") if k in host})
                n_examples += int(np.prod(dev["images_clip"].shape[:2])) * jax.process_count()
                step += 1
                done_epoch = step % steps_per_epoch == 0 or step == total_steps
                # -- every step that logs, saves or validates first proves the step it writes was finite
                if step % log_every == 0 or done_epoch or step % ckpt_every == 0:
                    window.append(check(pending))
                    pending = None
                # -- log
                if window and (step % log_every == 0 or done_epoch):
                    dt = time.perf_counter() - t_window
                    avg = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                    total = skipped_total()
                    avg.update(
                        steps_per_s=len(window) / dt,
                        examples_per_s=n_examples / dt,
                        lr=float(schedule(step - 1)),
                        skipped=total - skipped_logged,  # unusable items redrawn in these steps
                        skipped_total=total,
                    )
                    skipped_logged = total
                    writer.write(step, "train", avg)
                    if bar is not None:
                        bar.set_postfix(
                            loss=f"{avg['loss']:.4f}",
                            ce=f"{avg['ce']:.3f}",
                            dice=f"{avg['dice']:.3f}",
                            sps=f"{avg['steps_per_s']:.2f}",
                        )
                    summary["train"] = avg
                    window, t_window, n_examples = [], time.perf_counter(), 0
                if bar is not None:
                    bar.update(1)
                # -- checkpoint
                if step % ckpt_every == 0 or step == total_steps:
                    ckpts.save(step, tr, opt_state, train_it, {**meta, "skipped_total": skipped_total()})
                    last_ckpt = step
                # -- validate (and keep the best)
                if done_epoch and every_epochs:
                    epoch = math.ceil(step / steps_per_epoch)
                    if epoch % every_epochs == 0 or step == total_steps:
                        last_val = run_eval(step)
                        ckpts.save_best(step, tr, meta, last_val)
                        t_window = time.perf_counter()  # keep validation time out of the throughput
            if pending is not None:
                check(pending)
    finally:
        if bar is not None:
            bar.close()
        ckpts.wait()
        ckpts.close()
        writer.close()
    summary.update(
        final_step=step,
        val=last_val,
        wall_s=time.perf_counter() - t_start,
        cpu_s=time.process_time() - cpu_start,
    )
    if jax.process_index() == 0:
        summary = write_run_summary(workdir, summary)
    return summary
