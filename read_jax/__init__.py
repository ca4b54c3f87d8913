"""read_jax: READ (Reasoning to Attend, CVPR 2025) in JAX/Flax NNX.

Public API (the model modules are imported lazily so that `import read_jax` stays light):

    ReadConfig (read_7b / read_13b / tiny / shapes / smoke), ReadModel, build_model, load_model, predict,
    load_for_inference, apply_lora
"""

from read_jax.config import ClipVisionConfig, LlamaConfig, LoraConfig, ReadConfig, SamConfig, SaspConfig

__all__ = [
    "ClipVisionConfig",
    "LlamaConfig",
    "LoraConfig",
    "ReadConfig",
    "ReadModel",
    "SamConfig",
    "SaspConfig",
    "apply_lora",
    "build_model",
    "load_for_inference",
    "load_model",
    "predict",
]
__version__ = "0.1.0"

_LAZY = {
    "ReadModel": ("read_jax.read_model", "ReadModel"),
    "predict": ("read_jax.inference", "predict"),
    "load_for_inference": ("read_jax.inference", "load_for_inference"),
    "apply_lora": ("read_jax.lora", "apply_lora"),
    "build_model": ("read_jax.build", "build_model"),
    "load_model": ("read_jax.build", "load_model"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'read_jax' has no attribute {name!r}")
