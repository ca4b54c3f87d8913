"""Memory planning for the READ-7B / READ-13B train steps: per-device bytes on the meshes people use, and the
largest batch per device that fits, from abstract models and compiled-not-executed steps on fake CPU devices.

  parameters + optimizer state: exact, from the abstract model's shapes and the FSDP shardings of the run
      config (`read_jax.train.step.memory_report(lower=False)`) on a fake mesh of each target's device count;
  activations (with remat): XLA's per-device temporary bytes of the compiled train step (`memory_analysis`,
      nothing executed) on 8 fake devices with FSDP, at 1 and 2 LLaMA layers x 1 and 2 images per device
      (CLIP and SAM's encoder at 2 layers: frozen, their activations are transient), fitted as
      a + b * images + c * layers + d * layers * images and extrapolated to the real depth. The text length is
      the recipe's largest bucket (`--length`, default 1793 + 575 image tokens, 3 conversations per image).

CPU buffer assignment is not the GPU's or the TPU's (fusion and layouts differ), so the activation figures are
an estimate of the order of magnitude; "fits" keeps 10% of the device memory free for the runtime.

    python benchmarks/memory.py                 # both models, every target (compiles 8 shallow steps)
    python benchmarks/memory.py --static-only   # parameters + optimizer only (seconds)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1 << 30
# (name, devices, memory per device in GiB)
TARGETS = (
    ("1x H100 80GB", 1, 80),
    ("8x A100 40GB", 8, 40),
    ("TPU v4-8 (4 chips)", 4, 32),
    ("TPU v5e-8 (8 chips)", 8, 16),
    ("TPU v5p-8 (4 chips)", 4, 95),
)
MODELS = {"7B": ("read_7b_reasonseg", None), "13B": ("read_13b_reasonseg", "stage1")}


def load(name: str, arg: str | None, length: int):
    from read_jax.cli import common

    spec = os.path.join(ROOT, "configs", f"{name}.py") + (f":{arg}" if arg else "")
    c = common.load_run_config(spec)
    c.data.length_buckets = (length,)
    return c


def shallow(cfg, layers: int):
    sam = dataclasses.replace(cfg.sam, encoder_depth=2, global_attn_indexes=(1,))
    clip = dataclasses.replace(cfg.clip, num_hidden_layers=2)
    return cfg.replace(llama=dataclasses.replace(cfg.llama, num_hidden_layers=layers), clip=clip, sam=sam)


def activation_fit(c, cfg, length: int) -> tuple[np.ndarray, list]:
    """Per-device temp bytes of the compiled step at (layers, images) in {1, 2}^2, and the fitted
    coefficients of a + b i + c l + d l i."""
    from read_jax import sharding as shd
    from read_jax.data import loaders
    from read_jax.train import state as tstate
    from read_jax.train import step as tstep

    mesh = shd.make_mesh(data=1, fsdp=8)
    rows, points = [], []
    for layers in (1, 2):
        small = shallow(cfg, layers)
        setup = tstate.setup_model(small, mesh, strategy=loaders.plain(c.mesh.strategy),
                                   trainable_dtype=c.train.get("trainable_dtype") or None)  # fmt: skip
        tx = tstate.make_optimizer(c.train)
        opt_sh, opt_abs = tstate.opt_state_shardings(
            tx, setup.trainable_abstract, setup.trainable_shardings, mesh
        )
        for images in (1, 2):
            dc = loaders.data_config(c.data, small, batch_size=images * 8)
            spec = loaders.batch_spec(dc, small.sam, length, 2)
            bsh = tstep.micro_batch_shardings(spec, mesh)
            jitted = tstep.jit_train_step(
                setup, tx, tstep.step_config(c, (dc.max_mask_side,) * 2), opt_sh, bsh
            )
            t0 = time.perf_counter()
            with shd.use_mesh(mesh):
                args = tstep.step_arguments(setup, opt_abs, opt_sh, spec, bsh)
                _, stats = tstep.compile_step(jitted, args)
            temp = stats["temp_size_in_bytes"]
            dt = time.perf_counter() - t0
            print(f"  compiled {layers} layer(s) x {images} image(s)/device in {dt:.0f} s: "
                  f"temp {temp / GIB:.2f} GiB/device", flush=True)  # fmt: skip
            rows.append([1, images, layers, layers * images])
            points.append(temp)
    coef = np.linalg.solve(np.asarray(rows, float), np.asarray(points, float))
    return coef, points


def activations(coef, layers: int, images: int) -> float:
    return float(coef @ np.array([1, images, layers, layers * images]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="7B,13B")
    ap.add_argument("--length", type=int, default=1793, help="text bucket (the recipe's largest)")
    ap.add_argument("--static-only", action="store_true", help="parameters + optimizer state only")
    args = ap.parse_args(argv)
    from read_jax import sharding as shd
    from read_jax.train import config as rc
    from read_jax.train import step as tstep

    for name in args.models.split(","):
        c = load(*MODELS[name], args.length)
        cfg = rc.read_config(c.model)
        print(f"READ-{name} ({MODELS[name][0]}): bf16 base, fp32 trainables + AdamW, remat, FSDP over every "
              f"device, 3 conversations x {args.length} text + 575 image tokens per image")  # fmt: skip
        coef = None
        if not args.static_only:
            coef, _ = activation_fit(c, cfg, args.length)
        cols = ("params", "optim", "act/img", "1 img")
        print(
            f"  {'target':22s} "
            + " ".join(f"{x:>8s}" for x in cols)
            + f" {'max img/dev':>11s}  (GiB per device)"
        )
        for target, n, hbm in TARGETS:
            mesh = shd.make_mesh(data=1, fsdp=n, devices=jax.devices()[:n])
            rep = tstep.memory_report(cfg, c, mesh=mesh, lower=False)
            params = (rep["frozen_bytes_per_device"] + rep["trainable_bytes_per_device"]) / GIB
            optim = rep["optimizer_bytes_per_device"] / GIB
            if coef is None:
                print(f"  {target:22s} {params:8.2f} {optim:8.2f}")
                continue
            layers = cfg.llama.num_hidden_layers
            one = activations(coef, layers, 1) / GIB
            per = one - activations(coef, layers, 0) / GIB
            budget = 0.9 * hbm - params - optim
            fits = 0
            while activations(coef, layers, fits + 1) / GIB <= budget and fits < 64:
                fits += 1
            print(
                f"  {target:22s} {params:8.2f} {optim:8.2f} {per:8.2f} {params + optim + one:8.2f} {fits:11d}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
