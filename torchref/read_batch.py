"""The tiny READ and batch of the end-to-end comparison with the torch READ (`torchref.read`); no torch.

Shared by tests/test_read_model.py and `benchmarks/parity.py`: the tiny fp32 READ without LoRA with two
[SEG] slots a row, and three rows over two images of odd sizes (one [SEG], two [SEG]s, none).
"""

from __future__ import annotations

import numpy as np

from read_jax.config import ReadConfig, SaspConfig
from read_jax.sam.transforms import get_preprocess_shape

CANVAS = (320, 320)  # static mask canvas of `tiny_batch`
ORIG = [(240, 320), (300, 117)]  # its two images' original sizes: landscape and an odd-width portrait


def tiny_config(**sasp_kw) -> ReadConfig:
    """The tiny fp32 READ without LoRA, 2 [SEG] slots a row, SasP (READ-7B setting) in fp32."""
    sasp = SaspConfig.read_7b(similarity_dtype="float32", **sasp_kw)
    return ReadConfig.tiny(lora=None, sasp=sasp, max_segs=2)


def tiny_rows(cfg: ReadConfig) -> tuple[np.ndarray, np.ndarray]:
    """The 3 rows' int32 input_ids and bool attention_mask (2 padding positions past the longest): an image
    prompt, then an answer with one [SEG], one with two [SEG]s and one with none."""
    seg, s, e = cfg.seg_token_id, cfg.im_start_token_id, cfg.im_end_token_id
    head = [1, 319, s, -200, e, 13]
    rows = [
        [*head, 500, 501, 502, 9, 10, 11, seg, 29889, 2],
        [*head, 600, 601, 9, seg, 603, 604, seg, 2],
        [*head, 700, 701, 702, 703, 2],
    ]
    length = max(map(len, rows)) + 2
    ids = np.zeros((3, length), np.int32)
    mask = np.zeros((3, length), bool)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = row
        mask[r, : len(row)] = True
    return ids, mask


def tiny_batch(cfg: ReadConfig, seed: int = 0) -> dict:
    """3 rows: image 0 with one [SEG]; image 1 with two [SEG]s; image 1 with none (a VQA-like row).

    numpy arrays in `ReadModel`'s batch layout, plus GT `masks` uint8[3, 2, *CANVAS] / `mask_valid`.
    """
    rng = np.random.default_rng(seed)
    ids, mask = tiny_rows(cfg)
    labels = np.where(mask & (np.arange(ids.shape[1]) >= 9), ids, -100).astype(np.int32)  # the answers
    sam_hw = np.array([get_preprocess_shape(h, w, cfg.sam.image_size) for h, w in ORIG], np.int32)
    masks = np.zeros((3, 2, *CANVAS), np.uint8)
    mvalid = np.array([[True, False], [True, True], [False, False]])
    for r, img, k in [(0, 0, 0), (1, 1, 0), (1, 1, 1)]:
        h, w = ORIG[img]
        m = (rng.random((h, w)) > 0.7).astype(np.uint8)
        m[: h // 3, : w // 2] = 1
        masks[r, k, :h, :w] = m
    return {
        "images_clip": rng.normal(size=(2, cfg.clip.image_size, cfg.clip.image_size, 3)).astype(np.float32),
        "images_sam": rng.normal(size=(2, cfg.sam.image_size, cfg.sam.image_size, 3)).astype(np.float32),
        "sam_input_hw": sam_hw,
        "orig_hw": np.array(ORIG, np.int32),
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "conv_image": np.array([0, 1, 1], np.int32),
        "masks": masks,
        "mask_valid": mvalid,
    }
