"""bf16 parity of the LLaMA decoder: read_jax in bf16 vs transformers' `LlamaForCausalLM` in bf16 (eager
attention: bf16 q.k, fp32 softmax cast to bf16, as transformers 4.31 computes it), same bf16 weights.

Depth of the tiny 2-layer model (`tests/bf16.py`): per layer 15 bf16-rounded stages (input RMSNorm: the
normalised value and the scale product, 2; q/k/v projections 1; RoPE 1; attention probabilities 1; P.V 1;
o_proj 1; residual 1; post-attention RMSNorm 2; gate/up 1; SiLU 1; the product 1; down 1; residual 1), then
the final RMSNorm (2) and lm_head (1): hidden states D = 15 L + 2 = 32, logits D = 33.
"""

import copy
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.bf16 import check
from tests.helpers import require_torch

LAYERS = 2


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def run(request):
    """Outputs of read_jax bf16, HF bf16 and HF fp32 on right-padded rows."""
    torch = require_torch()
    from read_jax.convert.common import abstract_leaves, convert, load_leaves
    from read_jax.convert.llama import LLAMA_IGNORE, LLAMA_RULES
    from read_jax.llama import LlamaForCausalLM
    from torchref.common import state_dict_numpy
    from torchref.llama import build_pair

    ref32, _, cfg = build_pair(request.param)
    assert cfg.num_hidden_layers == LAYERS
    cfg16 = dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16")
    model = nnx.eval_shape(lambda: LlamaForCausalLM(cfg16, rngs=nnx.Rngs(0)))
    load_leaves(
        model, convert(state_dict_numpy(ref32), LLAMA_RULES, abstract_leaves(model), ignore=LLAMA_IGNORE)
    )
    ref16 = copy.deepcopy(ref32).to(torch.bfloat16)
    ids = torch.randint(3, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    out = nnx.jit(lambda m, i, a: m(i, attention_mask=a))(
        model, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy())
    )
    t16 = ref16(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    t32 = ref32(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return out, t16, t32, mask.numpy().astype(bool)


def test_bf16_llama_logits_and_hidden_states(run):
    out, t16, t32, real = run
    # The released casts: bf16 activations, logits cast to fp32 after the bf16 lm_head (HF 4.31 `.float()`).
    assert out.hidden_states.dtype == jnp.bfloat16 and out.logits.dtype == jnp.float32
    np.testing.assert_array_equal(
        np.asarray(out.logits), np.asarray(out.logits.astype(jnp.bfloat16), np.float32)
    )
    check(
        "llama logits",
        np.asarray(out.logits)[real],
        t16.logits.float()[real],
        t32.logits[real],
        15 * LAYERS + 3,
    )
    check(
        "llama final hidden",
        np.asarray(out.hidden_states, np.float32)[real],
        t16.hidden_states[-1].float()[real],
        t32.hidden_states[-1][real],
        15 * LAYERS + 2,
    )
