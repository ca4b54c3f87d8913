"""bf16 parity: read_jax in bf16 against the torch references in bf16 on the same tiny random weights, with
the torch references in fp32 as the truth. The runs and the error figures, shared by `tests/test_bf16_*.py`
(which assert the bounds) and `benchmarks/bf16.py` (which prints the error table).

The tolerance model. Two bf16 evaluations of the same computation (read_jax and the torch reference, both in
bf16 with the same bf16 weights) differ because each rounds to bf16 at different places and accumulates in a
different order. Their difference is bounded from bf16's unit roundoff and the computation's depth:

  u = 2^-8 (8 significand bits); a computation whose longest path holds D sequential bf16-rounded stages
  (a matmul or elementwise op rounded to bf16, a norm, a softmax cast, a residual add) has a relative error
  of about lambda * sqrt(D) * u: independent roundings add like a random walk (Higham & Mary, "A new approach
  to probabilistic rounding error analysis", SISC 2019), lambda = 3 for a small failure probability. Two
  independent evaluations differ by at most sqrt(2) times that: `tolerance(D)` = 3 sqrt(2 D) u, applied to
  the normwise relative difference ||a - b|| / ||fp32 reference|| and to the largest element's
  (max |a - b| / max |fp32 reference|).

Each output states D (counted from the architecture in the docstring of its run) and read_jax's bf16 result
must also be about as accurate as the reference's own bf16 result, both measured against the fp32 reference:
err(read_jax bf16) <= 1.5 err(torch bf16) + u. A read_jax bf16 path that rounds more often, or accumulates in
bf16 where the reference uses fp32, fails that even when it passes the bound.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

U = 2.0**-8  # bf16 unit roundoff
LAMBDA = 3.0
ACCURACY_RATIO = 1.5


def tolerance(depth: int) -> float:
    """Bound on the relative difference of two independent bf16 evaluations of depth `depth`."""
    return LAMBDA * math.sqrt(2 * depth) * U


@dataclasses.dataclass
class Output:
    """One compared output: read_jax bf16, the reference bf16, the reference fp32, its depth D.

    accuracy=False drops the accuracy-ratio check for an output too small to average its rounding errors (one
    SAM mask: a handful of roundings of its few tokens dominate, and the ratio of two such draws varies by 3x
    either way)."""

    name: str
    got16: object
    ref16: object
    ref32: object
    depth: int
    accuracy: bool = True


def _f64(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, np.float64).ravel()


def figures(o: Output) -> dict:
    """The error figures of one output (no assertion)."""
    a, b, t = _f64(o.got16), _f64(o.ref16), _f64(o.ref32)
    if not a.shape == b.shape == t.shape:
        raise ValueError(f"{o.name}: shapes {a.shape}, {b.shape}, {t.shape}")
    norm, peak = np.linalg.norm(t), np.abs(t).max()
    return {
        "finite": bool(np.isfinite(a).all()),
        "max_abs": float(np.abs(a - b).max()),
        "max_rel": float(np.abs(a - b).max() / peak),
        "norm_rel": float(np.linalg.norm(a - b) / norm),
        "jax_vs_fp32": float(np.linalg.norm(a - t) / norm),
        "torch_vs_fp32": float(np.linalg.norm(b - t) / norm),
        "tol": tolerance(o.depth),
        "depth": o.depth,
    }


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


# ---- LLaMA ----------------------------------------------------------------------------------------------
LLAMA_LAYERS = 2


def llama_run(kv_heads: int) -> dict:
    """read_jax's LLaMA in bf16 vs transformers' `LlamaForCausalLM` in bf16 (eager attention: bf16 q.k, fp32
    softmax cast to bf16, as transformers 4.31 computes it) and fp32, same weights, right-padded rows.

    Depth of the tiny 2-layer model: per layer 15 bf16-rounded stages (input RMSNorm: the normalised value and
    the scale product, 2; q/k/v projections 1; RoPE 1; attention probabilities 1; P.V 1; o_proj 1; residual 1;
    post-attention RMSNorm 2; gate/up 1; SiLU 1; the product 1; down 1; residual 1), then the final RMSNorm
    (2) and lm_head (1): hidden states D = 15 L + 2 = 32, logits D = 33.
    """
    import torch

    from read_jax.convert.common import abstract_leaves, convert, load_leaves
    from read_jax.convert.llama import LLAMA_IGNORE, LLAMA_RULES
    from read_jax.llama import LlamaForCausalLM
    from torchref.common import state_dict_numpy
    from torchref.llama import build_pair

    torch.manual_seed(0)  # the references' random weights: the same figures whoever calls, in any order

    ref32, _, cfg = build_pair(kv_heads)
    assert cfg.num_hidden_layers == LLAMA_LAYERS
    cfg16 = dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16")
    model = nnx.eval_shape(lambda: LlamaForCausalLM(cfg16, rngs=nnx.Rngs(0)))
    load_leaves(
        model, convert(state_dict_numpy(ref32), LLAMA_RULES, abstract_leaves(model), ignore=LLAMA_IGNORE)
    )
    ref16 = copy.deepcopy(ref32).to(torch.bfloat16)
    ids = torch.randint(3, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    out = nnx.jit(lambda m, i, a: m(i, attention_mask=a))(
        model, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy())
    )
    with torch.no_grad():
        t16 = ref16(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        t32 = ref32(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return {"out": out, "t16": t16, "t32": t32, "real": mask.numpy().astype(bool)}


def llama_outputs(run: dict, prefix: str = "llama") -> list[Output]:
    out, t16, t32, real = run["out"], run["t16"], run["t32"], run["real"]
    return [
        Output(
            f"{prefix} logits",
            np.asarray(out.logits)[real],
            t16.logits.float()[real],
            t32.logits[real],
            15 * LLAMA_LAYERS + 3,
        ),
        Output(
            f"{prefix} final hidden",
            np.asarray(out.hidden_states, np.float32)[real],
            t16.hidden_states[-1].float()[real],
            t32.hidden_states[-1][real],
            15 * LLAMA_LAYERS + 2,
        ),
    ]


# ---- CLIP -----------------------------------------------------------------------------------------------
def clip_run() -> dict:
    """read_jax's CLIP vision tower in bf16 vs transformers' `CLIPVisionModel` in bf16 (eager attention) and
    fp32, same weights, LLaVA's feature (`hidden_states[-2]`, CLS dropped).

    Depth: patch conv 1, + class/position embeddings 1, pre-LayerNorm 1, then per layer run 11 bf16-rounded
    stages (LayerNorm 1, q/k/v 1, attention probabilities 1, P.V 1, out_proj 1, residual 1, LayerNorm 1, fc1
    1, activation 1, fc2 1, residual 1): D = 3 + 11 L, with L = 2 layers run for the tiny 3-layer tower at
    select_layer -2.
    """
    import torch

    from read_jax.clip import ClipVisionModel
    from read_jax.config import ReadConfig
    from read_jax.convert.clip import CLIP_VISION_IGNORE, CLIP_VISION_RULES
    from read_jax.convert.common import abstract_leaves, convert, load_leaves
    from torchref.clip import hf_clip
    from torchref.common import state_dict_numpy

    torch.manual_seed(0)  # the references' random weights: the same figures whoever calls, in any order

    cfg = ReadConfig.tiny().clip
    ref32 = hf_clip(cfg)
    sd = {
        k if k.startswith("vision_model.") else "vision_model." + k: v
        for k, v in state_dict_numpy(ref32).items()
    }
    cfg16 = dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16")
    model = nnx.eval_shape(lambda: ClipVisionModel(cfg16, rngs=nnx.Rngs(0)))
    load_leaves(model, convert(sd, CLIP_VISION_RULES, abstract_leaves(model), ignore=CLIP_VISION_IGNORE))
    ref16 = copy.deepcopy(ref32).to(torch.bfloat16)
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))
    got = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(pixels.numpy().transpose(0, 2, 3, 1)))
    sel = cfg.select_layer
    with torch.no_grad():
        t16 = ref16(pixel_values=pixels.bfloat16(), output_hidden_states=True).hidden_states[sel][:, 1:]
        t32 = ref32(pixel_values=pixels, output_hidden_states=True).hidden_states[sel][:, 1:]
    layers_run = cfg.num_hidden_layers + 1 + sel
    return {"got": got, "t16": t16, "t32": t32, "depth": 3 + 11 * layers_run}


def clip_outputs(run: dict) -> list[Output]:
    return [Output("clip features", np.asarray(run["got"], np.float32), run["t16"], run["t32"], run["depth"])]


# ---- SAM ------------------------------------------------------------------------------------------------
SAM_D_EMBEDDINGS, SAM_D_LOW = 40, 76


def sam_models():
    """(cfg, Meta SAM fp32, Meta SAM bf16, read_jax SAM bf16), the tiny SAM's same weights.

    The reference's bf16 numerics (READ runs SAM from a bf16 checkpoint): every op in bf16, including the
    attention logits, the relative-position terms and LayerNorm2d's mean/variance (read_jax keeps attention
    logits and LayerNorm statistics in fp32, as fused kernels do), and the mask logits cast to fp32 after the
    decoder for postprocessing. One deliberate difference, kept on both sides here: the prompt encoder's
    Gaussian PE matrix stays fp32 (`torchref.read.TorchRead.released_dtype`; LISA-style encoders cast the
    coordinates to bf16).

    Depths, tiny SAM (2 encoder blocks, 2 two-way blocks):
      image embeddings: patch conv 1, + pos 1, per block 12 (LayerNorm 1, qkv 1, relative-position terms 1,
        probabilities 1, P.V 1, proj 1, residual 1, LayerNorm 1, lin1 1, GELU 1, lin2 1, residual 1), neck 14
        (conv 1, LayerNorm2d 6, conv 1, LayerNorm2d 6): D = 16 + 12 * 2 = 40;
      low-res mask logits from the same embedding and prompts: sparse prompt 2 (PE cast, + label embedding),
        src + dense 1, per two-way block 26 (self-attention 4 + residual + norm; token->image 5 + residual +
        norm; MLP 3 + residual + norm; image->token 5 + residual + norm), final attention 7, upscaling 10
        (ConvT, LayerNorm2d 6, GELU, ConvT, GELU), hypernetwork MLP 3, the product 1: D = 24 + 26 * 2 = 76.
    """
    import torch

    from read_jax.convert.common import abstract_leaves, convert, load_leaves
    from read_jax.convert.sam import sam_rules
    from read_jax.sam import Sam
    from torchref.common import state_dict_numpy
    from torchref.sam import TINY, build_pair

    torch.manual_seed(0)  # the references' random weights: the same figures whoever calls, in any order

    ref32, _ = build_pair(TINY)
    cfg16 = dataclasses.replace(TINY, dtype="bfloat16", param_dtype="bfloat16")
    ours = nnx.eval_shape(lambda: Sam(cfg16, rngs=nnx.Rngs(0)))
    load_leaves(ours, convert(state_dict_numpy(ref32), sam_rules(), abstract_leaves(ours)))
    ref16 = copy.deepcopy(ref32)
    gauss = ref16.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.clone()
    ref16.to(torch.bfloat16)
    ref16.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix = gauss
    return TINY, ref32, ref16, ours


def sam_embeddings_run(models) -> dict:
    import torch

    cfg, ref32, ref16, ours = models
    img = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))
    got = nnx.jit(lambda m, x: m.image_encoder(x))(ours, jnp.asarray(img.numpy().transpose(0, 2, 3, 1)))
    with torch.no_grad():
        want16 = ref16.image_encoder(img.bfloat16()).permute(0, 2, 3, 1)
        want32 = ref32.image_encoder(img).permute(0, 2, 3, 1)
    return {"got": got, "t16": want16, "t32": want32}


def sam_mask_logits_run(models) -> dict:
    """Prompt encoder + mask decoder from the reference's bf16 embedding and the same SasP-like prompts (30
    points, labels 1/0/-1, a [SEG] text token) for 8 prompts; the low-res logits leave the decoder in bf16
    and are cast to fp32, as READ's postprocessing does."""
    import torch

    from read_jax.sam import transforms

    cfg, ref32, ref16, ours = models
    s, c = cfg.image_size, cfg.prompt_embed_dim
    gen = torch.Generator().manual_seed(3)
    img = torch.randn(2, 3, s, s, generator=gen)
    n = 8  # prompts: enough independent decoder runs for the accuracy ratio
    pts = torch.rand(n, 30, 2, generator=gen) * s
    lab = torch.randint(-1, 2, (n, 30), generator=gen)
    text = torch.randn(n, 1, c, generator=gen)
    which = [k % 2 for k in range(n)]  # image of each prompt

    def meta(model, emb, dt):
        sparse, dense = model.prompt_encoder(points=(pts, lab), boxes=None, masks=None)
        sparse = torch.cat([sparse, text.to(sparse.dtype)], 1).to(dt)  # READ.py:306-309: sparse cast to bf16
        pe = model.prompt_encoder.get_dense_pe().to(dt)
        lows = [
            model.mask_decoder(emb[i : i + 1], pe, sparse[k : k + 1], dense[k : k + 1].to(dt), False)[0]
            for k, i in enumerate(which)
        ]
        return torch.cat(lows).float()[:, 0]

    with torch.no_grad():
        emb16 = ref16.image_encoder(img.bfloat16())
        low16 = meta(ref16, emb16, torch.bfloat16)
        low32 = meta(ref32, emb16.float(), torch.float32)  # the fp32 truth from the same embedding

    @nnx.jit
    def ours_fn(m, emb, p, l, t):
        sparse, dense = m.prompt_encoder(p, l, t)
        low, _ = m.mask_decoder(emb, m.prompt_encoder.get_dense_pe(), sparse, dense, False)
        full = jnp.full((low.shape[0], 2), s, jnp.int32)
        return low, transforms.postprocess_masks_padded(low, full, full, out_hw=(s, s), image_size=s)

    emb = jnp.asarray(emb16.float().numpy().transpose(0, 2, 3, 1), jnp.bfloat16)[jnp.asarray(which)]
    low, masks = ours_fn(
        ours, emb, jnp.asarray(pts.numpy()), jnp.asarray(lab.numpy()), jnp.asarray(text.numpy(), jnp.bfloat16)
    )
    return {"low": low, "masks": masks, "t16": low16, "t32": low32}


def sam_embeddings_output(run: dict) -> Output:
    got = np.asarray(run["got"], np.float32)
    return Output("sam image embeddings", got, run["t16"], run["t32"], SAM_D_EMBEDDINGS)


def sam_mask_logits_output(run: dict) -> Output:
    got = np.asarray(run["low"], np.float32)[:, 0]
    return Output("sam low-res mask logits", got, run["t16"], run["t32"], SAM_D_LOW)


# ---- READ end to end ------------------------------------------------------------------------------------
READ_CANVAS = (320, 320)
READ_ORIG = [(240, 320), (300, 117)]
READ_SLOTS = [(0, 0), (1, 0), (1, 1)]  # (row, [SEG] slot) of the batch's three [SEG]s
READ_D_HIDDEN, READ_D_MASK = 60, 79


def read_batch(cfg, seed=0):
    """Row 0: image 0, one [SEG]; row 1: image 1, two [SEG]s; row 2: image 1, none. uint8 pixels."""
    from read_jax.data import preprocess as pp
    from torchref.read_batch import tiny_rows

    rng = np.random.default_rng(seed)
    ids, mask = tiny_rows(cfg)
    sam = cfg.sam
    images = [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for hw in READ_ORIG]
    frames = [pp.sam_pixels(im, sam) for im in images]
    return {
        "images_clip": np.stack([pp.clip_pixels(im, cfg.clip.image_size) for im in images]),
        "images_sam": np.stack([f for f, _ in frames]),
        "sam_input_hw": np.array([hw for _, hw in frames], np.int32),
        "orig_hw": np.array(READ_ORIG, np.int32),
        "input_ids": ids,
        "attention_mask": mask,
        "labels": np.where(mask, ids, -100).astype(np.int32),
        "conv_image": np.array([0, 1, 1], np.int32),
    }


def _read_torch_batch(cfg, batch):
    """The torch READ's inputs: the host normalisations' floats (what the device normalisation equals)."""
    import torch

    from read_jax.data import preprocess as pp

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


def _read_sasp_fns(cfg):
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


def read_run() -> dict:
    """The torch READ (`torchref.read`) in fp32 and bf16, read_jax's READ in bf16: chained, and the mask path
    from the reference's own bf16 states.

    The released casts (read_reference.md §1, §2.7, §3): bf16 weights and activations; text logits cast to
    fp32 after the bf16 lm_head; SasP's similarity a bf16 product summed in fp32 and rounded to bf16, its
    DtoC min-max in bf16; the sparse prompt cast to bf16 before the mask decoder; the decoder's low-res logits
    cast to fp32 for postprocessing. The pixels go in as uint8 and are normalised on the device (the torch
    READ gets the host formulas' floats).

    Depths (tiny READ: CLIP 2 layers run, LLaMA 2 layers, SAM 2+2): final hidden states D = 60 (CLIP 25 =
    3 + 11 * 2, projector 3, LLaMA 32 = 15 * 2 + 2), logits 61, the [SEG] states 60, the [SEG] embeddings
    (text_hidden_fcs) 63; the mask logits from the reference's states D = 79 (the [SEG] embedding 3 + the
    decoder 76).
    """
    import torch

    from read_jax.config import ReadConfig, SaspConfig
    from torchref.read import TorchRead, converted_model

    torch.manual_seed(0)  # the references' random weights: the same figures whoever calls, in any order

    cfg32 = ReadConfig.tiny(lora=None, sasp=SaspConfig.read_7b(similarity_dtype="float32"), max_segs=2)
    cfg16 = ReadConfig.tiny(dtype="bfloat16", lora=None, sasp=SaspConfig.read_7b(), max_segs=2)
    tm32 = TorchRead(cfg32, seed=0).float()
    tm16 = copy.deepcopy(tm32).released_dtype(torch.bfloat16)
    model = converted_model(cfg16, tm32)

    batch = read_batch(cfg16)
    tb = _read_torch_batch(cfg16, batch)
    with torch.no_grad():
        fns32, _ = _read_sasp_fns(cfg32)
        t32 = tm32(tb, fns32, {})
        fns16, debug16 = _read_sasp_fns(cfg16)
        t16 = tm16(tb, fns16, {})

    # The reference's bf16 states of each [SEG]: its hidden state, its row's image tokens, the SAM embedding.
    p = cfg16.clip.num_patches
    starts = [int(np.flatnonzero(batch["input_ids"][r] == cfg16.im_start_token_id)[0]) for r, _ in READ_SLOTS]
    seg_h = torch.stack([s["seg_hidden"] for s in t16["segs"]]).float().numpy()
    img_h = torch.stack(
        [t16["hidden"][r, st + 1 : st + 1 + p] for (r, _), st in zip(READ_SLOTS, starts, strict=True)]
    )
    img_h = img_h.float().numpy()
    emb = t16["image_embeddings"].float().permute(0, 2, 3, 1).numpy()
    seg_image = batch["conv_image"][[r for r, _ in READ_SLOTS]]

    @nnx.jit
    def forward(m, b, seg_h, img_h, seg_image, emb):
        out = m(b, canvas_hw=READ_CANVAS)
        forced = m.masks_from_states(
            seg_h, img_h, seg_image, b["orig_hw"], b["sam_input_hw"], emb, canvas_hw=READ_CANVAS
        )
        return out, forced

    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)
    out, forced = forward(model, jb, bf(seg_h), bf(img_h), jnp.asarray(seg_image), bf(emb))
    with torch.no_grad():
        truth = _read_mask_path_fp32(tm32, cfg32, batch, t16, seg_image)
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


def _read_mask_path_fp32(tm32, cfg, batch, t16, seg_image):
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


def read_forward_outputs(run: dict) -> list[Output]:
    """Logits, final hidden states, [SEG] states and [SEG] embeddings of the chained forward."""
    out, t16, t32 = run["out"], run["t16"], run["t32"]
    real = np.concatenate(
        [np.ones((3, run["cfg"].clip.num_patches - 1), bool), run["batch"]["attention_mask"]], 1
    )
    seg_j = np.stack([np.asarray(out.seg.hidden[r, k], np.float32) for r, k in READ_SLOTS])
    emb_j = np.stack([np.asarray(out.masks.pred_embeddings[r, k], np.float32) for r, k in READ_SLOTS])
    pick = lambda segs, key: np.stack([s[key].float().numpy() for s in segs])
    d = READ_D_HIDDEN
    return [
        Output("read logits", np.asarray(out.logits)[real], t16["logits"].float()[real],
               t32["logits"][real], d + 1),
        Output("read final hidden", np.asarray(out.hidden, np.float32)[real], t16["hidden"].float()[real],
               t32["hidden"][real], d),
        Output("read [SEG] hidden states", seg_j, pick(t16["segs"], "seg_hidden"),
               pick(t32["segs"], "seg_hidden"), d),
        Output("read [SEG] embeddings", emb_j, pick(t16["segs"], "pred_emb"),
               pick(t32["segs"], "pred_emb"), d + 3),
    ]  # fmt: skip


def read_mask_outputs(run: dict) -> list[tuple[Output, float, float]]:
    """The mask path from the reference's states: the low-res logits (IoU figures NaN), then per [SEG] its
    full-resolution logits with (IoU of the two paths' masks, the IoU the error bound guarantees: pixels whose
    fp32 logit lies outside the bound agree in sign)."""
    forced, t16, truth, batch = run["forced"], run["t16"], run["truth"], run["batch"]
    rows = [
        (
            Output(
                "read low-res mask logits",
                forced.low_res_logits.astype(np.float32),
                np.stack([s["low"].float().numpy() for s in t16["segs"]]),
                np.stack([x.numpy() for x in truth["low"]]),
                READ_D_MASK,
                accuracy=False,
            ),
            math.nan,
            math.nan,
        )
    ]
    tol = tolerance(READ_D_MASK)
    for i, ((r, _), seg, want32) in enumerate(zip(READ_SLOTS, t16["segs"], truth["mask"], strict=True)):
        h, w = batch["orig_hw"][batch["conv_image"][r]]
        got, want, want32 = forced.mask_logits[i][:h, :w], seg["mask"].float().numpy(), want32.numpy()
        band = tol * np.abs(want32).max()
        o = Output(f"read mask logits [SEG] {i}", got, want, want32, READ_D_MASK, accuracy=False)
        rows.append((o, iou(got > 0, want > 0), iou(want > band, want > -band)))
    return rows


def read_chained(run: dict) -> list[dict]:
    """Each side's own states all the way, per [SEG]: the SasP label agreement and the mask IoU between the
    two paths (the bf16 similarities differ, so a cell near a threshold may change label and move a point,
    which no bf16 bound covers)."""
    out, t16, batch = run["out"], run["t16"], run["batch"]
    rows = []
    for (r, k), seg in zip(READ_SLOTS, t16["segs"], strict=True):
        h, w = batch["orig_hw"][batch["conv_image"][r]]
        got = np.asarray(out.masks.mask_logits[r, k])[:h, :w] > 0
        agree = float((np.asarray(out.masks.point_labels[r, k]) == seg["labels"].numpy()).mean())
        rows.append({"label_agreement": agree, "mask_iou": iou(got, seg["mask"].float().numpy() > 0)})
    return rows
