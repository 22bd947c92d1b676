"""Phrase matching for risk filtering: a token-level ban automaton and a text-level candidate check.

Two complementary checks, both stateless per call (a row is described by its history, so beam
reordering and finished rows need no bookkeeping):

* :meth:`PhraseMatcher.banned_bitmask` -- token level, over the whole vocabulary. Every entity
  is tokenised in every variant (:func:`phrase_variants`: the phrase as written and its plain
  spellings, each as written, lower case, Capitalised and UPPER, each with and without a leading
  space); a token is banned for a row when the
  row's history ends with all but the last token of a variant and the token is that last one
  (single-token variants are always banned). With ``token_id_phrases`` this is exactly the rule
  of transformers' ``NoBadWordsLogitsProcessor``. Lookup is vectorised over the batch
  (:class:`~fastsafe.safety.token_index.TokenIndex`: hashes of each row's last ``d`` tokens, one
  ``searchsorted`` into the sorted prefix hashes, exact token-by-token verification of the hits),
  so a step costs about the same with 100 or 100,000 entities.
* :meth:`PhraseMatcher.check_candidates` -- text level, on the chosen top-k candidates. The row's
  recent text plus each candidate is normalised (:func:`fastsafe.safety.normalize.normalize_text`:
  NFKC, case folding, invisible characters, confusables, leetspeak) and a candidate is blocked
  when a *new* occurrence of a normalised entity ends inside the candidate's text. This catches
  split tokenisations (``" bo" + "mb"``) and spelling variants (``"B0MB"``, ``"b\\u200bomb"``)
  that the token table cannot list. Occurrences are whole words (entity edges that are letters or
  digits must sit at word boundaries; the end of the text counts as a boundary, since the word
  may stop there) unless ``word_boundaries=False``. Regex entities are searched in the
  lightly normalised text (:func:`~fastsafe.safety.normalize.light_normalize`) with RE2
  (:mod:`fastsafe.safety.regex`: linear time in the text, whatever the pattern).

Store entities that cannot be compiled for the tokenizer / vocabulary are skipped one by one
(``skip_invalid``; :class:`SkippedEntity`), never the whole matcher. :class:`~fastsafe.safety.live_matcher.LiveMatcher` keeps a
matcher in step with a store: a change committed before a call of ``current()`` is in force in
what that call returns (a small delta matcher beside the base, merged in the background).
"""
from __future__ import annotations

import bisect
import re
import threading
import unicodedata
import warnings
import weakref
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np
import torch

from fastsafe.ops.bitmask import ban_tokens_, full_bitmask
from fastsafe.ops.validate import check_history_tensor, token_rows

from .entity_list import active_entities, config_entities, eos_id_set, matcher_vocab_size
from .events import SafetyEvent
from .normalize import deleet_forms, is_word_char, light_normalize, normalize_text
from .regex import compile_regex
from .store import RiskEntity
from .token_index import TokenIndex, _ranges
from .token_sequences import (drop_sequences, encode_phrases, entity_token_ids, eos_singles, phrase_forms,
                              unemittable)

__all__ = ["PhraseMatcher", "SkippedEntity", "phrase_variants", "warn_skipped"]

_REPLACEMENT = "\ufffd"
_START_ASCII = re.compile(r"\b\w|[^\w\s]", re.ASCII)    # word starts and punctuation (ASCII text)


@lru_cache(maxsize=65536)
def _word(ch: str) -> bool:
    return is_word_char(ch)


@dataclass(frozen=True)
class SkippedEntity:
    """An entity a matcher could not compile for its tokenizer / vocabulary, and why.

    Every other entity stays in force (fail closed per entity); ``fastsafe entities check`` lists these.

    Example:
        >>> m = PhraseMatcher.build(None, entities=[RiskEntity(7, "99999 5", "token_ids")], vocab_size=10,
        ...                         skip_invalid=True, warn=False)
        >>> m.skipped[0].entity.id, m.skipped[0].reason
        (7, 'token ids [99999] outside the vocabulary [0, 10)')
    """

    entity: RiskEntity
    reason: str

    def __str__(self) -> str:
        e = self.entity
        return f"entity id={e.id} {e.kind} {e.phrase[:80]!r}: {self.reason}"


def warn_skipped(items: list) -> None:
    shown = "; ".join(str(x) for x in items[:5]) + (f"; and {len(items) - 5} more" if len(items) > 5 else "")
    warnings.warn(f"fastsafe: {len(items)} risk entit{'y' if len(items) == 1 else 'ies'} not enforced (cannot be "
                  f"compiled for this tokenizer/vocabulary; every other entity is in force; see "
                  f"`fastsafe entities check`): {shown}", RuntimeWarning, stacklevel=3)


def report_new_skips(reported: set, items, on_skip=None) -> None:
    """Warn about (and pass to ``on_skip``) the skipped entities of ``items`` not yet in ``reported``
    (keys: entity id, phrase, reason), then add them: a follower of a store reports each problem
    once, not at every rebuild."""
    new = [x for x in items if (x.entity.id, x.entity.phrase, x.reason) not in reported]
    if not new:
        return
    reported.update((x.entity.id, x.entity.phrase, x.reason) for x in new)
    warn_skipped(new)
    if on_skip is not None:
        for x in new:
            on_skip(x)


def phrase_variants(phrase: str, _deleet: list[str] | None = None) -> list[str]:
    """The surface forms tokenised for one phrase entity (each is also tokenised with a leading space).

    For the phrase as written and for its plain spellings (:func:`~fastsafe.safety.normalize.deleet_forms`:
    NFKC, case folding, invisible characters, confusables and leetspeak read back): the form itself,
    lower case, Capitalised and UPPER; duplicates removed, in that order.

    Example:
        >>> phrase_variants("b0mb")
        ['b0mb', 'B0mb', 'B0MB', 'bomb', 'Bomb', 'BOMB']
    """
    p = phrase.strip()
    out: list[str] = []
    for base in [p] + (deleet_forms(p) if _deleet is None else _deleet):
        low = base.lower()
        for v in (base, low, low[:1].upper() + low[1:], base.upper()):
            if v and v not in out:
                out.append(v)
    return out


# ---------------------------------------------------------------------------------------------
# token texts (shared by every matcher of one tokenizer)
# ---------------------------------------------------------------------------------------------
def _plain_backend(tokenizer):
    """The Rust tokenizer of a fast HF tokenizer when decoding through it gives the same text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "decode_batch"):
        return None
    try:
        probe = tokenizer.encode(" Hello wörld, 12 ｂｏｍｂ!", add_special_tokens=False)
        same = backend.decode(probe, skip_special_tokens=True) == tokenizer.decode(
            probe, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    except Exception:
        return None
    return backend if same else None


class _TokenTexts:
    """Per-token text pieces as they appear *inside* a sequence (leading spaces kept), cached."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.backend = _plain_backend(tokenizer)
        self.lock = threading.Lock()
        self.raw: dict[int, str] = {}
        self.norm: dict[int, str] = {}
        self.light: dict[int, str] = {}
        ids = tokenizer.encode("a", add_special_tokens=False) if hasattr(tokenizer, "encode") else []
        self.anchor = int(ids[0]) if ids else None
        self.anchor_text = self._decode([self.anchor]) if self.anchor is not None else ""

    def _decode(self, ids):
        backend = self.backend
        if backend is not None:
            return backend.decode(list(ids), skip_special_tokens=True)
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _batch_decode(self, seqs):
        backend = self.backend
        if backend is not None:
            return backend.decode_batch([list(x) for x in seqs], skip_special_tokens=True)
        if hasattr(self.tok, "batch_decode"):
            return self.tok.batch_decode(seqs, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return [self._decode(x) for x in seqs]

    def ensure(self, ids: Iterable[int]) -> None:
        missing = [t for t in set(ids) if t not in self.raw]
        if not missing:
            return
        with self.lock:
            missing = [t for t in missing if t not in self.raw]
            if not missing:
                return
            if self.anchor is not None:
                texts = self._batch_decode([[self.anchor, t] for t in missing])
                a = self.anchor_text
                plain = None
                for i, (t, s) in enumerate(zip(missing, texts)):
                    if s.startswith(a):
                        piece = s[len(a):]
                    else:
                        if plain is None:
                            plain = self._batch_decode([[m] for m in missing])
                        piece = plain[i]
                    self._set(t, piece)
            else:
                for t, s in zip(missing, self._batch_decode([[m] for m in missing])):
                    self._set(t, s)

    def _set(self, t: int, piece: str) -> None:
        self.norm[t] = normalize_text(piece)
        self.light[t] = light_normalize(piece)
        self.raw[t] = piece  # last: `t in raw` means all three are set


_TEXTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_TEXTS_LOCK = threading.Lock()


def _token_texts(tokenizer) -> _TokenTexts:
    with _TEXTS_LOCK:
        try:
            tt = _TEXTS.get(tokenizer)
        except TypeError:  # not weak-referenceable
            return _TokenTexts(tokenizer)
        if tt is None:
            tt = _TokenTexts(tokenizer)
            _TEXTS[tokenizer] = tt
        return tt


def _gather_seqs(flat: np.ndarray, lens: np.ndarray, starts: np.ndarray, seq_ids: np.ndarray):
    """Sub-select sequences ``seq_ids`` of a CSR set -> (flat, lens)."""
    sl = lens[seq_ids]
    idx, _ = _ranges(starts[seq_ids], sl)
    return flat[idx], sl


class PhraseMatcher:
    """Token-id automaton over every tokenisation variant of each entity, plus a text-level check.

    Build with :meth:`build`; the object is immutable afterwards (safe to share across threads).

    Attributes:
        vocab_size: ``V`` of the bitmask (``len(tokenizer)`` unless overridden).
        max_phrase_tokens: longest banned token sequence (the history a row needs is one less).
        max_phrase_chars: longest normalised phrase in characters.
        entities: the entities it was built from (``RiskEntity``; id 0 for ones not from a store).
        version: the store version it was built from (None when built from plain lists).
        num_sequences: banned token sequences (all variants, after de-duplication).
    """

    def __init__(self, *, tokenizer, vocab_size: int, entities: list[RiskEntity], index: TokenIndex,
                 text_map: dict, regexes: list, word_boundaries: bool, regex_window: int,
                 phrase_cache: tuple, num_sequences: int, version=None, forms: dict | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.entities = entities
        self.version = version
        self.word_boundaries = bool(word_boundaries)
        self.regex_window = int(regex_window)
        self.num_sequences = int(num_sequences)
        self._index = index
        self._max_prefix = index.max_prefix
        self.max_phrase_tokens = (index.max_prefix + 1) if (index.num_prefixes or index.static) else 0
        self._text_map = text_map                  # normalised phrase -> entity index
        self.max_phrase_chars = max((len(k) for k in text_map), default=0)
        self._text_lengths = frozenset(len(k) for k in text_map)
        self._text_sorted = sorted(text_map)       # for "is x a prefix of an entity" (bisect)
        self._piece_cache: dict = {}               # (token, context class) -> entity index | None
        self._regexes = regexes                    # list of (compiled, entity index)
        self._phrase_cache = phrase_cache          # (phrase -> (first seq, count), flat, lens, starts)
        self._forms = forms or {}                  # phrase -> (normalised, deleet forms), for reuse
        self._base_cpu = full_bitmask(self.vocab_size)
        if index.static:
            ban_tokens_(self._base_cpu, sorted(index.static))
        self._base_np = self._base_cpu.numpy()
        self._texts = _token_texts(tokenizer) if (text_map or regexes) and tokenizer is not None else None
        self.skipped: list[SkippedEntity] = []     # set by build (entities left out, with the reason)
        self._skipped_idx: frozenset = frozenset()
        self._singles = (np.zeros(0, np.int64), np.zeros(0, np.int64))   # (token, entity) of 1-token sequences
        self._n_config = 0                         # entities[:_n_config] came from the build arguments
        self._seq_hash = np.zeros(0, np.uint64)    # hash of every banned sequence (sorted), and its entity
        self._seq_val = np.zeros(0, np.int64)
        self._by_id: dict | None = None            # store id -> entity indices (lazy, for LiveMatcher)
        self._by_norm: dict | None = None          # normalised phrase -> entity indices (lazy)

    # ------------------------------------------------------------------ masks (for LiveMatcher)
    def indices_of_ids(self, ids) -> set[int]:
        """Indices of the store entities (not the build arguments) with these store ids."""
        if self._by_id is None:
            by: dict = {}
            for i in range(self._n_config, len(self.entities)):
                by.setdefault(self.entities[i].id, []).append(i)
            self._by_id = by
        return {i for x in ids for i in self._by_id.get(x, ())}

    def prepare_masks(self) -> None:
        """Build the maps :meth:`indices_of_ids` and :meth:`collateral` use (O(entities), once)."""
        self.indices_of_ids(())
        if self._by_norm is None:
            by: dict = {}
            forms, skipped = self._forms, self._skipped_idx
            for i, e in enumerate(self.entities):
                if e.kind == "phrase" and e.phrase in forms and i not in skipped:
                    by.setdefault(forms[e.phrase][0], []).append(i)
            self._by_norm = by

    def collateral(self, drop: set[int]) -> set[int]:
        """Entities outside ``drop`` that share a banned token sequence or a normalised text with one in
        it (the automaton keeps one owner per sequence / text, so masking ``drop`` would unban them too)."""
        out: set[int] = set()
        if len(self._seq_hash) and drop:
            mine = self._seq_hash[np.isin(self._seq_val, np.fromiter(drop, np.int64, len(drop)))]
            if len(mine):
                out.update(self._seq_val[np.isin(self._seq_hash, mine)].tolist())
        if self._text_map and drop:
            self.prepare_masks()
            for i in drop:
                e = self.entities[i]
                if e.kind == "phrase" and e.phrase in self._forms:
                    out.update(self._by_norm.get(self._forms[e.phrase][0], ()))
        return out - drop - set(self._skipped_idx)

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, tokenizer, phrases: Iterable = (), *, token_id_phrases: Iterable = (), regexes: Iterable = (),
              entities: Iterable[RiskEntity] | None = None, vocab_size: int | None = None,
              eos_token_id=None, word_boundaries: bool = True, regex_window: int = 200,
              version=None, reuse: "PhraseMatcher | None" = None, skip_invalid: bool = False,
              warn: bool = True) -> "PhraseMatcher":
        """Build a matcher.

        Args:
            tokenizer: a Hugging Face tokenizer (fast or slow; ``None`` only with token-id phrases alone).
            phrases: strings (or :class:`RiskEntity`); tokenised in every variant (see :func:`phrase_variants`),
                each with and without a leading space, and matched at text level after normalisation.
            token_id_phrases: lists of token ids banned verbatim, with exactly the semantics of
                ``NoBadWordsLogitsProcessor(bad_words_ids=token_id_phrases, eos_token_id=eos_token_id)``
                (no text-level check for these).
            regexes: patterns (str or compiled) checked at text level on the candidates.
            entities: :class:`RiskEntity` rows (e.g. ``store.entities()``), any kind; inactive ones are skipped.
            vocab_size: ``V`` of the bitmask; defaults to ``len(tokenizer)``. Use the model's logits width
                when the embedding is padded beyond the tokenizer. Phrase variants with ids ``>= V``
                (or the tokenizer's unk id) are dropped; token-id phrases with such ids raise ValueError.
            eos_token_id: int or list of ints; single-token sequences equal to one of them are
                never banned (as in ``NoBadWordsLogitsProcessor``). Defaults to ``tokenizer.eos_token_id``.
            word_boundaries: text-level matches must be whole words (see the module docstring).
            regex_window: characters of recent text a regex sees (plus the candidate).
            version: stored on the matcher (``LiveMatcher`` passes the store version).
            reuse: a previous matcher of the same tokenizer whose phrase tokenisations are reused
                (makes incremental rebuilds fast).
            skip_invalid: fail closed *per entity* for the ``entities`` rows: one that cannot be
                compiled for this tokenizer / vocabulary (token ids ``>= V``, a regex the
                linear-time engine rejects, a phrase empty after normalisation or tokenisation,
                an unknown kind) is left out and listed in :attr:`skipped` with the reason, and
                every other entity is in force. The ``phrases`` / ``token_id_phrases`` /
                ``regexes`` arguments always raise (they are the caller's own configuration).
            warn: with ``skip_invalid``, also ``warnings.warn`` once per build naming the skipped rows.

        Regexes run on RE2 (:mod:`fastsafe.safety.regex`): linear time in the text, whatever the
        pattern; a compiled ``re.Pattern`` is re-compiled from its pattern (``re.IGNORECASE`` kept).

        Raises:
            ValueError: an entity empty after normalisation or tokenisation (named), a token id
                outside ``[0, V)``, an invalid regex or one that matches the empty string (for the
                ``entities`` rows only when ``skip_invalid`` is False).

        Example:
            >>> m = PhraseMatcher.build(None, token_id_phrases=[[5, 7], [3]], vocab_size=10)
            >>> sorted(m.banned_tokens([1, 5])), m.max_phrase_tokens
            ([3, 7], 2)
        """
        vocab_size = matcher_vocab_size(tokenizer, vocab_size)
        eos_ids = eos_id_set(tokenizer, eos_token_id)
        ents = config_entities(phrases, token_id_phrases, regexes)
        n_config = len(ents)                 # ents[:n_config] raise on errors; the rest may be skipped
        ents += active_entities(entities)
        skipped: dict[int, str] = {}         # entity index -> reason

        def fail(i: int, reason: str) -> None:
            if i < n_config or not skip_invalid:
                raise ValueError(f"entity {ents[i].phrase!r}: {reason}")
            skipped.setdefault(i, reason)

        # ---- phrases: the entity that owns each distinct phrase (forms reused from `reuse`)
        phrase_owner, forms = phrase_forms(ents, fail, reuse._forms if reuse is not None else None)
        if phrase_owner and tokenizer is None:
            raise ValueError("tokenizer: required for phrase entities")

        # ---- tokenise every variant of the phrases not tokenised by `reuse`
        old_map, old_flat, old_lens, old_starts = ({}, None, None, None)
        if reuse is not None and reuse.tokenizer is tokenizer:
            old_map, old_flat, old_lens, old_starts = reuse._phrase_cache
        new_phrases = [p for p in phrase_owner if p not in old_map]
        new_flat, new_lens, owner, empty = encode_phrases(tokenizer, new_phrases, forms, ents, fail)
        n_variants = len(new_lens) // 2
        nonempty = new_lens > 0
        new_count = np.bincount(owner[nonempty], minlength=len(new_phrases))
        if empty:
            for p in empty:
                del phrase_owner[p]
            keep_p = [j for j, p in enumerate(new_phrases) if p not in empty]
            new_phrases = [new_phrases[j] for j in keep_p]
            new_count = new_count[keep_p]
        text_map: dict[str, int] = {}
        for i, e in enumerate(ents):             # the text map: every phrase entity still in force
            if e.kind == "phrase" and i not in skipped:
                norm = forms[e.phrase][0]
                old = text_map.get(norm)
                if old is None or ents[old].severity < e.severity:
                    text_map[norm] = i
        new_lens = new_lens[nonempty]               # drop empty tokenisations (flat is unaffected)

        # ---- assemble CSR arrays: reused phrases first, then new ones
        reused = [p for p in phrase_owner if p in old_map]
        parts_flat, parts_lens = [], []
        cache_map: dict[str, tuple[int, int]] = {}
        nseq = 0
        if reused:
            firsts = np.fromiter((old_map[p][0] for p in reused), np.int64, len(reused))
            counts = np.fromiter((old_map[p][1] for p in reused), np.int64, len(reused))
            seq_ids, _ = _ranges(firsts, counts)
            f, l = _gather_seqs(old_flat, old_lens, old_starts, seq_ids)
            parts_flat.append(f)
            parts_lens.append(l)
            for p, c in zip(reused, counts.tolist()):
                cache_map[p] = (nseq, c)
                nseq += c
        if new_phrases:
            parts_flat.append(new_flat)
            parts_lens.append(new_lens)
            for p, c in zip(new_phrases, new_count.tolist()):
                cache_map[p] = (nseq, c)
                nseq += c
        ph_flat = np.concatenate(parts_flat) if parts_flat else np.zeros(0, np.int64)
        ph_lens = np.concatenate(parts_lens) if parts_lens else np.zeros(0, np.int64)
        ph_starts = np.cumsum(ph_lens) - ph_lens
        ph_order = reused + new_phrases
        counts = np.fromiter((cache_map[p][1] for p in ph_order), np.int64, len(ph_order))
        ph_vals = np.repeat(np.fromiter((phrase_owner[p] for p in ph_order), np.int64, len(ph_order)), counts)
        phrase_cache = (cache_map, ph_flat.astype(np.int32), ph_lens.astype(np.int32), ph_starts)

        # ---- token-id entities and regexes
        tid_seqs: list[list[int]] = []
        tid_vals: list[int] = []
        regex_list = []
        for i, e in enumerate(ents):
            if e.kind == "token_ids":
                try:
                    tid_seqs.append(entity_token_ids(e, vocab_size))
                except ValueError as exc:
                    fail(i, str(exc))
                    continue
                tid_vals.append(i)
            elif e.kind == "regex":
                try:
                    pat = compile_regex(e.phrase)
                except (ValueError, TypeError) as exc:
                    fail(i, str(exc).removeprefix("phrase: "))
                    continue
                regex_list.append((pat, i))
            elif e.kind != "phrase":
                fail(i, f"unknown kind {e.kind!r}")

        # ---- filter phrase variants the model cannot emit; add token-id sequences; drop [eos]
        cannot_emit = unemittable(ph_flat, ph_lens, tokenizer, vocab_size)
        flat, lens, vals = drop_sequences(ph_flat, ph_lens, ph_vals, cannot_emit)
        if tid_seqs:
            flat = np.concatenate([flat, np.fromiter((t for s in tid_seqs for t in s), np.int64)])
            lens = np.concatenate([lens, np.asarray([len(s) for s in tid_seqs], np.int64)])
            vals = np.concatenate([vals, np.asarray(tid_vals, np.int64)])
        flat, lens, vals = drop_sequences(flat, lens, vals, eos_singles(flat, lens, eos_ids))
        sev = np.asarray([e.severity for e in ents], np.float64)
        index = TokenIndex.from_arrays(flat, lens, vals, sev[vals] if len(vals) else np.zeros(0))
        single = np.nonzero(lens == 1)[0]
        singles = (flat[(np.cumsum(lens) - 1)[single]].astype(np.int64), vals[single].astype(np.int64))
        if n_variants > 50000:
            _release_memory()
        skipped_list = [SkippedEntity(ents[i], why) for i, why in sorted(skipped.items())]
        if skipped_list and warn:
            warn_skipped(skipped_list)
        m = cls(tokenizer=tokenizer, vocab_size=vocab_size, entities=ents, index=index, text_map=text_map,
                regexes=regex_list, word_boundaries=word_boundaries, regex_window=regex_window,
                phrase_cache=phrase_cache, num_sequences=len(lens), version=version, forms=forms)
        m.skipped = skipped_list
        m._skipped_idx = frozenset(skipped)
        m._singles = singles
        m._n_config = n_config
        h = _seq_hashes(flat, lens)
        order = np.argsort(h, kind="stable")
        m._seq_hash, m._seq_val = h[order], vals[order].astype(np.int64)
        return m

    def __len__(self) -> int:
        return len(self.entities)

    @property
    def has_text_rules(self) -> bool:
        """True when :meth:`check_candidates` can block anything (phrase or regex entities)."""
        return bool(self._text_map) or bool(self._regexes)

    @property
    def num_regexes(self) -> int:
        return len(self._regexes)

    def __repr__(self) -> str:
        return (f"PhraseMatcher({len(self.entities)} entities, {self.num_sequences} token sequences, "
                f"{len(self._index.static)} always-banned tokens, V={self.vocab_size}, version={self.version})")

    # ------------------------------------------------------------------ token level
    def _rev(self, name: str, histories):
        """histories -> (rev [B, D] int64 numpy, last D tokens backwards; lengths [B])."""
        D = self._max_prefix
        if isinstance(histories, torch.Tensor):
            check_history_tensor(name, histories)
            B, T = histories.shape
            d = min(D, T)
            h = histories[:, T - d:].flip(1) if d else histories[:, :0]
            rev = h.to("cpu", torch.int64).numpy()
            return rev, np.full(B, d, np.int64)
        rows = token_rows(name, histories, D)
        rev = np.zeros((len(rows), D), np.int64)
        lengths = np.zeros(len(rows), np.int64)
        for b, r in enumerate(rows):
            if r:
                rev[b, :len(r)] = r[::-1]
                lengths[b] = len(r)
        return rev, lengths

    def banned_bitmask(self, histories, *, device=None) -> torch.Tensor:
        """Packed mask of the tokens allowed next, per row.

        Args:
            histories: ``[B, T]`` integer tensor, or a list of ``B`` lists of token ids (ragged is
                fine): each row's tokens so far (prompt + generated). Left padding is not removed:
                pass unpadded rows, or pad with a token that starts no entity.
            device: device of the result (default: the history tensor's, else CPU).

        Returns:
            ``[B, ceil(V/32)]`` int32; bit ``t`` (word ``t // 32``, bit ``t % 32``) is 0 when token
            ``t`` would complete an entity (single-token entities always), else 1.

        Example:
            >>> m = PhraseMatcher.build(None, token_id_phrases=[[3], [1, 2]], vocab_size=8)
            >>> from fastsafe.ops import unpack_bitmask
            >>> unpack_bitmask(m.banned_bitmask([[0, 1], [2]]), 8).int().tolist()
            [[1, 1, 0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 1, 1, 1, 1]]
        """
        if device is None:
            device = histories.device if isinstance(histories, torch.Tensor) else torch.device("cpu")
        res = torch.from_numpy(self.bitmask_array(histories))
        return res if torch.device(device).type == "cpu" else res.to(device)

    def bitmask_array(self, histories, drop: np.ndarray | None = None, static_np: np.ndarray | None = None):
        """``[B, W]`` int32 numpy allowed-bits; ``drop``: entity indices whose sequences are ignored (their
        single-token bans must already be left out of ``static_np``, see :meth:`static_bans`)."""
        rev, lengths = self._rev("histories", histories)
        B = rev.shape[0]
        out = np.repeat((self._base_np if static_np is None else static_np)[None, :], B, axis=0)
        if self._index.num_prefixes and B:
            rows, toks, vals = self._index.completions(*self._index.hits(rev, lengths))
            if drop is not None and len(drop) and len(rows):
                keep = ~np.isin(vals, drop)
                rows, toks = rows[keep], toks[keep]
            if len(rows):
                V = self.vocab_size
                W = out.shape[1]
                key = np.unique(rows * V + toks)
                r, t = key // V, key % V
                clear = np.bincount(r * W + t // 32, weights=np.left_shift(1, t % 32).astype(np.float64),
                                    minlength=B * W).astype(np.int64)   # distinct bits: sum == OR
                out &= ~clear.astype(np.uint32).view(np.int32).reshape(B, W)
        return out

    def static_bans(self, drop: np.ndarray) -> np.ndarray:
        """``[W]`` allowed-bits of the single-token bans, without those of the entities in ``drop``."""
        toks, vals = self._singles
        base = full_bitmask(self.vocab_size)
        keep = toks[~np.isin(vals, drop)] if len(toks) else toks
        if len(keep):
            ban_tokens_(base, sorted(set(keep.tolist())))
        return base.numpy()

    def banned_tokens(self, history: Sequence[int]) -> set[int]:
        """The set of tokens banned after one history (static ones included); for tests and debugging."""
        rev, lengths = self._rev("history", [list(history)])
        s = set(self._index.static)
        if self._index.num_prefixes:
            _, toks, _ = self._index.completions(*self._index.hits(rev, lengths))
            s.update(toks.tolist())
        return s

    def explain_token_ban(self, history, token_id: int, masked=None) -> RiskEntity | None:
        """Which entity bans ``token_id`` after ``history`` (None if it is not banned).

        Returns the entity of the highest severity among the variants that apply; entity indices in
        ``masked`` (a set) are left out.
        """
        _drop = masked
        if isinstance(history, torch.Tensor):
            history = history.reshape(-1).tolist()
        token_id = int(token_id)
        found = []
        if _drop is None:
            if token_id in self._index.static:
                found.append(self._index.static[token_id])
        else:
            st, sv = self._singles
            found.extend(sv[st == token_id].tolist())
        if self._index.num_prefixes:
            rev, lengths = self._rev("history", [list(history)])
            _, toks, vals = self._index.completions(*self._index.hits(rev, lengths))
            found.extend(vals[toks == token_id].tolist())
        if _drop is not None:
            found = [j for j in found if j not in _drop]
        if not found:
            return None
        return self.entities[max(found, key=lambda j: self.entities[j].severity)]

    # ------------------------------------------------------------------ text level
    def _tail(self, row: list[int], texts: _TokenTexts):
        """(raw tail text, tail token ids, partial?) long enough for the longest entity/regex window.

        Pieces that are partial UTF-8 (decode to U+FFFD alone) do not count towards the length;
        when there is one, the tail is decoded jointly so bytes merge into characters.
        """
        need_norm = self.max_phrase_chars + 1
        need_light = self.regex_window if self._regexes else 0
        raw_parts: list[str] = []
        nlen = llen = 0
        partial = False
        i = len(row)
        cap = 4 * max(need_norm, need_light) + 16
        start = i
        while i > 0 and (nlen < need_norm or llen < need_light) and start - i < cap:
            i -= 1
            t = row[i]
            piece = texts.raw.get(t)
            if piece is None:
                texts.ensure([t])
                piece = texts.raw[t]
            raw_parts.append(piece)
            if _REPLACEMENT in piece:
                partial = True
                continue
            nlen += len(texts.norm[t])
            llen += len(texts.light[t])
        ids = row[i:]
        if partial:
            return texts._decode(list(ids)), ids, True
        raw_parts.reverse()
        return "".join(raw_parts), ids, False

    def _starts(self, text: str, lo: int, hi: int) -> list[int]:
        """Positions in ``[lo, hi)`` where an entity occurrence may start (sorted)."""
        if not self.word_boundaries:
            return [i for i in range(lo, hi) if text[i] != " "]
        if text.isascii():
            return [m.start() for m in _START_ASCII.finditer(text, lo, hi)]
        return [i for i in range(lo, hi) if text[i] != " " and (i == 0 or not _word(text[i]) or not _word(text[i - 1]))]

    def _piece_info(self, pn: str, ctx: str, drop=None):
        """For a candidate's normalised text ``pn`` after a tail ending like ``ctx``:
        (entity index of an occurrence inside the piece or None, the piece as appended,
        valid end offsets ``q`` such that an entity may end after ``pn[:q]``)."""
        if pn.startswith(" ") and ctx == " ":
            pn = pn[1:]
        text = ctx + pn
        t0 = len(ctx)
        hit = self._match_text(text, t0, [], drop)
        L = len(text)
        wb = self.word_boundaries
        ends = tuple(e - t0 for e in range(t0 + 1, L + 1) if text[e - 1] != " " and
                     (not wb or e == L or not (_word(text[e - 1]) and _word(text[e]))))
        return hit, pn, ends

    def _active_starts(self, tail: str, starts: list[int]) -> list[int]:
        """The starts ``s`` whose text ``tail[s:]`` is a prefix of some normalised entity (bisect)."""
        S = self._text_sorted
        n = len(S)
        t0 = len(tail)
        out = []
        for st in starts[bisect.bisect_left(starts, t0 - self.max_phrase_chars):]:
            x = tail[st:]
            i = bisect.bisect_left(S, x)
            if i < n and S[i].startswith(x):
                out.append(st)
        return out

    def _match_text(self, text: str, t0: int, tail_starts: list[int] | None = None, drop=None):
        """Entity index of a new occurrence ending after position ``t0`` in normalised ``text``, or None.

        ``tail_starts``: precomputed :meth:`_starts` of ``text[:t0]`` (entries >= t0 are ignored).
        """
        L = len(text)
        if L <= t0 or not self._text_map:
            return None
        wb = self.word_boundaries
        ends = [e for e in range(t0 + 1, L + 1) if text[e - 1] != " " and
                (not wb or e == L or not (_word(text[e - 1]) and _word(text[e])))]
        if not ends:
            return None
        maxlen = self.max_phrase_chars
        if tail_starts is None:
            tail_starts = self._starts(text, max(0, t0 - maxlen), t0)
        elif tail_starts and tail_starts[-1] >= t0:
            tail_starts = tail_starts[:bisect.bisect_left(tail_starts, t0)]
        starts = tail_starts + self._starts(text, t0, L)
        lengths = self._text_lengths
        tmap = self._text_map
        for e in ends:
            for i in range(bisect.bisect_left(starts, e - maxlen), len(starts)):
                st = starts[i]
                if st >= e:
                    break
                if (e - st) in lengths:
                    j = tmap.get(text[st:e])
                    if j is not None and (drop is None or j not in drop):
                        return j
        return None

    def _match_regex(self, text: str, t0: int, drop=None):
        for pat, j in self._regexes:
            if drop is not None and j in drop:
                continue
            for m in pat.finditer(text):
                if m.end() > t0 and m.end() > m.start():
                    return j
        return None

    def check_candidates(self, histories, candidate_ids, *, masked=None) -> tuple[torch.Tensor, list[SafetyEvent]]:
        """Text-level check of the top-k candidates.

        Args:
            histories: ``[B, T]`` integer tensor or list of ``B`` token-id lists.
            candidate_ids: ``[B, k]`` integer tensor (or nested lists) of candidate next tokens.
                Ids outside ``[0, V)`` (e.g. ``-1`` padding) are reported as not allowed, without an event.

        Returns:
            ``(allowed, events)``: ``allowed`` is ``[B, k]`` bool on ``candidate_ids``' device
            (False = the candidate would complete a normalised entity or a regex match), and one
            :class:`SafetyEvent` per blocked candidate with ``rule="text_match"`` or ``"regex"``
            and ``step=-1`` (the caller fills the step).

        Example:
            >>> allowed, events = m.check_candidates(input_ids, topk_ids)   # doctest: +SKIP
        """
        _drop = masked
        device = candidate_ids.device if isinstance(candidate_ids, torch.Tensor) else torch.device("cpu")
        cands = token_rows("candidate_ids", candidate_ids)
        need = max(self.max_phrase_chars + 1, self.regex_window if self._regexes else 0)
        rows = token_rows("histories", histories, 4 * need + 16)
        if len(rows) != len(cands):
            raise ValueError(f"candidate_ids: expected {len(rows)} rows (one per history), got {len(cands)}")
        k = max((len(c) for c in cands), default=0)
        if any(len(c) != k for c in cands):
            raise ValueError("candidate_ids: expected a rectangular [B, k] array")
        V = self.vocab_size
        allowed = [[0 <= c < V for c in cs] for cs in cands]
        events: list[SafetyEvent] = []
        if self._texts is None or k == 0:
            return torch.tensor(allowed, dtype=torch.bool, device=device).reshape(len(cands), k), events
        texts = self._texts
        texts.ensure([c for cs in cands for c in cs if 0 <= c < V])
        piece_cache = self._piece_cache
        tmap = self._text_map
        for b, (row, cs) in enumerate(zip(rows, cands)):
            tail_raw, tail_ids, partial = self._tail(row, texts)
            tail_norm = normalize_text(tail_raw) if self._text_map else ""
            tail_starts = self._starts(tail_norm, 0, len(tail_norm)) if self._text_map else []
            active = self._active_starts(tail_norm, tail_starts) if self._text_map else []
            ctx = _context_char(tail_norm)
            suffixes = [tail_norm[st:] for st in active]
            slow = {}
            slow_c = [c for j, c in enumerate(cs) if allowed[b][j] and (
                partial or _REPLACEMENT in texts.raw[c] or (texts.raw[c] and unicodedata.combining(texts.raw[c][0])))]
            if slow_c:
                base = list(tail_ids)
                slow = dict(zip(slow_c, texts._batch_decode([base + [c] for c in slow_c])))
            tail_light = light_normalize(tail_raw)[-self.regex_window:] if self._regexes else ""
            for j, c in enumerate(cs):
                if not allowed[b][j]:
                    continue
                piece = texts.raw[c]
                if c in slow:
                    full_raw = slow[c]
                    piece = full_raw[_common_prefix(full_raw, tail_raw):] or piece
                    hit = None
                    if self._text_map:
                        full = normalize_text(full_raw)
                        t0 = _common_prefix(full, tail_norm)
                        hit = self._match_text(full, t0, tail_starts, _drop)
                        rule = "text_match"
                    if hit is None and self._regexes:
                        lfull = light_normalize(full_raw)
                        t0 = _common_prefix(lfull, light_normalize(tail_raw))
                        cut = max(0, len(lfull) - self.regex_window - (len(lfull) - t0))
                        hit = self._match_regex(lfull[cut:], t0 - cut, _drop)
                        rule = "regex"
                else:
                    hit = None
                    if self._text_map:
                        if _drop is not None:        # a masked view: no cache (hits differ)
                            info = self._piece_info(texts.norm[c], ctx, _drop)
                        else:
                            info = piece_cache.get((c, ctx))
                            if info is None:
                                info = self._piece_info(texts.norm[c], ctx)
                                piece_cache[(c, ctx)] = info
                        hit, pn, ends = info
                        if hit is None and suffixes and ends:
                            for suf in suffixes:
                                for q in ends:
                                    hit = tmap.get(suf + pn[:q])
                                    if hit is not None and _drop is not None and hit in _drop:
                                        hit = None
                                    if hit is not None:
                                        break
                                if hit is not None:
                                    break
                        rule = "text_match"
                    if hit is None and self._regexes:
                        pl = texts.light[c]
                        if pl.startswith(" ") and tail_light.endswith(" "):
                            pl = pl[1:]
                        hit = self._match_regex(tail_light + pl, len(tail_light), _drop)
                        rule = "regex"
                if hit is not None:
                    allowed[b][j] = False
                    e = self.entities[hit]
                    events.append(SafetyEvent(step=-1, row=b, token_id=int(c), token_text=piece, rule=rule,
                                              entity=e.phrase, category=e.category, severity=e.severity))
        return torch.tensor(allowed, dtype=torch.bool, device=device).reshape(len(cands), k), events


def _seq_hashes(flat: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each CSR sequence (equal sequences, equal hashes)."""
    n = len(lens)
    h = np.full(n, np.uint64(len(lens) and 0x2545F4914F6CDD1D), np.uint64)
    if n == 0:
        return h
    starts = np.cumsum(lens) - lens
    with np.errstate(over="ignore"):
        h = h ^ lens.astype(np.uint64)
        for d in range(int(lens.max())):
            sel = lens > d
            tok = flat[starts[sel] + d].astype(np.uint64) + np.uint64(1)
            h[sel] = ((h[sel] * np.uint64(0x9E3779B97F4A7C15)) ^ tok) * np.uint64(0xBF58476D1CE4E5B9)
    return h


def _context_char(tail: str) -> str:
    """One character standing for the tail's end in the start-boundary and space-collapse rules."""
    if not tail:
        return ""
    ch = tail[-1]
    if ch == " ":
        return " "
    return "a" if _word(ch) else "."


def _release_memory() -> None:
    """Hand freed heap pages back to the OS after a large build (glibc only; a no-op elsewhere)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
