"""Greedy decoding with the KV cache vs the no-cache full-recompute path (what READ's reference does, §4).

A LLaVA-shaped prompt: 576 "image" embeddings + text tokens (~600 in all), then 64 greedy tokens, with
two small LLaMAs on CPU (below). Both paths run the whole decode inside one jitted `lax.while_loop`;
compile time is excluded (one warm-up call each), every timing ends with `block_until_ready`, the runs of the
two paths are interleaved and the minimum over `--repeats` is reported. The last line is the ratio of the
7B-like config, e.g. `KV-cache speedup (7b-share, batch 1): 45.3x`.

    python benchmarks/decode.py [--batches 1,8] [--configs tiny,7b-share] [--text 24] [--new 64]

(with the package installed, `pip install -e .`, or `PYTHONPATH=.` from the repository root).

What to expect: counted in decoder tokens, the no-cache path processes ~M * (T + M) positions and the cached
one T + M, about 60x for T=600, M=64. Both paths apply the lm_head to one position per step. In the tiny
test config that lm_head (V=32003 x D=64, 8 MB in fp32) is ~96% of a token's work, so XLA's FLOP ratio is
~38x and a cached step at batch 1 is bound by streaming those 8 MB (the printed floor). LLaMA-7B's lm_head is
~2% of a token's work; the "7b-share" config (D=128, F=344, 8 layers, V=256) has the same share, which is
what a user's ratio looks like. Each config runs at batch 1 and 8; the last line is the 7b-share config at
batch 1.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from read_jax.config import ReadConfig
from read_jax.convert.common import abstract_leaves, load_leaves
from read_jax.llama import LlamaForCausalLM
from read_jax.llama_generate import generate, generate_no_cache


def random_model(cfg, seed: int = 0) -> LlamaForCausalLM:
    """Weights with O(1) activations (HF's 0.02 init gives near-flat logits), drawn in numpy."""
    rng = np.random.default_rng(seed)
    model = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
    leaves = {}
    for path, v in abstract_leaves(model).items():
        if path.endswith("scale"):
            x = rng.uniform(0.5, 1.5, v.shape)
        else:
            fan_in = v.shape[-1] if path.endswith("embedding") else v.shape[0]
            x = rng.standard_normal(v.shape) / np.sqrt(fan_in)
        leaves[path] = x.astype(v.dtype)
    load_leaves(model, leaves)
    return model


def timed_pair(fn_a, fn_b, repeats: int) -> tuple[list[float], list[float], tuple, tuple]:
    """Wall times (s) of `repeats` warm runs of two functions, interleaved so that both see the same
    machine load; compile + first run are not timed. Returns (times_a, times_b, last out_a, last out_b)."""
    out_a, out_b = jax.block_until_ready(fn_a()), jax.block_until_ready(fn_b())
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn())
            times.append(time.perf_counter() - t0)
            out_a, out_b = (out, out_b) if fn is fn_a else (out_a, out)
    return times_a, times_b, out_a, out_b


def flop_ratio(model, embeds, mask, new: int) -> float:
    """XLA's FLOP count of the no-cache work over the cached work for this prompt (`cost_analysis`).

    no-cache: `new` full forwards over T + new slots (+ one lm_head row each); cached: one prefill over T
    (+ one lm_head row) and `new - 1` one-token steps over the cache.
    """
    graphdef, state = nnx.split(model)
    b, t, _ = embeds.shape
    s = t + new

    def flops(fn, *args) -> float:
        ca = jax.jit(fn).lower(*args).compile().cost_analysis()
        return float((ca[0] if isinstance(ca, list) else ca)["flops"])

    def head(m, h):  # logits of the last position only, as both generate paths do
        return m.lm_head(h[:, -1])

    def full(state, x):
        m = nnx.merge(graphdef, state)
        return head(m, m.model(x, jnp.ones((b, s), bool))[0])

    def prefill(state, x):
        m = nnx.merge(graphdef, state)
        h, cache = m.model(x, mask, cache=m.init_cache(b, s), cache_index=0)
        return head(m, h), cache

    def step(state, x, cache, index):
        m = nnx.merge(graphdef, state)
        h, cache = m.model(x[:, :1], jnp.ones((b, 1), bool), cache=cache, cache_index=index)
        return head(m, h), cache

    cache = jax.eval_shape(prefill, state, embeds)[1]
    x_full = jnp.zeros((b, s, embeds.shape[-1]), embeds.dtype)
    f_full = flops(full, state, x_full)
    f_cached = flops(prefill, state, embeds) + (new - 1) * flops(step, state, embeds, cache, jnp.int32(t))
    return new * f_full / f_cached


def cached_floor(model, embeds, mask, new: int, repeats: int) -> tuple[float, float]:
    """What the cached path cannot go below on this machine: its prefill (one full forward over the prompt)
    and
    `new - 1` lm_head products [B, D] x [D, V] in one jitted loop (each step needs one; at batch 1 it streams
    the
    whole V x D matrix from memory). Returns (prefill s, products s), minima over `repeats`."""
    graphdef, state = nnx.split(model)
    b, t, _ = embeds.shape

    @jax.jit
    def prefill(state, x):
        m = nnx.merge(graphdef, state)
        h, cache = m.model(x, mask, cache=m.init_cache(b, t + new), cache_index=0)
        return m.lm_head(h[:, -1]), cache

    @jax.jit
    def heads(state, h):
        m = nnx.merge(graphdef, state)

        def body(i, carry):  # each product depends on the last, as decode steps do
            h, acc = carry
            logits = m.lm_head(h)
            tok = jnp.argmax(logits, axis=-1)
            return h + tok[:, None].astype(h.dtype) * 1e-9, acc + logits[:, 0]

        return jax.lax.fori_loop(0, new - 1, body, (h, jnp.zeros((b,), jnp.float32)))

    h0 = embeds[:, -1]
    t_pre, t_heads, _, _ = timed_pair(lambda: prefill(state, embeds), lambda: heads(state, h0), repeats)
    return min(t_pre), min(t_heads)


def lm_head_share(cfg) -> float:
    """The lm_head's share of one decoded token's matmul work (multiply-adds; the attention scores, which
    grow with the context, are left out): D V / (L (4 D^2 + 3 D F) + D V), K = N heads."""
    d, f, v, layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    return d * v / (layers * (4 * d * d + 3 * d * f) + d * v)


def configs() -> dict:
    """The tiny test LLaMA (its 32003 x 64 lm_head is ~96% of a token's work), and a small LLaMA whose
    lm_head share matches LLaMA-7B's (4096 x 32003 against 32 layers of 4096 / 11008: ~2.0%)."""
    import dataclasses

    tiny = ReadConfig.tiny().llama
    like_7b = dataclasses.replace(
        tiny, hidden_size=128, intermediate_size=344, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=256,
    )  # fmt: skip
    return {"tiny": tiny, "7b-share": like_7b}


def measure(cfg, batch: int, args) -> dict:
    """One config at one batch: both paths timed side by side, the FLOP ratio and the cached path's floor."""
    model = random_model(cfg)
    rng = np.random.default_rng(1)
    b, p, n = batch, args.image_tokens, args.text
    # Prompt = text[: n // 2] + image tokens + text[n // 2:], as the LLaVA merge lays it out.
    ids = jnp.asarray(rng.integers(3, cfg.vocab_size, (b, n)))
    text = model.embed(ids)
    image = jnp.asarray(rng.standard_normal((b, p, cfg.hidden_size)) * 0.5, cfg.compute_dtype)
    embeds = jnp.concatenate([text[:, : n // 2], image, text[:, n // 2 :]], axis=1)  # [B, T, D]
    mask = jnp.ones(embeds.shape[:2], bool)
    kw = {"inputs_embeds": embeds, "attention_mask": mask, "max_new_tokens": args.new, "eos_token_id": None}
    times_c, times_f, (tok_c, len_c), (tok_f, len_f) = timed_pair(
        lambda: generate(model, **kw), lambda: generate_no_cache(model, **kw), args.repeats
    )
    t_pre, t_head = cached_floor(model, embeds, mask, args.new, args.repeats)
    # The minimum over runs is the least load-disturbed estimate (the machine may be shared).
    t_cache, t_full = min(times_c), min(times_f)
    return {
        "prompt": int(embeds.shape[1]),
        "cache_s": t_cache,
        "full_s": t_full,
        "ratio": t_full / t_cache,
        "flop_ratio": flop_ratio(model, embeds, mask, args.new),
        "floor_s": t_pre + t_head,
        "floor_ratio": t_full / (t_pre + t_head),
        "same": bool(np.array_equal(tok_c, tok_f) and np.array_equal(len_c, len_f)),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--configs", default="tiny,7b-share", help="comma-separated, from tiny, 7b-share")
    ap.add_argument("--image-tokens", type=int, default=576)
    ap.add_argument("--text", type=int, default=24, help="text tokens around the image")
    ap.add_argument("--new", type=int, default=64, help="max_new_tokens")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    batches = [int(x) for x in args.batches.split(",")]
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); {args.new} new tokens after "
          f"{args.image_tokens} image + {args.text} text tokens, greedy, no EOS")  # fmt: skip
    results = {}
    for name in args.configs.split(","):
        cfg = configs()[name]
        share = lm_head_share(cfg)
        print(f"config {name}: D={cfg.hidden_size} F={cfg.intermediate_size} L={cfg.num_hidden_layers} "
              f"V={cfg.vocab_size}; lm_head share of a token's work {100 * share:.1f}%")  # fmt: skip
        for b in batches:
            r = results[name, b] = measure(cfg, b, args)
            print(
                f"  batch {b}: no-cache {r['full_s'] * 1e3:8.1f} ms, KV cache {r['cache_s'] * 1e3:7.1f} ms: "
                f"{r['ratio']:5.1f}x (XLA FLOP ratio {r['flop_ratio']:.1f}x; the cached path's floor, "
                f"prefill + {args.new - 1} lm_head products, allows {r['floor_ratio']:.1f}x); "
                f"same tokens: {r['same']}"
            )
            if not r["same"]:
                raise SystemExit("the cached and no-cache paths disagree")
    last = (args.configs.split(",")[-1], batches[0])
    print(f"KV-cache speedup ({last[0]}, batch {last[1]}): {results[last]['ratio']:.1f}x")


if __name__ == "__main__":
    main()
