"""What a training run holds: the abstract model split into trainable and frozen states, their shardings, the
sharded init (from scratch or from a converted base), and the optimizer with its schedule.

The recipe (read_reference.md §6.2): AdamW (beta 0.9/0.95, weight decay 0, eps 1e-8), linear warmup 0 -> lr
over
100 optimizer steps then linear decay to 0 at the last step, global-norm clipping 1.0; only the trainables
(`ReadConfig.trainable_regexes`: LoRA, embed_tokens, lm_head, mask decoder, text_hidden_fcs) see the
optimizer.
Trainables and optimizer state are fp32 while the model computes in its config dtype; the frozen base stays in
its parameter dtype and is never donated or re-saved.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from read_jax import build
from read_jax import sharding as shd
from read_jax.config import ConfigError, ReadConfig
from read_jax.lora import count_params, trainable_filter
from read_jax.tree_util import abstract_floats_as, floats_as, path_str

# The towers READ runs under no_grad (`ReadConfig.freeze_vision_towers`).
VISION_TOWER_PREFIXES = ("llava/vision_tower/", "visual_model/image_encoder/")


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


def check_trainable_regexes(abstract_model, cfg: ReadConfig) -> dict[str, int]:
    """Parameters matched per trainable regex; raises ConfigError on a regex that matches nothing.

    The LoRA regex is exempt when the model has no LoRA (`cfg.lora is None`).
    """
    paths = [path_str(p) for p, v in nnx.to_flat_state(nnx.state(abstract_model, nnx.Param))]
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
                f"{len(towers)} parameters of frozen vision towers (e.g. {towers[0]}) are marked trainable; "
                "they would get no gradient. Set model.freeze_vision_towers=False to train them, or drop "
                "them from "
                "trainable_regexes"
            )
    return counts


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
      trainable_dtype: storage dtype of the trainables (and so of the optimizer state); None keeps the
        config's.
    """
    model_fn = build.model_fn(cfg, seed)
    abstract = nnx.eval_shape(model_fn)
    counts = check_trainable_regexes(abstract, cfg)
    graphdef, tr, fr = nnx.split(abstract, trainable_filter(cfg.trainable_regexes), ...)
    if trainable_dtype:
        tr = abstract_floats_as(tr, trainable_dtype)
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
    """XLA options that trade run time for compile time, for code that runs once (init) or a few times
    (tests).

    On CPU the from-scratch init is hundreds of small random-number kernels: at the default optimisation level
    compiling them takes ~3x longer than at level 0, and they run once.
    """
    if jax.default_backend() != "cpu":
        return {}
    return {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def init_params(
    setup: ModelSetup,
    base_checkpoint: str | None = None,
    strategy=shd.DEFAULT_STRATEGY,
    *,
    sam_checkpoint: str | None = None,
    clip_checkpoint: str | None = None,
    llava_checkpoint: str | None = None,
):
    """(trainable, frozen) states, sharded, from scratch or from a converted checkpoint.

    From scratch the whole model is initialised under one jit whose outputs are already sharded (the 7B model
    is
    never materialised on one device). From `base_checkpoint` (a `convert_weights.py` output) every leaf is
    read
    straight into its sharding by `read_jax.build.load_model`; LoRA factors keep their init (B = 0).
    `sam_checkpoint` (the SAM stage's export, `init.sam`) then replaces every `visual_model/...` leaf,
    `clip_checkpoint` (the vision stage's export, `init.clip`) every `llava/vision_tower/...` leaf, and
    `llava_checkpoint` (the LLaVA stage, `init.llava`: a train.py workdir or a converted checkpoint) every
    `llava/...` leaf (CLIP, projector, LLaMA).
    """
    tr, fr = _init_params(setup, base_checkpoint, strategy)
    if sam_checkpoint:
        tr, fr = with_sam_stage(setup, tr, fr, sam_checkpoint)
    if clip_checkpoint:
        tr, fr = with_clip_stage(setup, tr, fr, clip_checkpoint)
    if llava_checkpoint:
        tr, fr = with_llava_stage(setup, tr, fr, llava_checkpoint)
    return tr, fr


def stage_inits(config) -> dict:
    """The keyword arguments of `init_params` for the earlier stages a run config starts from."""
    return {
        "sam_checkpoint": config.init.get("sam") or None,
        "clip_checkpoint": config.init.get("clip") or None,
        "llava_checkpoint": config.init.get("llava") or None,
    }


LLAVA_PREFIX = "llava/"


def check_llava_stage(path: str) -> None:
    """FileNotFoundError, naming the command that makes it, unless `path` holds a LLaVA stage (a train.py
    workdir with checkpoints, or a converted checkpoint)."""
    p = Path(path)
    if not ((p / "checkpoints").is_dir() or (p / "config.json").is_file()):
        what = (
            "no such directory" if not p.is_dir() else "no checkpoints/ (nor a converted config.json) in it"
        )
        raise FileNotFoundError(
            f"init.llava={path}: {what}; it is the LLaVA stage's workdir, made by "
            "`python train.py --config configs/tiny.py:llava --workdir DIR` (scripts/pretrain_tiny.sh)"
        )


def check_trainables_from(path: str) -> None:
    """FileNotFoundError, naming the command that makes it, unless `path` is a train.py workdir holding a
    checkpoint (`init.trainables_from`: e.g. the tiny chain's points stage starts from its SESAME stage)."""
    p = Path(path)
    ckpt_dir = p / "checkpoints"
    steps = [c for c in ckpt_dir.iterdir() if c.name.isdigit()] if ckpt_dir.is_dir() else []
    if not steps:
        what = "no such directory" if not p.is_dir() else "no checkpoint under checkpoints/ in it"
        raise FileNotFoundError(
            f"init.trainables_from={path}: {what}; it is an earlier train.py run's workdir (the tiny "
            "chain's points stage starts from its SESAME stage, made by `python train.py --config "
            "configs/tiny.py:sesame --workdir DIR`; scripts/pretrain_tiny.sh runs the chain)"
        )


def with_llava_stage(setup: ModelSetup, tr, fr, path: str):
    """(trainable, frozen) with their `llava/...` leaves (CLIP, projector, LLaMA) taken from the model at
    `path` (the LLaVA stage's train.py workdir on the config it saved, or a converted checkpoint), cast to
    each state's dtype and placed in its sharding. Errors name a missing stage or a leaf that does not fit."""
    from read_jax.build import load_model

    check_llava_stage(path)
    src = {
        path_str(p): v.get_value()
        for p, v in nnx.to_flat_state(nnx.state(load_model(path)))
        if path_str(p).startswith(LLAVA_PREFIX)
    }
    return _replace_leaves(setup, tr, fr, src, LLAVA_PREFIX, f"init.llava={path}", "LLaVA stage")


def with_clip_stage(setup: ModelSetup, tr, fr, path: str):
    """(trainable, frozen) with their `llava/vision_tower/...` leaves taken from the vision stage's export at
    `path` (`read_jax.pretrain.vision_train`), cast to each state's dtype and placed in its sharding."""
    from read_jax.pretrain.vision_train import PREFIX, load_clip_stage

    src = load_clip_stage(path, setup.cfg.clip)
    return _replace_leaves(setup, tr, fr, src, PREFIX, f"init.clip={path}", "vision stage")


def _replace_leaves(setup: ModelSetup, tr, fr, src: dict, prefix: str, flag: str, stage: str):
    """(trainable, frozen) with every leaf under `prefix` (LoRA factors aside) replaced by `src`'s array of
    the same path, cast and placed in its sharding; a leaf `src` lacks or shapes otherwise is an error."""
    out = []
    for state, shardings in ((tr, setup.trainable_shardings), (fr, setup.frozen_shardings)):
        sh = {
            path_str(p): v.get_value() if isinstance(v, nnx.Variable) else v
            for p, v in nnx.to_flat_state(shardings)
        }
        flat = []
        for p, v in nnx.to_flat_state(state):
            key = path_str(p)
            if key.startswith(prefix) and "/lora_" not in key:
                if key not in src or src[key].shape != v.get_value().shape:
                    got = "missing" if key not in src else f"shape {src[key].shape}"
                    raise ValueError(
                        f"{flag}: {key} is {got} there, {v.get_value().shape} here: the {stage} was "
                        "trained with other model sizes"
                    )
                v = v.replace(jax.device_put(src[key].astype(v.get_value().dtype), sh[key]))
            flat.append((p, v))
        out.append(nnx.from_flat_state(flat))
    return tuple(out)


def with_sam_stage(setup: ModelSetup, tr, fr, path: str):
    """(trainable, frozen) with their `visual_model/...` leaves read from a SAM-stage export, each straight
    into its sharding (in the dtype of the state it belongs to). Errors name a missing or mismatched
    export."""
    from read_jax.pretrain.sam_export import PREFIX, restore_visual_model

    flats = [list(nnx.to_flat_state(s)) for s in (tr, fr)]
    shardings = [
        {path_str(p): v.get_value() if isinstance(v, nnx.Variable) else v for p, v in nnx.to_flat_state(sh)}
        for sh in (setup.trainable_shardings, setup.frozen_shardings)
    ]
    targets, target_sh = {}, {}
    for flat, sh in zip(flats, shardings):
        for p, v in flat:
            key = path_str(p)
            if key.startswith(PREFIX):
                x = v.get_value()
                targets[key] = jax.ShapeDtypeStruct(x.shape, x.dtype)
                target_sh[key] = sh[key]
    values = restore_visual_model(path, setup.cfg.sam, targets, target_sh)
    return tuple(
        nnx.from_flat_state(
            [(p, v.replace(values[k]) if (k := path_str(p)) in values else v) for p, v in flat]
        )
        for flat in flats
    )


def _init_params(setup: ModelSetup, base_checkpoint: str | None, strategy):
    filt = trainable_filter(setup.cfg.trainable_regexes)
    leaves = jax.tree.leaves(setup.trainable_abstract)
    tr_dtype = leaves[0].dtype if leaves else jnp.float32
    if base_checkpoint:
        from read_jax import checkpoint as ck

        model = ck.restore_model(base_checkpoint, setup.model_fn, mesh=setup.mesh, strategy=strategy)
        _, tr, fr = nnx.split(model, filt, ...)
        tr = jax.jit(lambda t: floats_as(t, tr_dtype), out_shardings=setup.trainable_shardings)(tr)
        # The loader shards by the same rules but with its own size threshold: put the frozen leaves where the
        # compiled step expects them (a no-op for every leaf already there).
        return tr, jax.device_put(fr, setup.frozen_shardings)

    def init():
        _, tr, fr = nnx.split(setup.model_fn(), filt, ...)
        return floats_as(tr, tr_dtype), fr

    init_jit = jax.jit(init, out_shardings=(setup.trainable_shardings, setup.frozen_shardings))
    return init_jit.lower().compile(compiler_options=fast_compile_options())()


# ---- optimizer -------------------------------------------------------------------------------------------
def make_schedule(lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """DeepSpeed `WarmupDecayLR` (linear): 0 -> lr over `warmup_steps`, then linearly to 0 at the end."""
    warmup_steps = max(0, min(int(warmup_steps), int(total_steps)))
    decay = optax.linear_schedule(lr, 0.0, max(int(total_steps) - warmup_steps, 1))
    if warmup_steps == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), decay], [warmup_steps])


def make_optimizer(train_cfg) -> optax.GradientTransformation:
    """clip_by_global_norm -> Adam moments -> decoupled weight decay, WITHOUT the learning rate.

    This is `optax.adamw` after clipping, except that the final `-lr` scaling happens in the train step with
    the
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
    """(optimizer-state shardings, abstract optimizer state): moments like their parameter, counters
    replicated."""
    opt_abstract = jax.eval_shape(tx.init, trainable_abstract)
    rep = NamedSharding(mesh, P())
    shardings = optax.tree_utils.tree_map_params(
        tx,
        lambda _, s: s,
        opt_abstract,
        trainable_shardings,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    return shardings, opt_abstract


def state_bytes_per_device(abstract, shardings) -> int:
    """Bytes one device holds of a sharded tree (the largest shard of each leaf)."""
    total = 0
    for a, s in zip(
        jax.tree.leaves(abstract), jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    ):
        total += math.prod(s.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize
    return total
