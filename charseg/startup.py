"""What a charseg process does first: import torchvision without torch._dynamo.

torchvision.ops.roi_align imports `is_compile_supported` from torch._dynamo.utils when it is
imported (the function next to it, `lazy_compile`, says it exists to avoid "eagerly importing
dynamo"), and that import pulls in dynamo, sympy and torch.distributed.tensor: 1.1 s of every
process's start on a 2-core CPU, and 0.3 s more at its exit. torchvision calls the function only
when its compiled ops are missing or deterministic algorithms run on a GPU, so while torchvision
is imported, torch._dynamo.utils is a stand-in whose `is_compile_supported` imports the real one
when it is called; any other name asked of it imports the real module. The stand-in is gone
from sys.modules once torchvision is imported: a later `import torch._dynamo` (torch.compile)
gets the real package.
"""

from __future__ import annotations

import importlib
import sys
import types

DYNAMO_UTILS = "torch._dynamo.utils"


def import_torchvision() -> None:
    """Import torch and torchvision, torch._dynamo left unimported. No-op when torchvision or
    dynamo is already imported."""
    if "torchvision" in sys.modules or "torch._dynamo" in sys.modules:
        return
    import torch  # noqa: F401  (the stand-in replaces a submodule of an imported torch)

    stand_in = types.ModuleType(DYNAMO_UTILS, "charseg's stand-in while torchvision is imported (charseg.startup)")
    stand_in.is_compile_supported = is_compile_supported
    stand_in.__getattr__ = _real_attribute
    sys.modules[DYNAMO_UTILS] = stand_in
    try:
        import torchvision  # noqa: F401
    finally:
        if sys.modules.get(DYNAMO_UTILS) is stand_in:
            del sys.modules[DYNAMO_UTILS]


def is_compile_supported(device_type: str) -> bool:
    """torch._dynamo.utils.is_compile_supported, imported on the first call."""
    return _real_module().is_compile_supported(device_type)


def _real_attribute(name: str):
    """Any other name: from the real torch._dynamo.utils (the stand-in leaves sys.modules).
    Not dunders: inspect and others probe every module in sys.modules for `__file__`."""
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(_real_module(), name)


def _real_module() -> types.ModuleType:
    if getattr(sys.modules.get(DYNAMO_UTILS), "is_compile_supported", None) is is_compile_supported:
        del sys.modules[DYNAMO_UTILS]  # the stand-in
    return importlib.import_module(DYNAMO_UTILS)
