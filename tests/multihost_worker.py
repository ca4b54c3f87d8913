"""One process of a multi-process `read_jax.train` run on CPU, for `tests/test_multihost.py`.

    python -m tests.multihost_worker train WORKDIR PROCESS_ID NUM_PROCESSES PORT DEVICES -- --config.x=y ...
    python -m tests.multihost_worker collectives - PROCESS_ID NUM_PROCESSES PORT DEVICES

Sets DEVICES fake CPU devices, joins the other processes through `read_jax.sharding.initialize_distributed`
(gloo CPU collectives, coordinator on localhost:PORT; `collectives` with a 20 s heartbeat, so that a dead
peer is noticed in seconds, `train` with JAX's default 100 s: a loaded machine can starve a process's
heartbeat thread for many seconds), then trains `configs/tiny.py:read,smoke` with the given overrides
through `read_jax.train.train_and_evaluate`, and afterwards restores the trainables of the checkpoint both
processes wrote (every process reads its shards). What this process saw goes to WORKDIR (one file per
process, see `recorders`). `collectives` only joins the processes and gathers a counter in a loop.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny.py") + ":read,smoke"  # READ's recipe (LoRA, SasP), smoke-sized


def recorders(workdir, pid: int):
    """(next_step_batch, _host_scalars) for `read_jax.train.loop` that also log, per step and on this process:
    the global example indices of this host's batch (`examples_<pid>.jsonl`) and the step's metrics as this
    process fetched them (`metrics_<pid>.jsonl`). The workers and the test's in-process run patch them in."""
    from read_jax.train import loop

    draw, scalars = loop.loaders.next_step_batch, loop._host_scalars
    examples, metrics = Path(workdir) / f"examples_{pid}.jsonl", Path(workdir) / f"metrics_{pid}.jsonl"

    def recording_draw(it, accum):
        dev, host = draw(it, accum)
        with open(examples, "a") as f:
            f.write(json.dumps(sorted(int(i) for i in host["example_index"].reshape(-1))) + "\n")
        return dev, host

    def recording_scalars(m):
        out = scalars(m)
        with open(metrics, "a") as f:  # only the train steps' metrics go through here
            f.write(json.dumps(out) + "\n")
        return out

    return recording_draw, recording_scalars


def trained_params(config, workdir) -> dict:
    """{path: numpy array} of the trainables of `workdir`'s latest checkpoint, restored into the run's
    shardings (`RunCheckpoints.restore_trainables`: every process reads its shards), gathered to every
    process."""
    import numpy as np
    from flax import nnx
    from jax.experimental import multihost_utils

    from read_jax import sharding as shd
    from read_jax.data.loaders import plain
    from read_jax.train import config as run_config
    from read_jax.train.checkpoints import RunCheckpoints
    from read_jax.train.state import setup_model

    mesh = shd.make_mesh(int(config.mesh.data), int(config.mesh.fsdp))
    setup = setup_model(  # as `train_and_evaluate` builds it
        run_config.read_config(config.model),
        mesh,
        strategy=plain(config.mesh.strategy),
        seed=int(config.init.seed),
        trainable_dtype=config.train.get("trainable_dtype") or None,
    )
    ckpts = RunCheckpoints(workdir, async_save=False)
    try:
        state, meta = ckpts.restore_trainables(setup, "latest")
    finally:
        ckpts.close()
    assert meta["step"] == int(config.train.total_steps), meta
    flat = {"/".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(state)}
    return {k: np.asarray(v) for k, v in multihost_utils.process_allgather(flat, tiled=True).items()}


def _stack_dumps(every_s: float) -> None:
    """Print the main thread's Python stack every `every_s` seconds (a daemon thread): where a stuck worker
    waits shows up in its log, which the test prints on failure."""
    import threading
    import time
    import traceback

    main_id = threading.main_thread().ident

    def loop():
        while True:
            time.sleep(every_s)
            frame = sys._current_frames().get(main_id)
            if frame is not None:
                stack = "".join(traceback.format_stack(frame)[-12:])
                print(f"-- still running, main thread at:\n{stack}", file=sys.stderr, flush=True)

    threading.Thread(target=loop, daemon=True).start()


def _compile_in_step() -> None:
    """Make the processes wait for each other after every compilation of a multi-process program.

    gloo gives a process 30 s (hard-coded in XLA) to join a communicator that a peer has started to set up,
    which happens at the first run of each program; on a loaded 2-core machine two processes compiling the
    same program can finish minutes apart (or one finds it in the compilation cache and the other does not).
    Every process compiles the same programs in the same order (SPMD), so a numbered barrier of the
    coordination service after each compile (10 min timeout) starts each program's first run together.
    Executables cannot be shared instead (`jax_share_binary_between_hosts`): on CPU the processes' cache
    keys differ, and the receiving process waits forever.
    """
    from jax._src import compiler, distributed

    compile_or_get_cached, count = compiler.compile_or_get_cached, [0]

    def synchronised(backend, computation, devices, *args, **kwargs):
        out = compile_or_get_cached(backend, computation, devices, *args, **kwargs)
        client = distributed.global_state.client
        if client is not None and len({d.process_index for d in devices.flat}) > 1:
            count[0] += 1
            client.wait_at_barrier(f"read_jax_test_compile_{count[0]}", timeout_in_ms=600_000)
        return out

    compiler.compile_or_get_cached = synchronised


def collectives(nproc: int, pid: int, port: int) -> int:
    """Join the processes and gather a counter from all of them every half second, printing `tick <i>`: the
    other side of `test_multihost_killed_process_is_detected`."""
    import time

    import numpy as np
    from jax.experimental import multihost_utils

    from read_jax import sharding as shd

    shd.initialize_distributed(
        coordinator_address=f"localhost:{port}",
        num_processes=nproc,
        process_id=pid,
        initialization_timeout=120,
        heartbeat_timeout_seconds=20,
    )
    for i in range(600):
        got = multihost_utils.process_allgather(np.array([i]))
        assert np.asarray(got).ravel().tolist() == [i] * nproc
        print(f"tick {i}", flush=True)
        time.sleep(0.5)
    return 0


def main(argv: list[str]) -> int:
    mode, workdir, pid, nproc, port, devices = (
        argv[0],
        argv[1],
        int(argv[2]),
        int(argv[3]),
        int(argv[4]),
        int(argv[5]),
    )
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    if mode == "collectives":
        return collectives(nproc, pid, port)
    logging.basicConfig(level=logging.WARNING, format="%(relativeCreated)7.0f ms %(name)s: %(message)s")
    logging.getLogger("read_jax").setLevel(logging.INFO)
    _stack_dumps(120.0)
    import jax
    import numpy as np

    # Everything is imported before the processes join: the first collective (orbax's barrier when the
    # run's checkpoint manager is created) waits only 30 s for the other process (gloo's context set-up),
    # and imports on a loaded machine vary by more than that.
    from read_jax import sharding as shd
    from read_jax.cli import common
    from read_jax.train import loop

    jax.config.update("jax_default_matmul_precision", "float32")  # as tests/conftest.py: the same programs
    _compile_in_step()
    shd.initialize_distributed(
        coordinator_address=f"localhost:{port}",
        num_processes=nproc,
        process_id=pid,
        initialization_timeout=300,
    )
    assert jax.process_count() == nproc and jax.local_device_count() == devices
    loop.loaders.next_step_batch, loop._host_scalars = recorders(workdir, pid)
    _, overrides = common.split_overrides(extra)
    config = common.load_run_config(CONFIG, overrides)
    print("training", flush=True)
    summary = loop.train_and_evaluate(config, workdir)
    print(f"trained: step {summary['final_step']}", flush=True)
    np.savez(Path(workdir) / f"params_{pid}.npz", **trained_params(config, workdir))
    print("restored", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
