"""The device matcher: token bans and the text check as tensor programs, with one state per row.

>>> dm = DeviceMatcher.build(tok, ["make a bomb"], vocab_size=V, device="cuda")   # doctest: +SKIP
>>> state = dm.state_from_histories(prompt_ids)                                    # doctest: +SKIP
>>> words = dm.banned_bitmask(state)               # [B, ceil(V/32)] int32, bit 1 = allowed
>>> ok, entity = dm.check_candidates(state, topk_ids)                               # doctest: +SKIP
>>> state = dm.advance(state, chosen)                                              # doctest: +SKIP

Two automata, both on the device:

* **token level** (:mod:`~fastsafe.safety.token_automaton`): Aho-Corasick over every banned token
  sequence (the same sequences as :class:`~fastsafe.safety.PhraseMatcher`, so
  :meth:`DeviceMatcher.banned_bitmask` equals :meth:`PhraseMatcher.banned_bitmask`, the rule of
  transformers' ``NoBadWordsLogitsProcessor``);
* **text level** (:mod:`~fastsafe.safety.char_automaton`): a character DFA over folded text, fed
  from a ``[V, max_len]`` table of each token's character classes (:mod:`~fastsafe.safety.token_chars`).
  It catches what ``PhraseMatcher.check_candidates`` catches for any tokenisation of the text, and
  also letters split by separators (``b.o.m.b``, ``b o m b``, ``b-o-m-b``, ``b_o_m_b``), stretched
  letters (``booomb``) and Unicode look-alikes (UTS #39).

The state is one ``[B, 7]`` int64 tensor: token state, character state, character context (previous
class and its repeats), a partial UTF-8 character (codepoint bits, bytes still needed), the
character state before the current run's first repeat (for stretched letters), and a pending
spelled-out match (decided up to two characters after its last letter); ``[B, 10]``
(:attr:`DeviceMatcher.state_width`) when regular regex entities run on the device too (one search
DFA in three more columns: :mod:`~fastsafe.safety.regex_automaton`).
:meth:`advance`, :meth:`banned_bitmask` and :meth:`check_candidates` read no tensor back to the host
and have no data-dependent Python control flow, so a step compiles whole
(``torch.compile(fullgraph=True)``) and can be captured in a CUDA graph. Regexes that are not
regular there are the one host part: :meth:`host_regex_check`.

The step runs on native kernels where the extension has them (:attr:`DeviceMatcher.backend`
``"cpp"`` on the CPU, ``"cuda"`` on a GPU: the torch ops of
:mod:`~fastsafe.safety.device_matcher_ops`, one thread per row or candidate, early exits), else on
the tensor program written here (``"torch"``), which is their reference and the fallback
(``FASTSAFE_BACKEND=device_matcher:torch`` forces it; :meth:`DeviceMatcher.with_backend`).
"""
from __future__ import annotations

import copy
from typing import Iterable

import numpy as np
import torch

from ..ops.dispatch import backend_for
from .char_automaton import (BND, CP_LIMIT, FLAG_BND, FLAG_CONFIRM, FLAG_SEPARATOR, FLAG_WORD, NUM_SPECIAL,
                             OTHER_NONWORD, SQ2, SQ3, SQ4, action_tables, build_char_automaton)
from .ban_owners import ban_owner_table, banned_entity
from .regex_automaton import REGEX_COLUMNS, RegexTables, device_regexes, regex_step, regex_token_tables
from .entity_list import active_entities, config_entities, eos_id_set, matcher_vocab_size
from .store import RiskEntity
from .token_automaton import build_token_automaton
from .text_tables import text_tables
from .token_sequences import banned_sequences
from .device_matcher_ops import advance_op, banned_bitmask_op, check_candidates_op

__all__ = ["DeviceMatcher", "STATE_WIDTH"]

#: Columns of the state tensor: token state, character state, character context
#: (``previous class * 4 + run length``), partial UTF-8 character bits, its missing bytes, and the
#: character state before the current run's first repeat (-1: none), and the pending spelled-out
#: match (-1: none, else ``entity * 4 + 2 * new + level2``: ``level2`` 0 after the separator run that
#: follows its last letter, 1 after a single letter behind that run; ``new`` = its last letter is
#: in the token being checked, or it is still undecided from the token before).
STATE_WIDTH = 7
#: Phrase sets up to this size get the canonical text alphabet by default (build speed: cached tables).
CANONICAL_MAX_PHRASES = 10_000
_TOK, _CHR, _CTX, _CP, _NEED, _SHADOW, _PEND = range(STATE_WIDTH)
_TEXT_COLUMNS = (_CHR, _CTX, _CP, _NEED, _SHADOW, _PEND)


class DeviceMatcher:
    """Token-level bans and the text-level candidate check, as tables on one device.

    Build with :meth:`build` or :meth:`from_store`; immutable afterwards (a new store version
    builds a new matcher; :meth:`state_from_histories` gives the rows' states under it).

    Attributes:
        vocab_size: ``V`` (width of the bitmask: ``ceil(V/32)`` words).
        device: where the tables live; states and token ids must be there too.
        entities: the entities (``RiskEntity``), indexed by the entity ids the checks return.
        version: the store version (None when built from plain lists).
        word_boundaries: text matches are whole words.
        max_token_chars: slots per token in the text table (``max_len``).
        text_excluded: phrases left out of the text check because they fold to separators only
            (``"-"``: they would match every space); their token variants are still banned.
        skipped: the entities not in force (:class:`~fastsafe.safety.SkippedEntity`, with
            ``skip_invalid=True``), each with the reason.
    """

    skipped: list = []

    def __init__(self, *, entities, vocab_size, device, tok, char, slots, cp_classes, word_boundaries, version,
                 regex_matcher, ban_owners=None, regex=None):
        self.entities = entities
        self.vocab_size = int(vocab_size)
        self.version = version
        self.word_boundaries = bool(word_boundaries)
        self._regex_matcher = regex_matcher
        dev = torch.device(device)
        t = lambda a, dt=torch.int64: torch.as_tensor(np.ascontiguousarray(a), dtype=dt, device=dev)  # noqa: E731
        i32 = lambda a: t(np.asarray(a), torch.int32)                      # noqa: E731  (index tables)
        W = (self.vocab_size + 31) // 32
        self._words = W
        # ---- token level (int32 tables: the native kernels and the tensor program share them)
        keys = tok.goto_keys if len(tok.goto_keys) else np.asarray([np.iinfo(np.int64).max])
        self._goto_keys = t(keys)
        self._goto_next = i32(tok.goto_next if len(tok.goto_next) else [0])
        self._chain_next = i32(tok.chain_next)
        self._chain_depth = int(tok.chain_depth)
        self._ban_first = i32(tok.ban_first)
        nb = len(tok.ban_next)
        self._ban_next = i32(tok.ban_next if nb else [-1])
        self._ban_off = i32(tok.ban_off if nb else [0])
        self._ban_cnt = i32(tok.ban_cnt if nb else [0])
        self._heavy_id = i32(tok.heavy_id if nb else [-1])
        self._ban_word = i32(np.concatenate([tok.ban_word, [W]]))          # one spare pair: window padding
        self._ban_mask = t(np.concatenate([tok.ban_mask, [-1]]).astype(np.int32), torch.int32)
        self._ban_width = int(tok.ban_width)
        self._ban_arange = torch.arange(self._ban_width, device=dev)      # the window offsets of banned_bitmask
        self._ban_depth = int(tok.ban_depth)
        self._heavy_rows = t(tok.heavy_rows, torch.int32)
        self._has_heavy = tok.heavy_rows.shape[0] > 1
        self._base = t(np.concatenate([tok.base, [-1]]).astype(np.int32), torch.int32)   # + the spare word
        self.num_token_states = tok.num_states
        self.max_sequence_tokens = tok.max_sequence
        # ---- text level
        self._has_text = char is not None
        self.max_token_chars = 0
        if char is not None:
            C = char.alphabet.num_classes
            if char.delta.size >= 2 ** 31:
                raise ValueError(f"phrases: the character automaton has {char.delta.shape[0]} states x {C} classes, "
                                 f"more than the 2^31 table entries supported")
            self._classes = C
            self._delta = i32(char.delta.reshape(-1))
            self._out_word = i32(char.out_word)
            self._out_now = i32(char.out_now)
            self._out_spelled = i32(char.out_spelled)
            self._triple_end = t(char.triple_end > 0, torch.bool)
            act = action_tables(char.alphabet.is_word, word_boundaries, char.alphabet.plain_repeat)
            self._act_ctx = t(act["ctx"].reshape(-1))
            self._act_sym = t(np.maximum(act["sym"], 0).reshape(-1))
            self._act_emit = t(act["sym"].reshape(-1) >= 0, torch.bool)
            self._act_bnd = t((act["flags"].reshape(-1) & 1) > 0, torch.bool)
            self._act_conf = t((act["flags"].reshape(-1) & FLAG_CONFIRM) > 0, torch.bool)
            self._act_word = t((act["flags"].reshape(-1) & FLAG_WORD) > 0, torch.bool)
            self._act_sep = t((act["flags"].reshape(-1) & FLAG_SEPARATOR) > 0, torch.bool)
            self._delta_bnd = i32(char.delta[:, BND])
            self._slots = i32(slots["slots"])
            self.max_token_chars = int(slots["slots"].shape[1])
            for name in ("head_n", "head_bits", "tail_n", "tail_bits", "tail_need", "body"):
                setattr(self, "_" + name, i32(slots[name]))
            self._cp0 = i32(np.where(cp_classes[:, 0] < 0, C, cp_classes[:, 0]))
            self._cp1 = i32(np.where(cp_classes[:, 1] < 0, C, cp_classes[:, 1]))
            self.num_char_states = char.num_states
            self.alphabet = char.alphabet
            self.text_excluded = list(char.excluded)
            text_tables = [self._delta, self._out_word, self._out_now, self._act_ctx, self._act_sym, self._act_emit,
                           self._act_bnd, self._act_conf, self._delta_bnd, self._slots, self._head_n, self._head_bits,
                           self._tail_n, self._tail_bits, self._tail_need, self._body, self._cp0, self._cp1,
                           self._out_spelled, self._triple_end, self._act_word, self._act_sep]
            # the native kernels' action table: new context, symbol (-1: none), flags (bit 0 BND, bit 2 word
            # end, bit 3 word character, bit 4 separator)
            native_act = [i32(act["ctx"].reshape(-1)), i32(act["sym"].reshape(-1)),
                          i32(act["flags"].reshape(-1) & (FLAG_BND | FLAG_CONFIRM | FLAG_WORD | FLAG_SEPARATOR))]
            text_native = [self._delta.view(-1, C), self._out_word, self._out_now, *native_act, self._slots,
                           self._head_n, self._head_bits, self._tail_n, self._tail_bits, self._tail_need, self._body,
                           self._cp0, self._cp1, self._out_spelled, i32(char.triple_end)]
        else:
            self._classes = 1
            self.text_excluded = []
            self.num_char_states = 1
            self.alphabet = None
            text_tables = []
            one = i32([0])
            text_native = [i32([[0] * NUM_SPECIAL]), i32([-1]), i32([-1])] + [one] * 3 + [i32([[NUM_SPECIAL]])] + \
                [one] * 8 + [i32([-1]), i32([0])]
        self.device = self._goto_keys.device
        # regular regex entities: one search DFA in three more state columns (fastsafe.safety.regex_automaton)
        self._rx = RegexTables(regex[0], regex[1], dev) if regex is not None else None
        self.state_width = STATE_WIDTH + (REGEX_COLUMNS if self._rx is not None else 0)
        # which entity each token ban completes (token_ban events; see fastsafe.safety.ban_owners)
        keys, owner, sev = ban_owners if ban_owners is not None else ([np.iinfo(np.int64).max], [-1], [0])
        self._owner_keys, self._owner_ids, self._owner_sev = t(keys), t(owner, torch.int32), t(sev, torch.int32)
        tok_tables = [self._goto_keys, self._goto_next, self._chain_next, self._ban_first, self._ban_next, self._ban_off,
                      self._ban_cnt, self._heavy_id, self._ban_word, self._ban_mask, self._heavy_rows, self._base,
                      self._ban_arange]
        def distinct_bytes(tensors) -> int:       # a view (text_native holds several) is counted once
            return sum({x.untyped_storage().data_ptr(): x.untyped_storage().nbytes() for x in tensors}.values())
        self._tok_bytes = distinct_bytes(tok_tables + [self._owner_keys, self._owner_ids, self._owner_sev])
        self._char_bytes = distinct_bytes(text_tables + text_native)
        # ---- the native kernels' view (fastsafe.safety.device_matcher_ops: NATIVE_TABLES, NATIVE_META)
        self._native_tables = tok_tables[:11] + [self._base[:W]] + text_native
        self._native_meta = [self.vocab_size, self._chain_depth, self._ban_depth, int(self._has_text),
                             self._classes if self._has_text else NUM_SPECIAL, int(self.word_boundaries)]
        self._backend = backend_for(self._goto_keys, op="device_matcher")

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, tokenizer, phrases: Iterable = (), *, vocab_size: int | None = None, device="cpu",
              token_id_phrases: Iterable = (), regexes: Iterable = (), entities: Iterable[RiskEntity] | None = None,
              eos_token_id=None, word_boundaries: bool = True, spaced: bool = True, version=None,
              regex_window: int = 200, skip_invalid: bool = False, warn: bool = True,
              device_regex: bool = True, canonical_alphabet: bool | None = None) -> "DeviceMatcher":
        """Build the tables and put them on ``device``.

        Args:
            tokenizer: a Hugging Face tokenizer (``None`` only with token-id phrases alone).
            phrases: strings or :class:`RiskEntity` (token variants banned, text matched after folding).
            vocab_size: ``V``; defaults to ``len(tokenizer)``. Use the logits width when the
                embedding is padded (ids past the tokenizer have no text).
            device: device of the tables (and of every state and id passed in later).
            token_id_phrases: id lists banned verbatim (``NoBadWordsLogitsProcessor`` semantics).
            regexes: patterns (RE2 syntax); the regular ones are checked on the device by
                :meth:`check_candidates` (``device_regex``), the rest on the host by :meth:`host_regex_check`.
            entities: :class:`RiskEntity` rows (e.g. ``store.entities()``); inactive ones are skipped.
            eos_token_id: single-token sequences equal to these are never banned (default: the tokenizer's).
            word_boundaries: text matches must be whole words.
            spaced: also match single-word entities of 3-24 characters spelled with separators between the letters.
            version: stored on the matcher.
            regex_window: characters of recent text a regex sees (host path).
            skip_invalid: fail closed *per entity* for the ``entities`` rows (as
                :meth:`PhraseMatcher.build`): one that cannot be compiled is left out and listed in
                :attr:`skipped` (``phrases`` / ``token_id_phrases`` / ``regexes`` still raise).
            warn: warn about the skipped entities (a ``RuntimeWarning``).
            device_regex: check the regular regexes on the device (one search DFA, three more state
                columns: :attr:`state_width` 9); False (or patterns that are not regular there) keeps
                them on the host RE2 path.
            canonical_alphabet: give the text check the canonical alphabet (the folded ASCII letters and
                digits plus the phrases' own characters) so that its per-vocabulary tables come from
                the cache (:mod:`fastsafe.safety.text_tables`) for most phrase sets; same decisions.
                Default (None): for at most ``CANONICAL_MAX_PHRASES`` (10,000) phrases.

        Raises:
            ValueError: an entity empty after normalisation or that tokenises to nothing, token ids
                outside ``[0, V)``, a bad ``vocab_size``, a tokenizer whose tokens cannot be decoded.

        Example:
            >>> dm = DeviceMatcher.build(None, token_id_phrases=[[5, 7], [3]], vocab_size=10)
            >>> s = dm.advance(dm.initial_state(1), torch.tensor([5]))
            >>> from fastsafe.ops import unpack_bitmask
            >>> (~unpack_bitmask(dm.banned_bitmask(s), 10)).nonzero()[:, 1].tolist()
            [3, 7]
        """
        vocab_size = matcher_vocab_size(tokenizer, vocab_size)
        if vocab_size > (1 << 20):
            raise ValueError(f"vocab_size: at most {1 << 20} supported, got {vocab_size}")
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device: expected a torch device, got {device!r}") from exc
        ents = config_entities(phrases, token_id_phrases, regexes)
        n_config = len(ents)                 # ents[:n_config] raise on errors; the rest may be skipped
        ents += active_entities(entities)
        skipped: dict[int, str] = {}         # entity index -> reason (the shared rule of PhraseMatcher.build)

        def fail(i: int, reason: str) -> None:
            if i < n_config or not skip_invalid:
                raise ValueError(f"entity {ents[i].phrase!r}: {reason}")
            skipped.setdefault(i, reason)
        for i, e in enumerate(ents):
            if e.kind not in ("phrase", "token_ids", "regex"):
                fail(i, f"unknown kind {e.kind!r}")
        flat, lens, owners = banned_sequences(tokenizer, ents, vocab_size, eos_id_set(tokenizer, eos_token_id),
                                              fail=fail)
        tok = build_token_automaton(flat, lens, vocab_size)
        ban_owners = ban_owner_table(tok, flat, lens, owners, [e.severity for e in ents])
        owner: dict[str, int] = {}
        for i, e in enumerate(ents):
            if e.kind == "phrase" and i not in skipped:
                old = owner.get(e.phrase)
                if old is None or ents[old].severity < e.severity:
                    owner[e.phrase] = i
        char = slots = cpc = None
        if owner:
            char = build_char_automaton(list(owner), list(owner.values()), [ents[i].severity for i in owner.values()],
                                        word_boundaries=word_boundaries, spaced=spaced,
                                        on_empty=(lambda i: fail(i, "empty after folding (nothing to match)"))
                                        if skip_invalid else None,
                                        canonical=len(owner) <= CANONICAL_MAX_PHRASES
                                        if canonical_alphabet is None else bool(canonical_alphabet))
            slots, cpc = text_tables(tokenizer, vocab_size, char.alphabet)     # cached per (tokenizer, alphabet)
        regex_matcher = None
        rx = [i for i, e in enumerate(ents) if e.kind == "regex"]
        from .matcher import PhraseMatcher, SkippedEntity, warn_skipped   # the host reference holds the regex check
        from .regex import compile_regex
        regex = None
        if rx:
            valid = []
            for i in rx:
                try:
                    compile_regex(ents[i].phrase)          # RE2 decides what a regex entity may be
                except (ValueError, TypeError) as exc:
                    fail(i, str(exc).removeprefix("phrase: "))
                    continue
                valid.append(i)
            dfa = device_regexes([ents[i].phrase for i in valid], valid) if device_regex and tokenizer is not None \
                else None
            host_rx = valid if dfa is None else [v for v, _ in dfa.host]
            if host_rx:
                regex_matcher = PhraseMatcher.build(tokenizer, entities=[ents[i] for i in host_rx],
                                                    vocab_size=vocab_size, regex_window=regex_window, warn=False)
            if dfa is not None and dfa.values:
                regex = (dfa, regex_token_tables(tokenizer, vocab_size, dfa))
        m = cls(entities=ents, vocab_size=vocab_size, device=device, tok=tok, char=char, slots=slots,
                cp_classes=cpc, word_boundaries=word_boundaries, version=version, regex_matcher=regex_matcher,
                ban_owners=ban_owners, regex=regex)
        m.skipped = [SkippedEntity(ents[i], why) for i, why in sorted(skipped.items())]
        if m.skipped and warn:
            warn_skipped(m.skipped)
        return m

    @classmethod
    def from_token_sequences(cls, entities, flat, lens, owners, *, vocab_size: int, device="cpu",
                             version=None) -> "DeviceMatcher":
        """A token-level matcher (no text check) of precomputed banned sequences.

        Args:
            entities: the :class:`RiskEntity` rows ``owners`` index (events name them).
            flat, lens: CSR banned token sequences (int64, ids in ``[0, vocab_size)``), e.g. from
                :func:`~fastsafe.safety.token_sequences.banned_sequences`.
            owners: ``[len(lens)]`` entity index of each sequence.
            vocab_size, device, version: as for :meth:`build`.

        Example:
            >>> dm = DeviceMatcher.from_token_sequences([RiskEntity(0, "x")], np.array([5, 7, 3]), np.array([2, 1]),
            ...                                         np.array([0, 0]), vocab_size=10)
            >>> dm.has_text_rules
            False
        """
        flat = np.asarray(flat, np.int64)
        lens = np.asarray(lens, np.int64)
        owners = np.asarray(owners, np.int64)
        if len(flat) and (flat.min() < 0 or flat.max() >= int(vocab_size)):
            raise ValueError(f"flat: expected token ids in [0, {int(vocab_size)}), got {int(flat.min())}..{int(flat.max())}")
        if int(lens.sum()) != len(flat) or len(owners) != len(lens):
            raise ValueError(f"lens / owners: expected {len(lens)} sequences covering {len(flat)} ids, got "
                             f"sum(lens)={int(lens.sum())}, {len(owners)} owners")
        ents = list(entities)
        tok = build_token_automaton(flat, lens, int(vocab_size))
        ban_owners = ban_owner_table(tok, flat, lens, owners, [e.severity for e in ents])
        m = cls(entities=ents, vocab_size=int(vocab_size), device=device, tok=tok, char=None, slots=None,
                cp_classes=None, word_boundaries=True, version=version, regex_matcher=None, ban_owners=ban_owners,
                regex=None)
        m.skipped = []
        return m

    @classmethod
    def from_store(cls, store, tokenizer, **kwargs) -> "DeviceMatcher":
        """Build from a consistent snapshot of a :class:`~fastsafe.safety.RiskEntityStore` (its version is kept).

        ``kwargs`` are those of :meth:`build` (``vocab_size``, ``device``, extra ``phrases`` ...).
        """
        version, ents = store.snapshot()
        extra = kwargs.pop("entities", None) or []
        return cls.build(tokenizer, entities=list(extra) + list(ents), version=version, **kwargs)

    # ------------------------------------------------------------------ info
    def __len__(self) -> int:
        return len(self.entities)

    def __repr__(self) -> str:
        return (f"DeviceMatcher({len(self.entities)} entities, {self.num_token_states} token states, "
                f"{self.num_char_states} char states, V={self.vocab_size}, device={self.device})")

    @property
    def nbytes(self) -> dict:
        """Memory of the device tables in bytes: ``{"token": ..., "text": ..., "total": ...}``; ``token``
        includes the ban-owner table (:mod:`~fastsafe.safety.ban_owners`), ``text`` the character and
        regex tables (and the placeholders the native kernels take when there are none)."""
        text = int(self._char_bytes) + (self._rx.nbytes if self._rx is not None else 0)
        return {"token": int(self._tok_bytes), "text": text, "total": int(self._tok_bytes) + text}

    @property
    def has_text_rules(self) -> bool:
        """True when candidates get a text-level check (phrase entities or regexes)."""
        return self.has_device_text or self.has_regexes

    @property
    def has_device_text(self) -> bool:
        """True when :meth:`check_candidates` checks something (phrase entities or regular regexes)."""
        return self.alphabet is not None or self._rx is not None

    @property
    def has_regexes(self) -> bool:
        """True when some regex entities are checked on the host (:meth:`host_regex_check`): those
        that are not regular for the device DFA (see :mod:`~fastsafe.safety.regex_automaton`)."""
        return self._regex_matcher is not None

    @property
    def backend(self) -> str:
        """What runs the step: ``"cpp"`` / ``"cuda"`` (native kernels) or ``"torch"`` (the tensor program).

        Chosen at build by :func:`fastsafe.ops.backend_for` (op ``device_matcher``; override with
        ``FASTSAFE_BACKEND=device_matcher:torch``), fixed for the matcher's life (a compiled step
        stays one graph).
        """
        return self._backend

    def with_backend(self, backend: str) -> "DeviceMatcher":
        """The same matcher (tables shared, not copied) with the step run by ``backend``.

        Args:
            backend: ``"torch"``, ``"cpp"`` (CPU) or ``"cuda"``; must be available on :attr:`device`.

        Example:
            >>> dm = DeviceMatcher.build(None, token_id_phrases=[[5, 7]], vocab_size=10)
            >>> dm.with_backend("torch").backend
            'torch'
        """
        other = copy.copy(self)
        other._backend = backend_for(self._goto_keys, backend, op="device_matcher")
        return other

    def banned_entity(self, state: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """``[B]`` int32 id of the entity whose token sequence ``token_ids`` would complete after each
        row (:meth:`entity`), -1 where the token is not banned by the token automaton.

        Args:
            state: ``[B, state_width]`` int64 on :attr:`device`.
            token_ids: ``[B]`` int64 (or int32) on :attr:`device`.

        A tensor program (no host read), for ``token_ban`` events recorded on the device.

        Example:
            >>> dm = DeviceMatcher.build(None, token_id_phrases=[[5, 7], [3]], vocab_size=10)
            >>> dm.banned_entity(dm.state_from_histories([[5], [5]]), torch.tensor([7, 4])).tolist()
            [0, -1]
        """
        self._check_state(state)
        self._check_ids("token_ids", token_ids, 1, state.shape[0])
        return banned_entity(self._owner_keys, self._owner_ids, self._owner_sev, self._chain_next, self._chain_depth,
                             self.vocab_size, state[:, _TOK], token_ids)

    def entity(self, i: int) -> RiskEntity:
        """The entity of an id returned by :meth:`check_candidates` (host side, for events)."""
        if isinstance(i, torch.Tensor):
            i = int(i)
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= int(i) < len(self.entities):
            raise IndexError(f"i: expected an entity id in [0, {len(self.entities)}), got {i!r}")
        return self.entities[int(i)]

    # ------------------------------------------------------------------ validation (static facts only)
    def _check_state(self, state) -> None:
        if not isinstance(state, torch.Tensor):
            raise TypeError(f"state: expected a torch.Tensor from initial_state/advance, got {type(state).__name__}")
        if state.dim() != 2 or state.shape[1] != self.state_width or state.dtype != torch.int64:
            raise ValueError(f"state: expected an int64 tensor [B, {self.state_width}], got {state.dtype} "
                             f"{list(state.shape)}")
        if state.device != self.device:
            raise ValueError(f"state: expected a tensor on {self.device} (the matcher's device), got {state.device}")

    def _check_ids(self, name: str, ids, dim: int, batch: int) -> None:
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(ids).__name__}")
        if ids.dim() != dim or ids.dtype not in (torch.int64, torch.int32):
            shape = "[B]" if dim == 1 else "[B, k]"
            raise ValueError(f"{name}: expected an int64 tensor {shape}, got {ids.dtype} {list(ids.shape)}")
        if ids.device != self.device:
            raise ValueError(f"{name}: expected a tensor on {self.device} (the matcher's device), got {ids.device}")
        if ids.shape[0] != batch:
            raise ValueError(f"{name}: expected {batch} rows (the state's batch size), got {ids.shape[0]}")

    # ------------------------------------------------------------------ state
    def initial_state(self, batch_size: int) -> torch.Tensor:
        """``[batch_size, state_width]`` int64 state of empty histories, on :attr:`device`."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
            raise ValueError(f"batch_size: expected a non-negative int, got {batch_size!r}")
        s = torch.zeros(batch_size, self.state_width, dtype=torch.int64, device=self.device)
        s[:, _CTX] = OTHER_NONWORD * 4       # start of text: as after a non-word character
        s[:, _SHADOW] = -1
        s[:, _PEND] = -1
        return s

    def state_from_histories(self, histories) -> torch.Tensor:
        """The state after each row's tokens (prompt time, or after a hot swap to a new matcher).

        Args:
            histories: ``[B, T]`` integer tensor or a list of ``B`` token-id lists (ragged is fine).

        Returns:
            ``[B, state_width]`` int64 on :attr:`device`, equal to advancing :meth:`initial_state` token by token.
            Costs ``T`` masked steps (host-driven; not part of the per-step graph).
        """
        if isinstance(histories, torch.Tensor):
            if histories.dim() != 2 or histories.dtype.is_floating_point or histories.dtype == torch.bool:
                raise ValueError(f"histories: expected an integer tensor [B, T], got {histories.dtype} "
                                 f"{list(histories.shape)}")
            rows = histories.to(self.device, torch.int64)
            lengths = torch.full((rows.shape[0],), rows.shape[1], dtype=torch.int64, device=self.device)
        else:
            if isinstance(histories, (str, bytes)) or not hasattr(histories, "__len__"):
                raise TypeError(f"histories: expected a [B, T] tensor or a list of token-id lists, "
                                f"got {type(histories).__name__}")
            lists = []
            for r in histories:
                r = r.tolist() if isinstance(r, torch.Tensor) else list(r)
                if any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) for x in r):
                    raise ValueError("histories: expected lists of ints")
                lists.append([int(x) for x in r])
            T = max((len(r) for r in lists), default=0)
            pad = [[0] * (T - len(r)) + r for r in lists]        # right-aligned; the padding is masked
            rows = torch.tensor(pad, dtype=torch.int64, device=self.device).reshape(len(lists), T)
            lengths = torch.tensor([len(r) for r in lists], dtype=torch.int64, device=self.device)
        B, T = rows.shape
        state = self.initial_state(B)
        for j in range(T):
            active = lengths >= T - j
            state = torch.where(active[:, None], self._step(state, rows[:, j].contiguous()), state)
        return state

    # ------------------------------------------------------------------ token level
    def _token_step(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        V = self.vocab_size
        keys = self._goto_keys
        E = keys.shape[0]
        valid = (t >= 0) & (t < V)
        cur = s
        res = torch.zeros_like(s)
        done = ~valid
        for _ in range(self._chain_depth):
            key = cur * V + t
            idx = torch.searchsorted(keys, key).clamp(max=E - 1)
            hit = (keys[idx] == key) & ~done
            res = torch.where(hit, self._goto_next[idx], res)
            done = done | hit
            cur = self._chain_next[cur].long()
        return res

    def banned_bitmask(self, state: torch.Tensor, *, vocab_size: int | None = None) -> torch.Tensor:
        """Packed mask of the tokens allowed next.

        Args:
            state: ``[B, state_width]`` int64 from :meth:`initial_state` / :meth:`advance`.
            vocab_size: optional check that the logits width equals the matcher's ``V``.

        Returns:
            ``[B, ceil(V/32)]`` int32 on :attr:`device`; bit ``t`` is 0 when token ``t`` would
            complete a banned token sequence (single-token ones always), else 1.

        Example:
            >>> dm = DeviceMatcher.build(None, token_id_phrases=[[3], [1, 2]], vocab_size=8)
            >>> from fastsafe.ops import unpack_bitmask
            >>> s = dm.state_from_histories([[0, 1], [2]])
            >>> unpack_bitmask(dm.banned_bitmask(s), 8).int().tolist()
            [[1, 1, 0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 1, 1, 1, 1]]
        """
        self._check_state(state)
        if vocab_size is not None and vocab_size != self.vocab_size:
            raise ValueError(f"vocab_size: the matcher was built for V={self.vocab_size}, got {vocab_size}")
        if self._backend != "torch":
            return banned_bitmask_op(state.contiguous(), self._native_tables, self._native_meta)
        return self._banned_bitmask(state)

    def _banned_bitmask(self, state: torch.Tensor) -> torch.Tensor:
        """The tensor program of :meth:`banned_bitmask` (the reference of the native kernels)."""
        B = state.shape[0]
        W = self._words
        out = self._base.unsqueeze(0).expand(B, W + 1).clone()
        b = self._ban_first[state[:, _TOK]]
        ar = self._ban_arange
        P = self._ban_word.shape[0] - 1
        for _ in range(self._ban_depth):
            valid = b >= 0
            bb = b.clamp(min=0)
            cnt = torch.where(valid, self._ban_cnt[bb], 0)
            idx = (self._ban_off[bb].unsqueeze(1) + ar).clamp(max=P)
            use = ar < cnt.unsqueeze(1)
            w = torch.where(use, self._ban_word[idx].long(), W)
            m = torch.where(use, self._ban_mask[idx], -1)
            out.scatter_(1, w, out.gather(1, w) & m)
            if self._has_heavy:
                hv = torch.where(valid, self._heavy_id[bb], 0).clamp(min=0)
                out[:, :W] &= self._heavy_rows[hv]
            b = torch.where(valid, self._ban_next[bb], -1)
        return out[:, :W]

    # ------------------------------------------------------------------ text level
    def _char_step(self, s, ctx, shadow, pend, c, hit, fresh, track: bool):
        """One folded character (class ``c``; ``C`` = none) through the character DFA.

        Repeats (``SQ2``/``SQ3``/``SQ4``): a dead ``SQ2`` goes to the root and remembers the state
        before it (``shadow``); a dead ``SQ3`` or ``SQ4`` returns to the shadow (a run of 3+ read as
        one letter) or, after a live ``SQ2``, stays (a stretched double); a dead ``SQ4`` right after
        a live ``SQ3`` (a tripled letter matched exactly) returns to the shadow too; after a run of
        3+, a character that is dead from the double's state is read from the shadow instead.

        Spelled-out matches (``pend``, see ``STATE_WIDTH``): the state's spelled entity becomes
        pending at the separator after its last letter; it matches at a non-word, non-separator
        character there, or at a word character after the single letter that follows the run, and
        is dropped at any other character after that letter. ``fresh``: some character of this
        token changed the state (an occurrence whose last letter is older is not new).
        """
        C = self._classes
        i = ctx * (C + 1) + c
        emit = self._act_emit[i]
        sym = self._act_sym[i]
        conf = self._act_conf[i]
        word = self._act_word[i]
        sep = self._act_sep[i]
        other = conf & ~sep                      # a non-word character that is not a separator
        # ---- spelled-out runs (before the character moves the DFA)
        has = pend >= 0
        lvl2 = has & ((pend & 1) == 1)
        lvl1 = has & ~lvl2
        pent = pend >> 2
        osp = self._out_spelled[s]
        if track:
            ow = self._out_word[s]
            hit = torch.where(conf & fresh & (ow >= 0), ow, hit)
            new = (pend & 2) == 2
            hit = torch.where(new & ((lvl1 & other) | (lvl2 & word)), pent, hit)
            hit = torch.where(other & fresh & (osp >= 0), osp, hit)
        present = conf | word | sep
        pend2 = torch.where(lvl1 & sep, pend, torch.where(lvl1 & word, pend | 1, torch.where(has & present, -1, pend)))
        pend2 = torch.where(sep & (osp >= 0), osp * 4 + fresh.long() * 2, pend2)
        # ---- the DFA
        s1 = torch.where(self._act_bnd[i], self._delta_bnd[s], s) if self.word_boundaries else s
        raw = self._delta[torch.where(emit, s1 * C + sym, sym)]      # no emission: read row 0 (cached)
        dead = raw == 0
        sq2 = sym == SQ2
        rep = (sym == SQ3) | (sym == SQ4)
        has_shadow = shadow >= 0
        from_shadow = self._delta[shadow.clamp(min=0) * C + sym]
        run3 = (ctx & 3) >= 2
        broken = (sym == SQ4) & self._triple_end[s]
        s_rep = torch.where(dead, torch.where(has_shadow & ((s == 0) | broken), shadow,
                                              torch.where(broken, 0, s)), raw)
        s_other = torch.where(dead & run3 & has_shadow, from_shadow, raw)
        s2 = torch.where(emit, torch.where(rep, s_rep, torch.where(sq2, raw, s_other)), s)
        shadow2 = torch.where(emit, torch.where(sq2, s, torch.where(rep, shadow, -1)), shadow)
        changed = emit & ~(dead & (sq2 | rep))       # a repeat no pattern uses is not a new character
        if track:
            nw = self._out_now[s2]
            hit = torch.where(changed & (nw >= 0), nw, hit)
        fresh = fresh | changed
        return s2, self._act_ctx[i], shadow2, pend2, hit, fresh

    def _text_run(self, st: list, ids: torch.Tensor, track: bool):
        """Feed tokens ``ids`` (any shape, broadcast with the state columns ``st``) through the DFA."""
        s, ctx, cp, need, shadow, pend = st
        C = self._classes
        hit = torch.full_like(s, -1) if track else None
        fresh = torch.zeros_like(s, dtype=torch.bool)
        V = self.vocab_size
        row = torch.where((ids >= 0) & (ids < V), ids, V)
        # a character split across tokens: this token's continuation bytes finish the pending one
        hn = self._head_n[row]
        hb = self._head_bits[row]
        done = (need > 0) & (hn >= need)
        full = (cp << (6 * need)) | (hb >> (6 * (hn - need).clamp(min=0)))
        big = full >= CP_LIMIT
        cpi = full.clamp(0, CP_LIMIT - 1)
        c0 = torch.where(done, torch.where(big, OTHER_NONWORD, self._cp0[cpi]), C)
        c1 = torch.where(done & ~big, self._cp1[cpi], C)
        partial = (need > hn) & (hn > 0)           # still unfinished after this token's head
        cp = torch.where(partial, (cp << (6 * hn)) | hb, cp)
        need = torch.where(partial, need - hn, need)
        s, ctx, shadow, pend, hit, fresh = self._char_step(s, ctx, shadow, pend, c0, hit, fresh, track)
        s, ctx, shadow, pend, hit, fresh = self._char_step(s, ctx, shadow, pend, c1, hit, fresh, track)
        rows = self._slots[row]
        for j in range(self.max_token_chars):
            s, ctx, shadow, pend, hit, fresh = self._char_step(s, ctx, shadow, pend, rows[..., j], hit, fresh, track)
        # an unfinished character at the token's end becomes the pending one
        body = self._body[row] > 0
        tn = self._tail_n[row]
        cp = torch.where(tn > 0, self._tail_bits[row], torch.where(body | done, 0, cp))
        need = torch.where(tn > 0, self._tail_need[row], torch.where(body | done, 0, need))
        lvl1 = (pend >= 0) & ((pend & 1) == 0)
        if track:                                  # the text may end after the candidate
            ow = self._out_word[s]
            hit = torch.where(fresh & (ow >= 0), ow, hit)
            osp = self._out_spelled[s]
            hit = torch.where(fresh & (osp >= 0), osp, hit)
            hit = torch.where(lvl1 & ((pend & 2) == 2), pend >> 2, hit)
        # a match waiting after its separator run was reported at this token's end: old from now on
        pend = torch.where(lvl1, pend & ~2, pend)
        return [s, ctx, cp, need, shadow, pend], hit

    # ------------------------------------------------------------------ the step
    def _advance(self, state: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        t = token_ids.to(torch.int64)
        cols = [self._token_step(state[:, _TOK], t)]
        if self._has_text:
            st = [state[:, i] for i in _TEXT_COLUMNS]
            st, _ = self._text_run(st, t, track=False)
            cols += st
        else:
            cols += [state[:, i] for i in _TEXT_COLUMNS]
        return torch.stack([c.long() for c in cols], dim=1)

    def advance(self, state: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """The state after each row appends one token.

        Args:
            state: ``[B, state_width]`` int64 on :attr:`device`.
            token_ids: ``[B]`` int64 (or int32) on :attr:`device`; ids outside ``[0, V)`` reset the
                token state and add no text.

        Returns:
            The new ``[B, state_width]`` state (the input is not modified).
        """
        self._check_state(state)
        self._check_ids("token_ids", token_ids, 1, state.shape[0])
        return self._step(state, token_ids)

    def _step(self, state: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """:meth:`advance` after validation, on the matcher's backend."""
        if self._rx is not None and state.shape[1] > STATE_WIDTH:    # + the regex columns (a torch program)
            base = self._step(state[:, :STATE_WIDTH].contiguous(), token_ids)
            cols, _ = regex_step(self._rx, state[:, STATE_WIDTH:], token_ids.to(torch.int64), self.vocab_size)
            return torch.cat([base, cols], dim=1)
        if self._backend != "torch":
            return advance_op(state.contiguous(), token_ids.to(torch.int64).contiguous(), self._native_tables,
                              self._native_meta)
        return self._advance(state, token_ids)

    def check_candidates(self, state: torch.Tensor, cand_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text-level check of ``k`` candidate next tokens per row.

        Args:
            state: ``[B, state_width]`` int64 on :attr:`device`.
            cand_ids: ``[B, k]`` int64 (or int32) on :attr:`device`; ids outside ``[0, V)`` (e.g. -1
                padding) are not allowed and have entity -1.

        Returns:
            ``(ok, entity)``: ``ok`` ``[B, k]`` bool (False = the candidate would complete a new
            occurrence of a folded entity, or is out of range); ``entity`` ``[B, k]`` int32 id of the
            entity matched (:meth:`entity`), -1 for none.
        """
        self._check_state(state)
        self._check_ids("cand_ids", cand_ids, 2, state.shape[0])
        base = state[:, :STATE_WIDTH].contiguous() if self._rx is not None else state
        if self._backend != "torch":
            ok, hit = check_candidates_op(base.contiguous(), cand_ids.to(torch.int64).contiguous(),
                                          self._native_tables, self._native_meta)
        else:
            ok, hit = self._check_candidates(base, cand_ids)
        if self._rx is not None:             # regular regexes: the DFA over each candidate's characters
            c = cand_ids.to(torch.int64)
            cols = state[:, STATE_WIDTH:].unsqueeze(1).expand(-1, c.shape[1], -1)
            _, rhit = regex_step(self._rx, cols, c, self.vocab_size)
            hit = torch.where(hit >= 0, hit, rhit.to(hit.dtype))
            ok = ok & (rhit < 0)
        return ok, hit

    def _check_candidates(self, state: torch.Tensor, cand_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tensor program of :meth:`check_candidates` (the reference of the native kernels)."""
        c = cand_ids.to(torch.int64)
        valid = (c >= 0) & (c < self.vocab_size)
        if not self._has_text:
            return valid, torch.full(c.shape, -1, dtype=torch.int32, device=c.device)
        k = c.shape[1]
        st = [state[:, i].unsqueeze(1).expand(-1, k) for i in _TEXT_COLUMNS]
        _, hit = self._text_run(st, c, track=True)
        return valid & (hit < 0), hit.to(torch.int32)

    # ------------------------------------------------------------------ host path
    def host_regex_check(self, histories, cand_ids):
        """Regex entities on the host (the one part that is not a tensor program).

        Runs :meth:`PhraseMatcher.check_candidates` of the regex entities (lightly normalised text,
        ``regex_window`` characters). Returns ``(allowed [B, k] bool on cand_ids' device, events)``;
        all True and no events when there are no regex entities.
        """
        if self._regex_matcher is None:
            k = cand_ids.shape[1] if isinstance(cand_ids, torch.Tensor) else len(cand_ids[0]) if len(cand_ids) else 0
            B = cand_ids.shape[0] if isinstance(cand_ids, torch.Tensor) else len(cand_ids)
            dev = cand_ids.device if isinstance(cand_ids, torch.Tensor) else torch.device("cpu")
            return torch.ones(B, k, dtype=torch.bool, device=dev), []
        return self._regex_matcher.check_candidates(histories, cand_ids)
