"""READ end to end vs a torch READ assembled from transformers' LLaMA/CLIP, Meta's SAM and the SasP
transcription (`torchref.read`), with the same weights loaded through read_jax's converter tables."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from read_jax.convert.common import abstract_leaves
from read_jax.convert.read import read_rules
from read_jax.lora import partition_trainable
from read_jax.losses import read_batch_loss
from read_jax.read_model import ReadModel, seg_slots
from tests.helpers import require_meta_sam, require_torch
from torchref.read_batch import CANVAS, ORIG, tiny_batch, tiny_config


@pytest.fixture(scope="module")
def pair():
    """(cfg, torch READ, read_jax READ with the same weights)."""
    torch = require_torch()
    require_meta_sam()
    from torchref.read import build_pair

    cfg = tiny_config()
    tm, model = build_pair(cfg, seed=0)
    torch.set_grad_enabled(True)
    return cfg, tm, model


def _torch_forward(cfg, tm, batch):
    from torchref.read import torch_forward

    return torch_forward(cfg, tm, batch)


def test_seg_slots_first_token_never_counts_and_overflow_is_dropped():
    ids = jnp.array([[32000, 5, 32000, 32000, 32000], [1, 2, 3, 4, 5]])
    idx, valid = seg_slots(ids, 32000, 2)
    np.testing.assert_array_equal(np.asarray(valid), [[True, True], [False, False]])
    np.testing.assert_array_equal(np.asarray(idx[0]), [2, 3])


def test_supervised_logits_cap_shares_the_positions_between_rows():
    """With more supervised targets than `max_tokens`, every row keeps its first ones in turn (not the first K
    of the batch in row order, which would leave the last rows without a text loss); kept positions come out
    in row order, and with room for all nothing is dropped or reordered."""
    from types import SimpleNamespace

    rows, length = 3, 12
    hidden = jnp.arange(rows * length, dtype=jnp.float32).reshape(rows, length, 1)  # position id as the state
    labels = np.full((rows, length), -100, np.int32)
    labels[0, 2:12] = 7  # 10 targets at positions 1..10 (label t+1)
    labels[1, 8:10] = 8  # 2 targets at positions 7, 8
    labels[2, 5:11] = 9  # 6 targets at positions 4..9
    fake = SimpleNamespace(llava=SimpleNamespace(language_model=SimpleNamespace(lm_head=lambda h: h)))

    def pos(sup):  # the (row, position) of every kept target
        p = np.asarray(sup.logits[:, 0]).astype(int)[np.asarray(sup.targets) != -100]
        return [(int(i) // length, int(i) % length) for i in p]

    sup = ReadModel.supervised_logits(fake, hidden, jnp.asarray(labels), 8)
    # turns: rows take their 1st, 2nd, 3rd ... target in turn; row 1 runs out after two
    want = [(0, 1), (0, 2), (0, 3), (1, 7), (1, 8), (2, 4), (2, 5), (2, 6)]
    assert pos(sup) == want and int(sup.dropped) == 18 - 8
    np.testing.assert_array_equal(
        np.asarray(sup.targets), [labels[r, p + 1] for r, p in want]
    )  # each kept state is scored against its own next token
    full = ReadModel.supervised_logits(fake, hidden, jnp.asarray(labels), 20)
    every = [(r, p) for r in range(rows) for p in range(length - 1) if labels[r, p + 1] != -100]
    assert pos(full) == every and int(full.dropped) == 0
    assert np.all(np.asarray(full.targets)[18:] == -100)  # the spare slots hold no target


@pytest.fixture(scope="module")
def jax_run(pair):
    """Forward outputs, loss terms and gradients of the trainables from ONE jitted function (one compile)."""
    cfg, _, model = pair
    batch = tiny_batch(cfg)
    graphdef, trainable, frozen = partition_trainable(model, cfg.trainable_regexes)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}

    @jax.jit
    def run(tr, fr, b):
        def loss_fn(t):
            out = nnx.merge(graphdef, t, fr)(b, canvas_hw=CANVAS)
            loss, terms = read_batch_loss(out, b)
            return loss, (terms, out)

        (_, (terms, out)), grads = jax.value_and_grad(loss_fn, has_aux=True)(tr)
        return terms, out, grads

    terms, out, grads = run(trainable, frozen, jb)
    return batch, terms, out, grads


def test_forward_matches_torch_reference(pair, jax_run):
    cfg, tm, _ = pair
    batch, _, out, _ = jax_run
    _, tout = _torch_forward(cfg, tm, batch)

    np.testing.assert_allclose(np.asarray(out.logits), tout["logits"].detach().numpy(), atol=1e-4, rtol=1e-4)
    valid = np.asarray(out.seg.valid)
    np.testing.assert_array_equal(valid, [[True, False], [True, True], [False, False]])
    slots = [(0, 0), (1, 0), (1, 1)]
    assert len(tout["segs"]) == len(slots)
    for (r, k), ts in zip(slots, tout["segs"], strict=False):
        assert ts["row"] == r
        h, w = ORIG[batch["conv_image"][r]]
        np.testing.assert_allclose(
            np.asarray(out.masks.pred_embeddings[r, k]),
            ts["pred_emb"].detach().numpy(),
            atol=1e-5,
            rtol=1e-5,
        )
        np.testing.assert_array_equal(np.asarray(out.masks.point_labels[r, k]), ts["labels"].numpy())
        np.testing.assert_allclose(
            np.asarray(out.masks.points[r, k]), ts["points"].detach().numpy(), atol=1e-3
        )
        got = np.asarray(out.masks.mask_logits[r, k])
        np.testing.assert_allclose(got[:h, :w], ts["mask"].detach().numpy(), atol=1e-4, rtol=1e-4)
        assert np.all(got[h:] == 0) and np.all(got[:, w:] == 0)


def test_losses_and_gradients_match_torch_reference(pair, jax_run):
    import torch

    from read_jax.convert.common import convert
    from torchref.read import torch_losses

    cfg, tm, _ = pair
    batch, terms, _, grads = jax_run
    tm.zero_grad()
    _, tout = _torch_forward(cfg, tm, batch)
    gts = []
    for r, k in [(0, 0), (1, 0), (1, 1)]:
        h, w = ORIG[batch["conv_image"][r]]
        gts.append(torch.from_numpy((batch["masks"][r, k, :h, :w] == 1).astype(np.float32)))
    tl = torch_losses(tout, gts)
    tl["loss"].backward()

    for name in ("ce", "bce", "dice", "loss"):
        np.testing.assert_allclose(float(terms[name]), tl[name].item(), rtol=1e-5, atol=1e-6)

    # Torch grads of the trainables under released key names -> read_jax paths through the same table.
    named = dict(tm.named_parameters())
    tgrads = {}
    for k, p in named.items():
        g = np.zeros(tuple(p.shape), np.float32) if p.grad is None else p.grad.numpy()  # unused: IoU head
        if k.startswith(("llm.model.embed_tokens", "llm.lm_head")):
            tgrads[k[len("llm.") :]] = g
        elif k.startswith(("text_hidden_fcs.", "visual_model.mask_decoder.")):
            tgrads["model." + k] = g
    target = abstract_leaves(grads)
    expected = convert(tgrads, read_rules(), target)
    got = abstract_leaves(grads)
    assert set(got) == set(expected)
    for path, g in expected.items():
        a = np.asarray(got[path], np.float64)
        # 1e-4 relative; the absolute floor covers gradients that are zero in exact arithmetic (the IoU head
        # is unused; softmax is invariant to the key bias) and come out as ~1e-10 rounding noise.
        assert np.linalg.norm(a - g) <= 1e-4 * np.linalg.norm(g) + 1e-8, path
    # The DtoC gradient path reaches the LLM: the [SEG] token's embedding row gets mask-loss gradient.
    assert (
        np.abs(np.asarray(got["llava/language_model/model/embed_tokens/embedding"][cfg.seg_token_id])).sum()
        > 0
    )


def test_rows_without_seg_get_no_mask_and_jit_compiles_once(pair):
    cfg, _, model = pair
    batch = {k: jnp.asarray(v) for k, v in tiny_batch(cfg).items()}
    traces = []

    @nnx.jit(static_argnames=("canvas_hw",))
    def fwd(m, b, canvas_hw):
        traces.append(1)
        return m(b, canvas_hw=canvas_hw).seg.valid

    v1 = fwd(model, batch, canvas_hw=CANVAS)
    b2 = dict(batch, orig_hw=jnp.asarray([[200, 100], [150, 320]], jnp.int32))  # other sizes, same shapes
    fwd(model, b2, canvas_hw=CANVAS)
    assert len(traces) == 1
    assert not bool(v1[2].any())


def test_vision_towers_get_gradients_only_when_unfrozen(pair):
    """READ runs CLIP and SAM's image encoder under no_grad; `freeze_vision_towers=False` (from-scratch
    configs) lets the mask loss reach them. Marking frozen towers trainable is refused up front."""
    import dataclasses

    from read_jax.config import ConfigError
    from read_jax.train import state as tstate

    cfg, _, model = pair
    towers = (r"llava/vision_tower/.*", r"visual_model/image_encoder/.*")
    b = {k: jnp.asarray(v) for k, v in tiny_batch(cfg).items()}
    open_cfg = dataclasses.replace(cfg, freeze_vision_towers=False)
    open_gd, _ = nnx.split(nnx.eval_shape(lambda: ReadModel(open_cfg, rngs=nnx.Rngs(0))))
    norms = {}
    for name, m in (("frozen", model), ("open", nnx.merge(open_gd, nnx.state(model)))):
        graphdef, tr, fr = partition_trainable(m, towers)

        def loss_fn(t, graphdef=graphdef, fr=fr):
            out = nnx.merge(graphdef, t, fr)(b, canvas_hw=CANVAS)
            return read_batch_loss(out, b)[0]

        g = jax.jit(jax.grad(loss_fn))(tr)  # jitted: op-by-op, the two backward passes took ~80 s
        norms[name] = {
            p: float(jnp.abs(v).sum())
            for p, v in (("/".join(map(str, k)), v.get_value()) for k, v in nnx.to_flat_state(g))
        }
    assert norms["frozen"] and not any(norms["frozen"].values())
    for prefix in ("llava/vision_tower/", "visual_model/image_encoder/"):
        assert sum(v for p, v in norms["open"].items() if p.startswith(prefix)) > 0, prefix
    with pytest.raises(ConfigError, match="freeze_vision_towers"):
        tstate.check_trainable_regexes(
            model, cfg.replace(trainable_regexes=cfg.trainable_regexes + towers[:1])
        )
    assert tstate.check_trainable_regexes(model, open_cfg.replace(trainable_regexes=towers))[towers[0]] > 0


def test_similarity_term_is_added_only_when_weighted(pair, jax_run):
    from read_jax.losses import LossWeights, cell_coverage, similarity_loss

    cfg, _, _ = pair
    batch, terms, out, _ = jax_run
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    w = LossWeights(sim=0.7)
    loss, t2 = read_batch_loss(out, b, w)
    assert "sim" not in terms  # weight 0: the term is not computed at all
    # The raw [SEG] . image-token similarity, scaled like attention logits by 1 / sqrt(LLM width).
    sim = out.masks.similarity * cfg.llama.hidden_size**-0.5
    # Rows 0 (slot 0), 1 (slots 0, 1) carry a [SEG] and a GT; row 2 has neither.
    hw = b["orig_hw"][b["conv_image"]]
    cov = cell_coverage(
        (b["masks"] == 1).reshape(6, *CANVAS), jnp.repeat(hw, 2, 0), jnp.repeat(hw, 2, 0), cfg.clip.grid_size
    )
    want = similarity_loss(sim.reshape(6, -1), cov, jnp.asarray(batch["mask_valid"]).reshape(-1))
    np.testing.assert_allclose(float(t2["sim"]), float(want), rtol=1e-6)
    np.testing.assert_allclose(float(loss), float(terms["loss"]) + 0.7 * float(want), rtol=1e-6)
    assert float(want) > 0


def test_text_only_loss_skips_sam_and_equals_the_full_forwards_ce(pair, jax_run):
    """A text-only stage (mask weights 0) runs no SAM: its loss is the full forward's CE, nothing but the
    LLM side gets a gradient, and the mask decoder's gradient is exactly zero."""
    from read_jax.losses import LossWeights

    cfg, _, model = pair
    _, terms, _, _ = jax_run
    graphdef, trainable, frozen = partition_trainable(model, cfg.trainable_regexes)
    jb = {k: jnp.asarray(v) for k, v in tiny_batch(cfg).items()}
    weights = LossWeights(ce=1.0, bce=0.0, dice=0.0)
    assert not weights.masks and LossWeights().masks

    def loss_fn(t):
        out = nnx.merge(graphdef, t, frozen)(jb, canvas_hw=CANVAS, compute_masks=False)
        assert out.masks is None
        return read_batch_loss(out, jb, weights)

    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(trainable)
    np.testing.assert_allclose(float(loss), float(terms["ce"]), rtol=1e-6)
    assert float(metrics["bce"]) == 0.0 and int(metrics["num_masks"]) == 0
    leaves = abstract_leaves(grads)
    decoder = [p for p in leaves if "mask_decoder" in p]
    assert decoder and all(not np.any(np.asarray(leaves[p])) for p in decoder)
    assert any(np.any(np.asarray(leaves[p])) for p in leaves if "embed_tokens" in p)
