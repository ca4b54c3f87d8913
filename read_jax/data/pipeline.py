"""Static-shape batches for training and evaluation, through grain.

PyTorch reference: `rui-qian/READ@2549240` `dataloaders/trainval_dataset.py` (`collate_fn_train`,
`collate_fn_val`), `dataloaders/utils.py` (tokenise + pad + labels), `base_dataset.py` (image
preprocessing). The reference pads text to the longest row of each batch and keeps masks as a ragged list
at each image's original size; under jit every shape must be static, so this module pads to a few fixed
sizes and adds validity flags instead.

Batch (one host's share; B = `DataConfig.batch_size` images, C = `max_convs`, R = B * C conversation rows,
L = the smallest `length_buckets` entry that holds the batch's longest row, S = `SamConfig.image_size`,
Hm = Wm = the GT canvas side: `max_mask_side`, or with `max_mask_side=0` (evaluation at native resolution,
the protocol's default) the batch's largest image side rounded up the `CANVAS_SIDES` ladder):

  images_clip     u8[B, 336, 336, 3]   CLIP pixels (short side 336 bicubic, centre crop); the model normalises
                                       them on the device (CLIP mean/std, `preprocess.clip_normalize`)
  images_sam      u8[B, S, S, 3]       SAM's pixels, top-left in a zero frame: an image that fits in S x S as
                                       it is (resized on the device: `sam_resize`), a larger one resized on
                                       the host (longest side S). Resized and normalised inside
                                       `sam_input_hw` on the device (`preprocess.sam_normalize`)
  sam_resize      i32[B, 2, S, 4]      PIL's bilinear tables that resize images_sam to `sam_input_hw` on the
                                       device, bit for bit (`preprocess.sam_resize_tables`; identity for a
                                       host-resized image and for padding images). Only with
                                       `DataConfig.sam_device_resize` (else every image is host-resized)
  sam_input_hw    i32[B, 2]            (h, w): resized extent inside the S x S SAM frame
  orig_hw         i32[B, 2]            (H, W): original image size
  image_valid     bool[B]              False for padding images (end of an eval split, failed eval image)
  num_skipped     i32[B]               unusable items skipped (and warned about) before this image
  source          i32[B]               mixture source index (`Mixture.names`); eval: 0
  example_index   i64[B]               global example index (train) / reader index (eval)
  is_sentence     bool[B]              ReasonSeg: the query is a sentence (long), not a phrase (short)
  input_ids       i32[R, L]            prompt + answer ids, right-padded with 0 (pad = unk), <image> = -200
  labels          i32[R, L]            ids on the answer and "</s>", -100 elsewhere (instruction, padding)
  attention_mask  bool[R, L]           True on real tokens
  conv_image      i32[R]               image of each row: row r belongs to image r // C
  conv_valid      bool[R]              the row holds a conversation
  has_seg         bool[R]              the row's answer is meant to produce a mask ([SEG] in training)
  exists          bool[R]              the queried object is present (False: false premise, VQA)
  masks           u8[R, Hm, Wm]        the row's GT at original resolution, top-left in the canvas; 0/1
                                       (eval ReasonSeg keeps 255 = ignore, eval RefCOCO 2 where polygon
                                       parts overlap). With a cap (`max_mask_side` > 0) images with a side
                                       > Hm are downscaled (nearest) to fit, see `mask_hw`.
  mask_valid      bool[R]              the row has a GT mask (training: == has_seg; eval: every query)
  mask_hw         i32[R, 2]            extent of the GT inside the canvas (= orig_hw unless capped)
  sample_id       str[B]               host-only (numpy unicode): drop it before `jax.device_put`
                                       (`device_batch` does); an eval slot whose item was skipped holds
                                       "<reason>: <message>" (`skip_reason`)

Text longer than the largest bucket is truncated to it (the reference truncates at
`model_max_length - 255` = 1793, the default largest bucket), but never before the answer's last [SEG]
(nor, without [SEG], before the first answer token; a prompt-only row is never cut): a row that does not
fit that way is an unusable example (`QueryTooLongError`), redrawn and counted in training, reported as
skipped in evaluation. Rows of one image are contiguous, so the
model repeats image b's CLIP features for rows [b*C, (b+1)*C) (the reference's `offset` list).

Training draws example `i` of the global index stream from `np.random.default_rng([seed, i, attempt])`
(`mixture.py`), so the iterator state is just a position: `get_state()` / `set_state()` on the grain
iterator resume exactly, and per-host sharding is a stride over the index stream
(`grain.sharding.ShardOptions(jax.process_index(), jax.process_count())` by default).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

import numpy as np

from read_jax.config import CLIP_SIZE, IGNORE_INDEX, SEG_TOKEN_ID, SamConfig
from read_jax.data import readers as R
from read_jax.data.preprocess import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    clip_pixels,
    load_image,
    resize_mask_nearest,
    sam_resize_tables,
)
from read_jax.sam.transforms import get_preprocess_shape, resize_longest_side

log = logging.getLogger(__name__)

# Batch entries that stay on the host: strings, and bookkeeping used only to name a batch (guards, logs).
HOST_KEYS = ("sample_id", "example_index", "num_skipped", "source")
DEFAULT_LENGTH_BUCKETS = (128, 256, 512, 1024, 1793)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Static shapes and loader settings of a data pipeline."""

    batch_size: int = 2  # images per host per step
    max_convs: int = 3  # conversation rows per image (C)
    length_buckets: tuple[int, ...] = DEFAULT_LENGTH_BUCKETS
    clip_size: int = CLIP_SIZE
    # GT canvas side (Hm = Wm): training's static canvas (larger images' GTs are downscaled for the loss);
    # for evaluation a cap that the summary records. 0 = native resolution (evaluation only).
    max_mask_side: int = 1024
    template: str = "llava_v1"
    seed: int = 0
    max_retries: int = 20  # redraws for one example before giving up with an error
    max_pixels: int = DEFAULT_MAX_PIXELS
    num_workers: int = 0  # grain worker processes (0: in the calling process)
    worker_buffer_size: int = 2  # batches prefetched per worker
    read_threads: int = 1  # grain's in-process read threads
    prefetch: int = 2  # grain's in-process prefetch buffer (elements)
    # SAM's resize of an image that fits in its frame runs on the device (`sam_resize`); False: on the host
    # (`sam.transforms.resize_longest_side`), as it did before. Both give the same pixels; XLA:CPU's gathers
    # are slower than PIL, so a run config's "auto" (`loaders.data_config`) keeps it on the host on a CPU.
    sam_device_resize: bool = True

    def __post_init__(self):
        if self.batch_size < 1 or self.max_convs < 1:
            raise ValueError("batch_size and max_convs must be >= 1")
        if not self.length_buckets or list(self.length_buckets) != sorted(set(self.length_buckets)):
            raise ValueError(f"length_buckets must be strictly increasing, got {self.length_buckets}")
        if self.max_mask_side < 0:
            raise ValueError("max_mask_side must be >= 0 (0: native resolution, evaluation only)")

    @property
    def rows(self) -> int:
        return self.batch_size * self.max_convs


# Native-resolution eval canvases: the batch's largest image side rounded up this ladder (one decode compile
# per rung used; every rung a multiple of the evaluation's scoring band, `eval.stages.BAND`).
CANVAS_SIDES = (256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)


def canvas_side(n: int) -> int:
    """The GT canvas side of a native-resolution eval batch whose largest image side is n."""
    for s in CANVAS_SIDES:
        if n <= s:
            return s
    return -(-n // CANVAS_SIDES[-1]) * CANVAS_SIDES[-1]


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n (the largest bucket if none is: rows are then truncated)."""
    for b in buckets:
        if n <= b:
            return b
    return buckets[-1]


# Smallest text length an evaluation batch is padded to.
EVAL_MIN_BUCKET = 64


def eval_length_buckets(buckets: Sequence[int], smallest: int = EVAL_MIN_BUCKET) -> tuple[int, ...]:
    """The training buckets with powers of two from `smallest` up added below the smallest of them.

    Training buckets fit multi-round conversations (READ-7B: 512, 1024, 1793); an evaluation row is one
    prompt and its short answer (ReasonSeg: ~70-150 ids). Padding it to 512 made every 7B query a
    1,087-token forward on the CPU (4.3 min); with the ladder it is padded to 128 or 256. Still a fixed set
    of lengths: one compile per bucket.
    """
    low, b = [], smallest
    while b < buckets[0]:
        low.append(b)
        b *= 2
    return (*low, *buckets)


def device_batch(batch: dict) -> dict:
    """The batch without its host-only (string) entries, ready for `jax.device_put`."""
    return {k: v for k, v in batch.items() if k not in HOST_KEYS}


# ---- one example -> variable-size arrays ----------------------------------------------------------------


class QueryTooLongError(R.SampleError):
    """A conversation row that the largest length bucket cannot hold without losing its [SEG] (or its
    question)."""


def skip_reason(e: Exception) -> str:
    """The category an unusable example is counted under."""
    if isinstance(e, QueryTooLongError):
        return "query too long"
    if isinstance(e, ImageError):
        return "unreadable image"
    return "unusable annotation"


class ExampleProcessor:
    """`Example` -> preprocessed pixels + token rows + GT masks (variable sizes; `collate` pads them).

    Picklable for grain worker processes: the tokenizer is (re)loaded lazily in each process.
    """

    def __init__(self, cfg: DataConfig, sam_cfg: SamConfig, tokenizer_path: str):
        # A missing tokenizer fails here, once, not as every item skipped as unusable (a run's saved config
        # names the tokenizer of the checkout it was made in, which may be gone).
        if not (tokenizer_path and os.path.exists(tokenizer_path)):
            raise FileNotFoundError(
                f"data.tokenizer={tokenizer_path}: no such file or directory (a run's saved config names the "
                "tokenizer of the checkout that made it); pass --config.data.tokenizer=DIR"
            )
        self.cfg, self.sam_cfg, self.tokenizer_path = cfg, sam_cfg, tokenizer_path
        self._tok = None

    def __getstate__(self):
        return {**self.__dict__, "_tok": None}

    @property
    def tokenizer(self):
        if self._tok is None:
            from read_jax.data.tokenizer import ReadTokenizer

            self._tok = ReadTokenizer(self.tokenizer_path)
        return self._tok

    def encode(self, conv: R.Conversation) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of one conversation row; a row without an answer is a generation prompt."""
        from read_jax.data.conversation import build_conversation, encode_conversation
        from read_jax.data.tokenizer import tokenizer_image_token

        prompt = build_conversation(conv.rounds, template=self.cfg.template)
        if conv.answer is None:
            ids = tokenizer_image_token(prompt, self.tokenizer)
            return ids, [IGNORE_INDEX] * len(ids)
        return encode_conversation(prompt, self.tokenizer, template=self.cfg.template)

    def fit(self, ids: list[int], labels: list[int], where: str) -> tuple[list[int], list[int]]:
        """A row cut to the largest length bucket, keeping every supervised [SEG] (without one: the question
        and the first answer token; a prompt-only row whole). Raises QueryTooLongError when that is
        impossible."""
        limit = self.cfg.length_buckets[-1]
        if len(ids) <= limit:
            return ids, labels
        sup = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
        seg = [i for i in sup if ids[i] == SEG_TOKEN_ID]
        need = seg[-1] + 1 if seg else sup[0] + 1 if sup else len(ids)
        if need > limit:
            what = "the text up to its [SEG]" if seg else "the question" if sup else "the prompt"
            raise QueryTooLongError(
                f"{where}: {what} takes {need} tokens, the largest length bucket holds {limit} "
                f"(data.length_buckets)"
            )
        return ids[:limit], labels[:limit]

    def __call__(self, ex: R.Example) -> dict:
        """Raises ImageError / SampleError for an unusable example."""
        if len(ex.conversations) > self.cfg.max_convs:
            raise ValueError(
                f"{ex.sample_id}: {len(ex.conversations)} conversations > max_convs {self.cfg.max_convs}"
            )
        image = load_image(ex.image_path, self.cfg.max_pixels)
        hw = image.shape[:2]
        if ex.masks.shape[0] and tuple(ex.masks.shape[1:]) != tuple(hw):
            raise R.SampleError(f"{ex.sample_id}: GT size {ex.masks.shape[1:]} != image size {hw}")
        s = self.sam_cfg.image_size
        sam_hw = get_preprocess_shape(hw[0], hw[1], s)
        if self.cfg.sam_device_resize and max(hw) <= s:
            sam_img = image  # resized on the device, with PIL's arithmetic (`preprocess.apply_resize_tables`)
        else:
            sam_img = resize_longest_side(image, s)  # uint8; padded by the collate, normalised on the device
        resize = sam_resize_tables(sam_img.shape[:2], sam_hw, s) if self.cfg.sam_device_resize else None
        try:
            rows = [
                self.fit(*self.encode(c), f"{ex.sample_id} query {j}") for j, c in enumerate(ex.conversations)
            ]
        except ValueError as e:  # text the prompt builder / tokenizer cannot handle: a data problem
            raise R.SampleError(f"{ex.sample_id}: {e}") from e
        side = self.cfg.max_mask_side
        if side and max(hw) > side:  # a cap: downscale the GT (nearest, labels kept) to fit the canvas
            s = side / max(hw)
            mhw = (max(1, int(hw[0] * s + 0.5)), max(1, int(hw[1] * s + 0.5)))
        else:
            mhw = tuple(hw)
        masks = [
            None if c.mask_index < 0 else resize_mask_nearest(ex.masks[c.mask_index], mhw)
            for c in ex.conversations
        ]
        return {
            "images_clip": clip_pixels(image, self.cfg.clip_size),
            "images_sam": sam_img,
            "sam_resize": resize,
            "sam_input_hw": np.asarray(sam_hw, np.int32),
            "orig_hw": np.asarray(hw, np.int32),
            "rows": rows,
            "has_seg": [c.has_seg for c in ex.conversations],
            "exists": [c.exists for c in ex.conversations],
            "masks": masks,
            "mask_hw": np.asarray(mhw, np.int32),
            "sample_id": ex.sample_id,
            "is_sentence": bool(ex.meta.get("is_sentence", False)),
        }


def _invalid(index: int, skipped: int, sample_id: str = "") -> dict:
    return {"invalid": True, "example_index": index, "num_skipped": skipped, "sample_id": sample_id}


class TrainExampleFn:
    """grain map: global example index -> processed example, redrawing unusable items (counted)."""

    def __init__(self, mixture, processor: ExampleProcessor):
        self.mixture, self.processor = mixture, processor

    def __call__(self, index: int) -> dict:
        index = int(index)
        errors = []
        for attempt in range(self.processor.cfg.max_retries + 1):
            rng = self.mixture.rng(index, attempt)
            k = self.mixture.choose(rng)
            try:
                ex = self.mixture.sources[k].sample(rng)
                out = self.processor(ex)
            except (R.SampleError, ImageError) as e:
                errors.append(str(e))
                if len(errors) <= 2:
                    log.warning(
                        "skipping an unusable training item (example %d, attempt %d): %s", index, attempt, e
                    )
                continue
            out.update(example_index=index, num_skipped=attempt, source=k)
            return out
        raise RuntimeError(
            f"example {index}: {len(errors)} draws in a row were unusable; the data is "
            f"broken (last errors: {errors[-3:]})"
        )


class EvalExampleFn:
    """grain map: eval position -> processed example of (reader item, conversation chunk), or padding."""

    def __init__(self, reader: R.Reader, processor: ExampleProcessor, chunks: list[tuple[int, int]]):
        self.reader, self.processor, self.chunks = reader, processor, chunks

    def __call__(self, pos: int) -> dict:
        pos = int(pos)
        if pos >= len(self.chunks):
            return _invalid(-1, 0)
        idx, start = self.chunks[pos]
        try:
            ex = self.reader[idx]
            c = self.processor.cfg.max_convs
            if len(ex.conversations) > c:  # long eval lists (RefCOCO images) are split over several rows
                ex = dataclasses.replace(ex, conversations=ex.conversations[start : start + c])
            out = self.processor(ex)
        except (R.SampleError, ImageError) as e:
            log.warning("eval item %d is unusable and is skipped: %s", idx, e)
            return _invalid(idx, 1, f"{skip_reason(e)}: {e}")
        out.update(example_index=idx, num_skipped=0, source=0, meta=ex.meta)
        return out


# ---- padding to static shapes ----------------------------------------------------------------------------


class Collate:
    """grain batch_fn: a list of <= B processed examples -> the static batch documented above.

    With grain worker processes (`num_workers > 0`) the image and mask arrays are allocated in shared memory
    (`grain.multiprocessing.SharedMemoryArray`), which grain hands to the main process by name instead of
    copying every batch into a new segment.
    """

    pixel_dtype = np.uint8  # the images' dtype (normalised on the device)
    shared_min_bytes = 1 << 20

    def __init__(self, cfg: DataConfig, sam_cfg: SamConfig):
        self.cfg, self.sam_cfg = cfg, sam_cfg
        self.shared = cfg.num_workers > 0

    def _zeros(self, shape: tuple, dtype) -> np.ndarray:
        if self.shared and int(np.prod(shape)) * np.dtype(dtype).itemsize >= self.shared_min_bytes:
            from grain.multiprocessing import SharedMemoryArray

            return SharedMemoryArray(shape, dtype)  # a new segment: zero-filled by the OS
        return np.zeros(shape, dtype)

    def __call__(self, items: Sequence[dict]) -> dict:
        cfg = self.cfg
        b, c, s = cfg.batch_size, cfg.max_convs, self.sam_cfg.image_size
        r = b * c
        if len(items) > b:
            raise ValueError(f"collate got {len(items)} examples for a batch of {b}")
        side = cfg.max_mask_side or canvas_side(
            max((int(max(it["mask_hw"])) for it in items if not it.get("invalid")), default=1)
        )
        longest = max((len(ids) for it in items if not it.get("invalid") for ids, _ in it["rows"]), default=1)
        length = bucket_length(longest, cfg.length_buckets)
        out = {
            "images_clip": self._zeros((b, cfg.clip_size, cfg.clip_size, 3), self.pixel_dtype),
            "images_sam": self._zeros((b, s, s, 3), self.pixel_dtype),
            "sam_input_hw": np.zeros((b, 2), np.int32),
            "orig_hw": np.zeros((b, 2), np.int32),
            "image_valid": np.zeros((b,), bool),
            "num_skipped": np.zeros((b,), np.int32),
            "source": np.zeros((b,), np.int32),
            "example_index": np.full((b,), -1, np.int64),
            "is_sentence": np.zeros((b,), bool),
            "input_ids": np.zeros((r, length), np.int32),
            "labels": np.full((r, length), IGNORE_INDEX, np.int32),
            "attention_mask": np.zeros((r, length), bool),
            "conv_image": np.arange(r, dtype=np.int32) // c,
            "conv_valid": np.zeros((r,), bool),
            "has_seg": np.zeros((r,), bool),
            "exists": np.zeros((r,), bool),
            "masks": self._zeros((r, side, side), np.uint8),
            "mask_valid": np.zeros((r,), bool),
            "mask_hw": np.zeros((r, 2), np.int32),
            "sample_id": np.full((b,), "", dtype=object),
        }
        if cfg.sam_device_resize:  # identity tables for the padding images
            out["sam_resize"] = np.repeat(sam_resize_tables((s, s), (s, s), s)[None], b, axis=0)
        for i, it in enumerate(items):
            out["num_skipped"][i] = it.get("num_skipped", 0)
            out["example_index"][i] = it.get("example_index", -1)
            out["sample_id"][i] = it.get("sample_id", "")
            if it.get("invalid"):
                continue
            out["image_valid"][i] = True
            out["source"][i] = it.get("source", 0)
            out["is_sentence"][i] = it.get("is_sentence", False)
            for k in ("images_clip", "sam_input_hw", "orig_hw", "sam_resize"):
                if k in out:
                    out[k][i] = it[k]
            sam = it["images_sam"]  # top-left in the zero-padded frame
            out["images_sam"][i, : sam.shape[0], : sam.shape[1]] = sam
            for j, (ids, labels) in enumerate(it["rows"]):
                row = i * c + j
                n = min(len(ids), length)
                out["input_ids"][row, :n] = ids[:n]
                out["labels"][row, :n] = labels[:n]
                out["attention_mask"][row, :n] = True
                out["conv_valid"][row] = True
                out["has_seg"][row] = it["has_seg"][j]
                out["exists"][row] = it["exists"][j]
                m = it["masks"][j]
                if m is not None:
                    out["masks"][row, : m.shape[0], : m.shape[1]] = m
                    out["mask_valid"][row] = True
                    out["mask_hw"][row] = it["mask_hw"]
        out["sample_id"] = out["sample_id"].astype(str)
        return out


# ---- grain datasets ---------------------------------------------------------------------------------------


def _shard(shard_options) -> tuple[int, int]:
    if shard_options is None:
        import jax

        return jax.process_index(), jax.process_count()
    if not 0 <= shard_options.shard_index < shard_options.shard_count:
        raise ValueError(f"bad shard options {shard_options}")
    return shard_options.shard_index, shard_options.shard_count


def _finish(ds, cfg: DataConfig):
    import grain

    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch)
    )
    if cfg.num_workers > 0:
        # grain's worker processes read absl flags; a program that never parsed them (a notebook, a test,
        # a script without absl.app) would fail there, so fall back to the flag defaults.
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=cfg.num_workers, per_worker_buffer_size=cfg.worker_buffer_size
            )
        )
    return it


def train_dataset(
    mixture,
    cfg: DataConfig,
    sam_cfg: SamConfig,
    tokenizer_path: str,
    *,
    num_examples: int | None = None,
    shard_options=None,
):
    """A grain IterDataset of training batches drawn from `mixture` (a `mixture.Mixture`).

    Args:
      num_examples: length of the global example index stream (default: practically infinite).
      shard_options: `grain.sharding.ShardOptions`; default: this JAX process's share. Host k reads global
        examples k, k + n, k + 2n, ... so hosts never share an example.
    Returns:
      grain.IterDataset; `it = iter(ds)` has `get_state()` / `set_state()` for checkpoints.
    """
    import grain

    if mixture.seed != cfg.seed:
        raise ValueError(f"mixture seed {mixture.seed} != DataConfig.seed {cfg.seed}")
    if cfg.max_mask_side < 1:
        raise ValueError("training needs a static GT canvas: max_mask_side >= 1 (0 is for evaluation)")
    index, count = _shard(shard_options)
    ds = grain.MapDataset.range(num_examples if num_examples is not None else 2**40)[index::count]
    ds = ds.map(TrainExampleFn(mixture, ExampleProcessor(cfg, sam_cfg, tokenizer_path)))
    ds = ds.batch(cfg.batch_size, drop_remainder=True, batch_fn=Collate(cfg, sam_cfg))
    return _finish(ds, cfg)


def eval_chunks(reader: R.Reader, max_convs: int) -> list[tuple[int, int]]:
    """(reader index, first conversation) for every eval row group: images with more queries than
    `max_convs` are split over consecutive batch slots (per-query metrics are unaffected)."""
    out = []
    for i in range(len(reader)):
        n = max(reader.num_conversations(i), 1)
        out.extend((i, s) for s in range(0, n, max_convs))
    return out


def eval_dataset(
    reader: R.Reader, cfg: DataConfig, sam_cfg: SamConfig, tokenizer_path: str, *, shard_options=None
):
    """A grain IterDataset of eval batches over `reader` (mode="eval"), in order, each example once.

    The split is padded with invalid images (`image_valid` False) to a multiple of hosts x batch size, so
    every host runs the same number of steps. Text is padded to `eval_length_buckets(cfg.length_buckets)`.
    """
    import grain

    if reader.mode != "eval":
        raise ValueError(f"{reader.name}: eval_dataset needs a reader in mode='eval'")
    chunks = eval_chunks(reader, cfg.max_convs)
    index, count = _shard(shard_options)
    per_step = count * cfg.batch_size
    total = -(-len(chunks) // per_step) * per_step
    ds = grain.MapDataset.range(total)[index::count]
    ds = ds.map(EvalExampleFn(reader, ExampleProcessor(cfg, sam_cfg, tokenizer_path), chunks))
    padded = dataclasses.replace(cfg, length_buckets=eval_length_buckets(cfg.length_buckets))
    ds = ds.batch(cfg.batch_size, drop_remainder=False, batch_fn=Collate(padded, sam_cfg))
    return _finish(ds, cfg)
