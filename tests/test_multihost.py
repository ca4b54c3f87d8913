"""Multi-host training for real: two processes on localhost (`jax.distributed.initialize`, gloo CPU
collectives), 4 fake devices each, against the single-process 8-device run of the same global batches.

Each process is `tests/multihost_worker.py` training `configs/tiny_shapes.py:smoke` for a few steps (the pod
recipe in miniature: one process per host, each feeding its own devices from its own grain shard, both
writing one orbax checkpoint). Checked: the per-step losses and the validation figures equal the
single-process run's; the two processes read disjoint shards whose union is the single-process batch; the
checkpoint both wrote restores into a one-process model equal to the single-process run's; and a process
killed mid-run is noticed by the other, which exits instead of hanging.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from read_jax.data import make_shapes

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4  # one smoke epoch: validation and a checkpoint at the last step
TIMEOUT = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(env, workdir, pid, nproc, port, devices, *overrides):
    cmd = [sys.executable, "-m", "tests.multihost_worker", str(workdir), str(pid), str(nproc), str(port)]
    cmd += [str(devices), "--", *env["overrides"], *overrides]
    log = open(Path(workdir) / f"log_{pid}.txt", "w")  # noqa: SIM115 (closed with the process)
    p = subprocess.Popen(cmd, env=env["env"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    p.log = log
    return p


def _finish(procs, timeout=TIMEOUT) -> None:
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.log.close()
    for p in procs:
        if p.returncode != 0:
            raise AssertionError(f"worker failed ({p.returncode}):\n{Path(p.log.name).read_text()[-5000:]}")


def _rows(workdir, split) -> dict[int, dict]:
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["split"] == split}


def _examples(workdir, pid) -> list[list[int]]:
    return [json.loads(line) for line in (Path(workdir) / f"examples_{pid}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("multihost")
    data = base / "shapes"
    for split, n in (("train", 16), ("val", 8)):
        make_shapes.write_split(str(data), split, n, seed=3)
    e = dict(os.environ)
    e.update(
        JAX_COMPILATION_CACHE_DIR=str(base / "xla_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONPATH=os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    e.pop("XLA_FLAGS", None)  # the worker sets its own device count
    overrides = [
        f"--config.data.root={data}",
        "--config.data.make_shapes=False",
        f"--config.train.total_steps={STEPS}",
        "--config.progress=False",
        f"--config.checkpoint.every_steps={STEPS}",
        "--config.checkpoint.keep=1",
    ]
    return {"base": base, "env": e, "overrides": overrides}


@pytest.fixture(scope="module")
def runs(env):
    """The same 4 steps of 8 images: 2 processes x 4 devices x 4 images per host, 1 process x 8 devices."""
    two, one = env["base"] / "two", env["base"] / "one"
    two.mkdir(), one.mkdir()
    port = _free_port()
    _finish([_launch(env, two, pid, 2, port, 4, "--config.data.batch_size=4") for pid in (0, 1)])
    _finish([_launch(env, one, 0, 1, port, 8, "--config.data.batch_size=8")])
    return {"two": two, "one": one}


def test_two_process_training_matches_one_process(runs):
    two, one = _rows(runs["two"], "train"), _rows(runs["one"], "train")
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    for step in one:
        for key in ("loss", "bce", "dice"):
            # Same global batch, same parameters: only the order of the cross-device sums differs.
            np.testing.assert_allclose(
                two[step][key], one[step][key], rtol=2e-5, err_msg=f"step {step} {key}"
            )
    val_two, val_one = _rows(runs["two"], "val"), _rows(runs["one"], "val")
    assert list(val_two) == list(val_one) == [STEPS]
    for key, v in val_one[STEPS].items():
        if key not in ("step", "split", "time") and isinstance(v, float):
            np.testing.assert_allclose(val_two[STEPS][key], v, rtol=1e-4, atol=1e-6, err_msg=key)


def test_multihost_data_shards_are_disjoint_and_cover_the_batch(runs):
    a, b = _examples(runs["two"], 0), _examples(runs["two"], 1)
    single = _examples(runs["one"], 0)
    assert len(a) == len(b) == len(single) == STEPS
    for step, (x, y, s) in enumerate(zip(a, b, single, strict=True)):
        assert len(x) == len(y) == 4 and not set(x) & set(y), f"step {step}: shards overlap"
        assert sorted(x + y) == s, f"step {step}: the two shards are not the single-process batch"


def test_multihost_checkpoint_restores_into_one_process(runs):
    """Both processes wrote one checkpoint; a one-process load gives the single-process run's trainables."""
    from flax import nnx

    from read_jax.cli import common
    from read_jax.train.checkpoints import load_trained

    cfgs = {}
    for name in ("two", "one"):
        overrides = [(f"data.{k}", v) for k, v in (("root", "x"), ("make_shapes", "False"))]
        cfgs[name] = common.load_run_config(str(ROOT / "configs" / "tiny_shapes.py") + ":smoke", overrides)
    models = {n: load_trained(cfgs[n], runs[n], which="latest")[0] for n in ("two", "one")}
    got = dict(nnx.to_flat_state(nnx.state(models["two"], nnx.Param)))
    want = dict(nnx.to_flat_state(nnx.state(models["one"], nnx.Param)))
    assert got.keys() == want.keys()
    moved = 0
    for path, v in want.items():
        a, b = np.asarray(got[path].get_value()), np.asarray(v.get_value())
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg="/".join(map(str, path)))
        moved += 1
    assert moved > 0


def test_multihost_killed_process_is_detected(env, tmp_path):
    """SIGKILL one process mid-run: the other stops with an error (heartbeat / collective failure) in well
    under the test's timeout instead of waiting for its peer forever."""
    port = _free_port()
    procs = [
        _launch(
            env, tmp_path, pid, 2, port, 4, "--config.data.batch_size=4", "--config.train.total_steps=100000"
        )
        for pid in (0, 1)
    ]
    try:
        deadline = time.time() + TIMEOUT
        metrics = tmp_path / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert time.time() < deadline and all(p.poll() is None for p in procs), "the run did not start"
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.time()
        procs[0].wait(timeout=120)
        waited = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.log.close()
    assert procs[0].returncode != 0, "the surviving process exited cleanly after its peer died"
    print(f"the surviving process stopped {waited:.1f} s after its peer was killed")
