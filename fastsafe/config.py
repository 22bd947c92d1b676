"""``SafetyConfig``: what safe decoding filters, debiases and rewards.

One config drives both paths: :class:`fastsafe.SafeLogitsProcessor` (inside Hugging Face
``generate``) and :func:`fastsafe.generate` (fastsafe's own KV-cached loop). An empty
``SafetyConfig()`` changes nothing: both paths give exactly the tokens of plain greedy ``generate``.

Example:
    >>> from fastsafe import SafetyConfig, RiskEntityStore, TSDIBias
    >>> cfg = SafetyConfig(banned_phrases=["make a bomb", [1734, 88]],   # strings and token-id lists
    ...                    store="risk.db",                              # or RiskEntityStore("risk.db")
    ...                    tsdi=TSDIBias.load("bias.safetensors"), tsdi_scale=1.0,
    ...                    reward_model="profanity", reward_weight=2.0, top_k=10)
"""
from __future__ import annotations

import hashlib
import json
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .ops.validate import check_int, check_real

__all__ = ["SafetyConfig", "TSDI_BEYOND", "MATCHERS"]

TSDI_BEYOND = ("last", "none")
MATCHERS = ("host", "device")


def _is_token_id_list(item) -> bool:
    try:
        import torch
        if isinstance(item, torch.Tensor):
            return item.dim() == 1 and not item.dtype.is_floating_point and item.dtype != torch.bool
    except ImportError:  # pragma: no cover
        pass
    return (isinstance(item, (list, tuple)) and len(item) > 0
            and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in item))


@dataclass(frozen=True)
class SafetyConfig:
    """Configuration of safe decoding (risk filtering, TSDI debiasing, safety reward).

    Attributes:
        banned_phrases: strings (matched in every tokenisation variant: with/without a leading
            space, lower / Capitalised / UPPER, plus a text-level check after Unicode
            normalisation) and/or token-id lists (banned verbatim, exactly like
            ``NoBadWordsLogitsProcessor(bad_words_ids=...)``).
        regexes: regular expressions checked at text level on the top-k candidates.
        store: a :class:`fastsafe.RiskEntityStore` or the path of an existing one; followed live:
            a change committed before decoding step ``t`` starts is in force at step ``t`` (with the
            default ``poll_interval=0``). Store entities that cannot be compiled for the model's
            vocabulary are skipped with a warning (the matcher's ``skipped``); the rest stay in force.
        tsdi: a :class:`fastsafe.TSDIBias` (or the path of a bias file); its row for the current
            response position is subtracted from the logits, times ``tsdi_scale``.
        tsdi_scale: multiplier of the bias.
        tsdi_beyond: what positions past the table's ``L`` rows use: ``"last"`` (the last row,
            default) or ``"none"`` (no bias).
        reward_model: a :class:`fastsafe.reward.SafetyReward` (candidate ``[B, k]`` or dense
            ``[B, V]`` form), or ``"profanity"`` for the alt-profanity-check scorer.
        reward_weight: ``w`` in ``s(v) = log p(v|x) + w * r(x, v)``; 0 disables the reward.
        top_k: number of candidates the text-level check and the candidate reward look at; in
            :func:`fastsafe.generate` also the candidates greedy / sampling picks from.
        context_tokens: tokens of recent context a reward model sees (plus the candidate).
        on_event: optional callback called with each :class:`fastsafe.safety.SafetyEvent`.
        fallback_token_id: emitted when every candidate of a row is banned; ``None`` = the
            tokenizer's EOS. Must lie in ``[0, V)`` of the model (checked before the model runs).
            The emission is reported as an ``"all_banned_fallback"`` event.
        report_token_bans: report a ``"token_ban"`` event when a row's most likely token was
            banned by the token-level automaton (costs one argmax over ``[B, V]`` per step).
        poll_interval: seconds between risk-store version checks (default 0: before every step, one
            indexed SQLite read; a positive value delays a change by up to that long).
        matcher_options: extra keyword arguments for ``PhraseMatcher.build`` (e.g.
            ``word_boundaries=False``).
        matcher: ``"host"`` (default: :class:`fastsafe.safety.PhraseMatcher`, host-side, follows
            a store) or ``"device"`` (:class:`fastsafe.safety.DeviceMatcher`: automaton states per
            row on the logits' device, token bans and the text check as tensor programs, events
            recorded on the device and turned into ``SafetyEvent`` s at the end of generation).
            ``"device"`` follows a store too: a new version is built in a background thread and
            swaps in between two steps once the rows' states under it are re-derived (in force a
            build time after the step that saw the change, see :mod:`fastsafe.safety.device_follow`;
            ``matcher_options={"background": False}`` builds in the step that sees it, which then
            waits, and the host path's freshness rule holds).
    """

    banned_phrases: Sequence[Any] = ()
    regexes: Sequence[str] = ()
    store: Any = None
    tsdi: Any = None
    tsdi_scale: float = 1.0
    tsdi_beyond: str = "last"
    reward_model: Any = None
    reward_weight: float = 0.0
    top_k: int = 10
    context_tokens: int = 200
    on_event: Callable | None = None
    fallback_token_id: int | None = None
    report_token_bans: bool = True
    poll_interval: float = 0.0
    matcher_options: dict = field(default_factory=dict)
    matcher: str = "host"

    def __post_init__(self):
        if isinstance(self.banned_phrases, (str, bytes)):
            raise TypeError("banned_phrases: expected a list of strings and/or token-id lists, got a single "
                            "string (wrap it in a list)")
        phrases, id_lists = [], []
        for i, item in enumerate(self.banned_phrases or ()):
            if isinstance(item, str):
                if not item.strip():
                    raise ValueError(f"banned_phrases[{i}]: expected a non-empty phrase, got {item!r}")
                phrases.append(item)
            elif _is_token_id_list(item):
                ids = [int(t) for t in (item.tolist() if hasattr(item, "tolist") else item)]
                if any(t < 0 for t in ids):
                    raise ValueError(f"banned_phrases[{i}]: expected non-negative token ids, got {ids}")
                id_lists.append(ids)
            else:
                raise TypeError(f"banned_phrases[{i}]: expected a str or a non-empty list of int token ids, "
                                f"got {type(item).__name__} ({item!r})")
        _set(self, "_phrases", tuple(phrases))                     # immutable: entities_digest is memoised
        _set(self, "_token_id_phrases", tuple(tuple(ids) for ids in id_lists))
        if isinstance(self.regexes, (str, bytes)):
            raise TypeError("regexes: expected a list of patterns, got a single string (wrap it in a list)")
        _set(self, "regexes", list(self.regexes or ()))

        if self.store is not None and not isinstance(self.store, (str, os.PathLike)):
            if not (hasattr(self.store, "version") and hasattr(self.store, "snapshot")):
                raise TypeError(f"store: expected a RiskEntityStore or a path, got {type(self.store).__name__}")
        if isinstance(self.tsdi, (str, os.PathLike)):
            from .tsdi import TSDIBias
            _set(self, "tsdi", TSDIBias.load(self.tsdi))
        if self.tsdi is not None and not hasattr(self.tsdi, "bias_table"):
            raise TypeError(f"tsdi: expected a TSDIBias (or a bias file path), got {type(self.tsdi).__name__}")
        _set(self, "tsdi_scale", check_real("tsdi_scale", self.tsdi_scale))
        if self.tsdi_beyond not in TSDI_BEYOND:
            raise ValueError(f"tsdi_beyond: expected one of {TSDI_BEYOND}, got {self.tsdi_beyond!r}")
        _set(self, "reward_weight", check_real("reward_weight", self.reward_weight))
        if self.reward_model is not None and not isinstance(self.reward_model, str):
            form = getattr(self.reward_model, "form", None)
            if form not in ("candidate", "dense"):
                raise TypeError(f"reward_model: expected a SafetyReward (with form 'candidate' or 'dense') or "
                                f"'profanity', got {type(self.reward_model).__name__}")
        if isinstance(self.reward_model, str) and self.reward_model != "profanity":
            raise ValueError(f"reward_model: expected a SafetyReward object or 'profanity', got "
                             f"{self.reward_model!r} (load a model with fastsafe.reward.load_reward(path))")
        if self.reward_weight != 0.0 and self.reward_model is None:
            raise ValueError(f"reward_weight: {self.reward_weight} needs a reward_model (got None)")
        _set(self, "top_k", check_int("top_k", self.top_k, 1))
        _set(self, "context_tokens", check_int("context_tokens", self.context_tokens, 1))
        if self.on_event is not None and not callable(self.on_event):
            raise TypeError(f"on_event: expected a callable, got {type(self.on_event).__name__}")
        if self.fallback_token_id is not None:
            _set(self, "fallback_token_id", check_int("fallback_token_id", self.fallback_token_id, 0))
        _set(self, "poll_interval", check_real("poll_interval", self.poll_interval))
        if self.poll_interval < 0:
            raise ValueError(f"poll_interval: expected >= 0, got {self.poll_interval}")
        if not isinstance(self.matcher_options, dict):
            raise TypeError(f"matcher_options: expected a dict, got {type(self.matcher_options).__name__}")
        _set(self, "matcher_options", dict(self.matcher_options))      # the caller's dict stays theirs
        if self.matcher not in MATCHERS:
            raise ValueError(f"matcher: expected one of {MATCHERS}, got {self.matcher!r}")

    # ------------------------------------------------------------------ views
    @property
    def phrases(self) -> list[str]:
        """The string entries of ``banned_phrases``."""
        return list(self._phrases)

    @property
    def token_id_phrases(self) -> list[list[int]]:
        """The token-id-list entries of ``banned_phrases``."""
        return [list(x) for x in self._token_id_phrases]

    def entities_digest(self) -> str:
        """A digest of the string and token-id entities of ``banned_phrases`` (hex, 32 characters),
        computed once per config: the builders' cache key (hashing 100,000 phrases again at every
        ``generate`` call cost ~0.2 s). Regexes and the store are keyed apart.

        Example:
            >>> SafetyConfig(banned_phrases=["a b"]).entities_digest() == SafetyConfig(banned_phrases=["a b"]).entities_digest()
            True
        """
        memo = self.__dict__.get("_entities_digest")
        if memo is None:
            text = json.dumps([self._phrases, self._token_id_phrases], ensure_ascii=False)
            memo = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
            _set(self, "_entities_digest", memo)
        return memo

    def with_matcher(self, matcher: str) -> "SafetyConfig":
        """This config with ``matcher`` set (``self`` when it already is); the copy is kept on ``self``,
        so repeated calls (every ``generate(..., compile=True)`` of a host-matcher config) neither
        re-validate the entity list nor re-hash it."""
        if matcher == self.matcher:
            return self
        variants = self.__dict__.setdefault("_matcher_variants", {})
        if matcher not in variants:
            from dataclasses import replace
            variants[matcher] = replace(self, matcher=matcher)
        return variants[matcher]

    @property
    def has_filter(self) -> bool:
        """True when anything can ban a token (phrases, regexes or a store)."""
        return bool(self._phrases or self._token_id_phrases or self.regexes or self.store is not None)

    @property
    def uses_reward(self) -> bool:
        """True when a reward model takes part (a model and a non-zero weight)."""
        return self.reward_model is not None and self.reward_weight != 0.0

    @property
    def is_empty(self) -> bool:
        """True when the config changes nothing (no filter, no TSDI, no reward)."""
        return not self.has_filter and self.tsdi is None and not self.uses_reward

    # ------------------------------------------------------------------ builders
    def build_matcher(self, tokenizer, *, vocab_size: int | None = None, eos_token_id=None):
        """A matcher source with ``.current() -> PhraseMatcher`` for this config, or ``None``.

        With a store it is a :class:`fastsafe.safety.LiveMatcher` (follows new versions);
        otherwise a fixed :class:`fastsafe.safety.PhraseMatcher` behind the same interface.
        Built by :func:`fastsafe.safety_builder.build_matcher`, which caches it by content (the
        entities, the store's file, the options, the tokenizer's vocabulary, ``V``, EOS), so
        repeated ``fastsafe.generate`` calls do not re-tokenise the entity list.
        """
        from .safety_builder import build_matcher
        return build_matcher(self, tokenizer, vocab_size=vocab_size, eos_token_id=eos_token_id)

    def resolve_reward(self):
        """The reward object (``"profanity"`` becomes a :class:`fastsafe.reward.ProfanityReward`), or None.

        The config is not changed (it is frozen); the builder keeps the resolved object.
        """
        from .safety_builder import resolve_reward
        return resolve_reward(self)


def _set(config, name: str, value) -> None:
    """Normalise a field while the frozen config is being built (``__post_init__`` only)."""
    object.__setattr__(config, name, value)
