"""The banned token sequences of a set of entities (what the token-level automaton is built from).

Same rule as :class:`~fastsafe.safety.PhraseMatcher` (and so as transformers'
``NoBadWordsLogitsProcessor``): a phrase entity is tokenised in every variant of
:func:`~fastsafe.safety.phrase_variants`, each with and without a leading space; variants with a
token id ``>= vocab_size`` or the unk id are dropped; token-id entities are banned verbatim;
single-token sequences equal to an EOS id are never banned.

:func:`encode_variants` encodes many short texts. When the tokenizer splits at spaces before its
model runs (checked on probes and on a sample of the texts), a text of single-space-separated
words is assembled from the encodings of its distinct word units (``"w0"`` / ``" w0"``, then
``" w1"`` ...), which sends ~10x fewer strings through the tokenizer for 100k phrases.
"""
from __future__ import annotations

import weakref
from typing import Sequence

import numpy as np

from .normalize import entity_forms
from .store import RiskEntity

__all__ = ["encode_plain", "encode_variants", "split_encoding_ok", "phrase_forms", "encode_phrases",
           "entity_token_ids", "drop_sequences", "unemittable", "eos_singles", "banned_sequences"]

_PROBES = ("make a bomb", "Make A Bomb", "THE QUICK BROWN fox", "über straße", "don't 2 girls, 1 cup!",
           "e-mail me @ 555-1234", "naïve café's ＦＵＬＬ width")


def encode_plain(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text without special tokens (batched through the Rust backend when there is one)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and getattr(backend, "truncation", None) is None \
            and getattr(backend, "padding", None) is None:
        enc = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
        return [list(e.ids) for e in enc(texts, add_special_tokens=False)]
    return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _simple(t: str) -> bool:
    """Words separated by single spaces (an optional single leading space), nothing else."""
    s = t[1:] if t.startswith(" ") else t
    return bool(s) and s == " ".join(s.split()) and s.isprintable()


def _units(t: str) -> list[str]:
    lead = t.startswith(" ")
    words = (t[1:] if lead else t).split(" ")
    return [(" " if lead else "") + words[0]] + [" " + w for w in words[1:]]


def split_encoding_ok(tokenizer, sample: list[str]) -> bool:
    """True if this tokenizer encodes space-separated words unit by unit (``"w0"``, ``" w1"``, ...),
    checked on fixed probes and ``sample``, with and without a leading space."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None) if backend is not None else None
    if pre is None:
        return False
    texts = [x for p in list(_PROBES) + sample for x in (p, " " + p) if _simple(x) and " " in x.strip()]
    units = sorted({u for t in texts for u in _units(t)})
    enc = dict(zip(units, encode_plain(tokenizer, units)))
    return all(f == [i for u in _units(t) for i in enc[u]] for t, f in zip(texts, encode_plain(tokenizer, texts)))


#: Encoded units kept per tokenizer (a repeated word, or the second build of one phrase set, is not re-encoded).
UNIT_MEMO_SIZE = 200_000
_unit_memo: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _encode_units(tokenizer, units: list[str]) -> list[list[int]]:
    """:func:`encode_plain` of ``units`` through a bounded per-tokenizer memo (dropped when the
    tokenizer's size changes or the memo is full)."""
    try:
        size, memo = _unit_memo.get(tokenizer, (None, None))
    except TypeError:                        # not weak-referenceable: no memo
        return encode_plain(tokenizer, units)
    if memo is None or size != len(tokenizer) or len(memo) > UNIT_MEMO_SIZE:
        memo = {}
        _unit_memo[tokenizer] = (len(tokenizer), memo)
    missing = [u for u in units if u not in memo]
    if missing:
        memo.update(zip(missing, encode_plain(tokenizer, missing)))
    return [memo[u] for u in units]


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    total = int(lengths.sum())
    first = np.cumsum(lengths) - lengths
    return np.repeat(starts - first, lengths) + np.arange(total)


def encode_variants(tokenizer, variants: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the texts ``v, " " + v`` of every variant (no special tokens), as CSR
    ``(flat, lens)`` in that order (word units assembled when that is exact, see the module doc).

    Example:
        >>> flat, lens = encode_variants(tok, ["make a bomb"])     # doctest: +SKIP
        >>> lens.tolist()                                         # doctest: +SKIP
        [3, 3]
    """
    variants = list(variants)
    simple = [bool(v) and v == " ".join(v.split()) and v.isprintable() for v in variants]
    multi = [v for v, ok in zip(variants, simple) if ok and " " in v]
    split = len(multi) >= 32 and split_encoding_ok(tokenizer, multi[:: max(1, len(multi) // 96)][:96])
    unit_id: dict[str, int] = {}
    get = unit_id.get
    seq_units: list[int] = []
    counts: list[int] = []
    for v, ok in zip(variants, simple):
        if split and ok:
            words = v.split(" ")
            rest = []
            for w in words[1:]:
                w = " " + w
                j = get(w)
                if j is None:
                    j = unit_id[w] = len(unit_id)
                rest.append(j)
            for first in (words[0], " " + words[0]):
                j = get(first)
                if j is None:
                    j = unit_id[first] = len(unit_id)
                seq_units.append(j)
                seq_units.extend(rest)
                counts.append(len(words))
        else:
            for t in (v, " " + v):
                j = get(t)
                if j is None:
                    j = unit_id[t] = len(unit_id)
                seq_units.append(j)
                counts.append(1)
    enc = _encode_units(tokenizer, list(unit_id))
    u_lens = np.fromiter((len(e) for e in enc), np.int64, len(enc))
    u_flat = np.fromiter((x for e in enc for x in e), np.int64, int(u_lens.sum()))
    u_starts = np.cumsum(u_lens) - u_lens
    su = np.asarray(seq_units, np.int64)
    cnt = np.asarray(counts, np.int64)
    if len(su) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    flat = u_flat[_ranges(u_starts[su], u_lens[su])]
    lens = np.add.reduceat(u_lens[su], np.cumsum(cnt) - cnt)
    return flat, lens


def phrase_forms(entities: list[RiskEntity], fail, forms: dict | None = None) -> tuple[dict[str, int], dict]:
    """The normalised forms of the phrase entities and the entity that owns each distinct phrase.

    Args:
        entities: the rows (entities of other kinds are passed over).
        fail: ``fail(i, reason)`` for an entity that cannot be normalised or is empty after
            normalisation (it then owns nothing); it may raise.
        forms: ``phrase -> (normalised, deleet forms)`` computed before (a reuse cache), looked up
            before :func:`~fastsafe.safety.normalize.entity_forms` runs.

    Returns:
        ``(owner, forms)``: ``owner`` maps each phrase to the index of its entity of highest
        severity (the first of equals), for phrases that normalise to something, in first-seen
        order; ``forms`` maps every phrase of ``entities`` that could be normalised (empty ones
        too) to ``(normalised, deleet forms)``.

    Example:
        >>> owner, forms = phrase_forms(config_entities(["B0mb", "bomb"]), fail=print)  # doctest: +SKIP
        >>> owner, forms["B0mb"]                                                       # doctest: +SKIP
        ({'B0mb': 0, 'bomb': 1}, ('b0mb', ['bomb']))
    """
    forms_in = forms or {}
    out: dict[str, tuple] = {}
    owner: dict[str, int] = {}
    for i, e in enumerate(entities):
        if e.kind != "phrase":
            continue
        f = forms_in.get(e.phrase)
        if f is None:
            try:
                e.phrase.encode("utf-8")       # a lone surrogate: no tokenizer takes it
                f = entity_forms(e.phrase.strip())
            except Exception as exc:  # noqa: BLE001 - any text a store holds must not stop the build
                fail(i, f"cannot be normalised ({type(exc).__name__}: {exc})")
                continue
        out[e.phrase] = f
        if not f[0]:
            fail(i, "empty after normalisation (nothing to match)")
            continue
        old = owner.get(e.phrase)
        if old is None or entities[old].severity < e.severity:
            owner[e.phrase] = i
    return owner, out


def encode_phrases(tokenizer, phrases: list[str], forms: dict, entities: list[RiskEntity],
                   fail) -> tuple[np.ndarray, np.ndarray, np.ndarray, set[str]]:
    """Token ids of every variant text of each phrase (:func:`~fastsafe.safety.phrase_variants`,
    with and without a leading space) and the phrases none of whose texts has a token.

    Args:
        phrases: distinct phrases; ``forms[p]`` is ``(normalised, deleet forms)`` (:func:`phrase_forms`).
        entities, fail: ``fail(i, "tokenises to nothing with this tokenizer")`` is called for every
            phrase entity of an empty phrase (it may raise).

    Returns:
        ``(flat, lens, text_phrase, empty)``: CSR token ids of the texts (empty texts included,
        ``lens`` 0), the index into ``phrases`` of each text, and the set of empty phrases.
    """
    from . import phrase_variants    # public; the variant rule is shared with PhraseMatcher

    variants: list[str] = []
    n_texts = np.zeros(len(phrases), np.int64)
    for j, p in enumerate(phrases):
        vs = phrase_variants(p, forms[p][1])
        n_texts[j] = 2 * len(vs)
        variants.extend(vs)
    flat, lens = encode_variants(tokenizer, variants) if variants else (np.zeros(0, np.int64),) * 2
    text_phrase = np.repeat(np.arange(len(phrases)), n_texts)
    got = np.bincount(text_phrase[lens > 0], minlength=len(phrases)) > 0
    empty: set[str] = set()
    if len(phrases) and not got.all():
        empty = {phrases[j] for j in np.nonzero(~got)[0].tolist()}
        for i, e in enumerate(entities):
            if e.kind == "phrase" and e.phrase in empty:
                fail(i, "tokenises to nothing with this tokenizer")
    return flat, lens, text_phrase, empty


def entity_token_ids(entity: RiskEntity, vocab_size: int) -> list[int]:
    """The token ids of a ``token_ids`` entity, checked against ``[0, vocab_size)``.

    Raises:
        ValueError: with the reason as its message (not space-separated ids, no ids, ids outside
            the vocabulary).

    Example:
        >>> entity_token_ids(config_entities([], [[5, 7]])[0], 10)   # doctest: +SKIP
        [5, 7]
    """
    try:
        seq = entity.token_ids()
    except ValueError:
        raise ValueError("expected space-separated token ids") from None
    bad = [t for t in seq if t < 0 or t >= vocab_size]
    if bad:
        raise ValueError(f"token ids {bad} outside the vocabulary [0, {vocab_size})")
    if not seq:
        raise ValueError("no token ids")
    return seq


def drop_sequences(flat: np.ndarray, lens: np.ndarray, vals: np.ndarray, drop: np.ndarray):
    """The CSR set ``(flat, lens)`` and its per-sequence ``vals`` without the sequences where ``drop``."""
    if not drop.any():
        return flat, lens, vals
    return flat[~np.repeat(drop, lens)], lens[~drop], vals[~drop]


def unemittable(flat: np.ndarray, lens: np.ndarray, tokenizer, vocab_size: int) -> np.ndarray:
    """``[len(lens)]`` bool: the sequences holding a token id ``>= vocab_size`` or the tokenizer's unk id."""
    bad = flat >= vocab_size
    unk = getattr(tokenizer, "unk_token_id", None) if tokenizer is not None else None
    if unk is not None:
        bad |= flat == unk
    bad_seq = np.zeros(len(lens), bool)
    bad_seq[np.repeat(np.arange(len(lens)), lens)[bad]] = True
    return bad_seq


def eos_singles(flat: np.ndarray, lens: np.ndarray, eos_ids: set[int]) -> np.ndarray:
    """``[len(lens)]`` bool: the single-token sequences equal to an EOS id (never banned)."""
    if not eos_ids or not len(lens):
        return np.zeros(len(lens), bool)
    starts = np.cumsum(lens) - lens
    return (lens == 1) & np.isin(flat[np.minimum(starts, max(len(flat) - 1, 0))], sorted(eos_ids))


def banned_sequences(tokenizer, entities: list[RiskEntity], vocab_size: int, eos_ids: set[int],
                     forms: dict | None = None, fail=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR ``(flat, lens, owner)`` of every banned token sequence; ``owner`` indexes ``entities``.

    Phrase entities are owned by the entity of highest severity among those with the same text.

    Args:
        forms: ``phrase -> (normalised, deleet forms)`` computed before (see :func:`phrase_forms`).
        fail: ``fail(i, reason)`` is called for an entity that cannot be compiled (it then has no
            sequence); it may raise. Default: raise ``ValueError`` naming the entity.

    Raises:
        ValueError: (default ``fail``) a phrase entity that normalises or tokenises to nothing, a
            token-id entity with ids outside ``[0, vocab_size)`` (each names the entity).
    """
    if fail is None:
        def fail(i: int, reason: str) -> None:
            raise ValueError(f"entity {entities[i].phrase!r}: {reason}")
    owner, forms = phrase_forms(entities, fail, forms)
    if owner and tokenizer is None:
        raise ValueError("tokenizer: required for phrase entities")
    phrases = list(owner)
    flat, lens, text_phrase, _ = encode_phrases(tokenizer, phrases, forms, entities, fail)
    vals = np.asarray([owner[p] for p in phrases], np.int64)[text_phrase] if len(phrases) else np.zeros(0, np.int64)
    flat, lens, vals = drop_sequences(flat, lens, vals, (lens == 0) | unemittable(flat, lens, tokenizer, vocab_size))
    extra_seqs, extra_vals = [], []
    for i, e in enumerate(entities):
        if e.kind == "token_ids":
            try:
                extra_seqs.append(entity_token_ids(e, vocab_size))
            except ValueError as exc:
                fail(i, str(exc))
                continue
            extra_vals.append(i)
    if extra_seqs:
        flat = np.concatenate([flat, np.asarray([t for q in extra_seqs for t in q], np.int64)])
        lens = np.concatenate([lens, np.asarray([len(q) for q in extra_seqs], np.int64)])
        vals = np.concatenate([vals, np.asarray(extra_vals, np.int64)])
    return drop_sequences(flat, lens, vals, eos_singles(flat, lens, eos_ids))
