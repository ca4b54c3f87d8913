"""The attention core and its one kernel switch (`read_jax.layers`): which kernel runs where, that the fused
kernels' mask translations mean what the XLA path computes, and (on a GPU) that cuDNN agrees with XLA.

On CPU every implementation falls back to XLA; the TPU Pallas path's translation of `CausalMask` into causal +
segment ids is checked against the dense mask with the Pallas module's own pure-JAX reference
(`mha_reference_no_custom_vjp`), the same semantics the TPU kernel implements.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from read_jax import layers as L


def _qkv(b=2, t=256, n=4, k=4, h=128, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, t, n, h), dtype)
    kk = jax.random.normal(ks[1], (b, t, k, h), dtype)
    v = jax.random.normal(ks[2], (b, t, k, h), dtype)
    return q, kk, v


def _key_valid(b, t):
    """Row 0 right-padded, row 1 left-padded (generation prompts)."""
    valid = np.ones((b, t), bool)
    valid[0, t - 37 :] = False
    valid[1, :21] = False
    return jnp.asarray(valid)


def test_backend_selection_on_cpu_and_by_operands(monkeypatch):
    q, k, v = _qkv()
    for impl in (None, "xla", "auto", "cudnn", "pallas"):
        assert L.attention_backend(impl, q, k, None, None) == "xla"  # CPU: always XLA
    with pytest.raises(ValueError, match="attention implementation"):
        L.attention_backend("flash", q, k, None, None)
    monkeypatch.setattr(L, "_platform", lambda: "cuda")
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    assert L.attention_backend("auto", *bf[:2], None, None) == "cudnn"
    assert L.attention_backend("auto", q, k, None, None) == "xla"  # cuDNN needs bf16/fp16
    q80, k80, _ = _qkv(h=80, dtype=jnp.bfloat16)  # SAM ViT-H's head dim: a multiple of 8, <= 128
    assert L.attention_backend("auto", q80, k80, None, None) == "cudnn"
    q_big, k_big, _ = _qkv(h=136, dtype=jnp.bfloat16)
    assert L.attention_backend("cudnn", q_big, k_big, None, None) == "xla"
    monkeypatch.setattr(L, "_platform", lambda: "tpu")
    causal = L.CausalMask(_key_valid(2, 256))
    assert L.attention_backend("auto", q, k, causal, None) == "pallas"
    dense = causal.dense()
    assert L.attention_backend("auto", q, k, dense, None) == "xla"  # the kernel takes no dense mask
    q_odd, k_odd, _ = _qkv(t=200)
    assert L.attention_backend("auto", q_odd, k_odd, None, None) == "xla"  # lengths not multiples of 128
    q_gqa, k_gqa, _ = _qkv(k=2)
    assert L.attention_backend("pallas", q_gqa, k_gqa, None, None) == "xla"


def test_causal_mask_equals_the_dense_mask_on_xla():
    q, k, v = _qkv(k=2)
    valid = _key_valid(2, 256)
    got = L.dot_product_attention(q, k, v, L.CausalMask(valid), implementation="auto")
    want = L.dot_product_attention(q, k, v, L.causal_padding_mask(jnp.arange(256), valid))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_pallas_translation_matches_the_dense_mask():
    """`CausalMask` -> causal + segment ids (real keys 1, padding 0) gives the dense mask's outputs on every
    real query, through the TPU module's pure-JAX reference of the kernel's semantics."""
    from jax.experimental.pallas.ops.tpu import flash_attention as fa  # part of jax: never skipped

    q, k, v = _qkv()
    valid = _key_valid(2, 256)
    bias = 0.1 * jax.random.normal(jax.random.key(3), (2, 4, 256, 256))
    got = L._pallas_attention(
        q,
        k,
        v,
        L.CausalMask(valid),
        bias,
        128**-0.5,
        kernel=fa.mha_reference_no_custom_vjp,
        segment_ids_cls=fa.SegmentIds,
    )
    want = L.dot_product_attention(q, k, v, L.causal_padding_mask(jnp.arange(256), valid), bias=bias)
    real = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=2e-5, atol=2e-5)
    assert np.isfinite(np.asarray(got)).all()  # padding queries see padding keys: no empty softmax row


def test_set_attention_implementation_reaches_every_attention_module():
    from flax import nnx

    from read_jax.build import model_fn
    from read_jax.config import ReadConfig

    cfg = ReadConfig.smoke(attention_implementation="cudnn")
    model = nnx.eval_shape(model_fn(cfg))
    found = [
        m.attention_implementation
        for _, m in nnx.iter_graph(model)
        if isinstance(m, nnx.Module) and hasattr(m, "attention_implementation")
    ]
    # LLaMA 1 layer, CLIP 2 layers, SAM encoder 2 blocks, two-way transformer 1 block x 3 + the final one.
    assert len(found) == 1 + 2 + 2 + 4 and set(found) == {"cudnn"}


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_cudnn_agrees_with_xla(causal):
    """cuDNN flash attention vs XLA in bf16 on the GPU: LLaMA-like causal + padding, CLIP/SAM-like with a
    bias. Both keep fp32 logits; the outputs differ by bf16 rounding of the probabilities (1 ulp, ~0.4%)."""
    q, k, v = _qkv(b=2, t=512, n=8, k=8, h=128, dtype=jnp.bfloat16)
    if causal:
        mask, bias = L.CausalMask(_key_valid(2, 512)), None
        real = np.asarray(_key_valid(2, 512))
    else:
        mask, bias = None, 0.5 * jax.random.normal(jax.random.key(1), (2, 8, 512, 512), jnp.bfloat16)
        real = np.ones((2, 512), bool)
    assert L.attention_backend("auto", q, k, mask, bias) == "cudnn"
    fused = jax.jit(lambda *a: L.dot_product_attention(*a[:3], a[3], bias=a[4], implementation="auto"))
    xla = jax.jit(lambda *a: L.dot_product_attention(*a[:3], a[3], bias=a[4], implementation="xla"))
    full = np.asarray(fused(q, k, v, mask, bias), np.float32)
    assert np.isfinite(full).all()  # left-padding queries included: no empty softmax rows
    got, want = full[real], np.asarray(xla(q, k, v, mask, bias), np.float32)[real]
    assert np.abs(got - want).max() <= 2 * 2.0**-8 * np.abs(want).max()
