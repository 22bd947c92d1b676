"""Safety components around the kernels: the risk-entity store, phrase matching, normalisation.

>>> from fastsafe.safety import RiskEntityStore, PhraseMatcher, LiveMatcher, SafetyEvent, normalize_text
"""
from .events import RULES, EventCallback, SafetyEvent
from .matcher import LiveMatcher, PhraseMatcher, phrase_variants
from .normalize import light_normalize, normalize_text
from .store import KINDS, RiskEntity, RiskEntityStore, RiskStoreError

__all__ = ["SafetyEvent", "EventCallback", "RULES", "RiskEntity", "RiskEntityStore", "RiskStoreError", "KINDS",
           "PhraseMatcher", "LiveMatcher", "phrase_variants", "normalize_text", "light_normalize"]
