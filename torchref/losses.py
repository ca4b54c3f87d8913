"""READ's losses in torch (READ.py:46-89, 560-598; read_reference.md §5), the reference for `read_jax.losses`.

torch is imported when `read_losses` is called. (`torchref.read.torch_losses` is the same recipe on the
outputs of the torch READ, one mask per [SEG].)
"""

from __future__ import annotations


def read_losses(logits, labels, preds, gts):
    """Reference formulas: HF CE; per image sigmoid_ce/dice * n_i, / (N + 1e-8).

    Args: logits float[R, T, V], labels int[R, T] (-100 unsupervised), preds / gts: one float[n_i, H_i, W_i]
    tensor per image (mask logits / {0, 1} targets). Returns (ce, bce, dice) scalar tensors.
    """
    import torch

    F = torch.nn.functional
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    ce = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)

    def sigmoid_ce(p, t, n):
        loss = F.binary_cross_entropy_with_logits(p, t, reduction="none")
        return loss.flatten(1, 2).mean(1).sum() / (n + 1e-8)

    def dice(p, t, n, scale=1000, eps=1e-6):
        p = p.sigmoid().flatten(1, 2)
        t = t.flatten(1, 2)
        num = 2 * (p / scale * t).sum(-1)
        den = (p / scale).sum(-1) + (t / scale).sum(-1)
        return (1 - (num + eps) / (den + eps)).sum() / (n + 1e-8)

    bce_sum = dice_sum = 0.0
    n_tot = 0
    for p, t in zip(preds, gts, strict=False):
        n = t.shape[0]
        bce_sum = bce_sum + sigmoid_ce(p, t, n) * n
        dice_sum = dice_sum + dice(p, t, n) * n
        n_tot += n
    return ce, bce_sum / (n_tot + 1e-8), dice_sum / (n_tot + 1e-8)
