"""READ on one accelerator beside PyTorch: one command, one table, one JSON (random weights, READ-7B shapes).

Sections, run in this order unless `--sections` says otherwise (the most important first, so a short lease
runs what matters; `--budget` skips the sections that would start after that many seconds):

  train   the READ recipe's train step (configs/read_7b_reasonseg.py: LoRA r=8, the released trainables,
          bf16, remat, 2 images x 3 conversations per micro-batch, text bucket `--length`): step time,
          tokens/s, MFU = the compiled step's XLA FLOP count (remat recompute included) / (time x the
          device's peak bf16 FLOP/s). torch: the torch READ (`torchref.read.TorchRead`: HF LLaMA with SDPA
          attention and gradient checkpointing, HF CLIP, Meta's SAM, READ's SasP loops) doing the same
          forward/backward + AdamW on the same trainables (no LoRA: PEFT is not a dependency) in bf16.
  eval    the ReasonSeg protocol end to end (`protocols.evaluate_reasonseg`) fed live by the real data
          pipeline (`pipeline.eval_dataset`, `--workers` grain processes) from images on disk (the generated
          shapes set in ReasonSeg's format): samples/s. torch: the torch READ's teacher-forced forward on the
          same batches (pixels normalised on the host).
  decode  greedy decoding of `--new` tokens after a LLaVA prompt (576 image embeddings + text, ~600 tokens)
          with the KV cache and without (full recompute per token, what READ's reference does), batch 1 and
          8: tokens/s and the ratio. torch: HF `generate` with and without cache, SDPA, bf16.
  sasp    SasP + DtoC for `--segs` [SEG]s of mixed image sizes: one jitted call vs the reference's
          per-[SEG] torch loop (`torchref.sasp`, on the same device).

`--preset tiny` runs the same code at CPU size (ReadConfig.smoke/tiny shapes, fp32); `--preset 7b` is the
GPU/TPU figure. The attention kernel is the platform's (`ReadConfig.attention_implementation="auto"`: cuDNN
flash attention on NVIDIA, the Pallas flash kernel on TPU, XLA elsewhere). torch columns appear where
torch + transformers (+ segment_anything for READ) import; JAX and torch share the device (JAX does not
preallocate). Every timing ends on a device sync; compiles and warm-up calls are excluded and reported.

    python benchmarks/accelerator.py --preset 7b --json accelerator.json
    python benchmarks/accelerator.py --preset 7b --sections train,decode --budget 300
    python benchmarks/accelerator.py --preset tiny          # CPU, CI-sized

(with the package installed, `pip install -e ".[test]"`, or `PYTHONPATH=.` from the repository root).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the device

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOKENIZER = os.path.join(ROOT, "tests", "assets", "tokenizer")
SECTIONS = ("train", "eval", "decode", "sasp")

# Peak dense bf16 FLOP/s per device (vendor figures, no sparsity), matched against `device_kind`.
PEAK_BF16 = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),
    ("TPU v6", 918e12),
)

PRESETS = {
    # model preset, dtype, images, conversations, text bucket, mask canvas, decode prompt text, new tokens,
    # decode batches, SasP [SEG]s, eval queries, eval batch
    "tiny": dict(
        model="smoke",
        dtype="float32",
        images=2,
        convs=3,
        length=64,
        canvas=128,
        text=24,
        new=8,
        decode_batches=(1, 2),
        segs=4,
        sasp_sides=(64, 200),
        queries=8,
        eval_batch=4,
        llama_preset="tiny",
    ),
    "7b": dict(
        model="read_7b",
        dtype="bfloat16",
        images=2,
        convs=3,
        length=512,
        canvas=1024,
        text=24,
        new=64,
        decode_batches=(1, 8),
        segs=64,
        sasp_sides=(200, 1000),
        queries=128,
        eval_batch=8,
        llama_preset="read_7b",
    ),
}


def _bench_module(name: str):
    """A sibling benchmark script as a module (its helpers are reused, not copied)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(HERE, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def peak_flops(device) -> float | None:
    kind = device.device_kind
    return next((v for k, v in PEAK_BF16 if k.lower() in kind.lower()), None)


def torch_status(need_sam: bool = True):
    """(torch, device string) when the torch side can run, else (None, the reason)."""
    try:
        import torch
        import transformers  # noqa: F401

        if need_sam:
            from torchref.sam import meta_sam

            meta_sam()
    except ImportError as e:
        return None, f"torch side skipped: {e}"
    return torch, ("cuda" if torch.cuda.is_available() else "cpu")


def sync_time(fn, reps: int, sync) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sync(fn())
        out.append(time.perf_counter() - t0)
    return out


def _torch_sync(torch, device):
    def sync(x):
        if device == "cuda":
            torch.cuda.synchronize()
        return x

    return sync


# ---- configs -------------------------------------------------------------------------------------------
def run_config(p: dict):
    """configs/read_7b_reasonseg.py (the released recipe), at the preset's size and dtype."""
    from read_jax.cli import common

    overrides = [
        ("model.preset", p["model"]),
        ("model.dtype", p["dtype"]),
        ("data.max_mask_side", str(p["canvas"])),
    ]
    c = common.load_run_config(os.path.join(ROOT, "configs", "read_7b_reasonseg.py"), overrides)
    c.data.length_buckets = (p["length"],)
    return c


def synthetic_batch(cfg, dc, length: int, seed: int = 0) -> dict:
    """One micro-batch in the pipeline's layout: uint8 pixels, rows `<s> .. <image> .. [SEG] . </s>`."""
    from read_jax.config import IGNORE_INDEX
    from read_jax.data import loaders
    from read_jax.data import preprocess as pp
    from read_jax.sam.transforms import get_preprocess_shape

    rng = np.random.default_rng(seed)
    spec = loaders.batch_spec(dc, cfg.sam, length)
    b = {k: np.zeros(v.shape[1:], v.dtype) for k, v in spec.items()}
    n_img, r = b["images_clip"].shape[0], b["input_ids"].shape[0]
    b["images_clip"][:] = rng.integers(0, 256, b["images_clip"].shape, dtype=np.uint8)
    b["images_sam"][:] = rng.integers(0, 256, b["images_sam"].shape, dtype=np.uint8)
    side = dc.max_mask_side
    hw = np.array([[side * 3 // 4, side], [side, side * 2 // 3]] * n_img, np.int32)[:n_img]
    b["orig_hw"][:] = hw
    b["sam_input_hw"][:] = [get_preprocess_shape(int(h), int(w), cfg.sam.image_size) for h, w in hw]
    s = cfg.sam.image_size
    if "sam_resize" in b:  # the pixels are SAM's frame already
        b["sam_resize"][:] = pp.sam_resize_tables((s, s), (s, s), s)
    b["image_valid"][:] = True
    for i in range(r):
        q = rng.integers(100, 30000, size=length - 16).tolist()
        a = [*rng.integers(100, 30000, size=4).tolist(), cfg.seg_token_id, 29889, 2]
        row = [1, 319, cfg.im_start_token_id, -200, cfg.im_end_token_id, *q, *a][:length]
        b["input_ids"][i, : len(row)] = row
        b["attention_mask"][i, : len(row)] = True
        b["labels"][i, len(row) - len(a) : len(row)] = row[len(row) - len(a) :]
        img = b["conv_image"][i]
        h, w = hw[img]
        b["masks"][i, h // 4 : h // 2, w // 3 : 2 * w // 3] = 1
        b["mask_hw"][i] = hw[img]
    b["labels"][b["labels"] == 0] = IGNORE_INDEX
    for k in ("conv_valid", "has_seg", "exists", "mask_valid"):
        b[k][:] = True
    return b


def torch_batch(cfg, batch: dict, device, dtype):
    """The torch READ's inputs: host-normalised pixels (what the device normalisation equals)."""
    import torch

    from read_jax.data import preprocess as pp

    s = cfg.sam
    out = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items() if k not in ("sample_id", "meta")}
    out.pop("sam_resize", None)
    out["images_clip"] = torch.from_numpy(pp.clip_normalize_host(batch["images_clip"]))
    frames = np.asarray(batch["images_sam"])
    if "sam_resize" in batch:  # the pipeline's frames before the device resize: PIL's resize, on the host
        frames = pp.apply_resize_tables(frames, np.asarray(batch["sam_resize"]), np)
    out["images_sam"] = torch.from_numpy(
        np.stack(
            [
                pp.sam_normalize_host(f, hw, s.pixel_mean, s.pixel_std)
                for f, hw in zip(frames, batch["sam_input_hw"], strict=True)
            ]
        )
    )
    out = {k: v.to(device) for k, v in out.items()}
    out["images_clip"], out["images_sam"] = out["images_clip"].to(dtype), out["images_sam"].to(dtype)
    return out


def torch_read(torch, cfg, device, train: bool):
    """The torch READ at `cfg`'s size on `device`, in the reference's dtype casts, SDPA attention."""
    from torchref.read import TorchRead

    with torch.device(device):
        tm = TorchRead(cfg.with_dtype("float32"), randomize=not big(cfg))
    dtype = torch.bfloat16 if cfg.llama.dtype == "bfloat16" else torch.float32
    if dtype == torch.bfloat16:
        tm.released_dtype(dtype)
    for m in (tm.llm, tm.clip):
        m.config._attn_implementation = "sdpa"
    if train and cfg.llama.remat:
        tm.llm.gradient_checkpointing_enable()
    tm.train(train)
    return tm, dtype


def sasp_fns(cfg):
    import torch

    from torchref import sasp as st

    sc = cfg.sasp

    def similarity(h_img, s):
        return st.compute_similarity_map(h_img[None], s[None])[0, :, 0]

    def to_points(sim, hw):
        return st.similarity_map_to_points(
            sim,
            hw,
            down_sample=cfg.clip.grid_size // sc.grid_size,
            num_points=sc.num_points,
            t_pos=sc.t_pos,
            t_neg=sc.t_neg,
            use_dtoc=False,
        )

    def dtoc(sim, pts, hw):
        full = st.get_similarity_map(sim[None, :, None], hw, torch.float32)[0, :, :, 0]
        return st.discrete_to_continuous(full, pts.float().to(full.device))

    return similarity, to_points, dtoc


# ---- sections ------------------------------------------------------------------------------------------
def section_train(p: dict, args) -> dict:
    out, cfg, batch = jax_train(p, args)  # returns before torch starts: its device buffers are freed
    torch, device = torch_status()
    if torch is None:
        return {**out, "torch": device}
    tt = torch_train(torch, device, cfg, batch, args.reps)
    return {
        **out,
        "torch_step_s": tt,
        "torch_tokens_per_s": out["tokens_per_step"] / tt,
        "ratio": tt / out["step_s"],
        "torch_device": device,
    }


def jax_train(p: dict, args):
    """The recipe's compiled train step on one device: (figures, ReadConfig, the host batch)."""
    from read_jax import sharding as shd
    from read_jax.data import loaders
    from read_jax.train import config as rc
    from read_jax.train import state as tstate
    from read_jax.train import step as tstep

    c = run_config(p)
    cfg = rc.read_config(c.model)
    mesh = shd.make_mesh(1, 1, devices=jax.devices()[:1])
    setup = tstate.setup_model(
        cfg,
        mesh,
        strategy=loaders.plain(c.mesh.strategy),
        trainable_dtype=c.train.get("trainable_dtype") or None,
    )
    tx = tstate.make_optimizer(c.train)
    opt_sh, opt_abs = tstate.opt_state_shardings(
        tx, setup.trainable_abstract, setup.trainable_shardings, mesh
    )
    dc = loaders.data_config(c.data, cfg, batch_size=p["images"], max_convs=p["convs"])
    spec = loaders.batch_spec(dc, cfg.sam, p["length"])
    bsh = tstep.micro_batch_shardings(spec, mesh)
    t0 = time.perf_counter()
    tr, fr = init_trainables_frozen(setup, cfg)
    state = {"tr": tr, "opt": jax.jit(tx.init, out_shardings=opt_sh)(tr), "i": 0}
    jax.block_until_ready((state, fr))
    init_s = time.perf_counter() - t0
    jitted = tstep.jit_train_step(setup, tx, tstep.step_config(c, (dc.max_mask_side,) * 2), opt_sh, bsh)
    with shd.use_mesh(mesh):
        options = None if big(cfg) else tstate.fast_compile_options()  # CPU size: compile time dominates
        args_abs = tstep.step_arguments(setup, opt_abs, opt_sh, spec, bsh)
        compiled, stats = tstep.compile_step(jitted, args_abs, compiler_options=options)
        batch = synthetic_batch(cfg, dc, p["length"])
        dev = shd.shard_batch({k: v[None] for k, v in batch.items()}, mesh, batch_axis=1)

        def step():
            state["tr"], state["opt"], m = compiled(
                state["tr"], fr, state["opt"], dev, jnp.int32(state["i"]), jnp.float32(1e-4)
            )
            state["i"] += 1
            return m["loss"]

        jax.block_until_ready(step())
        t = statistics.median(sync_time(step, args.reps, jax.block_until_ready))
    tokens = int(batch["attention_mask"].sum()) + batch["input_ids"].shape[0] * (cfg.clip.num_patches - 1)
    peak = peak_flops(jax.devices()[0])
    flops = stats.get("flops")
    out = {
        "step_s": t,
        "tokens_per_s": tokens / t,
        "tokens_per_step": tokens,
        "compile_s": stats["compile_s"],
        "init_s": init_s,
        "flops_per_step": flops,
        "peak_flops": peak,
        "mfu": (flops / t / peak) if flops and peak else None,
        "temp_bytes": stats.get("temp_size_in_bytes"),
        "memory": {k: v for k, v in stats.items() if k.endswith("_in_bytes")},  # compiled, per device
        "device_peak_bytes": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use"),
        "trainable_params": setup.num_trainable,
    }
    return out, cfg, batch


def big(cfg) -> bool:
    return cfg.llama.hidden_size >= 1024


def init_trainables_frozen(setup, cfg):
    """(trainable, frozen) random states: the compiled scratch init on an accelerator (the 7B model never
    sits on the host), numpy draws at CPU size (compiling the init costs more than the step there)."""
    from flax import nnx

    from read_jax.lora import trainable_filter
    from read_jax.train import state as tstate
    from read_jax.tree_util import floats_as

    if big(cfg):
        return tstate.init_params(setup)
    model = _bench_module("eval").random_model(None, factory=setup.model_fn)
    _, tr, fr = nnx.split(model, trainable_filter(cfg.trainable_regexes), ...)
    dtype = jax.tree.leaves(setup.trainable_abstract)[0].dtype
    return jax.device_put(floats_as(tr, dtype), setup.trainable_shardings), jax.device_put(
        fr, setup.frozen_shardings
    )


def torch_train(torch, device, cfg, batch: dict, reps: int) -> float:
    """The torch READ's forward/backward + AdamW on the released trainables: median step seconds."""
    from torchref.read import torch_losses

    tm, dtype = torch_read(torch, cfg, device, train=True)
    names = ("llm.model.embed_tokens", "llm.lm_head", "visual_model.mask_decoder.", "text_hidden_fcs.")
    train = [q for n, q in tm.named_parameters() if n.startswith(names)]
    for q in tm.parameters():
        q.requires_grad_(False)
    for q in train:
        q.requires_grad_(True)
    opt = torch.optim.AdamW(train, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    tb = torch_batch(cfg, batch, device, dtype)
    gts = []
    for r in range(batch["input_ids"].shape[0]):
        h, w = batch["orig_hw"][batch["conv_image"][r]]
        gts.append(torch.from_numpy((batch["masks"][r, :h, :w] == 1).astype(np.float32)).to(device))

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.device(device):  # the reference's factory calls (masks, SasP) land on the device
            loss = torch_losses(tm(tb, sasp_fns(cfg), {}), gts)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(train, 1.0)
        opt.step()
        return loss

    sync = _torch_sync(torch, device)
    sync(step())
    return statistics.median(sync_time(step, reps, sync))


def section_eval(p: dict, args) -> dict:
    from read_jax.data import make_shapes
    from read_jax.data import pipeline as P
    from read_jax.data import readers as R

    cfg = run_config_model(p)
    data_dir = tempfile.mkdtemp(prefix="accel_eval_")
    make_shapes.write_split(data_dir, "val", p["queries"], seed=0)
    reader = R.ReasonSegReader(data_dir, "val", mode="eval")
    dc = P.DataConfig(
        batch_size=p["eval_batch"],
        max_convs=1,
        max_mask_side=448,
        length_buckets=(128,),
        clip_size=cfg.clip.image_size,
        num_workers=args.workers,
    )
    out = jax_eval(cfg, reader, dc, args)
    torch, device = torch_status()
    if torch is None:
        return {**out, "torch": device}
    batches = list(P.eval_dataset(reader, dataclasses.replace(dc, num_workers=0), cfg.sam, TOKENIZER))
    n = sum(int(b["image_valid"].sum()) for b in batches)
    tm, dtype = torch_read(torch, cfg, device, train=False)
    fns = sasp_fns(cfg)
    sync = _torch_sync(torch, device)

    def torch_pass():
        with torch.no_grad(), torch.device(device):
            for b in batches:
                tm(torch_batch(cfg, b, device, dtype), fns, {})

    sync(torch_pass())
    tt = min(sync_time(torch_pass, 1, sync))
    return {
        **out,
        "torch_samples_per_s": n / tt,
        "ratio": out["samples_per_s"] * tt / n,
        "torch_device": device,
    }


def jax_eval(cfg, reader, dc, args) -> dict:
    """`evaluate_reasonseg` fed live by the eval pipeline (its grain workers decode the images)."""
    from read_jax.data import pipeline as P
    from read_jax.eval import protocols

    model = _bench_module("eval").random_model(cfg, on_device=big(cfg))
    ev = protocols.Evaluator(model, None)
    first = next(iter(P.eval_dataset(reader, dataclasses.replace(dc, num_workers=0), cfg.sam, TOKENIZER)))
    t0 = time.perf_counter()
    protocols.evaluate_reasonseg(model, [first], evaluator=ev, progress=False)  # compiles both stages
    compile_s = time.perf_counter() - t0
    clock = {}

    def timed_batches():  # the clock starts when the first batch arrives: worker start-up is not throughput
        for b in P.eval_dataset(reader, dc, cfg.sam, TOKENIZER):
            clock.setdefault("t0", time.perf_counter())
            yield b

    _, records = protocols.evaluate_reasonseg(model, timed_batches(), evaluator=ev, progress=False)
    wall = time.perf_counter() - clock["t0"]
    return {
        "samples_per_s": len(records) / wall,
        "queries": len(records),
        "wall_s": wall,
        "compile_s": compile_s,
        "workers": dc.num_workers,
    }


def run_config_model(p: dict):
    from read_jax.train import config as rc

    return rc.read_config(run_config(p).model).replace(max_segs=1, lora=None)


def section_decode(p: dict, args) -> dict:
    from flax import nnx

    from read_jax.config import ReadConfig
    from read_jax.llama import LlamaForCausalLM
    from read_jax.llama_generate import generate, generate_no_cache

    cfg = getattr(ReadConfig, p["llama_preset"])().with_dtype(p["dtype"]).llama
    model = _bench_module("eval").random_model(
        None, factory=lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)), on_device=cfg.hidden_size >= 1024
    )
    timed_pair = _bench_module("decode").timed_pair
    rng = np.random.default_rng(1)
    out = {}
    torch, device = torch_status(need_sam=False)
    for b in p["decode_batches"]:
        n, new = p["text"], p["new"]
        ids = jnp.asarray(rng.integers(3, cfg.vocab_size, (b, n)))
        image = jnp.asarray(rng.standard_normal((b, 576, cfg.hidden_size)) * 0.5, cfg.compute_dtype)
        text = model.embed(ids)
        embeds = jnp.concatenate([text[:, : n // 2], image, text[:, n // 2 :]], axis=1)
        kw = {
            "inputs_embeds": embeds,
            "attention_mask": jnp.ones(embeds.shape[:2], bool),
            "max_new_tokens": new,
            "eos_token_id": None,
        }
        tc, tf, _, _ = timed_pair(
            lambda kw=kw: generate(model, **kw), lambda kw=kw: generate_no_cache(model, **kw), args.reps
        )
        r = {
            "prompt": int(embeds.shape[1]),
            "new": new,
            "cache_tok_s": b * new / min(tc),
            "nocache_tok_s": b * new / min(tf),
            "ratio": min(tf) / min(tc),
        }
        if torch is not None:
            r.update(torch_decode(torch, device, cfg, np.asarray(embeds.astype(jnp.float32)), new, args.reps))
            r["cache_vs_torch"] = r["cache_tok_s"] / r["torch_cache_tok_s"]
        out[f"batch_{b}"] = r
    if torch is None:
        out["torch"] = device
    return out


_HF_LLAMA = {}


def torch_decode(torch, device, cfg, embeds: np.ndarray, new: int, reps: int) -> dict:
    """HF LlamaForCausalLM (SDPA, the preset's dtype) `generate` with and without the KV cache."""
    import transformers

    from torchref.llama import hf_config

    if cfg not in _HF_LLAMA:
        hc = hf_config(cfg)
        hc._attn_implementation = "sdpa"
        dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
        with torch.device(device):
            _HF_LLAMA[cfg] = transformers.LlamaForCausalLM(hc).to(dtype).eval()
    hf = _HF_LLAMA[cfg]
    hf.generation_config.eos_token_id = None  # random weights: always generate `new` tokens
    x = torch.from_numpy(embeds).to(device=device, dtype=hf.dtype)
    sync = _torch_sync(torch, device)
    res = {}
    for name, cache in (("torch_cache_tok_s", True), ("torch_nocache_tok_s", False)):

        def gen(cache=cache):
            with torch.no_grad():
                return hf.generate(
                    inputs_embeds=x,
                    attention_mask=torch.ones(x.shape[:2], device=device),
                    max_new_tokens=new,
                    do_sample=False,
                    use_cache=cache,
                    pad_token_id=0,
                )

        sync(gen())
        res[name] = x.shape[0] * new / min(sync_time(gen, reps, sync))
    res["torch_ratio"] = res["torch_cache_tok_s"] / res["torch_nocache_tok_s"]
    return res


def section_sasp(p: dict, args) -> dict:
    from read_jax import sasp as S
    from read_jax.config import SaspConfig

    cfg = SaspConfig.read_7b()
    n = p["segs"]
    rng = np.random.default_rng(0)
    hw = rng.integers(p["sasp_sides"][0], p["sasp_sides"][1] + 1, size=(n, 2)).astype(np.int32)
    maps = _bench_module("sasp").smooth_maps(rng, n)
    sim = jnp.asarray(maps).astype(jnp.bfloat16)

    @jax.jit
    def kernel(sim, hw):
        pts, labels, _ = S.select_points(sim, hw, cfg)
        return S.dtoc(sim, pts, hw, radius=cfg.dtoc_radius, similarity_dtype=cfg.similarity_dtype), labels

    jax.block_until_ready(kernel(sim, jnp.asarray(hw)))
    tj = statistics.median(
        sync_time(lambda: kernel(sim, jnp.asarray(hw)), 10 * args.reps, jax.block_until_ready)
    )
    out = {"segs": n, "jax_s": tj, "jax_ms_per_seg": 1e3 * tj / n}
    torch, device = torch_status(need_sam=False)
    if torch is None:
        out["torch"] = device
        return out
    from torchref import sasp as ref

    sim_t = torch.from_numpy(maps).to(device=device, dtype=torch.bfloat16)
    sync = _torch_sync(torch, device)

    def loop():
        with torch.device(device):
            for i in range(n):
                ref.similarity_map_to_points(
                    sim_t[i],
                    (int(hw[i, 0]), int(hw[i, 1])),
                    down_sample=24 // cfg.grid_size,
                    num_points=cfg.num_points,
                    t_pos=cfg.t_pos,
                    t_neg=cfg.t_neg,
                )

    tt = min(sync_time(loop, 1, sync))
    out.update(torch_s=tt, torch_ms_per_seg=1e3 * tt / n, ratio=tt / tj, torch_device=device)
    return out


# ---- report --------------------------------------------------------------------------------------------
def table(results: dict) -> list[str]:
    f = lambda v, spec: "-".rjust(int(spec.split(".")[0])) if v is None else format(v, spec)
    lines = [f"{'section':8s} {'measure':34s} {'JAX':>12s} {'torch':>12s} {'JAX speedup':>11s}"]
    add = lambda s, m, j, t, r: lines.append(
        f"{s:8s} {m:34s} {f(j, '12.4g')} {f(t, '12.4g')} {f(r, '11.2f')}"
    )
    tr = results.get("train", {})
    if "step_s" in tr:
        add("train", "step time (s), lower is better", tr["step_s"], tr.get("torch_step_s"), tr.get("ratio"))
        add("train", "tokens/s", tr["tokens_per_s"], tr.get("torch_tokens_per_s"), tr.get("ratio"))
        add("train", "MFU (XLA FLOPs incl. remat)", tr.get("mfu"), None, None)
    ev = results.get("eval", {})
    if "samples_per_s" in ev:
        add(
            "eval",
            "ReasonSeg protocol samples/s",
            ev["samples_per_s"],
            ev.get("torch_samples_per_s"),
            ev.get("ratio"),
        )
    for k, d in results.get("decode", {}).items():
        if not isinstance(d, dict):
            continue
        add(
            "decode",
            f"{k} KV-cache tokens/s",
            d["cache_tok_s"],
            d.get("torch_cache_tok_s"),
            d.get("cache_vs_torch"),
        )
        tn = d.get("torch_nocache_tok_s")
        add("decode", f"{k} no-cache tokens/s", d["nocache_tok_s"], tn, tn and d["nocache_tok_s"] / tn)
        add("decode", f"{k} cache / no-cache", d["ratio"], d.get("torch_ratio"), None)
    sp = results.get("sasp", {})
    if "jax_s" in sp:
        add(
            "sasp",
            f"SasP+DtoC ms per [SEG] (batch {sp['segs']})",
            sp["jax_ms_per_seg"],
            sp.get("torch_ms_per_seg"),
            sp.get("ratio"),
        )
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="7b")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {SECTIONS}")
    ap.add_argument(
        "--budget", type=float, default=0.0, help="skip sections starting after this many s (0: none)"
    )
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 3; tiny 2)")
    ap.add_argument("--workers", type=int, default=max(0, min(8, (os.cpu_count() or 1) - 2)))
    ap.add_argument(
        "--json", default=None, help="write the results here (default: accelerator_<preset>.json)"
    )
    args = ap.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    if bad := sorted(set(sections) - set(SECTIONS)):
        ap.error(f"unknown sections {bad}; known: {SECTIONS}")
    p = PRESETS[args.preset]
    args.reps = args.reps or (2 if args.preset == "tiny" else 3)
    dev = jax.devices()[0]
    results = {
        "preset": args.preset,
        "device": dev.device_kind,
        "backend": jax.default_backend(),
        "devices": len(jax.devices()),
        "date": time.strftime("%Y-%m-%d"),
        "jax": jax.__version__,
    }
    print(f"device: {dev.device_kind} ({jax.default_backend()}) x {len(jax.devices())}, preset {args.preset}")
    t_start = time.perf_counter()
    fns = {"train": section_train, "eval": section_eval, "decode": section_decode, "sasp": section_sasp}
    for name in sections:
        elapsed = time.perf_counter() - t_start
        if args.budget and elapsed > args.budget:
            results[name] = {"skipped": f"budget {args.budget:.0f} s spent ({elapsed:.0f} s)"}
            print(f"[{name}] skipped: budget spent")
            continue
        t0 = time.perf_counter()
        results[name] = fns[name](p, args)
        results[name]["section_s"] = time.perf_counter() - t0
        print(
            f"[{name}] {time.perf_counter() - t0:.1f} s: {json.dumps(results[name], default=str)}", flush=True
        )
    print("\n".join(table(results)))
    path = args.json or f"accelerator_{args.preset}.json"
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"wrote {path}; total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
