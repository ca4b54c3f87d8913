#!/usr/bin/env python
"""Train READ: flags -> config -> `read_jax.train_lib.train_and_evaluate(config, workdir)`.

    python train.py --config configs/tiny_shapes.py --workdir runs/tiny
    python train.py --config configs/read_7b_reasonseg.py --workdir runs/read7b \\
        --config.init.checkpoint=ckpt/sesame7b --config.data.root=dataset --config.train.lr=1e-4
    python train.py --config configs/read_13b_reasonseg.py:stage2 --workdir runs/read13b_stage2 \\
        --config.init.trainables_from=runs/read13b_stage1

Any config field can be overridden with `--config.<section>.<field>=value` (ml_collections). Rerunning the same
command on the same `--workdir` resumes from its latest checkpoint. Thin on purpose (house style §13).
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file(
    "config", None, "a configs/*.py file (optionally `file.py:arg`)", lock_config=True
)
flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics.jsonl, TensorBoard files")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config = flags.FLAGS.config
    if config.mesh.get("distributed"):
        from read_jax.sharding import initialize_distributed

        initialize_distributed()
    from read_jax.train_lib import NonFiniteLossError, train_and_evaluate

    try:
        summary = train_and_evaluate(config, flags.FLAGS.workdir)
    except NonFiniteLossError as e:
        print(f"train.py: {e}", file=sys.stderr)
        sys.exit(3)
    print(
        f"done: step {summary['final_step']}, validation {summary.get('val')}, "
        f"{summary['wall_s']:.0f}s wall / {summary['cpu_s']:.0f}s CPU"
    )


if __name__ == "__main__":
    if any(a in ("-h", "--help", "--helpshort") for a in sys.argv[1:]):
        # absl's own --help exits with status 1; asking for help is not an error.
        print(__doc__ + "\nflags:\n" + flags.FLAGS.main_module_help())
        sys.exit(0)
    app.run(main)
