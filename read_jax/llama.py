"""LLaMA-2 / Vicuna-v1.5 decoder (the LLM of LLaVA-1.5 and READ) with a static KV cache; greedy decoding with
it is `read_jax.llama_generate`.

PyTorch reference: transformers 4.31 `models/llama/modeling_llama.py` (`LlamaForCausalLM`), as used by
LLaVA-1.5/READ (`model/llava/model/language_model/llava_llama.py`); read_reference.md §2.1 and §4.

Shape letters: B batch, T query length, S key/value (cache) length, N query heads, K key/value heads,
H head dim, D model dim (hidden_size), F MLP dim (intermediate_size), V vocabulary, L layers,
M new tokens (max_new_tokens).

Parameter paths mirror the HF keys (`model.layers.3.self_attn.q_proj.weight` ->
`model/layers/3/self_attn/q_proj/kernel`); `read_jax.convert.llama` holds the key table.

Padding: every forward takes a `[B, T]` attention mask and derives positions as `cumsum(mask) - 1`, so left
and right padding give the same outputs on the real tokens as an unpadded row (this is what HF `generate`
does with `position_ids`). Decoding writes new keys/values into a cache preallocated to a static length and
masks cache slots that are padding or not yet written; the whole greedy loop (`llama_generate`) is one
`lax.while_loop` inside one `jit` (no per-token host round trip).
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from read_jax.config import LlamaConfig
from read_jax.layers import (
    CausalMask,
    Linear,
    RMSNorm,
    apply_rope,
    causal_padding_mask,
    dot_product_attention,
    rope_cos_sin,
    set_attention_implementation,
)

Array = jax.Array


def _init(cfg: LlamaConfig):
    """HF `LlamaPreTrainedModel._init_weights`: normal(0, initializer_range) for every Linear and the
    embedding."""
    return nnx.initializers.normal(cfg.initializer_range)


# ---- outputs and cache ------------------------------------------------------------------------------------
@flax.struct.dataclass
class KVCache:
    """Keys/values of every layer, preallocated to S slots.

    k, v: L-tuples of [B, S, K, H] (the compute dtype). mask: bool[B, S], True where a slot holds a real
    (non-padding) token; slots not yet written are False, so attention never sees them.
    """

    k: tuple[Array, ...]
    v: tuple[Array, ...]
    mask: Array

    @property
    def max_length(self) -> int:
        return self.mask.shape[1]


@flax.struct.dataclass
class LlamaOutput:
    """logits: float32[B, T, V]; hidden_states: [B, T, D], the final RMSNorm output (what READ reads for
    [SEG] and SasP, §2.1); cache: the updated KVCache when one was passed, else None."""

    logits: Array
    hidden_states: Array
    cache: KVCache | None = None


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache of `max_len` slots (dtype defaults to the compute dtype)."""
    if max_len > cfg.max_position_embeddings:
        raise ValueError(
            f"cache length {max_len} exceeds max_position_embeddings {cfg.max_position_embeddings}"
        )
    dtype = dtype or cfg.compute_dtype
    shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers))
    return KVCache(
        k=zeros,
        v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers)),
        mask=jnp.zeros((batch, max_len), bool),
    )


# ---- modules ----------------------------------------------------------------------------------------------
class LlamaAttention(nnx.Module):
    """Causal self-attention with RoPE on q/k, MHA (K == N) or GQA (K < N), no biases."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        lin = functools.partial(
            Linear,
            use_bias=False,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.weight_dtype,
            kernel_init=_init(cfg),
            rngs=rngs,
        )
        d, h = cfg.hidden_size, cfg.head_dim
        self.q_proj = lin(d, self.num_heads * h)
        self.k_proj = lin(d, self.num_kv_heads * h)
        self.v_proj = lin(d, self.num_kv_heads * h)
        self.o_proj = lin(self.num_heads * h, d)
        self.attention_implementation: str | None = None  # `layers.set_attention_implementation`

    def __call__(
        self,
        x: Array,
        cos: Array,
        sin: Array,
        mask: Array,
        kv: tuple[Array, Array] | None,
        cache_index,
        *,
        deterministic: bool,
        rngs: nnx.Rngs | None,
        kv_len: int | None = None,
    ):
        """x: [B, T, D]; cos/sin: [B, T, H]; kv: cached ([B, S, K, H],) * 2 or None.

        mask: a `CausalMask` (self-attention over these T tokens: no cache, or a prefill from slot 0), or
        bool[B, 1, T, S'] where S' = kv_len if given (attend to the first kv_len cache slots only), else S.
        Returns ([B, T, D], updated kv or None).
        """
        b, t, _ = x.shape
        kw = {"deterministic": deterministic, "rngs": rngs}
        q = self.q_proj(x, **kw).reshape(b, t, self.num_heads, self.head_dim)  # [B, T, N, H]
        k = self.k_proj(x, **kw).reshape(b, t, self.num_kv_heads, self.head_dim)  # [B, T, K, H]
        v = self.v_proj(x, **kw).reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            # Write this chunk at its slots; attention then runs over all S slots, masked.
            k_cache, v_cache = kv
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)  # [B, S, K, H]
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
            kv = (k, v)
            if kv_len is not None:
                k, v = k[:, :kv_len], v[:, :kv_len]
        o = dot_product_attention(
            q, k.astype(q.dtype), v.astype(q.dtype), mask, implementation=self.attention_implementation
        )  # [B, T, N, H]
        return self.o_proj(o.reshape(b, t, self.num_heads * self.head_dim), **kw), kv


class LlamaMLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        lin = functools.partial(
            Linear,
            use_bias=False,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.weight_dtype,
            kernel_init=_init(cfg),
            rngs=rngs,
        )
        self.gate_proj = lin(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = lin(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = lin(cfg.intermediate_size, cfg.hidden_size)

    def __call__(self, x: Array, *, deterministic: bool, rngs: nnx.Rngs | None) -> Array:
        """[B, T, D] -> [B, T, D] (via [B, T, F])."""
        kw = {"deterministic": deterministic, "rngs": rngs}
        return self.down_proj(jax.nn.silu(self.gate_proj(x, **kw)) * self.up_proj(x, **kw), **kw)


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        norm = functools.partial(
            RMSNorm,
            cfg.hidden_size,
            eps=cfg.rms_norm_eps,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.weight_dtype,
        )
        self.self_attn = LlamaAttention(cfg, rngs=rngs)
        self.mlp = LlamaMLP(cfg, rngs=rngs)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()

    def __call__(
        self,
        x,
        cos,
        sin,
        mask,
        kv,
        cache_index,
        *,
        deterministic: bool,
        rngs: nnx.Rngs | None,
        kv_len: int | None = None,
    ):
        """x: [B, T, D] -> ([B, T, D], kv); see `LlamaAttention`."""
        a, kv = self.self_attn(
            self.input_layernorm(x),
            cos,
            sin,
            mask,
            kv,
            cache_index,
            deterministic=deterministic,
            rngs=rngs,
            kv_len=kv_len,
        )
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x), deterministic=deterministic, rngs=rngs)
        return x, kv


class LlamaModel(nnx.Module):
    """Token embedding, L decoder layers, final RMSNorm (HF `LlamaModel`)."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.weight_dtype,
            embedding_init=_init(cfg),
            rngs=rngs,
        )
        self.layers = nnx.List([LlamaDecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(
            cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype
        )

    def __call__(
        self,
        inputs_embeds: Array,
        attention_mask: Array,
        positions: Array | None = None,
        cache: KVCache | None = None,
        cache_index=None,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> tuple[Array, KVCache | None]:
        """inputs_embeds: [B, T, D]; attention_mask: bool[B, T]; positions: int[B, T] or None.

        Returns (final-norm hidden states [B, T, D], updated cache or None). Inputs are assumed validated
        (see `LlamaForCausalLM.__call__`).
        """
        cfg = self.config
        t = inputs_embeds.shape[1]
        if cache is None:
            key_valid = attention_mask  # [B, S=T]
            query_slots = jnp.arange(t)
        else:
            key_valid = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, cache_index))  # [B, S]
            query_slots = cache_index + jnp.arange(t)
        if positions is None:
            # Position of a token = number of real tokens before it; padding gets a clipped dummy position.
            csum = jnp.cumsum(key_valid.astype(jnp.int32), axis=1) - 1  # [B, S]
            if cache is not None:
                csum = jax.lax.dynamic_slice_in_dim(csum, cache_index, t, axis=1)  # [B, T]
            positions = jnp.maximum(csum, 0)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)  # [B, T, H]
        # With a static cache_index (prefill), slots >= cache_index + T are known to be empty: attend to the
        # written prefix only instead of masking the whole cache (saves (S - T) / S of the prefill attention).
        kv_len = cache_index + t if cache is not None and isinstance(cache_index, int) else None
        if cache is None or (kv_len == t and cache_index == 0):
            mask = CausalMask(key_valid[:, :t])  # plain causal + padding: what fused kernels take natively
        else:
            mask = causal_padding_mask(query_slots, key_valid[:, :kv_len])  # [B, 1, T, S or kv_len]

        # One dropout key per layer, drawn here (outside any remat) so that remat and no-remat runs see the
        # same masks and no Rngs state is mutated inside a checkpointed function.
        keys = [None] * cfg.num_hidden_layers
        if not deterministic and rngs is not None:
            keys = list(jax.random.split(rngs.dropout(), cfg.num_hidden_layers))

        x = inputs_embeds.astype(cfg.compute_dtype)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            if cfg.remat and cache is None:
                x = _remat_layer(layer, x, cos, sin, mask, keys[i], deterministic)
                continue
            kv = None if cache is None else (cache.k[i], cache.v[i])
            x, kv = layer(
                x,
                cos,
                sin,
                mask,
                kv,
                cache_index,
                deterministic=deterministic,
                rngs=_layer_rngs(keys[i]),
                kv_len=kv_len,
            )
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        x = self.norm(x)
        new_cache = None if cache is None else KVCache(k=tuple(new_k), v=tuple(new_v), mask=key_valid)
        return x, new_cache


def _layer_rngs(key: Array | None) -> nnx.Rngs | None:
    return None if key is None else nnx.Rngs(dropout=key)


def _remat_layer(layer: LlamaDecoderLayer, x, cos, sin, mask, key, deterministic: bool) -> Array:
    """Gradient checkpointing of one decoder layer (§6.1): only its inputs are kept for the backward pass.

    Functional `jax.checkpoint` over the layer's state: layers hold no mutable state, and the dropout key is
    an explicit argument, so nothing has to flow back out of the checkpointed trace.
    """
    graphdef, state = nnx.split(layer)

    def f(state, x, cos, sin, mask, key):
        out, _ = nnx.merge(graphdef, state)(
            x, cos, sin, mask, None, None, deterministic=deterministic, rngs=_layer_rngs(key)
        )
        return out

    return jax.checkpoint(f)(state, x, cos, sin, mask, key)


class LlamaForCausalLM(nnx.Module):
    """LLaMA decoder plus an untied `lm_head` (HF `LlamaForCausalLM`).

    Attributes: `model` (`embed_tokens`, `layers`, `norm`) and `lm_head`, so NNX paths read
    `model/layers/3/self_attn/q_proj/kernel`, `model/embed_tokens/embedding`, `lm_head/kernel`.
    Parameters are stored in `cfg.weight_dtype` and computed in `cfg.compute_dtype`; logits are fp32.

    Args:
      cfg: the architecture.
      rngs: `params` stream for initialisation.
      attention_implementation: the attention kernel, 'auto' | 'xla' | 'cudnn' | 'pallas' (None = XLA); see
        `read_jax.layers.attention_backend` (fused kernels fall back to XLA where they do not apply).
    """

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, attention_implementation: str | None = None):
        self.config = cfg
        self.model = LlamaModel(cfg, rngs=rngs)
        self.lm_head = Linear(
            cfg.hidden_size,
            cfg.vocab_size,
            use_bias=False,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.weight_dtype,
            kernel_init=_init(cfg),
            rngs=rngs,
        )
        set_attention_implementation(self, attention_implementation)

    def embed(self, input_ids: Array) -> Array:
        """int[B, T] -> [B, T, D] token embeddings in the compute dtype (LLaVA merges images into these)."""
        return self.model.embed_tokens(input_ids)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty KVCache of `max_len` slots; see `init_cache`."""
        return init_cache(self.config, batch, max_len, dtype)

    def __call__(
        self,
        input_ids: Array | None = None,
        *,
        inputs_embeds: Array | None = None,
        attention_mask: Array | None = None,
        positions: Array | None = None,
        cache: KVCache | None = None,
        cache_index=None,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> LlamaOutput:
        """Forward pass.

        Args:
          input_ids: int[B, T], or None when `inputs_embeds` [B, T, D] is given (exactly one of the two).
          attention_mask: bool/int[B, T], 1 for real tokens (None = all real). Left or right padding.
          positions: int[B, T] RoPE positions; default `max(cumsum(mask) - 1, 0)` (over the cache when
            decoding, so a decode step continues each row's own count).
          cache, cache_index: a KVCache and the (static or traced) slot where these T tokens are written.
          deterministic: False enables LoRA dropout (needs `rngs` with a `dropout` stream).
        Returns:
          LlamaOutput(logits float32[B, T, V], hidden_states [B, T, D] (final-norm output), cache).
        """
        embeds, mask = self._check_inputs(
            input_ids, inputs_embeds, attention_mask, positions, cache, cache_index
        )
        h, cache = self.model(
            embeds, mask, positions, cache, cache_index, deterministic=deterministic, rngs=rngs
        )
        logits = self.lm_head(h, deterministic=deterministic, rngs=rngs).astype(jnp.float32)
        return LlamaOutput(logits=logits, hidden_states=h, cache=cache)

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, positions, cache, cache_index):
        """Shape checks (at trace time, i.e. before any compile) -> (embeds [B, T, D], bool mask [B, T])."""
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            if input_ids.ndim != 2:
                raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
            if not jnp.issubdtype(input_ids.dtype, jnp.integer):
                raise ValueError(f"input_ids must be integers, got {input_ids.dtype}")
            inputs_embeds = self.embed(input_ids)
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != cfg.hidden_size:
            raise ValueError(f"inputs_embeds must be [B, T, {cfg.hidden_size}], got {inputs_embeds.shape}")
        b, t, _ = inputs_embeds.shape
        if attention_mask is None:
            mask = jnp.ones((b, t), bool)
        else:
            if attention_mask.shape != (b, t):
                raise ValueError(f"attention_mask shape {attention_mask.shape} != (B, T) = {(b, t)}")
            mask = attention_mask.astype(bool)
        if positions is not None and positions.shape != (b, t):
            raise ValueError(f"positions shape {positions.shape} != (B, T) = {(b, t)}")
        if cache is None:
            if cache_index is not None:
                raise ValueError("cache_index given without a cache")
            if t > cfg.max_position_embeddings:
                raise ValueError(
                    f"sequence length {t} exceeds max_position_embeddings {cfg.max_position_embeddings}"
                )
        else:
            if cache_index is None:
                raise ValueError("a cache needs cache_index (the slot of the first of these T tokens)")
            if cache.mask.shape[0] != b or len(cache.k) != cfg.num_hidden_layers:
                raise ValueError(
                    f"cache is for batch {cache.mask.shape[0]} and {len(cache.k)} layers, "
                    f"inputs have batch {b} and the model {cfg.num_hidden_layers} layers"
                )
            if isinstance(cache_index, int) and not 0 <= cache_index <= cache.max_length - t:
                raise ValueError(
                    f"{t} tokens at slot {cache_index} overflow the cache of {cache.max_length} slots"
                )
            if t > cache.max_length:
                raise ValueError(f"{t} tokens do not fit a cache of {cache.max_length} slots")
        return inputs_embeds, mask
