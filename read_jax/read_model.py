"""READ end to end: LLaVA forward -> [SEG] hidden states -> text_hidden_fcs + SasP points -> SAM masks.

PyTorch reference: rui-qian/READ@2549240 `model/READ.py` (`model_forward` 435-598, `similarity_as_points`
600-898, `generate_pred_masks` 246-321, `evaluate` 900-1012); read_reference.md §1-§5.

The model's contract is typed: `ReadModel.__call__` returns a `ReadOutput` (text logits in the form asked for,
final hidden states, the [SEG] states, and the per-[SEG] `MaskOutput`), and `ReadModel.masks_from_states` is
the one mask path (SasP points -> SAM prompt encoder -> mask decoder -> masks at a requested size) that
training,
evaluation, inference and the points-only analysis all call. Losses live in `read_jax.losses`.

Shape letters:
  B images, R conversation rows (each row uses image `conv_image[r]`), L input text length,
  E = L + P - 1 merged length, P image tokens (576 at full size), C LLM width, S = `max_segs` [SEG] slots per
  row,
  N = R * S prompts, Np SasP points, D SAM prompt width, l low-res mask side, V vocabulary,
  K supervised text positions kept (`max_supervised`), Hc Wc a static mask canvas (each mask valid in its
  output extent, by default its image's original (H, W)).

What differs from the reference, on purpose (read_reference.md §13):
  * Every [SEG] of a row gets its own mask (the reference crashes on >= 2 [SEG]s in generation and
    mis-pairs image sizes with rows in mixed training batches, §3.8): each [SEG] uses the image tokens
    and the original size of its own row.
  * The `<im_start>` position is read per row from the merge, not the hard-coded 32001 of the first row.
  * Static shapes: S slots per row with validity `SegStates.valid`; rows without [SEG] produce no valid mask.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx, struct

from read_jax import sasp as sasp_lib
from read_jax.config import IGNORE_INDEX, ReadConfig, SaspConfig
from read_jax.data.preprocess import apply_resize_tables, sam_normalize
from read_jax.layers import Linear, kaiming_uniform_a_sqrt5, set_attention_implementation
from read_jax.llava import LlavaModel, expanded_position
from read_jax.sam.sam import Sam
from read_jax.sam.transforms import apply_coords, postprocess_masks_padded
from read_jax.sharding import constrain

Array = jax.Array
LogitsMode = Literal["full", "supervised", "none"]


# ----------------------------------------------------------------------------------------------------
# The typed outputs
# ----------------------------------------------------------------------------------------------------
@struct.dataclass
class SupervisedLogits:
    """Text logits at the batch's supervised positions only (`logits="supervised"`).

    The text loss needs logits only where a label is supervised (the answers, ~10-30 tokens a row), while the
    full [R, E, V] projection is most of a small model's step at V = 32003. Row k holds the projection of the
    hidden state that predicts `targets[k]` (the first K supervised positions of the batch, row-major).

    logits: float32[K, V]; targets: int32[K] (IGNORE_INDEX in unused slots); dropped: int32[] supervised
    positions beyond K (not in the loss).
    """

    logits: Array
    targets: Array
    dropped: Array


@struct.dataclass
class SegStates:
    """The [SEG] slots of each row and the image-token states they are compared with.

    hidden: [R, S, C] hidden state that predicts each [SEG] (expanded position - 1); valid: bool[R, S];
    index: int32[R, S] expanded index of the [SEG]; image_hidden: [R, P, C] the row's image-token states.
    """

    hidden: Array
    valid: Array
    index: Array
    image_hidden: Array


@struct.dataclass
class MaskOutput:
    """What `masks_from_states` computes for each prompt (leading dims [N], or [R, S] inside `ReadOutput`).

    pred_embeddings: [.., D] the [SEG] state through text_hidden_fcs; points: float32[.., Np, 2] (x, y) SasP
    points in original-image pixels; point_labels: int32[.., Np] (1 positive, 0 negative, -1 not a point);
    similarity: [.., P] the raw [SEG] . image-token similarity; low_res_logits: float32[.., l, l] SAM's
    decoder output; mask_logits: float32[.., Hc, Wc] at the requested size (zero outside each extent), or None
    when no canvas was asked for.
    """

    pred_embeddings: Array
    points: Array
    point_labels: Array
    similarity: Array
    low_res_logits: Array
    mask_logits: Array | None = None


@struct.dataclass
class ReadOutput:
    """`ReadModel.__call__`'s result.

    hidden: [R, E, C] final-norm hidden states; image_token_start: int32[R] expanded index of each row's first
    image token; labels: int32[R, E] merged labels (None without `batch["labels"]`); logits: float32[R, E, V]
    (`logits="full"`, else None); supervised: `SupervisedLogits` (`logits="supervised"`, else None);
    seg: `SegStates` and masks: `MaskOutput` with leading dims [R, S] (None with `compute_masks=False`).
    """

    hidden: Array
    image_token_start: Array
    labels: Array | None = None
    logits: Array | None = None
    supervised: SupervisedLogits | None = None
    seg: SegStates | None = None
    masks: MaskOutput | None = None


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

    Build it with `read_jax.build.build_model(cfg)` (LoRA attached where the config says).

    Args:
      cfg: ReadConfig.
      rngs: initialisation streams.
      attention_implementation: the attention kernel of LLaMA, CLIP and SAM (default
        `cfg.attention_implementation`; see `read_jax.layers.attention_backend`).
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
        set_attention_implementation(self, attention_implementation or cfg.attention_implementation)

    # ---- pieces ------------------------------------------------------------------------------------------
    def image_embeddings(
        self, images_sam: Array, sam_input_hw: Array | None = None, sam_resize: Array | None = None
    ) -> Array:
        """SAM's encoder, frozen as in READ (no_grad) unless `freeze_vision_towers=False`.

        Args:
          images_sam: [B, S, S, 3]: uint8 (`preprocess.sam_pixels`, normalised here on the device, which
            needs `sam_input_hw` int[B, 2], the resized extents) or floats already normalised and padded.
          sam_resize: int32[B, 2, S, 4] (uint8 images only): PIL's resize tables of the data pipeline (an
            image that fits in the frame ships at its own size and is resized here, `apply_resize_tables`).
        Returns:
          float[B, h, w, D].
        """
        if images_sam.dtype == jnp.uint8:
            if sam_input_hw is None:
                raise ValueError(
                    "uint8 images_sam need sam_input_hw (the padding is zeroed after normalising)"
                )
            if sam_resize is not None:
                images_sam = apply_resize_tables(images_sam, sam_resize)
            s = self.config.sam
            images_sam = sam_normalize(images_sam, sam_input_hw, s.pixel_mean, s.pixel_std)
        emb = self.visual_model.image_encoder(images_sam)
        return jax.lax.stop_gradient(emb) if self.config.freeze_vision_towers else emb

    def seg_states(self, hidden: Array, input_ids: Array, image_start: Array) -> SegStates:
        """[SEG] hidden states (at expanded position - 1) and the image-token hidden states of each row.

        Args:
          hidden: float[R, E, C] final-norm hidden states.
          input_ids: int[R, L]; image_start: int32[R] expanded index of each row's first image token.
        """
        cfg = self.config
        p = cfg.clip.num_patches
        idx, valid = seg_slots(input_ids, cfg.seg_token_id, cfg.max_segs)
        pos = expanded_position(idx, image_start[:, None], p)  # [R, S]
        seg_hidden = jnp.take_along_axis(hidden, (pos - 1)[..., None], axis=1)  # [R, S, C]
        image_hidden = jax.vmap(lambda h, s: jax.lax.dynamic_slice_in_dim(h, s, p, axis=0))(
            hidden, image_start
        )
        return SegStates(hidden=seg_hidden, valid=valid, index=pos, image_hidden=image_hidden)

    def supervised_logits(self, hidden: Array, labels: Array, max_tokens: int) -> SupervisedLogits:
        """The lm_head applied at no more than `max_tokens` supervised positions of the batch.

        When the batch has more, every row keeps the same share: its first supervised positions, taken in
        turn across rows (a row's j-th target before any row's (j+1)-th), so no row is left without a text
        loss (the first `max_tokens` in row order would drop the last rows whole). The kept positions come
        out in row order, the supervised ones first.

        Args:
          hidden: [R, E, C]; labels: int32[R, E] merged labels (position t predicts label t + 1).
        """
        c = hidden.shape[-1]
        rows, cols = labels.shape[0], labels.shape[1] - 1
        h = hidden[:, :-1].reshape(-1, c)
        valid2 = labels[:, 1:] != IGNORE_INDEX  # [R, E-1]
        targets = labels[:, 1:].reshape(-1)
        k = min(int(max_tokens), targets.shape[0])
        valid = valid2.reshape(-1)
        rank = jnp.cumsum(valid2, axis=1) - 1  # j: the row's j-th supervised target
        turn = jnp.where(valid2, rank * rows + jnp.arange(rows)[:, None], rows * cols).reshape(-1)
        chosen = jnp.zeros_like(valid).at[jnp.argsort(turn, stable=True)[:k]].set(True) & valid
        order = jnp.argsort(~chosen, stable=True)[:k]  # the kept supervised positions first, in order  [K]
        kept = chosen[order]
        logits = self.llava.language_model.lm_head(h[order]).astype(jnp.float32)  # [K, V]
        return SupervisedLogits(
            logits=logits,
            targets=jnp.where(kept, targets[order], IGNORE_INDEX).astype(jnp.int32),
            dropped=(valid.sum() - kept.sum()).astype(jnp.int32),
        )

    def masks_from_states(
        self,
        seg_hidden: Array,
        image_hidden: Array,
        seg_image: Array,
        orig_hw: Array,
        sam_input_hw: Array,
        image_emb: Array,
        *,
        canvas_hw: tuple[int, int] | None = None,
        out_hw: Array | None = None,
        sasp_cfg: SaspConfig | None = None,
        text_prompt: bool = True,
        sam: Sam | None = None,
    ) -> MaskOutput:
        """The one mask path: SasP points (+ the [SEG] prompt token) -> SAM decoding -> masks, for N prompts.

        Args:
          seg_hidden: [N, C] the [SEG]-predicting hidden states; image_hidden: [N, P, C] of the same rows.
          seg_image: int32[N] image index of each prompt; orig_hw / sam_input_hw: int32[B, 2].
          image_emb: [B, h, w, D] SAM image embeddings.
          canvas_hw: static (Hc, Wc) of the output masks; None: only the low-res logits.
          out_hw: int32[N, 2] size each mask is resampled to inside the canvas (default: its original size;
            the data pipeline downscales the GT of images larger than its canvas, and predictions follow it).
          sasp_cfg: override of `cfg.sasp` (evaluation sweeps, the points-only analysis). With
            `enabled=False` SAM gets the [SEG] token alone; points are then all zeros with label -1 (none).
          text_prompt: False prompts SAM with the points only (Appendix B "points as prompt").
          sam: another SAM for the prompt encoder + mask decoder (default: the model's own).
        """
        cfg = self.config
        sasp_cfg = sasp_cfg or cfg.sasp
        sam = self.visual_model if sam is None else sam
        hw = orig_hw[seg_image]  # [N, 2]
        pred_emb = self.text_hidden_fcs(seg_hidden)  # [N, D]
        pe = sam.prompt_encoder
        text = pred_emb[:, None, :] if text_prompt else None
        if sasp_cfg.enabled:
            points, labels, sasp_aux = sasp_lib.sasp(
                image_hidden,
                seg_hidden,
                hw,
                sasp_cfg,
                clip_grid=cfg.clip.grid_size,
                clip_size=cfg.clip.image_size,
            )
            sim = sasp_aux["sim"]
            # To the SAM input frame (ResizeLongestSide.apply_coords); keeps DtoC's gradient.
            coords = apply_coords(points.astype(jnp.float32), hw, cfg.sam.image_size)
            sparse, dense = pe(coords, labels, text_embeds=text)
        else:
            # SasP off: the [SEG] embedding is SAM's only prompt (LISA/SESAME); no point carries a position.
            if not text_prompt:
                raise ValueError("points-only prompting (text_prompt=False) needs SasP enabled")
            sim = sasp_lib.similarity(image_hidden, seg_hidden, dtype=sasp_cfg.similarity_dtype)
            n, q = seg_hidden.shape[0], sasp_cfg.num_points
            points, labels = jnp.zeros((n, q, 2), jnp.float32), jnp.full((n, q), -1, jnp.int32)
            sparse, dense = pe(None, None, text_embeds=text)
        low, _ = sam.mask_decoder(
            image_emb[seg_image], pe.get_dense_pe(), sparse, dense, multimask_output=False
        )  # [N, 1, l, l]
        masks = None
        if canvas_hw is not None:
            out_hw = hw if out_hw is None else out_hw
            masks = postprocess_masks_padded(
                low, sam_input_hw[seg_image], out_hw, canvas_hw, cfg.sam.image_size
            )[:, 0]
        return MaskOutput(
            pred_embeddings=pred_emb,
            points=points,
            point_labels=labels,
            similarity=sim,
            low_res_logits=low[:, 0],
            mask_logits=masks,
        )

    # ---- forward -----------------------------------------------------------------------------------------
    def __call__(
        self,
        batch: dict,
        *,
        canvas_hw: tuple[int, int] | None = None,
        logits: LogitsMode = "full",
        max_supervised: int = 0,
        compute_masks: bool = True,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
        sasp_cfg: SaspConfig | None = None,
    ) -> ReadOutput:
        """Teacher-forced forward (training, validation, the ReasonSeg protocol, inference's final pass).

        Args:
          batch: dict with
            images_clip uint8[B, Sc, Sc, 3] and images_sam uint8[B, S, S, 3] (zero-padded), normalised on
            the device (floats are taken as already normalised),
            sam_input_hw int32[B, 2] (resized extent), optional sam_resize int32[B, 2, S, 4] (the pipeline's
            device resize of images_sam, `image_embeddings`), orig_hw int32[B, 2] (original H, W),
            input_ids int32[R, L] (right padded), attention_mask bool[R, L], conv_image int32[R],
            optional labels int32[R, L], optional conv_valid bool[R], optional mask_hw int32[R, 2] (the GT
            extent inside the canvas when the pipeline had to downscale a large image; default orig size).
            Host-only entries (strings) must be dropped before the call.
          canvas_hw: static (Hc, Wc) >= every mask extent of the batch; default: the SAM frame.
          logits: "full" ([R, E, V]), "supervised" (`SupervisedLogits` of at most `max_supervised` positions;
            needs labels) or "none" (the text loss is off: XLA then drops the lm_head altogether).
          compute_masks: False skips SAM (text-only forward).
          deterministic / rngs: dropout (LoRA's).
          sasp_cfg: override of `cfg.sasp`.
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
        result = ReadOutput(hidden=hidden, image_token_start=merged.image_token_start, labels=merged.labels)
        if logits == "full":
            result = result.replace(logits=out.logits)
        elif logits == "supervised":
            if merged.labels is None or max_supervised < 1:
                raise ValueError('logits="supervised" needs batch["labels"] and max_supervised >= 1')
            result = result.replace(supervised=self.supervised_logits(hidden, merged.labels, max_supervised))
        elif logits != "none":
            raise ValueError(f"logits must be 'full', 'supervised' or 'none', got {logits!r}")
        if not compute_masks:
            return result

        seg = self.seg_states(hidden, input_ids, merged.image_token_start)
        if "conv_valid" in batch:
            seg = seg.replace(valid=seg.valid & batch["conv_valid"][:, None])
        r, s = seg.valid.shape
        canvas_hw = canvas_hw or (cfg.sam.image_size, cfg.sam.image_size)
        out_hw = batch.get("mask_hw")
        masks = self.masks_from_states(
            seg.hidden.reshape(r * s, -1),
            jnp.repeat(seg.image_hidden, s, axis=0),  # [N, P, C]
            jnp.repeat(conv_image, s),
            batch["orig_hw"],
            batch["sam_input_hw"],
            self.image_embeddings(batch["images_sam"], batch["sam_input_hw"], batch.get("sam_resize")),
            canvas_hw=canvas_hw,
            out_hw=None if out_hw is None else jnp.repeat(out_hw, s, axis=0),
            sasp_cfg=sasp_cfg,
        )
        masks = jax.tree.map(lambda v: v.reshape(r, s, *v.shape[1:]), masks)
        return result.replace(seg=seg, masks=masks)
