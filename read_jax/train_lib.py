"""READ training: a pure, jitted, sharded train step and the sectioned loop around it.

PyTorch reference: rui-qian/READ@2549240 `train_read.py` (DeepSpeed ZeRO-2 loop, `WarmupDecayLR`, per-epoch
validation, best-by-cIoU checkpoint) and `model/READ.py:1106-1190` (`init_READ_model`: what trains);
read_reference.md §5 (losses), §6 (recipe), §8 (validation metrics).

The recipe (§6.2): AdamW (beta 0.9/0.95, weight decay 0, eps 1e-8), linear warmup 0 -> lr over 100 optimizer
steps then linear decay to 0 at the last step, global-norm clipping 1.0, gradient accumulation over micro-batches,
only the trainables (LoRA, embed_tokens, lm_head, mask decoder, text_hidden_fcs; `ReadConfig.trainable_regexes`)
see the optimizer. Trainables and optimizer state are fp32 while the model computes in its config dtype (bf16 for
the released sizes); the frozen base stays in its parameter dtype and is never donated or re-saved.

Shape letters: k micro-batches per optimizer step, B images per micro-batch (global), R = B * C conversation rows,
L text length (a length bucket), Hc = Wc = `data.max_mask_side` (the GT canvas).

Batches on device are the `read_jax.data.pipeline` batch dict with every leaf stacked to [k, ...] (k = 1
without accumulation); the leading micro-batch axis is replicated and axis 1 is split over the data axes.

`train_and_evaluate(config, workdir)` reads, in order (house style §13): mesh -> data -> model -> shard ->
step -> restore -> evals -> loop.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from read_jax import sharding as shd
from read_jax.config import (
    IGNORE_INDEX,
    ClipVisionConfig,
    ConfigError,
    LlamaConfig,
    LoraConfig,
    ReadConfig,
    SamConfig,
    SaspConfig,
)
from read_jax.lora import apply_lora, count_params, trainable_filter
from read_jax.losses import LossWeights

log = logging.getLogger(__name__)

Array = jax.Array
# Batch entries that stay on the host: strings, and bookkeeping used only to name a batch (NaN guard, logs).
HOST_KEYS = ("sample_id", "example_index", "num_skipped", "source")


class NonFiniteLossError(FloatingPointError):
    """A training step produced a NaN/Inf loss or gradient norm (its update was not applied)."""

    def __init__(self, step: int, metrics: Mapping[str, float], batch_ids: Mapping[str, Any]):
        self.step, self.metrics, self.batch_ids = step, dict(metrics), dict(batch_ids)
        super().__init__(
            f"non-finite training step {step}: loss={metrics.get('loss')} "
            f"l2_grads={metrics.get('l2_grads')}; batch {self.batch_ids}. The update was not "
            f"applied and the last checkpoint is untouched."
        )


# =====================================================================================================
# Config: defaults shared by every `configs/*.py`, and -> ReadConfig
# =====================================================================================================
def default_config():
    """The run config every `configs/*.py` starts from (ml_collections ConfigDict), READ-7B's recipe (§6).

    Sections: `model` (-> `read_config_from`), `init` (scratch seed, converted base `checkpoint`, or another run's
    `trainables_from`), `data` (`read_jax.data.pipeline.DataConfig` fields + sources), `train` (optimizer, schedule,
    losses, accumulation), `mesh`, `checkpoint`, `eval`.
    """
    from ml_collections import ConfigDict

    from read_jax.config import READ_TRAINABLE_REGEXES

    c = ConfigDict()
    c.model = ConfigDict(
        {
            "preset": "read_7b",
            "dtype": "",
            "param_dtype": "",
            "remat": True,
            "max_segs": 4,
            "trainable_regexes": READ_TRAINABLE_REGEXES,
        }
    )
    c.init = ConfigDict({"seed": 0, "checkpoint": "", "trainables_from": ""})
    c.data = ConfigDict(
        {
            "root": "dataset",
            "reason_seg_dir": "{root}/reason_seg/ReasonSeg",
            "tokenizer": "",
            "rates": "read_7b",
            "batch_size": 2,
            "max_convs": 3,
            "length_buckets": (512, 1024, 1793),
            "clip_size": 336,
            "max_mask_side": 1024,
            "seed": 0,
            "num_workers": 0,
            "template": "llava_v1",
            # The generated shapes set (`read_jax.data.make_shapes`): written to `root` if absent, (train, val, test).
            "make_shapes": False,
            "num_shapes": (200, 40, 40),
            # The share of ReasonSeg samples drawn as false-premise corrections; -1: SESAME's 0.15.
            "reason_seg_false_premise": -1.0,
        }
    )
    c.train = ConfigDict(
        {
            "lr": 3e-4,
            "warmup_steps": 100,
            "epochs": 20,
            "steps_per_epoch": 500,
            "total_steps": 0,
            "grad_accum": 10,
            "clip_norm": 1.0,
            "b1": 0.9,
            "b2": 0.95,
            "eps": 1e-8,
            "weight_decay": 0.0,
            "ce_weight": 1.0,
            "bce_weight": 2.0,
            "dice_weight": 0.5,
            # Not READ's: a similarity-map loss for from-scratch models (`losses.similarity_loss`); 0 = off.
            "sim_weight": 0.0,
            "ce_max_tokens": 0,  # > 0: CE on at most this many supervised positions per micro-batch (no full logits)
            "lora_dropout": True,
            "seed": 42,
            "log_every": 10,
            "trainable_dtype": "float32",
            "fast_compile": False,  # compile for compile speed (tests, smoke runs)
            "mask_side": 0,  # > 0: a coarser GT canvas for training only (validation keeps data.max_mask_side)
        }
    )
    c.mesh = ConfigDict({"data": -1, "fsdp": 1, "strategy": ((r".*", "fsdp"),), "distributed": False})
    c.checkpoint = ConfigDict({"every_steps": 0, "keep": 2, "async_save": True, "best_metric": "cIoU"})
    c.eval = ConfigDict(
        {"dataset": "reasonseg", "split": "val", "batch_size": 1, "every_epochs": 1, "max_batches": 0}
    )
    c.progress = True
    return c


def parse_rates(rates: str):
    """'read_7b' (a `mixture.RATE_PRESETS` name) or 'reason_seg:1,sem_seg:10' -> preset name or {source: rate}."""
    if ":" not in rates:
        return rates
    out = {}
    for part in rates.split(","):
        name, _, r = part.partition(":")
        try:
            out[name.strip()] = float(r)
        except ValueError as e:
            raise ConfigError(f"bad data.rates entry {part!r} (want name:rate)") from e
    return out


_FACTORIES = {"tiny": ReadConfig.tiny, "read_7b": ReadConfig.read_7b, "read_13b": ReadConfig.read_13b}
_COMPONENTS = {"llama": LlamaConfig, "clip": ClipVisionConfig, "sam": SamConfig, "sasp": SaspConfig}


def _plain(x):
    """ConfigDict / FrozenConfigDict / lists -> plain Python (tuples for sequences)."""
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return tuple(_plain(v) for v in x)
    return x


def read_config_from(model_cfg) -> ReadConfig:
    """A ReadConfig from the `config.model` section.

    Fields: `preset` ('tiny' | 'read_7b' | 'read_13b'), `dtype` / `param_dtype` (every component), optional
    component overrides `llama`, `clip`, `sam`, `sasp` (dicts of dataclass fields), `lora` (a dict of LoraConfig
    fields, or None for no LoRA), `remat` (LLaMA decoder layers), and any other `ReadConfig` field (`max_segs`,
    `trainable_regexes`, ...). An unknown field raises ConfigError.
    """
    m = _plain(model_cfg)
    preset = m.get("preset", "tiny")
    if preset not in _FACTORIES:
        raise ConfigError(f"unknown model preset {preset!r}; known: {sorted(_FACTORIES)}")
    cfg = _FACTORIES[preset]()
    if m.get("dtype"):
        cfg = cfg.with_dtype(m["dtype"], m.get("param_dtype") or None)
    kw = {}
    for name, cls in _COMPONENTS.items():
        over = m.get(name) or {}
        unknown = set(over) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"config.model.{name} has fields {sorted(unknown)} that {cls.__name__} lacks")
        if over:
            kw[name] = dataclasses.replace(getattr(cfg, name), **over)
    if "remat" in m:
        kw["llama"] = dataclasses.replace(kw.get("llama", cfg.llama), remat=bool(m["remat"]))
    if "lora" in m:
        kw["lora"] = None if m["lora"] is None else dataclasses.replace(cfg.lora or LoraConfig(), **m["lora"])
    top = {f.name for f in dataclasses.fields(ReadConfig)} - set(_COMPONENTS) - {"lora"}
    unknown = set(m) - top - set(_COMPONENTS) - {"preset", "dtype", "param_dtype", "remat", "lora"}
    if unknown:
        raise ConfigError(f"config.model has fields {sorted(unknown)} that ReadConfig lacks")
    for k in top & set(m):
        if m[k] is not None:
            kw[k] = m[k]
    if "sam" in kw and "out_dim" not in kw:
        kw["out_dim"] = kw["sam"].prompt_embed_dim
    return cfg.replace(**kw)


def loss_weights_from(train_cfg) -> LossWeights:
    return LossWeights(
        ce=float(train_cfg.ce_weight),
        bce=float(train_cfg.bce_weight),
        dice=float(train_cfg.dice_weight),
        sim=float(train_cfg.get("sim_weight", 0.0)),
    )


def total_steps_of(train_cfg) -> int:
    """Optimizer steps of the run: `train.total_steps` if set, else epochs x steps_per_epoch."""
    n = int(train_cfg.get("total_steps") or 0) or int(train_cfg.epochs) * int(train_cfg.steps_per_epoch)
    if n < 1:
        raise ConfigError("the run has no optimizer steps (train.epochs * train.steps_per_epoch < 1)")
    return n


# =====================================================================================================
# Model: abstract build, trainable/frozen split, sharded init
# =====================================================================================================
def make_model_fn(cfg: ReadConfig, seed: int = 0) -> Callable[[], nnx.Module]:
    """A zero-argument builder of the full READ model with LoRA attached (if `cfg.lora`)."""
    from read_jax.read_model import ReadModel

    def build():
        model = ReadModel(cfg, rngs=nnx.Rngs(params=seed))
        if cfg.lora is not None:
            apply_lora(model, cfg.lora, rngs=nnx.Rngs(params=seed + 1))
        return model

    return build


def _path(p) -> str:
    return "/".join(str(x) for x in p)


# The towers READ runs under no_grad (`ReadConfig.freeze_vision_towers`).
VISION_TOWER_PREFIXES = ("llava/vision_tower/", "visual_model/image_encoder/")


def check_trainable_regexes(abstract_model, cfg: ReadConfig) -> dict[str, int]:
    """Parameters matched per trainable regex; raises ConfigError on a regex that matches nothing.

    The LoRA regex is exempt when the model has no LoRA (`cfg.lora is None`).
    """
    paths = [_path(p) for p, v in nnx.to_flat_state(nnx.state(abstract_model, nnx.Param))]
    counts = {r: sum(bool(re.fullmatch(r, p)) for p in paths) for r in cfg.trainable_regexes}
    dead = [r for r, n in counts.items() if n == 0 and not (cfg.lora is None and "lora" in r)]
    if dead:
        raise ConfigError(f"trainable regexes that match no parameter of the model: {dead}")
    if cfg.freeze_vision_towers:
        towers = [
            p
            for p in paths
            if p.startswith(VISION_TOWER_PREFIXES) and any(re.fullmatch(r, p) for r in cfg.trainable_regexes)
        ]
        if towers:
            raise ConfigError(
                f"{len(towers)} parameters of frozen vision towers (e.g. {towers[0]}) are marked "
                "trainable; they would get no gradient. Set model.freeze_vision_towers=False to "
                "train them, or drop them from trainable_regexes"
            )
    return counts


def _as_dtype(tree, dtype):
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _abstract_as(tree, dtype):
    dtype = jnp.dtype(dtype)
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype),
        tree,
    )


@dataclasses.dataclass
class ModelSetup:
    """Everything static about the sharded model: graph, abstract states and their shardings."""

    cfg: ReadConfig
    model_fn: Callable[[], nnx.Module]
    graphdef: Any
    trainable_abstract: Any  # nnx.State of ShapeDtypeStruct (in the trainable dtype)
    frozen_abstract: Any
    trainable_shardings: Any
    frozen_shardings: Any
    mesh: Any
    regex_counts: dict

    @property
    def num_trainable(self) -> int:
        return count_params(self.trainable_abstract)

    @property
    def num_frozen(self) -> int:
        return count_params(self.frozen_abstract)


def setup_model(
    cfg: ReadConfig,
    mesh,
    *,
    strategy=shd.DEFAULT_STRATEGY,
    seed: int = 0,
    trainable_dtype: str | None = "float32",
    min_fsdp_bytes: int = 1 << 20,
) -> ModelSetup:
    """Abstract model (no allocation), its trainable/frozen split and the parameter shardings.

    Args:
      cfg: the architecture; `cfg.trainable_regexes` says what trains.
      mesh: a ('data', 'fsdp') mesh.
      strategy: `read_jax.sharding` (regex, rule) pairs over '/'-joined parameter paths.
      trainable_dtype: storage dtype of the trainables (and so of the optimizer state); None keeps the config's.
    """
    model_fn = make_model_fn(cfg, seed)
    abstract = nnx.eval_shape(model_fn)
    counts = check_trainable_regexes(abstract, cfg)
    graphdef, tr, fr = nnx.split(abstract, trainable_filter(cfg.trainable_regexes), ...)
    if trainable_dtype:
        tr = _abstract_as(tr, trainable_dtype)
    return ModelSetup(
        cfg,
        model_fn,
        graphdef,
        tr,
        fr,
        shd.tree_shardings(tr, mesh, strategy, min_fsdp_bytes),
        shd.tree_shardings(fr, mesh, strategy, min_fsdp_bytes),
        mesh,
        counts,
    )


def fast_compile_options() -> dict:
    """XLA options that trade run time for compile time, for code that runs once (init) or a few times (tests).

    On CPU the from-scratch init is hundreds of small random-number kernels: at the default optimisation level
    compiling them takes ~3x longer than at level 0, and they run once.
    """
    if jax.default_backend() != "cpu":
        return {}
    return {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def init_params(setup: ModelSetup, base_checkpoint: str | None = None, strategy=shd.DEFAULT_STRATEGY):
    """(trainable, frozen) states, sharded, from scratch or from a converted checkpoint.

    From scratch the whole model is initialised under one jit whose outputs are already sharded (the 7B model is
    never materialised on one device). From `base_checkpoint` (a `convert_weights.py` output) every leaf is read
    straight into its sharding by `read_jax.checkpoint.load_model`; LoRA factors keep their init (B = 0).
    """
    filt = trainable_filter(setup.cfg.trainable_regexes)
    tr_dtype = (
        jax.tree.leaves(setup.trainable_abstract)[0].dtype
        if jax.tree.leaves(setup.trainable_abstract)
        else jnp.float32
    )
    if base_checkpoint:
        from read_jax.checkpoint import load_model

        model = load_model(base_checkpoint, setup.model_fn, mesh=setup.mesh, strategy=strategy)
        _, tr, fr = nnx.split(model, filt, ...)
        tr = jax.jit(lambda t: _as_dtype(t, tr_dtype), out_shardings=setup.trainable_shardings)(tr)
        # The loader shards by the same rules but with its own size threshold: put the frozen leaves where the
        # compiled step expects them (a no-op for every leaf already there).
        fr = jax.device_put(fr, setup.frozen_shardings)
        return tr, fr

    def init():
        _, tr, fr = nnx.split(setup.model_fn(), filt, ...)
        return _as_dtype(tr, tr_dtype), fr

    init_jit = jax.jit(init, out_shardings=(setup.trainable_shardings, setup.frozen_shardings))
    return init_jit.lower().compile(compiler_options=fast_compile_options())()


# =====================================================================================================
# Optimizer
# =====================================================================================================
def make_schedule(lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """DeepSpeed `WarmupDecayLR` (linear): 0 -> lr over `warmup_steps`, then linearly to 0 at `total_steps`."""
    warmup_steps = max(0, min(int(warmup_steps), int(total_steps)))
    decay = optax.linear_schedule(lr, 0.0, max(int(total_steps) - warmup_steps, 1))
    if warmup_steps == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), decay], [warmup_steps])


def make_optimizer(train_cfg) -> optax.GradientTransformation:
    """clip_by_global_norm -> Adam moments -> decoupled weight decay, WITHOUT the learning rate.

    This is `optax.adamw` after clipping, except that the final `-lr` scaling happens in `train_step` with the
    step's scheduled value passed in as a traced scalar (`make_schedule`): one compiled step then serves every
    learning rate and schedule (a second stage, a resumed run with another lr, a test). It only ever sees the
    trainable state: that is the mask.
    """
    return optax.chain(
        optax.clip_by_global_norm(float(train_cfg.clip_norm)),
        optax.scale_by_adam(b1=float(train_cfg.b1), b2=float(train_cfg.b2), eps=float(train_cfg.eps)),
        optax.add_decayed_weights(float(train_cfg.weight_decay)),
    )


def schedule_of(train_cfg, total_steps: int) -> optax.Schedule:
    return make_schedule(float(train_cfg.lr), int(train_cfg.warmup_steps), total_steps)


def opt_state_shardings(tx: optax.GradientTransformation, trainable_abstract, trainable_shardings, mesh):
    """Optimizer-state shardings: moments like their parameter, counters replicated."""
    opt_abstract = jax.eval_shape(tx.init, trainable_abstract)
    rep = NamedSharding(mesh, P())
    return optax.tree_utils.tree_map_params(
        tx,
        lambda _, s: s,
        opt_abstract,
        trainable_shardings,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    ), opt_abstract


# =====================================================================================================
# Loss and the train step
# =====================================================================================================
def sparse_ce_outputs(model, outputs: dict, aux: dict, max_tokens: int) -> tuple[dict, Array]:
    """Replace the full [R, E, V] logits by the logits of the batch's supervised positions only.

    The text loss needs logits only where a label is supervised (the answers, ~10-30 tokens a row), but the model
    computes all R x E positions: at V = 32003 the lm_head is most of a small model's step. Here the first
    `max_tokens` supervised positions of the whole batch (row-major) are gathered from the final hidden states and
    projected; the unused full logits are then removed by XLA. The returned logits/labels are laid out as one row
    [1, K + 1] so that the usual shifted CE (`losses.ce_loss`) computes exactly the mean it computes on the full
    logits, as long as the batch has at most `max_tokens` supervised tokens; the number dropped beyond that is
    returned (and logged as `ce_dropped_tokens`).

    Returns:
      (outputs with logits [1, K+1, V] and labels [1, K+1], dropped count int32[]).
    """
    hidden, labels = aux["llava/hidden"], outputs["labels"]  # [R, E, C], [R, E]
    c = hidden.shape[-1]
    h = hidden[:, :-1].reshape(-1, c)  # position t predicts label t + 1
    targets = labels[:, 1:].reshape(-1)
    k = min(int(max_tokens), targets.shape[0])
    valid = targets != IGNORE_INDEX
    order = jnp.argsort(~valid, stable=True)[:k]  # supervised positions first, in order  [K]
    sel_valid = valid[order]
    sel_targets = jnp.where(sel_valid, targets[order], IGNORE_INDEX)
    logits = model.llava.language_model.lm_head(h[order]).astype(jnp.float32)  # [K, V]
    # ce_loss reads logits[:, :-1] against labels[:, 1:]: one dummy column on each side.
    logits = jnp.concatenate([logits, jnp.zeros_like(logits[:1])], axis=0)[None]
    lab = jnp.concatenate([jnp.full((1,), IGNORE_INDEX, sel_targets.dtype), sel_targets])[None]
    dropped = valid.sum() - sel_valid.sum()
    return {**outputs, "logits": logits, "labels": lab}, dropped


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the train step (hashable: part of the jit cache key)."""

    canvas_hw: tuple[int, int]
    weights: LossWeights = dataclasses.field(default_factory=LossWeights)
    ce_max_tokens: int = 0  # 0: CE on the full logits (the model's own), else `sparse_ce_outputs` (batch)
    dropout: bool = True  # LoRA dropout during training (deterministic=False)
    seed: int = 0


def micro_loss(trainable, frozen, graphdef, batch: dict, key: Array, sc: StepConfig):
    """READ's loss on one micro-batch (a plain batch dict, no leading k axis) -> (loss, metrics)."""
    from read_jax.read_model import batch_loss

    model = nnx.merge(graphdef, trainable, frozen)
    rngs = nnx.Rngs(dropout=key) if sc.dropout else None
    outputs, aux = model(batch, canvas_hw=sc.canvas_hw, deterministic=not sc.dropout, rngs=rngs)
    dropped = jnp.zeros((), jnp.int32)
    if sc.weights.ce == 0:
        # No text loss: hand the loss an empty CE (no supervised label), so XLA drops the lm_head altogether.
        r = outputs["labels"].shape[0]
        outputs = {
            **outputs,
            "logits": jnp.zeros((r, 2, 1), jnp.float32),
            "labels": jnp.full((r, 2), IGNORE_INDEX, jnp.int32),
        }
    elif sc.ce_max_tokens:
        outputs, dropped = sparse_ce_outputs(model, outputs, aux, sc.ce_max_tokens)
    if sc.weights.sim:
        outputs = {**outputs, "sim_logits": aux["sasp/sim"] * model.config.llama.hidden_size**-0.5}
    loss, metrics = batch_loss(outputs, batch, sc.weights)
    metrics = {**metrics, "ce_dropped_tokens": dropped}
    return loss, metrics


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
      the micro-batches), num_tokens/num_masks/ce_dropped_tokens (sums), l2_grads (before clipping), l2_updates,
      l2_params, and `finite` (1.0 if the update was applied; a non-finite loss or gradient norm leaves the
      trainables and the optimizer state unchanged, and the host loop stops on it).

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
            j, mb = xs
            g, m = one(j, mb)
            return jax.tree.map(jnp.add, acc, g), m

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        grads, ms = jax.lax.scan(body, zeros, (jnp.arange(k), batch))
        grads = jax.tree.map(lambda g: g / k, grads)
        metrics = {
            n: (v.sum(0) if n in ("num_tokens", "num_masks", "ce_dropped_tokens") else v.mean(0))
            for n, v in ms.items()
        }

    updates, new_opt = tx.update(grads, opt_state, trainable)
    updates = jax.tree.map(lambda u: -lr * u, updates)  # optax.scale_by_learning_rate, with a traced lr
    new_tr = optax.apply_updates(trainable, updates)
    l2_grads = _global_norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(l2_grads)
    # A non-finite step must not poison the state: keep the old one (the host then stops the run).
    new_tr = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new_tr, trainable)
    new_opt = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new_opt, opt_state)
    metrics = {n: v.astype(jnp.float32) for n, v in metrics.items()}
    metrics.update(
        l2_grads=l2_grads,
        l2_updates=_global_norm(updates),
        l2_params=_global_norm(new_tr),
        finite=finite.astype(jnp.float32),
    )
    return new_tr, new_opt, metrics


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


def _with_sharding(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def compile_step(
    jitted,
    setup: ModelSetup,
    opt_abstract,
    opt_shardings,
    batch_abstract,
    batch_shardings,
    compiler_options: dict | None = None,
):
    """Lower and compile once (no execution); returns (compiled, stats dict with memory/flop figures)."""
    args = (
        _with_sharding(setup.trainable_abstract, setup.trainable_shardings),
        _with_sharding(setup.frozen_abstract, setup.frozen_shardings),
        _with_sharding(opt_abstract, opt_shardings),
        {
            n: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_shardings[n])
            for n, x in batch_abstract.items()
        },
        jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(setup.mesh, P())),
        jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(setup.mesh, P())),
    )
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    compiled = lowered.compile(compiler_options=compiler_options)
    stats = {"compile_s": time.perf_counter() - t0}
    stats.update(memory_stats(compiled))
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
    out = {}
    for name in (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "temp_size_in_bytes",
        "alias_size_in_bytes",
        "generated_code_size_in_bytes",
    ):
        if hasattr(ma, name):
            out[name] = int(getattr(ma, name))
    return out


def state_bytes_per_device(abstract, shardings) -> int:
    """Bytes one device holds of a sharded tree (the largest shard of each leaf)."""
    total = 0
    for a, s in zip(
        jax.tree.leaves(abstract), jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    ):
        shard = s.shard_shape(a.shape)
        total += math.prod(shard) * jnp.dtype(a.dtype).itemsize
    return total


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
      cfg: the architecture (e.g. `read_config_from(config.model)`); config: the run config (train/data/mesh).
      accum / length: micro-batches per step and text length (default: `train.grad_accum`, the largest bucket).
      images_per_device: images per device per micro-batch (the global batch is this x data-parallel devices).
    """
    strategy = _plain(config.mesh.strategy)
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
        dc = data_config_from(config.data, cfg)
        n_data = mesh.shape["data"] * mesh.shape["fsdp"]
        dc = dataclasses.replace(dc, batch_size=images_per_device * n_data)
        spec = batch_spec(
            dc, cfg.sam, int(length or max(dc.length_buckets)), int(accum or config.train.grad_accum)
        )
        bsh = micro_batch_shardings(spec, mesh)
        sc = StepConfig(
            canvas_hw=(dc.max_mask_side, dc.max_mask_side),
            weights=loss_weights_from(config.train),
            ce_max_tokens=int(config.train.ce_max_tokens),
            dropout=bool(config.train.lora_dropout),
        )
        jitted = jit_train_step(setup, tx, sc, opt_sh, bsh)
        rep = NamedSharding(mesh, P())
        args = (
            _with_sharding(setup.trainable_abstract, setup.trainable_shardings),
            _with_sharding(setup.frozen_abstract, setup.frozen_shardings),
            _with_sharding(opt_abs, opt_sh),
            {n: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=bsh[n]) for n, x in spec.items()},
            jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
            jax.ShapeDtypeStruct((), jnp.float32, sharding=rep),
        )
        t0 = time.perf_counter()
        with shd.use_mesh(mesh):
            jitted.lower(*args)  # trace + lower only: shapes, shardings and the HLO, nothing compiled or run
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


# =====================================================================================================
# Data
# =====================================================================================================
def data_config_from(data_cfg, cfg: ReadConfig):
    from read_jax.data.pipeline import DataConfig

    d = _plain(data_cfg)
    fields = {f.name for f in dataclasses.fields(DataConfig)}
    dc = DataConfig(**{k: v for k, v in d.items() if k in fields})
    if dc.clip_size != cfg.clip.image_size:
        raise ConfigError(f"data.clip_size {dc.clip_size} != model CLIP image_size {cfg.clip.image_size}")
    return dc


def _root_path(template: str, root: str) -> str:
    return template.format(root=root) if template else template


def ensure_shapes_data(data_cfg) -> None:
    """`data.make_shapes`: make `data.root` hold the generated shapes set with `data.num_shapes` images per split.

    A split with fewer images than asked for is (re)written with `read_jax.data.make_shapes.write_split`, which is
    a pure function of (seed, split, index): images already there are rewritten identically, so a set made by
    `python -m read_jax.data.make_shapes --out DIR` (200 training images by default) is topped up, not replaced.
    Only process 0 writes (a shared filesystem is assumed on multi-host runs).
    """
    if not data_cfg.get("make_shapes"):
        return
    from read_jax.data import make_shapes

    root = data_cfg.root
    counts = dict(zip(make_shapes.SPLITS, _plain(data_cfg.num_shapes)))
    if jax.process_index() != 0:
        return
    for split in make_shapes.SPLITS:
        want = int(counts.get(split) or 0)
        have = len(glob.glob(os.path.join(root, split, "*.jpg")))
        if have < want:
            log.info("writing the generated shapes set: %s/%s (%d images, %d there)", root, split, want, have)
            make_shapes.write_split(root, split, want, int(data_cfg.get("shapes_seed", 0)))


def build_train_iter(config, cfg: ReadConfig, *, shard_options=None):
    """The training grain iterator of `config.data` (per host)."""
    from read_jax.data import mixture as M
    from read_jax.data import pipeline as Pl

    d = config.data
    ensure_shapes_data(d)
    dc = data_config_from(d, cfg)
    side = int(config.train.get("mask_side") or 0)
    if side:  # a coarser GT canvas for training only (validation keeps data.max_mask_side)
        dc = dataclasses.replace(dc, max_mask_side=side)
    rates = parse_rates(str(d.rates))
    names = tuple(rates) if isinstance(rates, Mapping) else tuple(M.RATE_PRESETS[rates])
    fp = float(d.get("reason_seg_false_premise", -1.0))
    sources = M.build_reference_sources(
        d.root,
        names,
        max_convs=dc.max_convs,
        seed=dc.seed,
        reason_seg_dir=_root_path(d.reason_seg_dir, d.root) or None,
        reason_seg_false_premise=None if fp < 0 else fp,
    )
    mixture = M.Mixture(sources, rates, seed=dc.seed)
    ds = Pl.train_dataset(mixture, dc, cfg.sam, d.tokenizer, shard_options=shard_options)
    return iter(ds), dc


def build_eval_reader(config, split: str | None = None):
    """The eval-mode reader of `config.eval.dataset` ('reasonseg', or a refer set such as 'refcoco') and split."""
    from read_jax.data import readers as R

    d = config.data
    split = split or config.eval.split
    dataset = config.eval.get("dataset") or "reasonseg"
    if dataset == "reasonseg":
        root = _root_path(d.reason_seg_dir, d.root) or os.path.join(d.root, "reason_seg", "ReasonSeg")
        return R.ReasonSegReader(root, split, mode="eval", seed=d.seed)
    root = os.path.join(d.root, "refer_seg") if os.path.isdir(os.path.join(d.root, "refer_seg")) else d.root
    return R.ReferReader(root, dataset, split, mode="eval", seed=d.seed)


def build_eval_iter(config, cfg: ReadConfig, split: str | None = None, *, shard_options=None):
    """An eval grain iterator over the ReasonSeg-format `split` (teacher-forced protocol, one query per row)."""
    from read_jax.data import pipeline as Pl

    reader = build_eval_reader(config, split)
    dc = dataclasses.replace(
        data_config_from(config.data, cfg), batch_size=int(config.eval.batch_size), max_convs=1
    )
    return iter(Pl.eval_dataset(reader, dc, cfg.sam, config.data.tokenizer, shard_options=shard_options)), dc


def batch_spec(dc, sam_cfg, length: int, accum: int = 1, num_hosts: int = 1) -> dict:
    """Abstract device batch ([k, B_global, ...] ShapeDtypeStructs) of the pipeline layout, without any data.

    The layout is read off the pipeline's own collate of an empty batch (all padding), so it cannot drift from
    `read_jax.data.pipeline`; the text length is set to `length`. Used to compile (or only lower) the step
    before any data is read, e.g. for the 7B memory report.
    """
    from read_jax.data.pipeline import Collate

    empty = Collate(dc, sam_cfg)([])
    out = {}
    for n, x in empty.items():
        if n in HOST_KEYS:
            continue
        shape = list(x.shape)
        if n in ("input_ids", "labels", "attention_mask"):
            shape[1] = length
        shape[0] *= num_hosts
        out[n] = jax.ShapeDtypeStruct((accum, *shape), x.dtype)
    return out


def pad_length(batch: dict, length: int) -> dict:
    """Right-pad the [R, L] text leaves of a host batch to `length` (ids 0, mask False, labels IGNORE)."""
    cur = batch["input_ids"].shape[1]
    if cur == length:
        return batch
    out = dict(batch)
    fill = {"input_ids": 0, "attention_mask": False, "labels": IGNORE_INDEX}
    for k, v in fill.items():
        if k in batch:
            out[k] = np.pad(batch[k], ((0, 0), (0, length - cur)), constant_values=v)
    return out


def stack_micro_batches(batches: Sequence[dict]) -> tuple[dict, dict]:
    """k host batches -> (device-ready dict of [k, ...] leaves, host bookkeeping of the same batches)."""
    length = max(b["input_ids"].shape[1] for b in batches)
    batches = [pad_length(b, length) for b in batches]
    dev = {k: np.stack([b[k] for b in batches]) for k in batches[0] if k not in HOST_KEYS}
    host = {k: np.stack([b[k] for b in batches]) for k in HOST_KEYS if k in batches[0]}
    return dev, host


def next_step_batch(it: Iterator, k: int) -> tuple[dict, dict]:
    return stack_micro_batches([next(it) for _ in range(k)])


def put_batch(dev: dict, mesh) -> dict:
    """Host [k, N, ...] arrays -> global arrays split on axis 1 (multi-host: each host passes its share)."""
    return shd.shard_batch(dev, mesh, batch_axis=1)


# =====================================================================================================
# Validation: the teacher-forced ReasonSeg protocol of `read_jax.evaluation` (read_reference.md §8.1-8.2)
# =====================================================================================================
def validate(
    model, config, cfg: ReadConfig, mesh, *, split: str | None = None, progress: bool = False
) -> dict:
    """gIoU / cIoU of `model` on `config.eval.split` (ReasonSeg layout), as `evaluate.py` computes them.

    `config.eval.max_batches` (> 0) evaluates only the first batches (a quick look during training).
    """
    import itertools

    from read_jax import evaluation as E

    it, _ = build_eval_iter(config, cfg, split)
    n = int(config.eval.get("max_batches") or 0)
    if n:
        it = itertools.islice(it, n)
    summary, _ = E.evaluate_reasonseg(model, it, mesh=mesh, progress=progress, desc="val")
    return {k: float(summary[k]) for k in ("gIoU", "cIoU", "num_queries", "wall_s") if k in summary}


# =====================================================================================================
# Checkpoints (orbax): trainables + optimizer state + step + data-iterator state; the base by reference
# =====================================================================================================
def _pure(state) -> dict:
    return nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state


class RunCheckpoints:
    """`workdir/checkpoints` (latest, keep-N, for resume) and `workdir/best` (best-by-metric, kept separately).

    Each checkpoint holds `trainable` (pure dict of arrays), `opt_state`, `data` (the grain iterator state of every
    host) and `meta` (json: step, the frozen base's reference and content hash, metrics). The frozen base itself
    is never saved: it is rebuilt from `meta['base']` (a converted checkpoint path, or the scratch-init seed).
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
        import orbax.checkpoint as ocp

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
        import grain
        import orbax.checkpoint as ocp

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
        return bool(
            self.best.save(
                step, args=self._args(trainable, None, None, {**meta, "step": step, "metrics": m}), metrics=m
            )
        )

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def restore(self, step: int, trainable_target, opt_target, data_iter, manager: str = "latest"):
        """(trainable pure dict, opt_state, meta); `data_iter` is restored in place (if given)."""
        import grain
        import orbax.checkpoint as ocp

        mgr = self.latest if manager == "latest" else self.best
        items = {"trainable": ocp.args.StandardRestore(trainable_target), "meta": ocp.args.JsonRestore()}
        if opt_target is not None:
            items["opt_state"] = ocp.args.StandardRestore(opt_target)
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        out = mgr.restore(step, args=ocp.args.Composite(**items))
        return out["trainable"], out.get("opt_state") if opt_target is not None else None, out["meta"]

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def base_reference(config, cfg: ReadConfig) -> dict:
    """How to rebuild the frozen base: the converted checkpoint path and its manifest hash, or the scratch seed."""
    path = config.init.get("checkpoint") or ""
    if path:
        from read_jax.checkpoint import params_dir

        manifest = params_dir(path) / "manifest.json"
        digest = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
        return {"kind": "converted", "path": str(Path(path).absolute()), "manifest_sha256": digest}
    # What determines the frozen weights: the architecture and the trainable split, not SasP, max_segs or where
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


def _abstract_target(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _load_into(state_abstract, pure: dict, shardings):
    """A pure dict restored by orbax -> nnx.State with the structure of `state_abstract`."""
    st = jax.tree.map(lambda x: x, state_abstract)
    nnx.replace_by_pure_dict(st, pure)
    return jax.tree.map(lambda x, s: jax.device_put(x, s), st, shardings)


def load_trained(config, workdir: str | os.PathLike, *, which: str = "best", mesh=None):
    """The trained model of a run directory, for evaluation: base (converted or scratch) + saved trainables.

    Args:
      config: the run's config (ConfigDict).
      workdir: `train.py --workdir`.
      which: 'best' (best-by-cIoU, falling back to the latest), 'latest', or 'init' (no checkpoint is read: the
        config's frozen base with freshly initialised trainables, the untrained baseline).
    Returns:
      (nnx model, ReadConfig, meta dict of the restored checkpoint).
    Raises:
      FileNotFoundError without a checkpoint; ConfigError when the config's frozen base (converted checkpoint and
      its manifest hash, or scratch seed and architecture) is not the one the run was trained on.
    """
    cfg = read_config_from(config.model)
    mesh = mesh or shd.make_mesh(int(config.mesh.data), int(config.mesh.fsdp))
    strategy = _plain(config.mesh.strategy)
    setup = setup_model(
        cfg,
        mesh,
        strategy=strategy,
        seed=int(config.init.seed),
        trainable_dtype=config.train.get("trainable_dtype") or None,
    )
    if which not in ("best", "latest", "init"):
        raise ValueError(f"which must be 'best', 'latest' or 'init', got {which!r}")
    base = base_reference(config, cfg)
    if which == "init":  # the untrained starting point of the run: a baseline
        tr, fr = init_params(setup, config.init.get("checkpoint") or None, strategy)
        return nnx.merge(setup.graphdef, tr, fr), cfg, {"step": 0, "base": base}
    ck = RunCheckpoints(workdir, async_save=False)
    try:
        mgr = ck.best if which == "best" and ck.best.latest_step() is not None else ck.latest
        step = mgr.latest_step()
        if step is None:
            raise FileNotFoundError(f"{workdir}: no checkpoint to load")
        target = _abstract_target(_pure(setup.trainable_abstract), _pure(setup.trainable_shardings))
        pure, _, meta = ck.restore(step, target, None, None, manager="best" if mgr is ck.best else "latest")
    finally:
        ck.close()
    if meta.get("base") is not None and meta["base"] != base:
        raise ConfigError(
            f"{workdir} was trained on the frozen base {meta['base']}, but the config now gives {base}: "
            f"evaluate with the run's own config (init.checkpoint / init.seed / model)"
        )
    _, fr = init_params(setup, config.init.get("checkpoint") or None, strategy)
    tr = _load_into(setup.trainable_abstract, pure, setup.trainable_shardings)
    return nnx.merge(setup.graphdef, tr, fr), cfg, meta


# =====================================================================================================
# Metric writers
# =====================================================================================================
class MetricWriter:
    """metrics.jsonl + TensorBoard event files (tensorboardX), only on process 0."""

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
        self.enabled = enabled and jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self.tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(Path(workdir) / "tb"))
            except ImportError:  # pragma: no cover - tensorboardX is a dependency
                log.warning("tensorboardX is not installed: no TensorBoard files")

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
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{split}/{k}", float(v), int(step))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# =====================================================================================================
# The run
# =====================================================================================================
def _validate(config, cfg: ReadConfig, dc, mesh, accum: int) -> None:
    """Errors a run would otherwise hit after minutes of compiling."""
    n_data = mesh.shape["data"] * mesh.shape["fsdp"]
    global_b = dc.batch_size * jax.process_count()
    if global_b % n_data:
        raise ConfigError(
            f"global batch of {global_b} images is not divisible by the {n_data} data-parallel "
            f"devices (data.batch_size x hosts must be a multiple of mesh data x fsdp)"
        )
    if accum < 1:
        raise ConfigError("train.grad_accum must be >= 1")
    longest = max(dc.length_buckets) + cfg.clip.num_patches - 1
    if longest > cfg.llama.max_position_embeddings:
        raise ConfigError(
            f"the largest length bucket {max(dc.length_buckets)} + {cfg.clip.num_patches - 1} image "
            f"tokens exceeds max_position_embeddings={cfg.llama.max_position_embeddings}"
        )
    if dc.max_mask_side < 1:
        raise ConfigError("data.max_mask_side must be >= 1")


def _host_scalars(metrics: Mapping[str, Array]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}


def train_and_evaluate(config, workdir: str | os.PathLike) -> dict:
    """Train READ as `config` says, checkpointing and validating in `workdir`; resumes automatically.

    Resume order (house style §14): an existing run in `workdir` -> `init.trainables_from` (another run's saved
    trainables, e.g. a previous stage) -> `init.checkpoint` (a converted base) -> scratch.

    Returns a summary dict (final step, last metrics, best validation figures, timings).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    tc = config.train
    accum = int(tc.grad_accum)

    # ---- mesh ------------------------------------------------------------------------------------------------
    mesh = shd.make_mesh(int(config.mesh.data), int(config.mesh.fsdp))
    strategy = _plain(config.mesh.strategy)

    # ---- data ------------------------------------------------------------------------------------------------
    cfg = read_config_from(config.model)
    train_it, dc = build_train_iter(config, cfg)
    _validate(config, cfg, dc, mesh, accum)
    canvas = (dc.max_mask_side, dc.max_mask_side)

    # ---- model -----------------------------------------------------------------------------------------------
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
    total_steps = total_steps_of(tc)
    tx = make_optimizer(tc)
    schedule = schedule_of(tc, total_steps)
    opt_sh, opt_abs = opt_state_shardings(tx, setup.trainable_abstract, setup.trainable_shardings, mesh)

    # ---- step ------------------------------------------------------------------------------------------------
    sc = StepConfig(
        canvas_hw=canvas,
        weights=loss_weights_from(tc),
        ce_max_tokens=int(tc.ce_max_tokens),
        dropout=bool(tc.lora_dropout),
        seed=int(tc.seed),
    )
    ckpts = RunCheckpoints(
        workdir,
        keep=int(config.checkpoint.keep),
        async_save=bool(config.checkpoint.async_save),
        best_metric=str(config.checkpoint.best_metric),
    )
    # The data state is restored before the first batch is drawn, so restore comes first, then the batch shapes.
    base = base_reference(config, cfg)
    start = ckpts.latest_step()
    if start is not None:
        # ---- restore (existing run) -----------------------------------------------------------------------
        meta_base = None
        tr, fr = init_params(setup, config.init.get("checkpoint") or None, strategy)
        target = _abstract_target(_pure(setup.trainable_abstract), _pure(setup.trainable_shardings))
        pure, opt_state, meta = ckpts.restore(start, target, _abstract_target(opt_abs, opt_sh), train_it)
        meta_base = meta.get("base")
        if meta_base is not None and meta_base != base:
            raise ConfigError(
                f"{workdir}: the run was trained on base {meta_base}, the config now gives {base}"
            )
        tr = _load_into(setup.trainable_abstract, pure, setup.trainable_shardings)
        log.info("resumed %s at step %d", workdir, start)
    else:
        start = 0
        tr, fr = init_params(setup, config.init.get("checkpoint") or None, strategy)
        src = config.init.get("trainables_from") or ""
        if src:
            other = RunCheckpoints(src, async_save=False)
            try:
                mgr = other.best if other.best.latest_step() is not None else other.latest
                s = mgr.latest_step()
                if s is None:
                    raise FileNotFoundError(f"init.trainables_from={src}: no checkpoint there")
                target = _abstract_target(_pure(setup.trainable_abstract), _pure(setup.trainable_shardings))
                pure, _, _ = other.restore(
                    s, target, None, None, manager="best" if mgr is other.best else "latest"
                )
            finally:
                other.close()
            tr = _load_into(setup.trainable_abstract, pure, setup.trainable_shardings)
            log.info("trainables initialised from %s (step %d)", src, s)
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(tr)

    # One compile per length bucket, all before the loop and before any data is read (a single bucket: exactly
    # one compile). Shapes come from the pipeline's own collate (`batch_spec`).
    specs = {n: batch_spec(dc, cfg.sam, n, accum, jax.process_count()) for n in dc.length_buckets}
    b_sh = micro_batch_shardings(specs[dc.length_buckets[0]], mesh)
    jitted = jit_train_step(setup, tx, sc, opt_sh, b_sh)
    compiled, compile_stats = {}, {}
    with shd.use_mesh(mesh):
        for length, spec in specs.items():
            compiled[length], stats = compile_step(
                jitted,
                setup,
                opt_abs,
                opt_sh,
                spec,
                b_sh,
                compiler_options=fast_compile_options() if tc.get("fast_compile") else None,
            )
            compile_stats[length] = stats
            log.info(
                "compiled the train step for L=%d in %.1fs; per-device memory %s",
                length,
                stats["compile_s"],
                {k: v for k, v in stats.items() if k.endswith("bytes")},
            )

    # ---- evals -----------------------------------------------------------------------------------------------
    writer = MetricWriter(workdir)
    meta = {
        "base": base,
        "config": json.loads(config.to_json_best_effort())
        if hasattr(config, "to_json_best_effort")
        else None,
    }

    def run_eval(step: int) -> dict:
        res = validate(
            nnx.merge(setup.graphdef, tr, fr),
            config,
            cfg,
            mesh,
            progress=bool(config.get("progress", True)) and jax.process_index() == 0,
        )
        writer.write(step, "val", res)
        log.info("step %d validation: %s", step, res)
        return res

    # ---- loop ------------------------------------------------------------------------------------------------
    steps_per_epoch = int(tc.steps_per_epoch)
    ckpt_every = int(config.checkpoint.every_steps) or steps_per_epoch
    log_every = int(tc.log_every)
    bar = None
    if config.get("progress", True) and jax.process_index() == 0:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    window: list[dict] = []
    last_val: dict = {}
    t_window, n_examples = time.perf_counter(), 0
    pending = None  # (step, metrics on device, host ids): checked one step late to keep dispatch async
    summary: dict = {"start_step": start, "compile": compile_stats}

    def check(p) -> dict:
        step_p, m, ids = p
        m = _host_scalars(m)
        if not m["finite"]:
            raise NonFiniteLossError(step_p, m, {k: np.asarray(v).tolist() for k, v in ids.items()})
        return m

    step = start
    try:
        with shd.use_mesh(mesh):
            while step < total_steps:
                dev, host = next_step_batch(train_it, accum)
                length = dev["input_ids"].shape[2]
                spec = specs.get(length)
                if spec is None or {k: (v.shape, v.dtype) for k, v in dev.items()} != {
                    k: (v.shape[:1] + (v.shape[1] // jax.process_count(),) + v.shape[2:], v.dtype)
                    for k, v in spec.items()
                }:
                    raise ConfigError(
                        f"a training batch does not match the compiled layout: "
                        f"{ {k: v.shape for k, v in dev.items()} }"
                    )
                lr = schedule(step)
                tr, opt_state, m = compiled[length](
                    tr,
                    fr,
                    opt_state,
                    put_batch(dev, mesh),
                    jnp.asarray(step, jnp.int32),
                    jnp.asarray(lr, jnp.float32),
                )
                if pending is not None:
                    window.append(check(pending))
                pending = (step, m, {k: host[k] for k in ("example_index", "sample_id") if k in host})
                n_examples += int(np.prod(dev["images_clip"].shape[:2])) * jax.process_count()
                step += 1
                done_epoch = step % steps_per_epoch == 0 or step == total_steps
                if step % log_every == 0 or done_epoch or step % ckpt_every == 0:
                    window.append(check(pending))
                    pending = None
                if window and (step % log_every == 0 or done_epoch):
                    dt = time.perf_counter() - t_window
                    avg = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                    avg.update(
                        steps_per_s=len(window) / dt,
                        examples_per_s=n_examples / dt,
                        lr=float(schedule(step - 1)),
                    )
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
                if step % ckpt_every == 0 or step == total_steps:
                    ckpts.save(step, tr, opt_state, train_it, meta)
                if done_epoch and config.eval.get("every_epochs", 1):
                    epoch = math.ceil(step / steps_per_epoch)
                    if epoch % int(config.eval.every_epochs) == 0 or step == total_steps:
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
        (workdir / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    return summary
