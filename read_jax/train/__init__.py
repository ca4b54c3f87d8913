"""READ training: the run config (`config`), the sharded model state and optimizer (`state`), the pure train
step
(`step`), run checkpoints (`checkpoints`) and the sectioned loop (`loop.train_and_evaluate`).

A training step, from the CLI down: `read_jax.cli.train.main` -> `loop.train_and_evaluate` ->
`data.loaders.next_step_batch` -> the compiled `step.train_step` -> `step.micro_loss` -> `ReadModel.__call__`
-> `losses.read_batch_loss`.
"""

from read_jax.train.config import default_config, read_config
from read_jax.train.loop import NonFiniteLossError, train_and_evaluate

__all__ = ["NonFiniteLossError", "default_config", "read_config", "train_and_evaluate"]
