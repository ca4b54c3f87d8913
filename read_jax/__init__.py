"""read_jax: READ (Reasoning to Attend, CVPR 2025) in JAX/Flax NNX."""

from read_jax.config import (ClipVisionConfig, LlamaConfig, LoraConfig, ReadConfig, SamConfig,
                             SaspConfig)

__all__ = ["ClipVisionConfig", "LlamaConfig", "LoraConfig", "ReadConfig", "SamConfig", "SaspConfig"]
__version__ = "0.1.0"
