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
from read_jax.config import ConfigError


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        rest, overrides = common.split_overrides(argv)
    except ConfigError as e:
        print(f"pretrain_sam: error: {e}", file=sys.stderr)
        return 2
    p = common.parser("pretrain_sam", __doc__, config=True)
    p.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics, sam/, eval.json")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    p.add_argument(
        "--stop-at", type=int, default=None, metavar="STEP", help="stop after this step (rerun to continue)"
    )
    args = p.parse_args(rest)

    def body() -> int:
        from read_jax.pretrain import sam_config, sam_train
        from read_jax.train import NonFiniteLossError
        from read_jax.train.config import load_config_file

        config = common.apply_overrides(load_config_file(args.config), overrides)
        sam_config.validate(config)
        try:
            out = sam_train.run(
                config, common.absolute(args.workdir), evaluate=not args.no_eval, stop_at=args.stop_at
            )
        except NonFiniteLossError as e:
            print(f"pretrain_sam: {e}", file=sys.stderr)
            return 3
        if out["final_step"] < out["total_steps"]:
            print(
                f"sam stage: stopped at step {out['final_step']} of {out['total_steps']}; rerun to continue"
            )
            return 0
        ev = out.get("eval") or {}
        figures = ", ".join(
            f"{k} {v:.3f}" for k, v in ev.items() if k.startswith("mIoU_") and isinstance(v, float)
        )
        print(
            f"sam stage: step {out['final_step']}, {out['wall_s']:.0f}s; weights {out['export']}"
            + (f"; held-out {figures} ({ev['num_instances']} instances)" if ev else "")
        )
        return 0

    common.setup_logging()
    return common.run_main("pretrain_sam", body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
