"""LoRA as its own variable type on path-selected `Linear`s, plus the regex-driven trainable/frozen split.

PyTorch reference: peft 0.4 `tuners/lora.py` (`LoraModel`, `Linear`, `merge_and_unload`) as configured by
READ (`READ.py:1106-1190`, read_reference.md §6.1): targets `q_proj`/`v_proj` of every LLaMA layer, r=8 (64
for the from-scratch runs), alpha=16, dropout 0.05 on the LoRA input, A kaiming-uniform(a=sqrt 5), B zeros,
scale = alpha / r. What trains besides LoRA (`embed_tokens`, `lm_head`, mask decoder, fcs) is a list of
path regexes (`ReadConfig.trainable_regexes`), not code.

Shape letters: I/O input/output features of the wrapped Linear, R rank.

Paths are '/'-joined NNX paths (`model/layers/3/self_attn/q_proj`); the LoRA leaves sit inside the Linear:
`.../q_proj/lora_a` [I, R] and `.../q_proj/lora_b` [R, O], both `nnx.LoRAParam`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from read_jax.config import LoraConfig
from read_jax.layers import Linear
from read_jax.tree_util import path_str

LoRAParam = nnx.LoRAParam


def linear_paths(model: nnx.Module) -> dict[str, Linear]:
    """'/'-path -> every `read_jax.layers.Linear` in the model (in graph order)."""
    return {path_str(p): n for p, n in nnx.iter_graph(model) if isinstance(n, Linear)}


def _default_expected(model: nnx.Module) -> int:
    """2 x num_hidden_layers of the single LLaMA inside `model` (q_proj and v_proj per layer)."""
    from read_jax.llama import LlamaModel

    llamas = [n for _, n in nnx.iter_graph(model) if isinstance(n, LlamaModel)]
    if len(llamas) != 1:
        raise ValueError(
            f"cannot infer the expected LoRA match count: the model holds {len(llamas)} LLaMA "
            f"decoders; pass expected_matches"
        )
    return 2 * llamas[0].config.num_hidden_layers


def apply_lora(
    model: nnx.Module, lora_cfg: LoraConfig, *, rngs: nnx.Rngs, expected_matches: int | None = None
) -> list[str]:
    """Add LoRA leaves in place to every Linear whose path fully matches `lora_cfg.target_regex`.

    Args:
      model: any NNX module tree (a LlamaForCausalLM, or a ReadModel holding one).
      lora_cfg: rank r, alpha, dropout, target_regex (and optionally expected_matches).
      rngs: `params` stream for the A init.
      expected_matches: required number of matched modules; default `lora_cfg.expected_matches`, else
        2 x num_hidden_layers of the LLaMA in `model`.
    Returns:
      The matched paths, sorted.
    Raises:
      ValueError (before touching the model) listing the matched paths when their number differs from the
      expected count, or when the regex matches a module that is not a LoRA-capable `Linear`.
    """
    pattern = re.compile(lora_cfg.target_regex)
    if expected_matches is None:
        expected_matches = lora_cfg.expected_matches
    if expected_matches is None:
        expected_matches = _default_expected(model)
    matched, wrong_type = {}, []
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module) or not path:
            continue
        p = path_str(path)
        if pattern.fullmatch(p):
            if isinstance(node, Linear):
                matched[p] = node
            else:
                wrong_type.append(f"{p} ({type(node).__name__})")
    if wrong_type:
        raise ValueError(
            f"LoRA target_regex {lora_cfg.target_regex!r} matches modules that are not "
            f"read_jax.layers.Linear: {wrong_type}"
        )
    if len(matched) != expected_matches:
        raise ValueError(
            f"LoRA target_regex {lora_cfg.target_regex!r} matched {len(matched)} modules, "
            f"expected {expected_matches}; matched: {sorted(matched)}"
        )
    for p in sorted(matched):
        matched[p].add_lora(lora_cfg.r, lora_cfg.alpha, lora_cfg.dropout, rngs=rngs)
    return sorted(matched)


def merge_lora(model: nnx.Module, *, unload: bool = True) -> nnx.Module:
    """Fold every LoRA branch into its kernel, in place: W <- W + (alpha / r) * A @ B (PEFT `merge`).

    The product is formed in fp32 and cast once to the kernel's dtype. With `unload=True` (PEFT
    `merge_and_unload`, the layout of the released READ checkpoints, §10.1) the LoRA leaves are removed;
    with `unload=False` they stay and B is zeroed, so the tree keeps its structure and the forward is the
    same.
    Returns the same model.
    """
    for lin in linear_paths(model).values():
        if not lin.has_lora:
            continue
        w = lin.kernel[...]
        delta = (lin.lora_a[...].astype(jnp.float32) @ lin.lora_b[...].astype(jnp.float32)) * lin.lora_scale
        lin.kernel[...] = (w.astype(jnp.float32) + delta).astype(w.dtype)
        if unload:
            lin.lora_a = nnx.data(None)
            lin.lora_b = nnx.data(None)
            lin.lora_scale = 0.0
            lin.lora_dropout = 0.0
        else:
            lin.lora_b[...] = jnp.zeros_like(lin.lora_b[...])
    return model


def lora_state(model: nnx.Module) -> nnx.State:
    """Only the LoRA leaves (`.../lora_a`, `.../lora_b`)."""
    return nnx.state(model, LoRAParam)


def split_lora(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, lora_state, everything_else); `nnx.merge(graphdef, lora, rest)` rebuilds the model."""
    return nnx.split(model, LoRAParam, ...)


def trainable_filter(regexes: Sequence[str]) -> Callable[[tuple, object], bool]:
    """An NNX filter selecting parameters whose '/'-path fully matches one of `regexes`.

    Only `nnx.Param` leaves (LoRAParam included) can be trainable; RNG state and other variables never are.
    """
    compiled = [re.compile(r) for r in regexes]

    def is_trainable(path, value) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        p = path_str(path)
        return any(c.fullmatch(p) for c in compiled)

    return is_trainable


def partition_trainable(
    model: nnx.Module, regexes: Sequence[str], *, require_all: bool = False
) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable_state, frozen_state) by `trainable_filter(regexes)`.

    `nnx.merge(graphdef, trainable, frozen)` rebuilds the model (the train step does this inside the loss).
    With `require_all=True` a regex that selects no parameter raises ValueError (a typo would otherwise
    silently freeze a module); it is off by default because READ's list also names modules (mask decoder,
    fcs) that a bare LLaMA does not have.
    """
    if require_all:
        paths = [path_str(p) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
        unused = [r for r in regexes if not any(re.fullmatch(r, p) for p in paths)]
        if unused:
            raise ValueError(f"trainable regexes that match no parameter: {unused}")
    return nnx.split(model, trainable_filter(regexes), ...)


def count_params(state: nnx.State) -> int:
    """Total number of elements in a state (arrays or ShapeDtypeStructs, e.g. from `nnx.eval_shape`)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))
