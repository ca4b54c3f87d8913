"""Import Meta's `segment_anything` modeling code without torchvision.

The package `__init__` imports the predictor, whose transforms import torchvision; PyPI's torchvision does
not import beside the pinned CPU torch, and the modeling code needs torch alone. Without torchvision we
register a bare package (its `__init__` not run) and import the submodules from it.
"""

import importlib
import importlib.util
import sys
import types

from tests.helpers import require


def meta_sam():
    """(segment_anything.modeling, segment_anything.build_sam).

    Uses `require("torch")`, not `require_torch()`: the latter also turns autograd off globally, which the
    training benchmark and the gradient parity tests must not inherit from a mere import.
    """
    require("torch")
    try:
        from segment_anything import build_sam, modeling

        return modeling, build_sam
    except ModuleNotFoundError as e:
        if e.name != "torchvision":
            raise
    spec = importlib.util.find_spec("segment_anything")
    if spec is None:
        require("segment_anything")
    pkg = types.ModuleType("segment_anything")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__ = spec
    sys.modules["segment_anything"] = pkg
    return importlib.import_module("segment_anything.modeling"), importlib.import_module(
        "segment_anything.build_sam"
    )
