"""One process of a (possibly) multi-process `train_and_evaluate` run on CPU, for `tests/test_multihost.py`.

    python -m tests.multihost_worker WORKDIR PROCESS_ID NUM_PROCESSES PORT DEVICES -- --config.x=y ...

Sets DEVICES fake CPU devices, joins the other processes through `jax.distributed.initialize` (gloo CPU
collectives, coordinator on localhost:PORT, a short heartbeat so a dead peer is noticed in seconds) unless
NUM_PROCESSES is 1, then trains `configs/tiny_shapes.py:smoke` with the given overrides. Each step's global
example indices of this process's batch are appended to WORKDIR/examples_<id>.jsonl (the data shard check).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    workdir, pid, nproc, port, devices = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), int(argv[4])
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    if nproc > 1:
        jax.distributed.initialize(
            f"localhost:{port}",
            num_processes=nproc,
            process_id=pid,
            initialization_timeout=120,
            heartbeat_timeout_seconds=10,
        )
    assert jax.process_count() == nproc and jax.local_device_count() == devices

    from read_jax.cli import common
    from read_jax.train import loop

    draw = loop.loaders.next_step_batch
    log = Path(workdir) / f"examples_{pid}.jsonl"

    def recording_draw(it, accum):
        dev, host = draw(it, accum)
        with open(log, "a") as f:
            f.write(json.dumps(sorted(int(i) for i in host["example_index"].reshape(-1))) + "\n")
        return dev, host

    loop.loaders.next_step_batch = recording_draw
    _, overrides = common.split_overrides(extra)
    config = common.load_run_config(str(ROOT / "configs" / "tiny_shapes.py") + ":smoke", overrides)
    print("training", flush=True)
    summary = loop.train_and_evaluate(config, workdir)
    print(f"done: step {summary['final_step']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
