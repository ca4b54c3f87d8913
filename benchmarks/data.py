"""Data pipeline throughput: examples/s of the full training pipeline on the generated shapes set.

Workload: `make_shapes` writes a shapes set (default 200 train images) into a temporary directory; the
READ-7B-shaped pipeline reads it (ReasonSeg reader, false-premise mixing, our templates), decodes each jpg,
computes CLIP pixels (336, bicubic) and SAM pixels (1024 frame by default, PIL bilinear), rasterises the
labelme GT, tokenises with the test SentencePiece model, and pads everything to the static batch of
`read_jax.data.pipeline` (batch 2 x 3 conversation rows, 1024 x 1024 mask canvas), through grain with
`--workers` worker processes (default 2). Worker start-up and the first `--warmup` batches are excluded.

Run: `.venv/bin/python benchmarks/data.py [--workers 2] [--batches 40] [--sam-size 1024]` (with the package
installed, `pip install -e .`, or `PYTHONPATH=.` from the repository root).
Last line: `data pipeline: N.N examples/s (W workers)`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import grain

from read_jax.config import SamConfig
from read_jax.data import make_shapes
from read_jax.data import mixture as M
from read_jax.data import pipeline as P
from read_jax.data import readers as R

TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "assets", "tokenizer")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=40, help="timed batches")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--sam-size", type=int, default=1024)
    p.add_argument("--num-train", type=int, default=200)
    p.add_argument("--data", default=None, help="an existing shapes directory (default: generate one)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = tmp
            make_shapes.write_split(data, "train", args.num_train, seed=0)
        reader = R.ReasonSegReader(data, "train")
        mix = M.Mixture({"reason_seg": reader}, {"reason_seg": 1}, seed=0)
        cfg = P.DataConfig(
            batch_size=args.batch_size,
            max_convs=3,
            max_mask_side=1024,
            num_workers=args.workers,
            worker_buffer_size=4,
        )
        sam = SamConfig(image_size=args.sam_size)
        ds = P.train_dataset(mix, cfg, sam, TOKENIZER, shard_options=grain.sharding.ShardOptions(0, 1))
        it = iter(ds)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            next(it)
        t1 = time.perf_counter()
        n = 0
        for _ in range(args.batches):
            b = next(it)
            n += int(b["image_valid"].sum())
        t2 = time.perf_counter()
        it.close()
    rate = n / (t2 - t1)
    print(
        f"start-up + {args.warmup} warm-up batches: {t1 - t0:.1f} s; {n} examples in {t2 - t1:.1f} s; "
        f"SAM frame {args.sam_size}, batch {args.batch_size}, {os.cpu_count()} CPUs"
    )
    print(f"data pipeline: {rate:.1f} examples/s ({args.workers} workers)")


if __name__ == "__main__":
    main()
