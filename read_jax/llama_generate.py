"""Greedy decoding with LLaMA (`read_jax.llama.LlamaForCausalLM`): with the static KV cache (`generate`) and
by full recompute per token (`generate_no_cache`, what READ's reference does; the parity and speed baseline).

The whole loop is one `lax.while_loop` inside one `jit` (no per-token host round trip). Prompts may be left-
or right-padded: the model derives positions from the attention mask, and the first new token is read at
each row's last valid position. EOS and pad ids are traced, not static, so changing them does not recompile.

Shape letters as in `read_jax.llama`: B batch, T prompt length, D model dim, V vocabulary, M new tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from read_jax.llama import LlamaForCausalLM

Array = jax.Array


# ---- greedy decoding --------------------------------------------------------------------------------------
def _last_valid_index(mask: Array) -> Array:
    """bool[B, T] -> int[B], index of the last True (T - 1 for left padding, length - 1 for right)."""
    t = mask.shape[1]
    return jnp.max(jnp.where(mask, jnp.arange(t), 0), axis=1)


def _prepare_generate(model, input_ids, inputs_embeds, attention_mask, max_new_tokens, eos_token_id):
    """Validate (before compile) and normalise the generate arguments."""
    if not isinstance(model, LlamaForCausalLM):
        raise TypeError(f"generate needs a LlamaForCausalLM, got {type(model).__name__}")
    cfg = model.config
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if input_ids is not None:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
        b, t = input_ids.shape
    else:
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != cfg.hidden_size:
            raise ValueError(f"inputs_embeds must be [B, T, {cfg.hidden_size}], got {inputs_embeds.shape}")
        b, t, _ = inputs_embeds.shape
    if t + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt length {t} + max_new_tokens {max_new_tokens} exceeds the position budget "
            f"max_position_embeddings={cfg.max_position_embeddings}"
        )
    if attention_mask is None:
        attention_mask = jnp.ones((b, t), bool)
    elif attention_mask.shape != (b, t):
        raise ValueError(f"attention_mask shape {attention_mask.shape} != (B, T) = {(b, t)}")
    if eos_token_id is None:
        eos = (-1,)  # no token id is negative: never stops early (and shares the compile of one EOS id)
    elif isinstance(eos_token_id, int):
        eos = (eos_token_id,)
    else:
        eos = tuple(int(e) for e in eos_token_id)
    return attention_mask.astype(bool), jnp.asarray(eos, jnp.int32).reshape(len(eos))


def _is_eos(tok: Array, eos: Array) -> Array:
    """int[B], int[E] -> bool[B] (E may be 0: never)."""
    return jnp.any(tok[:, None] == eos[None, :], axis=-1)


# EOS and pad ids are traced (not static) so that changing them does not recompile.
@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "use_cache"))
def _generate_jit(
    graphdef, state, input_ids, inputs_embeds, mask, eos, pad_id, *, max_new_tokens: int, use_cache: bool
):
    model = nnx.merge(graphdef, state)
    if inputs_embeds is None:
        embeds = model.embed(input_ids)
    else:
        embeds = inputs_embeds.astype(model.config.compute_dtype)
    b, t, d = embeds.shape
    m = max_new_tokens
    s = t + m

    def next_token(h_last, done):
        """[B, D] final-norm state -> greedy token, pad for rows that already ended."""
        logits = model.lm_head(h_last).astype(jnp.float32)  # [B, V]: only the positions we decode from
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jnp.where(done, pad_id, tok)

    if use_cache:
        # Prefill: the whole prompt in one call, written at slots [0, T).
        cache = model.init_cache(b, s)
        h, cache = model.model(embeds, mask, cache=cache, cache_index=0)
        carry_extra = cache
        h_last = h[jnp.arange(b), _last_valid_index(mask)]  # [B, D]
    else:
        # Reference path: a fixed [B, T + M] buffer, fully recomputed every step (static shapes, one compile).
        buf = jnp.zeros((b, s, d), embeds.dtype).at[:, :t].set(embeds)
        bmask = jnp.zeros((b, s), bool).at[:, :t].set(mask)
        h, _ = model.model(buf, bmask)
        carry_extra = (buf, bmask)
        h_last = h[jnp.arange(b), _last_valid_index(bmask)]

    done0 = jnp.zeros((b,), bool)
    tok0 = next_token(h_last, done0)
    tokens = jnp.full((b, m), pad_id, jnp.int32).at[:, 0].set(tok0)
    lengths = jnp.ones((b,), jnp.int32)
    done = _is_eos(tok0, eos)

    def cond(c):
        i, _, _, done, _, _ = c
        return (i < m) & ~jnp.all(done)

    def body(c):
        i, tokens, lengths, done, prev, extra = c
        x = model.embed(prev[:, None])  # [B, 1, D]
        slot = t + i - 1  # the previous token's slot
        if use_cache:
            h, extra = model.model(x, jnp.ones((b, 1), bool), cache=extra, cache_index=slot)
            h_last = h[:, 0]
        else:
            buf, bmask = extra
            buf = jax.lax.dynamic_update_slice(buf, x.astype(buf.dtype), (0, slot, 0))
            bmask = jax.lax.dynamic_update_slice(bmask, jnp.ones((b, 1), bool), (0, slot))
            h, _ = model.model(buf, bmask)
            h_last = jax.lax.dynamic_index_in_dim(h, slot, axis=1, keepdims=False)
            extra = (buf, bmask)
        tok = next_token(h_last, done)
        tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, i))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | _is_eos(tok, eos)
        return i + 1, tokens, lengths, done, tok, extra

    init = (jnp.asarray(1, jnp.int32), tokens, lengths, done, tok0, carry_extra)
    _, tokens, lengths, _, _, _ = jax.lax.while_loop(cond, body, init)
    return tokens, lengths


def _run(
    model, input_ids, inputs_embeds, attention_mask, max_new_tokens, eos_token_id, pad_token_id, use_cache
):
    """Validate the arguments (before any compile), then one jitted greedy loop."""
    mask, eos = _prepare_generate(
        model, input_ids, inputs_embeds, attention_mask, max_new_tokens, eos_token_id
    )
    graphdef, state = nnx.split(model)
    pad = jnp.int32(pad_token_id)
    return _generate_jit(
        graphdef,
        state,
        input_ids,
        inputs_embeds,
        mask,
        eos,
        pad,
        max_new_tokens=max_new_tokens,
        use_cache=use_cache,
    )


def generate(
    model: LlamaForCausalLM,
    *,
    inputs_embeds: Array | None = None,
    input_ids: Array | None = None,
    attention_mask: Array | None = None,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int = 0,
) -> tuple[Array, Array]:
    """Greedy decoding with the KV cache: one prefill call, then one token per `while_loop` step, in one jit.

    Args:
      model: the decoder.
      inputs_embeds: [B, T, D] prompt embeddings (LLaVA: text + projected image tokens), or `input_ids`
        int[B, T].
      attention_mask: bool/int[B, T] (left or right padding; None = no padding).
      max_new_tokens: M, the token budget (static: one compile per (B, T, M)).
      eos_token_id: a row stops after emitting it (or any of several ids); None never stops early.
      pad_token_id: written after a row's EOS.
    Returns:
      (tokens int32[B, M], lengths int32[B]): new tokens only, EOS included in `lengths`, `pad_token_id`
      after it. The loop exits once every row has ended or after M tokens.
    Raises:
      ValueError before compiling when T + M > max_position_embeddings or shapes are inconsistent.
    """
    return _run(
        model, input_ids, inputs_embeds, attention_mask, max_new_tokens, eos_token_id, pad_token_id, True
    )


def generate_no_cache(
    model: LlamaForCausalLM,
    *,
    inputs_embeds: Array | None = None,
    input_ids: Array | None = None,
    attention_mask: Array | None = None,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int = 0,
) -> tuple[Array, Array]:
    """Same contract as `generate`, but every step re-runs the full forward over a [B, T + M] buffer.

    This is what READ's reference does (`use_cache=False`, §4); here it is the reference for the cached
    path in tests and the baseline of `benchmarks/decode.py`.
    """
    return _run(
        model, input_ids, inputs_embeds, attention_mask, max_new_tokens, eos_token_id, pad_token_id, False
    )
