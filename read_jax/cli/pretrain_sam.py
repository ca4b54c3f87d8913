"""The SAM stage of the tiny pretraining chain: SAM's image encoder, prompt encoder and mask decoder trained
from scratch on point and box prompts sampled from the shapes' instance masks, as SAM was trained.

    python -m read_jax.cli.pretrain_sam --config configs/pretrain_sam.py --workdir runs/sam
    python -m read_jax.cli.pretrain_sam --config configs/pretrain_sam.py:smoke --workdir /tmp/sam_smoke

Writes `WORKDIR/checkpoints` (orbax, every `checkpoint.every_steps`; rerunning the command resumes from the
latest), `metrics.jsonl` + TensorBoard files, `sam/` (the weights the SESAME stage starts its visual_model
from: `--config.init.sam=WORKDIR/sam`), `eval.json` (held-out mIoU from a point, the centroid, a box and
SasP-like points) and `summary.json`. Override any config field with `--config.<section>.<field>=value`.
Exit status: 0 done, 2 bad input, 3 a non-finite training step.
"""

from __future__ import annotations

import sys

from read_jax.cli import common


def _summary(out: dict) -> str:
    ev = out.get("eval") or {}
    figures = ", ".join(
        f"{k} {v:.3f}" for k, v in ev.items() if k.startswith("mIoU_") and isinstance(v, float)
    )
    return f"; held-out {figures} ({ev['num_instances']} instances)" if ev else ""


def main(argv=None) -> int:
    return common.stage_main(
        "pretrain_sam",
        __doc__,
        argv,
        outputs="checkpoints, metrics, sam/, eval.json",
        stage="sam stage",
        module="read_jax.pretrain.sam_train",
        summary=_summary,
    )


if __name__ == "__main__":
    sys.exit(main())
