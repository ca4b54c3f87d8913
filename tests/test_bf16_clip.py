"""bf16 parity of the CLIP vision tower: read_jax in bf16 vs transformers' `CLIPVisionModel` in bf16 (eager
attention), same bf16 weights, LLaVA's feature (`hidden_states[-2]`, CLS dropped).

Depth (`tests/bf16.py`): patch conv 1, + class/position embeddings 1, pre-LayerNorm 1, then per layer run 11
bf16-rounded stages (LayerNorm 1, q/k/v 1, attention probabilities 1, P.V 1, out_proj 1, residual 1,
LayerNorm 1, fc1 1, activation 1, fc2 1, residual 1): D = 3 + 11 L, with L = 2 layers run for the tiny
3-layer tower at select_layer -2.
"""

import copy
import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from tests.bf16 import check
from tests.helpers import require_torch


def test_bf16_clip_features():
    torch = require_torch()
    from read_jax.clip import ClipVisionModel
    from read_jax.config import ReadConfig
    from read_jax.convert.clip import CLIP_VISION_IGNORE, CLIP_VISION_RULES
    from read_jax.convert.common import abstract_leaves, convert, load_leaves
    from torchref.clip import hf_clip
    from torchref.common import state_dict_numpy

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
    assert got.dtype == jnp.bfloat16
    sel = cfg.select_layer
    t16 = ref16(pixel_values=pixels.bfloat16(), output_hidden_states=True).hidden_states[sel][:, 1:]
    t32 = ref32(pixel_values=pixels, output_hidden_states=True).hidden_states[sel][:, 1:]
    layers_run = cfg.num_hidden_layers + 1 + sel
    check("clip features", np.asarray(got, np.float32), t16, t32, 3 + 11 * layers_run)
