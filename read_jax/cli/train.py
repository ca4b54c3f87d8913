"""Train READ: a run config -> `read_jax.train.train_and_evaluate(config, workdir)`.

    python train.py --config configs/tiny.py:read --workdir runs/read \\
        --config.init.checkpoint=ckpt/tiny-sesame
    python train.py --config configs/read_7b_reasonseg.py --workdir runs/read7b \\
        --config.init.checkpoint=ckpt/sesame7b --config.data.root=dataset --config.train.lr=1e-4
    python train.py --config configs/read_13b_reasonseg.py:stage2 --workdir runs/read13b_stage2 \\
        --config.init.trainables_from=runs/read13b_stage1

Any config field can be overridden with `--config.<section>.<field>=value`; an unknown field is an error
naming
it. Rerunning the same command on the same `--workdir` resumes from its latest checkpoint. On a TPU pod run
the
same command on every host with `--config.mesh.distributed=true`. Exit status: 0 done, 2 bad input, 3 a
non-finite training step (the run stopped before checkpointing it).
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
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    p = common.parser("train.py", __doc__, config=True)
    p.add_argument(
        "--workdir", required=True, help="run directory: checkpoints, metrics.jsonl, TensorBoard files"
    )
    args = p.parse_args(rest)

    def body() -> int:
        from read_jax.train import NonFiniteLossError, train_and_evaluate

        config = common.load_run_config(args.config, overrides)
        if config.mesh.get("distributed"):
            from read_jax.sharding import initialize_distributed

            initialize_distributed()
        try:
            summary = train_and_evaluate(config, common.absolute(args.workdir))
        except NonFiniteLossError as e:
            print(f"train.py: {e}", file=sys.stderr)
            return 3
        print(
            f"done: step {summary['final_step']}, validation {summary.get('val')}, "
            f"{summary['wall_s']:.0f}s wall / {summary['cpu_s']:.0f}s CPU"
        )
        return 0

    common.setup_logging()
    return common.run_main("train.py", body, args.debug)
