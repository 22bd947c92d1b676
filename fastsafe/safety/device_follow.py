"""The device matcher follows a risk-entity store: background builds and exact swaps between steps.

Two small objects, used by :class:`fastsafe.safety_step.SafetyStep` (and by any loop that keeps
its own row states, such as a serving adapter or a compiled loop):

* :class:`LiveDeviceMatcher` — ``current()`` returns the newest *built*
  :class:`~fastsafe.safety.DeviceMatcher` of the store and never waits: when the store's version
  moved (one indexed SQLite read per call with ``poll_interval=0``), a new matcher is built in a
  background thread from a consistent snapshot; until it is ready the previous one stays in force.
  A build that fails keeps the previous matcher, sets :attr:`LiveDeviceMatcher.last_error` and
  warns (once per failed version); the next change of the store tries again. An entity that cannot
  be compiled is skipped alone (``skip_invalid``), warned about once and listed in
  :attr:`LiveDeviceMatcher.skipped`; every other entity stays in force.
* :class:`RowStates` — the rows' states under a new matcher, re-derived exactly: it keeps the
  rows' start histories and a log of what happened to the rows since (``advance`` token ids,
  ``select_rows`` indices, as device tensors: no host read). When :meth:`RowStates.poll` sees a
  new matcher, a background job computes ``state_from_histories(start)`` under it and replays the
  log; the swap happens at the first :meth:`RowStates.poll` after the job finished, which replays
  the few log entries added meanwhile on the calling thread. The swapped state equals
  ``new.state_from_histories(full histories)`` (tested), and no step waits for a build or a
  re-derivation of the whole history.

Freshness: a change is in force ``build time + re-derivation time`` after the first step that sees
it (the host path's rule, "committed before step ``t`` starts => in force at step ``t``", holds with
``background=False``, where the step that sees the change builds and swaps before it runs, and
waits for it). Measured on 2 shared CPU cores with SmolLM2 (``python -m benchmarks.device_follow``,
``benchmarks/results/device-follow-cpu.json``): commit to in force 2.3 s at 1k entities, 3.3 s at 10k,
18 s at 100k (the build), with no safety call longer than 0.1 s meanwhile; ``background=False`` puts
the same time into one step. A swap changes the matcher's tensors (its tables and the state), never the shape of
the step: the state stays ``[B, STATE_WIDTH]`` int64.

Example:
    >>> live = LiveDeviceMatcher(store, tok, vocab_size=V, device="cuda")       # doctest: +SKIP
    >>> rows = RowStates(live)                                                 # doctest: +SKIP
    >>> dm, state = rows.start(prompt_ids)                                     # doctest: +SKIP
    >>> dm, state = rows.poll(dm, state)      # each step: the newest matcher once its state is ready
    >>> state = rows.advance(dm, state, chosen)                                # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import threading
import time
import warnings

import torch

from .device_matcher import DeviceMatcher
from .matcher import report_new_skips

__all__ = ["LiveDeviceMatcher", "FixedDeviceMatcher", "RowStates"]


@contextlib.contextmanager
def _side_stream(device, after=None):
    """Background work on a CUDA device runs on a stream of its own (never on the decoding stream,
    which may be capturing a CUDA graph), after the event ``after`` (recorded by the decoding thread
    when it handed the inputs over), and is finished before it is handed back."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        yield
        return
    stream = torch.cuda.Stream(device=device)
    if after is not None:
        stream.wait_event(after)
    with torch.cuda.stream(stream):
        yield
    stream.synchronize()


class FixedDeviceMatcher:
    """A fixed :class:`DeviceMatcher` behind the :class:`LiveDeviceMatcher` interface (``current()``, ``version``)."""

    def __init__(self, matcher: DeviceMatcher):
        self._matcher = matcher

    @property
    def version(self):
        return self._matcher.version

    def current(self) -> DeviceMatcher:
        return self._matcher


class LiveDeviceMatcher:
    """The newest built :class:`DeviceMatcher` of a :class:`~fastsafe.safety.RiskEntityStore`.

    Args:
        store: the store to follow.
        tokenizer: as for :meth:`DeviceMatcher.build`.
        poll_interval: seconds between version checks in :meth:`current` (default 0: every call).
        background: build new versions in a background thread (default). ``False`` builds inside
            :meth:`current` (the calling step waits; the host path's freshness rule then holds).
        on_error: optional callback called with each exception of a failed build.
        on_skip: optional callback called once with each newly skipped entity (:class:`SkippedEntity`).
        **build_kwargs: passed to :meth:`DeviceMatcher.from_store` (``vocab_size``, ``device``,
            ``phrases``, ``token_id_phrases``, ``regexes``, ``eos_token_id``, ``word_boundaries`` ...).

    Attributes:
        version: the store version of the matcher :meth:`current` returns.
        last_error: the exception of the last failed read or build (``None`` after a good one).
        last_build_s: seconds the last successful build took (from seeing the version to ready).
        builds: number of matchers built (the first one included).
        skipped: the store entities not in force in the current matcher, with the reasons.

    Raises:
        Exception: whatever the first build raises (there is no matcher to fall back to).

    Example:
        >>> live = LiveDeviceMatcher(store, tok, vocab_size=V)        # doctest: +SKIP
        >>> dm = live.current()                                        # doctest: +SKIP
    """

    def __init__(self, store, tokenizer, *, poll_interval: float = 0.0, background: bool = True, on_error=None,
                 on_skip=None, **build_kwargs):
        if isinstance(poll_interval, bool) or not isinstance(poll_interval, (int, float)) or not poll_interval >= 0:
            raise ValueError(f"poll_interval: expected a number of seconds >= 0, got {poll_interval!r}")
        self.store = store
        self.tokenizer = tokenizer
        self.poll_interval = float(poll_interval)
        self.background = bool(background)
        self.on_error = on_error
        self.on_skip = on_skip
        self._reported: set = set()
        build_kwargs.pop("skip_invalid", None)
        build_kwargs.pop("warn", None)
        self.build_kwargs = dict(build_kwargs)
        self.last_error: Exception | None = None
        self.last_build_s: float | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._done = threading.Condition(self._lock)
        self._failed: int | None = None           # the store version whose build failed (not retried)
        self._matcher = self._build()
        self._report(self._matcher.skipped)
        self.builds = 1
        self._last_poll = time.monotonic()

    def _build(self) -> DeviceMatcher:
        with _side_stream(self.build_kwargs.get("device")):
            return DeviceMatcher.from_store(self.store, self.tokenizer, skip_invalid=True, warn=False,
                                            **self.build_kwargs)

    @property
    def skipped(self) -> list:
        return list(self._matcher.skipped)

    def _report(self, items) -> None:
        report_new_skips(self._reported, items, self.on_skip)

    @property
    def version(self):
        return self._matcher.version

    def __repr__(self) -> str:
        return f"LiveDeviceMatcher(version={self.version}, building={self.building}, {self._matcher!r})"

    @property
    def building(self) -> bool:
        """True while a background build runs."""
        return self._thread is not None

    def current(self) -> DeviceMatcher:
        """The matcher in force: the newest one built. Starts a build when the store moved; never waits
        for one (unless ``background=False``)."""
        now = time.monotonic()
        if now - self._last_poll >= self.poll_interval:
            self._last_poll = now
            self._poll()
        return self._matcher

    def _poll(self) -> None:
        try:
            v = self.store.version()
        except Exception as exc:  # noqa: BLE001 - the matcher in force stays; say that updates stopped
            self._fail(exc, None, "cannot be read")
            return
        if v == self._matcher.version or v == self._failed:
            return
        if not self.background:
            self._run(v)
            return
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, args=(v,), name="fastsafe-device-matcher", daemon=True)
            self._thread.start()

    def _run(self, seen: int) -> None:
        t0 = time.perf_counter()
        try:
            m = self._build()
        except Exception as exc:  # noqa: BLE001 - keep the last good matcher; report loudly
            self._failed = seen
            self._fail(exc, seen, "could not be compiled for the device matcher")
        else:
            with self._lock:
                if self._matcher.version is None or m.version >= self._matcher.version:
                    self._matcher = m
                    self._report(m.skipped)
                self.builds += 1
                self.last_build_s = time.perf_counter() - t0
                self.last_error = None
                self._failed = None
        finally:
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None
                self._done.notify_all()

    def _fail(self, exc: Exception, version, what: str) -> None:
        first = self.last_error is None or version is not None
        self.last_error = exc
        if first:
            at = "" if version is None else f" at version {version}"
            warnings.warn(f"fastsafe: risk store {getattr(self.store, 'path', self.store)!r}{at} {what} "
                          f"({type(exc).__name__}: {exc}); the device matcher of version {self._matcher.version} "
                          f"stays in force", RuntimeWarning, stacklevel=4)
        if self.on_error is not None:
            self.on_error(exc)

    def wait_for(self, version: int, timeout: float = 60.0) -> bool:
        """Block until :meth:`current` reflects ``version`` or newer; False on timeout or a failed build."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.current()
            if m.version is not None and m.version >= version:
                return True
            with self._lock:
                if self._thread is None and self._failed is not None and self._failed >= version:
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._done.wait(min(left, 0.02))


class _Job:
    """Background re-derivation of the rows' state under ``matcher`` (start histories + ``n`` log entries)."""

    def __init__(self, matcher, start, log, background: bool):
        self.matcher = matcher
        self.n = len(log)
        self.state = None
        self.error: Exception | None = None
        self.done = threading.Event()
        ops = list(log)
        self._inputs = None                     # CUDA: the decoding stream's point where the inputs are ready
        if matcher.device.type == "cuda":
            self._inputs = torch.cuda.Event()
            self._inputs.record()
        if background:
            threading.Thread(target=self._run, args=(start, ops), name="fastsafe-row-states", daemon=True).start()
        else:
            self._run(start, ops)

    def _run(self, start, ops) -> None:
        try:
            with torch.no_grad(), _side_stream(self.matcher.device, self._inputs):
                self.state = _replay(self.matcher, self.matcher.state_from_histories(start), ops)
        except Exception as exc:  # noqa: BLE001 - reported by RowStates.poll; the old matcher stays
            self.error = exc
        finally:
            self.done.set()


def _replay(matcher, state, ops):
    for kind, value in ops:
        state = matcher.advance(state, value) if kind == "advance" else state.index_select(0, value)
    return state


class RowStates:
    """The rows' states under the newest matcher of ``source``, re-derived exactly on a swap.

    Args:
        source: a :class:`LiveDeviceMatcher` or :class:`FixedDeviceMatcher` (anything with ``current()``).
        background: re-derive in a background thread (default); ``False`` re-derives inside
            :meth:`poll` (the swap happens at the first poll that sees the new matcher).

    Attributes:
        swaps: ``(old version, new version)`` of every swap so far.
        last_error: the exception of the last failed re-derivation (the old matcher stayed).
    """

    def __init__(self, source, *, background: bool = True):
        self.source = source
        self.background = bool(background)
        self.swaps: list[tuple] = []
        self.last_error: Exception | None = None
        self._start = None
        self._log: list = []
        self._job: _Job | None = None
        self._refused = None                      # a matcher whose re-derivation failed (not retried)

    def start(self, histories):
        """``(matcher, state)`` for new rows: the newest matcher and the state after ``histories``
        (``[B, T]`` tensor or token-id lists; copied, so the caller may append to its lists)."""
        dm = self.source.current()
        if isinstance(histories, torch.Tensor):
            self._start = histories.detach().clone()
        else:
            self._start = [r.tolist() if isinstance(r, torch.Tensor) else list(r) for r in histories]
        self._log = []
        self._job = None
        return dm, dm.state_from_histories(self._start)

    def advance(self, matcher, state, token_ids):
        """``matcher.advance(state, token_ids)``, logged for a later re-derivation."""
        token_ids = token_ids.to(matcher.device, torch.int64)
        if self._start is not None:
            self._log.append(("advance", token_ids))
        return matcher.advance(state, token_ids)

    def log_advance(self, token_ids) -> None:
        """Log that the rows appended ``token_ids`` (``[B]``) when the caller advanced the state
        itself (inside a compiled step); what :meth:`advance` logs."""
        if self._start is not None:
            self._log.append(("advance", token_ids.to(torch.int64)))

    def select(self, state, index):
        """The rows ``index`` of ``state`` (rows leave / reorder), logged for a later re-derivation."""
        index = index.to(state.device)
        if self._start is not None:
            self._log.append(("select", index))
        return state.index_select(0, index)

    @property
    def pending(self) -> bool:
        """True while the rows' state under a new matcher is being derived (the swap comes after)."""
        return self._job is not None and not self._job.done.is_set()

    def wait(self, timeout: float = 60.0) -> bool:
        """Block until no re-derivation is pending (the next :meth:`poll` swaps); False on timeout."""
        job = self._job
        return job is None or job.done.wait(timeout)

    def poll(self, matcher, state):
        """``(matcher, state)`` to use for this step: the newest matcher of the source once the rows'
        state under it is ready (exact: start histories plus every logged step), else the ones given."""
        new = self.source.current()
        if new is matcher or self._start is None or new is self._refused:
            return matcher, state
        job = self._job
        if job is None or job.matcher is not new:
            job = self._job = _Job(new, self._start, self._log, self.background)
        if not job.done.is_set():
            return matcher, state
        self._job = None
        if job.error is not None:
            self._refused = new
            self.last_error = job.error
            warnings.warn(f"fastsafe: the rows' states under the device matcher of version {new.version} could not "
                          f"be derived ({type(job.error).__name__}: {job.error}); version {matcher.version} stays "
                          f"in force", RuntimeWarning, stacklevel=3)
            return matcher, state
        with torch.no_grad():
            state = _replay(new, job.state, self._log[job.n:])
        self.swaps.append((matcher.version, new.version))
        return new, state
