"""torch <-> numpy conversions shared by the references, the parity tests and the benchmarks.

Duck-typed on torch tensors (`.detach()`), so importing this module does not import torch.
"""

from __future__ import annotations

import numpy as np


def state_dict_numpy(module) -> dict:
    """A torch module's state dict as float32 numpy arrays."""
    return {k: v.detach().float().cpu().numpy() for k, v in module.state_dict().items()}


def to_np(x):
    """A torch tensor as a float32 numpy array; anything else through `np.asarray`."""
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)
