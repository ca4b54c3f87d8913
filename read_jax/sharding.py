"""Device mesh, regex -> rule parameter sharding, and a few logical activation constraints.

Model code carries no sharding annotations (house style §5, big_vision `sharding.py`): parameters are
placed by a strategy, a list of `(path_regex, rule)` pairs where the first match wins:

  * "replicate": the whole leaf on every device;
  * "fsdp": shard the largest dimension that is divisible by the `fsdp` axis size (only for leaves of
    at least `min_fsdp_bytes`; smaller ones are replicated: sharding a LayerNorm scale buys nothing).

Activations get constraints with logical names resolved by `LOGICAL_RULES` (maxtext's idea in miniature):
`constrain(x, ("act_batch", "act_len", "act_emb"))` is a no-op outside `use_mesh(mesh)`.

Mesh axes: `data` (pure data parallelism: parameters replicated) and `fsdp` (data parallel too, with
parameters and optimizer state sharded). The batch is split over both.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from read_jax.tree_util import path_str

DATA_AXES = ("data", "fsdp")
LOGICAL_RULES: dict[str, Any] = {
    "act_batch": DATA_AXES,
    "act_len": None,
    "act_emb": None,
}
DEFAULT_STRATEGY = ((r".*", "fsdp"),)

_current_mesh: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("read_jax_mesh", default=None)


def initialize_distributed(**kwargs) -> None:
    """Multi-host runs: connect the processes (TPU pods, SLURM and Open MPI clusters are auto-detected;
    elsewhere pass `jax.distributed.initialize`'s arguments: coordinator_address, num_processes, process_id,
    heartbeat_timeout_seconds, ...).

    Must run before anything touches a JAX backend (`jax.process_count()` included: asking it first made
    `initialize` fail, and the failure was swallowed, so every host trained alone). A failure is raised: the
    run asked to be distributed.
    """
    jax.distributed.initialize(**kwargs)


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh; -1 takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("at most one mesh axis can be -1")
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not cover the {n} devices")
    return Mesh(np.asarray(devices).reshape(data, fsdp), DATA_AXES)


@contextlib.contextmanager
def use_mesh(mesh: Mesh):
    """Make `mesh` the target of `constrain` (and jax's ambient mesh) inside the block."""
    token = _current_mesh.set(mesh)
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _current_mesh.reset(token)


def logical_spec(names: Sequence[str | None]) -> P:
    return P(*[LOGICAL_RULES.get(n) if n is not None else None for n in names])


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical axis names; identity when no mesh is active."""
    mesh = _current_mesh.get()
    if mesh is None or mesh.size == 1:
        return x
    spec = logical_spec(names)
    # Skip constraints that do not divide (e.g. a batch of 1 during generation).
    for dim, axes in zip(x.shape, spec):
        if axes is not None:
            size = int(np.prod([mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))]))
            if dim % size:
                return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _fsdp_spec(shape: Sequence[int], itemsize: int, mesh: Mesh, min_bytes: int) -> P:
    n = mesh.shape["fsdp"]
    if n == 1 or int(np.prod(shape)) * itemsize < min_bytes:
        return P()
    # Largest dimension divisible by the fsdp axis size.
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in order:
        if shape[i] % n == 0:
            spec = [None] * len(shape)
            spec[i] = "fsdp"
            return P(*spec)
    return P()


def spec_for(
    path: str,
    shape: Sequence[int],
    dtype,
    mesh: Mesh,
    strategy=DEFAULT_STRATEGY,
    min_fsdp_bytes: int = 1 << 20,
) -> P:
    for pattern, rule in strategy:
        if re.fullmatch(pattern, path):
            if rule == "replicate":
                return P()
            if rule == "fsdp":
                return _fsdp_spec(shape, np.dtype(dtype).itemsize, mesh, min_fsdp_bytes)
            raise ValueError(f"unknown sharding rule {rule!r} for {pattern!r}")
    raise ValueError(f"no sharding rule matches parameter {path!r}")


def tree_shardings(tree, mesh: Mesh, strategy=DEFAULT_STRATEGY, min_fsdp_bytes: int = 1 << 20):
    """NamedSharding for every leaf of a (possibly abstract) pytree, by '/'-joined path."""

    def one(keypath, leaf):
        spec = spec_for(path_str(keypath), leaf.shape, leaf.dtype, mesh, strategy, min_fsdp_bytes)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
    """Axis `batch_axis` (the batch) split over every data-parallel axis, the others replicated.

    `batch_axis=1` is the layout of stacked micro-batches [k, N, ...] (gradient accumulation).
    """
    if ndim <= batch_axis:
        return NamedSharding(mesh, P())
    spec = [None] * ndim
    spec[batch_axis] = DATA_AXES
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# Batch entries holding indices into the image axis (rows -> their image), with the image-axis entries whose
# layout locates this process's images (the first present: the evaluation's decode stage gets no pixels).
# Each process's values index its own share of the batch; `shard_batch` offsets them by where that share
# lands in the global array.
LOCAL_INDEX_KEYS = {"conv_image": ("images_clip", "images", "orig_hw", "sam_input_hw", "image_valid")}


def _share_start(sh, local_shape: tuple, axis: int) -> int:
    """Global index of this process's first row along `axis` when its local rows are assembled under `sh`."""
    global_shape = list(local_shape)
    global_shape[axis] *= jax.process_count()
    idx = sh.addressable_devices_indices_map(tuple(global_shape)).values()
    return min((i[axis].start or 0) for i in idx)


def shard_batch(batch: dict, mesh: Mesh, batch_axis: int = 0) -> dict:
    """Place a host batch (numpy) on the mesh, axis `batch_axis` over the data axes.

    Multi-host: every process passes its local shard; `make_array_from_process_local_data` assembles
    the global array, and the row -> image indices (`LOCAL_INDEX_KEYS`) are offset to point at this process's
    images in it. Raises ValueError (before any transfer) when a batch axis does not divide over the
    data-parallel devices.
    """
    n = int(np.prod([mesh.shape[a] for a in DATA_AXES]))
    for k, x in jax.tree_util.tree_leaves_with_path(batch):
        shape = np.shape(x)
        if len(shape) > batch_axis and (shape[batch_axis] * jax.process_count()) % n:
            raise ValueError(
                f"batch entry {jax.tree_util.keystr(k)} has {shape[batch_axis]} rows on axis {batch_axis}, "
                f"not divisible over the {n} data-parallel devices"
            )

    def sharding(x):
        return batch_sharding(mesh, x.ndim, batch_axis) if x.ndim > batch_axis else replicated(mesh)

    def put(x):
        x = np.asarray(x)
        if jax.process_count() > 1:
            return jax.make_array_from_process_local_data(sharding(x), x)
        return jax.device_put(x, sharding(x))

    if jax.process_count() > 1 and isinstance(batch, dict):
        batch = dict(batch)
        for key, targets in LOCAL_INDEX_KEYS.items():
            target = next((t for t in targets if t in batch), None)
            if key in batch and target is not None:
                images = np.asarray(batch[target])
                batch[key] = np.asarray(batch[key]) + _share_start(sharding(images), images.shape, batch_axis)
    return jax.tree_util.tree_map(put, batch)
