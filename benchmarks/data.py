"""Data pipeline throughput per worker: the pipeline before the accelerator work (host-normalised float32
pixels) vs now (uint8 pixels, SAM's resize and both normalisations on the device), side by side in one run;
and the host cores an evaluation / a training step needs.

Workload: `make_shapes` writes a shapes set (default 200 train images, 360 x 270) into a temporary directory;
the READ-7B-shaped training pipeline reads it (ReasonSeg reader, our templates), decodes each jpg, resizes
it for CLIP (336, bicubic) and SAM (1024 frame by default, PIL bilinear), rasterises the labelme GT,
tokenises with the test SentencePiece model and pads everything to the static batch of
`read_jax.data.pipeline` (batch 2 x 3 conversation rows, 1024 x 1024 mask canvas), through grain with
`--workers` worker processes.

  before: what the pipeline did until the pixels went uint8 (ed65e36^): SAM's resize, CLIP's and SAM's
          normalisations on the host, float32 images in the batch (12.6 MB per 1024-pixel SAM frame, which
          grain copies into shared memory), i.e. `DataConfig(sam_device_resize=False)` + the normalisations;
  after:  the pipeline as it is on a GPU/TPU: uint8 images, normalised on the device
          (`preprocess.clip_normalize`, `sam_normalize`); an image that fits in SAM's frame (COCO-sized
          images, this set) ships unresized and the device resizes it with PIL's arithmetic
          (`preprocess.apply_resize_tables`); the batch's large arrays are allocated in shared memory by the
          worker's collate (grain passes them by name instead of copying them);
  after, host resize: the same with SAM's resize on the host, what a CPU backend runs (data config
          `sam_device_resize="auto"`: XLA:CPU's gathers are slower than PIL; the line before the last).

The work moved to the device is timed too (jitted, on JAX's default device: on a CPU it costs more than the
host resize it replaces, which is why a CPU keeps the resize on the host).

Measured: examples/s per worker process in the steady state (after start-up and after the batches the
workers prefetched while starting), the two alternating over `--rounds` rounds so the machine's load drifts
over both, median over rounds. Then the host time per example of the image work by image size (decode, the
resizes, the host normalisations; one process), which gives the cores a throughput needs: cores =
examples/s x ms / 1000 (a 7B evaluation at 20 samples/s; a training step of N images every T s needs N / T
examples/s). Only the image work: add ~3-5 ms per example for the GT masks, tokenising and collating.

Run: `python benchmarks/data.py [--workers 2] [--rounds 3] [--batches 24] [--sam-size 1024]` (with the
package installed, `pip install -e .`, or `PYTHONPATH=.` from the repository root).
Last line: `per-worker speedup R.Rx`.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import io
import os
import statistics
import tempfile
import time
from multiprocessing import shared_memory

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

SHM, SHM_PREFIX = "/dev/shm", "psm_"  # where Python's SharedMemory segments live on Linux, and their names
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
    """The processor before: SAM's resize on the host (`sam_device_resize=False`), then the normalisations."""

    def __init__(self, cfg: P.DataConfig, sam_cfg: SamConfig, tokenizer_path: str):
        super().__init__(dataclasses.replace(cfg, sam_device_resize=False), sam_cfg, tokenizer_path)

    def __call__(self, ex):
        return host_normalise(super().__call__(ex), self.sam_cfg)


class FloatCollate(P.Collate):
    """The collate before: float32 pixels in plain numpy arrays (grain copies them into shared memory)."""

    pixel_dtype = np.float32

    def __init__(self, cfg, sam_cfg):
        super().__init__(cfg, sam_cfg)
        self.shared = False


# The pipelines compared: before; after with SAM's resize on the host (what a CPU backend runs, data config
# "auto"); after with it on the device (what GPUs and TPUs run: the figure of the last line).
MODES = ("before", "after, host resize", "after")


def dataset(mixture, cfg: P.DataConfig, sam: SamConfig, mode: str):
    """`pipeline.train_dataset`'s graph, with the processor and collate of `mode`."""
    if mode == "before":  # SAM's resize on the host: the processor and the collate agree on it
        cfg = dataclasses.replace(cfg, sam_device_resize=False)
        proc, collate = HostNormalisingProcessor(cfg, sam, TOKENIZER), FloatCollate(cfg, sam)
    else:
        cfg = dataclasses.replace(cfg, sam_device_resize=mode == "after")
        proc, collate = P.ExampleProcessor(cfg, sam, TOKENIZER), P.Collate(cfg, sam)
    ds = grain.MapDataset.range(2**40)
    ds = ds.map(P.TrainExampleFn(mixture, proc))
    ds = ds.batch(cfg.batch_size, drop_remainder=True, batch_fn=collate)
    return P._finish(ds, cfg)


def measure(mixture, cfg, sam, mode: str, warmup: int, batches: int) -> tuple[float, float]:
    """(examples/s in the steady state, seconds of start-up + warm-up) of one fresh iterator. The warm-up
    drains the batches the workers prefetched while starting (`warmup` > workers x their buffer), so the timed
    batches are produced while they are timed."""
    shm_before = _shm_segments()
    it = iter(dataset(mixture, cfg, sam, mode))
    t0 = time.perf_counter()
    for _ in range(warmup):
        next(it)
    t1 = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += int(next(it)["image_valid"].sum())
    t2 = time.perf_counter()
    it.close()
    _unlink_orphans(shm_before)
    return n / (t2 - t1), t1 - t0


def _shm_segments() -> set[str]:
    return set(os.listdir(SHM)) if os.path.isdir(SHM) else set()


def _unlink_orphans(before: set[str]) -> None:
    """Unlink the shared-memory batches the workers had prefetched when the iterator closed: nobody will
    receive them (an endless training iterator closed early), and left alone they stay in /dev/shm until
    exit, where the resource tracker reports them as leaked. Runs after close, with no batch held."""
    gc.collect()
    for name in _shm_segments() - before:
        if name.startswith(SHM_PREFIX):
            try:
                shm = shared_memory.SharedMemory(name=name)
            except FileNotFoundError:  # unlinked meanwhile by its consumer
                continue
            shm.close()
            shm.unlink()  # also unregisters it from the resource tracker


# ---- per-example host cost by image size ---------------------------------------------------------------
def host_cost_ms(hw: tuple[int, int], sam: SamConfig, repeats: int) -> tuple[float, float]:
    """(after, before) ms per example of the image work at (H, W), median of `repeats`: jpeg decode, CLIP's
    resize + crop, and SAM's resize only when the image is larger than SAM's frame (after); decode, both
    resizes and the host normalisations into float32 frames (before)."""
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
        pp.clip_pixels(x)
        if max(hw) > sam.image_size:
            resize_longest_side(x, sam.image_size)
        t1 = time.perf_counter()
        x = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        out = {"images_clip": pp.clip_pixels(x), "images_sam": resize_longest_side(x, sam.image_size)}
        host_normalise(out, sam)
        t2 = time.perf_counter()
        after.append(t1 - t0)
        before.append(t2 - t1)
    return 1e3 * statistics.median(after), 1e3 * statistics.median(before)


def device_cost_ms(sam: SamConfig, hw: tuple[int, int], repeats: int) -> tuple[float, str]:
    """(ms, device) per image of the work moved to the device: SAM's resize from an (H, W) original and the
    SAM and CLIP normalisations, jitted on JAX's default device (median of `repeats`, after the compile)."""
    import jax
    import jax.numpy as jnp

    from read_jax.sam.transforms import get_preprocess_shape

    s = sam.image_size
    out_hw = get_preprocess_shape(*hw, s)
    frame = jnp.zeros((1, s, s, 3), jnp.uint8).at[0, : hw[0], : hw[1]].set(128)
    tables = jnp.asarray(pp.sam_resize_tables(hw, out_hw, s)[None])
    clip = jnp.zeros((1, 336, 336, 3), jnp.uint8)
    sam_hw = jnp.asarray([out_hw], jnp.int32)

    @jax.jit
    def moved(frame, tables, sam_hw, clip):
        x = pp.apply_resize_tables(frame, tables)
        return pp.sam_normalize(x, sam_hw, sam.pixel_mean, sam.pixel_std), pp.clip_normalize(clip)

    jax.block_until_ready(moved(frame, tables, sam_hw, clip))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(moved(frame, tables, sam_hw, clip))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), jax.devices()[0].device_kind


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="alternating before/after rounds")
    p.add_argument("--batches", type=int, default=24, help="timed batches per round")
    p.add_argument("--warmup", type=int, default=None, help="default: 2 per worker's buffer slot + 2")
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

    ms, device = device_cost_ms(sam, (270, 360), repeats=5)
    print(f"moved to the device, per 270 x 360 image: SAM resize + normalisations {ms:.1f} ms ({device})")

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
            worker_buffer_size=2,
        )
        warmup = args.warmup if args.warmup is not None else 2 * args.workers * cfg.worker_buffer_size + 2
        rates = {m: [] for m in MODES}
        for r in range(args.rounds):
            for mode in MODES:
                rate, startup = measure(mix, cfg, sam, mode, warmup, args.batches)
                rates[mode].append(rate / args.workers)
                print(
                    f"round {r}: {mode:18s} {rate:6.1f} examples/s ({rate / args.workers:.1f} per worker), "
                    f"start-up + warm-up {startup:.1f} s"
                )
    per = {m: statistics.median(v) for m, v in rates.items()}
    print("per worker, median of rounds: " + ", ".join(f"{m} {v:.2f} examples/s" for m, v in per.items()))
    cpu = per[MODES[1]] / per["before"]
    print(f"per-worker speedup on a CPU backend (SAM's resize on the host): {cpu:.1f}x")
    print(f"per-worker speedup {per['after'] / per['before']:.1f}x")


if __name__ == "__main__":
    main()
