"""The SAM stage's data: shapes scenes in SAM's input frame, their instance masks, and prompts sampled the way
SAM was trained.

Reference: Kirillov et al. 2023, "Segment Anything", §3 and appendix A, "Training algorithm": the first prompt
of a mask is, with equal probability, a point drawn uniformly inside the ground-truth mask or its bounding box
with noise of 10% of the box side per coordinate (at most 20 px at 1024, here scaled to the frame); further
points are corrective (foreground inside the mask, background outside it). Kept simple and static here: each
image gets `point_prompts` point prompts of `num_points` slots (1..`max_pos` positives, 0..`max_neg`
negatives, the rest "not a point" (-1) at (0, 0), exactly how SasP's unused slots reach SAM) and `box_prompts`
jittered-box prompts, each for an instance of the scene (every instance gets one before any gets two). No mask
prompt: READ never gives SAM one.

Attribute prompts (`class_prompts` per image; a departure from SAM's recipe, made for this world): one sparse
token naming a colour, a kind or both, the sum of fixed codes from `attribute_codes`, whose target is the
union of every instance with those attributes: the prompt SESAME gives SAM (the [SEG] embedding alone, one
token) with its meaning spelled out. Beside them, every embedding cell that one shape covers more than half of
gets that shape's colour and kind (`cell_attributes`), which `sam_step` scores against the same codes: the
embedding is asked to carry, at each object, the codes a prompt naming it carries. Real SAM needs neither: its
MAE-pretrained ViT-H keeps what objects are, and SAM's own text-to-mask study trained on CLIP embeddings as
prompts (Kirillov et al. 2023, §7.5). A SAM trained here on points and boxes alone keeps only where objects
are (README: a linear probe of its embedding tells colour with 0.37 accuracy where the untrained SAM's random
features give 0.91), and attribute prompts alone do not bring it back (mIoU 0.015 after 2000 steps), so a
[SEG] token that knows what the object is would find nothing to match.

Frames (S = `SamConfig.image_size`, l = its low-res mask side, 4 S / patch): the image is resized longest side
to S and zero-padded bottom/right (`preprocess.sam_pixels`, the READ pipeline's SAM input: uint8, normalised
on the device); each instance polygon is rasterised (`preprocess.polygon_mask`) at `supersample` x S and
block-averaged to the S frame (where prompts are sampled) and to the l x l frame (the loss's targets), a pixel
being foreground when at least half of it is covered. Prompt coordinates are pixels of the S frame, as
`PromptEncoder` takes them (it adds the 0.5 pixel-centre shift).

Every example is a pure function of (seed, stream, index): the scene comes from
`np.random.default_rng([seed, stream, index])` through `make_shapes.random_scene`, the prompts from
`default_rng([seed, stream, index, 1])`. Streams: `TRAIN_STREAM` (7) for training, `EVAL_STREAM` (8) for the
held-out scenes; the reasoning-segmentation set uses [seed, 0 | 1 | 2, i] (its train/val/test), never these.
Training batch `b` holds examples [b B, (b + 1) B): a resumed run reads the same batches without any iterator
state.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from read_jax.config import SamConfig
from read_jax.data.make_shapes import random_scene
from read_jax.data.preprocess import polygon_mask, sam_pixels
from read_jax.data.shapes.scene import COLORS, SHAPES
from read_jax.sam.transforms import get_preprocess_shape

TRAIN_STREAM = 7
EVAL_STREAM = 8
# SAM's box noise cap (20 px in its 1024 frame), scaled to the frame in use.
BOX_NOISE_CAP_1024 = 20.0
# The attribute codebook's seed: fixed, so the codes are part of the stage's definition, not of a run.
ATTRIBUTE_SEED = 2026
# Which attributes an attribute prompt names, and how often.
ATTRIBUTE_MODES = (("color", "kind"), ("color",), ("kind",))
ATTRIBUTE_MODE_P = (0.5, 0.25, 0.25)


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """How prompts are sampled per image (static: every count here is a compiled shape)."""

    point_prompts: int = 6  # point prompts per image
    box_prompts: int = 2  # box prompts per image
    num_points: int = 10  # point slots per prompt: SasP's `num_points` on the shapes preset
    max_pos: int = 3  # positives per point prompt: uniform in [1, max_pos]
    max_neg: int = 6  # negatives: uniform in [0, max_neg] (with prob. 1 - single_point)
    single_point: float = 0.3  # probability of a single positive point (SAM's first prompt)
    near_negative: float = 0.5  # probability that a negative is drawn near the object (2x box), not anywhere
    box_noise: float = 0.1  # std of each box coordinate's noise, as a fraction of the box side
    class_prompts: int = 0  # attribute prompts per image (one token: colour, kind or both; see above)
    supersample: int = 2

    def __post_init__(self):
        if min(self.point_prompts, self.box_prompts, self.class_prompts) < 0 or self.prompts < 1:
            raise ValueError(
                "need point_prompts, box_prompts, class_prompts >= 0 and at least one point or box prompt "
                "per image"
            )
        if not 1 <= self.max_pos <= self.num_points or self.max_pos + self.max_neg > self.num_points:
            raise ValueError(
                f"max_pos {self.max_pos} + max_neg {self.max_neg} must fit num_points {self.num_points}"
            )
        if self.supersample < 1:
            raise ValueError("supersample must be >= 1")

    @property
    def prompts(self) -> int:
        """Point and box prompts per image (the geometric prompts; attribute prompts come after them)."""
        return self.point_prompts + self.box_prompts

    @property
    def targets(self) -> int:
        """Masks per image: the point prompts', the boxes', then the attribute prompts'."""
        return self.prompts + self.class_prompts


# ---- masks ------------------------------------------------------------------------------------------------
def _half_covered(x: np.ndarray, k: int) -> np.ndarray:
    """bool[..., H, W] -> bool[..., H / k, W / k]: k x k blocks at least half covered."""
    *lead, h, w = x.shape
    counts = x.reshape(*lead, h // k, k, w // k, k).sum(axis=(-3, -1), dtype=np.int32)
    return 2 * counts >= k * k


def instance_masks(
    polys: list[np.ndarray], orig_hw: tuple[int, int], sam_cfg: SamConfig, supersample: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Instance masks in the S frame and the low-res frame: (bool[I, S, S], bool[I, l, l]).

    Args:
      polys: float[N_i, 2] (x, y) polygon vertices in original pixels, one per instance.
      orig_hw: (H, W) of the original image.
    """
    s, l = sam_cfg.image_size, sam_cfg.low_res_mask_size
    if s % l:
        raise ValueError(f"SAM frame {s} is not a multiple of its low-res mask side {l}")
    (h0, w0), k = orig_hw, int(supersample)
    h, w = get_preprocess_shape(h0, w0, s)
    scale = np.asarray([w / w0, h / h0]) * k  # the resize maps the image extent onto the resized extent
    hi = np.stack([polygon_mask(np.asarray(p) * scale, s * k, s * k) for p in polys])
    # The low-res mask from the supersampled raster (not from the S-frame mask): one rounding, not two.
    return _half_covered(hi, k), _half_covered(hi, k * (s // l))


def tight_box(mask: np.ndarray) -> np.ndarray:
    """float32[4] (x0, y0, x1, y1): the pixel extremes of a bool[H, W] mask (all zeros if empty)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return np.zeros(4, np.float32)
    return np.asarray([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)


def jittered_box(rng: np.random.Generator, mask: np.ndarray, noise: float, cap: float, extent) -> np.ndarray:
    """SAM's training box: the tight box, each coordinate moved by N(0, (noise * side)^2) clipped to +-cap,
    then clipped to the image extent (h, w)."""
    box = tight_box(mask)
    side = np.asarray([box[2] - box[0], box[3] - box[1]] * 2, np.float32)
    box = box + np.clip(rng.normal(0.0, 1.0, 4) * noise * np.maximum(side, 1.0), -cap, cap)
    h, w = extent
    box = np.clip(box, 0.0, np.asarray([w - 1, h - 1, w - 1, h - 1], np.float32))
    return np.concatenate([np.minimum(box[:2], box[2:]), np.maximum(box[:2], box[2:])]).astype(np.float32)


# ---- points -----------------------------------------------------------------------------------------------
def _pick(rng: np.random.Generator, mask: np.ndarray, n: int) -> np.ndarray:
    """n (x, y) points uniformly inside the pixels of `mask` (without replacement when it has enough
    pixels), each uniform within its pixel: float32[n, 2]."""
    ys, xs = np.nonzero(mask)
    if n == 0 or len(xs) == 0:
        return np.zeros((0, 2), np.float32)
    idx = rng.choice(len(xs), size=n, replace=len(xs) < n)
    jitter = rng.uniform(-0.5, 0.5, (n, 2))
    return (np.stack([xs[idx], ys[idx]], axis=1) + jitter).astype(np.float32)


def extent_mask(extent, side: int) -> np.ndarray:
    """bool[side, side]: the resized image's pixels (h, w) inside the padded frame."""
    out = np.zeros((side, side), bool)
    out[: extent[0], : extent[1]] = True
    return out


def near_region(mask: np.ndarray) -> np.ndarray:
    """bool[H, W]: the box of `mask` grown by its own size on every side (where near negatives are drawn)."""
    x0, y0, x1, y1 = tight_box(mask).astype(int)
    dw, dh = x1 - x0 + 1, y1 - y0 + 1
    out = np.zeros_like(mask)
    out[max(y0 - dh, 0) : y1 + dh + 1, max(x0 - dw, 0) : x1 + dw + 1] = True
    return out


def point_prompt(
    rng: np.random.Generator,
    mask: np.ndarray,
    inside_image: np.ndarray,
    n_pos: int,
    n_neg: int,
    slots: int,
    near: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """One point prompt: (float32[slots, 2] points, int32[slots] labels).

    `n_pos` points uniformly inside `mask` (label 1), then `n_neg` outside it but inside the image (label 0;
    each with probability `near` from `near_region`, when that has any), then "not a point" (-1) at (0, 0).
    """
    outside = inside_image & ~mask
    close = outside & near_region(mask)
    n_near = int((rng.random(n_neg) < near).sum()) if close.any() else 0
    pts = [_pick(rng, mask, n_pos), _pick(rng, close, n_near), _pick(rng, outside, n_neg - n_near)]
    pts = np.concatenate(pts)
    labels = np.concatenate([np.ones(len(pts) - n_neg, np.int32), np.zeros(n_neg, np.int32)])
    out = np.zeros((slots, 2), np.float32)
    lab = np.full((slots,), -1, np.int32)
    out[: len(pts)], lab[: len(pts)] = pts, labels
    return out, lab


def centroid_prompt(mask: np.ndarray, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """One positive point at the mean pixel of `mask` (which need not lie inside it), the other slots -1."""
    ys, xs = np.nonzero(mask)
    out = np.zeros((slots, 2), np.float32)
    lab = np.full((slots,), -1, np.int32)
    out[0], lab[0] = (xs.mean(), ys.mean()), 1
    return out, lab


# ---- attribute prompts ------------------------------------------------------------------------------------
def attribute_codes(dim: int) -> np.ndarray:
    """float32[len(COLORS) + len(SHAPES), dim]: a fixed N(0, 1) code per colour, then per kind (the scale of
    SAM's own sparse tokens: a Fourier feature in [-1, 1] plus a learned embedding initialised N(0, 1))."""
    rng = np.random.default_rng(ATTRIBUTE_SEED)
    return rng.standard_normal((len(COLORS) + len(SHAPES), dim)).astype(np.float32)


def cell_attributes(
    frame: np.ndarray, colors: list[str], kinds: list[str], grid: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each embedding cell's colour and kind index: the instance covering more than half of the cell's pixels
    of the S frame, -1 where none does: (int32[grid, grid], int32[grid, grid]).

    Args:
      frame: bool[I, S, S] instance masks in the S frame (`scene`); grid: the embedding side (S / patch).
    """
    n, s = frame.shape[0], frame.shape[-1]
    k = s // grid
    cover = frame.reshape(n, grid, k, grid, k).sum(axis=(2, 4), dtype=np.int32)  # [I, g, g]
    best = cover.argmax(axis=0)
    owned = 2 * cover.max(axis=0) > k * k
    color = np.asarray([list(COLORS).index(c) for c in colors], np.int32)[best]
    kind = np.asarray([list(SHAPES).index(c) for c in kinds], np.int32)[best]
    return np.where(owned, color, -1).astype(np.int32), np.where(owned, kind, -1).astype(np.int32)


def attribute_prompt(
    colors: list[str], kinds: list[str], i: int, mode: tuple[str, ...], codes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The attribute prompt naming instance i's attributes in `mode` (a subset of ("color", "kind")):
    (float32[1, C] its token, bool[I] the instances it names, i among them)."""
    token = np.zeros((1, codes.shape[1]), np.float32)
    member = np.ones(len(kinds), bool)
    if "color" in mode:
        token[0] += codes[list(COLORS).index(colors[i])]
        member &= np.asarray(colors) == colors[i]
    if "kind" in mode:
        token[0] += codes[len(COLORS) + list(SHAPES).index(kinds[i])]
        member &= np.asarray(kinds) == kinds[i]
    return token, member


# ---- examples ---------------------------------------------------------------------------------------------
def scene(seed: int, stream: int, index: int, sam_cfg: SamConfig, supersample: int = 2) -> dict:
    """One scene in SAM's frames: pixels u8[S, S, 3], input_hw (h, w), orig_hw (H, W), the instances'
    polygons (original pixels), shape kinds and colours, and masks bool[I, S, S] (S frame) and bool[I, l, l]
    (low-res frame)."""
    image, instances = random_scene(np.random.default_rng([seed, stream, index]))
    image = np.asarray(image.convert("RGB"))
    pixels, input_hw = sam_pixels(image, sam_cfg)
    polys = [np.asarray(inst["poly"], np.float64) for inst in instances]
    frame, low = instance_masks(polys, image.shape[:2], sam_cfg, supersample)
    return {
        "pixels": pixels,
        "input_hw": np.asarray(input_hw, np.int32),
        "orig_hw": np.asarray(image.shape[:2], np.int32),
        "polys": polys,
        "kinds": [str(inst["kind"]) for inst in instances],
        "colors": [str(inst["color"]) for inst in instances],
        "frame": frame,
        "low": low,
    }


def _instance_order(rng: np.random.Generator, n_inst: int, k: int) -> np.ndarray:
    """k instance indices: permutations of all instances, concatenated (each gets one before any gets two)."""
    reps = -(-k // n_inst)
    return np.concatenate([rng.permutation(n_inst) for _ in range(reps)])[:k]


def train_example(index: int, *, seed: int, sam_cfg: SamConfig, pc: PromptConfig) -> dict:
    """Training example `index` of the stream `TRAIN_STREAM`.

    Returns:
      images u8[S, S, 3], input_hw i32[2], targets u8[Kp + Kb + Kc, l, l] (the point prompts', the boxes',
      the attribute prompts'), points f32[Kp, Np, 2], labels i32[Kp, Np], boxes f32[Kb, 4], class_tokens
      f32[Kc, 1, C], cell_colors / cell_kinds i32[h, w] (`cell_attributes`). The attribute prompts draw
      from the same generator after the boxes, so a config without them samples the same points and boxes
      as before they existed.
    """
    sc = scene(seed, TRAIN_STREAM, index, sam_cfg, pc.supersample)
    rng = np.random.default_rng([seed, TRAIN_STREAM, index, 1])
    frame, extent = sc["frame"], tuple(int(v) for v in sc["input_hw"])
    inside = extent_mask(extent, sam_cfg.image_size)
    order = _instance_order(rng, len(frame), pc.prompts)
    points = np.zeros((pc.point_prompts, pc.num_points, 2), np.float32)
    labels = np.zeros((pc.point_prompts, pc.num_points), np.int32)
    for j, i in enumerate(order[: pc.point_prompts]):
        if rng.random() < pc.single_point:
            n_pos, n_neg = 1, 0
        else:
            n_pos, n_neg = int(rng.integers(1, pc.max_pos + 1)), int(rng.integers(0, pc.max_neg + 1))
        points[j], labels[j] = point_prompt(
            rng, frame[i], inside, n_pos, n_neg, pc.num_points, pc.near_negative
        )
    cap = BOX_NOISE_CAP_1024 * sam_cfg.image_size / 1024
    boxes = np.zeros((pc.box_prompts, 4), np.float32)
    for j, i in enumerate(order[pc.point_prompts :]):
        boxes[j] = jittered_box(rng, frame[i], pc.box_noise, cap, extent)
    dim, low = sam_cfg.prompt_embed_dim, sc["low"]
    tokens = np.zeros((pc.class_prompts, 1, dim), np.float32)
    class_targets = np.zeros((pc.class_prompts, *low.shape[1:]), bool)
    if pc.class_prompts:
        codes = attribute_codes(dim)
        for j, i in enumerate(_instance_order(rng, len(frame), pc.class_prompts)):
            mode = ATTRIBUTE_MODES[int(rng.choice(len(ATTRIBUTE_MODES), p=ATTRIBUTE_MODE_P))]
            tokens[j], member = attribute_prompt(sc["colors"], sc["kinds"], int(i), mode, codes)
            class_targets[j] = low[member].any(axis=0)
    cell_colors, cell_kinds = cell_attributes(frame, sc["colors"], sc["kinds"], sam_cfg.image_embedding_size)
    return {
        "images": sc["pixels"],
        "input_hw": sc["input_hw"],
        "targets": np.concatenate([low[order], class_targets]).astype(np.uint8),
        "points": points,
        "labels": labels,
        "boxes": boxes,
        "class_tokens": tokens,
        "cell_colors": cell_colors,
        "cell_kinds": cell_kinds,
    }


def batch_spec(batch_size: int, sam_cfg: SamConfig, pc: PromptConfig) -> dict:
    """Shapes and dtypes of a training batch (`train_example` stacked), for compiling ahead of the data."""
    s, l, b = sam_cfg.image_size, sam_cfg.low_res_mask_size, batch_size
    g = sam_cfg.image_embedding_size
    return {
        "images": ((b, s, s, 3), np.uint8),
        "input_hw": ((b, 2), np.int32),
        "targets": ((b, pc.targets, l, l), np.uint8),
        "points": ((b, pc.point_prompts, pc.num_points, 2), np.float32),
        "labels": ((b, pc.point_prompts, pc.num_points), np.int32),
        "boxes": ((b, pc.box_prompts, 4), np.float32),
        "class_tokens": ((b, pc.class_prompts, 1, sam_cfg.prompt_embed_dim), np.float32),
        "cell_colors": ((b, g, g), np.int32),
        "cell_kinds": ((b, g, g), np.int32),
    }


class TrainExample:
    """Picklable `index -> train_example(index)` (grain's worker processes): the stage's training stream,
    whose batches `read_jax.pretrain.runner.stage_batches` builds (batch b: examples [b B, (b+1) B))."""

    def __init__(self, seed: int, sam_cfg: SamConfig, pc: PromptConfig):
        self.seed, self.sam_cfg, self.pc = seed, sam_cfg, pc

    def __call__(self, index: int) -> dict:
        return train_example(int(index), seed=self.seed, sam_cfg=self.sam_cfg, pc=self.pc)
