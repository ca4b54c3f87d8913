"""LLaVA-1.5: the mlp2x_gelu projector, the multimodal merge, and `LlavaModel` = CLIP + projector + LLaMA.

PyTorch reference: READ/SESAME `model/llava/model/llava_arch.py` (`LlavaMetaForCausalLM.encode_images`,
`prepare_inputs_labels_for_multimodal`, lines 111-336), `model/llava/model/multimodal_projector/builder.py`
(`mlp2x_gelu`, lines 33-46) and `model/READ.py:476-486` (CLIP features repeated per conversation row).
read_reference.md §1, §2.2, §2.4, §2.5, §4.

The merge. Every conversation row holds exactly one `<image>` placeholder (id -200), written
`<im_start> <image> <im_end>`. The placeholder is replaced *in place* by the P projected CLIP tokens, so text
after it shifts by P - 1 (575) and the row grows from L to E = L + P - 1. The reference builds the rows with
Python lists and `torch.cat`; here the placeholder index is traced and the merged row is a gather (each output
slot computes which input it comes from), so shapes are static and one compile serves every batch of a shape.

Padding. The reference prepends P - 1 `True`s to the attention mask (`llava_arch.py`), which is right only
when everything before the image is real text, i.e. right padding (training). Here the mask is gathered like
the embeddings (image slots take the placeholder's mask bit), which equals the reference for right padding and
is also right for left padding (generation): pads stay masked wherever they are. Positions are
`cumsum(mask) - 1`, i.e. `arange` on the real tokens of a right-padded row (HF's default `position_ids`) and
the unpadded positions for a left-padded one.

Shape letters:
  B images, R conversation rows (R >= B: each image may carry several conversations), L input length,
  P image tokens per image (576), E = L + P - 1 merged length, C LLM width (4096), V vision width (1024),
  h w pixels.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from read_jax.clip import ClipVisionModel
from read_jax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, ReadConfig
from read_jax.data.preprocess import clip_normalize
from read_jax.layers import gelu_exact
from read_jax.llama import LlamaForCausalLM, LlamaOutput
from read_jax.llama_generate import generate as llama_generate

Array = jax.Array


# ---- projector ---------------------------------------------------------------------------------------------
class MmProjector(nnx.Module):
    """LLaVA's `mlp2x_gelu`: Linear(V -> C), exact GELU, Linear(C -> C); or LLaVA-v1's single Linear(V -> C)
    (`kind="linear"`, the projector of LISA's own code).

    `layers` keeps the torch `nn.Sequential` indices (0 and 2; index 1 is the parameter-free GELU), so the
    checkpoint keys `model.mm_projector.{0,2}.{weight,bias}` map to `mm_projector/layers/{0,2}/{kernel,bias}`;
    the linear one's `model.mm_projector.{weight,bias}` map to `mm_projector/layers/0/{kernel,bias}`.
    """

    def __init__(
        self, in_features: int, out_features: int, *, dtype, param_dtype, rngs: nnx.Rngs, kind="mlp2x_gelu"
    ):
        lin = functools.partial(nnx.Linear, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if kind == "linear":
            self.layers = nnx.List([lin(in_features, out_features)])
        else:
            self.layers = nnx.List(
                [lin(in_features, out_features), gelu_exact, lin(out_features, out_features)]
            )

    def __call__(self, x: Array) -> Array:
        """float[..., V] -> float[..., C]."""
        for f in self.layers:
            x = f(x)
        return x


# ---- the merge (pure functions) ----------------------------------------------------------------------------
@flax.struct.dataclass
class MergedInputs:
    """The LLM's view of a multimodal batch (all [R, E, ...] with E = L + P - 1).

    inputs_embeds: [R, E, C] text embeddings with the P image tokens in place of `<image>`.
    attention_mask: bool[R, E], False on padding (left or right).
    positions: int32[R, E] RoPE positions, `max(cumsum(mask) - 1, 0)`.
    labels: int32[R, E] with P IGNORE_INDEX (-100) labels on the image tokens, or None if no labels given.
    image_token_start: int32[R], expanded index of the first image token (= index of `<im_start>` + 1 = the
      input index of the `<image>` placeholder); the image tokens occupy [start, start + P).
    """

    inputs_embeds: Array
    attention_mask: Array
    positions: Array
    labels: Array | None
    image_token_start: Array


def expanded_position(input_index: Array, image_pos: Array, num_patches: int) -> Array:
    """Where an input token lands in the merged sequence.

    Args:
      input_index: int[...] index into the [R, L] input row (must not be the placeholder itself).
      image_pos: int[...] (broadcastable) input index of the row's `<image>` placeholder
        (`MergedInputs.image_token_start`).
      num_patches: P.
    Returns:
      int[...]: `input_index` before the image, `input_index + P - 1` after it (READ gathers [SEG] hidden
      states at `expanded_position(seg) - 1`, read_reference.md §2.5).
    """
    return jnp.where(input_index > image_pos, input_index + (num_patches - 1), input_index)


def merge_multimodal(
    input_ids: Array,
    text_embeds: Array,
    image_features: Array,
    attention_mask: Array | None = None,
    labels: Array | None = None,
    *,
    image_token_index: int = IMAGE_TOKEN_INDEX,
) -> MergedInputs:
    """Replace each row's `<image>` placeholder by its image tokens (static shapes, jit-friendly).

    Args:
      input_ids: int[R, L] with exactly one `image_token_index` per row (validate on the host with
        `validate_multimodal_inputs`; under jit a row without one would silently use index 0).
      text_embeds: [R, L, C] token embeddings of `input_ids` (the placeholder's row is ignored).
      image_features: [R, P, C] projected image tokens, already repeated per conversation row.
      attention_mask: bool/int[R, L], 1 on real tokens (None: no padding).
      labels: int[R, L] next-token targets with IGNORE_INDEX on unsupervised tokens, or None.
      image_token_index: the placeholder id (-200).
    Returns:
      MergedInputs with E = L + P - 1.
    """
    r, seq_len = input_ids.shape
    p = image_features.shape[1]
    e = seq_len + p - 1
    if attention_mask is None:
        attention_mask = jnp.ones((r, seq_len), bool)
    image_pos = jnp.argmax(input_ids == image_token_index, axis=1).astype(jnp.int32)  # [R]
    j = jnp.arange(e, dtype=jnp.int32)[None]  # [1, E] output slot
    rel = j - image_pos[:, None]  # [R, E] offset from the first image token
    in_image = (rel >= 0) & (rel < p)  # [R, E]
    # Source index into the text row: identity before the image, shifted back by P - 1 after it; image slots
    # point at the placeholder (its mask bit is the image tokens' mask bit, its embedding is discarded).
    text_src = jnp.where(rel < 0, j, jnp.where(in_image, image_pos[:, None], j - (p - 1)))  # [R, E]
    img_src = jnp.clip(rel, 0, p - 1)  # [R, E]

    text_part = jnp.take_along_axis(text_embeds, text_src[..., None], axis=1)  # [R, E, C]
    img_part = jnp.take_along_axis(image_features.astype(text_embeds.dtype), img_src[..., None], axis=1)
    embeds = jnp.where(in_image[..., None], img_part, text_part)  # [R, E, C]
    mask = jnp.take_along_axis(attention_mask.astype(bool), text_src, axis=1)  # [R, E]
    positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
    if labels is not None:
        labels = jnp.where(in_image, IGNORE_INDEX, jnp.take_along_axis(labels, text_src, axis=1))
        labels = labels.astype(jnp.int32)
    return MergedInputs(
        inputs_embeds=embeds,
        attention_mask=mask,
        positions=positions,
        labels=labels,
        image_token_start=image_pos,
    )


def validate_multimodal_inputs(
    input_ids,
    *,
    num_images: int,
    image_row_index=None,
    num_patches: int,
    max_positions: int,
    max_new_tokens: int = 0,
    image_token_index: int = IMAGE_TOKEN_INDEX,
    im_start_token_id: int | None = None,
    im_end_token_id: int | None = None,
    attention_mask=None,
) -> None:
    """Host-side checks of a multimodal batch; raises ValueError naming the problem (call before jit).

    Args:
      input_ids: int[R, L] (numpy or concrete jax array).
      num_images: B, the number of images in the batch.
      image_row_index: int[R], the image of each row, or None for one row per image (R == B).
      num_patches: P; max_positions: the LLM's max_position_embeddings; max_new_tokens: decode budget.
      im_start_token_id, im_end_token_id: if given, the placeholder must sit between these two tokens.
      attention_mask: if given, the placeholder must be a real (unmasked) token.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [R, L], got shape {ids.shape}")
    r, seq_len = ids.shape
    counts = (ids == image_token_index).sum(axis=1)
    bad = np.nonzero(counts != 1)[0]
    if bad.size:
        raise ValueError(
            f"each row needs exactly one <image> placeholder ({image_token_index}); rows "
            f"{bad.tolist()} have {counts[bad].tolist()}"
        )
    pos = (ids == image_token_index).argmax(axis=1)
    if im_start_token_id is not None:
        before = np.where(pos > 0, ids[np.arange(r), np.maximum(pos - 1, 0)], -1)
        bad = np.nonzero(before != im_start_token_id)[0]
        if bad.size:
            raise ValueError(
                f"rows {bad.tolist()}: <image> is not preceded by <im_start> ({im_start_token_id})"
            )
    if im_end_token_id is not None:
        after = np.where(pos < seq_len - 1, ids[np.arange(r), np.minimum(pos + 1, seq_len - 1)], -1)
        bad = np.nonzero(after != im_end_token_id)[0]
        if bad.size:
            raise ValueError(f"rows {bad.tolist()}: <image> is not followed by <im_end> ({im_end_token_id})")
    if attention_mask is not None:
        m = np.asarray(attention_mask)
        if m.shape != (r, seq_len):
            raise ValueError(f"attention_mask shape {m.shape} != input_ids shape {(r, seq_len)}")
        bad = np.nonzero(~m[np.arange(r), pos].astype(bool))[0]
        if bad.size:
            raise ValueError(f"rows {bad.tolist()}: the <image> placeholder is masked out as padding")
    if image_row_index is None:
        if r != num_images:
            raise ValueError(
                f"{r} rows with an <image> placeholder but {num_images} images; pass "
                "image_row_index to share an image between conversations"
            )
    else:
        idx = np.asarray(image_row_index)
        if idx.shape != (r,):
            raise ValueError(f"image_row_index must have shape ({r},) (one image per row), got {idx.shape}")
        bad = np.nonzero((idx < 0) | (idx >= num_images))[0]
        if bad.size:
            raise ValueError(f"image_row_index rows {bad.tolist()} point outside the {num_images} images")
    merged = seq_len + num_patches - 1
    if merged + max_new_tokens > max_positions:
        extra = f" + {max_new_tokens} new tokens" if max_new_tokens else ""
        raise ValueError(
            f"sequence length {seq_len} expands to {merged} with the {num_patches} image tokens"
            f"{extra}, beyond the position budget max_position_embeddings={max_positions}"
        )


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


# ---- the model ---------------------------------------------------------------------------------------------
class LlavaModel(nnx.Module):
    """LLaVA-1.5 as READ uses it: `vision_tower` (frozen CLIP), `mm_projector`, `language_model` (LLaMA).

    NNX paths: `vision_tower/vision_model/...`, `mm_projector/layers/{0,2}/...`,
    `language_model/model/layers/N/...`, `language_model/lm_head/kernel`.

    Args:
      cfg: a ReadConfig (uses `llama`, `clip` and the special token ids).
      rngs: `params` stream for initialisation.
      attention_implementation: forwarded to LLaMA's attention (None = XLA, 'cudnn' on NVIDIA GPUs).
    """

    def __init__(self, cfg: ReadConfig, *, rngs: nnx.Rngs, attention_implementation: str | None = None):
        self.config = cfg
        self.vision_tower = ClipVisionModel(cfg.clip, rngs=rngs)
        # The projector belongs to the LLM in the reference (bf16 with it), hence the LLaMA dtypes.
        self.mm_projector = MmProjector(
            cfg.mm_hidden_size,
            cfg.llama.hidden_size,
            dtype=cfg.llama.compute_dtype,
            param_dtype=cfg.llama.weight_dtype,
            rngs=rngs,
            kind=cfg.mm_projector_type,
        )
        self.language_model = LlamaForCausalLM(
            cfg.llama, rngs=rngs, attention_implementation=attention_implementation
        )

    @property
    def num_patches(self) -> int:
        return self.config.clip.num_patches

    def encode_images(self, pixel_values: Array) -> Array:
        """CLIP patch features through the projector.

        Args:
          pixel_values: [B, h, w, 3] NHWC, h = w = 336: uint8 crops (`preprocess.clip_pixels`, normalised
            here, on the device) or floats already CLIP-normalised.
        Returns:
          [B, P, C] image tokens in the LLM compute dtype.
        """
        if pixel_values.dtype == jnp.uint8:
            pixel_values = clip_normalize(pixel_values)
        # The reference runs the tower under torch.no_grad (clip_encoder.py): no gradient reaches CLIP.
        feats = self.vision_tower(pixel_values)  # [B, P, V]
        if self.config.freeze_vision_towers:
            feats = jax.lax.stop_gradient(feats)
        return self.mm_projector(feats.astype(self.config.llama.compute_dtype))

    def validate(
        self, input_ids, images_clip, attention_mask=None, image_row_index=None, max_new_tokens: int = 0
    ) -> None:
        """`validate_multimodal_inputs` with this model's sizes and token ids (shape checks always; value
        checks only when `input_ids` is concrete, i.e. outside jit)."""
        cfg = self.config
        if images_clip.ndim != 4:
            raise ValueError(f"images_clip must be [B, h, w, 3] (NHWC), got shape {images_clip.shape}")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [R, L], got shape {input_ids.shape}")
        if not all(_is_concrete(x) for x in (input_ids, attention_mask, image_row_index) if x is not None):
            r, seq_len = input_ids.shape
            if image_row_index is None and r != images_clip.shape[0]:
                raise ValueError(f"{r} rows but {images_clip.shape[0]} images and no image_row_index")
            budget = cfg.llama.max_position_embeddings
            if seq_len + self.num_patches - 1 + max_new_tokens > budget:
                raise ValueError(
                    f"merged length {seq_len + self.num_patches - 1} + {max_new_tokens} new "
                    f"tokens exceeds max_position_embeddings={budget}"
                )
            return
        validate_multimodal_inputs(
            input_ids,
            num_images=images_clip.shape[0],
            image_row_index=image_row_index,
            num_patches=self.num_patches,
            max_positions=cfg.llama.max_position_embeddings,
            max_new_tokens=max_new_tokens,
            image_token_index=cfg.image_token_index,
            im_start_token_id=cfg.im_start_token_id,
            im_end_token_id=cfg.im_end_token_id,
            attention_mask=attention_mask,
        )

    def merge(
        self,
        input_ids: Array,
        images_clip: Array,
        attention_mask: Array | None = None,
        image_row_index: Array | None = None,
        labels: Array | None = None,
    ) -> MergedInputs:
        """CLIP + projector + token embeddings -> the merged LLM inputs (no validation; see `__call__`)."""
        image_features = self.encode_images(images_clip)  # [B, P, C]
        if image_row_index is not None:
            # READ computes CLIP once per image and repeats it for each of the image's conversations.
            image_features = image_features[image_row_index]  # [R, P, C]
        # -200 is not a vocabulary row: embed a harmless id there (its embedding is replaced by the image).
        safe_ids = jnp.where(input_ids == self.config.image_token_index, 0, input_ids)
        text_embeds = self.language_model.embed(safe_ids)  # [R, L, C]
        return merge_multimodal(
            input_ids,
            text_embeds,
            image_features,
            attention_mask,
            labels,
            image_token_index=self.config.image_token_index,
        )

    def __call__(
        self,
        input_ids: Array,
        images_clip: Array,
        attention_mask: Array | None = None,
        image_row_index: Array | None = None,
        labels: Array | None = None,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> tuple[LlamaOutput, MergedInputs]:
        """Multimodal forward (training / teacher forcing).

        Args:
          input_ids: int[R, L], one `<im_start> -200 <im_end>` per row; right padding (training) or left.
          images_clip: float[B, 336, 336, 3] NHWC.
          attention_mask: bool/int[R, L] (None: no padding).
          image_row_index: int[R], the image each row uses (None: row i uses image i, R == B).
          labels: int[R, L] or None; returned merged (image tokens IGNORE) in `MergedInputs.labels`.
          deterministic, rngs: LoRA dropout control, passed to LLaMA.
        Returns:
          (LlamaOutput with logits [R, E, Vocab] and final-norm hidden_states [R, E, C], MergedInputs).
        Raises:
          ValueError (before any compile) on a row without exactly one placeholder, an image count that does
          not match the rows, or a merged length beyond max_position_embeddings.
        """
        self.validate(input_ids, images_clip, attention_mask, image_row_index)
        merged = self.merge(input_ids, images_clip, attention_mask, image_row_index, labels)
        out = self.language_model(
            inputs_embeds=merged.inputs_embeds,
            attention_mask=merged.attention_mask,
            positions=merged.positions,
            deterministic=deterministic,
            rngs=rngs,
        )
        return out, merged

    def generate(
        self,
        input_ids: Array,
        images_clip: Array,
        attention_mask: Array | None = None,
        image_row_index: Array | None = None,
        *,
        max_new_tokens: int,
        eos_token_id=2,
        pad_token_id: int = 0,
    ) -> tuple[Array, Array, MergedInputs]:
        """Greedy decoding after the merged multimodal prompt (KV cache, one jitted loop).

        Args:
          input_ids, images_clip, attention_mask, image_row_index: as in `__call__`; left padding is the
            generation convention (`read_jax.llama_generate.generate` accepts either side).
          max_new_tokens: M; eos_token_id: stop id(s) (LLaMA `</s>` = 2); pad_token_id: fill after EOS.
        Returns:
          (tokens int32[R, M], lengths int32[R], MergedInputs of the prompt). READ then runs one full forward
          over prompt + tokens to read [SEG] hidden states (read_reference.md §4).
        """
        self.validate(input_ids, images_clip, attention_mask, image_row_index, max_new_tokens=max_new_tokens)
        graphdef, state = nnx.split(self)
        merged = _merge_jit(graphdef, state, input_ids, images_clip, attention_mask, image_row_index)
        tokens, lengths = llama_generate(
            self.language_model,
            inputs_embeds=merged.inputs_embeds,
            attention_mask=merged.attention_mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
        return tokens, lengths, merged


# The model's state is an input and never an output: `nnx.jit` with the model as an argument would return the
# whole state under flax's default graph updates (a second copy of the weights, 13 GiB at 7B).
@functools.partial(jax.jit, static_argnames=("graphdef",))
def _merge_jit(graphdef, state, input_ids, images_clip, attention_mask, image_row_index) -> MergedInputs:
    return nnx.merge(graphdef, state).merge(input_ids, images_clip, attention_mask, image_row_index)
