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

On the device (:class:`~fastsafe.safety.DeviceMatcher`, ``device_regex=True``): a ``[V, max_len]``
table of each token's light-normalised character classes (:func:`regex_token_tables`; a character
split across tokens is assembled from the tokens' UTF-8 heads and tails, as for the phrase
automaton) and three more state columns (DFA state, partial character, bytes it needs), moved by
:func:`regex_step`, a tensor program of its own beside the phrase automaton's step (the native
kernels copy these columns through; the matcher runs this part in torch after them). Whitespace
and patterns that use ``\\w \\W \\s \\S`` (ASCII classes in RE2) stay on the host path too
(:func:`device_regexes`). Limit: per-character NFKC does not compose a base letter and a combining
mark the way ``light_normalize`` of the whole text does.

Example:
    >>> dfa = compile_regexes([r"\\d{3}-\\d{4}", r"(?i)bad(word)+"], [0, 1])
    >>> dfa.first_match("call 555-1234 now"), dfa.first_match("a BADwordWORD"), dfa.host
    ((0, 12), (1, 8), [])
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from .normalize import light_normalize

__all__ = ["RegexDFA", "compile_regexes", "device_regexes", "regex_token_tables", "RegexTables", "regex_step",
           "MAX_STATES", "REGEX_COLUMNS"]

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


# ---------------------------------------------------------------------------------------------- device
#: Columns the regex DFA adds to a DeviceMatcher state: DFA state, partial UTF-8 character bits, bytes it needs.
REGEX_COLUMNS = 3

#: Pattern features whose RE2 meaning differs from interegular's (ASCII vs Unicode classes): host path.
_HOST_ONLY = ("\\w", "\\W", "\\s", "\\S")


def device_regexes(patterns: list[str], values: list[int], *, max_states: int = MAX_STATES) -> RegexDFA:
    """:func:`compile_regexes` for the device step: also leaves ``\\w \\W \\s \\S`` patterns on the host
    (RE2 reads them as ASCII classes)."""
    keep = [(p, v) for p, v in zip(patterns, values) if not any(x in p for x in _HOST_ONLY)]
    dfa = compile_regexes([p for p, _ in keep], [v for _, v in keep], max_states=max_states)
    dfa.host = sorted(dfa.host + [(v, "\\w / \\s classes are ASCII in RE2") for p, v in zip(patterns, values)
                                  if any(x in p for x in _HOST_ONLY)])
    return dfa


@functools.lru_cache(maxsize=1)
def _light_codepoints() -> tuple[np.ndarray, np.ndarray]:
    """``(first, second)`` ``[CP_LIMIT]`` int32: the first two characters of each codepoint's
    light-normalised form (-1: none; surrogates have none). Computed once per process."""
    from .char_automaton import CP_LIMIT
    first = np.full(CP_LIMIT, -1, np.int32)
    second = np.full(CP_LIMIT, -1, np.int32)
    for c in range(CP_LIMIT):
        if 0xD800 <= c < 0xE000:
            continue
        ch = chr(c)
        t = " " if ch.isspace() else light_normalize(ch)
        if t:
            first[c] = ord(t[0])
            if len(t) > 1:
                second[c] = ord(t[1])
    return first, second


def regex_token_tables(tokenizer, vocab_size: int, dfa: RegexDFA) -> dict[str, np.ndarray]:
    """Each token's light-normalised character classes for the device, plus its split characters.

    Returns ``{"slots": [V + 1, L] int32 (``K`` = none), "head_n", "head_bits", "tail_n",
    "tail_bits", "tail_need", "body": [V + 1] int64 (as :func:`~fastsafe.safety.token_chars.token_slots`),
    "cp0", "cp1": [CP_LIMIT] int32 the classes of the first two characters of each codepoint (K: none)}``.
    """
    from .token_chars import partial_char_fields, token_bytes
    K = dfa.num_classes
    V = int(vocab_size)
    rows, heads, tails, bodies = [], [], [], []
    for b in token_bytes(tokenizer, V) + [b""]:
        i = 0
        while i < len(b) and 0x80 <= b[i] <= 0xBF:         # continuation bytes of a character split before
            i += 1
        head = b[:i]
        j, k = len(b), len(b) - 1
        while k >= i and 0x80 <= b[k] <= 0xBF:
            k -= 1
        if k >= i and b[k] >= 0xC0:
            need = 2 if b[k] < 0xE0 else 3 if b[k] < 0xF0 else 4
            if len(b) - k < need:
                j = k                                      # an unfinished character at the end
        text = b[i:j].decode("utf-8", "replace")
        rows.append(dfa.classes(text))
        bodies.append(j > i)
        heads.append(head)
        tails.append(b[j:])
    L = max([len(r) for r in rows] + [1])
    slots = np.full((V + 1, L), K, np.int32)
    for t, r in enumerate(rows):
        slots[t, :len(r)] = r
    f = partial_char_fields(heads, tails, bodies, V + 1)
    first, second = _light_codepoints()
    table = np.zeros(0x110000, np.int32)                 # codepoint of a light-normalised character -> class
    for ch, k in dfa.char_class.items():
        table[ord(ch)] = k
    table[[c for c in range(0x3000) if chr(c).isspace()]] = _SPACE
    cp = np.stack([np.where(first >= 0, table[np.maximum(first, 0)], K),
                   np.where(second >= 0, table[np.maximum(second, 0)], K)], axis=1).astype(np.int32)
    f["slots"] = slots
    f["cp0"], f["cp1"] = cp[:, 0].copy(), cp[:, 1].copy()
    return f


class RegexTables:
    """The regex DFA and its token tables as tensors on one device (what :func:`regex_step` reads)."""

    def __init__(self, dfa: RegexDFA, tables: dict, device):
        t = lambda a, dt=torch.int64: torch.as_tensor(np.ascontiguousarray(a), dtype=dt, device=device)  # noqa: E731
        S, K = dfa.delta.shape
        self.classes = K
        ext = np.concatenate([dfa.delta, np.arange(S, dtype=np.int32)[:, None]], axis=1)   # column K: no character
        self.delta = t(ext.reshape(-1), torch.int32)
        self.accept = t(dfa.accept, torch.int32)
        self.slots = t(tables["slots"], torch.int32)
        for name in ("head_n", "head_bits", "tail_n", "tail_bits", "tail_need", "body"):
            setattr(self, name, t(tables[name]))
        self.cp0 = t(tables["cp0"], torch.int32)
        self.cp1 = t(tables["cp1"], torch.int32)
        self.values = list(dfa.values)
        self.host = list(dfa.host)
        self.nbytes = sum(x.nbytes for x in (self.delta, self.accept, self.slots, self.head_n, self.head_bits,
                                              self.tail_n, self.tail_bits, self.tail_need, self.body, self.cp0, self.cp1))


def regex_step(rt: RegexTables, cols: torch.Tensor, ids: torch.Tensor, vocab_size: int):
    """Feed tokens ``ids`` through the regex DFA: ``(new cols [..., 3] int64, hit [...] int64)``.

    ``cols``: the rows' regex columns (DFA state, partial character bits, bytes it still needs),
    ``[B, 3]`` or broadcast to ``ids`` (``[B, k, 3]`` for candidates); ``hit`` is the entity of the
    first match that ends inside the token (-1: none). A tensor program (no host read, fixed loop
    count): the step of the native kernels can call it beside theirs.
    """
    from .char_automaton import CP_LIMIT
    s, cp, need = cols[..., 0], cols[..., 1], cols[..., 2]
    K = rt.classes
    row = torch.where((ids >= 0) & (ids < vocab_size), ids, vocab_size)
    hit = torch.full_like(s, -1)

    def feed(s, hit, c):
        s = rt.delta[s * (K + 1) + c].to(torch.int64)
        acc = rt.accept[s].to(torch.int64)
        return s, torch.where((hit < 0) & (acc >= 0) & (c != K), acc, hit)

    hn, hb = rt.head_n[row], rt.head_bits[row]
    done = (need > 0) & (hn >= need)
    full = (cp << (6 * need)) | (hb >> (6 * (hn - need).clamp(min=0)))
    big = full >= CP_LIMIT
    cpi = full.clamp(0, CP_LIMIT - 1)
    c0 = torch.where(done, torch.where(big, 0, rt.cp0[cpi].to(torch.int64)), K)
    c1 = torch.where(done & ~big, rt.cp1[cpi].to(torch.int64), K)
    partial = (need > hn) & (hn > 0)
    cp = torch.where(partial, (cp << (6 * hn)) | hb, cp)
    need = torch.where(partial, need - hn, need)
    s, hit = feed(s, hit, c0)
    s, hit = feed(s, hit, c1)
    slots = rt.slots[row].to(torch.int64)
    for j in range(slots.shape[-1]):
        s, hit = feed(s, hit, slots[..., j])
    body = rt.body[row] > 0
    tn = rt.tail_n[row]
    cp = torch.where(tn > 0, rt.tail_bits[row], torch.where(body | done, 0, cp))
    need = torch.where(tn > 0, rt.tail_need[row], torch.where(body | done, 0, need))
    return torch.stack([s, cp, need], dim=-1), hit
