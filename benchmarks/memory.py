"""Memory: what the train step, evaluation and generation take at the tiny size (measured here), and the
READ-7B / READ-13B train step's per-device bytes on the meshes people use, with the largest batch that fits.

measured (`--part measured`): each workload runs alone in a fresh process at `accelerator.py --preset tiny`'s
  size (the smoke READ, fp32; CPU here): the recipe's compiled train step (`accelerator.jax_train`: 2 images x
  3 conversations, 64-token bucket, 3 steps), the ReasonSeg protocol (`accelerator.jax_eval`: 8 generated
  queries, the pipeline in-process) and `inference.predict` (32 new tokens + masks). Reported: the process's
  peak RSS and its growth over the RSS after the imports (on a CPU the device's buffers live there), the
  device's own peak where the backend reports one (`Device.memory_stats()`: GPU/TPU), and for the train step
  XLA's compiled footprint (arguments + outputs + temporaries - aliased, `memory_analysis`).
plan (`--part plan`): nothing is allocated or run.
  parameters + optimizer state: exact, from the abstract model (`nnx.eval_shape`) and the FSDP shardings of
      the run config (`read_jax.sharding.tree_shardings`) on a fake mesh of each target's device count;
  activations (remat on, as the recipe): XLA's per-device temporaries of the compiled (not executed) train
      step on 8 fake CPU devices with FSDP, at 1 and 2 LLaMA layers x 1 and 2 images per device (CLIP and
      SAM's encoder at 2 layers: frozen, their activations are transient), fitted as
      a + b*images + c*layers + d*layers*images and extrapolated to the real depth; the text length is the
      recipe's largest bucket (`--length`, 1793 + 575 image tokens, 3 conversations per image).
  compiled with `read_jax.xla_flags`' CPU options (XLA:CPU's default scheduler defeats remat); the fit and
  what remat keeps per layer are printed on stderr. CPU buffer assignment is not the GPU's or the TPU's
  (fusion and layouts differ): the activation figures are an order of magnitude; "fits" keeps 10% of the
  device memory free for the runtime. `--markdown` prints the tables as the README has them.

    python benchmarks/memory.py                        # both parts (the plan compiles 8 shallow steps)
    python benchmarks/memory.py --part measured
    python benchmarks/memory.py --part plan --static-only   # parameters + optimizer only (a minute)
    python benchmarks/memory.py --part measured --markdown  # the README's tables (also --part plan)

Last line (with the plan's activations): `train step, READ-7B: <n> images/device fit on 1x H100 80GB, <m> on
8x A100 40GB`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

ENV0 = dict(os.environ)  # a measured workload's process: the real device, not the plan's fake CPU mesh
if "--measure" not in sys.argv:  # the plan's fake mesh (a measured workload runs on the real device)
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # XLA:CPU's concurrency-optimised scheduler runs the recomputed layers early and keeps their activations
    # (and converted weights) live together, so remat saves nothing in the CPU's buffer assignment (a probe,
    # a 1024-wide LLaMA at 1024 tokens, FSDP over 8: ~155 MiB per layer with or without remat, 47 MiB with
    # these flags). GPU/TPU XLA schedule for memory; the commands set these flags on a CPU for the same
    # reason (`read_jax.xla_flags`).
    from read_jax import xla_flags

    xla_flags.apply_cpu_memory_flags()

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GIB, MIB = 1 << 30, 1 << 20
# (name, devices, memory per device in GiB)
TARGETS = (
    ("1x H100 80GB", 1, 80),
    ("8x A100 40GB", 8, 40),
    ("TPU v4-8 (4 chips)", 4, 32),
    ("TPU v5e-8 (8 chips)", 8, 16),
    ("TPU v5p-8 (4 chips)", 4, 95),
)
MODELS = {"7B": ("read_7b_reasonseg", None), "13B": ("read_13b_reasonseg", "stage1")}
WORKLOADS = ("train", "eval", "generate")


def _accelerator():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_accelerator", os.path.join(HERE, "accelerator.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


# ---- measured: one workload per process ------------------------------------------------------------------
def _train(acc) -> dict:
    p = acc.PRESETS["tiny"]
    out, _, _ = acc.jax_train(p, argparse.Namespace(reps=3))
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")
    mem = out.get("memory", {})
    if all(k in mem for k in keys):
        out["xla_bytes"] = sum(mem[k] for k in keys[:3]) - mem[keys[3]]
    return out


def _eval(acc) -> dict:
    import tempfile

    from read_jax.data import make_shapes
    from read_jax.data import pipeline as P
    from read_jax.data import readers as R

    p = acc.PRESETS["tiny"]
    cfg = acc.run_config_model(p)
    with tempfile.TemporaryDirectory() as d:
        make_shapes.write_split(d, "val", p["queries"], seed=0)
        reader = R.ReasonSegReader(d, "val", mode="eval")
        dc = P.DataConfig(
            batch_size=p["eval_batch"],
            max_convs=1,
            max_mask_side=448,
            length_buckets=(128,),
            clip_size=cfg.clip.image_size,
            num_workers=0,
        )
        return acc.jax_eval(cfg, reader, dc, argparse.Namespace(workers=0))


def _generate(acc) -> dict:
    from read_jax import inference
    from read_jax.data.tokenizer import ReadTokenizer

    p = acc.PRESETS["tiny"]
    model = acc._bench_module("eval").random_model(acc.run_config_model(p))
    tok = ReadTokenizer(acc.TOKENIZER)
    image = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    pred = inference.predict(model, tok, image, "What is red? Please segment it.", max_new_tokens=32)
    return {"wall_s": time.perf_counter() - t0, "answer_tokens": len(pred.tokens)}


def measure(workload: str) -> dict:
    """Run one workload in this process; its figures, peak RSS and device peak (a JSON line on stdout)."""
    acc = _accelerator()
    from read_jax import inference  # noqa: F401  (the imports count in the baseline, not the workload)
    from read_jax.eval import protocols  # noqa: F401
    from read_jax.train import step  # noqa: F401

    jax.devices()
    base = _rss_mib()
    out = {"train": _train, "eval": _eval, "generate": _generate}[workload](acc)
    stats = jax.devices()[0].memory_stats() or {}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "workload": workload,
        "backend": jax.default_backend(),
        "rss_peak_mib": peak,
        "rss_growth_mib": peak - base,
        "device_peak_mib": stats["peak_bytes_in_use"] / MIB if "peak_bytes_in_use" in stats else None,
        "xla_mib": out["xla_bytes"] / MIB if "xla_bytes" in out else None,
    }


LABELS = {
    "train": "train step (2 images x 3 conversations, 64 tokens)",
    "eval": "ReasonSeg protocol (8 queries)",
    "generate": "`inference.predict` (32 new tokens + masks)",
}


def measured_table(markdown: bool = False) -> list[dict]:
    rows = []
    env = {**ENV0, "PYTHONPATH": os.pathsep.join([ROOT, ENV0.get("PYTHONPATH", "")])}
    for w in WORKLOADS:
        r = subprocess.run(
            [sys.executable, __file__, "--measure", w], env=env, capture_output=True, text=True, timeout=1800
        )
        if r.returncode != 0:
            raise RuntimeError(f"the {w} workload failed:\n{r.stderr[-3000:]}")
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    fmt = lambda v: "n/a" if v is None else f"{v:.0f}"
    if markdown:  # the README's table; the device peak only where the backend has one
        device = any(r["device_peak_mib"] is not None for r in rows)
        head = ["workload", "peak RSS", "growth over the imports"] + ["device peak"] * device
        head.append("compiled train step (args + outputs + temporaries)")
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            cells = [LABELS[r["workload"]], fmt(r["rss_peak_mib"]), fmt(r["rss_growth_mib"])]
            cells += [fmt(r["device_peak_mib"])] * device
            cells.append("" if r["xla_mib"] is None else fmt(r["xla_mib"]))
            print("| " + " | ".join(cells) + " |")
        return rows
    print(f"measured here ({rows[0]['backend']}, tiny size): MiB")
    print(f"  {'workload':10s} {'peak RSS':>9s} {'growth':>7s} {'device peak':>12s} {'XLA step':>9s}")
    for r in rows:
        print(
            f"  {r['workload']:10s} {r['rss_peak_mib']:9.0f} {r['rss_growth_mib']:7.0f} "
            f"{fmt(r['device_peak_mib']):>12s} {fmt(r['xla_mib']):>9s}"
        )
    return rows


# ---- plan: READ-7B / 13B on fake meshes ------------------------------------------------------------------
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


def activation_fit(c, cfg, length: int) -> np.ndarray:
    """Coefficients of a + b i + c l + d l i fitted to the per-device temporaries of the compiled step at
    (layers, images per device) in {1, 2}^2 (8 fake devices, FSDP)."""
    from read_jax import sharding as shd
    from read_jax.data import loaders
    from read_jax.train import state as tstate
    from read_jax.train import step as tstep

    mesh = shd.make_mesh(data=1, fsdp=8)
    rows, points = [], []
    for layers in (1, 2):
        small = shallow(cfg, layers)
        setup = tstate.setup_model(
            small,
            mesh,
            strategy=loaders.plain(c.mesh.strategy),
            trainable_dtype=c.train.get("trainable_dtype") or None,
        )
        tx = tstate.make_optimizer(c.train)
        opt_sh, opt_abs = tstate.opt_state_shardings(
            tx, setup.trainable_abstract, setup.trainable_shardings, mesh
        )
        for images in (1, 2):
            # The accelerator's pipeline: SAM's resize on the device ("auto" would pick the host on this CPU).
            dc = loaders.data_config(c.data, small, batch_size=images * 8, sam_device_resize=True)
            spec = loaders.batch_spec(dc, small.sam, length, 1)
            bsh = tstep.micro_batch_shardings(spec, mesh)
            sc = tstep.step_config(c, (dc.max_mask_side,) * 2)
            jitted = tstep.jit_train_step(setup, tx, sc, opt_sh, bsh)
            with shd.use_mesh(mesh):
                args = tstep.step_arguments(setup, opt_abs, opt_sh, spec, bsh)
                _, stats = tstep.compile_step(jitted, args)
            temp = stats["temp_size_in_bytes"]
            print(
                f"  compiled {layers} layer(s) x {images} image(s)/device in {stats['compile_s']:.0f} s: "
                f"temporaries {temp / GIB:.2f} GiB/device",
                file=sys.stderr,  # progress; stdout keeps the tables
                flush=True,
            )
            rows.append([1, images, layers, layers * images])
            points.append(temp)
    coef = np.linalg.solve(np.asarray(rows, float), np.asarray(points, float))
    # What remat keeps per layer and image: the layer's input, 3 conversations x (text + image tokens) x D.
    tokens = length + cfg.clip.num_patches - 1  # the <image> token becomes the patches
    kept = 3 * tokens * cfg.llama.hidden_size * np.dtype(cfg.llama.compute_dtype).itemsize
    print(
        f"  fit (GiB/device): {coef[0] / GIB:.2f} + {coef[1] / GIB:.2f}/image + {coef[2] / GIB:.2f}/layer + "
        f"{coef[3] / GIB:.2f}/(layer x image); remat's saved layer input: {kept / GIB:.3f}/(layer x image)",
        file=sys.stderr,
        flush=True,
    )
    return coef


def activations(coef, layers: int, images: int) -> float:
    return float(coef @ np.array([1, images, layers, layers * images]))


def static_bytes(c, cfg) -> dict[str, tuple[float, float]]:
    """{target: (parameters GiB, optimizer state GiB) per device}: one abstract model, each target's mesh."""
    from read_jax import sharding as shd
    from read_jax.data import loaders
    from read_jax.train import state as tstate

    strategy = loaders.plain(c.mesh.strategy)
    setup = tstate.setup_model(
        cfg, shd.make_mesh(1, 1, devices=jax.devices()[:1]), strategy=strategy,
        trainable_dtype=c.train.get("trainable_dtype") or None,
    )  # fmt: skip
    tx = tstate.make_optimizer(c.train)
    out = {}
    for target, n, _ in TARGETS:
        mesh = shd.make_mesh(data=1, fsdp=n, devices=jax.devices()[:n])
        tr_sh = shd.tree_shardings(setup.trainable_abstract, mesh, strategy)
        fr_sh = shd.tree_shardings(setup.frozen_abstract, mesh, strategy)
        opt_sh, opt_abs = tstate.opt_state_shardings(tx, setup.trainable_abstract, tr_sh, mesh)
        params = tstate.state_bytes_per_device(setup.trainable_abstract, tr_sh)
        params += tstate.state_bytes_per_device(setup.frozen_abstract, fr_sh)
        out[target] = (params / GIB, tstate.state_bytes_per_device(opt_abs, opt_sh) / GIB)
    return out


def plan_table(models: list[str], length: int, static_only: bool, markdown: bool = False) -> dict:
    """Print one table per model (one table for all with `markdown`, after every compile); returns
    {model: {target: largest images per device}}."""
    from read_jax.train import config as rc

    fits_all, md = {}, []
    for name in models:
        c = load(*MODELS[name], length)
        cfg = rc.read_config(c.model)
        print(
            f"READ-{name} ({MODELS[name][0]}): {cfg.llama.param_dtype} base, fp32 trainables + AdamW, remat, "
            f"FSDP over every device, 3 conversations x {length} text + 575 image tokens per image",
            file=sys.stderr if markdown else sys.stdout,
            flush=True,
        )
        coef = None if static_only else activation_fit(c, cfg, length)
        cols = ("params", "optim", "act/img", "1 img")
        head = " ".join(f"{x:>8s}" for x in cols)
        if not markdown:
            print(f"  {'target':22s} {head} {'max img/dev':>11s}  (GiB/device)")
        fits_all[name] = {}
        layers = cfg.llama.num_hidden_layers
        for (target, _, hbm), (params, optim) in zip(TARGETS, static_bytes(c, cfg).values(), strict=True):
            if coef is None:
                md.append([f"READ-{name}", target, f"{params:.2f}", f"{optim:.2f}"])
                if not markdown:
                    print(f"  {target:22s} {params:8.2f} {optim:8.2f}")
                continue
            one = activations(coef, layers, 1) / GIB
            per = one - activations(coef, layers, 0) / GIB
            budget = 0.9 * hbm - params - optim
            fits = 0
            while fits < 64 and activations(coef, layers, fits + 1) / GIB <= budget:
                fits += 1
            fits_all[name][target] = fits
            total = params + optim + one
            md.append([f"READ-{name}", target, *(f"{v:.2f}" for v in (params, optim, per, total)), str(fits)])
            if not markdown:
                print(f"  {target:22s} {params:8.2f} {optim:8.2f} {per:8.2f} {total:8.2f} {fits:11d}")
    if markdown:
        head = ["model", "target", "parameters", "optimizer state"]
        if not static_only:
            head += ["activations per image", "total at 1 image/device", "max images/device"]
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for row in md:
            print("| " + " | ".join(row) + " |")
    return fits_all


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("all", "measured", "plan"), default="all")
    ap.add_argument("--models", default="7B,13B")
    ap.add_argument("--length", type=int, default=1793, help="text bucket (the recipe's largest)")
    ap.add_argument("--static-only", action="store_true", help="plan: parameters + optimizer state only")
    ap.add_argument("--markdown", action="store_true", help="print the tables as markdown (README)")
    ap.add_argument("--measure", choices=WORKLOADS, help=argparse.SUPPRESS)  # one workload (a subprocess)
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return 0
    if args.part in ("all", "measured"):
        measured_table(args.markdown)
    if args.part in ("all", "plan"):
        models = [m for m in args.models.split(",") if m]
        fits = plan_table(models, args.length, args.static_only, args.markdown)
        if fits.get("7B"):
            f = fits["7B"]
            print(
                f"train step, READ-7B: {f['1x H100 80GB']} images/device fit on 1x H100 80GB, "
                f"{f['8x A100 40GB']} on 8x A100 40GB"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
