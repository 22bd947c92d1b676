"""Safety events: one record per intervention, for the audit trail.

Every time a safety component changes what the model would have emitted (a banned token, a
candidate blocked at text level, a regex hit, a reward veto, the all-banned EOS fallback) the
generation loop records a :class:`SafetyEvent`. Events are plain dataclasses so they can be
logged, serialised (:meth:`SafetyEvent.to_dict`) and counted by an operator tuning the list.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

__all__ = ["SafetyEvent", "EventCallback", "RULES"]

#: The rule names an event may carry.
RULES = ("token_ban", "text_match", "regex", "reward", "all_banned_fallback")


@dataclass
class SafetyEvent:
    """One intervention.

    Attributes:
        step: decoding step (0 = first generated token); ``-1`` when the producer does not know
            it (``PhraseMatcher.check_candidates`` leaves it for the caller to fill).
        row: batch row.
        token_id: the blocked candidate (or, for ``all_banned_fallback``, the emitted token).
        token_text: the candidate's decoded text.
        rule: one of :data:`RULES`.
        entity: the phrase or pattern that fired, if any.
        category: the entity's category, if known.
        severity: the entity's severity, if known.

    Example:
        >>> SafetyEvent(step=3, row=0, token_id=42, token_text=" bomb", rule="text_match",
        ...             entity="bomb", category="weapons", severity=3).to_dict()["rule"]
        'text_match'
    """

    step: int
    row: int
    token_id: int
    token_text: str
    rule: str
    entity: str | None = None
    category: str | None = None
    severity: int | None = None

    def to_dict(self) -> dict:
        """The event as a plain ``dict`` (JSON-serialisable)."""
        return asdict(self)


#: Signature of an event callback: called once per event, in order.
EventCallback = Callable[[SafetyEvent], None]
