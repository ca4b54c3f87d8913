"""Mesh construction and regex -> rule parameter sharding on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from read_jax import sharding


def test_eight_fake_devices_present():
    assert jax.device_count() == 8


def test_make_mesh_shapes_and_errors():
    m = sharding.make_mesh(data=2, fsdp=-1)
    assert dict(m.shape) == {"data": 2, "fsdp": 4}
    assert dict(sharding.make_mesh().shape) == {"data": 8, "fsdp": 1}
    with pytest.raises(ValueError, match="does not cover"):
        sharding.make_mesh(data=3, fsdp=2)


def test_fsdp_rule_shards_largest_divisible_dim_and_replicates_small_or_indivisible():
    mesh = sharding.make_mesh(data=2, fsdp=4)
    tree = {
        "big": jax.ShapeDtypeStruct((6, 4096), jnp.float32),  # 4096 % 4 == 0 -> dim 1
        "odd": jax.ShapeDtypeStruct((4099, 7), jnp.float32),  # nothing divisible by 4
        "small": jax.ShapeDtypeStruct((64,), jnp.float32),  # below min bytes
        "frozen": {"w": jax.ShapeDtypeStruct((4096, 4096), jnp.float32)},
    }
    strategy = ((r"frozen/.*", "replicate"), (r".*", "fsdp"))
    sh = sharding.tree_shardings(tree, mesh, strategy, min_fsdp_bytes=1024)
    assert sh["big"].spec == P(None, "fsdp")
    assert sh["odd"].spec == P()
    assert sh["small"].spec == P()
    assert sh["frozen"]["w"].spec == P()
    with pytest.raises(ValueError, match="no sharding rule"):
        sharding.tree_shardings(tree, mesh, ((r"big", "fsdp"),), min_fsdp_bytes=0)


def test_shard_batch_and_constrain():
    mesh = sharding.make_mesh(data=4, fsdp=2)
    batch = sharding.shard_batch({"x": np.arange(16.0).reshape(8, 2)}, mesh)
    assert batch["x"].sharding.spec == P(("data", "fsdp"), None)

    @jax.jit
    def f(x):
        return sharding.constrain(x * 2, ("act_batch", "act_emb"))

    with sharding.use_mesh(mesh):
        y = f(batch["x"])
    np.testing.assert_array_equal(np.asarray(y), np.arange(16.0).reshape(8, 2) * 2)
    # Outside a mesh, constrain is the identity and works on any shape.
    assert sharding.constrain(jnp.ones(3), ("act_batch",)).shape == (3,)
