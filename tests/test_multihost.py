"""Multi-host training for real: two processes on localhost (`jax.distributed.initialize`, gloo CPU
collectives), 4 fake devices each, against a single-process 8-device run of the same global batches.

Each process is `tests/multihost_worker.py` training `configs/tiny.py:read,smoke` on ReasonSeg through
`read_jax.train.train_and_evaluate` (the pod recipe in miniature: one process per host, each feeding its own
devices from its own grain shard, FSDP over all 8 devices so every large parameter is split across the two
hosts, both writing one orbax checkpoint), then restoring that checkpoint. The single-process run is the same
`train_and_evaluate` in the test process (8 fake devices, tests/conftest.py; pure data parallel, another
layout of the same computation), started while the two workers run. Checked:
  * every step's metrics are identical on both processes and equal the single-process run's (fp32; only the
    order of the cross-device sums differs);
  * the two hosts read disjoint shards whose union is the single-process batch of each step;
  * the validation figures (multi-host evaluation: each host scores its share, the records are gathered)
    equal the single-process run's;
  * the checkpoint both processes wrote restores on both (identical trainables) and into a one-process model,
    and those trainables equal the single-process run's;
  * a process killed while the two gather from each other is noticed by the other, which exits with an
    error instead of hanging.
Every subprocess has a timeout; the port is a free one picked by the OS.
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
STEPS = 3
TIMEOUT = 900  # s for one run of the workers: a guard against hangs (compiles on a loaded machine are slow)
DEVICES = 4  # per process; the single-process run uses the test process's 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(env, workdir, pid, port, *args, mode="train"):
    cmd = [sys.executable, "-m", "tests.multihost_worker", mode, str(workdir), str(pid), "2", str(port)]
    cmd += [str(DEVICES), "--", *args]
    log = open(Path(workdir) / f"log_{pid}.txt", "w")  # noqa: SIM115 (closed with the process)
    p = subprocess.Popen(cmd, env=env["env"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    p.log = log
    return p


def _stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.log.close()


def _finish(procs, deadline: float) -> None:
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        _stop(procs)
    for p in procs:
        if p.returncode != 0:
            raise AssertionError(f"worker failed ({p.returncode}):\n{Path(p.log.name).read_text()[-5000:]}")


def _jsonl(path) -> list:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _val(workdir) -> dict:
    rows = [r for r in _jsonl(Path(workdir) / "metrics.jsonl") if r["split"] == "val"]
    assert [r["step"] for r in rows] == [STEPS]
    return rows[0]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("multihost")
    data = base / "shapes"
    for split, n in (("train", 16), ("val", 8)):  # ReasonSeg only, where the config's reason_seg_dir is
        make_shapes.write_split(str(data / "reason_seg" / "ReasonSeg"), split, n, seed=3)
    e = dict(os.environ)
    e.update(  # the workers' own compilation cache (see tests/multihost_worker.py): every program in it
        JAX_COMPILATION_CACHE_DIR=str(base / "xla_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
    )
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e.pop("XLA_FLAGS", None)  # the worker sets its own device count
    overrides = [
        f"--config.data.root={data}",
        "--config.data.make_shapes=False",
        "--config.data.rates=reason_seg:1",
        "--config.data.reason_seg_false_premise=0",  # as test_reliability_train's runs
        # No LoRA dropout: its masks follow a row's place in the global batch, and the two hosts' batch is
        # the single-process batch in another order (host 0's examples, then host 1's).
        "--config.train.dropout=False",
        f"--config.train.total_steps={STEPS}",
        "--config.train.steps_per_epoch=100",  # no epoch boundary before the last step
        "--config.progress=False",
        f"--config.checkpoint.every_steps={STEPS}",
        "--config.checkpoint.keep=1",
    ]
    return {"base": base, "env": e, "overrides": overrides}


def _single_process_run(env, workdir):
    """The same run in this process, recorded as process 0: the whole global batch of 8 images, pure data
    parallel over 8 devices (the config's default mesh)."""
    from read_jax.cli import common
    from read_jax.train import loop
    from tests.multihost_worker import CONFIG, recorders, trained_params

    _, overrides = common.split_overrides([*env["overrides"], "--config.data.batch_size=8"])
    config = common.load_run_config(CONFIG, overrides)
    draw, scalars = recorders(workdir, 0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop.loaders, "next_step_batch", draw)
        mp.setattr(loop, "_host_scalars", scalars)
        loop.train_and_evaluate(config, workdir)
    np.savez(Path(workdir) / "params_0.npz", **trained_params(config, workdir))
    return config


@pytest.fixture(scope="module")
def runs(env):
    two, one = env["base"] / "two", env["base"] / "one"
    two.mkdir(), one.mkdir()
    port = _free_port()
    deadline = time.time() + TIMEOUT
    # FSDP over the 8 devices of both hosts: every large parameter and its moments are split across them.
    fsdp = ["--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.data.batch_size=4"]
    procs = [_launch(env, two, pid, port, *env["overrides"], *fsdp) for pid in (0, 1)]
    try:
        config = _single_process_run(env, one)
    except BaseException:
        _stop(procs)
        raise
    _finish(procs, deadline)
    return {"two": two, "one": one, "config": config}


def test_multihost_every_step_matches_the_single_process_run(runs):
    two0, two1 = _jsonl(runs["two"] / "metrics_0.jsonl"), _jsonl(runs["two"] / "metrics_1.jsonl")
    one = _jsonl(runs["one"] / "metrics_0.jsonl")
    assert len(two0) == len(two1) == len(one) == STEPS
    assert two0 == two1  # both processes fetched the same replicated metrics, bit for bit
    for step, (a, b) in enumerate(zip(two0, one, strict=True)):
        assert a.keys() == b.keys()
        for key in ("loss", "ce", "bce", "dice", "l2_grads", "l2_params", "l2_updates"):
            np.testing.assert_allclose(a[key], b[key], rtol=2e-6, atol=1e-7, err_msg=f"step {step} {key}")
        assert a["num_masks"] == b["num_masks"] > 0 and a["num_tokens"] == b["num_tokens"] > 0
        assert a["finite"] == 1
    assert two0[-1]["l2_updates"] > 0  # the parameters moved


def test_multihost_data_shards_are_disjoint_and_cover_the_batch(runs):
    a, b = _jsonl(runs["two"] / "examples_0.jsonl"), _jsonl(runs["two"] / "examples_1.jsonl")
    single = _jsonl(runs["one"] / "examples_0.jsonl")
    assert len(a) == len(b) == len(single) == STEPS
    for step, (x, y, s) in enumerate(zip(a, b, single, strict=True)):
        assert len(x) == len(y) == 4 and not set(x) & set(y), f"step {step}: shards overlap"
        assert sorted(x + y) == s, f"step {step}: the two shards are not the single-process batch"


def test_multihost_validation_matches_the_single_process_run(runs):
    two, one = _val(runs["two"]), _val(runs["one"])
    assert two["num_queries"] == one["num_queries"] == 8
    for key in ("gIoU", "cIoU"):
        np.testing.assert_allclose(two[key], one[key], rtol=1e-5, err_msg=key)


def test_multihost_checkpoint_restores_everywhere(runs):
    """Both processes restored the checkpoint they wrote together to the same trainables; a one-process load
    of it gives them too; and they equal the single-process run's."""
    from flax import nnx

    from read_jax.lora import trainable_filter
    from read_jax.train import config as run_config
    from read_jax.train.checkpoints import load_trained

    p0, p1 = (np.load(runs["two"] / f"params_{pid}.npz") for pid in (0, 1))
    one = np.load(runs["one"] / "params_0.npz")
    assert set(p0.files) == set(p1.files) == set(one.files) and len(one.files) > 50
    config = runs["config"]
    model, meta = load_trained(config, runs["two"], which="latest")
    assert meta["step"] == STEPS
    state = nnx.state(model, trainable_filter(run_config.read_config(config.model).trainable_regexes))
    here = {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(state)}
    assert set(here) == set(one.files)
    compared = 0
    for k in one.files:
        np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)
        np.testing.assert_array_equal(here[k], p0[k], err_msg=k)
        if k.endswith("k_proj/bias"):
            # A key bias adds the same q.b to every logit of a query: the softmax ignores it, its exact
            # gradient is 0 and the computed one is rounding noise, which Adam scales to updates of ~lr.
            continue
        np.testing.assert_allclose(p0[k], one[k], rtol=1e-5, atol=1e-6, err_msg=k)
        compared += 1
    assert compared >= len(one.files) - 4


def test_multihost_killed_process_is_detected(env, tmp_path):
    """SIGKILL one of two processes gathering from each other in a loop: the other stops with an error (the
    coordination service's heartbeat, 20 s, or the broken collective) instead of waiting forever."""
    port = _free_port()
    procs = [_launch(env, tmp_path, pid, port, mode="collectives") for pid in (0, 1)]
    try:
        deadline = time.time() + TIMEOUT
        log0 = tmp_path / "log_0.txt"
        while "tick 2" not in log0.read_text():
            assert time.time() < deadline and all(p.poll() is None for p in procs), log0.read_text()[-3000:]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.time()
        procs[0].wait(timeout=120)
        waited = time.time() - t0
    finally:
        _stop(procs)
    assert procs[0].returncode != 0, "the surviving process exited cleanly after its peer died"
    print(f"the surviving process stopped {waited:.1f} s after its peer was killed")
