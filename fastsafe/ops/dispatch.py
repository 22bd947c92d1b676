"""One backend registry and one selection rule for every fastsafe op.

Backends: ``torch`` (reference, any device), ``cpp`` (C++ CPU extension), ``triton`` (GPU; on the
CPU only under ``TRITON_INTERPRET=1``), ``cuda`` (C++ CUDA extension). Each op names the backends
that implement it and its default order per device (:data:`OPS`):

=================== ========================= ============================= ===================
op                  backends                  CUDA tensor default           CPU tensor default
=================== ========================= ============================= ===================
``safe_topk``       torch, cpp, triton, cuda  triton, else cuda, else torch cpp, else torch
``token_logps``     torch, triton             triton, else torch            torch
``device_matcher``  torch, cpp, cuda          cuda, else torch              cpp, else torch
=================== ========================= ============================= ===================

``device_matcher`` is the step of :class:`fastsafe.safety.DeviceMatcher` (advance, banned_bitmask,
check_candidates); its torch backend is the matcher's tensor program.

Overrides, one rule for every op: an explicit ``backend=`` argument, else the ``FASTSAFE_BACKEND``
environment variable. ``FASTSAFE_BACKEND`` holds either one backend name (``cpp``), applied to
every op that implements it (the others keep their default), or per-op choices
(``safe_topk:cpp,token_logps:torch``), which must each be implemented by their op. A forced
backend must be available and run on the tensor's device, else the call fails naming why.
``fastsafe backends`` prints the table with each backend's availability per op.
"""
from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from types import MappingProxyType
from typing import Dict, Mapping, Optional, Tuple

import torch

BACKEND_NAMES = ("torch", "cpp", "triton", "cuda")


@dataclass(frozen=True)
class OpSpec:
    """One op in the registry: its backends, default order per device type, and the modules
    (per backend) that must import for the backend to be available for this op."""

    name: str
    backends: Tuple[str, ...]
    default_order: Dict[str, Tuple[str, ...]]
    modules: Dict[str, str]
    native_symbols: Dict[str, str]


OPS: Dict[str, OpSpec] = {
    "safe_topk": OpSpec(
        "safe_topk", ("torch", "cpp", "triton", "cuda"),
        {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")},
        {"triton": "fastsafe.kernels.safe_topk"},
        {"cpp": "safe_topk_cpu", "cuda": "safe_topk_cuda"}),
    # CPU tensors default to torch even under TRITON_INTERPRET=1 (the interpreter is for tests).
    "token_logps": OpSpec(
        "token_logps", ("torch", "triton"),
        {"cuda": ("triton", "torch"), "cpu": ("torch",)},
        {"triton": "fastsafe.kernels.token_logps"},
        {}),
    # The DeviceMatcher step (advance, banned_bitmask, check_candidates): torch = its tensor program.
    "device_matcher": OpSpec(
        "device_matcher", ("torch", "cpp", "cuda"),
        {"cuda": ("cuda", "torch"), "cpu": ("cpp", "torch")},
        {},
        {"cpp": "device_matcher_advance_cpu", "cuda": "device_matcher_advance_cuda"}),
}
OP_NAMES = tuple(OPS)


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


@functools.cache
def native_module():
    """The compiled extension ``fastsafe._C`` (imported on first use and kept; a failed import is
    not kept, it raises ImportError with the reason on every call)."""
    return importlib.import_module("fastsafe._C")


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` is set (Triton kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _probe_native(fn_name: str):
    try:
        mod = native_module()
    except Exception as exc:  # ImportError, OSError (bad .so), ...
        return False, (f"native extension fastsafe._C not importable ({type(exc).__name__}: {exc}); "
                       f"reinstall with `pip install --no-build-isolation -e .` to build it")
    if not hasattr(mod, fn_name):
        return False, f"fastsafe._C was built without {fn_name} (no CUDA toolkit / CPU-only torch at build time)"
    return True, ""


def _probe_module(module: str):
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a Triton that cannot build for this GPU
        return False, f"{module} not importable ({type(exc).__name__}: {exc})"
    return True, ""


def _probe(name: str, op: Optional[str]):
    """Importability of ``name`` (for ``op``, or the backend as a whole for ``op=None``)."""
    if name == "torch":
        return True, ""
    if name in ("cpp", "cuda"):
        symbol = OPS[op].native_symbols[name] if op is not None else f"safe_topk_{'cpu' if name == 'cpp' else 'cuda'}"
        ok, why = _probe_native(symbol)
        if ok and name == "cuda" and not torch.cuda.is_available():
            return False, "no CUDA device visible to torch"
        return ok, why
    if name == "triton":
        ok, why = _probe_module("triton")
        if not ok:
            return ok, why
        return _probe_module(OPS[op].modules["triton"] if op is not None else "fastsafe.kernels")
    raise ValueError(f"backend: expected one of {BACKEND_NAMES}, got {name!r}")


def _devices(name: str) -> tuple:
    return {"torch": ("cpu", "cuda"), "cpp": ("cpu",), "cuda": ("cuda",),
            "triton": ("cuda", "cpu(interpreter)")}[name]


_IMPORT_CACHE: Dict[tuple, tuple] = {}


def _info(name: str, op: Optional[str]) -> BackendInfo:
    # Checked on every call (not cached), so a later TRITON_INTERPRET=1 takes effect; and before
    # any kernel module is imported, since @triton.jit picks interpreted or compiled at import.
    if name == "triton" and not torch.cuda.is_available() and not interpreter_enabled():
        return BackendInfo(name, False, "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on the CPU)",
                           _devices(name))
    key = (name, op)
    if key not in _IMPORT_CACHE:
        _IMPORT_CACHE[key] = _probe(name, op)
    ok, why = _IMPORT_CACHE[key]
    return BackendInfo(name, ok, why, _devices(name))


def _check_op(op: str) -> OpSpec:
    try:
        return OPS[op]
    except KeyError:
        raise ValueError(f"op: expected one of {OP_NAMES}, got {op!r}") from None


def backends(refresh: bool = False, op: Optional[str] = None) -> Dict[str, BackendInfo]:
    """Every backend with its availability and, if unavailable, the reason.

    ``op=None`` lists the four backends as a whole; ``op="token_logps"`` (any name of
    :data:`OPS`) lists only the backends of that op, available when that op's kernels import.

    Example:
        >>> for info in fastsafe.ops.backends().values(): print(info)
        torch   [cpu/cuda] available
        cpp     [cpu] available
        ...
        >>> sorted(fastsafe.ops.backends(op="token_logps"))
        ['torch', 'triton']
    """
    if refresh:
        _IMPORT_CACHE.clear()
    names = BACKEND_NAMES if op is None else _check_op(op).backends
    return {name: _info(name, op) for name in names}


def _supports(name: str, device: torch.device) -> bool:
    if name == "torch":
        return True
    if name == "cpp":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    if name == "triton":
        return device.type in ("cuda", "cpu")
    return False


_ENV = "FASTSAFE_BACKEND"


@functools.lru_cache(maxsize=32)
def _env_choices(env: str) -> Mapping[str, str]:
    """``op -> backend`` forced by the ``FASTSAFE_BACKEND`` value ``env`` (parsed once per distinct
    value; an invalid value raises on every call, since a raise is not cached)."""
    if ":" not in env:
        name = env.strip()
        if name not in BACKEND_NAMES:
            raise ValueError(f"{_ENV}: expected one of {BACKEND_NAMES} (or op:backend pairs such as "
                             f"'safe_topk:cpp,token_logps:torch'), got {env!r}")
        return MappingProxyType({op: name for op, spec in OPS.items() if name in spec.backends})
    chosen: Dict[str, str] = {}
    for part in env.split(","):
        if not part.strip():
            continue
        op_name, sep, name = (s.strip() for s in part.partition(":"))
        if not sep or op_name not in OPS or name not in BACKEND_NAMES:
            raise ValueError(f"{_ENV}: expected 'op:backend' pairs with op in {OP_NAMES} and backend in "
                             f"{BACKEND_NAMES}, got {part.strip()!r} in {env!r}")
        if name not in OPS[op_name].backends:
            raise ValueError(f"{_ENV}: {op_name} has no {name!r} backend "
                             f"(it has {', '.join(OPS[op_name].backends)}), got {env!r}")
        chosen[op_name] = name                   # a later pair for the same op wins
    return MappingProxyType(chosen)


def _forced(op: str, backend: Optional[str]) -> Tuple[Optional[str], str]:
    """The forced backend for ``op`` and where it came from, or ``(None, "")``."""
    spec = OPS[op]
    if backend is not None:
        if backend not in BACKEND_NAMES:
            raise ValueError(f"backend: expected one of {BACKEND_NAMES} or None, got {backend!r}")
        if backend not in spec.backends:
            raise ValueError(f"backend: {op} has no {backend!r} backend (it has {', '.join(spec.backends)})")
        return backend, "backend"
    env = os.environ.get(_ENV) or ""
    if not env.strip():
        return None, ""
    chosen = _env_choices(env).get(op)
    return (chosen, _ENV) if chosen is not None else (None, "")


def backend_for(tensor: torch.Tensor, backend: Optional[str] = None, *, op: str = "safe_topk") -> str:
    """Name of the backend that runs ``op`` on ``tensor``'s device.

    ``backend`` (or else the ``FASTSAFE_BACKEND`` environment variable, see the module doc) forces
    a choice; it must be one of ``op``'s backends, available, and run on the device. Otherwise the
    first available backend of ``op``'s default order for the device is taken.

    Under ``torch.compile`` the choice is made once, when the graph is traced, and is a constant
    of the graph (probing a backend imports modules, which dynamo cannot trace).

    Example:
        >>> fastsafe.ops.backend_for(torch.zeros(2, 10))
        'cpp'
        >>> fastsafe.ops.backend_for(torch.zeros(2, 10), op="token_logps")
        'torch'
    """
    if torch.compiler.is_compiling():
        return _traced_backend(tensor.device.type, tensor.device.index, backend, op)
    return _select(tensor.device, backend, op)


@torch.compiler.assume_constant_result
def _traced_backend(device_type: str, index: Optional[int], backend: Optional[str], op: str) -> str:
    # Runs eagerly while dynamo traces; the result is a constant of the graph.
    return _select(torch.device(device_type, index), backend, op)


def _select(device: torch.device, backend: Optional[str], op: str) -> str:
    spec = _check_op(op)
    forced, origin = _forced(op, backend)
    if forced is not None:
        info = _info(forced, op)
        if not _supports(forced, device):
            raise ValueError(f"{origin}: backend {forced!r} does not run on {device.type} tensors "
                             f"(it runs on {'/'.join(info.devices)})")
        if not info.available:
            raise RuntimeError(f"{origin}: backend {forced!r} is unavailable for {op}: {info.reason}")
        return forced
    for name in spec.default_order.get(device.type, ("torch",)):
        if _supports(name, device) and _info(name, op).available:
            return name
    return "torch"


def describe() -> str:
    """The text of ``fastsafe backends``: a table of backends x ops, the reasons of what is
    unavailable, and each op's default backend for CPU (and CUDA, when visible) tensors.

    Example:
        >>> print(fastsafe.ops.dispatch.describe())
        backend  devices                safe_topk    token_logps
        torch    cpu/cuda               available    available
        cpp      cpu                    available    -
        ...
    """
    width = max(12, *(len(op) + 2 for op in OPS))
    lines = [f"{'backend':8s} {'devices':22s} " + "".join(f"{op:{width}s}" for op in OPS).rstrip()]
    reasons = {}
    for name in BACKEND_NAMES:
        cells = []
        for op, spec in OPS.items():
            if name not in spec.backends:
                cells.append("-")
                continue
            info = _info(name, op)
            cells.append("available" if info.available else "unavailable")
            if not info.available:
                reasons.setdefault(info.reason, []).append(f"{name} ({op})")
        lines.append(f"{name:8s} {'/'.join(_devices(name)):22s} " + "".join(f"{c:{width}s}" for c in cells).rstrip())
    for why, where in reasons.items():
        lines.append(f"unavailable {', '.join(where)}: {why}")
    devices = [torch.empty(0)] + ([torch.empty(0, device="cuda")] if torch.cuda.is_available() else [])
    for t in devices:
        chosen = []
        for op in OPS:
            try:
                chosen.append(f"{op}={backend_for(t, op=op)}")
            except (ValueError, RuntimeError) as exc:  # a bad FASTSAFE_BACKEND: show it, per op
                chosen.append(f"{op}=error ({exc})")
        lines.append(f"default for {t.device.type} tensors: {', '.join(chosen)}")
    return "\n".join(lines)
