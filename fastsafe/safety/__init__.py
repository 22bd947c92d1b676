"""Safety components around the kernels: the risk-entity store, phrase matching, normalisation.

>>> from fastsafe.safety import RiskEntityStore, PhraseMatcher, LiveMatcher, SafetyEvent, normalize_text
>>> from fastsafe.safety import DeviceMatcher     # the same checks as tensor programs on a device

Names load lazily, so the store and the ``fastsafe entities`` command do not import torch.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "SafetyEvent": "events", "EventCallback": "events", "RULES": "events",
    "RiskEntity": "store", "RiskEntityStore": "store", "RiskStoreError": "store", "KINDS": "store",
    "PhraseMatcher": "matcher", "LiveMatcher": "live_matcher", "MatcherView": "live_matcher", "SkippedEntity": "matcher", "phrase_variants": "matcher",
    "normalize_text": "normalize", "light_normalize": "normalize", "deleet_forms": "normalize",
    "TokenIndex": "token_index",
    "DeviceMatcher": "device_matcher",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'fastsafe.safety' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
