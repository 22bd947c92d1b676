"""fastsafe: fused kernels for safety-aware decoding and masked preference training.

Heavy parts (transformers, the safety components, training) load lazily on first use.
"""
from __future__ import annotations

import importlib
import os as _os

__version__ = "0.1.0"

# In a source checkout without an install, make ``fastsafe.kernels`` resolve to ../kernels.
_kernels_dir = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
if _os.path.isdir(_kernels_dir) and not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "kernels")):
    import importlib.util as _ilu
    import sys as _sys
    if "fastsafe.kernels" not in _sys.modules:
        _spec = _ilu.spec_from_file_location("fastsafe.kernels", _os.path.join(_kernels_dir, "__init__.py"),
                                             submodule_search_locations=[_kernels_dir])
        if _spec is not None and _spec.loader is not None:
            _mod = _ilu.module_from_spec(_spec)
            _sys.modules["fastsafe.kernels"] = _mod
            _spec.loader.exec_module(_mod)
            kernels = _mod

_LAZY = {
    "SafeLogitsProcessor": "fastsafe.processor",
    "SafetyConfig": "fastsafe.config",
    "RiskEntityStore": "fastsafe.safety.store",
    "TSDIBias": "fastsafe.tsdi",
    "generate": "fastsafe.generation",
    "GenerationResult": "fastsafe.generation",
    "ops": "fastsafe.ops",
    "training": "fastsafe.training",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'fastsafe' has no attribute {name!r}")
    m = importlib.import_module(mod)
    value = m if mod.endswith("." + name) else getattr(m, name)
    globals()[name] = value
    return value
