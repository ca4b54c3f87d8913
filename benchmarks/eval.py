"""Throughput of the teacher-forced ReasonSeg protocol (`read_jax.eval.protocols.evaluate_reasonseg`).

Workload: the generated shapes set (`read_jax.data.make_shapes`, ReasonSeg's on-disk format and LISA's fixed
query templates + "Sure, the segmentation result is [SEG]."), batches from the real eval pipeline
(`read_jax.data.pipeline.eval_dataset`), materialised before timing so that only the protocol is timed:
CLIP + LLaMA forward, [SEG] extraction, SasP points, SAM encoder + decoder, masks at the GT resolution,
per-query I/U and the host-side records. Random weights (throughput does not depend on them); the compile
is timed separately and excluded.

  --preset tiny   `ReadConfig.tiny()` (fp32), the CPU size of the tests.
  --preset 7b     READ-7B's shapes (LLaMA-7B, CLIP ViT-L/14-336, SAM ViT-H) in bf16: the GPU figure. Weights
                  are random normals generated on the device (nothing pretrained is needed to time it).

Run: `.venv/bin/python benchmarks/eval.py [--preset tiny|7b] [--num 24] [--batch 8]` (with the package
installed, `pip install -e .`, or `PYTHONPATH=.` from the repository root). Last line:
`eval throughput: N.N samples/s`.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from read_jax.config import ReadConfig
from read_jax.convert.common import path_str
from read_jax.data import make_shapes
from read_jax.data import pipeline as P
from read_jax.data import readers as R
from read_jax.eval import protocols
from read_jax.read_model import ReadModel

TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "assets", "tokenizer")


@functools.cache
def _normal(shape, dtype, scale):
    return jax.jit(lambda k: (jax.random.normal(k, shape, jnp.float32) * scale).astype(dtype))


def random_model(cfg: ReadConfig, seed: int = 0, on_device: bool = False, factory=None):
    """A ReadModel (or `factory()`'s module) with random leaves (norm scales 1, fan-in scaled kernels, small
    others).

    The eager init would compile and run hundreds (7B: thousands) of small ops; instead the leaves come from
    numpy (small models) or from one jitted normal per distinct leaf shape on the device (the 7B model).
    """
    factory = factory or (lambda: ReadModel(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(nnx.eval_shape(factory))
    flat = list(nnx.to_flat_state(state))
    key = jax.random.key(seed)
    rng = np.random.default_rng(seed)
    for i, (path, var) in enumerate(flat):
        a = var.get_value()
        name = path_str(path).split("/")[-1]
        if name == "scale":
            var.set_value(jnp.ones(a.shape, a.dtype))
            continue
        fan_in = int(np.prod(a.shape[:-1])) if name == "kernel" else 1
        scale = 1.0 / np.sqrt(max(fan_in, 1)) if name == "kernel" else (1.0 if "gaussian" in name else 0.02)
        if on_device:
            var.set_value(_normal(tuple(a.shape), a.dtype, float(scale))(jax.random.fold_in(key, i)))
        else:
            var.set_value(jnp.asarray(rng.normal(0, scale, a.shape), a.dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=["tiny", "7b"], default="tiny")
    ap.add_argument("--num", type=int, default=24, help="queries (generated images) in the timed split")
    ap.add_argument("--batch", type=int, default=8, help="images per batch (one query each)")
    ap.add_argument("--reps", type=int, default=2, help="timed passes over the split (the best is reported)")
    args = ap.parse_args()

    if args.preset == "tiny":
        cfg = ReadConfig.tiny(lora=None, max_segs=1)
    else:
        cfg = ReadConfig.read_7b(lora=None, max_segs=1).with_dtype("bfloat16")
    data_dir = tempfile.mkdtemp(prefix="eval_bench_")
    make_shapes.write_split(data_dir, "val", args.num, seed=0)
    reader = R.ReasonSegReader(data_dir, "val", mode="eval")
    dc = P.DataConfig(
        batch_size=args.batch,
        max_convs=1,
        max_mask_side=448,
        length_buckets=(128,),
        clip_size=cfg.clip.image_size,
    )
    t0 = time.perf_counter()
    batches = list(P.eval_dataset(reader, dc, cfg.sam, TOKENIZER))
    t_data = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = random_model(cfg, on_device=args.preset != "tiny")
    jax.block_until_ready(nnx.state(model))
    t_init = time.perf_counter() - t0
    mesh = None
    if len(jax.devices()) > 1 and args.batch % len(jax.devices()) == 0:
        from read_jax.sharding import make_mesh

        mesh = make_mesh()
    ev = protocols.Evaluator(model, mesh)

    t0 = time.perf_counter()
    protocols.evaluate_reasonseg(model, batches[:1], evaluator=ev, progress=False)  # compile both stages
    t_compile = time.perf_counter() - t0
    walls = []
    for _ in range(args.reps):
        summary, records = protocols.evaluate_reasonseg(model, batches, evaluator=ev, progress=False)
        walls.append(summary["wall_s"])
    best = min(walls)
    n = len(records)
    d = jax.devices()[0]
    print(
        f"device: {d.device_kind} ({jax.default_backend()}) x {len(jax.devices())}; preset {args.preset} "
        f"(LLaMA D={cfg.llama.hidden_size} L={cfg.llama.num_hidden_layers}, SAM {cfg.sam.image_size}px "
        f"D={cfg.sam.encoder_embed_dim}, {cfg.llama.dtype})"
    )
    print(
        f"split: {n} queries in {len(batches)} batches of {args.batch} images, text length "
        f"{batches[0]['input_ids'].shape[1]} (+{cfg.clip.num_patches - 1} image tokens), GT canvas "
        f"{batches[0]['masks'].shape[1:]}; data pipeline {t_data:.1f}s (not timed below)"
    )
    passes = ", ".join(f"{w:.2f}s" for w in walls)
    print(f"init {t_init:.1f}s, first batch incl. compile {t_compile:.1f}s, timed passes {passes}")
    print(
        f"per query: {best / n * 1e3:.1f} ms; gIoU {100 * summary['gIoU']:.2f} "
        f"cIoU {100 * summary['cIoU']:.2f} (random weights)"
    )
    print(f"eval throughput: {n / best:.1f} samples/s")


if __name__ == "__main__":
    main()
