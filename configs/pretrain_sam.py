"""The SAM stage of the tiny pretraining chain (issue 20): SAM trained from scratch on the shapes world.

    python -m read_jax.cli.pretrain_sam --config configs/pretrain_sam.py --workdir runs/sam
    python -m read_jax.cli.pretrain_sam --config configs/pretrain_sam.py:attributes --workdir runs/sam_attr
    python -m read_jax.cli.pretrain_sam --config configs/pretrain_sam.py:smoke --workdir /tmp/sam  # seconds

The SAM of `ReadConfig.shapes()` (128-px frame, 8-px patches, 16 x 16 embedding, 64 x 64 low-res
masks), all of it trainable (image encoder, prompt encoder, mask decoder), on scenes of
`make_shapes.random_scene` with point and box prompts sampled as SAM was trained
(`read_jax.pretrain.sam_data`), SAM's loss (focal 20 : dice 1 + IoU MSE, `read_jax.pretrain.sam_step`), AdamW
with linear warmup and linear decay. The SESAME stage starts its visual_model from `runs/sam/sam`
(`--config.init.sam=runs/sam/sam`).

Measured (seed 0, commit 013dfb9; README "The SAM stage"): held-out mIoU 0.883 from one interior point, 0.907
from the centroid, 0.901 from the box, 0.894 from SasP-like points (3 in, 6 out), on 913 instances of 200
scenes. Training IoU reaches 0.85 at step 1000 and 0.88 at 1500 (`--config.train.total_steps=1500` saves a
quarter of the time if the chain needs it). 8 images x 8 prompts per step: the decoder's per-prompt cost
dominates the step; the host builds the batches ahead of it (grain, 2 threads: 0.3% of the loop waits).

`:attributes` (append `,smoke` for its seconds-sized run) keeps what objects are in the embedding, for
SESAME's [SEG] prompt (`sam_data`): two attribute prompts per image beside the 8 point / box prompts (one
token naming a colour, a kind or both -> every such instance), and each owned embedding cell's colour and kind
scored against the same codes (`train.attribute_weight`). Measured (seed 0, 2000 steps, 429 s on 2 cores):
held-out mIoU 0.812 from one point, 0.851 centroid, 0.842 box, 0.826 SasP-like, 0.618 from the attribute
prompt naming the instance's colour and kind; held-out cell readout colour 1.00, kind 0.36. The chain
(`scripts/pretrain_tiny.sh`) runs this variant since the second tiny SESAME release (docs/tiny_chain.md).
"""

from read_jax.pretrain.sam_config import default_config


def get_config(arg: str | None = None):
    """`arg`: None for the stage, "attributes" for the stage with attribute prompts and cell attributes;
    ",smoke" (or "smoke" alone) for a seconds-sized run of the same pipeline (tests)."""
    parts = [a for a in (arg or "").split(",") if a]
    if any(a not in ("smoke", "attributes") for a in parts) or len(set(parts)) != len(parts):
        raise ValueError(
            f"configs/pretrain_sam.py: unknown argument {arg!r} (use nothing, 'attributes', 'smoke' or "
            "'attributes,smoke')"
        )
    c = default_config()
    c.model.preset = "shapes"
    c.train.total_steps = 2000
    c.checkpoint.every_steps = 500
    if "attributes" in parts:
        c.data.class_prompts = 2
        c.train.attribute_weight = 1.0
    if "smoke" in parts:
        c.model.preset = "smoke"
        c.data.batch_size = 2
        c.data.point_prompts, c.data.box_prompts = 2, 1
        c.data.class_prompts = min(int(c.data.class_prompts), 1)
        c.data.num_points, c.data.max_pos, c.data.max_neg = 4, 2, 2
        c.train.total_steps = 4
        c.train.warmup_steps = 1
        c.train.log_every = 2
        c.train.fast_compile = True
        c.checkpoint.every_steps = 2
        c.checkpoint.async_save = False
        c.eval.num_scenes = 3
        c.eval.batch_size = 2
        c.eval.sasp_pos, c.eval.sasp_neg = 2, 2
        c.mesh.devices = 1
        c.progress = False
    return c
