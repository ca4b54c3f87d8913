"""Shared test helpers: gating of the torch references (skip locally, FAIL in CI) and numpy-weight models.

The references themselves (torch transcriptions, Meta/HF builders, torch <-> numpy conversions) live in the
`torchref` package; this module only decides what a missing reference package means for a test.
"""

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


def require_meta_sam():
    """Meta's (segment_anything.modeling, segment_anything.build_sam) through `torchref.sam.meta_sam` (no
    torchvision needed), with the CI policy of `require` for torch and segment_anything.

    Like `require("torch")`, it leaves torch's autograd mode and seed alone.
    """
    require("torch")
    from torchref.sam import meta_sam

    try:
        return meta_sam()
    except ModuleNotFoundError as e:
        if e.name != "segment_anything":
            raise
        require("segment_anything")  # not installed: skips locally, fails in CI
        raise


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


def numpy_init_model(cfg, seed: int = 0):
    """A `LlamaForCausalLM(cfg)` with O(1)-activation random weights drawn in numpy (eager JAX init compiles
    one RNG kernel per parameter shape, which dominates a CPU test's runtime)."""
    from flax import nnx

    from read_jax.convert.common import abstract_leaves, load_leaves
    from read_jax.llama import LlamaForCausalLM

    rng = np.random.default_rng(seed)
    model = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
    leaves = {}
    for path, v in abstract_leaves(model).items():
        if path.endswith("scale"):
            leaves[path] = rng.uniform(0.5, 1.5, v.shape).astype(v.dtype)
        else:  # kernels [I, O] and the [V, D] embedding
            leaves[path] = rng.standard_normal(v.shape) / np.sqrt(v.shape[-1 if "embedding" in path else 0])
            leaves[path] = leaves[path].astype(v.dtype)
    load_leaves(model, leaves)
    return model
