"""Inference: question + image -> answer text, masks for its [SEG]s, and object presence (See/Say/Segment).

PyTorch reference: READ `model/READ.py:900-1012` (`evaluate`), `demo.py`, `test_read.py`
(read_reference.md §4). The reference generates *without* a KV cache so that the last step's hidden states
span the whole sequence. Here generation uses the KV cache inside one jitted loop (`LlavaModel.generate`),
then ONE full forward over prompt + generated tokens gives the final-norm hidden states, from which the
[SEG] embeddings and SasP points are read exactly as in training (§4: "equivalent to the no-cache path").

Fixed on purpose (read_reference.md §13.4): every generated [SEG] (up to `max_segs`) gets its own mask (the
reference crashes on two); `<im_start>` is located per row, not by the hard-coded id of the first row;
presence is "a [SEG] was generated and the first [SEG]'s mask is non-empty", as READ's See metric.

Shapes: L prompt length, M new tokens, T = bucketed total length, S [SEG] slots, H W original image.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from read_jax.config import ReadConfig, SaspConfig
from read_jax.data.conversation import build_prompt
from read_jax.data.preprocess import clip_pixels, sam_pixels
from read_jax.data.tokenizer import ReadTokenizer, tokenizer_image_token
from read_jax.read_model import MaskOutput, ReadModel

Array = jax.Array
LENGTH_BUCKET = 64  # full-forward lengths are padded to a multiple of this (few compiles)
CANVAS_BUCKET = 64  # mask canvases likewise


@dataclasses.dataclass
class Prediction:
    """What `predict` returns for one question.

    text: the decoded answer (special tokens skipped; `[SEG]` is not special, so it stays).
    tokens: int[M'] generated ids up to and including EOS.
    masks: bool[n, H, W] one mask per generated [SEG] (n <= max_segs); empty array when none.
    mask_logits: float32[n, H, W].
    object_present: a [SEG] was generated and the first mask is non-empty (READ's `object_presence`).
    points / point_labels: float[n, Np, 2] (x, y) and int[n, Np] SasP prompts of each mask.
    similarity: float[n, P] raw [SEG]/image-token similarity of each mask.
    """

    text: str
    tokens: np.ndarray
    masks: np.ndarray
    mask_logits: np.ndarray
    object_present: bool
    points: np.ndarray
    point_labels: np.ndarray
    similarity: np.ndarray


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


@functools.partial(jax.jit, static_argnames=("graphdef", "canvas_hw", "sasp"))
def _forward(
    graphdef, state, batch: dict, canvas_hw: tuple[int, int], sasp: SaspConfig | None = None
) -> tuple[Array, MaskOutput]:
    """The full forward's [SEG] validity and masks (the model's state is an input, never an output)."""
    out = nnx.merge(graphdef, state)(batch, canvas_hw=canvas_hw, logits="none", sasp_cfg=sasp)
    return out.seg.valid, out.masks


def prepare_image(image: np.ndarray, cfg: ReadConfig) -> dict:
    """Host preprocessing of one uint8[H, W, 3] RGB image for both towers (batch of 1)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8[H, W, 3] image, got {image.dtype}{list(image.shape)}")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"empty image of shape {image.shape}")
    sam_img, (h, w) = sam_pixels(image, cfg.sam)  # uint8, like the data pipeline: normalised on the device
    return {
        "images_clip": clip_pixels(image, cfg.clip.image_size)[None],
        "images_sam": sam_img[None],
        "sam_input_hw": np.array([[h, w]], np.int32),
        "orig_hw": np.array([image.shape[:2]], np.int32),
    }


def predict(
    model: ReadModel,
    tokenizer: ReadTokenizer,
    image: np.ndarray,
    question: str,
    *,
    max_new_tokens: int = 128,
    template: str = "llava_v1",
    force_answer: str | None = None,
    sasp: bool | SaspConfig | None = None,
) -> Prediction:
    """Answer `question` about `image` and segment whatever the answer's [SEG]s refer to.

    Args:
      model: a ReadModel (any dtype); tokenizer: the READ tokenizer.
      image: uint8[H, W, 3] RGB.
      question: the user's text; "<image>\\n" is prepended when missing (as READ's demo does).
      max_new_tokens: generation budget.
      template: "llava_v1" (training) or "vicuna_v1" (READ's demo and FP-RefCOCO eval; §2.3).
      force_answer: skip generation and use this answer (teacher forcing, e.g. "Sure, it is [SEG].").
      sasp: SasP on (True) or off (False: SAM gets the [SEG] token alone, as LISA), or a whole SaspConfig;
        None: the model's `cfg.sasp`.
    Returns:
      Prediction (with SasP off, `points` are zeros and every `point_labels` entry is -1: no point).
    """
    cfg = model.config
    ids = (tokenizer.seg_token_id, tokenizer.im_start_token_id, tokenizer.im_end_token_id)
    if ids != (cfg.seg_token_id, cfg.im_start_token_id, cfg.im_end_token_id):
        raise ValueError(
            f"the tokenizer's [SEG]/<im_start>/<im_end> ids {ids} are not the model's "
            f"{(cfg.seg_token_id, cfg.im_start_token_id, cfg.im_end_token_id)}"
        )
    if isinstance(sasp, bool):
        sasp = dataclasses.replace(cfg.sasp, enabled=sasp)
    img = prepare_image(image, cfg)
    prompt = build_prompt(question, None, template=template)
    prompt_ids = tokenizer_image_token(prompt, tokenizer)
    if force_answer is None:
        ids = jnp.asarray([prompt_ids], jnp.int32)
        tokens, lengths, _ = model.llava.generate(
            ids,
            jnp.asarray(img["images_clip"]),
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        gen = np.asarray(tokens[0, : int(lengths[0])]).tolist()
    else:
        gen = tokenizer.encode(force_answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    text = tokenizer.decode(gen, skip_special_tokens=True)

    full = prompt_ids + gen
    n_seg = sum(1 for t in full[1:] if t == cfg.seg_token_id)
    H, W = image.shape[:2]
    empty = Prediction(
        text=text,
        tokens=np.asarray(gen, np.int32),
        masks=np.zeros((0, H, W), bool),
        mask_logits=np.zeros((0, H, W), np.float32),
        object_present=False,
        points=np.zeros((0, cfg.sasp.num_points, 2), np.float32),
        point_labels=np.zeros((0, cfg.sasp.num_points), np.int32),
        similarity=np.zeros((0, cfg.clip.num_patches), np.float32),
    )
    if n_seg == 0:
        return empty

    # One full forward over prompt + generated tokens (right padded to a bucket): the hidden states the
    # reference reads from its no-cache generation.
    t = _round_up(len(full), LENGTH_BUCKET)
    input_ids = np.zeros((1, t), np.int32)
    input_ids[0, : len(full)] = full
    mask = np.zeros((1, t), bool)
    mask[0, : len(full)] = True
    batch = {**img, "input_ids": input_ids, "attention_mask": mask, "conv_image": np.zeros(1, np.int32)}
    canvas = (_round_up(H, CANVAS_BUCKET), _round_up(W, CANVAS_BUCKET))
    graphdef, state = nnx.split(model)
    sasp = None if sasp == cfg.sasp else sasp  # one compile for the model's own setting
    valid, out = _forward(graphdef, state, {k: jnp.asarray(v) for k, v in batch.items()}, canvas, sasp)
    k = int(np.asarray(valid[0]).sum())
    logits = np.asarray(out.mask_logits[0, :k, :H, :W])
    masks = logits > 0
    return Prediction(
        text=text,
        tokens=np.asarray(gen, np.int32),
        masks=masks,
        mask_logits=logits,
        object_present=bool(masks[0].any()),
        points=np.asarray(out.points[0, :k]),
        point_labels=np.asarray(out.point_labels[0, :k]),
        similarity=np.asarray(out.similarity[0, :k], np.float32),
    )


def overlay(
    image: np.ndarray,
    masks: np.ndarray,
    points: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    alpha: float = 0.5,
):
    """A PIL image: `image` with the masks tinted and the SasP points drawn (green +, red -, grey neutral)."""
    from PIL import Image, ImageDraw

    colors = np.array([[255, 64, 64], [64, 160, 255], [255, 200, 0], [160, 64, 255]], np.float32)
    out = np.asarray(image, np.float32).copy()
    for i, m in enumerate(np.asarray(masks, bool)):
        out[m] = (1 - alpha) * out[m] + alpha * colors[i % len(colors)]
    pil = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    if points is not None:
        draw = ImageDraw.Draw(pil)
        r = max(2, min(image.shape[:2]) // 100)
        fills = {1: (0, 220, 0), 0: (230, 0, 0), -1: (150, 150, 150)}
        for pts, labs in zip(np.asarray(points), np.asarray(point_labels)):
            for (x, y), lab in zip(pts, labs):
                if lab == -1:
                    continue  # not-a-point: carries no position for SAM
                draw.ellipse([x - r, y - r, x + r, y + r], fill=fills[int(lab)], outline=(0, 0, 0))
    return pil


def load_for_inference(
    checkpoint: str, *, dtype: str | None = None, mesh=None
) -> tuple[ReadModel, ReadTokenizer]:
    """A ReadModel + tokenizer from a converted checkpoint directory (`convert_weights.py` output), or from a
    `train.py --workdir` (its best-else-latest checkpoint, the tokenizer its saved run config names)."""
    from read_jax import build

    model = build.load_model(checkpoint, dtype=dtype, mesh=mesh)
    tok = build.tokenizer_dir(checkpoint)
    if tok is None and (Path(checkpoint) / "checkpoints").is_dir():
        from read_jax.train.checkpoints import saved_run_config

        tok = str(saved_run_config(checkpoint).data.tokenizer)
    return model, ReadTokenizer(tok or str(checkpoint))


def batch_questions(questions: Sequence[str]) -> list[str]:
    """Strip and drop empty questions (the chat command reads several from the command line)."""
    out = [q.strip() for q in questions if q and q.strip()]
    if not out:
        raise ValueError("no question given")
    return out


def save_for_inference(model: ReadModel, directory: str, tokenizer_dir: str) -> None:
    """Write `model` as a converted-checkpoint directory (config.json, tokenizer/, params/) that
    `load_for_inference`, `python -m read_jax.cli.chat` and `evaluate.py` read. Atomic (written beside,
    renamed)."""
    import json
    import shutil

    from read_jax import checkpoint as ck
    from read_jax.config import config_to_dict
    from read_jax.tree_util import abstract_leaves

    with ck.atomic_directory(directory) as tmp:
        writer = ck.PartWriter(tmp / ck.PARAMS_DIR)
        for path, leaf in abstract_leaves(model).items():
            if "rngs" in path.split("/"):
                continue  # RNG state is not a parameter
            writer.add(path, np.asarray(jax.device_get(leaf)))
        writer.close()
        (tmp / ck.CONFIG).write_text(json.dumps(config_to_dict(model.config), indent=1))
        shutil.copytree(tokenizer_dir, tmp / ck.TOKENIZER_DIR)
