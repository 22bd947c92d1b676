"""Regex entities that are regular, compiled into one search DFA over character classes.

Each pattern is parsed by ``interegular`` (Python regex syntax to a finite automaton); the
patterns it cannot turn into one (``\\b``, ``^`` / ``$``, backreferences, Unicode properties such
as ``\\pL``) stay on the host RE2 path (:meth:`~fastsafe.safety.DeviceMatcher.host_regex_check`),
listed with the reason in :attr:`RegexDFA.host`. The regular ones are combined into a single DFA
(subset construction of "a match of pattern ``i`` may start at any character", all patterns in
lockstep), whose state after a text says, for every pattern, which matches are in progress, and
whose :attr:`RegexDFA.accept` names the entity of a match **ending at the last character** (the
first listed pattern when several end there).

The DFA reads the text the way the host reads it (:func:`~fastsafe.safety.normalize.light_normalize`:
NFKC, invisible characters dropped, a run of whitespace read as one space): characters are mapped
to classes (:meth:`RegexDFA.classes`; an invisible character has no class and changes nothing), and
a whitespace run is folded inside the DFA (a state remembers whether the last character was
whitespace). So the rule checked is: *some match of the pattern ends inside the new text*. The
host path (RE2 ``finditer`` over the last ``regex_window`` characters plus the candidate) blocks a
subset of that: its non-overlapping leftmost matches are matches, and its window is a part of the
whole history; the DFA may block a few more, never fewer (tested against RE2 on random texts).

Device use (not wired into the step yet): a ``[V, max_len]`` table of each token's light-normalised
character classes and one more state column, advanced like the character automaton's.

Example:
    >>> dfa = compile_regexes([r"\\d{3}-\\d{4}", r"(?i)bad(word)+"], [0, 1])
    >>> dfa.first_match("call 555-1234 now"), dfa.first_match("a BADwordWORD"), dfa.host
    ((0, 12), (1, 8), [])
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field

import numpy as np

from .normalize import light_normalize

__all__ = ["RegexDFA", "compile_regexes", "MAX_STATES"]

#: Patterns whose addition would grow the combined DFA past this many states stay on the host.
MAX_STATES = 20000

_OTHER = 0          # class of every character no pattern names
_SPACE = 1          # class of whitespace (a run of it reads as one " ")


def _parse(pattern: str):
    """The interegular FSM of ``pattern``, or the reason it stays on the host."""
    try:
        import interegular
    except ImportError:  # pragma: no cover - a declared dependency
        return None, "interegular is not installed"
    if any(x in pattern for x in ("(?=", "(?!", "(?<=", "(?<!")):
        return None, "lookaround is not regular here"
    try:
        fsm = interegular.parse_pattern(pattern).to_fsm()
    except Exception as exc:  # noqa: BLE001 - whatever interegular refuses stays on the host path
        return None, f"not compiled to an automaton ({type(exc).__name__}: {exc})"
    return fsm, None


@dataclass
class RegexDFA:
    """The combined search DFA (numpy; a device copy is a pair of tensors).

    Attributes:
        delta: ``[S, K]`` int32 transitions over the ``K`` character classes; state 0 is the start
            (after nothing, or after a non-space character when no match is in progress).
        accept: ``[S]`` int32 entity value of a match ending on the character that led here, -1 none.
        char_class: folded character (after NFKC) -> class; characters not listed are class 0.
        values: the entity value of each compiled pattern, in order.
        host: ``(value, reason)`` of the patterns left on the host path.
    """

    delta: np.ndarray
    accept: np.ndarray
    char_class: dict
    values: list
    host: list = field(default_factory=list)

    @property
    def num_states(self) -> int:
        return self.delta.shape[0]

    @property
    def num_classes(self) -> int:
        return self.delta.shape[1]

    def classes(self, text: str) -> list[int]:
        """The classes the DFA reads for ``text`` (NFKC per character, invisible characters dropped;
        whitespace is class 1, folded into one by the DFA itself)."""
        out = []
        for ch in text:
            for c in light_normalize(ch) if not ch.isspace() else " ":
                out.append(_SPACE if c.isspace() else self.char_class.get(c, _OTHER))
        return out

    def run(self, text: str, state: int = 0) -> tuple[int, list[int]]:
        """``(state after text, [entity of a match ending at each class read, -1 none])`` (host reference)."""
        hits = []
        for c in self.classes(text):
            state = int(self.delta[state, c])
            hits.append(int(self.accept[state]))
        return state, hits

    def first_match(self, text: str):
        """``(entity, index of the class where the first match ends)`` or None."""
        _, hits = self.run(text)
        for i, h in enumerate(hits):
            if h >= 0:
                return h, i
        return None


def compile_regexes(patterns: list[str], values: list[int], *, max_states: int = MAX_STATES) -> RegexDFA:
    """Compile the regular ``patterns`` (entity ``values``) into one :class:`RegexDFA`.

    Patterns interegular cannot compile, or whose addition would take the DFA past ``max_states``
    states, are listed in :attr:`RegexDFA.host` (they stay on the host RE2 path).

    Raises:
        ValueError: ``patterns`` and ``values`` differ in length.
    """
    if len(patterns) != len(values):
        raise ValueError(f"values: expected {len(patterns)} values (one per pattern), got {len(values)}")
    fsms, kept, host = [], [], []
    for p, v in zip(patterns, values):
        fsm, why = _parse(p)
        if fsm is None:
            host.append((v, why))
            continue
        trial = _determinize(fsms + [fsm], kept + [v], max_states)
        if trial is None:
            host.append((v, f"the combined automaton would exceed {max_states} states"))
            continue
        fsms.append(fsm)
        kept.append(v)
    dfa = _determinize(fsms, kept, max_states) if fsms else None
    if dfa is None:
        return RegexDFA(np.zeros((1, 2), np.int32), np.full(1, -1, np.int32), {}, [], host)
    delta, accept, char_class = dfa
    return RegexDFA(delta, accept, char_class, kept, host)


def _determinize(fsms, values, max_states):
    """Subset construction over all patterns at once; None past ``max_states``."""
    from interegular.fsm import anything_else
    chars = sorted({c for f in fsms for c in f.alphabet.keys() if c is not anything_else})
    other = tuple(f.alphabet[anything_else] for f in fsms)
    space = tuple(f.alphabet[" "] if " " in f.alphabet.keys() else f.alphabet[anything_else] for f in fsms)
    sig_class = {other: _OTHER}
    classes = [other, space]               # class 0: other, class 1: whitespace
    char_class = {}
    for c in chars:
        if c.isspace():
            continue                        # whitespace reads as " " (class 1)
        sig = tuple(f.alphabet[c] if c in f.alphabet.keys() else f.alphabet[anything_else] for f in fsms)
        k = sig_class.get(sig)
        if k is None:
            k = sig_class[sig] = len(classes)
            classes.append(sig)
        char_class[c] = k
    K = len(classes)
    start = (tuple(frozenset() for _ in fsms), False)       # (live states per pattern, last was whitespace)
    index = {start: 0}
    order = [start]
    rows, acc = [], [-1]
    i = 0
    while i < len(order):
        live, ws = order[i]
        row = []
        for k, sig in enumerate(classes):
            if k == _SPACE and ws:
                row.append(i)                # a whitespace run is one " "
                continue
            nxt, hit = [], -1
            for j, f in enumerate(fsms):
                s = set()
                for q in set(live[j]) | {f.initial}:
                    t = f.map.get(q, {}).get(sig[j])
                    if t is not None and f.islive(t):
                        s.add(t)
                if hit < 0 and any(t in f.finals for t in s):
                    hit = values[j]
                nxt.append(frozenset(s))
            key = (tuple(nxt), k == _SPACE)
            if key not in index:
                if len(order) >= max_states:
                    return None
                index[key] = len(order)
                order.append(key)
                acc.append(hit)
            elif acc[index[key]] != hit:
                # the same live sets always end the same matches: acceptance is a function of the state
                raise AssertionError("regex DFA: inconsistent acceptance")
            row.append(index[key])
        rows.append(row)
        i += 1
    return np.asarray(rows, np.int32).reshape(len(order), K), np.asarray(acc, np.int32), char_class
