"""``LiveMatcher``: a :class:`PhraseMatcher` that follows a :class:`RiskEntityStore` while decoding runs.

Changes committed to the store are in force at the next :meth:`LiveMatcher.current` (a small
delta matcher beside the base, removals as a mask of entity indices: :class:`MatcherView`), and
a background rebuild merges them into a new base. See :class:`LiveMatcher` for the rules.
"""
from __future__ import annotations

import threading
import time
import warnings
from typing import Sequence

import numpy as np
import torch

from fastsafe.ops.validate import token_rows

from .events import SafetyEvent
from .matcher import PhraseMatcher, SkippedEntity, report_new_skips
from .store import RiskEntity

__all__ = ["LiveMatcher", "MatcherView"]


class MatcherView:
    """A base :class:`PhraseMatcher` with some of its entities masked, plus a small delta matcher.

    What :meth:`LiveMatcher.current` returns between a change and the background merge: the
    entities changed since the base was built are masked out of it (``drop``: entity indices,
    with the ones that share a token sequence or normalised text with them, which the delta
    re-adds), and the delta holds the active changed rows. Same interface as ``PhraseMatcher``
    for the decoding loops (``banned_bitmask``, ``check_candidates``, ``explain_token_ban``, ...).
    """

    def __init__(self, base: PhraseMatcher, delta: PhraseMatcher, drop: set[int], version: int):
        self.base, self.delta = base, delta
        self.version = version
        self.vocab_size = base.vocab_size
        self.tokenizer = base.tokenizer
        self._drop = frozenset(drop)
        self._drop_arr = np.fromiter(sorted(drop), np.int64, len(drop))
        self._static = base.static_bans(self._drop_arr) if drop else None
        self.max_phrase_tokens = max(base.max_phrase_tokens, delta.max_phrase_tokens)
        self.max_phrase_chars = max(base.max_phrase_chars, delta.max_phrase_chars)
        self.skipped = [x for x in base.skipped] + list(delta.skipped)

    @property
    def entities(self) -> list[RiskEntity]:
        return [e for i, e in enumerate(self.base.entities) if i not in self._drop] + list(self.delta.entities)

    def __len__(self) -> int:
        return len(self.base.entities) - len(self._drop) + len(self.delta.entities)

    @property
    def has_text_rules(self) -> bool:
        return self.base.has_text_rules or self.delta.has_text_rules

    @property
    def num_regexes(self) -> int:
        return self.base.num_regexes + self.delta.num_regexes

    def __repr__(self) -> str:
        return f"MatcherView(base={self.base!r}, masked={len(self._drop)}, delta={self.delta!r})"

    def banned_bitmask(self, histories, *, device=None) -> torch.Tensor:
        """As :meth:`PhraseMatcher.banned_bitmask` (bans of the base without the masked entities, AND the delta)."""
        if device is None:
            device = histories.device if isinstance(histories, torch.Tensor) else torch.device("cpu")
        out = self.base.bitmask_array(histories, self._drop_arr if self._drop else None, self._static)
        out &= self.delta.bitmask_array(histories)
        res = torch.from_numpy(out)
        return res if torch.device(device).type == "cpu" else res.to(device)

    def banned_tokens(self, history: Sequence[int]) -> set[int]:
        from fastsafe.ops.bitmask import unpack_bitmask
        allowed = unpack_bitmask(self.banned_bitmask([list(history)]), self.vocab_size)[0]
        return set((~allowed).nonzero().flatten().tolist())

    def explain_token_ban(self, history, token_id: int) -> RiskEntity | None:
        hit = self.delta.explain_token_ban(history, token_id)
        return hit if hit is not None else self.base.explain_token_ban(history, token_id, masked=self._drop)

    def check_candidates(self, histories, candidate_ids) -> tuple[torch.Tensor, list[SafetyEvent]]:
        """As :meth:`PhraseMatcher.check_candidates`: a candidate must pass the masked base and the delta."""
        allowed, events = self.base.check_candidates(histories, candidate_ids, masked=self._drop or None)
        if self.delta.has_text_rules:
            cands = candidate_ids if isinstance(candidate_ids, torch.Tensor) else torch.as_tensor(
                token_rows("candidate_ids", candidate_ids), dtype=torch.long)
            rest = torch.where(allowed.to(cands.device), cands, torch.full_like(cands, -1))
            ok2, ev2 = self.delta.check_candidates(histories, rest)
            allowed = allowed & ok2.to(allowed.device)
            events = events + ev2
        return allowed, events


class LiveMatcher:
    """Follows a :class:`RiskEntityStore`: every change committed before a call to :meth:`current`
    is in force in the matcher that call returns.

    Freshness (the rule the tests check, with the default settings): an add, update or remove
    committed before decoding step ``t`` starts is in force at step ``t``. Each :meth:`current`
    reads the store version (one indexed SQLite read, ``poll_interval=0``); when it moved, the
    rows changed since the base matcher was built are read (:meth:`RiskEntityStore.changes_since`)
    and compiled into a small *delta* matcher (milliseconds for a few entities), checked beside the
    base, whose copies of the changed entities are masked out (removals are this mask). A full
    rebuild (reusing the base's tokenisations) then runs in a background thread and replaces
    base + delta when done. A large import is compiled in that call too (the step waits for it).

    Fail closed, per entity: an entity that cannot be compiled for this tokenizer / vocabulary
    is skipped, listed in :attr:`skipped` with the reason and warned about once; every other
    entity and every later update stays in force.

    Args:
        store: the store to follow.
        tokenizer: as for :meth:`PhraseMatcher.build`.
        extra_phrases, extra_token_id_phrases, extra_regexes: entities not in the store (errors raise).
        poll_interval: seconds between version checks in :meth:`current` (default 0: every call;
            a positive value delays changes by up to that long).
        background: merge in a background thread (default); False rebuilds the whole matcher
            synchronously inside ``current`` instead of using a delta.
        merge_delay: seconds the background merge waits after a change before rebuilding, so a
            burst of edits costs one rebuild (the delta keeps every change in force meanwhile).
        on_skip: optional callback called once with each newly skipped :class:`SkippedEntity`.
        **build_kwargs: passed to :meth:`PhraseMatcher.build` (``vocab_size``, ``eos_token_id``, ...).

    Attributes:
        version: the store version the matcher :meth:`current` returns reflects.
        skipped: the entities not in force (:class:`SkippedEntity`).
        last_error: the last exception reading the store or building (the last good matcher stays).
        last_update_s: seconds the last change took from being seen to being in force.

    Example:
        >>> live = LiveMatcher(store, tok)                 # doctest: +SKIP
        >>> mask = live.current().banned_bitmask(ids)      # each decoding step  # doctest: +SKIP
    """

    def __init__(self, store, tokenizer, *, extra_phrases=(), extra_token_id_phrases=(), extra_regexes=(),
                 poll_interval: float = 0.0, background: bool = True, merge_delay: float = 1.0, on_skip=None,
                 **build_kwargs):
        self.store = store
        self.tokenizer = tokenizer
        self.extra_phrases = list(extra_phrases)
        self.extra_token_id_phrases = [list(x) for x in extra_token_id_phrases]
        self.extra_regexes = list(extra_regexes)
        self.poll_interval = float(poll_interval)
        self.background = bool(background)
        self.merge_delay = float(merge_delay)
        if not self.merge_delay >= 0:
            raise ValueError(f"merge_delay: expected a number of seconds >= 0, got {merge_delay!r}")
        self.on_skip = on_skip
        build_kwargs.pop("skip_invalid", None)
        build_kwargs.pop("warn", None)
        self.build_kwargs = build_kwargs
        self.last_error: Exception | None = None
        self.last_update_s: float | None = None
        self._reported: set = set()
        self._lock = threading.RLock()          # one update / swap at a time
        self._merge_thread: threading.Thread | None = None
        self._merge_done = threading.Condition()
        self._last_poll = time.monotonic()
        self._base = self._full_build(None)     # errors other than per-entity ones propagate
        self._view = self._base
        self._report(self._base.skipped)

    # ------------------------------------------------------------------ state
    @property
    def version(self) -> int:
        return self._view.version

    @property
    def skipped(self) -> list[SkippedEntity]:
        return list(self._view.skipped)

    def _report(self, items) -> None:
        report_new_skips(self._reported, items, self.on_skip)

    def _full_build(self, prev: PhraseMatcher | None) -> PhraseMatcher:
        v, ents = self.store.snapshot()
        m = PhraseMatcher.build(self.tokenizer, self.extra_phrases, token_id_phrases=self.extra_token_id_phrases,
                                regexes=self.extra_regexes, entities=ents, version=v, reuse=prev,
                                skip_invalid=True, warn=False, **self.build_kwargs)
        m.prepare_masks()                     # build the id / text maps here, not in a decoding step
        return m

    def _compose(self, base: PhraseMatcher):
        """The matcher for the store's current state on top of ``base`` (``base`` itself if unchanged)."""
        ch = self.store.changes_since(base.version)
        if ch is None:                         # the store cannot tell (purge): compile everything now
            return self._full_build(base)
        v, rows = ch
        if not rows:
            if v == base.version:
                return base
            m = PhraseMatcher.build(self.tokenizer, entities=(), vocab_size=base.vocab_size, version=v)
            return MatcherView(base, m, set(), v)
        drop = base.indices_of_ids({e.id for e in rows})
        extra = base.collateral(drop) if drop else set()
        ents = [e for e in rows if e.active] + [base.entities[i] for i in sorted(extra)]
        delta = PhraseMatcher.build(self.tokenizer, entities=ents, version=v, reuse=base, skip_invalid=True,
                                    warn=False, **self.build_kwargs)
        return MatcherView(base, delta, drop | extra, v)

    def _update(self) -> None:
        """Bring the view up to the store's current version (in this thread)."""
        t0 = time.perf_counter()
        with self._lock:
            try:
                if self.background:
                    view = self._compose(self._base)
                else:
                    view = self._base = self._full_build(self._base)
            except Exception as exc:  # noqa: BLE001 - keep the last good matcher; report loudly
                self.last_error = exc
                warnings.warn(f"fastsafe: risk store {getattr(self.store, 'path', self.store)!r} could not be "
                              f"read or compiled ({type(exc).__name__}: {exc}); the matcher of version "
                              f"{self._view.version} stays in force", RuntimeWarning, stacklevel=3)
                return
            self._view = view
            self.last_error = None
            self.last_update_s = time.perf_counter() - t0
            self._report(view.skipped)
            if isinstance(view, MatcherView) and self._merge_thread is None:
                self._merge_thread = threading.Thread(target=self._merge, name="fastsafe-live-matcher",
                                                      daemon=True)
                self._merge_thread.start()

    def _merge(self) -> None:
        """Background: rebuild the whole matcher, then swap it in as the new base."""
        try:
            while True:
                if self.merge_delay:
                    time.sleep(self.merge_delay)
                base = self._full_build(self._base)
                with self._lock:
                    self._base = base
                    view = self._compose(base)
                    if view.version >= self._view.version:
                        self._view = view
                    self._report(view.skipped)
                    if not isinstance(view, MatcherView) or view.version <= base.version:
                        self._merge_thread = None
                        return
        except Exception as exc:  # noqa: BLE001 - the view in force stays; the next change retries
            self.last_error = exc
            with self._lock:
                self._merge_thread = None
        finally:
            with self._merge_done:
                self._merge_done.notify_all()

    # ------------------------------------------------------------------ API
    def refresh(self, *, block: bool = True) -> "PhraseMatcher | MatcherView":
        """Check the store now and bring the matcher up to date; with ``block`` also wait for the
        background merge (so the result is one fully built :class:`PhraseMatcher`)."""
        self._last_poll = time.monotonic()
        try:
            v = self.store.version()
        except Exception as exc:  # noqa: BLE001 - keep the matcher in force, and say that updates stopped
            if self.last_error is None:
                warnings.warn(f"fastsafe: risk store {getattr(self.store, 'path', self.store)!r} cannot be read "
                              f"({type(exc).__name__}: {exc}); the matcher of version {self._view.version} stays "
                              f"in force and later changes are not seen until it can be read again",
                              RuntimeWarning, stacklevel=3)
            self.last_error = exc
            return self._view
        if v != self._view.version:
            self._update()
        if block:
            self.wait_merged()
        return self._view

    def current(self) -> "PhraseMatcher | MatcherView":
        """The matcher in force now: every change committed before this call is in it (see the class doc)."""
        if time.monotonic() - self._last_poll >= self.poll_interval:
            return self.refresh(block=False)
        return self._view

    def wait_merged(self, timeout: float = 60.0) -> bool:
        """Wait until no background merge runs (the view is one ``PhraseMatcher``); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._merge_done:
            while self._merge_thread is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._merge_done.wait(min(left, 0.05))
        return True

    def wait_for(self, version: int, timeout: float = 30.0) -> bool:
        """Block until the current matcher reflects ``version`` or newer; False on timeout."""
        deadline = time.monotonic() + timeout
        while self._view.version is None or self._view.version < version:
            if time.monotonic() > deadline:
                return False
            self.refresh(block=False)
            if self._view.version is not None and self._view.version >= version:
                break
            time.sleep(0.01)
        return True
