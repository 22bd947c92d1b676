"""Audit of the vLLM adapter: interventions counted per policy and rule, logged, exposed.

A step records its interventions as small device tensors (token bans of the best token, text
matches of the top-k candidates with the entity id, all-banned fallbacks) and starts their copy to
the host without waiting (``non_blocking`` into pinned memory plus a CUDA event). :meth:`Audit.drain`,
called between steps, turns the records whose copy has finished into counts and log lines; a step
never waits for the host. Every event is logged at INFO through vLLM's logger::

    fastsafe: policy=default rule=text_match request=17 row=3 step=42 token=' bomb' entity='make a bomb'

and every ``log_interval`` seconds (when something changed) one summary line::

    fastsafe: interventions: default token_ban=12 text_match=3 all_banned_fallback=0 | strict ...

:func:`metrics` returns the counts of every processor in the calling process (the engine-core /
worker process; an API server in another process sees its own, empty, counts, so operators read
the log lines there).
"""
from __future__ import annotations

import threading
import time
import weakref

import torch

__all__ = ["Audit", "metrics", "RULES"]

#: The rules counted, per policy.
RULES = ("token_ban", "text_match", "regex", "all_banned_fallback")

_registry: "weakref.WeakSet[Audit]" = weakref.WeakSet()
_registry_lock = threading.Lock()


def metrics() -> dict:
    """A snapshot of the adapter's counters in this process.

    Returns:
        ``{"policies": {name: {rule: count}}, "steps": int, "requests": int, "pending_records": int}``
        summed over every live processor of the process (drained records only).

    Example:
        >>> from fastsafe.integrations.vllm import metrics
        >>> metrics()["policies"]          # doctest: +SKIP
        {'default': {'token_ban': 3, 'text_match': 1, 'regex': 0, 'all_banned_fallback': 0}}
    """
    out: dict = {"policies": {}, "steps": 0, "requests": 0, "pending_records": 0}
    with _registry_lock:
        audits = list(_registry)
    for a in audits:
        with a._lock:
            for name, rules in a.counts.items():
                dst = out["policies"].setdefault(name, {r: 0 for r in RULES})
                for r, n in rules.items():
                    dst[r] += n
            out["steps"] += a.steps
            out["requests"] += a.requests
            out["pending_records"] += len(a._pending)
    return out


class _Record:
    __slots__ = ("rule", "policy", "step", "rows", "seqs", "host", "event", "matcher")

    def __init__(self, rule, policy, step, rows, seqs, data, matcher):
        self.rule, self.policy, self.step, self.rows, self.seqs, self.matcher = rule, policy, step, rows, seqs, matcher
        if data.device.type == "cpu":
            self.host, self.event = data, None
        else:
            self.host = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
            self.host.copy_(data, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def ready(self) -> bool:
        return self.event is None or self.event.query()


class Audit:
    """Counters and log lines of one processor.

    Args:
        policy_names: the server's policy names (every one gets a row of zero counts).
        logger: vLLM's logger (``vllm.logger.init_logger``) or any ``logging.Logger``.
        text: ``token_id -> str`` for log lines.
        log_interval: seconds between summary lines.
        log_events: log every event at INFO (else only the summaries).
    """

    def __init__(self, policy_names, logger, *, text=None, log_interval: float = 60.0, log_events: bool = True):
        self.logger = logger
        self._text = text or (lambda t: str(t))
        self.log_interval = float(log_interval)
        self.log_events = bool(log_events)
        self.counts = {n: {r: 0 for r in RULES} for n in policy_names}
        self.steps = 0
        self.requests = 0
        self._pending: list[_Record] = []
        self._lock = threading.Lock()
        self._last_summary = time.monotonic()
        self._changed = False
        with _registry_lock:
            _registry.add(self)

    # ------------------------------------------------------------------ recording (step thread, no host read)
    def record(self, rule: str, policy: str, step: int, rows, seqs, data: torch.Tensor, matcher=None) -> None:
        """Keep one step's device record.

        ``data`` by rule: ``token_ban`` ``[b, 3]`` (best token, hit, entity id or -1), ``all_banned_fallback`` ``[b]``
        (hit), ``text_match`` ``[b, 2k]`` (candidate ids, entity ids with -1 = none). ``rows`` /
        ``seqs``: the host row indices and request numbers of its ``b`` rows.
        """
        self._pending.append(_Record(rule, policy, step, rows, seqs, data.detach(), matcher))

    def count_host(self, policy: str, rule: str, n: int = 1) -> None:
        """Count ``n`` events found on the host (regex path)."""
        with self._lock:
            self.counts.setdefault(policy, {r: 0 for r in RULES})[rule] += n
            self._changed = True

    def log_event(self, policy, rule, seq, row, step, token, entity) -> None:
        if self.log_events:
            self.logger.info("fastsafe: policy=%s rule=%s request=%s row=%s step=%s token=%r entity=%r",
                             policy, rule, seq, row, step, None if token is None else self._text(token), entity)

    # ------------------------------------------------------------------ between steps
    def drain(self, *, wait: bool = False) -> int:
        """Count and log the records whose host copy is complete (all of them with ``wait``).

        Returns the number of events found.
        """
        found = 0
        keep = []
        for rec in self._pending:
            if not wait and not rec.ready():
                keep.append(rec)
                continue
            if rec.event is not None:
                rec.event.synchronize()
            found += self._read(rec)
        self._pending = keep
        now = time.monotonic()
        if self._changed and now - self._last_summary >= self.log_interval:
            self.log_summary()
        return found

    def _read(self, rec: _Record) -> int:
        h = rec.host
        events = []
        if rec.rule == "token_ban":
            for i in h[:, 1].nonzero().flatten().tolist():
                e = int(h[i, 2])
                ent = rec.matcher.entity(e) if e >= 0 and rec.matcher is not None else None
                events.append((i, int(h[i, 0]), None if ent is None else ent.phrase))
        elif rec.rule == "all_banned_fallback":
            for i in h.nonzero().flatten().tolist():
                events.append((i, None, None))
        else:
            k = h.shape[1] // 2
            for i, j in (h[:, k:] >= 0).nonzero().tolist():
                ent = rec.matcher.entity(int(h[i, k + j])) if rec.matcher is not None else None
                events.append((i, int(h[i, j]), None if ent is None else ent.phrase))
        if events:
            with self._lock:
                self.counts.setdefault(rec.policy, {r: 0 for r in RULES})[rec.rule] += len(events)
                self._changed = True
            for i, tok, ent in events:
                self.log_event(rec.policy, rec.rule, rec.seqs[i], rec.rows[i], rec.step, tok, ent)
        return len(events)

    def log_summary(self) -> None:
        with self._lock:
            parts = [f"{name} " + " ".join(f"{r}={n}" for r, n in rules.items()) for name, rules in self.counts.items()]
            self._changed = False
        self._last_summary = time.monotonic()
        self.logger.info("fastsafe: interventions: %s (steps=%d, requests=%d)", " | ".join(parts) or "none",
                         self.steps, self.requests)
