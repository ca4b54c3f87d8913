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
from read_jax.config import ConfigError


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        rest, overrides = common.split_overrides(argv)
    except ConfigError as e:
        print(f"pretrain_vision: error: {e}", file=sys.stderr)
        return 2
    p = common.parser("pretrain_vision", __doc__, config=True)
    p.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics, clip/, eval.json")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    p.add_argument(
        "--stop-at", type=int, default=None, metavar="STEP", help="stop after this step (rerun to continue)"
    )
    args = p.parse_args(rest)

    def body() -> int:
        from read_jax.pretrain import vision_train
        from read_jax.train import NonFiniteLossError
        from read_jax.train.config import load_config_file

        config = common.apply_overrides(load_config_file(args.config), overrides)
        vision_train.validate(config)
        try:
            out = vision_train.run(
                config, common.absolute(args.workdir), evaluate_=not args.no_eval, stop_at=args.stop_at
            )
        except NonFiniteLossError as e:
            print(f"pretrain_vision: {e}", file=sys.stderr)
            return 3
        if out["final_step"] < out["total_steps"]:
            done = f"{out['final_step']} of {out['total_steps']}"
            print(f"vision stage: stopped at step {done}; rerun to continue")
            return 0
        ev = out.get("eval") or {}
        figures = ", ".join(f"{k} {v:.3f}" for k, v in ev.items() if k.endswith("_acc"))
        print(
            f"vision stage: step {out['final_step']}, {out['wall_s']:.0f}s; weights {out['export']}"
            + (f"; held-out patch accuracy {figures} ({ev['num_scenes']} scenes)" if ev else "")
        )
        return 0

    common.setup_logging()
    return common.run_main("pretrain_vision", body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
