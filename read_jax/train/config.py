"""The run config: the defaults every `configs/*.py` starts from, their validation, and -> ReadConfig.

A run config is an ml_collections `ConfigDict` with sections `model` (-> `read_config`), `init` (scratch seed,
converted base `checkpoint`, another run's `trainables_from`, the SAM stage's `sam`), `data`
(`read_jax.data.loaders`), `train` (optimizer, schedule, losses, accumulation), `mesh`, `checkpoint`, `eval`,
and `progress`. Model sizes are named by `model.preset` (a `ReadConfig` factory), never repeated in a config
file; a key that the defaults do not have is an error naming it (`validate`).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os

from ml_collections import ConfigDict

from read_jax.config import (
    READ_TRAINABLE_REGEXES,
    ClipVisionConfig,
    ConfigError,
    LlamaConfig,
    LoraConfig,
    ReadConfig,
    SamConfig,
    SaspConfig,
)
from read_jax.data.loaders import data_config, plain
from read_jax.losses import LossWeights

# `model.preset`: the ReadConfig factory that gives the sizes.
PRESETS = {
    "tiny": ReadConfig.tiny,
    "smoke": ReadConfig.smoke,
    "shapes": ReadConfig.shapes,
    "read_7b": ReadConfig.read_7b,
    "read_13b": ReadConfig.read_13b,
}
_COMPONENTS = {"llama": LlamaConfig, "clip": ClipVisionConfig, "sam": SamConfig, "sasp": SaspConfig}
# `model` keys that are not ReadConfig fields.
_MODEL_KEYS = ("preset", "dtype", "param_dtype", "remat", "lora")


def default_config() -> ConfigDict:
    """READ-7B's recipe (read_reference.md §6) as the run config every `configs/*.py` starts from."""
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
    # sam: the SAM stage's export (`python -m read_jax.cli.pretrain_sam`, RUN/sam): the visual_model's start.
    # clip: the vision stage's export (`python -m read_jax.cli.pretrain_vision`, RUN/clip): the tower's.
    # llava: the LLaVA stage (a train.py workdir or converted checkpoint): the llava/... leaves' start.
    c.init = ConfigDict(
        {"seed": 0, "checkpoint": "", "trainables_from": "", "sam": "", "clip": "", "llava": ""}
    )
    c.data = ConfigDict(
        {
            "root": "dataset",
            "reason_seg_dir": "{root}/reason_seg/ReasonSeg",
            "tokenizer": "",
            "rates": "read_7b",
            "batch_size": 2,
            "max_convs": 3,
            "length_buckets": (512, 1024, 1793),
            # Training's static GT canvas side (evaluation scores at native resolution: eval.max_mask_side).
            "max_mask_side": 1024,
            "seed": 0,
            "num_workers": 0,
            # SAM's resize of images that fit its frame on the device ("auto": accelerators, not a CPU).
            "sam_device_resize": "auto",
            "template": "llava_v1",
            # The sub-datasets of each source, as the reference's flags ("a||b", train_read.py:55-74); the
            # generated shapes mix writes sem_seg as "mapillary||paco_lvis".
            "sem_seg_data": "ade20k||cocostuff||pascal_part||paco_lvis||mapillary",
            "refer_seg_data": "refclef||refcoco||refcoco+||refcocog",
            "neg_refer_seg_data": "R-refcoco||R-refcoco+||R-refcocog",
            "correct_refer_seg_data": "fprefcoco||fprefcoco+||fprefcocog",
            # The generated shapes mix (`read_jax.data.make_shapes`) of the sources in `rates`: written to
            # `root` if absent, (train scenes per source, val, test).
            "make_shapes": False,
            "num_shapes": (2000, 200, 200),
            # "SOURCE:N[,SOURCE:N]": another training count for the sources it names ("reason_seg:10000").
            "num_train_of": "",
            # The share of ReasonSeg samples drawn as false-premise corrections; -1: SESAME's 0.15.
            "reason_seg_false_premise": -1.0,
            # The reference's template lists (path to READ's `dataloaders/qa_template.py`, read as data) for
            # training, RefCOCO and FP-RefCOCO; "": our own wording (released checkpoints never saw it).
            "templates": "",
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
            # Not READ's: a similarity-map loss (`losses.similarity_loss`; the tiny SESAME stage); 0 = off.
            "sim_weight": 0.0,
            # Not READ's either: that term on SasP's min-max normalised map (`losses.peak_loss`).
            "peak_weight": 0.0,
            "peak_beta": 10.0,
            # > 0: the text CE on at most this many supervised positions per micro-batch (no full logits).
            "ce_max_tokens": 0,
            # Dropout while training (LoRA's is the only dropout of the model); False: deterministic steps.
            "dropout": True,
            "seed": 42,
            "log_every": 10,
            "trainable_dtype": "float32",
            "fast_compile": False,  # compile for compile speed (tests, smoke runs)
            # > 0: a coarser GT canvas for training only (validation keeps data.max_mask_side)
            "mask_side": 0,
        }
    )
    c.mesh = ConfigDict({"data": -1, "fsdp": 1, "strategy": ((r".*", "fsdp"),), "distributed": False})
    c.checkpoint = ConfigDict({"every_steps": 0, "keep": 2, "async_save": True, "best_metric": "cIoU"})
    c.eval = ConfigDict(
        {
            "dataset": "reasonseg",
            "split": "val",
            "batch_size": 1,
            "every_epochs": 1,
            "max_batches": 0,
            # 0: every image scored at its original size (the protocol); > 0: cap the GT canvas side (the
            # summary records it; the figures are then not the protocol's).
            "max_mask_side": 0,
            # The SasP setting evaluate.py scores with: "" the model's, or a preset ("read_13b_eval":
            # READ-13B's 60 points / 0.6 on the 24x24 grid, which it is evaluated with, not trained with).
            "sasp": "",
        }
    )
    c.progress = True
    return c


def _unknown(name: str, keys, known) -> ConfigError:
    bad = sorted(set(keys) - set(known))
    hints = [
        f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, known, 1)) else repr(k)
        for k in bad
    ]
    return ConfigError(f"{name} has unknown keys: {', '.join(hints)}")


def validate(config) -> None:
    """Every key of `config` must exist in `default_config()` (the `model` and `data` sections are checked
    against the dataclasses they become). Raises ConfigError naming the first section with unknown keys."""
    ref = default_config()
    if set(config.keys()) - set(ref.keys()):
        raise _unknown("the run config", config.keys(), ref.keys())
    for section in ("init", "train", "mesh", "checkpoint", "eval"):
        keys = config[section].keys() if section in config else ()
        if set(keys) - set(ref[section].keys()):
            raise _unknown(f"config.{section}", keys, ref[section].keys())
    cfg = read_config(config.model)
    data_config(config.data, cfg)


def read_config(model_cfg) -> ReadConfig:
    """A ReadConfig from the `config.model` section.

    Fields: `preset` (a `PRESETS` name), `dtype` / `param_dtype` (every component), optional component
    overrides `llama`, `clip`, `sam`, `sasp` (dicts of dataclass fields), `lora` (a dict of LoraConfig fields,
    or
    None for no LoRA), `remat` (LLaMA decoder layers), and any other `ReadConfig` field (`max_segs`,
    `trainable_regexes`, `freeze_vision_towers`, ...). An unknown field raises ConfigError.
    """
    m = plain(model_cfg)
    preset = m.get("preset", "tiny")
    if preset not in PRESETS:
        raise ConfigError(f"unknown model preset {preset!r}; known: {sorted(PRESETS)}")
    top = {f.name for f in dataclasses.fields(ReadConfig)} - set(_COMPONENTS) - {"lora"}
    known = top | set(_COMPONENTS) | set(_MODEL_KEYS)
    if set(m) - known:
        raise _unknown("config.model", m, known)
    cfg = PRESETS[preset]()
    if m.get("dtype"):
        cfg = cfg.with_dtype(m["dtype"], m.get("param_dtype") or None)
    kw = {}
    for name, cls in _COMPONENTS.items():
        over = m.get(name) or {}
        fields = {f.name for f in dataclasses.fields(cls)}
        if set(over) - fields:
            raise _unknown(f"config.model.{name}", over, fields)
        if over:
            kw[name] = dataclasses.replace(getattr(cfg, name), **over)
    if "remat" in m:
        kw["llama"] = dataclasses.replace(kw.get("llama", cfg.llama), remat=bool(m["remat"]))
    if "lora" in m:
        kw["lora"] = None if m["lora"] is None else dataclasses.replace(cfg.lora or LoraConfig(), **m["lora"])
    kw.update({k: m[k] for k in top & set(m) if m[k] is not None})
    if "sam" in kw and "out_dim" not in kw:
        kw["out_dim"] = kw["sam"].prompt_embed_dim
    return cfg.replace(**kw)


def loss_weights(train_cfg) -> LossWeights:
    return LossWeights(
        ce=float(train_cfg.ce_weight),
        bce=float(train_cfg.bce_weight),
        dice=float(train_cfg.dice_weight),
        sim=float(train_cfg.get("sim_weight", 0.0)),
        peak=float(train_cfg.get("peak_weight", 0.0)),
        peak_beta=float(train_cfg.get("peak_beta", 10.0)),
    )


def total_steps(train_cfg) -> int:
    """Optimizer steps of the run: `train.total_steps` if set, else epochs x steps_per_epoch."""
    n = int(train_cfg.get("total_steps") or 0) or int(train_cfg.epochs) * int(train_cfg.steps_per_epoch)
    if n < 1:
        raise ConfigError("the run has no optimizer steps (train.epochs * train.steps_per_epoch < 1)")
    return n


def load_config_file(spec: str) -> ConfigDict:
    """`path/to/config.py[:arg]` -> its `get_config(arg)` (arg None when absent), imported by path."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    name = "read_jax_run_config_" + os.path.splitext(os.path.basename(path))[0]
    spec_ = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config()")
    return module.get_config(arg or None)
