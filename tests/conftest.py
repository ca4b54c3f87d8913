"""Test setup: 8 fake CPU devices (set before jax is imported), fp32 matmuls, markers, torch gating."""

import os

# Must happen before the first `import jax` anywhere in the test session.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Share XLA compilations between the test process and the subprocesses it starts (train/evaluate CLIs,
# kill-and-resume): the tiny model's compiles dominate test time on 2 cores.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "read_jax_xla_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax
import pytest

# Parity tests compare fp32 against torch fp32: no bf16 passes in XLA's CPU dots.
jax.config.update("jax_default_matmul_precision", "float32")


def pytest_collection_modifyitems(config, items):
    on_gpu = (
        any(d.platform == "gpu" for d in jax.devices()) if os.environ.get("JAX_PLATFORMS") != "cpu" else False
    )
    weights = os.environ.get("READ_JAX_WEIGHTS")
    for item in items:
        if "gpu" in item.keywords and not on_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a GPU"))
        if "weights" in item.keywords and not weights:
            item.add_marker(
                pytest.mark.skip(reason="set READ_JAX_WEIGHTS to a directory of real checkpoints")
            )
