"""Shared test helpers: torch gating that fails (not skips) in CI, and numpy conversions."""

import os

import numpy as np
import pytest


def require_torch():
    """Import torch, or skip locally / FAIL under CI (reference tests must run in CI)."""
    try:
        import torch
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("torch is required in CI: install the [test] extra")
        pytest.skip("torch not installed (pip install -e .[test])")
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    return torch


def require(module: str):
    """Import an optional reference package with the same CI policy as `require_torch`."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is required in CI: install the [test] extra")
        pytest.skip(f"{module} not installed")


def state_dict_numpy(module) -> dict:
    """A torch module's state dict as float32 numpy arrays."""
    return {k: v.detach().float().cpu().numpy() for k, v in module.state_dict().items()}


def to_np(x):
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def numpy_random_model(factory, seed: int = 0):
    """Build an NNX model abstractly and fill every leaf with seeded numpy noise of O(1) activations.

    Eager JAX init compiles one RNG kernel per parameter shape (tens of seconds on 2 cores for READ);
    tests that need *some* random weights, not the init distribution, use this instead.
    """
    from flax import nnx

    from read_jax.convert.common import abstract_leaves, load_leaves

    rng = np.random.default_rng(seed)
    model = nnx.eval_shape(factory)
    leaves = {}
    for path, v in abstract_leaves(model).items():
        name = path.rsplit("/", 1)[-1]
        if name in ("scale", "weight") or path.endswith("norm/scale"):
            a = rng.uniform(0.8, 1.2, v.shape)
        elif name == "bias":
            a = 0.02 * rng.standard_normal(v.shape)
        elif "embedding" in name or len(v.shape) < 2:
            a = rng.standard_normal(v.shape) * (0.5 if len(v.shape) < 2 else 1.0)
        else:
            fan_in = int(np.prod(v.shape[:-1]))
            a = rng.standard_normal(v.shape) / np.sqrt(fan_in)
        leaves[path] = a.astype(v.dtype)
    load_leaves(model, leaves)
    return model
