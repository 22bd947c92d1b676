"""The device parts of the vLLM adapter's policies: built once per worker, at start.

:func:`build_policy` turns a :class:`~.policies.Policy` into a :class:`BuiltPolicy` — its
:class:`fastsafe.safety.DeviceMatcher` (through :mod:`fastsafe.safety_builder`, cached by content),
or a store follower that builds a new matcher off the step thread whenever the
:class:`fastsafe.RiskEntityStore` moves, and its TSDI table on the device.
:class:`RequestMatchers` holds the matchers of request-only phrases (content-keyed, LRU), built in a
background thread; the interim rule (:mod:`.interim`) protects a row until its matcher is ready.

Example:
    >>> bp = build_policy(policy, tokenizer, vocab_size=V, device="cuda", eos_token_id=eos)  # doctest: +SKIP
    >>> bp.matcher()        # the DeviceMatcher in force (the newest built store version)
"""
from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict

import torch

__all__ = ["BuiltPolicy", "build_policy", "StoreFollower", "RequestMatchers"]


#: ``nice`` increment of the background build threads (Linux: per thread). A build is pure Python
#: for most of its time and holds the GIL; the step thread then waits for a GIL switch *and* for the
#: CPU, and with the builder at a lower priority the scheduler gives the CPU to the step thread first.
BUILD_NICE = 10


def _lower_priority() -> None:
    """Lower the calling (build) thread's scheduling priority by :data:`BUILD_NICE`, once per thread."""
    if getattr(_niced, "done", False) or not BUILD_NICE:
        return
    _niced.done = True
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + BUILD_NICE))
    except (AttributeError, OSError):  # not Linux / not permitted: the build runs at the process's priority
        pass


_niced = threading.local()


def _config(policy, phrases=None):
    from fastsafe.config import SafetyConfig
    items = [list(p) if isinstance(p, tuple) else p for p in (policy.phrases if phrases is None else phrases)]
    return SafetyConfig(banned_phrases=items, regexes=list(policy.regexes), top_k=policy.top_k, matcher="device")


class StoreFollower:
    """The newest built :class:`DeviceMatcher` of a store; never waits for a build.

    :meth:`current` checks the store's version (at most every ``poll_interval`` seconds, one indexed
    SQLite read) and, when it moved, builds the new matcher in a background thread; the previous
    matcher stays in force until the new one is ready. A failed build keeps the previous matcher and
    is logged once per version. (fastsafe's own ``fastsafe.safety.device_follow`` does the same for
    ``SafetyStep``; this is the adapter's copy until that module is public.)

    Args:
        build: ``build() -> DeviceMatcher`` from a consistent snapshot of the store.
        store: the store (``version()``).
        poll_interval: seconds between version checks.
        logger: where failures are reported.
    """

    def __init__(self, build, store, *, poll_interval: float = 0.5, logger=None):
        self._build = build
        self.store = store
        self.poll_interval = float(poll_interval)
        self._logger = logger
        self._matcher = build()
        self._lock = threading.Lock()
        self._thread = None
        self._failed = None
        self._last = time.monotonic()
        self.builds = 1
        self.last_build_s = None

    @property
    def version(self):
        return self._matcher.version

    def current(self):
        now = time.monotonic()
        if now - self._last >= self.poll_interval:
            self._last = now
            try:
                v = self.store.version()
            except Exception as exc:  # noqa: BLE001 - the matcher in force stays
                self._report(None, exc)
                return self._matcher
            if v != self._matcher.version and v != self._failed:
                with self._lock:
                    if self._thread is None:
                        self._thread = threading.Thread(target=self._run, args=(v,), daemon=True,
                                                        name="fastsafe-vllm-store")
                        self._thread.start()
        return self._matcher

    def _run(self, seen) -> None:
        _lower_priority()
        t0 = time.perf_counter()
        try:
            m = self._build()
        except Exception as exc:  # noqa: BLE001
            self._failed = seen
            self._report(seen, exc)
        else:
            self._matcher = m          # one reference assignment: atomic for the step thread
            self.builds += 1
            self.last_build_s = time.perf_counter() - t0
        finally:
            with self._lock:
                self._thread = None

    def wait(self, timeout: float = 60.0) -> None:
        """Wait for a build in flight (tests, shutdown)."""
        t = self._thread
        if t is not None:
            t.join(timeout)

    def _report(self, version, exc) -> None:
        if self._logger is not None:
            self._logger.warning("fastsafe: store %s: %s version %s failed (the matcher in force stays): %s",
                                 getattr(self.store, "path", self.store), "reading the" if version is None else
                                 "building", version, exc)


class BuiltPolicy:
    """A policy's device parts.

    Attributes:
        policy: the :class:`~.policies.Policy`.
        index: its position among the server's policies (audit counters).
        table: ``[L, V]`` float32 TSDI table on the device, or ``None``.
        top_k: candidates the text check looks at.
        follower: the :class:`StoreFollower` (store policies), else ``None``.
    """

    def __init__(self, policy, index, matcher, table, follower):
        self.policy = policy
        self.name = policy.name
        self.index = index
        self._matcher = matcher
        self.table = table
        self.top_k = policy.top_k
        self.follower = follower

    def matcher(self):
        """The :class:`DeviceMatcher` in force (``None`` without a filter); store policies: the newest built."""
        return self.follower.current() if self.follower is not None else self._matcher

    def __repr__(self) -> str:
        return f"BuiltPolicy({self.name!r}, matcher={self.matcher()!r}, tsdi={self.table is not None})"


def build_policy(policy, tokenizer, *, vocab_size: int, device, eos_token_id=None, index: int = 0,
                 poll_interval: float = 0.5, logger=None) -> BuiltPolicy:
    """Build ``policy``'s matcher and TSDI table for one worker.

    Args:
        policy: a :class:`~.policies.Policy`.
        tokenizer: the served model's tokenizer.
        vocab_size: the logits width ``V``.
        device: the worker's device.
        eos_token_id: never banned by the automaton.
        index: the policy's index (for the audit counters).
        poll_interval: seconds between store version checks (store policies).
        logger: where store-follower failures are logged.

    Raises:
        ValueError: an entity that normalises or tokenises to nothing, a bias table for another
            vocabulary (the message names the policy).
    """
    from fastsafe.safety_builder import bias_table_on, build_device_matcher
    device = torch.device(device)
    cfg = _config(policy)
    follower = matcher = table = None
    try:
        if policy.store is not None:
            from fastsafe.safety import DeviceMatcher, RiskEntityStore
            store = RiskEntityStore(policy.store, create=False)

            def build():
                return DeviceMatcher.from_store(store, tokenizer, phrases=cfg.phrases,
                                                token_id_phrases=cfg.token_id_phrases, regexes=list(cfg.regexes),
                                                vocab_size=int(vocab_size), device=device, eos_token_id=eos_token_id)
            follower = StoreFollower(build, store, poll_interval=poll_interval, logger=logger)
        elif cfg.has_filter:
            matcher = build_device_matcher(cfg, tokenizer, vocab_size=int(vocab_size), device=device,
                                           eos_token_id=eos_token_id)
        if policy.tsdi is not None:
            from fastsafe.tsdi import TSDIBias
            tsdi = TSDIBias.load(policy.tsdi)
            tsdi.check_vocab(int(vocab_size), what="the served model's logits")
            table = bias_table_on(tsdi, device)
    except ValueError as exc:
        raise ValueError(f"fastsafe: policy {policy.name!r}: {exc}") from exc
    return BuiltPolicy(policy, index, matcher, table, follower)


class RequestMatchers:
    """Matchers of request-only phrases, keyed by the phrase set (least recently used dropped).

    A phrase set seen before costs nothing. A new one (:meth:`lookup`) is built in a background
    thread (one worker: builds run one after another), and until it is ready the caller gets the
    set's interim start rule (:func:`.interim.start_rule`: no tokenizer call, about 1 ms for 1,000
    phrases, ~10 ms for 10,000, on the calling thread); :meth:`ready` returns the full matcher once
    it is built. With ``background=False`` :meth:`lookup` builds the full matcher where it is
    called (the step waits).

    Args:
        tokenizer, vocab_size, device, eos_token_id: as for :meth:`fastsafe.safety.DeviceMatcher.build`.
        capacity: phrase sets kept (full matchers and interim rules each).
        background: build new sets in the background thread.
        logger: where failed background builds are reported.
    """

    def __init__(self, tokenizer, *, vocab_size: int, device, eos_token_id=None, capacity: int = 64,
                 background: bool = True, logger=None):
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.device = torch.device(device)
        self.eos_token_id = eos_token_id
        self.capacity = int(capacity)
        self.background = bool(background)
        self.logger = logger
        self._cache: OrderedDict = OrderedDict()
        self._interim: OrderedDict = OrderedDict()
        self._pending: dict = {}                 # key -> Future of the background build
        self._failed: dict = {}                  # key -> the exception of its failed build
        self._executor = None
        self._lock = threading.Lock()
        self._tries = None
        self.builds = 0
        self.build_seconds = 0.0
        self.interim_builds = 0
        self.interim_seconds = 0.0

    @property
    def tries(self):
        """The vocabulary tables of the interim rule (:class:`.interim.TokenTries`), built on first use
        (the processors build them at start, :meth:`prepare`)."""
        if self._tries is None:
            from fastsafe.safety.entity_list import eos_id_set
            from .interim import TokenTries
            self._tries = TokenTries.build(self.tokenizer, self.vocab_size,
                                           eos_id_set(self.tokenizer, self.eos_token_id))
        return self._tries

    def prepare(self) -> None:
        """Build the interim rule's vocabulary tables now (at start, not at the first request)."""
        if self.background:
            _ = self.tries

    def _build(self, key: tuple):
        from fastsafe.safety import DeviceMatcher
        t0 = time.perf_counter()
        dm = DeviceMatcher.build(self.tokenizer, list(key), vocab_size=self.vocab_size, device=self.device,
                                 eos_token_id=self.eos_token_id)
        with self._lock:
            self.builds += 1
            self.build_seconds += time.perf_counter() - t0
            dm = self._cache.setdefault(key, dm)
            self._cache.move_to_end(key)
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return dm

    def _cached(self, key: tuple):
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
            return hit

    def get(self, phrases: tuple):
        """The full :class:`DeviceMatcher` of ``phrases`` (a tuple of strings), built here on first use."""
        key = tuple(phrases)
        hit = self._cached(key)
        return hit if hit is not None else self._build(key)

    def lookup(self, phrases: tuple) -> tuple:
        """``(matcher, final)``: the full matcher when it is built (``final`` True), else the set's
        interim :class:`.interim.StartRule` while the full one builds in the background (``final``
        False; poll :meth:`ready`)."""
        key = tuple(phrases)
        hit = self._cached(key)
        if hit is not None:
            return hit, True
        if not self.background:
            return self._build(key), True
        with self._lock:
            im = self._interim.get(key)
            if im is not None:
                self._interim.move_to_end(key)
        if im is None:            # before the background build starts: it would hold the GIL meanwhile
            t0 = time.perf_counter()
            from .interim import start_rule
            im = start_rule(self.tries, key)
            with self._lock:
                self.interim_builds += 1
                self.interim_seconds += time.perf_counter() - t0
                im = self._interim.setdefault(key, im)
                while len(self._interim) > self.capacity:
                    self._interim.popitem(last=False)
        self._start(key)
        return im, False

    def _start(self, key: tuple) -> None:
        with self._lock:
            if key in self._pending or key in self._failed or key in self._cache:
                return
            if self._executor is None:
                from concurrent.futures import ThreadPoolExecutor
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastsafe-vllm-request")
            self._pending[key] = self._executor.submit(self._run, key)

    def _run(self, key: tuple) -> None:
        _lower_priority()
        try:
            self._build(key)
        except Exception as exc:  # noqa: BLE001 - the interim matcher stays in force (fail closed)
            with self._lock:
                self._failed[key] = exc
            if self.logger is not None:
                self.logger.warning("fastsafe: request-only phrases (%d): the full matcher failed to build; "
                                    "the interim token-level rule stays in force: %s", len(key), exc)
        finally:
            with self._lock:
                self._pending.pop(key, None)

    def ready(self, phrases: tuple):
        """The full matcher of ``phrases`` if its background build is done, else ``None`` (never waits).

        A set whose full matcher was evicted before it was taken is built again; one whose build
        failed stays on its interim matcher (``None`` here, for good)."""
        key = tuple(phrases)
        hit = self._cached(key)
        if hit is None:
            with self._lock:
                lost = key not in self._pending and key not in self._failed
            if lost:
                self._start(key)
        return hit

    def wait(self, timeout: float = 60.0) -> None:
        """Wait for the background builds in flight (tests, shutdown)."""
        with self._lock:
            futs = list(self._pending.values())
        for f in futs:
            try:
                f.result(timeout)
            except Exception:  # noqa: BLE001 - reported by _run
                pass
