"""LLaVA-1.5 merge, projector and `LlavaModel` vs PyTorch (tiny, random weights, fp32).

The torch side (`torchref.llava`) mirrors the reference `prepare_inputs_labels_for_multimodal`
(read_reference.md §2.4) row by row with `torch.cat`: the -200 placeholder is replaced in place by the P
image tokens, text after it shifts by P - 1, labels get P IGNORE entries and the attention mask gets P - 1
`True`s prepended. It then feeds `transformers.LlamaForCausalLM(inputs_embeds=...)`, exactly as
`LlavaLlamaForCausalLM.forward` does.
Weights reach JAX only through the key tables (`read_jax.convert.clip`, `read_jax.convert.llama`) with the
key layout of a READ checkpoint (`model.vision_tower.vision_tower.vision_model.*`, `model.mm_projector.*`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from read_jax.clip import ClipVisionModel
from read_jax.config import IGNORE_INDEX, IM_END_TOKEN_ID, IM_START_TOKEN_ID, IMAGE_TOKEN_INDEX, ReadConfig
from read_jax.convert.clip import MM_PROJECTOR_RULES
from read_jax.convert.common import abstract_leaves, convert, load_leaves
from read_jax.llava import LlavaModel, MmProjector, expanded_position, merge_multimodal
from tests.helpers import require_torch
from torchref.common import state_dict_numpy
from torchref.llava import build_pair, image_tokens, prepare_inputs

P = 576  # the tiny config keeps CLIP's 336/14 geometry
L = 12
CFG = ReadConfig.tiny()


# ---- batches -----------------------------------------------------------------------------------------------
def _row(rng, n_before: int, n_after: int) -> list[int]:
    """bos, text, <im_start> <image> <im_end>, text (ids avoid 0/1/2 and the special tokens)."""
    txt = lambda k: rng.integers(3, 32000, k).tolist()
    return [1, *txt(n_before), IM_START_TOKEN_ID, IMAGE_TOKEN_INDEX, IM_END_TOKEN_ID, *txt(n_after)]


def _batch(rng):
    """Rows: 0 right-padded (length 9), 1 full (length 12), 2 = row 0 left-padded. Labels supervise the tail.

    Returns ids int[3, L], mask bool[3, L], labels int[3, L], lengths, and which side each row is padded on.
    """
    rows = [_row(rng, 1, 3), _row(rng, 3, 4)]
    ids = np.zeros((3, L), np.int64)
    mask = np.zeros((3, L), bool)
    labels = np.full((3, L), IGNORE_INDEX, np.int64)
    for r, (row, side) in enumerate([(rows[0], "right"), (rows[1], "right"), (rows[0], "left")]):
        n = len(row)
        sl = slice(0, n) if side == "right" else slice(L - n, L)
        ids[r, sl], mask[r, sl] = row, True
        labels[r, sl.stop - 3 : sl.stop] = row[-3:]  # the "answer"
    return ids, mask, labels


# ---- the pure merge ----------------------------------------------------------------------------------------
def test_merge_matches_reference_with_padding():
    torch = require_torch()
    rng = np.random.default_rng(0)
    ids, mask, labels = _batch(rng)
    c = 8
    table = torch.nn.Embedding(32003, c)
    image_features = torch.randn(3, P, c)
    t_ids, t_mask, t_labels = torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(labels)
    want_e, want_l, want_m_prepend, want_m_insert = prepare_inputs(
        t_ids, table, image_features, t_labels, t_mask
    )

    text = table(t_ids.clamp(min=0)).numpy()  # the placeholder's row is discarded by the merge
    got = jax.jit(merge_multimodal)(
        jnp.asarray(ids),
        jnp.asarray(text),
        jnp.asarray(image_features.numpy()),
        jnp.asarray(mask),
        jnp.asarray(labels),
    )
    assert got.inputs_embeds.shape == (3, L + P - 1, c)
    np.testing.assert_array_equal(np.asarray(got.inputs_embeds), want_e.numpy())
    np.testing.assert_array_equal(np.asarray(got.labels), want_l.numpy())
    np.testing.assert_array_equal(np.asarray(got.attention_mask), want_m_insert.numpy())
    # Right-padded rows: identical to the reference's "prepend 575 Trues" mask. The left-padded row is where
    # that rule breaks (it would unmask the pads), and the gathered mask keeps them masked.
    np.testing.assert_array_equal(np.asarray(got.attention_mask)[:2], want_m_prepend.numpy()[:2])
    assert not np.array_equal(np.asarray(got.attention_mask)[2], want_m_prepend.numpy()[2])
    assert np.asarray(got.attention_mask)[2].sum() == mask[2].sum() + P - 1

    # Image tokens sit right after <im_start>: expanded index of <im_start> + 1 ... + P.
    start = np.asarray(got.image_token_start)
    merged_ids = np.asarray(expanded_position(jnp.arange(L)[None], got.image_token_start[:, None], P))
    for r in range(3):
        p = int(np.nonzero(ids[r] == IMAGE_TOKEN_INDEX)[0][0])
        im_start_expanded = merged_ids[r, p - 1]
        assert start[r] == im_start_expanded + 1 == p
        np.testing.assert_array_equal(
            np.asarray(got.inputs_embeds)[r, start[r] : start[r] + P], image_features[r].numpy()
        )
        # Every text token lands at expanded_position(i): +575 after the image, unchanged before it.
        for i in range(L):
            if i != p:
                np.testing.assert_array_equal(np.asarray(got.inputs_embeds)[r, merged_ids[r, i]], text[r, i])
                assert merged_ids[r, i] == (i + P - 1 if i > p else i)
    # Positions: arange on the real tokens for right padding, the unpadded positions for the left-padded row.
    pos, m = np.asarray(got.positions), np.asarray(got.attention_mask)
    for r in range(3):
        np.testing.assert_array_equal(pos[r][m[r]], np.arange(m[r].sum()))
    np.testing.assert_array_equal(pos[2][m[2]], pos[0][m[0]])


def test_merge_compiles_once_for_any_placeholder_position():
    traces = []

    @jax.jit
    def f(ids, text, img):
        traces.append(1)
        return merge_multimodal(ids, text, img).inputs_embeds

    rng = np.random.default_rng(1)
    for n_before in (1, 4):
        row = _row(rng, n_before, 8 - n_before)
        ids = jnp.asarray([row])
        f(ids, jnp.zeros((1, len(row), 4)), jnp.ones((1, P, 4)))
    assert len(traces) == 1


# ---- projector ---------------------------------------------------------------------------------------------
def test_projector_matches_torch_sequential():
    torch = require_torch()
    ref = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    x = torch.randn(2, 7, 32) * 3.0  # wide range: exact vs tanh GELU differ by up to ~1e-3 here
    proj = MmProjector(32, 64, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    load_leaves(proj, convert(state_dict_numpy(ref), MM_PROJECTOR_RULES, abstract_leaves(proj)))
    np.testing.assert_allclose(np.asarray(proj(jnp.asarray(x.numpy()))), ref(x).numpy(), atol=1e-5, rtol=1e-5)


# ---- LlavaModel end to end ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava_pair():
    torch = require_torch()
    modules, model = build_pair(CFG)
    return torch, modules, model


def test_llava_forward_matches_torch(llava_pair):
    """Logits and final-norm hidden states vs CLIP -> projector -> reference merge -> HF LLaMA; two images
    shared by three rows (row 2 is row 0 left-padded and must give row 0's outputs on its real tokens)."""
    torch, (clip, proj, llm), model = llava_pair
    rng = np.random.default_rng(0)
    ids, mask, labels = _batch(rng)
    row_image = np.array([0, 1, 0])
    pixels = torch.randn(2, 3, 336, 336)

    img = image_tokens(clip, proj, pixels, CFG.clip.select_layer)[torch.from_numpy(row_image)]  # [R, P, C]
    t_ids = torch.from_numpy(ids[:2])
    embeds, want_labels, mask_ref, _ = prepare_inputs(
        t_ids,
        llm.model.embed_tokens,
        img[:2],
        torch.from_numpy(labels[:2]),
        torch.from_numpy(mask[:2]),
    )
    ref = llm(inputs_embeds=embeds, attention_mask=mask_ref.long(), output_hidden_states=True)
    want_logits, want_h = ref.logits.numpy(), ref.hidden_states[-1].numpy()

    args = (
        jnp.asarray(ids),
        jnp.asarray(pixels.numpy().transpose(0, 2, 3, 1)),
        jnp.asarray(mask),
        jnp.asarray(row_image),
        jnp.asarray(labels),
    )
    model.validate(*args[:4])  # value checks run on the host; inside jit only shapes are checked
    out, merged = nnx.jit(lambda m, *a: m(*a))(model, *args)
    m = np.asarray(merged.attention_mask)
    logits, h = np.asarray(out.logits), np.asarray(out.hidden_states)
    np.testing.assert_array_equal(np.asarray(merged.labels)[:2], want_labels.numpy())
    np.testing.assert_allclose(np.asarray(merged.inputs_embeds)[:2], embeds.numpy(), atol=1e-5, rtol=1e-5)
    for r in range(2):  # padded query positions are don't-cares
        np.testing.assert_allclose(logits[r][m[r]], want_logits[r][m[r]], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(h[r][m[r]], want_h[r][m[r]], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(logits[2][m[2]], want_logits[0][m[0]], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(h[2][m[2]], want_h[0][m[0]], atol=1e-5, rtol=1e-5)


def test_llava_generate_matches_torch_greedy(llava_pair):
    """Greedy decoding after the merged prompt vs a no-cache torch loop over HF LLaMA (one unpadded row at a
    time), with the JAX batch left-padded."""
    torch, (clip, proj, llm), model = llava_pair
    rng = np.random.default_rng(2)
    ids, mask, _ = _batch(rng)
    ids, mask = ids[1:], mask[1:]  # full row and a left-padded row
    pixels = torch.randn(2, 3, 336, 336)
    steps = 4
    tokens, lengths, _ = model.generate(
        jnp.asarray(ids),
        jnp.asarray(pixels.numpy().transpose(0, 2, 3, 1)),
        jnp.asarray(mask),
        max_new_tokens=steps,
        eos_token_id=None,
    )
    img = image_tokens(clip, proj, pixels, CFG.clip.select_layer)
    for r in range(2):
        row = torch.from_numpy(ids[r][mask[r]])[None]
        embeds, *_ = prepare_inputs(
            row,
            llm.model.embed_tokens,
            img[r : r + 1],
            torch.zeros_like(row),
            torch.ones_like(row, dtype=torch.bool),
        )
        want = []
        for _ in range(steps):
            nxt = int(llm(inputs_embeds=embeds, logits_to_keep=1).logits[0, -1].argmax())
            want.append(nxt)
            embeds = torch.cat([embeds, llm.model.embed_tokens(torch.tensor([[nxt]]))], dim=1)
        assert np.asarray(tokens)[r].tolist() == want
    np.testing.assert_array_equal(np.asarray(lengths), [steps, steps])


# ---- bad input ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    # Abstract parameters: every check must fire before any array is touched (let alone compiled).
    return nnx.eval_shape(lambda: LlavaModel(CFG, rngs=nnx.Rngs(0)))


def test_bad_input_is_rejected_before_compiling(tiny_model):
    rng = np.random.default_rng(3)
    ids, mask, _ = _batch(rng)
    px = jnp.zeros((3, 336, 336, 3))
    no_image = ids.copy()
    no_image[1][no_image[1] == IMAGE_TOKEN_INDEX] = 5
    with pytest.raises(ValueError, match=r"exactly one <image>.*rows \[1\] have \[0\]"):
        tiny_model(jnp.asarray(no_image), px, jnp.asarray(mask))
    two_images = ids.copy()
    two_images[2, -1] = IMAGE_TOKEN_INDEX
    with pytest.raises(ValueError, match=r"rows \[2\] have \[2\]"):
        tiny_model(jnp.asarray(two_images), px, jnp.asarray(mask))
    with pytest.raises(ValueError, match="3 rows with an <image> placeholder but 2 images"):
        tiny_model(jnp.asarray(ids), px[:2], jnp.asarray(mask))
    with pytest.raises(ValueError, match=r"image_row_index rows \[1\] point outside the 2 images"):
        tiny_model(jnp.asarray(ids), px[:2], jnp.asarray(mask), jnp.asarray([0, 2, 1]))
    no_start = ids.copy()
    no_start[0][no_start[0] == IM_START_TOKEN_ID] = 5
    with pytest.raises(ValueError, match=r"rows \[0\].*not preceded by <im_start>"):
        tiny_model(jnp.asarray(no_start), px, jnp.asarray(mask))
    # 1024 positions: 450 text tokens + 575 extra image tokens do not fit.
    long = np.zeros((1, 450), np.int64)
    long[0, :4] = [1, IM_START_TOKEN_ID, IMAGE_TOKEN_INDEX, IM_END_TOKEN_ID]
    with pytest.raises(ValueError, match=r"expands to 1025 .* max_position_embeddings=1024"):
        tiny_model(jnp.asarray(long), px[:1])
    with pytest.raises(ValueError, match=r"\+ 500 new tokens.*position budget"):
        tiny_model.generate(jnp.asarray(ids), px, jnp.asarray(mask), max_new_tokens=500)
    # Under tracing (the train step's jit) the value checks cannot run, but the shape checks still fire at
    # trace time, before XLA compiles anything.
    trace = lambda *a: nnx.eval_shape(lambda m, *x: m(*x), tiny_model, *a)
    with pytest.raises(ValueError, match=r"merged length 1025 .* max_position_embeddings=1024"):
        trace(jnp.asarray(long), px[:1])
    with pytest.raises(ValueError, match="3 rows but 2 images and no image_row_index"):
        trace(jnp.asarray(ids), px[:2], jnp.asarray(mask))


# ---- full-size parameter counts ----------------------------------------------------------------------------
def test_vision_and_projector_param_counts_match_transformers():
    """eval_shape (nothing materialised) of CLIP + projector for read_7b and read_13b vs transformers'
    CLIPVisionModel on the meta device + the projector's 1024*C + C + C*C + C. (The LLM's counts are in
    test_llama.py; the tiny LlavaModel's tree is checked leaf by leaf by the strict converter above.)"""
    torch = require_torch()
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with torch.device("meta"):
        ref = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=24,
                num_attention_heads=16,
                image_size=336,
                patch_size=14,
                projection_dim=768,
            )
        )
    n_clip = sum(p.numel() for p in ref.parameters())
    count = lambda leaves: sum(int(np.prod(v.shape)) for v in leaves.values())
    cfgs = [ReadConfig.read_7b(), ReadConfig.read_13b()]
    assert cfgs[0].clip == cfgs[1].clip  # one CLIP ViT-L/14-336 for both sizes
    clip = abstract_leaves(nnx.eval_shape(lambda: ClipVisionModel(cfgs[0].clip, rngs=nnx.Rngs(0))))
    assert clip["vision_model/embeddings/position_embedding/embedding"].shape == (577, 1024)
    assert all(v.dtype == jnp.bfloat16 for v in clip.values())
    for cfg in cfgs:
        c = cfg.llama.hidden_size
        proj = abstract_leaves(
            nnx.eval_shape(
                lambda cfg=cfg, c=c: MmProjector(
                    cfg.mm_hidden_size,
                    c,
                    dtype=cfg.llama.compute_dtype,
                    param_dtype=cfg.llama.weight_dtype,
                    rngs=nnx.Rngs(0),
                )
            )
        )
        assert proj["layers/0/kernel"].shape == (1024, c) and proj["layers/2/kernel"].shape == (c, c)
        assert count(clip) + count(proj) == n_clip + (1024 * c + c + c * c + c)
    assert n_clip == 303_507_456
