"""bf16 parity of the LLaMA decoder: read_jax in bf16 vs transformers' `LlamaForCausalLM` in bf16 and fp32,
same weights (`torchref.bf16.llama_run`, where the depths are counted), MHA and GQA."""

import jax.numpy as jnp
import numpy as np
import pytest

from tests.bf16 import check
from tests.helpers import require_torch


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def run(request):
    require_torch()
    from torchref.bf16 import llama_run

    return llama_run(request.param)


def test_bf16_llama_logits_and_hidden_states(run):
    from torchref.bf16 import llama_outputs

    out = run["out"]
    # The released casts: bf16 activations, logits cast to fp32 after the bf16 lm_head (HF 4.31 `.float()`).
    assert out.hidden_states.dtype == jnp.bfloat16 and out.logits.dtype == jnp.float32
    np.testing.assert_array_equal(
        np.asarray(out.logits), np.asarray(out.logits.astype(jnp.bfloat16), np.float32)
    )
    outputs = llama_outputs(run)
    assert [o.depth for o in outputs] == [33, 32]
    for o in outputs:
        check(o)
