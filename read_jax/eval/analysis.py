"""The appendix analyses' host- and device-side pieces: Appendix A.1's threshold grid search over the
full-resolution similarity map, Appendix B's points-only prompting setting, and Appendix C's Table 8 layout.

Supplementary material: A.1 (threshold grid search), B (similarity maps and "points as prompt"), C (Table 8).
The full-resolution map itself is the reference's `origin_sm`, `read_jax.sasp.similarity_map_full`.

Shape letters: N rows, Hc Wc the GT canvas, K = 101 thresholds of the Appendix A.1 grid (0.00, 0.01, ...,
  1.00).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from read_jax.config import SaspConfig
from read_jax.metrics import query_iou

Array = jax.Array

# Appendix A.1: thresholds 0.00, 0.01, ..., 1.00 (float32, as compared on the device).
THRESHOLDS = np.round(np.arange(101) * 0.01, 2).astype(np.float32)
# Appendix C / Table 8: (t_pos, t_neg) rows x |P| columns.
TABLE8_THRESHOLDS = ((0.8, 0.2), (0.7, 0.3), (0.6, 0.4))
TABLE8_NUM_POINTS = (10, 30, 60)


def points_prompt_config(base: SaspConfig, num_points: int | None = None) -> SaspConfig:
    """Appendix B's points-only setting: SasP "topk" (half highest positive, half lowest negative); SasP on
    even for a model that runs without it (a converted LISA), the points being the whole prompt."""
    n = base.num_points if num_points is None else num_points
    n += n % 2
    return dataclasses.replace(base, mode="topk", num_points=n, enabled=True)


def threshold_histograms(sim_map: Array, gt: Array, valid: Array) -> tuple[Array, Array]:
    """Per-row histograms that give I and U of `sim_map >= t` for every t of `THRESHOLDS` at once.

    bin(pixel) = #{k : t_k <= S} in [0, K]; the pixel is predicted at threshold k iff k < bin.

    Args:
      sim_map: float[N, Hc, Wc]; gt: int[N, Hc, Wc] in {0, 1, 255}; valid: bool[N, Hc, Wc] image region.
    Returns:
      (hist_fg, hist_all) int32[N, K + 1]: GT-foreground pixels / all non-ignored pixels per bin.
    """
    n = sim_map.shape[0]
    k1 = len(THRESHOLDS) + 1
    bins = jnp.searchsorted(jnp.asarray(THRESHOLDS), sim_map, side="right").astype(jnp.int32)
    keep = valid & (gt != 255)
    fg = keep & (gt == 1)
    seg = (jnp.arange(n, dtype=jnp.int32)[:, None, None] * k1 + bins).reshape(-1)
    hist_fg = jax.ops.segment_sum(fg.reshape(-1).astype(jnp.int32), seg, num_segments=n * k1)
    hist_all = jax.ops.segment_sum(keep.reshape(-1).astype(jnp.int32), seg, num_segments=n * k1)
    return hist_fg.reshape(n, k1), hist_all.reshape(n, k1)


def best_thresholds(hist_fg: np.ndarray, hist_all: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Appendix A.1 per query: the threshold of the 0.01 grid that maximises that query's IoU.

    Args:
      hist_fg, hist_all: int[N, K + 1] from `threshold_histograms`.
    Returns:
      (threshold float32[N], inter int64[N], union int64[N]) at the chosen threshold (ties: smallest t).
    """
    hist_fg = np.asarray(hist_fg, np.int64)
    hist_all = np.asarray(hist_all, np.int64)
    k = len(THRESHOLDS)
    if hist_fg.shape != hist_all.shape or hist_fg.shape[-1] != k + 1:
        raise ValueError(f"need two int[N, {k + 1}] histograms, got {hist_fg.shape}, {hist_all.shape}")
    # Pixels with bin > k are predicted at threshold k: suffix sums from bin k + 1 on.
    suffix_fg = np.cumsum(hist_fg[:, ::-1], axis=1)[:, ::-1]  # [N, K+1]: sum over bins >= b
    suffix_all = np.cumsum(hist_all[:, ::-1], axis=1)[:, ::-1]
    inter = suffix_fg[:, 1:]  # [N, K]
    pred = suffix_all[:, 1:]
    gt = hist_fg.sum(axis=1, keepdims=True)
    union = pred + gt - inter
    best = np.argmax(query_iou(inter, union), axis=1)  # first maximum: the smallest threshold
    rows = np.arange(len(best))
    return THRESHOLDS[best], inter[rows, best], union[rows, best]


def format_table8(results: Mapping[tuple[float, float, int], Mapping[str, float]]) -> str:
    """Table 8's layout: rows t_pos/t_neg, column pairs gIoU/cIoU per |P| (percent, 2 decimals)."""
    pairs = sorted({(tp, tn) for tp, tn, _ in results}, reverse=True)
    counts = sorted({n for _, _, n in results})
    head1 = "t_pos  t_neg  " + "".join(f"|P|={n:<13d}" for n in counts)
    head2 = "             " + "".join(f" {'gIoU':>6s} {'cIoU':>6s} " for _ in counts)
    lines = ["Table 8. Ablation study on points ratios.", head1, head2]
    for tp, tn in pairs:
        cells = "".join(
            f" {100 * results[(tp, tn, n)]['gIoU']:6.2f} {100 * results[(tp, tn, n)]['cIoU']:6.2f} "
            for n in counts
        )
        lines.append(f"{tp:<6.1f} {tn:<6.1f}{cells}")
    return "\n".join(lines)
