"""LLaMA decoder vs `transformers.LlamaForCausalLM` (tiny, random weights, fp32), KV cache, greedy decoding.

Weights go torch -> JAX only through `read_jax.convert.llama.LLAMA_RULES` (the real converter's table), in
`torchref.llama.build_pair`.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from read_jax.config import ReadConfig
from read_jax.convert.common import Converter, abstract_leaves, linear
from read_jax.convert.llama import LLAMA_IGNORE, LLAMA_RULES
from read_jax.llama import LlamaForCausalLM
from read_jax.llama_generate import _generate_jit, generate, generate_no_cache
from read_jax.lora import count_params
from tests.helpers import numpy_init_model, require_torch
from torchref.llama import build_pair, hf_config, tiny_config

ATOL = 1e-5
B, T, M = 3, 12, 8  # one batch shape for every decoding test: each (B, T, M) is one compile

_PAIRS: dict = {}


def cached_pair(kv_heads: int):
    if kv_heads not in _PAIRS:
        require_torch()
        _PAIRS[kv_heads] = build_pair(kv_heads)
    return _PAIRS[kv_heads]


@pytest.fixture(params=[4, 2], ids=["mha", "gqa"])
def pair(request):
    return cached_pair(request.param)


@pytest.fixture
def gqa_pair():
    """Cache and decoding are the same code for MHA and GQA (K == N is a special case); each (config, shape)
    costs seconds of compile on a busy CPU, so those tests run on GQA only (forward parity covers both)."""
    return cached_pair(2)


def padded_batch(rng, vocab, lengths, side):
    """ids int[B, T] (pad id 0), mask int[B, T] with each row's real tokens on the left or right."""
    ids = np.zeros((len(lengths), T), np.int64)
    mask = np.zeros((len(lengths), T), np.int64)
    for i, n in enumerate(lengths):
        sl = slice(T - n, T) if side == "left" else slice(0, n)
        ids[i, sl] = rng.integers(3, vocab, n)
        mask[i, sl] = 1
    return ids, mask


_forward = nnx.jit(lambda m, ids, mask: m(ids, attention_mask=mask))


# ---- forward parity -------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
def test_forward_parity_with_hf(pair, side):
    torch = require_torch()
    ref, model, cfg = pair
    ids, mask = padded_batch(np.random.default_rng(1), cfg.vocab_size, [T, 9, 5], side)
    kw = {}
    if side == "left":
        # HF generate's position_ids for left padding (pads get 1; real tokens count from 0).
        pos = np.cumsum(mask, 1) - 1
        kw["position_ids"] = torch.tensor(np.where(mask == 0, 1, pos))
    out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True, **kw)
    base = ref.model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kw)
    # transformers 5.x: hidden_states[-1] is the final-norm output (= last_hidden_state), as READ assumes.
    torch.testing.assert_close(out.hidden_states[-1], base.last_hidden_state, atol=0, rtol=0)

    got = _forward(model, jnp.asarray(ids), jnp.asarray(mask))
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got.logits)[valid], out.logits.numpy()[valid], atol=ATOL, rtol=0)
    np.testing.assert_allclose(
        np.asarray(got.hidden_states)[valid], base.last_hidden_state.numpy()[valid], atol=ATOL, rtol=0
    )
    assert got.logits.dtype == jnp.float32 and got.logits.shape == (B, T, cfg.vocab_size)
    assert np.abs(out.logits.numpy()[valid]).max() > 0.5  # the comparison is not between near-zero numbers


def test_padding_side_invariance(pair):
    """The same rows padded left and right give the same outputs on their real tokens."""
    _, model, cfg = pair
    lengths = [T, 9, 5]
    ids_l, mask_l = padded_batch(np.random.default_rng(2), cfg.vocab_size, lengths, "left")
    ids_r = np.zeros_like(ids_l)
    mask_r = np.zeros_like(mask_l)
    for i, n in enumerate(lengths):
        ids_r[i, :n], mask_r[i, :n] = ids_l[i, T - n :], 1
    out_l = _forward(model, jnp.asarray(ids_l), jnp.asarray(mask_l))
    out_r = _forward(model, jnp.asarray(ids_r), jnp.asarray(mask_r))
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(out_l.logits[i, T - n :], out_r.logits[i, :n], atol=ATOL, rtol=0)


def test_inputs_embeds_equals_input_ids(gqa_pair):
    _, model, cfg = gqa_pair
    ids, mask = padded_batch(np.random.default_rng(3), cfg.vocab_size, [T, 7, 4], "left")
    a = _forward(model, jnp.asarray(ids), jnp.asarray(mask))
    b = nnx.jit(lambda m, e, k: m(inputs_embeds=e, attention_mask=k))(
        model, model.embed(jnp.asarray(ids)), jnp.asarray(mask)
    )
    assert b.hidden_states.shape == (B, T, cfg.hidden_size)
    np.testing.assert_allclose(a.logits, b.logits, atol=ATOL, rtol=0)


# ---- KV cache and greedy decoding --------------------------------------------------------------------------
def test_cached_steps_match_full_forward(gqa_pair):
    """Prefill + one-token cached steps give the logits of a full forward over the whole sequence."""
    _, model, cfg = gqa_pair
    ids, mask = padded_batch(np.random.default_rng(4), cfg.vocab_size, [T, 10, 6], "left")
    new = np.random.default_rng(5).integers(3, cfg.vocab_size, (B, M))
    full_ids = np.concatenate([ids, new], 1)
    full_mask = np.concatenate([mask, np.ones((B, M), np.int64)], 1)
    full = _forward(model, jnp.asarray(full_ids), jnp.asarray(full_mask))

    @nnx.jit
    def prefill(m, i, k):
        return m(i, attention_mask=k, cache=m.init_cache(B, T + M), cache_index=0)

    @nnx.jit
    def step(m, tok, cache, idx):
        return m(tok, cache=cache, cache_index=idx)

    out = prefill(model, jnp.asarray(ids), jnp.asarray(mask))
    valid = mask.astype(bool)
    np.testing.assert_allclose(
        np.asarray(out.logits)[valid], np.asarray(full.logits[:, :T])[valid], atol=ATOL, rtol=0
    )
    cache = out.cache
    for j in range(M):
        out = step(model, jnp.asarray(new[:, j : j + 1]), cache, jnp.asarray(T + j))
        cache = out.cache
        np.testing.assert_allclose(out.logits[:, 0], full.logits[:, T + j], atol=ATOL, rtol=0)
        np.testing.assert_allclose(out.hidden_states[:, 0], full.hidden_states[:, T + j], atol=ATOL, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_generate_cache_equals_no_cache_and_hf(gqa_pair, side):
    torch = require_torch()
    ref, model, cfg = gqa_pair
    ids, mask = padded_batch(np.random.default_rng(6), cfg.vocab_size, [T, 9, 5], side)
    kw = {
        "input_ids": jnp.asarray(ids),
        "attention_mask": jnp.asarray(mask),
        "max_new_tokens": M,
        "pad_token_id": 0,
    }
    free, free_len = generate(model, eos_token_id=None, **kw)
    assert free.shape == (B, M) and np.all(np.asarray(free_len) == M)
    # An EOS that row 0 emits at step 2 (and maybe others later): rows must stop there and pad after.
    eos = int(free[0, 2])
    tokens, lengths = generate(model, eos_token_id=eos, **kw)
    tokens_nc, lengths_nc = generate_no_cache(model, eos_token_id=eos, **kw)
    np.testing.assert_array_equal(tokens, tokens_nc)
    np.testing.assert_array_equal(lengths, lengths_nc)
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    assert lengths[0] <= 3 and tokens[0, lengths[0] - 1] == eos and np.all(tokens[0, lengths[0] :] == 0)

    # Independent reference: the greedy tokens are the argmax of a full forward over prompt + tokens[:-1].
    seq = np.concatenate([ids, free], 1)
    seq_mask = np.concatenate([mask, np.ones((B, M), np.int64)], 1)
    full = _forward(model, jnp.asarray(seq), jnp.asarray(seq_mask))
    last = np.array([np.flatnonzero(r).max() for r in mask])
    pred = np.argmax(np.asarray(full.logits), -1)
    np.testing.assert_array_equal(pred[np.arange(B), last], free[:, 0])
    np.testing.assert_array_equal(pred[:, T : T + M - 1], free[:, 1:])

    if side == "left":  # HF generate assumes left padding for decoder-only models
        hf = ref.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=M,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos,
            pad_token_id=0,
        )
        hf_new = hf[:, T:].numpy()
        np.testing.assert_array_equal(tokens[:, : hf_new.shape[1]], hf_new)
        assert np.all(tokens[:, hf_new.shape[1] :] == 0)


def test_batch_of_one_equals_row_of_padded_batch(gqa_pair):
    _, model, cfg = gqa_pair
    ids, mask = padded_batch(np.random.default_rng(7), cfg.vocab_size, [T, 7, 10], "left")
    kw = {"max_new_tokens": M, "eos_token_id": None}
    tokens, _ = generate(model, input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask), **kw)
    row, n = 1, 7
    single = jnp.asarray(ids[row : row + 1, T - n :])  # unpadded
    tok1, _ = generate(model, input_ids=single, **kw)
    np.testing.assert_array_equal(tok1[0], tokens[row])
    l1 = _forward(model, single, jnp.ones(single.shape, bool)).logits
    lb = _forward(model, jnp.asarray(ids), jnp.asarray(mask)).logits
    np.testing.assert_allclose(l1[0], lb[row, T - n :], atol=ATOL, rtol=0)


def test_generate_with_inputs_embeds(gqa_pair):
    """LLaVA decodes from merged embeddings: same tokens as from the ids those embeddings came from."""
    _, model, cfg = gqa_pair
    ids, mask = padded_batch(np.random.default_rng(8), cfg.vocab_size, [T, 8, 11], "left")
    kw = {"attention_mask": jnp.asarray(mask), "max_new_tokens": M, "eos_token_id": None}
    a, _ = generate(model, input_ids=jnp.asarray(ids), **kw)
    b, _ = generate(model, inputs_embeds=model.embed(jnp.asarray(ids)), **kw)
    np.testing.assert_array_equal(a, b)


# ---- bad input ------------------------------------------------------------------------------------------
def test_bad_input_raises_before_compile():
    cfg = tiny_config(2)
    model = numpy_init_model(cfg)
    ids = jnp.zeros((2, 10), jnp.int32)
    compiled = _generate_jit._cache_size()
    with pytest.raises(ValueError, match="position budget"):
        generate(model, input_ids=ids, max_new_tokens=cfg.max_position_embeddings - 9, eos_token_id=2)
    with pytest.raises(ValueError, match="position budget"):
        generate_no_cache(model, input_ids=ids, max_new_tokens=cfg.max_position_embeddings, eos_token_id=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, input_ids=ids, max_new_tokens=0, eos_token_id=2)
    with pytest.raises(ValueError, match="attention_mask shape"):
        generate(model, input_ids=ids, attention_mask=jnp.ones((2, 9)), max_new_tokens=4, eos_token_id=2)
    with pytest.raises(ValueError, match="inputs_embeds must be"):
        generate(model, inputs_embeds=jnp.zeros((2, 10, 7)), max_new_tokens=4, eos_token_id=2)
    assert _generate_jit._cache_size() == compiled  # nothing was traced or compiled

    with pytest.raises(ValueError, match="exactly one of"):
        model(ids, inputs_embeds=jnp.zeros((2, 10, cfg.hidden_size)))
    with pytest.raises(ValueError, match="exactly one of"):
        model()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(jnp.zeros((1, cfg.max_position_embeddings + 1), jnp.int32))
    with pytest.raises(ValueError, match="cache_index"):
        model(ids, cache=model.init_cache(2, 16))
    with pytest.raises(ValueError, match="overflow the cache"):
        model(ids, cache=model.init_cache(2, 16), cache_index=8)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        model.init_cache(1, cfg.max_position_embeddings + 1)
    with pytest.raises(ValueError, match="must be integers"):
        model(jnp.zeros((2, 10)))


# ---- full-size shapes, never materialised -----------------------------------------------------------------
@pytest.mark.parametrize("size", ["read_7b", "read_13b"])
def test_full_size_param_count_matches_hf_meta(size):
    torch = require_torch()
    from transformers import LlamaForCausalLM as HFLlama

    cfg = getattr(ReadConfig, size)().llama
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(abstract)
    with torch.device("meta"):
        ref = HFLlama(hf_config(cfg))
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert count_params(state) == sum(int(np.prod(s)) for s in shapes.values())
    # Every HF key maps through the converter's table to a leaf of the same (transposed) shape.
    target = abstract_leaves(state)
    conv = Converter(LLAMA_RULES, target, ignore=LLAMA_IGNORE)
    mapped = {}
    for key, shape in shapes.items():
        rule = next(r for r in LLAMA_RULES if r.match(key) is not None)
        mapped[rule.match(key)] = shape[::-1] if rule.transform is linear else shape
    assert conv.map_key("lm_head.weight") == "lm_head/kernel"
    assert mapped == {k: tuple(v.shape) for k, v in target.items()}
    assert all(v.dtype == jnp.bfloat16 for v in target.values())
