"""The one builder of what a :class:`fastsafe.SafetyConfig` needs at decoding time.

A ``SafetyConfig`` is plain, frozen settings. Turning it into working parts — the phrase matcher
(tokenising every entity for one tokenizer and vocabulary), the TSDI bias table on the logits'
device, the resolved reward object — happens here, and so does the caching of those parts, keyed
by what they depend on (the entity lists, the store's file, the matcher options, the tokenizer's
vocabulary, ``V``, the EOS ids, the device), never by object identity. Two configs with the same
entities share one matcher; a tokenizer whose vocabulary changed gets a new one.

Example:
    >>> from fastsafe.safety_builder import build_matcher, resolve_reward, bias_table_on
    >>> source = build_matcher(cfg, tok, vocab_size=V)          # .current() -> PhraseMatcher
    >>> table = bias_table_on(cfg.tsdi, logits.device)           # [L, V] float32, the user's TSDIBias untouched
"""
from __future__ import annotations

import hashlib
import os
import threading
import weakref
from collections import OrderedDict

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["build_matcher", "build_device_matcher", "device_matcher_source", "resolve_reward", "bias_table_on", "tokenizer_fingerprint", "clear_cache",
           "CACHE_SIZE"]

#: Built parts kept (least recently used ones are dropped beyond this).
CACHE_SIZE = 16

_lock = threading.Lock()
_cache: "OrderedDict[tuple, object]" = OrderedDict()
_fingerprints: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_device_tables = WeakIdKeyDictionary()        # tensor -> its device copies (tensors compare elementwise)


def clear_cache() -> None:
    """Forget every built matcher, reward and device table (they are rebuilt on next use)."""
    with _lock:
        _cache.clear()
        _device_tables.clear()


def _cached(key: tuple, build):
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    value = build()                 # outside the lock: building 100k entities takes seconds
    with _lock:
        value = _cache.setdefault(key, value)
        _cache.move_to_end(key)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return value


def _freeze(value):
    """A hashable form of a settings value (dicts and lists by content, other objects by hash or id)."""
    if isinstance(value, dict):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return tuple(sorted(map(repr, value)))
    try:
        hash(value)
        return value
    except TypeError:
        return ("object", id(value))


def tokenizer_fingerprint(tokenizer) -> tuple:
    """What a matcher depends on in ``tokenizer``: its class, size and a hash of its vocabulary.

    Computed once per tokenizer object and size (about 10-30 ms for 150k tokens), so a tokenizer
    with tokens added afterwards gets a new fingerprint.

    Example:
        >>> tokenizer_fingerprint(tok) == tokenizer_fingerprint(copy.deepcopy(tok))
        True
    """
    if tokenizer is None:
        return ("none",)
    size = len(tokenizer)
    try:
        memo = _fingerprints.get(tokenizer)
    except TypeError:               # not weak-referenceable
        memo = None
    if memo is not None and memo[0] == size:
        return memo[1]
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    digest = hashlib.blake2b(digest_size=16)
    for token, index in sorted(vocab.items(), key=lambda item: item[1]):
        digest.update(f"{index}\x00{token}\x01".encode("utf-8", "surrogatepass"))
    specials = getattr(tokenizer, "all_special_tokens", None) or ()
    fingerprint = (type(tokenizer).__name__, size, digest.hexdigest(), tuple(specials))
    try:
        _fingerprints[tokenizer] = (size, fingerprint)
    except TypeError:
        pass
    return fingerprint


def _store_key(store):
    if store is None:
        return None
    path = store if isinstance(store, (str, os.PathLike)) else getattr(store, "path", None)
    if path is None:
        return ("object", id(store))
    return ("store", os.path.realpath(os.fspath(path)))


def _entities_key(config, tokenizer, vocab_size, eos_token_id) -> tuple:
    """What any matcher of ``config`` depends on: its entity lists, the tokenizer's vocabulary, ``V``, EOS."""
    eos_key = tuple(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else eos_token_id
    return (config.entities_digest(), _freeze(list(config.regexes)),
            tokenizer_fingerprint(tokenizer), vocab_size, eos_key)


def build_matcher(config, tokenizer, *, vocab_size: int | None = None, eos_token_id=None):
    """The matcher source of ``config`` (``.current() -> PhraseMatcher``), or ``None`` without filters.

    With a store it is a :class:`fastsafe.safety.LiveMatcher` (follows new versions of the store);
    otherwise a fixed :class:`fastsafe.safety.PhraseMatcher` behind the same interface. Built once
    per content key (see the module docstring) and shared.

    Args:
        config: a :class:`fastsafe.SafetyConfig`.
        tokenizer: the model's tokenizer.
        vocab_size: the logits width ``V`` (default: the tokenizer's size).
        eos_token_id: int or list of ints; never banned.
    """
    if not config.has_filter:
        return None
    key = ("matcher", _entities_key(config, tokenizer, vocab_size, eos_token_id), _store_key(config.store),
           float(config.poll_interval), _freeze(config.matcher_options))
    return _cached(key, lambda: _build_matcher(config, tokenizer, vocab_size, eos_token_id))


#: ``matcher_options`` the device matcher understands (the build's own, and ``background`` of the store follower).
DEVICE_OPTIONS = ("word_boundaries", "regex_window")


def build_device_matcher(config, tokenizer, *, vocab_size: int, device, eos_token_id=None):
    """The :class:`fastsafe.safety.DeviceMatcher` of ``config`` on ``device`` (``None`` without
    filters): its phrases, token-id lists and regexes, plus the store's entities when it has one
    (the newest version built so far; see :func:`device_matcher_source` to follow the store).
    Cached by the same content key as :func:`build_matcher` plus the device. ``matcher_options`` it
    understands: ``word_boundaries``, ``regex_window`` (and ``background`` for a store)."""
    source = device_matcher_source(config, tokenizer, vocab_size=vocab_size, device=device,
                                   eos_token_id=eos_token_id)
    return None if source is None else source.current()


def device_matcher_source(config, tokenizer, *, vocab_size: int, device, eos_token_id=None):
    """What gives the device matcher in force (``.current() -> DeviceMatcher``, ``.version``), or ``None``.

    With a store it is a :class:`fastsafe.safety.device_follow.LiveDeviceMatcher` (new store versions
    are built in a background thread; ``current()`` never waits), otherwise a fixed matcher behind
    the same interface. Pair it with :class:`fastsafe.safety.device_follow.RowStates` to swap between
    steps with the rows' states re-derived exactly. Built once per content key and shared.
    """
    if not config.has_filter:
        return None
    device = torch.device(device)
    opts = {k: v for k, v in config.matcher_options.items() if k in DEVICE_OPTIONS}
    base = (_entities_key(config, tokenizer, vocab_size, eos_token_id), _freeze(opts), str(device))
    kwargs = dict(vocab_size=int(vocab_size), device=device, token_id_phrases=config.token_id_phrases,
                  regexes=list(config.regexes), eos_token_id=eos_token_id, **opts)
    from .safety.device_follow import FixedDeviceMatcher, LiveDeviceMatcher
    if config.store is None:
        def build():
            from .safety.device_matcher import DeviceMatcher
            return FixedDeviceMatcher(DeviceMatcher.build(tokenizer, config.phrases, **kwargs))
        return _cached(("device_matcher",) + base, build)
    key = ("device_matcher", _store_key(config.store), float(config.poll_interval),
           bool(config.matcher_options.get("background", True))) + base
    return _cached(key, lambda: LiveDeviceMatcher(_open_store(config.store), tokenizer, phrases=config.phrases,
                                                  poll_interval=config.poll_interval,
                                                  background=bool(config.matcher_options.get("background", True)),
                                                  **kwargs))


def _open_store(store):
    if isinstance(store, (str, os.PathLike)):
        from .safety.store import RiskEntityStore
        return RiskEntityStore(store, create=False)
    return store


def _build_matcher(config, tokenizer, vocab_size, eos_token_id):
    from .safety.live_matcher import LiveMatcher
    from .safety.matcher import PhraseMatcher
    opts = dict(config.matcher_options)
    if vocab_size is not None:
        opts["vocab_size"] = int(vocab_size)
    if eos_token_id is not None:
        opts.setdefault("eos_token_id", eos_token_id)
    if config.store is not None:
        return LiveMatcher(_open_store(config.store), tokenizer, extra_phrases=config.phrases,
                           extra_token_id_phrases=config.token_id_phrases, extra_regexes=list(config.regexes),
                           poll_interval=config.poll_interval, **opts)
    return StaticMatcher(PhraseMatcher.build(tokenizer, config.phrases, token_id_phrases=config.token_id_phrases,
                                             regexes=list(config.regexes), **opts))


class StaticMatcher:
    """A fixed ``PhraseMatcher`` with the ``LiveMatcher`` interface (``current()``, ``version``)."""

    def __init__(self, matcher):
        self._matcher = matcher
        self.version = getattr(matcher, "version", None)

    def current(self):
        return self._matcher


def resolve_reward(config):
    """The reward object of ``config``, or ``None`` when no reward takes part.

    ``reward_model="profanity"`` becomes one shared :class:`fastsafe.reward.ProfanityReward` per
    ``context_tokens`` (the config itself is not changed).
    """
    if not config.uses_reward:
        return None
    if isinstance(config.reward_model, str):
        from .reward import ProfanityReward
        context = config.context_tokens
        return _cached(("reward", config.reward_model, context), lambda: ProfanityReward(context_tokens=context))
    return config.reward_model


def bias_table_on(tsdi, device):
    """``tsdi.bias_table`` on ``device`` (``[L, V]``), copied once per table, version and device.

    The user's :class:`fastsafe.TSDIBias` is never modified; ``None`` for ``tsdi=None``. The copy
    lives as long as the table it was made from.
    """
    if tsdi is None:
        return None
    table = tsdi.bias_table
    device = torch.device(device)
    if table.device == device:
        return table
    with _lock:
        copies = _device_tables.setdefault(table, {})
        key = (str(device), table._version)
        hit = copies.get(key)
    if hit is None:
        hit = table.to(device)
        with _lock:
            copies.clear()              # an older version or another device: drop it
            copies[key] = hit
    return hit
