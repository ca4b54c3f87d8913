"""The vision stage of the tiny pretraining chain (issue 20): READ's CLIP tower trained from scratch on the
shapes world to say what covers each patch of its grid (`read_jax.pretrain.vision_train`).

    python -m read_jax.cli.pretrain_vision --config configs/pretrain_vision.py --workdir runs/vision
    python -m read_jax.cli.pretrain_vision --config configs/pretrain_vision.py:smoke --workdir /tmp/v

The CLIP of `ReadConfig.shapes()` (112-pixel crop, 8 x 8 patches, 4 layers x 128), batches of 64 fresh
scenes, AdamW 2e-3 with linear warmup and decay, 2500 steps. The LLaVA stage starts its (frozen) vision tower
from `RUN/clip` (`--config.init.clip=RUN/clip`, `configs/tiny.py:llava`). Measured figures: README
"The tiny pretraining chain" and docs/tiny_chain.md.
"""

from read_jax.pretrain.vision_train import default_config


def get_config(arg: str | None = None):
    """`arg`: None for the stage, "smoke" for a seconds-sized run of the same pipeline (tests)."""
    if arg not in (None, "", "smoke"):
        raise ValueError(f"configs/pretrain_vision.py: unknown argument {arg!r} (use nothing or 'smoke')")
    c = default_config()
    if arg == "smoke":
        c.model.preset = "smoke"
        c.data.batch_size = 4
        c.train.total_steps = 4
        c.train.warmup_steps = 1
        c.train.log_every = 2
        c.train.fast_compile = True
        c.checkpoint.every_steps = 2
        c.checkpoint.async_save = False
        c.eval.num_scenes = 3
        c.eval.batch_size = 2
        c.mesh.devices = 1
        c.progress = False
    return c
