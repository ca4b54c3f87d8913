"""SAM image encoder: parity with Meta's `ImageEncoderViT` (tiny configs, random weights) and ViT-H shapes.

The Meta-SAM reference builders are `torchref.sam`'s (`build_meta_sam`, `build_pair`). Weights always go
through `read_jax.convert.sam` (the table the real converter uses).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from read_jax.config import SamConfig
from read_jax.convert.common import Converter, abstract_leaves, convert, export_leaves
from read_jax.convert.sam import sam_rules
from read_jax.sam import Sam, image_encoder
from tests.helpers import require_meta_sam, require_torch
from torchref.common import state_dict_numpy, to_np
from torchref.sam import TINY, build_meta_sam, build_pair

# ---- parity -------------------------------------------------------------------------------------------
ENCODER_CASES = {
    # window 7 on a 16x16 grid: padded to 21 (3x3 windows with zero tokens); block 1 global.
    "tiny_padded_window": TINY,
    # window 8 divides 16 (no padding), global block in the middle, 4 heads, non-default eps.
    "divisible_window": dataclasses.replace(
        TINY,
        encoder_depth=3,
        encoder_num_heads=4,
        window_size=8,
        global_attn_indexes=(1,),
        layer_norm_eps=1e-5,
    ),
}


@pytest.mark.parametrize(
    "name, query_chunk",
    [(name, image_encoder.QUERY_CHUNK) for name in ENCODER_CASES]
    # The global block's 16 x 16 queries in chunks of 4 rows, and of 1 row (a chunk below one row).
    + [("tiny_padded_window", 64), ("tiny_padded_window", 10)],
)
def test_image_encoder_matches_meta(name, query_chunk):
    torch = require_torch()
    require_meta_sam()
    cfg = ENCODER_CASES[name]
    ref, ours = build_pair(cfg)
    chunked = []
    for _, m in nnx.iter_graph(ours):
        if isinstance(m, image_encoder.Attention):
            m.query_chunk = query_chunk
            chunked.append(image_encoder._rows_per_chunk(*m.input_size, query_chunk) < m.input_size[0])
    assert any(chunked) == (query_chunk < image_encoder.QUERY_CHUNK)  # the chunked path is the one tested
    images = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))
    want = to_np(ref.image_encoder(images)).transpose(0, 2, 3, 1)  # Meta NCHW -> NHWC
    nhwc = jnp.asarray(to_np(images).transpose(0, 2, 3, 1))
    got = np.asarray(nnx.jit(lambda m, x: m.image_encoder(x))(ours, nhwc))
    assert got.shape == (2, cfg.image_embedding_size, cfg.image_embedding_size, cfg.prompt_embed_dim)
    # Outputs are LayerNorm2d-normalised (O(1)); fp32 accumulation-order differences over 2-3 blocks stay
    # well under 1e-5.
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_rows_per_chunk():
    assert image_encoder._rows_per_chunk(64, 64, image_encoder.QUERY_CHUNK) == 16  # ViT-H: 4 chunks
    assert image_encoder._rows_per_chunk(14, 14, image_encoder.QUERY_CHUNK) == 14  # a window: one call
    assert [image_encoder._rows_per_chunk(16, 16, c) for c in (256, 255, 64, 40, 16, 10)] == [
        16,
        8,
        4,
        2,
        1,
        1,
    ]


def test_window_partition_roundtrip():
    from read_jax.sam.image_encoder import window_partition, window_unpartition

    x = jax.random.normal(jax.random.key(0), (2, 16, 11, 3))
    win, pad_hw = window_partition(x, 7)
    assert win.shape == (2 * 3 * 2, 7, 7, 3) and pad_hw == (21, 14)
    # padding rows/cols are zeros, and unpartition inverts exactly
    np.testing.assert_array_equal(np.asarray(window_unpartition(win, 7, pad_hw, (16, 11))), np.asarray(x))
    assert float(jnp.abs(win[-1, 2:, :, :]).sum()) == 0.0  # last window row holds only 16 - 14 = 2 real rows


def test_image_encoder_rejects_wrong_layout():
    ours = nnx.eval_shape(lambda: Sam(TINY, rngs=nnx.Rngs(0)))  # the check runs before any parameter is read
    with pytest.raises(ValueError, match="NHWC"):
        ours.image_encoder(jnp.zeros((1, 3, TINY.image_size, TINY.image_size)))


def test_key_table_round_trip_and_read_prefix():
    """Export inverts the table (JAX -> Meta keys), and the READ-checkpoint prefix reuses it unchanged."""
    require_torch()
    require_meta_sam()
    ref = build_meta_sam(TINY)
    sd = state_dict_numpy(ref)
    target = abstract_leaves(nnx.eval_shape(lambda: Sam(TINY, rngs=nnx.Rngs(0))))
    leaves = convert(sd, sam_rules(), target)
    back = export_leaves(leaves, sam_rules())
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    read_sd = {"model.visual_model." + k: v for k, v in sd.items()}
    read_target = {"visual_model/" + k: v for k, v in target.items()}
    read_leaves = convert(read_sd, sam_rules("model.visual_model.", "visual_model/"), read_target)
    assert read_leaves.keys() == {"visual_model/" + k for k in leaves}
    for k, v in leaves.items():
        np.testing.assert_array_equal(read_leaves["visual_model/" + k], v)


# ---- ViT-H shapes ---------------------------------------------------------------------------------------
def _permuted_shape(transform, shape):
    """Shape of transform(x) for x of `shape`, without allocating x: probe the axis permutation on a tiny
    array whose axis sizes are distinct (2, 3, 4, ...)."""
    probe = np.zeros(tuple(range(2, 2 + len(shape))), np.float32)
    out = transform(probe).shape
    return tuple(shape[d - 2] for d in out)


def test_vit_h_param_tree_matches_meta_build_sam_vit_h():
    torch = require_torch()
    _, build_sam = require_meta_sam()
    with torch.device("meta"):  # shapes only: no 2.5 GB allocation
        ref = build_sam.build_sam_vit_h(checkpoint=None)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    cfg = SamConfig(dtype="float32", param_dtype="float32")
    abstract = abstract_leaves(nnx.eval_shape(lambda: Sam(cfg, rngs=nnx.Rngs(0))))

    # Same number of parameters (Meta: parameters + the persistent Gaussian-matrix buffer).
    n_ours = sum(math.prod(v.shape) for v in abstract.values())
    n_ref = sum(math.prod(s) for s in ref_shapes.values())
    assert n_ref > 600_000_000  # ViT-H, not a default-sized toy
    assert n_ours == n_ref

    # And the key table maps every Meta key to a distinct leaf of the right (transformed) shape.
    conv = Converter(sam_rules(), abstract)
    seen = {}
    for key, shape in ref_shapes.items():
        rule = next((r for r in conv.rules if r.match(key) is not None), None)
        assert rule is not None, f"no rule for {key}"
        dst = rule.match(key)
        assert dst in abstract, f"{key} -> {dst}: no such leaf"
        assert dst not in seen, f"{key} and {seen.get(dst)} both map to {dst}"
        seen[dst] = key
        assert _permuted_shape(rule.transform, shape) == tuple(abstract[dst].shape), key
    assert set(seen) == set(abstract)
