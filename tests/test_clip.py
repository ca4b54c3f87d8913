"""CLIP vision tower vs transformers' `CLIPVisionModel` (tiny config, random weights, fp32).

LLaVA's feature is `hidden_states[select_layer][:, 1:]` (read_reference.md §2.2); the weights are copied
through `read_jax.convert.clip`'s table, the one the real converter uses.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from read_jax.clip import ClipVisionModel
from read_jax.config import ClipVisionConfig, ReadConfig
from read_jax.convert.clip import clip_ignore, clip_rules
from read_jax.convert.common import ConversionError, abstract_leaves, convert, export_leaves
from tests.helpers import require_torch
from torchref.clip import build_pair, checkpoint_keys, hf_clip
from torchref.common import state_dict_numpy


def _tiny(**kw) -> ClipVisionConfig:
    # The tiny READ CLIP keeps the real 336/14 geometry (576 patches), so the LLaVA index maths is exercised.
    return dataclasses.replace(ReadConfig.tiny().clip, **kw)


@pytest.mark.parametrize("act,select_layer", [("quick_gelu", -2), ("gelu", -1)])
def test_parity_with_hf_clip(act, select_layer):
    torch = require_torch()
    cfg = _tiny(hidden_act=act, select_layer=select_layer)
    ref, model = build_pair(cfg)
    pixels = torch.randn(2, cfg.num_channels, cfg.image_size, cfg.image_size)
    want = ref(pixel_values=pixels, output_hidden_states=True).hidden_states[select_layer][:, 1:].numpy()

    got = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(pixels.numpy().transpose(0, 2, 3, 1)))  # NCHW->NHWC
    assert got.shape == (2, cfg.num_patches, cfg.hidden_size) == want.shape
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_layers_after_the_selected_one_are_not_run():
    """select_layer=-2 must skip the last layer: poisoning its weights with NaN changes nothing."""
    require_torch()
    cfg = _tiny()
    _, model = build_pair(cfg)
    x = jax.random.normal(jax.random.key(1), (1, cfg.image_size, cfg.image_size, 3))
    run = nnx.jit(lambda m, x: m(x))  # parameters are jit inputs: editing them below does not recompile
    before = run(model, x)
    last = model.vision_model.encoder.layers[cfg.num_hidden_layers - 1]
    last.mlp.fc1.kernel[...] = jnp.full_like(last.mlp.fc1.kernel[...], jnp.nan)
    np.testing.assert_array_equal(np.asarray(run(model, x)), np.asarray(before))
    assert model.num_layers_run == cfg.num_hidden_layers - 1
    # ... while poisoning the selected layer itself does reach the output.
    sel = model.vision_model.encoder.layers[cfg.num_hidden_layers - 2]
    sel.mlp.fc1.kernel[...] = jnp.full_like(sel.mlp.fc1.kernel[...], jnp.nan)
    assert np.isnan(np.asarray(run(model, x))).all()


def test_table_covers_hf_keys_under_the_llava_prefix():
    """The READ/LLaVA layout (`model.vision_tower.vision_tower.`) converts through the prefixed table, the
    `position_ids` buffer is ignored by name, and an unknown key is an error, not a silent skip."""
    require_torch()
    cfg = _tiny()
    sd = checkpoint_keys(state_dict_numpy(hf_clip(cfg)))
    sd["vision_model.embeddings.position_ids"] = np.arange(cfg.num_patches + 1)[None]
    pre = "model.vision_tower.vision_tower."
    src = {pre + k: v for k, v in sd.items()}
    abstract = nnx.eval_shape(lambda: ClipVisionModel(cfg, rngs=nnx.Rngs(0)))
    target = {"vision_tower/" + k: v for k, v in abstract_leaves(abstract).items()}
    out = convert(src, clip_rules(pre, "vision_tower/"), target, ignore=clip_ignore(pre))
    assert set(out) == set(target)
    np.testing.assert_array_equal(
        out["vision_tower/vision_model/encoder/layers/1/self_attn/q_proj/kernel"],
        sd["vision_model.encoder.layers.1.self_attn.q_proj.weight"].T,
    )
    # The table inverts (export to the HF layout): every key comes back bit-exact.
    back = export_leaves(out, clip_rules(pre, "vision_tower/"))
    assert set(back) == set(src) - {pre + "vision_model.embeddings.position_ids"}
    for k, v in back.items():
        np.testing.assert_array_equal(v, src[k])
    with pytest.raises(ConversionError, match="visual_projection"):
        convert(
            {**src, "visual_projection.weight": np.zeros((4, 4))},
            clip_rules(pre, "vision_tower/"),
            target,
            ignore=clip_ignore(pre),
        )


def test_bad_pixel_layout_is_rejected():
    cfg = _tiny()
    # Abstract parameters: the check runs before any compute.
    model = nnx.eval_shape(lambda: ClipVisionModel(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.zeros((1, 3, cfg.image_size, cfg.image_size)))  # NCHW by mistake


# The full-size (read_7b) CLIP + projector parameter count vs transformers is in test_llava.py.
