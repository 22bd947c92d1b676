"""Make a deprecation that fastsafe's own code triggers fail the test that triggered it.

pytest's ``filterwarnings = error::FutureWarning:fastsafe`` (pyproject.toml) only sees warnings
*attributed* to a fastsafe module, but libraries attribute their deprecation warnings to whatever
frame sits ``stacklevel`` above them: transformers' renamed ``past_key_values`` warned from
``torch/nn/modules/module.py`` even though fastsafe made the call. :func:`install` wraps
``warnings.warn`` so that a ``DeprecationWarning``/``FutureWarning`` is re-attributed to the
nearest frame outside third-party code; when that frame is a fastsafe module the ini filter turns
it into an error. Warnings whose nearest first-party caller is a test, an example or a benchmark
keep their attribution (third-party deprecations reached from test code are fine).
"""
from __future__ import annotations

import sys
import warnings

_FIRST_PARTY = ("fastsafe", "tests", "benchmarks", "examples", "__main__")
_DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
_original_warn = warnings.warn
# Deprecations that one library raises about its own internals, whatever the caller does (so not
# fastsafe's to fix): torch 2.7's functorch instantiates an autograd Function inside vmap, which
# dynamo reaches when it traces transformers 4.x's causal mask in the compiled decoding loop.
_LIBRARY_INTERNAL = ("Methods on autograd functions are all static",)


def _first_party_level(start: int) -> int | None:
    """Stack level (as ``warnings.warn`` counts it from its caller) of the nearest fastsafe frame,
    or ``None`` when the nearest first-party frame is not fastsafe's (or there is none)."""
    frame = sys._getframe(start)
    level = 1
    while frame is not None:
        name = frame.f_globals.get("__name__", "") or ""
        top = name.split(".", 1)[0]
        if top in _FIRST_PARTY:
            return level if top == "fastsafe" else None
        frame = frame.f_back
        level += 1
    return None


def _warn(message, category=None, stacklevel=1, source=None, **kwargs):
    cat = type(message) if isinstance(message, Warning) else (category or UserWarning)
    if (isinstance(cat, type) and issubclass(cat, _DEPRECATIONS)
            and not any(m in str(message) for m in _LIBRARY_INTERNAL)):
        level = _first_party_level(2)            # frame 0 = _warn, 1 = caller of warnings.warn
        if level is not None and level > stacklevel:
            stacklevel = level
    return _original_warn(message, category, stacklevel=stacklevel + 1, source=source, **kwargs)


def install() -> None:
    """Route ``warnings.warn`` through the re-attribution above (idempotent)."""
    if warnings.warn is not _warn:
        warnings.warn = _warn
