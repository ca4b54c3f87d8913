"""Shared test helpers: torch gating that fails (not skips) in CI, and numpy conversions."""

import os

import numpy as np
import pytest


def require_torch():
    """Import torch, or skip locally / FAIL under CI (reference tests must run in CI)."""
    try:
        import torch  # noqa: F401
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
