"""'/'-joined parameter paths and the NNX glue every layer above the model shares.

Leaf names are '/'-joined NNX state paths ('llava/language_model/model/layers/0/self_attn/q_proj/kernel'): the
names the converter's key tables target, the sharding rules match, the trainable regexes select and converted
checkpoints store. One definition here, used by `convert/`, `checkpoint`, `sharding`, `lora` and training.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


class LeafError(ValueError):
    """Leaves that do not fit the model they are written into."""


def path_str(path: Iterable[Any]) -> str:
    """An NNX state path or a jax key path -> 'a/b/0/c' (NNX's `.value` wrappers are not path entries)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name in ("value", "raw_value"):
                continue
            parts.append(k.name)
        else:
            parts.append(str(k))
    return "/".join(parts)


def abstract_leaves(model_or_state) -> dict[str, Any]:
    """'/'-path -> ShapeDtypeStruct (or array) for every variable of an NNX module or state."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
    out = {}
    for path, var in nnx.to_flat_state(state):
        out[path_str(path)] = var.get_value() if hasattr(var, "get_value") else var
    return out


def load_leaves(model, leaves: Mapping[str, Any], *, strict: bool = True) -> None:
    """Write '/'-path leaves into an (already built) NNX module in place."""
    flat = nnx.to_flat_state(nnx.state(model))
    seen = set()
    for path, var in flat:
        key = path_str(path)
        if key in leaves:
            var.set_value(jnp.asarray(leaves[key]))
            seen.add(key)
    extra = set(leaves) - seen
    if strict and extra:
        raise LeafError(f"leaves with no place in the model: {sorted(extra)}")
    nnx.update(model, nnx.from_flat_state(flat))


def floats_as(tree, dtype):
    """Every floating leaf of `tree` cast to `dtype` (integer leaves and RNG keys untouched)."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def abstract_floats_as(tree, dtype):
    """`floats_as` on ShapeDtypeStructs (nothing is allocated)."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype),
        tree,
    )


def with_shardings(abstract, shardings):
    """ShapeDtypeStructs carrying their sharding (what `jit(...).lower` and orbax restore targets take)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
