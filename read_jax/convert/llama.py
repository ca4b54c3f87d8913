"""Key tables: HF `LlamaForCausalLM` state dict (+ PEFT LoRA keys) -> `read_jax.llama.LlamaForCausalLM` paths.

PyTorch reference: transformers 4.31 `LlamaForCausalLM.state_dict()` (read_reference.md §10.2) and peft 0.4
`get_peft_model_state_dict` / the PEFT-wrapped model's own state dict (`base_model.model.` prefix, optional
`.default` adapter name).

Targets are '/'-joined NNX paths relative to the LLaMA module; use `common.prefixed(rules, src, dst)` to place
the table inside a bigger model (e.g. `dst_prefix="language_model/"`). Pure numpy: no torch import.

    model.embed_tokens.weight                          [V, D]  -> model/embed_tokens/embedding  [V, D]
    model.layers.N.self_attn.{q,k,v,o}_proj.weight     [O, I]  -> model/layers/N/self_attn/*/kernel [I, O]
    model.layers.N.mlp.{gate,up,down}_proj.weight      [O, I]  -> model/layers/N/mlp/*/kernel    [I, O]
    model.layers.N.{input,post_attention}_layernorm.weight [D] -> model/layers/N/*/scale
    model.norm.weight                                  [D]     -> model/norm/scale
    lm_head.weight                                     [V, D]  -> lm_head/kernel [D, V]
    ...q_proj.lora_A(.default).weight                  [R, I]  -> .../q_proj/lora_a [I, R]
    ...q_proj.lora_B(.default).weight                  [O, R]  -> .../q_proj/lora_b [R, O]
"""

from __future__ import annotations

from read_jax.convert.common import Rule, identity, linear

# Plain literal patterns with capture groups only, so `common.export_leaves` can invert them.
LLAMA_RULES: list[Rule] = [
    Rule(r"model\.embed_tokens\.weight", "model/embed_tokens/embedding", identity),
    Rule(
        r"model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight",
        r"model/layers/\1/self_attn/\2/kernel",
        linear,
    ),
    Rule(
        r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight",
        r"model/layers/\1/mlp/\2/kernel",
        linear,
    ),
    Rule(
        r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight",
        r"model/layers/\1/\2/scale",
        identity,
    ),
    Rule(r"model\.norm\.weight", "model/norm/scale", identity),
    Rule(r"lm_head\.weight", "lm_head/kernel", linear),
]

# Non-persistent RoPE buffer that transformers 4.31 checkpoints may still carry; recomputed from rope_theta.
LLAMA_IGNORE: list[str] = [r"(base_model\.model\.)?model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]

# PEFT LoRA leaves, with or without the `base_model.model.` prefix and the `.default` adapter name. Any of the
# four attention projections (READ targets q_proj and v_proj only; the LoRA match count is checked elsewhere).
PEFT_LORA_RULES: list[Rule] = [
    Rule(
        r"(?:base_model\.model\.)?model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
        r"\.lora_A(?:\.default)?\.weight",
        r"model/layers/\1/self_attn/\2/lora_a",
        linear,
    ),
    Rule(
        r"(?:base_model\.model\.)?model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
        r"\.lora_B(?:\.default)?\.weight",
        r"model/layers/\1/self_attn/\2/lora_b",
        linear,
    ),
]

# The base weights inside a PEFT-wrapped model's state dict: `base_model.model.` prefix, and newer PEFT
# versions' `base_layer.` inside the wrapped projections.
PEFT_BASE_RULES: list[Rule] = [
    Rule(
        r"base_model\.model\.model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
        r"\.(?:base_layer\.)?weight",
        r"model/layers/\1/self_attn/\2/kernel",
        linear,
    ),
] + [Rule(r"base_model\.model\." + r.source, r.target, r.transform) for r in LLAMA_RULES]

# Everything a PEFT-wrapped LLaMA state dict can hold (base + LoRA).
PEFT_LLAMA_RULES: list[Rule] = PEFT_LORA_RULES + PEFT_BASE_RULES + LLAMA_RULES
