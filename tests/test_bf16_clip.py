"""bf16 parity of the CLIP vision tower: read_jax in bf16 vs transformers' `CLIPVisionModel` in bf16 and
fp32, same weights, LLaVA's feature (`torchref.bf16.clip_run`, where the depth is counted)."""

import jax.numpy as jnp

from tests.bf16 import check
from tests.helpers import require_torch


def test_bf16_clip_features():
    require_torch()
    from torchref.bf16 import clip_outputs, clip_run

    run = clip_run()
    assert run["got"].dtype == jnp.bfloat16
    (o,) = clip_outputs(run)
    assert o.depth == 3 + 11 * 2  # the tiny 3-layer tower run to select_layer -2
    check(o)
