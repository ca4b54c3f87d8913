"""Data pipeline throughput per worker: host-normalised float32 pixels (before) vs uint8 pixels normalised on
the device (after), side by side in one run; and the host cores a 7B eval / training step needs.

Workload: `make_shapes` writes a shapes set (default 200 train images) into a temporary directory; the
READ-7B-shaped training pipeline reads it (ReasonSeg reader, our templates), decodes each jpg, resizes it for
CLIP (336, bicubic) and SAM (1024 frame by default, PIL bilinear), rasterises the labelme GT, tokenises with
the test SentencePiece model and pads everything to the static batch of `read_jax.data.pipeline` (batch 2 x 3
conversation rows, 1024 x 1024 mask canvas), through grain with `--workers` worker processes.

  before: what the pipeline did until the pixels went uint8: CLIP and SAM normalisation on the host and
          float32 images in the batch (12.6 MB per 1024-pixel SAM image through grain's worker queues);
  after:  the pipeline as it is: uint8 images (3.1 MB), normalised on the device (`preprocess.clip_normalize`,
          `preprocess.sam_normalize`, inside the jitted model), the batch's image and mask arrays allocated
          in shared memory by the worker's collate (grain passes them by name instead of copying them).

The two run in alternating rounds (before, after, before, after, ...) so that the machine's load drifts
equally over both; each round excludes worker start-up and `--warmup` batches; the figure is examples/s per
worker, median over rounds. Then a per-example host cost by image size (decode + both resizes + the host
normalisation or not, one process) gives the cores a throughput needs: cores = examples/s x ms / 1000.

Run: `python benchmarks/data.py [--workers 2] [--rounds 3] [--batches 12] [--sam-size 1024]` (with the
package installed, `pip install -e .`, or `PYTHONPATH=.` from the repository root).
Last line: `per worker: before B examples/s, after A examples/s: R.Rx`.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time

import grain
import numpy as np
from PIL import Image

from read_jax.config import SamConfig
from read_jax.data import make_shapes
from read_jax.data import mixture as M
from read_jax.data import pipeline as P
from read_jax.data import preprocess as pp
from read_jax.data import readers as R
from read_jax.sam.transforms import resize_longest_side

TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "assets", "tokenizer")


# ---- the pipeline before: normalise on the host, ship float32 ---------------------------------------------
def host_normalise(out: dict, sam_cfg: SamConfig) -> dict:
    """The host work the pipeline no longer does: CLIP's float normalisation of the crop, and SAM's of the
    resized image into a zeroed float32 frame (`read_jax.sam.transforms.preprocess`'s arithmetic)."""
    x, s = out["images_sam"], sam_cfg.image_size
    sam = np.zeros((s, s, 3), np.float32)
    mean, std = np.asarray(sam_cfg.pixel_mean, np.float32), np.asarray(sam_cfg.pixel_std, np.float32)
    sam[: x.shape[0], : x.shape[1]] = (x.astype(np.float32) - mean) / std
    return {**out, "images_clip": pp.clip_normalize_host(out["images_clip"]), "images_sam": sam}


class HostNormalisingProcessor(P.ExampleProcessor):
    def __call__(self, ex):
        return host_normalise(super().__call__(ex), self.sam_cfg)


class FloatCollate(P.Collate):
    """The collate before: float32 pixels in plain numpy arrays (grain copies them into shared memory)."""

    pixel_dtype = np.float32

    def __init__(self, cfg, sam_cfg):
        super().__init__(cfg, sam_cfg)
        self.shared = False


def dataset(mixture, cfg: P.DataConfig, sam: SamConfig, before: bool):
    """`pipeline.train_dataset`'s graph, with the processor and collate of `before` or of the pipeline."""
    proc_cls, collate_cls = (
        (HostNormalisingProcessor, FloatCollate) if before else (P.ExampleProcessor, P.Collate)
    )
    ds = grain.MapDataset.range(2**40)
    ds = ds.map(P.TrainExampleFn(mixture, proc_cls(cfg, sam, TOKENIZER)))
    ds = ds.batch(cfg.batch_size, drop_remainder=True, batch_fn=collate_cls(cfg, sam))
    return P._finish(ds, cfg)


def measure(mixture, cfg, sam, before: bool, warmup: int, batches: int) -> tuple[float, float]:
    """(examples/s after warm-up, seconds of start-up + warm-up) of one fresh iterator."""
    it = iter(dataset(mixture, cfg, sam, before))
    t0 = time.perf_counter()
    for _ in range(warmup):
        next(it)
    t1 = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += int(next(it)["image_valid"].sum())
    t2 = time.perf_counter()
    it.close()
    return n / (t2 - t1), t1 - t0


# ---- per-example host cost by image size ---------------------------------------------------------------
def host_cost_ms(hw: tuple[int, int], sam: SamConfig, repeats: int) -> tuple[float, float]:
    """(after, before) ms per example of the image work at (H, W): jpeg decode, CLIP crop, SAM resize (after);
    plus the host normalisations into the float32 frame (before). Median of `repeats`."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (hw[0] // 16 + 1, hw[1] // 16 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((hw[1], hw[0]), Image.BICUBIC)  # smooth: a jpeg-like payload
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    after, before = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        out = {"images_clip": pp.clip_pixels(x), "images_sam": resize_longest_side(x, sam.image_size)}
        t1 = time.perf_counter()
        host_normalise(out, sam)
        t2 = time.perf_counter()
        after.append(t1 - t0)
        before.append(t2 - t0)
    return 1e3 * statistics.median(after), 1e3 * statistics.median(before)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="alternating before/after rounds")
    p.add_argument("--batches", type=int, default=10, help="timed batches per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--sam-size", type=int, default=1024)
    p.add_argument("--num-train", type=int, default=200)
    p.add_argument("--data", default=None, help="an existing shapes directory (default: generate one)")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be >= 1 (the figure is per worker process)")

    sam = SamConfig(image_size=args.sam_size)
    print(
        f"{os.cpu_count()} CPUs, {args.workers} workers, SAM frame {args.sam_size}, batch {args.batch_size}"
    )
    print("host work per example (one process): ms, and cores for 20 examples/s")
    print(f"{'image (H x W)':>15} {'after ms':>9} {'before ms':>10} {'cores @20/s after':>18} {'before':>7}")
    for hw in ((270, 360), (480, 640), (768, 1024), (1536, 2048)):
        a, b = host_cost_ms(hw, sam, repeats=5)
        print(f"{f'{hw[0]} x {hw[1]}':>15} {a:9.1f} {b:10.1f} {20 * a / 1e3:18.2f} {20 * b / 1e3:7.2f}")

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
        rates = {"before": [], "after": []}
        for r in range(args.rounds):
            for name in ("before", "after"):
                rate, startup = measure(mix, cfg, sam, name == "before", args.warmup, args.batches)
                rates[name].append(rate / args.workers)
                print(
                    f"round {r}: {name:6s} {rate:6.1f} examples/s ({rate / args.workers:.1f} per worker), "
                    f"start-up + warm-up {startup:.1f} s"
                )
    before, after = statistics.median(rates["before"]), statistics.median(rates["after"])
    print(f"per worker: before {before:.1f} examples/s, after {after:.1f} examples/s: {after / before:.1f}x")


if __name__ == "__main__":
    main()
