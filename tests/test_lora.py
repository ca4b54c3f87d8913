"""LoRA on the LLaMA decoder: zero-init identity, torch-merged parity, merge == unmerged, loud regex failures,
dropout on the LoRA branch only, PEFT key table, and the trainable/frozen tree spec READ trains (§6.1)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from read_jax.config import LoraConfig, ReadConfig
from read_jax.convert.common import abstract_leaves, convert, linear
from read_jax.convert.llama import LLAMA_IGNORE, LLAMA_RULES, PEFT_LLAMA_RULES
from read_jax.llama import LlamaForCausalLM
from read_jax.lora import (
    apply_lora,
    linear_paths,
    lora_state,
    merge_lora,
    partition_trainable,
    split_lora,
    trainable_filter,
)
from tests.helpers import numpy_init_model, require_torch
from torchref.llama import build_pair

ATOL = 1e-5
LORA = LoraConfig(r=4, alpha=16.0, dropout=0.05)


def tiny_llama(**kw):
    """ReadConfig.tiny()'s LLaMA with a 128-token vocabulary (the numerics do not need 32003 rows)."""
    cfg = dataclasses.replace(ReadConfig.tiny().llama, vocab_size=128, **kw)
    return cfg, numpy_init_model(cfg)


def randomize_lora_b(model, seed=0):
    """Non-zero B everywhere (B starts at zero, which would make every LoRA test vacuous)."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    for lin in linear_paths(model).values():
        if lin.has_lora:
            lin.lora_b[...] = 0.3 * jax.random.normal(next(keys), lin.lora_b[...].shape)


def inputs(vocab, b=2, t=10, seed=0):
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(3, vocab, (b, t)))
    mask = jnp.asarray(np.arange(t)[None] >= np.array([[0], [3]]))  # row 1 left-padded by 3
    return ids, mask


_fwd = nnx.jit(lambda m, i, k: m(i, attention_mask=k).logits)


def test_zero_init_b_leaves_outputs_unchanged():
    cfg, model = tiny_llama()
    ids, mask = inputs(cfg.vocab_size)
    before = _fwd(model, ids, mask)
    apply_lora(model, LORA, rngs=nnx.Rngs(1))
    after = _fwd(model, ids, mask)
    np.testing.assert_array_equal(before, after)
    # A is PEFT's kaiming-uniform(a=sqrt 5): U(-1/sqrt(I), 1/sqrt(I)), not zero.
    a = model.model.layers[0].self_attn.q_proj.lora_a[...]
    bound = 1 / np.sqrt(cfg.hidden_size)
    assert a.shape == (cfg.hidden_size, LORA.r) and np.abs(a).max() <= bound and np.abs(a).max() > bound / 2
    assert np.all(np.asarray(model.model.layers[0].self_attn.q_proj.lora_b[...]) == 0)


def test_lora_forward_matches_torch_with_folded_weights():
    """LoRA forward == HF LlamaForCausalLM whose q/v weights get + (alpha/r) * (A @ B)^T, folded in torch."""
    torch = require_torch()
    ref, model, cfg = build_pair(kv_heads=2, seed=1)
    apply_lora(model, LORA, rngs=nnx.Rngs(2))
    randomize_lora_b(model)
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            for name in ("q_proj", "v_proj"):
                lin = getattr(model.model.layers[i].self_attn, name)
                a = torch.tensor(np.asarray(lin.lora_a[...]))
                b = torch.tensor(np.asarray(lin.lora_b[...]))
                getattr(layer.self_attn, name).weight += (LORA.alpha / LORA.r) * (a @ b).T
    ids, mask = inputs(cfg.vocab_size, t=8)
    pos = torch.tensor(np.maximum(np.cumsum(np.asarray(mask), 1) - 1, 0))
    want = ref(
        input_ids=torch.tensor(np.asarray(ids)),
        attention_mask=torch.tensor(np.asarray(mask)).long(),
        position_ids=pos,
    ).logits.numpy()
    got = np.asarray(_fwd(model, ids, mask))
    valid = np.asarray(mask)
    np.testing.assert_allclose(got[valid], want[valid], atol=ATOL, rtol=0)


@pytest.mark.parametrize("unload", [True, False])
def test_merged_equals_unmerged(unload):
    cfg, model = tiny_llama()
    apply_lora(model, LORA, rngs=nnx.Rngs(1))
    randomize_lora_b(model)
    ids, mask = inputs(cfg.vocab_size)
    unmerged = np.asarray(_fwd(model, ids, mask))
    q0 = np.asarray(model.model.layers[0].self_attn.q_proj.kernel[...])
    merge_lora(model, unload=unload)
    merged = np.asarray(_fwd(model, ids, mask))
    np.testing.assert_allclose(merged, unmerged, atol=ATOL, rtol=0)
    assert not np.allclose(model.model.layers[0].self_attn.q_proj.kernel[...], q0)  # the fold happened
    n_lora = len(jax.tree.leaves(lora_state(model)))
    assert n_lora == (0 if unload else 2 * 2 * cfg.num_hidden_layers)
    if unload:  # the released-checkpoint layout: no LoRA keys, same paths as a plain model
        plain = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
        assert set(abstract_leaves(model)) == set(abstract_leaves(plain))


def test_wrong_regex_fails_loudly():
    _, model = tiny_llama()
    only_q = dataclasses.replace(LORA, target_regex=r"(.*/)?model/layers/\d+/self_attn/q_proj")
    with pytest.raises(ValueError, match=r"matched 2 modules, expected 4.*layers/0/self_attn/q_proj"):
        apply_lora(model, only_q, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="matched 0 modules, expected 4"):
        apply_lora(
            model, dataclasses.replace(LORA, target_regex=r"model/layers/\d+/attn/q_proj"), rngs=nnx.Rngs(1)
        )
    with pytest.raises(ValueError, match=r"not read_jax.layers.Linear"):
        apply_lora(
            model,
            dataclasses.replace(LORA, target_regex=r"model/layers/\d+/self_attn"),
            rngs=nnx.Rngs(1),
            expected_matches=2,
        )
    assert len(jax.tree.leaves(lora_state(model))) == 0  # failures leave the model untouched
    # An explicit count overrides the 2 x layers default.
    assert apply_lora(model, only_q, rngs=nnx.Rngs(1), expected_matches=2) == [
        "model/layers/0/self_attn/q_proj",
        "model/layers/1/self_attn/q_proj",
    ]


def test_dropout_only_on_lora_branch():
    cfg, model = tiny_llama()
    ids, mask = inputs(cfg.vocab_size)
    base = np.asarray(_fwd(model, ids, mask))
    apply_lora(model, LORA, rngs=nnx.Rngs(1))
    train = nnx.jit(lambda m, i, k, r: m(i, attention_mask=k, deterministic=False, rngs=r).logits)
    # B = 0: the dropped-out branch contributes nothing, so training mode equals the base model.
    np.testing.assert_allclose(train(model, ids, mask, nnx.Rngs(dropout=0)), base, atol=ATOL, rtol=0)
    randomize_lora_b(model)
    det = np.asarray(_fwd(model, ids, mask))
    t1 = np.asarray(train(model, ids, mask, nnx.Rngs(dropout=0)))
    t2 = np.asarray(train(model, ids, mask, nnx.Rngs(dropout=1)))
    assert not np.allclose(t1, det, atol=1e-4) and not np.allclose(t1, t2, atol=1e-4)
    with pytest.raises(ValueError, match="no `rngs`"):
        model(ids, attention_mask=mask, deterministic=False)


def test_peft_keys_convert_to_lora_leaves():
    """PEFT state-dict names, with and without `base_model.model.` and `.default`, land on lora_a/lora_b."""
    cfg, model = tiny_llama()
    apply_lora(model, LORA, rngs=nnx.Rngs(1))
    randomize_lora_b(model)
    leaves = {k: np.asarray(v) for k, v in abstract_leaves(model).items()}
    # Build a torch-layout state dict from the JAX leaves: base weights via the plain table's inverse,
    # LoRA as PEFT stores it (lora_A.weight [R, I], lora_B.weight [O, R]).
    sd = {}
    for i in range(cfg.num_hidden_layers):
        for name in ("q_proj", "v_proj"):
            p = f"model/layers/{i}/self_attn/{name}"
            prefix = "base_model.model." if i == 0 else ""
            suffix = ".default" if name == "v_proj" else ""
            sd[f"{prefix}model.layers.{i}.self_attn.{name}.lora_A{suffix}.weight"] = leaves[p + "/lora_a"].T
            sd[f"{prefix}model.layers.{i}.self_attn.{name}.lora_B{suffix}.weight"] = leaves[p + "/lora_b"].T
    for key_path, arr in leaves.items():
        if "lora_" in key_path:
            continue
        rule_key = {
            "model/embed_tokens/embedding": "model.embed_tokens.weight",
            "model/norm/scale": "model.norm.weight",
            "lm_head/kernel": "lm_head.weight",
        }.get(key_path)
        if rule_key is None:
            # model/layers/i/<block>/<name>/<leaf>  or  model/layers/i/<norm>/scale
            parts = key_path.split("/")
            rule_key = ".".join(parts[:-1]) + ".weight"
        rule = next(r for r in LLAMA_RULES if r.match(rule_key) == key_path)
        sd[rule_key] = arr.T if rule.transform is linear else arr
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(cfg.head_dim // 2)
    out = convert(sd, PEFT_LLAMA_RULES, abstract_leaves(model), ignore=LLAMA_IGNORE)
    assert set(out) == set(leaves)
    for k, want in leaves.items():
        np.testing.assert_array_equal(out[k], want)


def test_trainable_frozen_tree_spec():
    """READ trains all LoRA A/B, the whole embed_tokens and the whole lm_head; everything else is frozen."""
    cfg = ReadConfig.tiny()

    def build():
        model = LlamaForCausalLM(cfg.llama, rngs=nnx.Rngs(0))
        apply_lora(model, cfg.lora, rngs=nnx.Rngs(1))
        return model

    model = nnx.eval_shape(build)  # the spec needs shapes only
    _, trainable, frozen = partition_trainable(model, cfg.trainable_regexes)
    spec = lambda st: {
        "/".join(map(str, p)): (type(v).__name__, tuple(v.get_value().shape))
        for p, v in nnx.to_flat_state(st)
    }
    lc = cfg.llama
    d, f, v, r = lc.hidden_size, lc.intermediate_size, lc.vocab_size, cfg.lora.r
    kv = lc.num_key_value_heads * lc.head_dim
    want_trainable = {"model/embed_tokens/embedding": ("Param", (v, d)), "lm_head/kernel": ("Param", (d, v))}
    want_frozen = {"model/norm/scale": ("Param", (d,))}
    for i in range(lc.num_hidden_layers):
        p = f"model/layers/{i}"
        want_trainable.update(
            {
                f"{p}/self_attn/q_proj/lora_a": ("LoRAParam", (d, r)),
                f"{p}/self_attn/q_proj/lora_b": ("LoRAParam", (r, d)),
                f"{p}/self_attn/v_proj/lora_a": ("LoRAParam", (d, r)),
                f"{p}/self_attn/v_proj/lora_b": ("LoRAParam", (r, kv)),
            }
        )
        want_frozen.update(
            {
                f"{p}/self_attn/q_proj/kernel": ("Param", (d, d)),
                f"{p}/self_attn/k_proj/kernel": ("Param", (d, kv)),
                f"{p}/self_attn/v_proj/kernel": ("Param", (d, kv)),
                f"{p}/self_attn/o_proj/kernel": ("Param", (d, d)),
                f"{p}/mlp/gate_proj/kernel": ("Param", (d, f)),
                f"{p}/mlp/up_proj/kernel": ("Param", (d, f)),
                f"{p}/mlp/down_proj/kernel": ("Param", (f, d)),
                f"{p}/input_layernorm/scale": ("Param", (d,)),
                f"{p}/post_attention_layernorm/scale": ("Param", (d,)),
            }
        )
    assert spec(trainable) == want_trainable
    assert spec(frozen) == want_frozen
    # The filter is usable on its own, e.g. for an optax mask.
    is_tr = trainable_filter(cfg.trainable_regexes)
    assert is_tr(("lm_head", "kernel"), nnx.Param(jnp.zeros(1)))
    assert not is_tr(("model", "norm", "scale"), nnx.Param(jnp.zeros(1)))
    with pytest.raises(ValueError, match="match no parameter"):
        partition_trainable(model, cfg.trainable_regexes, require_all=True)  # no mask decoder / fcs here
    g, lora, rest = split_lora(model)
    assert len(jax.tree.leaves(lora)) == 4 * lc.num_hidden_layers
    assert set(abstract_leaves(nnx.merge(g, lora, rest))) == set(want_trainable) | set(want_frozen)


def test_grad_step_with_remat_and_dropout():
    """Gradients flow to exactly the trainable leaves; remat gives the same gradients."""
    regexes = ReadConfig.tiny().trainable_regexes

    def grads(remat):
        cfg, model = tiny_llama(remat=remat, num_hidden_layers=1)  # one layer: half the compile
        apply_lora(model, LORA, rngs=nnx.Rngs(1))
        randomize_lora_b(model)
        g, tr, fr = partition_trainable(model, regexes)

        @jax.jit
        def loss_grad(tr, fr, key):
            def loss(tr):
                m = nnx.merge(g, tr, fr)
                ids, mask = inputs(cfg.vocab_size)
                logits = m(ids, attention_mask=mask, deterministic=False, rngs=nnx.Rngs(dropout=key)).logits
                return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

            return jax.grad(loss)(tr)

        return loss_grad(tr, fr, jax.random.key(3))

    g0, g1 = grads(False), grads(True)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=False):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
    assert all(np.isfinite(x).all() and np.abs(x).max() > 0 for x in jax.tree.leaves(g0))
