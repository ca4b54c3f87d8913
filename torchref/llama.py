"""transformers' `LlamaForCausalLM` as the reference for `read_jax.llama`: tiny configs, (HF, read_jax) pairs.

Weights go torch -> JAX only through `read_jax.convert.llama.LLAMA_RULES` (the real converter's table).
torch and transformers are imported when `build_pair` / `hf_config` are called; `tiny_config` needs neither.
"""

from __future__ import annotations

from flax import nnx

from read_jax.config import LlamaConfig
from read_jax.convert.common import abstract_leaves, convert, load_leaves
from read_jax.convert.llama import LLAMA_IGNORE, LLAMA_RULES
from read_jax.llama import LlamaForCausalLM
from torchref.common import state_dict_numpy


def tiny_config(kv_heads: int, **kw) -> LlamaConfig:
    """A 2-layer, 64-wide fp32 LLaMA with 4 query heads and `kv_heads` key/value heads (4: MHA, 2: GQA)."""
    base = {
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 64,
        "dtype": "float32",
        "param_dtype": "float32",
    }
    return LlamaConfig(**{**base, **kw})


def hf_config(cfg: LlamaConfig):
    """The transformers `LlamaConfig` of `cfg` (untied embeddings, SiLU, no biases)."""
    from transformers import LlamaConfig as HFLlamaConfig

    return HFLlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def build_pair(kv_heads: int, seed: int = 0):
    """(torch reference, JAX model with the same weights, config).

    Seeds torch's global generator with `seed` (HF's init and the weights drawn here use it).
    """
    import torch
    from transformers import LlamaForCausalLM as HFLlama

    cfg = tiny_config(kv_heads)
    torch.manual_seed(seed)
    # Eager attention: its additive mask keeps fully padded query rows finite (no NaN leaking into pads).
    ref = HFLlama(hf_config(cfg)).eval()
    ref.config._attn_implementation = "eager"
    # HF's init (std 0.02, norms = 1) makes logits ~1e-3, which would make 1e-5 a loose test: use O(1)
    # activations and non-trivial norm weights instead.
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, p.shape[1] ** -0.5)
    # Abstract init + fill from the converted state dict, as the real converter does (nothing random).
    model = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
    leaves = convert(state_dict_numpy(ref), LLAMA_RULES, abstract_leaves(model), ignore=LLAMA_IGNORE)
    load_leaves(model, leaves)
    return ref, model, cfg
