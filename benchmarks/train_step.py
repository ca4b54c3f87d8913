"""Train-step throughput: read_jax's jitted step vs a torch READ doing the same forward/backward/AdamW (CPU).

Workload (both sides, same weights through read_jax's converter tables, fp32): `ReadConfig.tiny()` (CLIP 336 /
576 image tokens, a 64-wide 2-layer LLaMA, SAM on a 256 frame), B images x C conversation rows of L text
tokens, one [SEG] and one GT mask per row on a 320x320 canvas, READ's trainables without LoRA (embed_tokens,
lm_head, mask decoder, text_hidden_fcs), READ's loss (CE + 2 BCE + 0.5 Dice, full-vocabulary CE on both
sides), global-norm clipping 1.0 and AdamW(0.9, 0.95, wd 0).
  * torch: `torchref.read.TorchRead` (transformers LLaMA/CLIP, Meta's SAM modules, the SasP + DtoC
    transcription, one SAM decode per [SEG] in a Python loop as READ does), `torch.optim.AdamW`,
    `clip_grad_norm_`; the faster of 1 and 2 intra-op threads.
  * JAX: `read_jax.train.step.train_step` jitted once (compile excluded) with donation, one device.
Timings are medians of wall-clock step times after warm-up (`block_until_ready` / synchronous torch).

    .venv/bin/python benchmarks/train_step.py [--images 2 --rows 2 --length 64 --steps 8]
    .venv/bin/python benchmarks/train_step.py --memory-7b   # 7B step lowered on 8 fake devices: bytes/device

(with the package installed, `pip install -e ".[test]"`, or `PYTHONPATH=.` from the repository root).

Last line: `train step JAX/torch: N.Nx` (torch step time / JAX step time).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if "--memory-7b" in sys.argv:  # must precede the jax import
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np

from read_jax import sharding as shd
from read_jax.config import IGNORE_INDEX, ReadConfig, SaspConfig
from read_jax.sam.transforms import get_preprocess_shape
from read_jax.train import config as run_config
from read_jax.train import state as tstate
from read_jax.train import step as tstep

CANVAS = 320
TRAINABLE = (
    r"(.*/)?model/embed_tokens/.*",
    r"(.*/)?lm_head/.*",
    r"(.*/)?visual_model/mask_decoder/.*",
    r"(.*/)?text_hidden_fcs/.*",
)


def make_batch(cfg: ReadConfig, images: int, rows: int, length: int, seed: int = 0) -> dict:
    """A pipeline-layout batch; every row is
    `<s> ... <im_start> <image> <im_end> question answer [SEG] . </s>`."""
    rng = np.random.default_rng(seed)
    r = images * rows
    ids = np.zeros((r, length), np.int32)
    labels = np.full((r, length), IGNORE_INDEX, np.int32)
    mask = np.zeros((r, length), bool)
    for i in range(r):
        q = rng.integers(100, 30000, size=length // 2).tolist()
        a = [*rng.integers(100, 30000, size=4).tolist(), cfg.seg_token_id, 29889, 2]
        row = [1, 319, cfg.im_start_token_id, -200, cfg.im_end_token_id, *q, *a]
        row = [*row[: length - 1], 2] if len(row) > length else row
        ids[i, : len(row)] = row
        mask[i, : len(row)] = True
        labels[i, len(row) - len(a) : len(row)] = row[len(row) - len(a) :]
    hw = np.array([[240, 320], [300, 200], [320, 320], [200, 280]] * images, np.int32)[:images]
    conv_image = np.arange(r, dtype=np.int32) // rows
    masks = np.zeros((r, CANVAS, CANVAS), np.uint8)
    for i in range(r):
        h, w = hw[conv_image[i]]
        masks[i, h // 4 : h // 2, w // 3 : 2 * w // 3] = 1
    s = cfg.sam.image_size
    return {
        "images_clip": rng.normal(size=(images, cfg.clip.image_size, cfg.clip.image_size, 3)).astype(
            np.float32
        ),
        "images_sam": rng.normal(size=(images, s, s, 3)).astype(np.float32),
        "sam_input_hw": np.array([get_preprocess_shape(int(h), int(w), s) for h, w in hw], np.int32),
        "orig_hw": hw,
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
        "conv_image": conv_image,
        "conv_valid": np.ones((r,), bool),
        "masks": masks,
        "mask_valid": np.ones((r,), bool),
        "mask_hw": hw[conv_image],
        "image_valid": np.ones((images,), bool),
    }


def torch_model(cfg: ReadConfig):
    """TorchRead + the read_jax model with the same weights (converted through the real key tables)."""
    from torchref.read import build_pair

    return build_pair(cfg, seed=0)


def torch_step_fn(cfg: ReadConfig, tm, batch: dict, lr: float):
    import torch

    from torchref.read import sasp_functions, to_torch_batch, torch_losses

    similarity, to_points, dtoc = sasp_functions(cfg)

    train = [
        p
        for n, p in tm.named_parameters()
        if n.startswith(
            ("llm.model.embed_tokens", "llm.lm_head", "visual_model.mask_decoder.", "text_hidden_fcs.")
        )
    ]
    for p in tm.parameters():
        p.requires_grad_(False)
    for p in train:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(train, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    tb = to_torch_batch({k: v for k, v in batch.items() if k not in ("masks", "mask_valid", "mask_hw")})
    gts = []
    for r in range(batch["input_ids"].shape[0]):
        h, w = batch["orig_hw"][batch["conv_image"][r]]
        gts.append(torch.from_numpy((batch["masks"][r, :h, :w] == 1).astype(np.float32)))

    def step():
        opt.zero_grad(set_to_none=True)
        out = tm(tb, (similarity, to_points, dtoc), {})
        losses = torch_losses(out, gts)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(train, 1.0)
        opt.step()
        return losses["loss"].item()

    return step


def jax_step_fn(cfg: ReadConfig, model, batch: dict, lr: float, ce_max_tokens: int = 0):
    from flax import nnx
    from ml_collections import ConfigDict

    from read_jax.lora import trainable_filter

    mesh = shd.make_mesh(1, 1, devices=jax.devices()[:1])
    tc = ConfigDict(
        {
            "lr": lr,
            "warmup_steps": 0,
            "clip_norm": 1.0,
            "b1": 0.9,
            "b2": 0.95,
            "eps": 1e-8,
            "weight_decay": 0.0,
        }
    )
    tx = tstate.make_optimizer(tc)
    graphdef, tr, fr = nnx.split(model, trainable_filter(cfg.trainable_regexes), ...)
    setup = tstate.ModelSetup(
        cfg,
        None,
        graphdef,
        jax.eval_shape(lambda: tr),
        jax.eval_shape(lambda: fr),
        shd.tree_shardings(tr, mesh),
        shd.tree_shardings(fr, mesh),
        mesh,
        {},
    )
    opt_sh, opt_abs = tstate.opt_state_shardings(
        tx, setup.trainable_abstract, setup.trainable_shardings, mesh
    )
    stacked = {k: v[None] for k, v in batch.items()}
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in stacked.items()}
    bsh = tstep.micro_batch_shardings(spec, mesh)
    sc = tstep.StepConfig(canvas_hw=(CANVAS, CANVAS), dropout=False, ce_max_tokens=ce_max_tokens)
    compiled, stats = tstep.compile_step(
        tstep.jit_train_step(setup, tx, sc, opt_sh, bsh),
        tstep.step_arguments(setup, opt_abs, opt_sh, spec, bsh),
    )
    # A copy: the step donates its trainables, and the model must stay usable for the next variant.
    state = {"tr": jax.device_put(tr, setup.trainable_shardings, may_alias=False), "opt": None, "i": 0}
    state["opt"] = jax.jit(tx.init, out_shardings=opt_sh)(state["tr"])
    fr = jax.device_put(fr, setup.frozen_shardings)
    dev_batch = shd.shard_batch(stacked, mesh, batch_axis=1)

    def step():
        state["tr"], state["opt"], m = compiled(
            state["tr"],
            fr,
            state["opt"],
            dev_batch,
            jnp.asarray(state["i"], jnp.int32),
            jnp.asarray(lr, jnp.float32),
        )
        state["i"] += 1
        return float(m["loss"])  # synchronises

    return step, stats


def timed(step, n: int, warmup: int = 2) -> tuple[list[float], list[float]]:
    losses = [step() for _ in range(warmup)]
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    return times, losses


def memory_7b() -> None:
    import importlib.util

    # configs/*.py are config files (not an installed package): loaded by path, as `train.py --config` does.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "read_7b_reasonseg.py")
    spec = importlib.util.spec_from_file_location("read_7b_reasonseg", path)
    read_7b_reasonseg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(read_7b_reasonseg)
    c = read_7b_reasonseg.get_config()
    cfg = run_config.read_config(c.model)
    t0 = time.perf_counter()
    rep = tstep.memory_report(cfg, c, mesh=shd.make_mesh(data=1, fsdp=8), lower=True)
    gib = 1 << 30
    print(
        f"READ-7B train step (bf16, remat, LoRA r=8, FSDP over {rep['devices']} fake devices, accum "
        f"{rep['accum']} x {rep['batch_images']} images x L={rep['text_length']}): "
        f"lowered in {rep['lower_s']:.1f}s ({time.perf_counter() - t0:.0f}s with eval_shape), "
        "nothing executed"
    )
    print(
        f"  parameters: {rep['frozen_params'] / 1e9:.2f}B frozen, "
        f"{rep['trainable_params'] / 1e6:.1f}M trainable"
    )
    print(
        f"  per device: frozen {rep['frozen_bytes_per_device'] / gib:.3f} GiB, trainable (fp32) "
        f"{rep['trainable_bytes_per_device'] / gib:.3f} GiB, "
        f"AdamW state {rep['optimizer_bytes_per_device'] / gib:.3f} GiB; "
        f"params + optimizer {rep['params_plus_optimizer_bytes_per_device'] / gib:.3f} GiB"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--rows", type=int, default=2, help="conversation rows ([SEG]s) per image")
    p.add_argument("--length", type=int, default=64, help="text tokens per row (plus 575 image tokens)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--memory-7b", action="store_true", help="only the 7B eval_shape + lowering report")
    args = p.parse_args()
    if args.memory_7b:
        memory_7b()
        return
    import torch

    cfg = ReadConfig.tiny(
        lora=None,
        trainable_regexes=TRAINABLE,
        sasp=SaspConfig.read_7b(similarity_dtype="float32"),
        max_segs=1,
    )
    batch = make_batch(cfg, args.images, args.rows, args.length)
    tm, model = torch_model(cfg)
    lr = 1e-4
    j_step, stats = jax_step_fn(cfg, model, batch, lr)
    j_times, j_losses = timed(j_step, args.steps)
    # The same step with the text loss on the supervised positions only (`train.ce_max_tokens`), for
    # reference.
    s_step, s_stats = jax_step_fn(cfg, model, batch, lr, ce_max_tokens=8 * args.images * args.rows)
    s_times, s_losses = timed(s_step, args.steps)
    best = None
    for threads in (1, 2):
        torch.set_num_threads(threads)
        t_step = torch_step_fn(cfg, TorchReadCopy(tm), batch, lr)
        t_times, t_losses = timed(t_step, args.steps)
        med = statistics.median(t_times)
        if best is None or med < best[0]:
            best = (med, threads, t_losses)
    t_med, threads, t_losses = best
    j_med = statistics.median(j_times)
    print(
        f"workload: ReadConfig.tiny(), {args.images} images x {args.rows} rows x {args.length} text tokens "
        f"(+575 image tokens), canvas {CANVAS}, "
        f"{sum(p.numel() for p in tm.parameters() if p.requires_grad):,} trainable parameters"
    )
    print(f"first-step loss: JAX {j_losses[0]:.6f}  torch {t_losses[0]:.6f} (same weights, same batch)")
    print(
        f"JAX:   {j_med * 1e3:8.1f} ms/step  {1 / j_med:6.2f} steps/s  (compile {stats['compile_s']:.1f}s, "
        f"{stats.get('flops', 0) / 1e9:.1f} GFLOP/step)"
    )
    s_med = statistics.median(s_times)
    print(
        f"JAX, CE on supervised positions only: {s_med * 1e3:8.1f} ms/step  {1 / s_med:6.2f} steps/s  "
        f"(first loss {s_losses[0]:.6f}, {s_stats.get('flops', 0) / 1e9:.1f} GFLOP/step; not in the ratio)"
    )
    print(f"torch: {t_med * 1e3:8.1f} ms/step  {1 / t_med:6.2f} steps/s  ({threads} thread(s))")
    print(f"train step JAX/torch: {t_med / j_med:.1f}x")


def TorchReadCopy(tm):
    """A fresh copy of the torch model (each thread setting starts from the same weights and optimizer
    state)."""
    import copy

    return copy.deepcopy(tm)


if __name__ == "__main__":
    main()
