"""Shared primitives: exact GELU, RMSNorm, a LoRA-capable Linear, rotate-half RoPE, the attention core and
its one kernel switch (XLA, cuDNN flash attention on NVIDIA GPUs, the Pallas flash kernel on TPUs).

PyTorch references: transformers 4.31 `models/llama/modeling_llama.py` (`LlamaRMSNorm`, `rotate_half`,
`apply_rotary_pos_emb`, `LlamaRotaryEmbedding`) and peft 0.4 `tuners/lora.py` (`Linear` with
`lora_A`/`lora_B`).

Shape letters: B batch, T query length, S key/value length, N query heads, K key/value heads, H head dim,
D model dim, I/O input/output features, R LoRA rank.

Leaf names follow Flax (`kernel`, `bias`, `scale`); the converter tables rename PyTorch's `weight`.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

# HF `LlamaPreTrainedModel._init_weights`: normal(0, initializer_range=0.02) for Linear and Embedding.
default_kernel_init = nnx.initializers.normal(0.02)


def gelu_exact(x: Array) -> Array:
    """torch `nn.GELU()` / HF "gelu": the exact erf form, not the tanh approximation jax.nn.gelu defaults to.

    Used by LLaVA's projector, CLIP's "gelu" activation and SAM (encoder MLP, mask downscaling/upscaling).
    """
    return jax.nn.gelu(x, approximate=False)


class RMSNorm(nnx.Module):
    """LLaMA RMSNorm: `scale * (x / sqrt(mean(x^2) + eps))`, normalised in fp32 like HF.

    `eps` has no default on purpose: Flax's 1e-6 vs PyTorch's 1e-5 is a classic porting bug.
    """

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: Array) -> Array:
        """x: [..., D] -> [..., D] in the compute dtype."""
        xf = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
        # HF casts the normalised value back to the input dtype *before* the weight multiply.
        y = (xf * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
        return self.scale[...].astype(self.dtype) * y


def kaiming_uniform_a_sqrt5(key: Array, shape: tuple[int, int], dtype) -> Array:
    """PEFT's init of `lora_A` (`nn.init.kaiming_uniform_(w, a=sqrt(5))` on the torch [R, I] weight).

    gain = sqrt(2 / (1 + a^2)) = sqrt(1/3) and bound = gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in), with
    fan_in = I. Here the array is stored [I, R], so fan_in is `shape[0]`.
    """
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


class Linear(nnx.Module):
    """`y = x @ kernel (+ bias)`, optionally plus a LoRA branch `dropout(x) @ lora_a @ lora_b * lora_scale`.

    The LoRA leaves live *in* the layer (`.../q_proj/lora_a`, `.../q_proj/lora_b`, type `nnx.LoRAParam`) so
    the parameter tree mirrors PEFT's `q_proj.lora_A/lora_B` and filters select them by type or by path.
    They are absent (None) until `read_jax.lora.apply_lora` calls `add_lora`.

    Args:
      in_features, out_features: I and O.
      use_bias: add a bias (LLaMA: no; projector/CLIP/SAM: yes).
      dtype: compute dtype; param_dtype: storage dtype of kernel/bias (and LoRA leaves).
      kernel_init: initializer for the [I, O] kernel.
      rngs: `params` stream for the kernel init.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        kernel_init=default_kernel_init,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else nnx.data(None)
        # LoRA slots: declared as data so that assigning LoRAParams later is allowed by NNX.
        self.lora_a = nnx.data(None)
        self.lora_b = nnx.data(None)
        self.lora_scale = 0.0
        self.lora_dropout = 0.0

    @property
    def has_lora(self) -> bool:
        return self.lora_a is not None

    def add_lora(self, rank: int, alpha: float, dropout: float, *, rngs: nnx.Rngs) -> None:
        """Attach LoRA leaves: A [I, R] kaiming-uniform(a=sqrt 5), B [R, O] zeros, scale = alpha / rank."""
        if self.has_lora:
            raise ValueError("this Linear already carries LoRA parameters")
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.lora_a = nnx.LoRAParam(
            kaiming_uniform_a_sqrt5(rngs.params(), (self.in_features, rank), self.param_dtype)
        )
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, self.out_features), self.param_dtype))
        self.lora_scale = float(alpha) / rank
        self.lora_dropout = float(dropout)

    def __call__(self, x: Array, *, deterministic: bool = True, rngs: nnx.Rngs | None = None) -> Array:
        """x: [..., I] -> [..., O] in the compute dtype.

        `deterministic=False` turns on the LoRA-input dropout (PEFT applies it to the LoRA branch only),
        which then needs `rngs` with a `dropout` (or `default`) stream.
        """
        x = x.astype(self.dtype)
        y = jnp.dot(x, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.has_lora:
            xl = x
            if not deterministic and self.lora_dropout > 0.0:
                if rngs is None:
                    raise ValueError("LoRA dropout is active (deterministic=False) but no `rngs` were given")
                keep = 1.0 - self.lora_dropout
                mask = jax.random.bernoulli(rngs.dropout(), keep, x.shape)
                xl = jnp.where(mask, x / keep, jnp.zeros_like(x))
            # [..., R]: the low-rank bottleneck first, so the update costs (I + O) * R per token.
            z = jnp.dot(xl, self.lora_a[...].astype(self.dtype))
            y = y + jnp.dot(z, self.lora_b[...].astype(self.dtype)) * jnp.asarray(self.lora_scale, self.dtype)
        return y


# ---- rotary position embedding (rotate-half layout, as HF LLaMA) ----------------------------------------
def rope_cos_sin(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos/sin tables for integer positions.

    Args:
      positions: int[B, T].
      head_dim: H (even).
      theta: RoPE base (1e4 for LLaMA-2).
    Returns:
      (cos, sin): float32[B, T, H], each frequency repeated over the two halves (HF `cat((freqs, freqs))`).
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [H/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, H]
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: Array) -> Array:
    """[x1, x2] -> [-x2, x1] over the last axis (HF layout: no q/k weight permutation, unlike interleaved)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x: [B, T, N, H]; cos/sin: [B, T, H]. Rotated in fp32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return (xf * c + rotate_half(xf) * s).astype(x.dtype)


# ---- attention core ---------------------------------------------------------------------------------------
# Which attention kernel runs is chosen in one place: `ReadConfig.attention_implementation` (or the
# `attention_implementation` argument of the model constructors), stored on every attention module by
# `set_attention_implementation` and resolved per call by `attention_backend` (platform, dtype, shapes, mask).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas")


@flax.struct.dataclass
class CausalMask:
    """Causal self-attention over T == S positions with key padding, in a form fused kernels take natively.

    Query t sees key s iff s <= t and key_valid[b, s]. key_valid: bool[B, S].
    """

    key_valid: Array

    def dense(self) -> Array:
        """bool[B, 1, T, S], the same mask materialised (`causal_padding_mask`)."""
        return causal_padding_mask(jnp.arange(self.key_valid.shape[1]), self.key_valid)


def causal_padding_mask(query_slots: Array, key_valid: Array) -> Array:
    """Boolean attention mask for causal attention over (possibly cached) key slots.

    Args:
      query_slots: int[T] slot index of every query in the key axis (`cache_index + arange(T)`).
      key_valid: bool[B, S], False for padding and for cache slots not yet written.
    Returns:
      bool[B, 1, T, S]: key s is visible to query t iff s <= query_slots[t] and key_valid[b, s].
    """
    s = jnp.arange(key_valid.shape[1])
    causal = s[None, :] <= query_slots[:, None]  # [T, S]
    return causal[None, None] & key_valid[:, None, None, :]


def _platform() -> str:
    """'cuda', 'rocm', 'tpu' or 'cpu' (the default backend's platform)."""
    dev = jax.devices()[0]
    if dev.platform == "gpu":
        version = str(getattr(dev.client, "platform_version", "")).lower()
        return "rocm" if "rocm" in version or "hip" in version else "cuda"
    return dev.platform


def attention_backend(implementation: str | None, q: Array, k: Array, mask, bias: Array | None) -> str:
    """The kernel `dot_product_attention` runs for these operands: 'xla', 'cudnn' or 'pallas'.

    'auto' picks the platform's fused kernel (cuDNN flash attention on NVIDIA GPUs, the Pallas flash kernel
    on TPUs, XLA elsewhere); 'cudnn' / 'pallas' ask for one. Either falls back to XLA when the kernel does not
    take the operands: cuDNN needs bf16/fp16 and a head dim that is a multiple of 8 and <= 128; the TPU
    kernel needs MHA (K == N), a head dim and sequence lengths that are multiples of 128, and no mask other
    than `CausalMask`.
    """
    if implementation not in (None, *ATTENTION_IMPLEMENTATIONS):
        raise ValueError(
            f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {implementation!r}"
        )
    if implementation in (None, "xla"):
        return "xla"
    want = implementation
    if want == "auto":
        want = {"cuda": "cudnn", "tpu": "pallas"}.get(_platform(), "xla")
    _, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    if want == "cudnn":
        ok = q.dtype in (jnp.bfloat16, jnp.float16) and h % 8 == 0 and h <= 128
        return "cudnn" if ok and _platform() == "cuda" else "xla"
    if want == "pallas":
        ok = kh == n and h % 128 == 0 and t % 128 == 0 and s % 128 == 0
        ok = ok and (mask is None or isinstance(mask, CausalMask))
        return "pallas" if ok and _platform() == "tpu" else "xla"
    return "xla"


def _pallas_attention(q, k, v, mask, bias, scale, kernel=None, segment_ids_cls=None):
    """The TPU Pallas flash kernel on [B, T, N, H] operands; `CausalMask` -> causal + segment ids.

    Segment ids: a real key is segment 1, padding segment 0, and a query belongs to its own position's
    segment, so a real query sees the real keys before it (exactly `CausalMask`) and a padding query sees
    padding only (at least itself: never an empty row). `kernel` / `segment_ids_cls` are injectable so the
    translation is testable on CPU with the module's pure-JAX reference (`mha_reference_no_custom_vjp`).
    """
    if kernel is None:
        from jax.experimental.pallas.ops.tpu import flash_attention as fa

        kernel, segment_ids_cls = fa.flash_attention, fa.SegmentIds
    tr = lambda x: jnp.swapaxes(x, 1, 2)  # [B, T, N, H] <-> [B, N, T, H]
    seg = None
    if mask is not None:
        ids = mask.key_valid.astype(jnp.int32)
        seg = segment_ids_cls(q=ids, kv=ids)
    # The kernel adds its bias before scaling: (q.k + ab) * scale, so ab = bias / scale.
    ab = (
        None
        if bias is None
        else jnp.broadcast_to(bias / scale, (*q.shape[:1], q.shape[2], q.shape[1], k.shape[1]))
    )
    out = kernel(tr(q), tr(k), tr(v), ab, seg, causal=mask is not None, sm_scale=float(scale))
    return tr(out)


def dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: Array | CausalMask | None = None,
    *,
    bias: Array | None = None,
    scale: float | None = None,
    implementation: str | None = None,
) -> Array:
    """Scaled dot-product attention (MHA or GQA) on the kernel `attention_backend` picks.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H] with N % K == 0 (GQA shares each K head over N / K queries).
      mask: None, a `CausalMask`, or bool broadcastable to [B, N, T, S] (True = attend).
      bias: float[B or 1, N or 1, T, S] added to the scaled logits (SAM's relative positions).
      scale: the logit scale (default 1 / sqrt(H)); applied to q.k before the bias.
      implementation: 'auto' | 'xla' | 'cudnn' | 'pallas' (None = 'xla').
    Returns:
      [B, T, N, H]. Logits and softmax are in fp32 whatever the input dtype; on XLA a query row whose keys
      are all masked (e.g. a left-padding position) gets a uniform average instead of NaN.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    backend = attention_backend(implementation, q, k, mask, bias)
    if backend == "pallas":
        return _pallas_attention(q, k, v, mask, bias, scale).astype(q.dtype)
    causal = isinstance(mask, CausalMask)
    if backend == "cudnn":
        if causal:  # cuDNN skips the masked-out causal blocks; key padding goes in as a mask (a bias)
            t, s = q.shape[1], k.shape[1]
            mask = jnp.broadcast_to(mask.key_valid[:, None, None, :], (q.shape[0], 1, t, s))
        bias = None if bias is None else bias.astype(q.dtype)  # cuDNN takes the bias in the operand dtype
        return jax.nn.dot_product_attention(
            q, k, v, bias, mask, scale=scale, is_causal=causal, implementation="cudnn"
        )
    if causal:
        mask = mask.dense()
    return jax.nn.dot_product_attention(q, k, v, bias, mask, scale=scale, implementation="xla")


def set_attention_implementation(module, implementation: str | None) -> None:
    """Store `implementation` on every attention module under `module` (those with an
    `attention_implementation` attribute): the one switch the model constructors call."""
    if implementation not in (None, *ATTENTION_IMPLEMENTATIONS):
        raise ValueError(
            f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {implementation!r}"
        )
    for _, m in nnx.iter_graph(module):
        if isinstance(m, nnx.Module) and hasattr(m, "attention_implementation"):
            m.attention_implementation = implementation
