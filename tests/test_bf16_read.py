"""bf16 parity of READ end to end: read_jax's released numerics vs the torch READ (`torchref.read`) in bf16,
the same tiny random weights rounded to bf16 on both sides, and the torch READ in fp32 as the truth.

The released casts (read_reference.md §1, §2.7, §3): bf16 weights and activations; text logits cast to fp32
after the bf16 lm_head; SasP's similarity a bf16 product summed in fp32 and rounded to bf16, its DtoC
min-max in bf16; the sparse prompt cast to bf16 before the mask decoder; the decoder's low-res logits cast
to fp32 for postprocessing. The pixels go in as uint8 and are normalised on the device (the torch READ gets
the host formulas' floats).

What is compared, with the depths of `tests/bf16.py` (tiny READ: CLIP 2 layers run, LLaMA 2 layers, SAM 2+2):
  * the forward: final hidden states D = 60 (CLIP 25 = 3 + 11 * 2, projector 3, LLaMA 32 = 15 * 2 + 2),
    logits 61, the [SEG] states 60, the [SEG] embeddings (text_hidden_fcs) 63;
  * the mask path from the reference's own bf16 states (its [SEG] and image-token hidden states and SAM
    embedding): SasP's bf16 similarity and labels must be identical (points too, except cells whose grid
    value is tied: the reference's argsort order is undefined there), the DtoC points within 1e-3 px, and
    the low-res / full-resolution mask logits within D = 79 (the [SEG] embedding 3 + the decoder 76), with
    the mask IoU at least what that bound guarantees (three masks are too few for the accuracy ratio of
    `tests/bf16.py`; test_bf16_sam asserts it for the decoder over more prompts);
  * the fully chained path (each side's own states): mask IoU and label agreement between the two paths,
    reported; the bf16 similarities differ there, so a cell near a threshold may change label and move a
    point, which no bf16 bound covers; the test asserts only a floor (IoU >= 0.9 per mask).
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from read_jax.config import ReadConfig, SaspConfig
from read_jax.data import preprocess as pp
from tests.bf16 import check, iou, tolerance
from tests.helpers import require_meta_sam, require_torch

CANVAS = (320, 320)
ORIG = [(240, 320), (300, 117)]
SLOTS = [(0, 0), (1, 0), (1, 1)]  # (row, [SEG] slot) of the batch's three [SEG]s
D_HIDDEN, D_MASK = 60, 79


def _batch(cfg, seed=0):
    """Row 0: image 0, one [SEG]; row 1: image 1, two [SEG]s; row 2: image 1, none. uint8 pixels."""
    rng = np.random.default_rng(seed)
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
    sam = cfg.sam
    images = [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for hw in ORIG]
    frames = [pp.sam_pixels(im, sam) for im in images]
    return {
        "images_clip": np.stack([pp.clip_pixels(im, cfg.clip.image_size) for im in images]),
        "images_sam": np.stack([f for f, _ in frames]),
        "sam_input_hw": np.array([hw for _, hw in frames], np.int32),
        "orig_hw": np.array(ORIG, np.int32),
        "input_ids": ids,
        "attention_mask": mask,
        "labels": np.where(mask, ids, -100).astype(np.int32),
        "conv_image": np.array([0, 1, 1], np.int32),
    }


def _torch_batch(cfg, batch):
    """The torch READ's inputs: the host normalisations' floats (what the device normalisation equals)."""
    import torch

    sam = cfg.sam
    clip = pp.clip_normalize_host(batch["images_clip"])
    frames = np.stack(
        [
            pp.sam_normalize_host(f, hw, sam.pixel_mean, sam.pixel_std)
            for f, hw in zip(batch["images_sam"], batch["sam_input_hw"], strict=True)
        ]
    )
    out = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    out["images_clip"], out["images_sam"] = torch.from_numpy(clip), torch.from_numpy(frames)
    return out


def _sasp_fns(cfg):
    """The reference's SasP (torchref.sasp), with the debug intermediates kept for the tie check."""
    import torch

    from torchref import sasp as st

    sc, debug = cfg.sasp, []

    def similarity(h_img, s):
        return st.compute_similarity_map(h_img[None], s[None])[0, :, 0]

    def to_points(sim, hw):
        pts, labels, dbg = st.similarity_map_to_points(
            sim,
            hw,
            down_sample=cfg.clip.grid_size // sc.grid_size,
            num_points=sc.num_points,
            t_pos=sc.t_pos,
            t_neg=sc.t_neg,
            use_dtoc=False,
            return_debug=True,
        )
        debug.append({"sim": sim, **dbg})
        return pts, labels

    def dtoc(sim, pts, hw):
        full = st.get_similarity_map(sim[None, :, None], hw, torch.float32)[0, :, :, 0]
        return st.discrete_to_continuous(full, pts.float())

    return (similarity, to_points, dtoc), debug


@pytest.fixture(scope="module")
def run():
    """The torch READ in fp32 and bf16, read_jax in bf16 (chained, and the mask path from torch's states)."""
    torch = require_torch()
    require_meta_sam()
    from read_jax.convert.common import Converter, abstract_leaves, load_leaves
    from read_jax.convert.read import clip_dir_ignore, clip_dir_rules, read_ignore, read_rules
    from read_jax.read_model import ReadModel
    from torchref.read import TorchRead

    cfg32 = ReadConfig.tiny(lora=None, sasp=SaspConfig.read_7b(similarity_dtype="float32"), max_segs=2)
    cfg16 = ReadConfig.tiny(dtype="bfloat16", lora=None, sasp=SaspConfig.read_7b(), max_segs=2)
    tm32 = TorchRead(cfg32, seed=0).float()
    tm16 = copy.deepcopy(tm32).released_dtype(torch.bfloat16)
    sd, clip_sd = tm32.released_state_dict()
    model = nnx.eval_shape(lambda: ReadModel(cfg16, rngs=nnx.Rngs(0)))
    conv = Converter(
        read_rules() + clip_dir_rules(),
        abstract_leaves(model),
        ignore=read_ignore(clip_given=True, sam_given=False) + clip_dir_ignore(),
    )
    load_leaves(model, conv.add_all(sd).add_all(clip_sd).finish())

    batch = _batch(cfg16)
    tb = _torch_batch(cfg16, batch)
    fns32, _ = _sasp_fns(cfg32)
    t32 = tm32(tb, fns32, {})
    fns16, debug16 = _sasp_fns(cfg16)
    t16 = tm16(tb, fns16, {})

    # The reference's bf16 states of each [SEG]: its hidden state, its row's image tokens, the SAM embedding.
    p = cfg16.clip.num_patches
    starts = [int(np.flatnonzero(batch["input_ids"][r] == cfg16.im_start_token_id)[0]) for r, _ in SLOTS]
    seg_h = torch.stack([s["seg_hidden"] for s in t16["segs"]]).float().numpy()
    img_h = torch.stack(
        [t16["hidden"][r, st + 1 : st + 1 + p] for (r, _), st in zip(SLOTS, starts, strict=True)]
    )
    img_h = img_h.float().numpy()
    emb = t16["image_embeddings"].float().permute(0, 2, 3, 1).numpy()
    seg_image = batch["conv_image"][[r for r, _ in SLOTS]]

    @nnx.jit
    def forward(m, b, seg_h, img_h, seg_image, emb):
        out = m(b, canvas_hw=CANVAS)
        forced = m.masks_from_states(
            seg_h, img_h, seg_image, b["orig_hw"], b["sam_input_hw"], emb, canvas_hw=CANVAS
        )
        return out, forced

    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)
    out, forced = forward(model, jb, bf(seg_h), bf(img_h), jnp.asarray(seg_image), bf(emb))
    truth = _torch_mask_path_fp32(tm32, cfg32, batch, t16, seg_image)
    return {
        "cfg": cfg16,
        "batch": batch,
        "t32": t32,
        "t16": t16,
        "debug16": debug16,
        "out": out,
        "forced": jax.tree.map(np.asarray, forced),
        "truth": truth,
    }


def _torch_mask_path_fp32(tm32, cfg, batch, t16, seg_image):
    """The fp32 truth of the mask path from the reference's bf16 states: the reference's points (bf16 SasP,
    as `t16` used them) through the fp32 text_hidden_fcs, prompt encoder, decoder and postprocessing."""
    import torch
    import torch.nn.functional as F

    pe, dec = tm32.visual_model["prompt_encoder"], tm32.visual_model["mask_decoder"]
    emb = t16["image_embeddings"].float()
    s = cfg.sam.image_size
    lows, masks = [], []
    for seg, img in zip(t16["segs"], seg_image, strict=True):
        h, w = (int(v) for v in batch["orig_hw"][img])
        nh, nw = (int(v) for v in batch["sam_input_hw"][img])
        coords = seg["points"].float() * torch.tensor([nw / w, nh / h])
        sparse, dense = pe(points=(coords[None], seg["labels"][None].int()), boxes=None, masks=None)
        sparse = torch.cat([sparse, tm32.text_hidden_fcs[0](seg["seg_hidden"].float())[None, None]], 1)
        low, _ = dec(emb[img : img + 1], pe.get_dense_pe(), sparse, dense, multimask_output=False)
        m = F.interpolate(low, (s, s), mode="bilinear", align_corners=False)[..., :nh, :nw]
        lows.append(low[0, 0])
        masks.append(F.interpolate(m, (h, w), mode="bilinear", align_corners=False)[0, 0])
    return {"low": lows, "mask": masks}


def test_bf16_read_forward(run):
    out, t16, t32 = run["out"], run["t16"], run["t32"]
    assert out.hidden.dtype == jnp.bfloat16 and out.logits.dtype == jnp.float32
    real = np.concatenate(
        [np.ones((3, run["cfg"].clip.num_patches - 1), bool), run["batch"]["attention_mask"]], 1
    )
    check(
        "read logits",
        np.asarray(out.logits)[real],
        t16["logits"].float()[real],
        t32["logits"][real],
        D_HIDDEN + 1,
    )
    check(
        "read final hidden",
        np.asarray(out.hidden, np.float32)[real],
        t16["hidden"].float()[real],
        t32["hidden"][real],
        D_HIDDEN,
    )
    seg_j = np.stack([np.asarray(out.seg.hidden[r, k], np.float32) for r, k in SLOTS])
    emb_j = np.stack([np.asarray(out.masks.pred_embeddings[r, k], np.float32) for r, k in SLOTS])
    pick = lambda segs, key: np.stack([s[key].float().numpy() for s in segs])
    assert [s["row"] for s in t16["segs"]] == [r for r, _ in SLOTS]
    check(
        "read [SEG] hidden states",
        seg_j,
        pick(t16["segs"], "seg_hidden"),
        pick(t32["segs"], "seg_hidden"),
        D_HIDDEN,
    )
    check(
        "read [SEG] embeddings",
        emb_j,
        pick(t16["segs"], "pred_emb"),
        pick(t32["segs"], "pred_emb"),
        D_HIDDEN + 3,
    )


def test_bf16_read_sasp_points_from_the_reference_states(run):
    """SasP on the reference's bf16 [SEG] and image-token states: the same bf16 similarity, the same labels,
    the same integer points except at tied grid values, DtoC within 1e-3 px."""
    forced, t16, debug = run["forced"], run["t16"], run["debug16"]
    assert forced.similarity.dtype == jnp.bfloat16
    for i, (seg, dbg) in enumerate(zip(t16["segs"], debug, strict=True)):
        np.testing.assert_array_equal(
            np.asarray(forced.similarity[i], np.float32), dbg["sim"].float().numpy(), err_msg=f"[SEG] {i}"
        )
        labels_t = seg["labels"].numpy()
        np.testing.assert_array_equal(forced.point_labels[i], labels_t, err_msg=f"[SEG] {i} labels")
        flat = dbg["padded"].reshape(-1).numpy()
        chosen = flat[dbg["selected"].numpy()]
        values, counts = np.unique(flat[flat >= 0], return_counts=True)
        untied = ~np.isin(chosen, values[counts > 1]) | (labels_t == -1)
        assert untied.mean() >= 0.5, f"[SEG] {i}: most points tied, the check would be empty"
        np.testing.assert_allclose(
            forced.points[i][untied],
            seg["points"].float().numpy()[untied],
            rtol=0,
            atol=1e-3,
            err_msg=f"[SEG] {i}",
        )


def test_bf16_read_masks_from_the_reference_states(run):
    forced, t16, truth, batch = run["forced"], run["t16"], run["truth"], run["batch"]
    low_j = forced.low_res_logits.astype(np.float32)
    check(
        "read low-res mask logits",
        low_j,
        np.stack([s["low"].float().numpy() for s in t16["segs"]]),
        np.stack([x.numpy() for x in truth["low"]]),
        D_MASK,
        accuracy=False,
    )
    tol = tolerance(D_MASK)
    for i, ((r, _), seg, want32) in enumerate(zip(SLOTS, t16["segs"], truth["mask"], strict=True)):
        h, w = batch["orig_hw"][batch["conv_image"][r]]
        got, want = forced.mask_logits[i][:h, :w], seg["mask"].float().numpy()
        assert forced.mask_logits.dtype == np.float32 and not got[h:].any()
        check(f"read mask logits [SEG] {i}", got, want, want32.numpy(), D_MASK, accuracy=False)
        # Pixels whose reference logit is outside the error bound must agree in sign: the IoU that guarantees.
        band = tol * np.abs(want32.numpy()).max()
        guaranteed = iou(want > band, want > -band)
        got_iou = iou(got > 0, want > 0)
        print(f"bf16 parity | read mask IoU [SEG] {i} (reference states) | {got_iou:.4f} >= {guaranteed:.4f}")
        assert got_iou >= guaranteed


def test_bf16_read_chained_masks(run):
    """Each side's own states all the way: report the label agreement and the mask IoU between the paths."""
    out, t16, batch = run["out"], run["t16"], run["batch"]
    for i, ((r, k), seg) in enumerate(zip(SLOTS, t16["segs"], strict=True)):
        h, w = batch["orig_hw"][batch["conv_image"][r]]
        got = np.asarray(out.masks.mask_logits[r, k])[:h, :w] > 0
        agree = float((np.asarray(out.masks.point_labels[r, k]) == seg["labels"].numpy()).mean())
        m_iou = iou(got, seg["mask"].float().numpy() > 0)
        print(f"bf16 parity | read chained [SEG] {i} | label agreement {agree:.3f} | mask IoU {m_iou:.4f}")
        assert m_iou >= 0.9 and agree >= 0.9
