"""The vision stage of the tiny pretraining chain: READ's CLIP tower trained from scratch to say what covers
each patch of its grid (colour, kind, size and place of the shape there, or background).

    python -m read_jax.cli.pretrain_vision --config configs/pretrain_vision.py --workdir runs/vision
    python -m read_jax.cli.pretrain_vision --config configs/pretrain_vision.py:smoke --workdir /tmp/v

Writes `WORKDIR/checkpoints` (orbax, every `checkpoint.every_steps`; rerunning the command resumes from the
latest), `metrics.jsonl` + TensorBoard files, `clip/` (the tower the LLaVA stage starts from, frozen:
`--config.init.clip=WORKDIR/clip`), `eval.json` (held-out per-patch accuracy of each attribute) and
`summary.json`. Override any config field with `--config.<section>.<field>=value`.
Exit status: 0 done, 2 bad input, 3 a non-finite training step.
"""

from __future__ import annotations

import sys

from read_jax.cli import common


def _summary(out: dict) -> str:
    ev = out.get("eval") or {}
    figures = ", ".join(f"{k} {v:.3f}" for k, v in ev.items() if k.endswith("_acc"))
    return f"; held-out patch accuracy {figures} ({ev['num_scenes']} scenes)" if ev else ""


def main(argv=None) -> int:
    return common.stage_main(
        "pretrain_vision",
        __doc__,
        argv,
        outputs="checkpoints, metrics, clip/, eval.json",
        stage="vision stage",
        module="read_jax.pretrain.vision_train",
        summary=_summary,
    )


if __name__ == "__main__":
    sys.exit(main())
