"""The memory plan of the inference paths (issue 16's full-size findings, checked at a small size).

* No jitted stage returns a copy of the model: the compiled output size of the merge, generate, predict's
  full forward and evaluation's encode/decode is the same for two models that differ only in parameter count
  (`memory_analysis().output_size_in_bytes`), and equals the size of what the stage means to return. The
  control: `nnx.jit` with the model as an argument (flax's default graph updates) does grow with the model.
* The XLA:CPU options of `read_jax.xla_flags` are applied by the commands on the CPU only, and they remove
  the fp32 copy of the bf16 weights from the decoding loop's temporaries (a fresh process each: XLA reads
  `XLA_FLAGS` once).
* Evaluation batches are padded to a length bucket that fits the prompt, not to the smallest training bucket.
* SAM ViT-H's global blocks attend in chunks of query rows: a quarter of the [N, Q, T] fp32 temporaries of
  one call (the 7B evaluation's encode went from 3.1 to 0.6 GiB of temporaries with it).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from read_jax import inference, llama_generate, llava, xla_flags
from read_jax.config import ReadConfig
from read_jax.data import pipeline as Pl
from read_jax.eval import stages
from read_jax.read_model import ReadModel

ROOT = Path(__file__).resolve().parents[1]
BASE = ReadConfig.smoke()
# The same output shapes, ~1 MB more LLaMA / CLIP / SAM-encoder parameters (0.5 MB more at bf16 would do).
WIDE = BASE.replace(
    llama=dataclasses.replace(BASE.llama, intermediate_size=640, num_hidden_layers=3),
    clip=dataclasses.replace(BASE.clip, intermediate_size=320),
    sam=dataclasses.replace(BASE.sam, mlp_ratio=40.0),
)
LENGTH = 32


@functools.cache
def _abstract(cfg: ReadConfig):
    model = nnx.eval_shape(lambda: ReadModel(cfg, rngs=nnx.Rngs(0)))
    return model, *nnx.split(model)


def _spec(x) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)


def _eval_batch(cfg: ReadConfig) -> dict:
    dc = Pl.DataConfig(
        batch_size=1, max_convs=1, length_buckets=(LENGTH,), clip_size=cfg.clip.image_size, max_mask_side=64
    )
    return {k: _spec(v) for k, v in Pl.device_batch(Pl.Collate(dc, cfg.sam)([])).items()}


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _stages(cfg: ReadConfig) -> dict:
    """name -> (jitted function, its arguments), every argument abstract."""
    model, graphdef, state = _abstract(cfg)
    batch = _eval_batch(cfg)
    enc_batch = {k: batch[k] for k in stages.ENCODE_KEYS}
    dec_batch = {k: batch[k] for k in stages.DECODE_KEYS}
    lg, ls = nnx.split(model.llava.language_model)
    vg, vs = nnx.split(model.llava)
    e = LENGTH + cfg.clip.num_patches - 1
    embeds = jax.ShapeDtypeStruct((1, e, cfg.llama.hidden_size), jnp.float32)
    i32 = jax.ShapeDtypeStruct((), jnp.int32)
    enc = jax.eval_shape(stages._encode_jit, graphdef, state, enc_batch)
    predict_batch = {k: batch[k] for k in ("images_clip", "images_sam", "sam_input_hw", "orig_hw")}
    predict_batch.update({k: batch[k] for k in ("input_ids", "attention_mask", "conv_image")})
    return {
        "merge": (
            llava._merge_jit,
            (vg, vs, batch["input_ids"], batch["images_clip"], batch["attention_mask"], batch["conv_image"]),
            {},
        ),
        "generate": (
            llama_generate._generate_jit,
            (
                lg,
                ls,
                None,
                embeds,
                jax.ShapeDtypeStruct((1, e), bool),
                jax.ShapeDtypeStruct((1,), jnp.int32),
                i32,
            ),
            {"max_new_tokens": 8, "use_cache": True},
        ),
        "predict forward": (inference._forward, (graphdef, state, predict_batch, (64, 64)), {}),
        "eval encode": (stages._encode_jit, (graphdef, state, enc_batch), {}),
        "eval decode": (
            stages._decode_jit,
            (graphdef, state, enc, dec_batch, stages.DecodeOptions(canvas_hw=(64, 64))),
            {},
        ),
    }


def _output_bytes(fn, args, kw) -> tuple[int, int, int]:
    """(compiled output size, bytes of the outputs the function returns, number of those outputs)."""
    lowered = fn.lower(*args, **kw)
    meant = jax.tree.leaves(lowered.out_info)
    return lowered.compile().memory_analysis().output_size_in_bytes, _nbytes(meant), len(meant)


@pytest.fixture(scope="module")
def sizes():
    base, wide = _stages(BASE), _stages(WIDE)
    return {name: (_output_bytes(*base[name]), _output_bytes(*wide[name])) for name in base}


def test_the_two_models_differ_in_parameters_only():
    params = [_nbytes(_abstract(c)[2]) for c in (BASE, WIDE)]
    assert params[1] > params[0] + 900_000, params
    assert ReadConfig.smoke().clip.num_patches == WIDE.clip.num_patches


@pytest.mark.parametrize("name", ["merge", "generate", "predict forward", "eval encode", "eval decode"])
def test_compiled_outputs_do_not_grow_with_the_model(sizes, name):
    (base_out, base_meant, n), (wide_out, wide_meant, _) = sizes[name]
    assert base_meant == wide_meant  # the stage's results have the same shapes for both models
    assert base_out == wide_out, f"{name}: compiled outputs {base_out} B vs {wide_out} B"
    # What it returns, plus at most XLA's 8-byte tuple-table entries: nothing else is an output.
    assert base_meant <= base_out <= base_meant + 8 * (n + 1), (name, base_out, base_meant, n)


def test_control_nnx_jit_with_the_model_returns_its_state():
    """Why the stages split the state: `nnx.jit` returns the model's whole state as outputs."""
    out = []
    for cfg in (BASE, WIDE):
        model = _abstract(cfg)[0]
        feats = jax.ShapeDtypeStruct((1, cfg.clip.num_patches, cfg.clip.hidden_size), jnp.float32)
        fn = nnx.jit(lambda m, x: m.llava.mm_projector(x))  # any method: the whole state comes back
        out.append(fn.lower(model, feats).compile().memory_analysis().output_size_in_bytes)
    params = [_nbytes(_abstract(c)[2]) for c in (BASE, WIDE)]
    assert out[1] - out[0] >= 0.9 * (params[1] - params[0]), (out, params)


# ---- the XLA:CPU options ---------------------------------------------------------------------------------
def test_cpu_flags_decision(monkeypatch):
    monkeypatch.setattr(xla_flags, "_backends_initialised", lambda: False)
    for platforms, applied in (("cpu", True), ("cuda", False), ("tpu,cpu", False), ("cpu,cuda", True)):
        env = {"JAX_PLATFORMS": platforms, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
        assert xla_flags.apply_cpu_memory_flags(env) is applied, platforms
        flags = env["XLA_FLAGS"].split()
        assert flags[0] == "--xla_force_host_platform_device_count=8"
        assert flags[1:] == (list(xla_flags.CPU_MEMORY_FLAGS) if applied else [])
        assert xla_flags.apply_cpu_memory_flags(env) is False  # never twice
        assert env["XLA_FLAGS"].split() == flags
    # A flag the user set keeps the user's value; the other one is still added.
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_cpu_enable_concurrency_optimized_scheduler=true"}
    assert xla_flags.apply_cpu_memory_flags(env)
    assert env["XLA_FLAGS"].split() == [
        "--xla_cpu_enable_concurrency_optimized_scheduler=true",
        xla_flags.CPU_MEMORY_FLAGS[1],
    ]
    # Too late once a backend exists (XLA has read XLA_FLAGS).
    monkeypatch.setattr(xla_flags, "_backends_initialised", lambda: True)
    env = {"JAX_PLATFORMS": "cpu"}
    assert xla_flags.apply_cpu_memory_flags(env) is False and "XLA_FLAGS" not in env


_DECODE_MEMORY = """
import json, os, sys

def body():
    import jax, jax.numpy as jnp
    from flax import nnx
    from read_jax.config import LlamaConfig
    from read_jax.llama import LlamaForCausalLM
    from read_jax.llama_generate import _generate_jit

    # bf16 weights dominated by the decoder layers (a small vocabulary), as at 7B.
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=2048, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    g, s = nnx.split(nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))))
    spec = jax.ShapeDtypeStruct
    args = (g, s, None, spec((1, 64, 256), jnp.bfloat16), spec((1, 64), bool), spec((1,), jnp.int32),
            spec((), jnp.int32))
    ma = _generate_jit.lower(*args, max_new_tokens=8, use_cache=True).compile().memory_analysis()
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(s))
    flags = os.environ.get("XLA_FLAGS")
    print(json.dumps({"weights": weights, "temp": ma.temp_size_in_bytes, "flags": flags}))
    return 0

if sys.argv[1] == "command":
    from read_jax.cli import common
    sys.exit(common.run_main("probe", body, False))
sys.exit(body())
"""


def _decode_memory(how: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", _DECODE_MEMORY, how], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_commands_set_the_cpu_flags_and_the_decode_loop_keeps_no_fp32_weight_copy():
    command, plain = _decode_memory("command"), _decode_memory("plain")
    assert command["flags"].split() == list(xla_flags.CPU_MEMORY_FLAGS) and plain["flags"] is None
    w = command["weights"]
    # XLA's defaults: an fp32 copy of every bf16 weight is live for the whole loop (2x the bf16 bytes).
    assert plain["temp"] > 1.5 * w, plain
    # With the options: a layer's worth at a time.
    assert command["temp"] < 0.5 * w, command


# ---- evaluation length buckets ----------------------------------------------------------------------------
def test_eval_length_ladder():
    assert Pl.eval_length_buckets((512, 1024, 1793)) == (64, 128, 256, 512, 1024, 1793)
    assert Pl.eval_length_buckets((128,)) == (64, 128)
    assert Pl.eval_length_buckets((64, 96)) == (64, 96)
    assert Pl.eval_length_buckets((32,)) == (32,)


def test_eval_batches_fit_the_prompt_not_the_smallest_training_bucket(tmp_path):
    import grain

    from read_jax.data import make_shapes
    from read_jax.data import readers as R

    make_shapes.write_split(str(tmp_path), "val", 3, seed=1)
    reader = R.ReasonSegReader(str(tmp_path), "val", mode="eval")
    cfg = Pl.DataConfig(batch_size=1, max_convs=1, max_mask_side=256, length_buckets=(512, 1024, 1793))
    tok = str(ROOT / "tests" / "assets" / "tokenizer")
    ds = Pl.eval_dataset(reader, cfg, BASE.sam, tok, shard_options=grain.sharding.ShardOptions(0, 1))
    lengths = []
    for b in ds:
        longest = int(b["attention_mask"].sum(axis=1).max())
        assert b["input_ids"].shape[1] == Pl.bucket_length(longest, (64, 128, 256, 512))
        assert (b["input_ids"][b["attention_mask"]] != 0).all()  # nothing was cut
        lengths.append(b["input_ids"].shape[1])
    assert len(lengths) == 3 and max(lengths) < 512, lengths


def test_sam_global_attention_in_row_chunks_at_vit_h_size():
    """One ViT-H global block's attention (64 x 64 grid, 16 heads, bf16), compiled abstractly: in one call its
    fp32 logits, relative-position bias and softmax ([16, 4096, 4096], 1 GiB each) are temporaries together;
    in chunks of `QUERY_CHUNK` queries (16 grid rows) a quarter of them is."""
    from read_jax.sam import image_encoder

    cfg = ReadConfig.read_7b(lora=None).with_dtype("bfloat16").sam
    grid = cfg.image_embedding_size
    assert (grid, cfg.encoder_num_heads, image_encoder.QUERY_CHUNK) == (64, 16, 1024)
    attn = nnx.eval_shape(lambda: image_encoder.Attention(cfg, (grid, grid), rngs=nnx.Rngs(0)))
    x = jax.ShapeDtypeStruct((1, grid, grid, cfg.encoder_embed_dim), jnp.bfloat16)
    temp = {}
    for chunk in (grid * grid, image_encoder.QUERY_CHUNK):
        attn.query_chunk = chunk
        graphdef, state = nnx.split(attn)
        fn = jax.jit(lambda st, x, g=graphdef: nnx.merge(g, st)(x))
        temp[chunk] = fn.lower(state, x).compile().memory_analysis().temp_size_in_bytes
    one_call, chunked = temp[grid * grid], temp[image_encoder.QUERY_CHUNK]
    scores = 16 * (grid * grid) ** 2 * 4  # one fp32 [N, Q, T] array
    assert one_call >= 1.9 * scores, temp
    assert chunked <= one_call / 3, temp
