"""One builder and one loader of the READ model, used by training, evaluation, chat, conversion and tests.

    model = build_model(ReadConfig.tiny())                 # random init, LoRA attached where cfg.lora says
    model = load_model("ckpt/read7b")                      # a converted checkpoint (convert_weights.py)
    model = load_model("runs/tiny", run_config=config)     # a train.py workdir: its base + trained trainables

`model_fn(cfg)` is the zero-argument builder that abstract builds (`nnx.eval_shape`), sharded inits and the
checkpoint restorer trace; every model in the project comes out of it, so LoRA is present wherever the config
has
it (its factors start at B = 0: a model with fresh LoRA computes exactly what the model without it does).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from flax import nnx

from read_jax import checkpoint as ck
from read_jax.config import ReadConfig
from read_jax.lora import apply_lora
from read_jax.read_model import ReadModel


def model_fn(cfg: ReadConfig, seed: int = 0) -> Callable[[], ReadModel]:
    """A zero-argument builder of the READ model of `cfg`, LoRA attached if `cfg.lora` (params seed `seed`,
    LoRA factors seed `seed + 1`)."""

    def build() -> ReadModel:
        model = ReadModel(cfg, rngs=nnx.Rngs(params=seed))
        if cfg.lora is not None:
            apply_lora(model, cfg.lora, rngs=nnx.Rngs(params=seed + 1))
        return model

    return build


def build_model(cfg: ReadConfig, *, seed: int = 0) -> ReadModel:
    """The READ model of `cfg`, randomly initialised (eagerly; use `model_fn` under `nnx.eval_shape`/jit)."""
    return model_fn(cfg, seed)()


def is_converted_checkpoint(path: str | os.PathLike) -> bool:
    """A `convert_weights.py` / `save_for_inference` directory (config.json + params/manifest.json)."""
    p = Path(path)
    return (p / ck.CONFIG).is_file() and (p / ck.PARAMS_DIR / ck.MANIFEST).is_file()


def tokenizer_dir(path: str | os.PathLike) -> str | None:
    """The tokenizer stored with a converted checkpoint, or None."""
    tok = Path(path) / ck.TOKENIZER_DIR
    return str(tok) if tok.is_dir() else None


def is_run_dir(path: str | os.PathLike) -> bool:
    """A `train.py --workdir` with checkpoints (not a converted checkpoint)."""
    path = Path(path)
    return not is_converted_checkpoint(path) and (path / "checkpoints").is_dir()


def load_model(
    path: str | os.PathLike,
    *,
    mesh=None,
    dtype: str | None = None,
    strategy=None,
    run_config=None,
    which: str = "best",
) -> ReadModel:
    """The READ model stored at `path`, every leaf restored straight into its sharding on `mesh`.

    Args:
      path: a converted checkpoint (config.json + params/), or a `train.py --workdir`.
      mesh: default: every device on the `fsdp` axis.
      dtype: another compute/parameter dtype than the stored config's (converted checkpoints only).
      strategy: `read_jax.sharding` parameter rules (default FSDP on everything large).
      run_config: the run config of a workdir (its frozen base and architecture); default: the one the run
        saved with its checkpoints.
      which: for a workdir, 'best' (by the run's best metric, else the latest), 'latest', or 'init' (the run's
        untrained starting point: a baseline).
    Raises:
      FileNotFoundError: `path` is neither kind. CheckpointError: the stored leaves do not fit the model.
    """
    path = Path(path).absolute()
    if is_converted_checkpoint(path):
        cfg = ck.load_config(path)
        if dtype is not None:
            cfg = cfg.with_dtype(dtype)
        return ck.restore_model(path, model_fn(cfg), mesh=mesh, strategy=strategy)
    if path.is_dir() and (run_config is not None or (path / "checkpoints").is_dir()):
        from read_jax.train.checkpoints import load_trained, saved_run_config

        if run_config is None:  # the config the run saved with its checkpoints
            run_config = saved_run_config(path)
        model, _ = load_trained(run_config, path, which=which, mesh=mesh)
        return model
    what = "a train.py workdir (no checkpoints/ in it)" if path.is_dir() else "a directory"
    raise FileNotFoundError(
        f"{path} is not a converted read_jax checkpoint (config.json + params/), nor {what}"
    )
