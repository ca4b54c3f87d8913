"""READ end to end: LLaVA forward -> [SEG] hidden states -> text_hidden_fcs + SasP points -> SAM masks.

PyTorch reference: rui-qian/READ@2549240 `model/READ.py` (`model_forward` 435-598, `similarity_as_points`
600-898, `generate_pred_masks` 246-321, `evaluate` 900-1012); read_reference.md §1-§5.

Shape letters:
  B images, R conversation rows (each row uses image `conv_image[r]`), L input text length,
  E = L + P - 1 merged length, P = 576 image tokens, C LLM width, S = `max_segs` [SEG] slots per row,
  N = R * S prompts, Np SasP points, D = 256 SAM prompt width, h w SAM embedding grid,
  Hc Wc the static mask canvas (each mask's valid region is its image's original (H, W)).

What differs from the reference, on purpose (read_reference.md §13):
  * Every [SEG] of a row gets its own mask (the reference crashes on >= 2 [SEG]s in generation and
    mis-pairs image sizes with rows in mixed training batches, §3.8): each [SEG] uses the image tokens
    and the original size of its own row.
  * The `<im_start>` position is read per row from the merge, not the hard-coded 32001 of the first row.
  * Static shapes: S slots per row with validity `seg_valid`; rows without [SEG] produce no valid mask.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from read_jax import sasp as sasp_lib
from read_jax.config import ReadConfig
from read_jax.layers import Linear, kaiming_uniform_a_sqrt5
from read_jax.llava import LlavaModel, expanded_position
from read_jax.sam.sam import Sam
from read_jax.sam.transforms import apply_coords, get_preprocess_shape_jnp, postprocess_masks_padded
from read_jax.sharding import constrain

Array = jax.Array


class TextHiddenFcs(nnx.Module):
    """`text_hidden_fcs[0]`: Linear(C, C) -> ReLU -> Linear(C, 256) -> Dropout(0) (READ.py:149-161).

    Paths `text_hidden_fcs/layers/0` and `text_hidden_fcs/layers/1` hold the reference's `.0.0` and `.0.2`.
    Initialised like torch's default Linear (kaiming-uniform a=sqrt(5), bias U(+-1/sqrt(fan_in))), which is
    what READ gets when training from scratch.
    """

    def __init__(self, in_dim: int, out_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        def lin(i, o):
            layer = Linear(
                i,
                o,
                use_bias=True,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=kaiming_uniform_a_sqrt5,
                rngs=rngs,
            )
            bound = 1.0 / float(i) ** 0.5
            layer.bias[...] = jax.random.uniform(rngs.params(), (o,), param_dtype, -bound, bound)
            return layer

        self.layers = nnx.List([lin(in_dim, in_dim), lin(in_dim, out_dim)])

    def __call__(self, x: Array) -> Array:
        return self.layers[1](jax.nn.relu(self.layers[0](x)))


def seg_slots(input_ids: Array, seg_token_id: int, max_segs: int) -> tuple[Array, Array]:
    """Input indices of the first `max_segs` [SEG] tokens of each row (index 0 is never a [SEG] slot).

    Args:
      input_ids: int[R, L].
    Returns:
      (index int32[R, S], valid bool[R, S]); invalid slots hold index 1 (any in-range value).
    """
    r, l = input_ids.shape
    # The reference tests input_ids[:, 1:] (READ.py:436): the first token cannot be a [SEG] target.
    is_seg = (input_ids == seg_token_id) & (jnp.arange(l)[None] >= 1)
    rank = jnp.cumsum(is_seg, axis=1) - 1  # [R, L]
    slot = jnp.where(is_seg & (rank < max_segs), rank, max_segs)  # S = "discard"
    idx = jnp.full((r, max_segs + 1), 1, jnp.int32)
    idx = idx.at[jnp.arange(r)[:, None], slot].set(jnp.arange(l, dtype=jnp.int32)[None].repeat(r, 0))
    count = jnp.minimum(is_seg.sum(axis=1), max_segs)
    valid = jnp.arange(max_segs)[None] < count[:, None]
    return idx[:, :max_segs], valid


class ReadModel(nnx.Module):
    """The READ model: `llava` (CLIP + projector + LLaMA), `text_hidden_fcs`, `visual_model` (SAM).

    Args:
      cfg: ReadConfig.
      rngs: initialisation streams.
      attention_implementation: LLaMA attention backend (None = XLA; 'cudnn' on NVIDIA GPUs).
    """

    def __init__(self, cfg: ReadConfig, *, rngs: nnx.Rngs, attention_implementation: str | None = None):
        self.config = cfg
        self.llava = LlavaModel(cfg, rngs=rngs, attention_implementation=attention_implementation)
        self.text_hidden_fcs = TextHiddenFcs(
            cfg.llama.hidden_size,
            cfg.out_dim,
            dtype=cfg.llama.compute_dtype,
            param_dtype=cfg.llama.weight_dtype,
            rngs=rngs,
        )
        self.visual_model = Sam(cfg.sam, rngs=rngs)

    # ---- pieces ------------------------------------------------------------------------------------------
    def image_embeddings(self, images_sam: Array) -> Array:
        """SAM's encoder, frozen as in READ (no_grad) unless `freeze_vision_towers=False`:
        float[B, S, S, 3] -> float[B, h, w, D]."""
        emb = self.visual_model.image_encoder(images_sam)
        return jax.lax.stop_gradient(emb) if self.config.freeze_vision_towers else emb

    def seg_states(self, hidden: Array, input_ids: Array, image_start: Array):
        """[SEG] hidden states (at expanded position - 1) and the image-token hidden states of each row.

        Args:
          hidden: float[R, E, C] final-norm hidden states.
          input_ids: int[R, L]; image_start: int32[R] expanded index of each row's first image token.
        Returns:
          seg_hidden [R, S, C], seg_valid bool[R, S], seg_index int32[R, S] (expanded index of the [SEG]),
          image_hidden [R, P, C].
        """
        cfg = self.config
        p = cfg.clip.num_patches
        idx, valid = seg_slots(input_ids, cfg.seg_token_id, cfg.max_segs)
        pos = expanded_position(idx, image_start[:, None], p)  # [R, S]
        seg_hidden = jnp.take_along_axis(hidden, (pos - 1)[..., None], axis=1)  # [R, S, C]
        image_hidden = jax.vmap(lambda h, s: jax.lax.dynamic_slice_in_dim(h, s, p, axis=0))(
            hidden, image_start
        )
        return seg_hidden, valid, pos, image_hidden

    def masks_from_states(
        self,
        seg_hidden: Array,
        image_hidden: Array,
        seg_image: Array,
        orig_hw: Array,
        sam_input_hw: Array,
        image_emb: Array,
        canvas_hw: tuple[int, int],
        sasp_cfg=None,
        out_hw: Array | None = None,
    ) -> tuple[Array, dict]:
        """SasP points + SAM decoding for N prompts (flattened [SEG] slots).

        Args:
          seg_hidden: [N, C] the [SEG]-predicting hidden states; image_hidden: [N, P, C] of the same rows.
          seg_image: int32[N] image index of each prompt; orig_hw / sam_input_hw: int32[B, 2].
          image_emb: [B, h, w, D] SAM image embeddings; canvas_hw: static (Hc, Wc).
          sasp_cfg: override of `cfg.sasp` (evaluation sweeps).
          out_hw: int32[N, 2] size the logits are resampled to (default: the original size). The data pipeline
            downscales GT masks of images larger than the canvas; predictions then follow the GT's size.
        Returns:
          mask logits float32[N, Hc, Wc] (zero outside each mask's extent), aux dict.
        """
        cfg = self.config
        sasp_cfg = sasp_cfg or cfg.sasp
        hw = orig_hw[seg_image]  # [N, 2]
        pred_emb = self.text_hidden_fcs(seg_hidden)  # [N, D]
        points, labels, sasp_aux = sasp_lib.sasp(
            image_hidden,
            seg_hidden,
            hw,
            sasp_cfg,
            clip_grid=cfg.clip.grid_size,
            clip_size=cfg.clip.image_size,
        )
        # To the SAM input frame (ResizeLongestSide.apply_coords); keeps DtoC's gradient.
        coords = apply_coords(points.astype(jnp.float32), hw, cfg.sam.image_size)
        pe = self.visual_model.prompt_encoder
        sparse, dense = pe(coords, labels, text_embeds=pred_emb[:, None, :])
        low, _ = self.visual_model.mask_decoder(
            image_emb[seg_image], pe.get_dense_pe(), sparse, dense, multimask_output=False
        )  # [N, 1, 4h, 4w]
        out_hw = hw if out_hw is None else out_hw
        masks = postprocess_masks_padded(low, sam_input_hw[seg_image], out_hw, canvas_hw, cfg.sam.image_size)[
            :, 0
        ]
        aux = {
            "sasp/points": points,
            "sasp/labels": labels,
            "sasp/sim": sasp_aux["sim"],
            "sam/low_res_masks": low[:, 0],
            "read/pred_embeddings": pred_emb,
        }
        return masks, aux

    # ---- forward -----------------------------------------------------------------------------------------
    def __call__(
        self,
        batch: dict,
        *,
        canvas_hw: tuple[int, int] | None = None,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
        compute_masks: bool = True,
        sasp_cfg=None,
    ) -> tuple[dict, dict]:
        """Teacher-forced forward (training, validation, the ReasonSeg protocol).

        Args:
          batch: dict with
            images_clip float[B, 336, 336, 3], images_sam float[B, S, S, 3] (normalised, padded),
            sam_input_hw int32[B, 2] (resized extent), orig_hw int32[B, 2] (original H, W),
            input_ids int32[R, L] (right padded), attention_mask bool[R, L], conv_image int32[R],
            optional labels int32[R, L], optional conv_valid bool[R], optional mask_hw int32[R, 2] (the GT
            extent inside the canvas when the pipeline had to downscale a large image; default orig size).
            Host-only entries (strings) must be dropped before the call.
          canvas_hw: static (Hc, Wc) >= every original size of the batch; default: the SAM frame.
          deterministic / rngs: LoRA dropout.
          compute_masks: False skips SAM (text-only forward).
        Returns:
          outputs: logits [R, E, V] (fp32), labels [R, E] (merged, if given), mask_logits float32[R, S, Hc, Wc],
            seg_valid bool[R, S], pixel_valid bool[R, S, Hc, Wc] is NOT materialised (see `pixel_valid`).
          aux: named intermediates ('llava/hidden', 'read/seg_hidden', 'sasp/points', 'sasp/labels',
            'sasp/sim', 'sam/low_res_masks', ...).
        """
        cfg = self.config
        input_ids = batch["input_ids"]
        conv_image = batch.get("conv_image")
        if conv_image is None:
            conv_image = jnp.arange(input_ids.shape[0], dtype=jnp.int32)
        out, merged = self.llava(
            input_ids,
            batch["images_clip"],
            batch.get("attention_mask"),
            conv_image,
            batch.get("labels"),
            deterministic=deterministic,
            rngs=rngs,
        )
        hidden = constrain(out.hidden_states, ("act_batch", "act_len", "act_emb"))
        outputs = {"logits": out.logits, "labels": merged.labels}
        aux = {"llava/hidden": hidden, "llava/image_token_start": merged.image_token_start}
        if not compute_masks:
            return outputs, aux

        seg_hidden, seg_valid, seg_pos, image_hidden = self.seg_states(
            hidden, input_ids, merged.image_token_start
        )
        if "conv_valid" in batch:
            seg_valid = seg_valid & batch["conv_valid"][:, None]
        r, s = seg_valid.shape
        canvas_hw = canvas_hw or (cfg.sam.image_size, cfg.sam.image_size)
        image_emb = self.image_embeddings(batch["images_sam"])  # once per image
        n_img = jnp.repeat(image_hidden, s, axis=0)  # [N, P, C]
        seg_image = jnp.repeat(conv_image, s)
        out_hw = batch.get("mask_hw")
        out_hw = None if out_hw is None else jnp.repeat(out_hw, s, axis=0)
        masks, m_aux = self.masks_from_states(
            seg_hidden.reshape(r * s, -1),
            n_img,
            seg_image,
            batch["orig_hw"],
            batch["sam_input_hw"],
            image_emb,
            canvas_hw,
            sasp_cfg,
            out_hw,
        )
        outputs["mask_logits"] = masks.reshape(r, s, *canvas_hw)
        outputs["seg_valid"] = seg_valid
        aux.update({k: v.reshape(r, s, *v.shape[1:]) for k, v in m_aux.items()})
        aux.update({"read/seg_hidden": seg_hidden, "read/seg_index": seg_pos, "read/seg_image": conv_image})
        return outputs, aux


def pixel_valid(orig_hw: Array, canvas_hw: tuple[int, int]) -> Array:
    """bool[..., Hc, Wc]: inside the original (H, W) of each entry of `orig_hw` int[..., 2]."""
    ys = jnp.arange(canvas_hw[0])
    xs = jnp.arange(canvas_hw[1])
    return (ys[:, None] < orig_hw[..., 0, None, None]) & (xs[None, :] < orig_hw[..., 1, None, None])


def sam_input_hw(orig_hw: Array, image_size: int) -> Array:
    """Resized extent inside the SAM frame for original sizes int[..., 2] (traceable)."""
    return get_preprocess_shape_jnp(orig_hw, image_size)


def batch_loss(outputs: dict, batch: dict, weights=None) -> tuple[Array, dict]:
    """READ's loss for a teacher-forced batch (`ReadModel.__call__` outputs).

    GT masks come per [SEG] slot: `batch["masks"]` uint8[R, S', Hc, Wc] (or [R, Hc, Wc] for S' = 1, the
    usual one-[SEG]-per-conversation case) on the same canvas as the predictions, with `batch["mask_valid"]`
    bool[R, S'] (or [R]). Training targets are `mask == 1` (READ's reason_seg_dataset: 255 -> 0).
    Slots beyond S' or without a predicted [SEG] are not supervised.
    """
    from read_jax.losses import LossWeights, cell_coverage, read_loss, similarity_loss

    weights = weights or LossWeights()
    gt = batch["masks"]
    mvalid = batch["mask_valid"]
    if gt.ndim == 3:
        gt, mvalid = gt[:, None], mvalid[:, None]
    r, s_gt = mvalid.shape
    canvas = gt.shape[-2:]
    logits = outputs["mask_logits"][:, :s_gt]  # [R, S', Hc, Wc]
    if logits.shape[-2:] != canvas:
        raise ValueError(f"mask canvas {logits.shape[-2:]} != GT canvas {canvas}")
    valid = mvalid & outputs["seg_valid"][:, :s_gt]
    conv_image = batch.get("conv_image")
    if conv_image is None:
        conv_image = jnp.arange(r)
    extent = batch["mask_hw"] if "mask_hw" in batch else batch["orig_hw"][conv_image]
    pv = pixel_valid(extent, canvas)[:, None]  # [R, 1, Hc, Wc]
    pv = jnp.broadcast_to(pv, logits.shape)
    loss, metrics = read_loss(
        outputs["logits"],
        outputs["labels"],
        logits.reshape(r * s_gt, *canvas),
        (gt == 1).reshape(r * s_gt, *canvas),
        pv.reshape(r * s_gt, *canvas),
        valid.reshape(-1),
        weights,
    )
    if weights.sim:
        if "sim_logits" not in outputs:
            raise ValueError("weights.sim > 0 needs outputs['sim_logits'] (the scaled SasP similarity map)")
        sim = outputs["sim_logits"][:, :s_gt]  # [R, S', P]
        grid = math.isqrt(sim.shape[-1])
        orig = jnp.repeat(batch["orig_hw"][conv_image], s_gt, axis=0)
        cov = cell_coverage(
            (gt == 1).reshape(r * s_gt, *canvas), jnp.repeat(extent, s_gt, axis=0), orig, grid
        )
        sim_l = similarity_loss(sim.reshape(r * s_gt, -1), cov, valid.reshape(-1))
        loss = loss + weights.sim * sim_l
        metrics = {**metrics, "loss": loss, "sim": sim_l}
    return loss, metrics
