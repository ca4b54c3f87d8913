"""A torch READ assembled from the reference building blocks, for end-to-end parity tests.

Built from transformers' `LlamaForCausalLM` and `CLIPVisionModel`, Meta's `segment_anything` modules,
torch `nn.Sequential` projector and fcs, and the SasP transcription in `torchref.sasp`.
The forward transcribes READ's `model_forward` (READ.py:435-598) with the reference's own index tricks
(the 575-zero [SEG] mask shift, `<im_start>`-relative image-token slicing, per-image SAM decoding) and with
the §3.8 row/size pairing bug fixed (each [SEG] uses its own row's image, as read_jax does). With a LISA
config (`torchref.lisa`: `mm_projector_type="linear"`, `sasp.enabled=False`) it is LISA's `model_forward`
(LISA/model/LISA.py): the P - 1 shift is LISA's hard-coded 255 at CLIP-224, and SAM gets the [SEG] token
alone.

`released_state_dict()` returns the weights under the key names of a released READ checkpoint (plus the
HF CLIP keys separately), which `build_pair` feeds through read_jax's converter tables. `build_pair` and
`torch_forward` (the torch forward with the SasP transcription plugged in), on `torchref.read_batch`'s
config and batch, are the end-to-end comparison the parity test and `benchmarks/parity.py` share.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

from read_jax.config import IGNORE_INDEX, ReadConfig
from read_jax.convert.common import Converter, abstract_leaves, load_leaves
from read_jax.convert.read import clip_dir_ignore, clip_dir_rules, read_ignore, read_rules
from read_jax.read_model import ReadModel


def _llama(cfg: ReadConfig):
    import transformers

    c = cfg.llama
    hf = transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=False,
    )
    hf._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(hf)


def _clip(cfg: ReadConfig):
    import transformers

    c = cfg.clip
    hf = transformers.CLIPVisionConfig(
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        image_size=c.image_size,
        patch_size=c.patch_size,
        layer_norm_eps=c.layer_norm_eps,
        hidden_act=c.hidden_act,
    )
    hf._attn_implementation = "eager"
    return transformers.CLIPVisionModel(hf)


def _sam(cfg: ReadConfig):
    from torchref.sam import meta_sam

    modeling, _ = meta_sam()
    ImageEncoderViT, MaskDecoder = modeling.ImageEncoderViT, modeling.MaskDecoder
    PromptEncoder, TwoWayTransformer = modeling.PromptEncoder, modeling.TwoWayTransformer

    s = cfg.sam
    e = s.image_embedding_size
    enc = ImageEncoderViT(
        img_size=s.image_size,
        patch_size=s.patch_size,
        in_chans=3,
        embed_dim=s.encoder_embed_dim,
        depth=s.encoder_depth,
        num_heads=s.encoder_num_heads,
        mlp_ratio=s.mlp_ratio,
        out_chans=s.prompt_embed_dim,
        qkv_bias=s.qkv_bias,
        norm_layer=functools.partial(nn.LayerNorm, eps=s.layer_norm_eps),
        act_layer=nn.GELU,
        use_abs_pos=True,
        use_rel_pos=s.use_rel_pos,
        rel_pos_zero_init=False,
        window_size=s.window_size,
        global_attn_indexes=tuple(s.global_attn_indexes),
    )
    pe = PromptEncoder(
        embed_dim=s.prompt_embed_dim,
        image_embedding_size=(e, e),
        input_image_size=(s.image_size, s.image_size),
        mask_in_chans=s.mask_in_chans,
    )
    dec = MaskDecoder(
        num_multimask_outputs=s.num_multimask_outputs,
        transformer=TwoWayTransformer(
            depth=s.transformer_depth,
            embedding_dim=s.prompt_embed_dim,
            mlp_dim=s.transformer_mlp_dim,
            num_heads=s.transformer_num_heads,
            attention_downsample_rate=s.attention_downsample_rate,
        ),
        transformer_dim=s.prompt_embed_dim,
        iou_head_depth=s.iou_head_depth,
        iou_head_hidden_dim=s.iou_head_hidden_dim,
    )
    return nn.ModuleDict({"image_encoder": enc, "prompt_encoder": pe, "mask_decoder": dec})


def randomize_(module: nn.Module, seed: int, scale: float = 0.2) -> None:
    """Overwrite every parameter and float buffer with seeded noise (torch zero-inits several SAM tensors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # Buffers: only SAM's stored Gaussian PE matrix is a weight; `inv_freq` & co. must stay as built.
        buffers = [
            (n, b) for n, b in module.named_buffers() if n.endswith("positional_encoding_gaussian_matrix")
        ]
        for name, p in list(module.named_parameters()) + buffers:
            if not p.dtype.is_floating_point:
                continue
            if name.endswith(
                (
                    "norm.weight",
                    "layernorm.weight",
                    "layer_norm1.weight",
                    "layer_norm2.weight",
                    "pre_layrnorm.weight",
                    "post_layernorm.weight",
                )
            ) or (".norm" in name and name.endswith("weight")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g))


class TorchRead(nn.Module):
    """The torch READ reference: fp32 as built, or the released bf16 numerics after `released_dtype()`."""

    def __init__(self, cfg: ReadConfig, seed: int = 0, randomize: bool = True):
        """randomize=False keeps the modules' own inits (a 7B benchmark on a GPU: `randomize_` draws every
        weight on the CPU)."""
        super().__init__()
        self.cfg = cfg
        torch.manual_seed(seed)
        self.llm = _llama(cfg)
        self.clip = _clip(cfg)
        c = cfg.llama.hidden_size
        if cfg.mm_projector_type == "linear":  # LLaVA-v1's, as LISA's llava_arch.py builds it
            self.mm_projector = nn.Linear(cfg.clip.hidden_size, c)
        else:
            self.mm_projector = nn.Sequential(nn.Linear(cfg.clip.hidden_size, c), nn.GELU(), nn.Linear(c, c))
        self.text_hidden_fcs = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Linear(c, c), nn.ReLU(inplace=True), nn.Linear(c, cfg.out_dim), nn.Dropout(0.0)
                )
            ]
        )
        self.visual_model = _sam(cfg)
        if randomize:
            randomize_(self, seed)

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.lm_head.weight.dtype

    def released_dtype(self, dtype: torch.dtype = torch.bfloat16) -> TorchRead:
        """Cast in place to `dtype` as READ runs (`from_pretrained(torch_dtype=bf16)`), except SAM's Gaussian
        PE matrix, which stays fp32 with its encoding cast to `dtype` at the decoder's inputs.

        That one is read_jax's policy, not the release's: LISA-style prompt encoders cast the point
        coordinates to the matrix's dtype (bf16 phases of tens of radians; read_jax.sam.prompt_encoder).
        The rest follows the reference's casts in `forward`: pixels in `dtype`, the sparse prompt (fp32
        `torch.empty` + points, promoted) cast to `dtype` before the decoder (READ.py:306-309), mask logits
        cast to fp32 before postprocessing (sam.py:137-171).
        """
        pe = self.visual_model["prompt_encoder"].pe_layer
        gauss = pe.positional_encoding_gaussian_matrix.detach().float().clone()
        self.to(dtype)
        pe.positional_encoding_gaussian_matrix = gauss
        return self

    # ---- weights in the released layout ----------------------------------------------------------------
    def released_state_dict(self) -> tuple[dict, dict]:
        """(READ checkpoint keys -> numpy, HF CLIP keys -> numpy), fp32."""
        out = {}
        for k, v in self.llm.state_dict().items():
            out[k] = v  # model.embed_tokens..., model.layers..., model.norm..., lm_head.weight
        for k, v in self.mm_projector.state_dict().items():
            out["model.mm_projector." + k] = v
        for k, v in self.text_hidden_fcs.state_dict().items():
            out["model.text_hidden_fcs." + k] = v
        for k, v in self.visual_model.state_dict().items():
            out["model.visual_model." + k] = v
        clip = dict(self.clip.state_dict())
        to_np = lambda d: {k: v.detach().float().numpy().copy() for k, v in d.items()}
        return to_np(out), to_np(clip)

    # ---- forward ---------------------------------------------------------------------------------------
    def merge(self, input_ids, attention_mask, labels, image_tokens):
        """LLaVA's `prepare_inputs_labels_for_multimodal` for right-padded rows with one image each."""
        emb_layer = self.llm.model.embed_tokens
        p = image_tokens.shape[1]
        embeds, labs, masks = [], [], []
        for r in range(input_ids.shape[0]):
            ids = input_ids[r]
            i = int((ids == self.cfg.image_token_index).nonzero()[0, 0])
            embeds.append(torch.cat([emb_layer(ids[:i]), image_tokens[r], emb_layer(ids[i + 1 :])]))
            labs.append(torch.cat([labels[r, :i], torch.full((p,), IGNORE_INDEX), labels[r, i + 1 :]]))
            # The reference prepends P - 1 True entries (consistent for right padding, §2.4).
            masks.append(torch.cat([torch.ones(p - 1, dtype=torch.bool), attention_mask[r].bool()]))
        return torch.stack(embeds), torch.stack(labs), torch.stack(masks)

    def forward(self, batch: dict, sasp_fns, sasp_kw: dict):
        cfg = self.cfg
        ids = batch["input_ids"]
        r_rows, _ = ids.shape
        p = cfg.clip.num_patches
        dt = self.dtype
        pix = batch["images_clip"].permute(0, 3, 1, 2).to(dt)
        feats = self.clip(pix, output_hidden_states=True).hidden_states[cfg.clip.select_layer][:, 1:]
        image_tokens = self.mm_projector(feats)[batch["conv_image"]]
        embeds, labels, mask = self.merge(ids, batch["attention_mask"], batch["labels"], image_tokens)
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.llm.model(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=pos)
        h = out.last_hidden_state  # final RMSNorm output
        logits = self.llm.lm_head(h)

        # [SEG] mask with the reference's shift (READ.py:435-455).
        m0 = ids[:, 1:] == cfg.seg_token_id
        seg_mask = torch.cat(
            [torch.zeros(r_rows, p - 1, dtype=torch.bool), m0, torch.zeros(r_rows, 1, dtype=torch.bool)], 1
        )
        fcs = self.text_hidden_fcs[0]
        pred_all = fcs(h)
        rows, cols = seg_mask.nonzero(as_tuple=True)  # row-major, as h[seg_mask]
        similarity, to_points, dtoc = sasp_fns
        emb = self.visual_model["image_encoder"](batch["images_sam"].permute(0, 3, 1, 2).to(dt))
        pe = self.visual_model["prompt_encoder"]
        dec = self.visual_model["mask_decoder"]
        results = []
        for r, c in zip(rows.tolist(), cols.tolist(), strict=False):
            start = int(
                (ids[r] == cfg.im_start_token_id).nonzero()[0, 0]
            )  # image tokens at start+1 .. start+P
            img = batch["conv_image"][r]
            H, W = (int(v) for v in batch["orig_hw"][img])
            nh, nw = (int(v) for v in batch["sam_input_hw"][img])
            sim = similarity(h[r, start + 1 : start + 1 + p], h[r, c])
            if cfg.sasp.enabled:
                pts, labs = to_points(sim, (H, W), **sasp_kw)
                pts = dtoc(sim, pts, (H, W)) if cfg.sasp.use_dtoc else pts.float()
                coords = pts * torch.tensor([nw / W, nh / H])
                sparse, dense = pe(points=(coords[None], labs[None].int()), boxes=None, masks=None)
            else:  # LISA (LISA.py model_forward): prompt_encoder(points=None, boxes=None, masks=None, text)
                pts = labs = None
                sparse, dense = pe(points=None, boxes=None, masks=None)
            sparse = torch.cat([sparse, pred_all[r, c][None, None]], 1).to(dt)
            low, _ = dec(
                image_embeddings=emb[img : img + 1],
                image_pe=pe.get_dense_pe().to(dt),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            s = cfg.sam.image_size
            m = F.interpolate(low.float(), (s, s), mode="bilinear", align_corners=False)[..., :nh, :nw]
            m = F.interpolate(m, (H, W), mode="bilinear", align_corners=False)[0, 0]
            results.append(
                {
                    "row": r,
                    "col": c,
                    "seg_hidden": h[r, c],
                    "pred_emb": pred_all[r, c],
                    "points": pts,
                    "labels": labs,
                    "mask": m,
                    "low": low[0, 0],
                }
            )
        return {"logits": logits, "labels": labels, "hidden": h, "image_embeddings": emb, "segs": results}


def torch_losses(out: dict, gts: list, weights=(1.0, 2.0, 0.5)):
    """READ's losses on the torch outputs: gts[i] is the GT mask (float [H, W]) of out['segs'][i]."""
    logits, labels = out["logits"], out["labels"]
    ce = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    bce = dice = 0.0
    n = len(gts)
    for s, g in zip(out["segs"], gts, strict=False):
        p = s["mask"]
        bce = bce + F.binary_cross_entropy_with_logits(p, g, reduction="none").mean()
        sig = p.sigmoid().flatten()
        gf = g.flatten()
        num = 2 * (sig / 1000 * gf).sum()
        den = (sig / 1000).sum() + (gf / 1000).sum()
        dice = dice + (1 - (num + 1e-6) / (den + 1e-6))
    bce = bce / (n + 1e-8)
    dice = dice / (n + 1e-8)
    total = weights[0] * ce + weights[1] * bce + weights[2] * dice
    return {"loss": total, "ce": ce, "bce": bce, "dice": dice}


def to_torch_batch(batch: dict) -> dict:
    return {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}


# ---- the end-to-end comparison -------------------------------------------------------------------------
def build_pair(cfg: ReadConfig, seed: int = 0):
    """(torch READ, read_jax `ReadModel` with the same weights), fp32.

    The released-layout weights go through `read_rules` + `clip_dir_rules` (the real converter's tables);
    the strict converter fills every leaf of the abstract model. Seeds torch's global generator.
    """
    tm = TorchRead(cfg, seed=seed).float()
    return tm, converted_model(cfg, tm)


def converted_model(cfg: ReadConfig, tm: TorchRead) -> ReadModel:
    """A `ReadModel` of `cfg` (its dtypes) holding `tm`'s weights, through the real converter's tables."""
    sd, clip_sd = tm.released_state_dict()
    model = nnx.eval_shape(lambda: ReadModel(cfg, rngs=nnx.Rngs(0)))
    conv = Converter(
        read_rules() + clip_dir_rules(),
        abstract_leaves(model),
        ignore=read_ignore(clip_given=True, sam_given=False) + clip_dir_ignore(),
    )
    load_leaves(model, conv.add_all(sd).add_all(clip_sd).finish())
    return model


def sasp_functions(cfg: ReadConfig):
    """READ's SasP steps as `TorchRead` takes them: (similarity, to_points, dtoc), from `torchref.sasp`, on
    `cfg`'s CLIP grid and crop (READ's 24 x 24 and 336, LISA's 16 x 16 and 224)."""
    from torchref import sasp as st

    sc = cfg.sasp

    def similarity(h_img, s):
        return st.compute_similarity_map(h_img[None], s[None])[0, :, 0]

    def to_points(sim, hw):
        return st.similarity_map_to_points(
            sim,
            hw,
            down_sample=cfg.clip.grid_size // sc.grid_size,
            num_points=sc.num_points,
            t_pos=sc.t_pos,
            t_neg=sc.t_neg,
            use_dtoc=False,
        )

    def dtoc(sim, pts, hw):
        full = st.get_similarity_map(sim[None, :, None], hw, torch.float32, cfg.clip.image_size)[0, :, :, 0]
        return st.discrete_to_continuous(full, pts.float())

    return similarity, to_points, dtoc


def torch_forward(cfg: ReadConfig, tm: TorchRead, batch: dict):
    """(torch batch, `tm`'s outputs) on a `torchref.read_batch.tiny_batch`, with `torchref.sasp` as READ's
    SasP functions."""
    tb = to_torch_batch({k: v for k, v in batch.items() if k not in ("masks", "mask_valid")})
    return tb, tm(tb, sasp_functions(cfg), {})
