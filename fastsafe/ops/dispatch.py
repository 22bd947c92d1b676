"""Backend registry and selection for the ops.

Backends: ``torch`` (reference, any device), ``cpp`` (C++ CPU extension), ``triton`` (GPU; on the
CPU only under ``TRITON_INTERPRET=1``), ``cuda`` (C++ CUDA extension). Default choice per device:
CUDA tensor -> triton, else cuda, else torch; CPU tensor -> cpp, else torch. ``FASTSAFE_BACKEND``
or an explicit ``backend=`` overrides.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

BACKEND_NAMES = ("torch", "cpp", "triton", "cuda")
_DEFAULT_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}


@dataclass(frozen=True)
class BackendInfo:
    """Availability of one backend: ``available`` and, when unavailable, ``reason``."""

    name: str
    available: bool
    reason: str
    devices: tuple

    def __str__(self) -> str:
        state = "available" if self.available else f"unavailable: {self.reason}"
        return f"{self.name:7s} [{'/'.join(self.devices)}] {state}"


def native_module():
    """The compiled extension ``fastsafe._C``, or raise ImportError with the reason."""
    return importlib.import_module("fastsafe._C")


def _probe_native(fn_name: str):
    try:
        mod = native_module()
    except Exception as exc:  # ImportError, OSError (bad .so), ...
        return False, (f"native extension fastsafe._C not importable ({type(exc).__name__}: {exc}); "
                       f"reinstall with `pip install --no-build-isolation -e .` to build it")
    if not hasattr(mod, fn_name):
        return False, f"fastsafe._C was built without {fn_name} (no CUDA toolkit / CPU-only torch at build time)"
    return True, ""


def _probe(name: str):
    if name == "torch":
        return True, ""
    if name == "cpp":
        return _probe_native("safe_topk_cpu")
    if name == "cuda":
        ok, why = _probe_native("safe_topk_cuda")
        if ok and not torch.cuda.is_available():
            return False, "no CUDA device visible to torch"
        return ok, why
    if name == "triton":
        try:
            importlib.import_module("triton")
        except Exception as exc:
            return False, f"triton not importable ({type(exc).__name__}: {exc})"
        try:
            importlib.import_module("fastsafe.kernels")
        except Exception as exc:
            return False, f"fastsafe.kernels not importable ({type(exc).__name__}: {exc})"
        if not torch.cuda.is_available() and not interpreter_enabled():
            return False, "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on the CPU)"
        return True, ""
    raise ValueError(f"backend: expected one of {BACKEND_NAMES}, got {name!r}")


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _devices(name: str) -> tuple:
    return {"torch": ("cpu", "cuda"), "cpp": ("cpu",), "cuda": ("cuda",),
            "triton": ("cuda", "cpu(interpreter)")}[name]


_INFO_CACHE: Dict[str, BackendInfo] = {}


def backends(refresh: bool = False) -> Dict[str, BackendInfo]:
    """Every backend with its availability and, if unavailable, the reason.

    Example:
        >>> for info in fastsafe.ops.backends().values(): print(info)
        torch   [cpu/cuda] available
        cpp     [cpu] available
        ...
    """
    if refresh:
        _INFO_CACHE.clear()
    out = {}
    for name in BACKEND_NAMES:
        info = _INFO_CACHE.get(name)
        if info is None:
            ok, why = _probe(name)
            info = BackendInfo(name, ok, why, _devices(name))
            _INFO_CACHE[name] = info
        out[name] = info
    return out


def _supports(name: str, device: torch.device) -> bool:
    if name == "torch":
        return True
    if name == "cpp":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    if name == "triton":
        return device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())
    return False


def backend_for(tensor: torch.Tensor, backend: Optional[str] = None) -> str:
    """Name of the backend that runs an op on ``tensor``'s device.

    ``backend`` (or else the ``FASTSAFE_BACKEND`` environment variable) forces a choice; it must
    be available and support the device. Otherwise the fastest available default is taken.

    Example:
        >>> fastsafe.ops.backend_for(torch.zeros(2, 10))
        'cpp'
    """
    device = tensor.device
    forced = backend if backend is not None else (os.environ.get("FASTSAFE_BACKEND") or None)
    if forced is not None:
        origin = "backend" if backend is not None else "FASTSAFE_BACKEND"
        if forced not in BACKEND_NAMES:
            raise ValueError(f"{origin}: expected one of {BACKEND_NAMES}, got {forced!r}")
        info = backends()[forced]
        if not _supports(forced, device):
            raise ValueError(f"{origin}: backend {forced!r} does not run on {device.type} tensors "
                             f"(it runs on {'/'.join(info.devices)})")
        if not info.available:
            raise RuntimeError(f"{origin}: backend {forced!r} is unavailable: {info.reason}")
        return forced
    for name in _DEFAULT_ORDER.get(device.type, ("torch",)):
        if backends()[name].available and _supports(name, device):
            return name
    return "torch"


_IMPLS: Dict[tuple, Callable] = {}


def register(op: str, backend: str):
    """Decorator registering ``fn(inputs)`` as ``op``'s implementation for ``backend``."""
    def deco(fn):
        _IMPLS[(op, backend)] = fn
        return fn
    return deco


def implementation(op: str, backend: str) -> Callable:
    key = (op, backend)
    if key not in _IMPLS:
        # Backends register themselves on import of their module.
        importlib.import_module(f"fastsafe.ops.backend_{backend}")
    try:
        return _IMPLS[key]
    except KeyError:
        raise RuntimeError(f"backend {backend!r} has no implementation of {op}") from None
