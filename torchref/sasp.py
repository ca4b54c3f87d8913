"""Torch transcription of READ's SasP functions, loops and all, for parity tests and the benchmark.

Written from read_reference.md §3.1-3.4 and checked against rui-qian/READ `model/READ.py` (commit 2549240):
`compute_similarity_map` (:633-653), `get_similarity_map` (:765-784), `Discrete_to_Continuous`
(:786-810), `similarity_map_to_points` (:812-895). The reference hard-codes its hyperparameters inside
`similarity_map_to_points`; here they are keyword arguments with the READ-7B defaults. `dtype` is the
float type of the computation after the similarity (the reference: float32; float64 gives the
ground-truth maths for tight comparisons). `return_debug=True` also returns the intermediates.

Shapes: P image tokens (576), C hidden size, H W original image size, Q points.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_similarity_map(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """CLIP-Surgery similarity without redundant features: [1, P, C] x [1, C] -> [1, P, 1].

    The redundancy weight is a softmax over the single text vector (== 1), so this is a raw dot product
    computed as an elementwise product (in the input dtype) summed over C.
    """
    image_features = image_features.clone()
    text_features = text_features.clone()
    prob = image_features[:, :1, :] @ text_features.t()
    prob = (prob * 2).softmax(-1)
    w = prob / prob.mean(-1, keepdim=True)
    b, n_t, n_i, c = (
        image_features.shape[0],
        text_features.shape[0],
        image_features.shape[1],
        image_features.shape[2],
    )
    feats = image_features.reshape(b, n_i, 1, c) * text_features.reshape(1, 1, n_t, c)
    feats *= w.reshape(1, 1, n_t, 1)
    return feats.sum(-1)


def get_similarity_map(sm: torch.Tensor, shape, dtype=torch.float32, target_size: int = 336) -> torch.Tensor:
    """`origin_sm`: [1, P, 1] map -> [1, H, W, 1] full-resolution map (min-max in sm's own dtype).

    `target_size` is READ's hard-coded 336, its CLIP crop; SasP on another tower (LISA's CLIP-224) uses that
    tower's crop, as `read_jax.sasp` does with `clip_size`."""
    sm = (sm - sm.min(1, keepdim=True)[0]) / (sm.max(1, keepdim=True)[0] - sm.min(1, keepdim=True)[0])
    side = int(sm.shape[1] ** 0.5)
    sm = sm.reshape(sm.shape[0], side, side, -1).permute(0, 3, 1, 2)
    sm = sm.to(dtype)

    h, w = shape
    scale = target_size / min(h, w)
    new_h, new_w = int(h * scale), int(w * scale)
    sm = F.interpolate(sm, (target_size, target_size), mode="bilinear")
    pad_h = (new_h - target_size) // 2
    pad_w = (new_w - target_size) // 2
    padded_sm = F.pad(sm, (pad_w, pad_w, pad_h, pad_h))
    sm = F.interpolate(padded_sm, shape, mode="bilinear")
    return sm.permute(0, 2, 3, 1)


def discrete_to_continuous(sm: torch.Tensor, selected_points: torch.Tensor) -> torch.Tensor:
    """[H, W] map, [Q, 2] integer (x, y) -> [Q, 2] continuous (x, y); softmax over all H*W pixels."""
    h, w = sm.shape
    softmax_probs = F.softmax(sm.view(-1), dim=0)
    grid_x, grid_y = torch.meshgrid(torch.arange(w), torch.arange(h), indexing="xy")
    grid_x = grid_x.to(softmax_probs.device).to(sm.dtype).view(-1)
    grid_y = grid_y.to(softmax_probs.device).to(sm.dtype).view(-1)

    selected_x = selected_points[:, 0]
    selected_y = selected_points[:, 1]
    continuous_coordinates = []
    for x, y in zip(selected_x, selected_y, strict=False):
        distances = (grid_x - x) ** 2 + (grid_y - y) ** 2
        weight = torch.exp(-distances)
        final_weights = weight * softmax_probs
        final_weights = final_weights / final_weights.sum()
        continuous_x = (grid_x * final_weights).sum()
        continuous_y = (grid_y * final_weights).sum()
        continuous_coordinates.append(torch.stack([continuous_x, continuous_y]))
    return torch.stack(continuous_coordinates)


def similarity_map_to_points(
    sm: torch.Tensor,
    shape,
    down_sample: int = 2,
    num_points: int = 30,
    t_pos: float = 0.8,
    t_neg: float = 0.2,
    use_dtoc: bool = True,
    dtype=torch.float32,
    return_debug: bool = False,
):
    """[P] similarity map, original (H, W) -> (points [Q, 2], labels long[Q]) as the reference.

    With use_dtoc=False, `origin_sm` is not built and the integer points are returned (as the reference
    would hand to DtoC).
    """
    origin_sm = get_similarity_map(sm[None, ..., None], shape, dtype) if use_dtoc else None
    side = int(sm.shape[0] ** 0.5)
    sm = sm.reshape(1, 1, side, side)
    down_side = side // down_sample
    sm = sm.to(dtype)
    sm = F.interpolate(sm, (down_side, down_side), mode="bilinear")[0, 0, :, :]
    sm = (sm - sm.min()) / (sm.max() - sm.min())
    grid = sm

    target_size = down_side
    ori_h, ori_w = shape
    scale = target_size / min(ori_h, ori_w)
    new_h, new_w = int(ori_h * scale), int(ori_w * scale)
    pad_h = (new_h - target_size) // 2
    pad_w = (new_w - target_size) // 2
    sm = F.pad(sm, (pad_w, pad_w, pad_h, pad_h), mode="constant", value=-1)
    h, w = sm.shape
    scale_h = float(shape[0]) / h
    scale_w = float(shape[1]) / w
    sm = sm.reshape(-1)

    pos_indices = (sm >= t_pos).nonzero(as_tuple=False).squeeze()
    if pos_indices.dim() == 0:
        pos_indices = pos_indices.unsqueeze(0)
    pos_values = sm[pos_indices]
    sorted_pos_indices = pos_indices[torch.argsort(pos_values, descending=True)]

    neg_indices = ((sm >= 0) & (sm <= t_neg)).nonzero(as_tuple=False).squeeze()
    if neg_indices.dim() == 0:
        neg_indices = neg_indices.unsqueeze(0)
    neg_values = sm[neg_indices]
    sorted_neg_indices = neg_indices[torch.argsort(neg_values)]

    neutral_indices = ((sm > t_neg) & (sm < t_pos)).nonzero(as_tuple=False).squeeze()
    if neutral_indices.dim() == 0:
        neutral_indices = neutral_indices.unsqueeze(0)

    selected_indices = torch.cat([sorted_pos_indices, sorted_neg_indices, neutral_indices], dim=0)
    selected_indices = selected_indices[:num_points]
    if selected_indices.dim() == 0:
        selected_indices = selected_indices.unsqueeze(0)

    labels = torch.full((selected_indices.numel(),), -1, dtype=torch.long)
    points = []
    bound_w = torch.tensor(shape[1] - 1).to(dtype=torch.float32)
    bound_h = torch.tensor(shape[0] - 1).to(dtype=torch.float32)
    for i, idx in enumerate(selected_indices):
        x = min((idx % w + 0.5) * scale_w, bound_w)  # +0.5: cell centre
        y = min((idx // w + 0.5) * scale_h, bound_h)
        points.append([int(x.item()), int(y.item())])
        if idx in pos_indices:
            labels[i] = 1
        if idx in neg_indices:
            labels[i] = 0

    points_int = torch.tensor(points)
    points = discrete_to_continuous(origin_sm[0, ..., 0], points_int) if use_dtoc else points_int
    if not return_debug:
        return points, labels
    debug = {
        "grid": grid,
        "padded": sm.reshape(h, w),
        "pad": (pad_h, pad_w),
        "selected": selected_indices,
        "points_int": points_int,
        "origin_sm": origin_sm,
    }
    return points, labels, debug
