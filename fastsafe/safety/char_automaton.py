"""The character automaton of the text-level check: folding, the symbol stream, and the DFA.

Text is checked one character at a time, so the result does not depend on how the model split it
into tokens. Each character is **folded** (:func:`fold_char`): the steps of
:func:`~fastsafe.safety.normalize.normalize_text` (NFKC, case folding, diacritics and invisible
characters removed, the hand-written confusables, leetspeak) applied to the character, then
Unicode's look-alikes (:func:`~fastsafe.safety.confusables.confusable_map`, UTS #39). A folded
character falls in a **class**: one class per character that occurs in some entity, plus
``SEP`` (whitespace), ``USEP`` (``_``), ``PSEP`` (the other separators ``. - * ~ | / \\ , · •``),
``OTHER_WORD`` and ``OTHER_NONWORD``.

The classes become a stream of **symbols** (:func:`stream_symbols`, the host reference of what the
device does):

* a run of separators is one symbol, the kind of its first character: ``SEP`` (whitespace),
  ``USEP`` (``_``) or ``PSEP`` (so ``"make  a"`` and ``"make - a"`` read alike, ``"make-a"`` and
  ``"make._a"`` alike, ``"make_a"`` and ``"make_.a"`` alike);
* a word character that follows a non-word character (or the start) is preceded by ``BND``, the
  word-start mark of the whole-word rule;
* the 2nd, 3rd and 4th repeat of a word character are the symbols ``SQ2``, ``SQ3`` and ``SQ4``
  (further repeats are nothing): ``"boom"`` is ``BND b o SQ2 m``, ``"booom"`` ``BND b o SQ2 SQ3 m``.

Entities become symbol patterns the same way. A gap between two words of an entity is a ``SEP``
edge, which every kind of separator run follows (``"make a bomb"`` also matches ``"make-a-bomb"``
and ``"make_a_bomb"``, ``"e-mail"`` also ``"e mail"``), except

* a punctuation or ``_`` gap between two pieces of several letters: a ``PSEP`` edge, which needs
  punctuation or ``_`` in the text (``"he-she"`` matches ``"he_she"`` but not the benign ``"he she"``);
* the gaps of an entity that is itself written letter by letter (``"s_h_i_"``, ``"s.o.b."``,
  ``"s/h/i/t"``): each gap keeps its kind, so ``"s_h_i_"`` needs ``_`` between the letters in the
  text (``USEP`` edges: the benign ``"s.h.i.e.l.d"``, which SmolLM2 writes one character per
  token, does not match it at its ``"i"``), ``"s.o.b."`` punctuation or ``_`` (not ``"s o b"``),
  ``"s h i"`` whitespace (not ``"s.h.i"``: its ``SEP`` edges are *strict*, a pattern without output
  through a ``PSEP`` edge beside each takes the other runs away). Such an entity's letters get no
  spaced pattern of their own (``"sob"`` spaced out is caught only if ``"sob"`` is listed).

In the DFA a separator run follows the edge of the most specific kind it may take: ``USEP`` a
``USEP`` edge, else ``PSEP``, else ``SEP``; ``PSEP`` a ``PSEP`` edge, else ``SEP``
(:func:`_separator_automaton`), so one pattern per entity serves every kind; where edges of several
kinds leave one node, the patterns through the less specific ones get copies through the more
specific ones (:func:`_separator_copies`), and the failure links are taken through the same
preference (:func:`_separator_automaton`: after ``"x b.c"`` the spaced ``"b c d"`` is still in
progress). The host :class:`~fastsafe.safety.PhraseMatcher` treats
``_`` as a word character and matches ``"s_h_i_"`` literally; every literal occurrence is caught
here too, in any tokenisation. Plus a **spaced** pattern (each character a word of
its own, ``"b o m b"`` = ``BND b SEP BND o SEP BND m SEP BND b``) for single-word entities of 3 to
24 characters. The DFA is Aho-Corasick over the patterns (:mod:`fastsafe.safety.automaton`) with one
change, made by the device step with one extra state column (the *shadow*: the state before the
current run's first repeat): a run of **three or more** of one letter may stand for a single entity
letter (``"booomb"`` reads as ``"bomb"``) or for a doubled one (``"booom"`` as ``"boom"``); a run of
exactly two is always a double (``"boomb"`` does not match ``"bomb"``, and ``"bom"`` never matches
``"boom"``), because English doubles letters all the time (``"assess"``, ``"flick"`` folded to
``"fiick"``) and stretching is done with three or more. A tripled entity letter matches a run of
exactly three (``"xxx"`` does not match ``"xxxx"``: a 4th repeat that the pattern does not have
ends that reading and the run is read as one letter from the shadow). Every exact occurrence is
still found (the other reading is only taken where no exact match is in progress). Limitation: where both
readings are alive, the double wins (with ``"boom"`` and ``"bomb"`` listed, ``"booomb"`` is read as
``"boom"`` then ``"b"``, but a single-letter reading is retried when the double's path dies at the
next character).

Whole words: an entity whose first character is a word character starts with ``BND``; one whose
last character is a word character matches only when the next character is not a word character
or the text ends there (the device confirms it one character later; the end of a checked
candidate counts as the end of the text).

**Spelled-out runs** (whole-word rule for letters written one by one): a pattern made of two or
more single letters with separators between them (the spaced patterns, and entities written that
way, ``"s_h_i_"`` or ``"s.o.b."``, whose leading and trailing separators are dropped) matches only
where the spelled run ends: after its last letter the text must not go on with a separator run and
another single letter (one followed by a non-word character or the end of the text). So
``"s_h_i_e_l_d"`` does not match ``"s_h_i_"`` and ``"b.o.m.b.s"`` does not match ``"bomb"``, while
``"b.o.m.b"``, ``"b o m b now"`` and ``"b-o-m-b!"`` do. The device keeps such a match pending for
up to two characters (one more state column). The end of a checked candidate still counts as the
end of the text, so a candidate that ends right after the last letter (or after the separator
following it) is blocked: with ``"s_h_i_"`` listed, ``"s_h_i_e_l_d"`` tokenised letter by letter is
blocked at its ``"i"`` (``"s.h.i.e.l.d"`` is not: its gaps are not ``_``), as a plain ``"ass"``
token is blocked before ``"ad"``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .automaton import build_trie, propagate_best
from .confusables import confusable_map
from .normalize import is_word_char, normalize_text

__all__ = ["SEPARATORS", "fold_char", "fold_text", "CharAlphabet", "CharAutomaton", "build_char_automaton",
           "stream_symbols", "char_action", "action_tables", "CANONICAL_CHARS", "OTHER_NONWORD", "OTHER_WORD", "SEP",
           "PSEP", "USEP", "BND", "SQ2", "SQ3", "SQ4", "NUM_SPECIAL", "KIND_NOW", "KIND_WORD", "KIND_SPELLED", "FLAG_BND",
           "FLAG_REPEAT", "FLAG_CONFIRM", "FLAG_WORD", "FLAG_SEPARATOR"]

#: Folded characters that separate letters (a run of them is one separator symbol, see :func:`_separator_kind`).
SEPARATORS = frozenset(" .-_*~|/\\,\u00b7\u2022")
OTHER_NONWORD, OTHER_WORD, SEP, BND, SQ2, SQ3, PSEP, SQ4, USEP = range(9)
NUM_SPECIAL = 9
#: How a pattern's match is reported: at once, after a word end, after the end of a spelled-out run.
KIND_NOW, KIND_WORD, KIND_SPELLED = range(3)
KIND_NONE = 3                 # a pattern without output (see _separator_copies)
_SEPS = (SEP, PSEP, USEP)
#: The text kinds of separator run a pattern's separator symbol admits (its edge is followed by them).
_ADMITS = {SEP: (SEP, PSEP, USEP), PSEP: (PSEP, USEP), USEP: (USEP,)}
#: The edges a text run of each kind follows, most specific first (:func:`_separator_automaton`).
_PREFERS = {SEP: (SEP,), PSEP: (PSEP, SEP), USEP: (USEP, PSEP, SEP)}
_RUNS = re.compile("[\\s" + re.escape("".join(sorted(SEPARATORS))) + "]+|[^\\s" + re.escape("".join(sorted(SEPARATORS))) + "]+")
CP_LIMIT = 0x30000            # codepoints folded through a table (above: OTHER_NONWORD)
_SPACED_MIN = 3               # single-word entities of 3 .. 24 characters also match spaced out
_SPACED_MAX = 24


@lru_cache(maxsize=1 << 16)
def fold_char(ch: str) -> str:
    """The folded form of one character (may be empty or several characters).

    Example:
        >>> fold_char("Б"), fold_char("ｂ"), fold_char("0"), fold_char("\\u200b"), fold_char("ß")
        ('б', 'b', 'o', '', 'ss')
    """
    s = normalize_text(ch)
    if not s or s.isascii():
        return s
    conf = confusable_map()
    out = []
    for c in s:
        t = conf.get(c)
        out.append(normalize_text(t) if t is not None else c)
    return "".join(out)


def fold_text(text: str) -> str:
    """``text`` folded character by character (separators kept as they are)."""
    return "".join(fold_char(c) for c in text)


@lru_cache(maxsize=1)
def _fold_table() -> tuple[np.ndarray, list[str]]:
    """``(ids [CP_LIMIT], strings)``: ``strings[ids[cp]] == fold_char(chr(cp))`` (surrogates: ``"\\ufffd"``)."""
    uniq: dict[str, int] = {}
    ids = np.empty(CP_LIMIT, np.int64)
    for cp in range(CP_LIMIT):
        f = fold_char(chr(cp)) if not 0xD800 <= cp < 0xE000 else "\ufffd"
        j = uniq.get(f)
        if j is None:
            j = uniq[f] = len(uniq)
        ids[cp] = j
    return ids, list(uniq)


def _is_word(ch: str) -> bool:
    return ch != "_" and is_word_char(ch)


def _separator_kind(ch: str) -> int:
    """``SEP`` (whitespace), ``USEP`` (``_``), ``PSEP`` (another separator) or -1 (not a separator)."""
    if ch.isspace():
        return SEP
    if ch in SEPARATORS:
        return USEP if ch == "_" else PSEP
    return -1


def _base_class(ch: str) -> int:
    """The class of a folded character that is in no alphabet (what :meth:`CharAlphabet.cls` falls back to)."""
    k = _separator_kind(ch)
    if k >= 0:
        return k
    return OTHER_WORD if _is_word(ch) else OTHER_NONWORD


@lru_cache(maxsize=1)
def _fold_firsts() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids [CP_LIMIT], first_cp [U, 2], base [U, 2])`` over the ``U`` distinct folded strings of
    :func:`_fold_table`: the codepoints of their first two characters (-1: none) and the class each
    would have in an empty alphabet (int16, -1: none). Alphabet-independent, computed once."""
    ids, strings = _fold_table()
    first_cp = np.full((len(strings), 2), -1, np.int64)
    base = np.full((len(strings), 2), -1, np.int16)
    memo: dict[str, int] = {}
    for j, f in enumerate(strings):
        for k, ch in enumerate(f[:2]):
            b = memo.get(ch)
            if b is None:
                b = memo[ch] = _base_class(ch)
            first_cp[j, k] = ord(ch)
            base[j, k] = b
    return ids, first_cp, base


#: The folded printable ASCII characters and common typographic ones (quotes, dashes, ``…×©®™°``), separators left out (``l`` folds to ``i``, ``0`` to ``o``, ``@``
#: to ``a``, ...): the characters every canonical alphabet has (see :func:`build_char_automaton`'s
#: ``canonical``); their non-word ones get a run cap of at least 2 there.
CANONICAL_CHARS = frozenset(c for c in "".join(fold_char(ch) for ch in [chr(i) for i in range(0x21, 0x7F)] +
                                                list("\u2018\u2019\u201a\u201c\u201d\u201e\u2013\u2014\u2026\u00d7\u00a9\u00ae\u2122\u00b0"))
                            if c not in SEPARATORS and not c.isspace())


class CharAlphabet:
    """Folded character -> class (see the module docstring).

    Args:
        chars: the folded characters that occur in entities (separators are ignored).
        texts: the folded entity texts (the run caps of non-word characters come from them).
        cap_floor: characters whose run cap (when they are non-word) is at least 2 even where no
            entity has them (a canonical alphabet's caps do not depend on the phrases; a larger cap
            only shortens fewer runs, the decisions are the same).
    """

    def __init__(self, chars, texts=(), cap_floor=()):
        chars = sorted({c for c in chars if c not in SEPARATORS})
        self.chars = chars
        self.index = {c: NUM_SPECIAL + i for i, c in enumerate(chars)}
        self.num_classes = NUM_SPECIAL + len(chars)
        word = np.zeros(self.num_classes, bool)
        word[OTHER_WORD] = True
        for c, i in self.index.items():
            word[i] = _is_word(c)
        self.is_word = word
        # "i" is where l, 1 and i all fold (leetspeak), so runs of it are ordinary spelling ("ill",
        # "killian"): its repeats are plain characters, never read as a stretched letter
        plain = np.zeros(self.num_classes, bool)
        if "i" in self.index:
            plain[self.index["i"]] = True
        self.plain_repeat = plain
        # runs of a non-word entity character beyond its longest run in any entity (+1) change nothing
        longest = np.zeros(self.num_classes, np.int64)
        for t in texts:
            prev, n = None, 0
            for ch in t:
                n = n + 1 if ch == prev else 1
                prev = ch
                i = self.index.get(ch)
                if i is not None and not word[i]:
                    longest[i] = max(longest[i], n)
        #: ``[C]`` slots a run of the class may keep in the token table (0: no cap here)
        self.run_cap = np.where(longest > 0, longest + 1, 0)
        for c in cap_floor:
            i = self.index.get(c)
            if i is not None and not word[i]:
                self.run_cap[i] = max(int(self.run_cap[i]), 2)

    def cls(self, ch: str) -> int:
        """Class of one folded character."""
        k = _separator_kind(ch)
        if k >= 0:
            return k
        i = self.index.get(ch)
        if i is not None:
            return i
        return OTHER_WORD if _is_word(ch) else OTHER_NONWORD

    def classes(self, folded: str) -> list[int]:
        return [self.cls(c) for c in folded]

    @property
    def key(self) -> tuple:
        """What the per-vocabulary tables depend on in the alphabet (a cache key): its characters and run caps."""
        return tuple(self.chars), tuple(int(x) for x in self.run_cap)

    def codepoint_classes(self) -> np.ndarray:
        """``[CP_LIMIT, 2]`` int16: the classes of the first two folded characters of each codepoint (-1: none).

        Vectorised: the alphabet-independent part (:func:`_fold_firsts`) is computed once per process,
        then the alphabet's characters are looked up with one ``searchsorted``. Equal to
        ``self.classes(fold_char(chr(cp))[:2])`` for every ``cp`` (tests/test_text_tables.py).
        """
        ids, first_cp, base = _fold_firsts()
        per = base.copy()
        if self.chars:
            cps = np.asarray([ord(c) for c in self.chars], np.int64)
            order = np.argsort(cps)
            cps = cps[order]
            cls = np.asarray([self.index[self.chars[i]] for i in order], np.int16)
            pos = np.minimum(np.searchsorted(cps, first_cp), len(cps) - 1)
            hit = (cps[pos] == first_cp) & (base != SEP) & (base != PSEP) & (base != USEP) & (base >= 0)
            per[hit] = cls[pos[hit]]
        return per[ids]


def char_action(prev: int, run: int, c: int, is_word: np.ndarray, word_boundaries: bool = True,
                plain_repeat: np.ndarray | None = None):
    """What one character of class ``c`` does after ``prev`` (``run``: the repeats of ``prev`` so far).

    ``run`` counts the repeats of a word class after its first character (0 .. 3, where 3 is the
    4th character of the run or later; the 2nd, 3rd and 4th are the symbols ``SQ2``, ``SQ3``,
    ``SQ4``); it is 0 after a non-word class.

    Returns ``(symbol or -1, emit BND first, new prev, new run, is a repeat symbol, confirms a word end)``.
    ``c == len(is_word)`` is "no character" (nothing happens).
    """
    C = len(is_word)
    if c == C:
        return -1, False, prev, run, False, False
    if c in _SEPS:                 # a run of separators: one symbol, the kind of its first character
        if prev in _SEPS:
            return -1, False, prev, 0, False, False
        return c, False, c, 0, False, True
    if is_word[c]:
        if c == prev and (plain_repeat is None or not plain_repeat[c]):
            sym = (SQ2, SQ3, SQ4, -1)[run]
            return sym, False, c, min(run + 1, 3), sym >= 0, False
        return c, bool(word_boundaries and not is_word[prev]), c, 0, False, False
    return c, False, c, 0, False, True


def stream_symbols(classes, is_word: np.ndarray, *, word_boundaries: bool = True, prev: int = OTHER_NONWORD,
                   run: int = 0, plain_repeat: np.ndarray | None = None) -> list[int]:
    """The symbol stream of a class sequence (host reference of the device's character step).

    Args:
        classes: character classes in text order.
        is_word: ``[num_classes]`` bool.
        word_boundaries: emit ``BND`` word-start marks.
        prev, run: class of the character before and its repeats so far (see :func:`char_action`;
            start of text: ``OTHER_NONWORD``, 0).

    Example:
        >>> a = CharAlphabet("x")
        >>> x = a.cls("x")
        >>> stream_symbols(a.classes("xxxxx"), a.is_word) == [BND, x, SQ2, SQ3, SQ4]
        True
    """
    out: list[int] = []
    for c in classes:
        sym, bnd, prev, run, _, _ = char_action(prev, run, c, is_word, word_boundaries, plain_repeat)
        if bnd:
            out.append(BND)
        if sym >= 0:
            out.append(sym)
    return out


#: Bits of :func:`action_tables`' ``flags``.
FLAG_BND, FLAG_REPEAT, FLAG_CONFIRM, FLAG_WORD, FLAG_SEPARATOR = 1, 2, 4, 8, 16


def action_tables(is_word: np.ndarray, word_boundaries: bool = True,
                  plain_repeat: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """:func:`char_action` as tables over ``ctx = prev * 4 + run`` and ``c`` in ``0 .. C`` (``C`` = none).

    Returns ``{"ctx": [4C, C+1] new ctx, "sym": [4C, C+1] symbol or -1, "flags": [4C, C+1]}`` with
    flags bit 0 = emit BND first, bit 1 = repeat symbol, bit 2 = confirms a word end, bit 3 = ``c``
    is a word character, bit 4 = ``c`` is a separator (also one that continues a run).
    Cached for a few alphabets (the arrays are shared: do not write into them).
    """
    is_word = np.asarray(is_word, bool)
    pr = None if plain_repeat is None else np.asarray(plain_repeat, bool)
    return _action_tables(is_word.tobytes(), bool(word_boundaries), None if pr is None else pr.tobytes())


@lru_cache(maxsize=8)
def _action_tables(is_word_b: bytes, word_boundaries: bool, plain_b: bytes | None) -> dict[str, np.ndarray]:
    is_word = np.frombuffer(is_word_b, bool)
    plain_repeat = None if plain_b is None else np.frombuffer(plain_b, bool)
    C = len(is_word)
    ctx = np.zeros((4 * C, C + 1), np.int64)
    sym = np.full((4 * C, C + 1), -1, np.int64)
    flags = np.zeros((4 * C, C + 1), np.int64)
    kind = np.zeros(C + 1, np.int64)
    kind[:C] = np.where(is_word, FLAG_WORD, 0)
    kind[list(_SEPS)] = FLAG_SEPARATOR
    for prev in range(C):
        for run in range(4):
            for c in range(C + 1):
                s, bnd, p2, r2, sq, conf = char_action(prev, run, c, is_word, word_boundaries, plain_repeat)
                i = prev * 4 + run
                ctx[i, c] = p2 * 4 + r2
                sym[i, c] = s
                flags[i, c] = int(bnd) * FLAG_BND | int(sq) * FLAG_REPEAT | int(conf) * FLAG_CONFIRM | kind[c]
    return {"ctx": ctx, "sym": sym, "flags": flags}


@dataclass
class CharAutomaton:
    """The DFA of the text check (numpy; the device matcher moves it to torch).

    Attributes:
        delta: ``[S, C]`` int32 transitions (plain Aho-Corasick; the repeat readings are the device's).
        out_word: ``[S]`` int32 entity of a word-final pattern that ends here (needs a boundary next), -1 none.
        out_now: ``[S]`` int32 entity of a pattern ending in a non-word character (matches at once), -1 none.
        out_spelled: ``[S]`` int32 entity of a spelled-out pattern that ends here (matches where the
            spelled run ends, see the module docstring), -1 none.
        triple_end: ``[S]`` int32 1 where the state's last symbol is ``SQ3`` (a tripled letter just
            matched exactly: a 4th repeat ends that reading), else 0.
        alphabet: the classes.
        num_patterns: patterns in the trie (plain and spaced).
        excluded: phrases left out because they fold to separators only.
    """

    delta: np.ndarray
    out_word: np.ndarray
    out_now: np.ndarray
    out_spelled: np.ndarray
    triple_end: np.ndarray
    alphabet: CharAlphabet
    num_patterns: int
    excluded: list

    @property
    def num_states(self) -> int:
        return self.delta.shape[0]

    @property
    def nbytes(self) -> int:
        return (self.delta.nbytes + self.out_word.nbytes + self.out_now.nbytes + self.out_spelled.nbytes
                + self.triple_end.nbytes)


def _separator_automaton(trie) -> tuple[np.ndarray, np.ndarray]:
    """``(fail [N], delta [N, C])``: Aho-Corasick over the trie, where a separator run follows the
    node's edge of the most specific kind it may take (``USEP``: a ``USEP`` edge, else ``PSEP``,
    else ``SEP``; ``PSEP``: a ``PSEP`` edge, else ``SEP``; see :data:`_PREFERS`), else the failure
    node's choice; the failure links are taken through those same columns (the node after a
    ``PSEP`` edge fails to where the parent's failure node goes on a punctuation run)."""
    N, A = trie.num_nodes, trie.alphabet
    child, sym, par = np.arange(1, N), trie.symbol[1:], trie.parent[1:]
    edge = {}
    for x in _SEPS:
        e = np.full(N, -1, np.int64)
        e[par[sym == x]] = child[sym == x]
        edge[x] = e
    pref = {}
    for t in (PSEP, USEP):
        own = np.full(N, -1, np.int64)
        for y in reversed(_PREFERS[t]):          # the more specific edges overwrite
            own = np.where(edge[y] >= 0, edge[y], own)
        pref[t] = own
    fail = np.zeros(N, np.int64)
    delta = np.zeros((N, A), np.int32)
    ls = trie.level_starts
    for d in range(len(ls) - 1):
        lo, hi = ls[d], ls[d + 1]
        if d >= 2:      # rows of depth < d - 1 are final: the parent's failure node is one of them
            fail[lo:hi] = delta[fail[trie.parent[lo:hi]], trie.symbol[lo:hi]]
        if d > 0:
            delta[lo:hi] = delta[fail[lo:hi]]
        if d + 1 < len(ls) - 1:
            c = np.arange(ls[d + 1], ls[d + 2])
            delta[trie.parent[c], trie.symbol[c]] = c
        for t in (PSEP, USEP):
            own = pref[t][lo:hi]
            delta[lo:hi, t] = np.where(own >= 0, own, delta[lo:hi, t])
    return fail, delta


def _separator_copies(pats: list, kinds: list, pv: list, pp: list, strict: list) -> None:
    """Where edges of several separator kinds leave one node, a text run takes the most specific one
    it may (:func:`_separator_automaton`): a pattern through a less specific edge that admits that run
    gets a copy through the more specific edge (until no new copy appears; in place).

    ``strict[i]``: the positions of pattern ``i`` that are ``SEP`` edges only whitespace may follow
    (the gaps of an entity written letter by letter with spaces): a pattern without output
    (``KIND_NONE``) through a ``PSEP`` edge there takes the punctuation runs away from them."""
    seen: set = set()         # the copies made (one equal to a listed pattern is harmless: same output)

    def add(c, k, v, pr, st):
        key = (tuple(c), v, k)
        if key not in seen:
            seen.add(key)
            pats.append(c)
            kinds.append(k)
            pv.append(v)
            pp.append(pr)
            strict.append(st)

    spec: dict = {}                               # prefix -> the PSEP / USEP edges that leave it

    def note(rows) -> bool:
        """Add the PSEP / USEP edges of patterns ``rows`` to ``spec``; whether a prefix got a new one."""
        grew = False
        for i in rows:
            q = pats[i]
            if PSEP in q or USEP in q:
                for j, x in enumerate(q):
                    if x == PSEP or x == USEP:
                        es = spec.setdefault(tuple(q[:j]), set())
                        if x not in es:
                            es.add(x)
                            grew = True
        return grew

    todo = range(len(pats))
    noted = 0
    while True:
        n = len(pats)
        for i in todo:
            for j in strict[i]:
                add(pats[i][:j] + [PSEP], KIND_NONE, -1, 0.0, frozenset(k for k in strict[i] if k < j))
        if note(range(noted, len(pats))) and noted:
            # a prefix that got a new edge after the first pass has a PSEP / USEP of a copy in it:
            # only the patterns with one can go through it
            todo = [i for i, q in enumerate(pats) if i >= n or PSEP in q or USEP in q]
        noted = len(pats)
        if not spec:
            return
        m = len(pats)
        for i in todo:
            q = pats[i]
            for j, x in enumerate(q):
                if x != SEP and x != PSEP or j in strict[i]:
                    continue
                es = spec.get(tuple(q[:j]))
                if not es:
                    continue
                for t in _ADMITS[x]:
                    e = next(y for y in _PREFERS[t] if y == x or y in es)
                    if e != x:
                        add(q[:j] + [e] + q[j + 1:], kinds[i], pv[i], pp[i], strict[i])
        if len(pats) == m:
            return
        todo = range(m, len(pats))


def entity_text(phrase: str) -> str:
    """The folded text of an entity (whitespace stripped at both ends)."""
    return fold_text(phrase.strip()).strip()


def build_char_automaton(phrases: list[str], values: list[int], priority: list[float], *,
                         word_boundaries: bool = True, spaced: bool = True, on_empty=None,
                         canonical: bool = False) -> CharAutomaton:
    """Build the DFA of the phrase entities.

    Args:
        phrases: the entity phrases (as written; folded here).
        values: entity index of each phrase (reported on a match).
        priority: e.g. severity; where several entities end at one state the highest wins.
        word_boundaries: whole-word matching (``BND`` marks and the end check).
        spaced: also match single-word entities of 3-24 characters spelled with separators between the letters.
        on_empty: called with the value of each phrase that folds to nothing (it is left out); default: raise.
        canonical: the alphabet also has every character of :data:`CANONICAL_CHARS` (the folded
            printable ASCII), so phrase sets that differ only in their words share one alphabet and
            so the cached per-vocabulary tables (:mod:`fastsafe.safety.text_tables`). The decisions do
            not change: a class no pattern uses leads where ``OTHER_WORD`` would (tested); the DFA
            has a few more columns.

    Phrases that fold to separators only (``"-"``, ``"..."``) would match every space; they are
    left out of the text check (their token variants are still banned) and listed in
    :attr:`CharAutomaton.excluded`.

    Raises:
        ValueError: a phrase that folds to nothing.
    """
    folded = []
    keep = []
    excluded = []
    for p, v, pr in zip(phrases, values, priority):
        f = entity_text(p)
        if not f:
            if on_empty is None:
                raise ValueError(f"entity {p!r}: empty after normalisation (nothing to match)")
            on_empty(v)
            continue
        if all(c in SEPARATORS or c.isspace() for c in f):
            excluded.append(p)            # it would match every space: token bans only
            continue
        folded.append(f)
        keep.append((v, pr))
    values = [v for v, _ in keep]
    priority = [pr for _, pr in keep]
    alpha = CharAlphabet({c for f in folded for c in f} | (CANONICAL_CHARS if canonical else set()), folded,
                         cap_floor=CANONICAL_CHARS if canonical else ())
    pats: list[list[int]] = []
    kinds: list[int] = []
    pv: list[int] = []
    pp: list[float] = []
    strict: list[frozenset] = []
    seen: set = set()
    word_cache: dict[str, tuple] = {}

    def word_symbols(w: str) -> tuple:
        sw = word_cache.get(w)
        if sw is None:
            sw = word_cache[w] = tuple(stream_symbols(alpha.classes(w), alpha.is_word, word_boundaries=word_boundaries,
                                                      plain_repeat=alpha.plain_repeat))
        return sw

    def gaps(form: str) -> tuple[list[str], list[int]]:
        """The words of ``form`` and the kind (``SEP`` / ``PSEP`` / ``USEP``, ``-1``: none) of the
        separator run before each word and after the last one (``len(words) + 1`` runs)."""
        words, runs = [], [-1]
        for m in _RUNS.finditer(form):
            t = m.group()
            if t[0] in SEPARATORS or t[0].isspace():
                runs[-1] = _separator_kind(t[0])
            else:
                words.append(t)
                runs.append(-1)
        return words, runs

    def pattern(form: str, written: bool) -> tuple[tuple, int, frozenset]:
        """The symbols of ``form``, how their match is reported (``KIND_*``) and the positions of the
        ``SEP`` edges only whitespace may follow (``written``: the entity as listed, not its spaced form)."""
        words, runs = gaps(form)
        letters = len(words) >= 2 and all(len(w) == 1 and alpha.is_word[alpha.cls(w)] for w in words)
        if not letters:                     # an edge "_" is punctuation there ("countries_" = "countries.")
            runs = [PSEP if r == USEP else r for r in runs]
        if word_boundaries and letters:
            runs = [-1] + runs[1:-1] + [-1]  # spelled out: its own edge separators do not end the run
            kind = KIND_SPELLED
        else:
            last = runs[-1] if runs[-1] >= 0 and words else alpha.cls(words[-1][-1]) if words else SEP
            kind = KIND_WORD if word_boundaries and alpha.is_word[last] else KIND_NOW
        sym: list[int] = [] if runs[0] < 0 else [runs[0]]
        strict = []
        for i, w in enumerate(words):
            if i and letters:   # written letter by letter: the gap needs its kind of run (_PREFERS)
                if written and runs[i] == SEP:
                    strict.append(len(sym))
                sym.append(runs[i])
            elif i:   # SEP (any kind of run matches it) unless punctuation between longer pieces
                hard = runs[i] in (PSEP, USEP) and len(words[i - 1]) > 1 and len(w) > 1
                sym.append(PSEP if hard else SEP)
            sym.extend(word_symbols(w))
        if runs[-1] >= 0 and words:
            sym.append(runs[-1])         # "countries/": the match ends on the separator (a new one)
        return tuple(sym), kind, frozenset(strict)

    for f, v, pr in zip(folded, values, priority):
        forms = [f]
        elems = [c for c in f if c not in SEPARATORS and not c.isspace()]
        if spaced and _SPACED_MIN <= len(elems) == len(f) <= _SPACED_MAX:
            forms.append(" ".join(elems))
        for n, form in enumerate(forms):
            sym, kind, st = pattern(form, n == 0)
            key = (sym, v)
            if key in seen:
                continue
            seen.add(key)
            pats.append(list(sym))
            kinds.append(kind)
            pv.append(v)
            pp.append(pr)
            strict.append(st)
    # where edges of several separator kinds leave one node, a run takes the most specific one it
    # may (_separator_automaton): the patterns through the others get copies through it
    _separator_copies(pats, kinds, pv, pp, strict)
    lens = np.asarray([len(p) for p in pats], np.int64)
    flat = np.asarray([s for p in pats for s in p], np.int64)
    trie = build_trie(flat, lens, alpha.num_classes)
    fail, delta = _separator_automaton(trie)
    N = trie.num_nodes
    kinds_a = np.asarray(kinds, np.int64)
    outs = []
    for want in (KIND_WORD, KIND_NOW, KIND_SPELLED):
        own = np.full(N, -1, np.int64)
        pri = np.full(N, -np.inf)
        sel = np.nonzero(kinds_a == want)[0]
        # highest priority per end node (stable: first listed wins ties)
        order = sel[np.lexsort((sel, -np.asarray(pp)[sel]))] if len(sel) else sel
        ends = trie.end[order]
        first = np.unique(ends, return_index=True)[1]
        own[ends[first]] = np.asarray(pv, np.int64)[order[first]]
        pri[ends[first]] = np.asarray(pp)[order[first]]
        outs.append(propagate_best(trie, fail, own, pri).astype(np.int32))
    triple_end = (trie.symbol == SQ3).astype(np.int32)
    return CharAutomaton(delta, outs[0], outs[1], outs[2], triple_end, alpha, len(pats), excluded)

