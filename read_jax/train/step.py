"""The train step: READ's loss on k micro-batches, one optimizer update, pure and jitted with explicit
shardings;
its compilation and the per-device memory it needs (`memory_report` lowers the 7B/13B steps on a CPU).

Shape letters: k micro-batches per optimizer step, B images per micro-batch (global), R conversation rows,
L text length (a length bucket). Device batches are the `read_jax.data.pipeline` batch dict with every leaf
stacked to [k, ...]; the micro-batch axis is replicated and axis 1 is split over the data axes.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from read_jax import sharding as shd
from read_jax.config import ReadConfig
from read_jax.data import loaders
from read_jax.losses import LossWeights, read_batch_loss
from read_jax.train import config as run_config
from read_jax.train.state import (
    ModelSetup,
    make_optimizer,
    opt_state_shardings,
    setup_model,
    state_bytes_per_device,
)
from read_jax.tree_util import with_shardings

Array = jax.Array
# Metrics summed (not averaged) over the micro-batches of a step.
_SUMMED = ("num_tokens", "num_masks", "ce_dropped_tokens")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the train step (hashable: part of the jit cache key)."""

    canvas_hw: tuple[int, int]
    weights: LossWeights = dataclasses.field(default_factory=LossWeights)
    ce_max_tokens: int = 0  # 0: CE on the full logits, else on at most this many supervised positions
    dropout: bool = True  # dropout while training (deterministic=False)
    seed: int = 0

    @property
    def logits(self) -> str:
        """The text logits the forward computes: none without a text loss, else full or supervised-only."""
        if self.weights.ce == 0:
            return "none"
        return "supervised" if self.ce_max_tokens else "full"


def step_config(config, canvas_hw: tuple[int, int]) -> StepConfig:
    tc = config.train
    return StepConfig(
        canvas_hw=canvas_hw,
        weights=run_config.loss_weights(tc),
        ce_max_tokens=int(tc.ce_max_tokens),
        dropout=bool(tc.dropout),
        seed=int(tc.seed),
    )


def micro_loss(trainable, frozen, graphdef, batch: dict, key: Array, sc: StepConfig):
    """READ's loss on one micro-batch (a plain batch dict, no leading k axis) -> (loss, metrics)."""
    model = nnx.merge(graphdef, trainable, frozen)
    out = model(
        batch,
        canvas_hw=sc.canvas_hw,
        logits=sc.logits,
        max_supervised=sc.ce_max_tokens,
        compute_masks=sc.weights.masks,
        deterministic=not sc.dropout,
        rngs=nnx.Rngs(dropout=key) if sc.dropout else None,
    )
    return read_batch_loss(out, batch, sc.weights)


def _global_norm(tree) -> Array:
    return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def train_step(
    trainable, frozen, opt_state, batch: dict, step: Array, lr: Array, *, graphdef, tx, sc: StepConfig
):
    """One optimizer step over k micro-batches (gradient accumulation), pure.

    Args:
      trainable, frozen: nnx.States of the model (trainable in fp32).
      opt_state: optax state of `tx` over `trainable`.
      batch: the pipeline batch with every leaf [k, ...] (k micro-batches of the same shapes).
      step: int32[] optimizer step (folded into the dropout rng, so a resumed run draws the same masks).
      lr: float32[] this step's learning rate (`make_schedule(...)(step)`).
    Returns:
      (trainable, opt_state, metrics): metrics is a flat dict of float32 scalars: loss/ce/bce/dice (means over
      the micro-batches), num_tokens/num_masks/ce_dropped_tokens (sums), l2_grads (before clipping),
      l2_updates,
      l2_params, and `finite` (1.0 if the update was applied). The guard checks the loss, the gradient norm,
      the
      update and the new parameters: when any is not finite, the trainables and the optimizer state are left
      unchanged, and the host loop stops before anything is checkpointed.

    Accumulation averages the micro-batch gradients, as DeepSpeed does: each micro-batch loss is its own mean
    over its supervised tokens and masks, so k micro-batches equal one k-times-larger batch exactly when the
    micro-batches carry equal numbers of supervised tokens and masks.
    """
    k = jax.tree.leaves(batch)[0].shape[0]
    key = jax.random.fold_in(jax.random.key(sc.seed), step)
    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def one(j, mb):
        (_, m), g = grad_fn(trainable, frozen, graphdef, mb, jax.random.fold_in(key, j), sc)
        return g, m

    if k == 1:
        grads, metrics = one(0, jax.tree.map(lambda x: x[0], batch))
    else:

        def body(acc, xs):
            g, m = one(*xs)
            return jax.tree.map(jnp.add, acc, g), m

        grads, ms = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, trainable), (jnp.arange(k), batch))
        grads = jax.tree.map(lambda g: g / k, grads)
        metrics = {n: (v.sum(0) if n in _SUMMED else v.mean(0)) for n, v in ms.items()}

    updates, new_opt = tx.update(grads, opt_state, trainable)
    updates = jax.tree.map(lambda u: -lr * u, updates)  # optax.scale_by_learning_rate, with a traced lr
    new_tr = optax.apply_updates(trainable, updates)
    norms = {
        "l2_grads": _global_norm(grads),
        "l2_updates": _global_norm(updates),
        "l2_params": _global_norm(new_tr),
    }
    finite = jnp.isfinite(metrics["loss"])
    for v in norms.values():
        finite &= jnp.isfinite(v)
    # A non-finite step must not poison the state: keep the old one (the host then stops the run).
    new_tr = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new_tr, trainable)
    new_opt = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new_opt, opt_state)
    metrics = {n: v.astype(jnp.float32) for n, v in metrics.items()}
    return new_tr, new_opt, {**metrics, **norms, "finite": finite.astype(jnp.float32)}


def micro_batch_shardings(batch_abstract: Mapping[str, Any], mesh) -> dict:
    """[k, N, ...] leaves: k replicated, N over the data axes."""
    return {n: shd.batch_sharding(mesh, x.ndim, batch_axis=1) for n, x in batch_abstract.items()}


def jit_train_step(setup: ModelSetup, tx, sc: StepConfig, opt_shardings, batch_shardings):
    """`train_step` jitted with explicit in/out shardings; trainable and optimizer state are donated."""
    rep = NamedSharding(setup.mesh, P())
    fn = functools.partial(train_step, graphdef=setup.graphdef, tx=tx, sc=sc)
    return jax.jit(
        fn,
        in_shardings=(
            setup.trainable_shardings,
            setup.frozen_shardings,
            opt_shardings,
            batch_shardings,
            rep,
            rep,
        ),
        out_shardings=(setup.trainable_shardings, opt_shardings, rep),
        donate_argnums=(0, 2),
    )


def step_arguments(setup: ModelSetup, opt_abstract, opt_shardings, batch_abstract, batch_shardings) -> tuple:
    """The abstract, sharded arguments of the jitted step (what `lower` takes)."""
    rep = NamedSharding(setup.mesh, P())
    return (
        with_shardings(setup.trainable_abstract, setup.trainable_shardings),
        with_shardings(setup.frozen_abstract, setup.frozen_shardings),
        with_shardings(opt_abstract, opt_shardings),
        {
            n: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_shardings[n])
            for n, x in batch_abstract.items()
        },
        jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
        jax.ShapeDtypeStruct((), jnp.float32, sharding=rep),
    )


def compile_step(jitted, args: tuple, compiler_options: dict | None = None):
    """Lower and compile once (no execution); returns (compiled, stats dict with memory/flop figures)."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile(compiler_options=compiler_options)
    stats = {"compile_s": time.perf_counter() - t0, **memory_stats(compiled)}
    cost = compiled.cost_analysis()  # a dict (a one-element list on older jax); None where unsupported
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    if isinstance(cost, Mapping) and "flops" in cost:
        stats["flops"] = float(cost["flops"])
    return compiled, stats


def memory_stats(compiled) -> dict:
    """Per-device bytes of a compiled executable (`memory_analysis()`; empty where the backend has none)."""
    ma = compiled.memory_analysis()
    if ma is None:  # pragma: no cover - backends without memory analysis
        return {}
    names = (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "temp_size_in_bytes",
        "alias_size_in_bytes",
        "generated_code_size_in_bytes",
    )
    return {n: int(getattr(ma, n)) for n in names if hasattr(ma, n)}


def memory_report(
    cfg: ReadConfig,
    config,
    *,
    mesh,
    lower: bool = True,
    accum: int | None = None,
    length: int | None = None,
    images_per_device: int = 1,
) -> dict:
    """Per-device bytes of the frozen base, the trainables and the optimizer state, from shapes and shardings
    only, and (`lower=True`) the train step traced and lowered for the config's batch (nothing is allocated or
    executed: `nnx.eval_shape` + `jit(...).lower`). This is how the 7B recipe is checked on a CPU.

    Args:
      cfg: the architecture (e.g. `config.read_config(run.model)`); config: the run config (train/data/mesh).
      accum / length: micro-batches per step and text length (default: `train.grad_accum`, the largest
        bucket).
      images_per_device: images per device per micro-batch (the global batch is this x data-parallel devices).
    """
    strategy = loaders.plain(config.mesh.strategy)
    setup = setup_model(
        cfg, mesh, strategy=strategy, trainable_dtype=config.train.get("trainable_dtype") or None
    )
    tx = make_optimizer(config.train)
    opt_sh, opt_abs = opt_state_shardings(tx, setup.trainable_abstract, setup.trainable_shardings, mesh)
    out = {
        "devices": int(mesh.size),
        "mesh": dict(mesh.shape),
        "trainable_params": setup.num_trainable,
        "frozen_params": setup.num_frozen,
        "frozen_bytes_per_device": state_bytes_per_device(setup.frozen_abstract, setup.frozen_shardings),
        "trainable_bytes_per_device": state_bytes_per_device(
            setup.trainable_abstract, setup.trainable_shardings
        ),
        "optimizer_bytes_per_device": state_bytes_per_device(opt_abs, opt_sh),
        "lowered": False,
    }
    if lower:
        n_data = mesh.shape["data"] * mesh.shape["fsdp"]
        dc = loaders.data_config(config.data, cfg, batch_size=images_per_device * n_data)
        spec = loaders.batch_spec(
            dc, cfg.sam, int(length or max(dc.length_buckets)), int(accum or config.train.grad_accum)
        )
        bsh = micro_batch_shardings(spec, mesh)
        jitted = jit_train_step(setup, tx, step_config(config, (dc.max_mask_side,) * 2), opt_sh, bsh)
        t0 = time.perf_counter()
        with shd.use_mesh(mesh):
            # trace + lower only: shapes, shardings and the HLO, nothing compiled or run
            jitted.lower(*step_arguments(setup, opt_abs, opt_sh, spec, bsh))
        out.update(
            lowered=True,
            lower_s=time.perf_counter() - t0,
            batch_images=dc.batch_size,
            accum=spec["input_ids"].shape[0],
            text_length=spec["input_ids"].shape[-1],
        )
    out["params_plus_optimizer_bytes_per_device"] = (
        out["frozen_bytes_per_device"] + out["trainable_bytes_per_device"] + out["optimizer_bytes_per_device"]
    )
    return out
