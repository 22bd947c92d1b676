"""The interim rule of request-only phrases: fail closed from the first step, built in a few ms.

A request's own ``banned_phrases`` need a full :class:`fastsafe.safety.DeviceMatcher` (tokenisation
of every variant, the character automaton), which takes 0.1-2 s and is built in a background
thread (:class:`~.built.RequestMatchers`). Until it is in force the row is under this rule, which is
built on the step thread without the tokenizer, from per-vocabulary tables made once per worker:

- **start bans** (per phrase set): every token that can *begin* a phrase, whatever the
  tokenisation — a token whose lowercased text, from a word start inside it (its first byte, or
  one after a byte that is not an ASCII letter or digit) with the non-word bytes there skipped, is
  a prefix of a phrase's lowercased text (itself stripped of leading non-word bytes), or is the
  whole phrase followed by a non-word byte. A phrase with no ASCII letter or digit bans every token
  holding its first byte.
- **continuation bans** (per row, from its last tokens): for every phrase that the row's text
  already began (at a word start of its last :data:`~.engine.HISTORY_WINDOW` tokens: the prompt,
  or the output of a re-added request), every token whose lowercased text is a prefix of the
  rest of the phrase, or the rest followed by a non-word byte.

With both in force no phrase can appear in the row's lowercased text at a word start (the full
matcher's match): its first character is in a token the start bans refuse, or it began before
the row's first step and its next token is refused. EOS is never banned. What the rule lacks is
the full matcher's normalisation (NFKC, confusables, leetspeak, separators between letters): a
phrase spelled that way is caught once the full matcher takes over. Its price: the tokens that can
begin a phrase (``" quick"``, ``"qu"``, ``"q"`` for ``"quick brown"``) are unavailable to the row for
the build's duration.

Cost (SmolLM2 tokenizer, V = 49,152; one CPU thread): the vocabulary tables ~0.5 s once per worker
(:class:`TokenTries`); per new phrase set the start bans are a vectorised walk of the phrases
through a byte trie of the tokens, a few ms at 10,000 phrases (:func:`start_rule`); per row the
continuation bans are a few binary searches (:func:`row_mask`).

Example:
    >>> tries = TokenTries.build(tokenizer, V, eos_ids={0})                 # doctest: +SKIP
    >>> rule = start_rule(tries, ["quick brown", "lazy dog"])                  # doctest: +SKIP
    >>> words = row_mask(tries, rule, history_ids)   # [ceil(V/32)] int32, bit = 1 allowed  # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["TokenTries", "StartRule", "start_rule", "row_mask", "continuation_tokens"]

_WORD = np.zeros(256, dtype=bool)
for _c in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789":
    _WORD[_c] = True
_NONWORD = bytes(i for i in range(256) if not _WORD[i])


def _lower(b: bytes) -> bytes:
    try:
        return b.decode("utf-8").lower().encode("utf-8")
    except UnicodeDecodeError:                      # a partial character (byte-fallback tokens)
        return b.lower()


class _Trie:
    """A byte trie of keys -> token ids, as sorted numpy edge keys (``parent * 256 + byte``).

    ``end`` (CSR per node): the tokens whose key ends at the node; ``ext``: the tokens whose key goes
    on from the node with a non-word byte (the node's text is then a whole word of the key).
    """

    def __init__(self, keys):
        children: dict = {}
        end: dict = {}
        ext: dict = {}
        for key, tok in keys:
            node = 0
            for d, byte in enumerate(key):
                if d and not _WORD[byte]:
                    ext.setdefault(node, []).append(tok)
                nxt = children.get((node, byte))
                if nxt is None:
                    nxt = children[(node, byte)] = len(children) + 1
                node = nxt
            end.setdefault(node, []).append(tok)
        n = len(children) + 1
        ek = np.fromiter((p * 256 + b for p, b in children), np.int64, len(children))
        ec = np.fromiter(children.values(), np.int64, len(children))
        order = np.argsort(ek)
        self.edge_key, self.edge_child = ek[order], ec[order]
        self.end_ptr, self.end_tok = self._csr(end, n)
        self.ext_ptr, self.ext_tok = self._csr(ext, n)
        self.nodes = n
        # the first two levels as dense tables (every text is still in the trie there)
        self.level1 = np.full(256, -1, dtype=np.int64)
        self.level2 = np.full(256 * 256, -1, dtype=np.int64)
        first_byte = {}
        for (parent, byte), child in children.items():
            if parent == 0:
                self.level1[byte] = child
                first_byte[child] = byte
        for (parent, byte), child in children.items():
            if parent in first_byte:
                self.level2[first_byte[parent] * 256 + byte] = child

    @staticmethod
    def _csr(lists: dict, n: int):
        counts = np.zeros(n + 1, dtype=np.int64)
        for node, toks in lists.items():
            counts[node + 1] = len(toks)
        ptr = np.cumsum(counts)
        tok = np.empty(int(ptr[-1]), dtype=np.int64)
        for node, toks in lists.items():
            tok[ptr[node]:ptr[node + 1]] = toks
        return ptr, tok

    def walk(self, flat: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
        """Token ids of every key that is a prefix of a text, or the whole text then a non-word byte.

        ``flat`` uint8 holds the texts; text ``i`` is ``flat[starts[i]:starts[i] + lens[i]]``.
        Vectorised over the texts (one ``searchsorted`` per depth for the texts still in the trie).
        """
        alive = np.arange(len(starts))
        node = np.zeros(len(starts), dtype=np.int64)
        end_nodes, ext_nodes = [], []
        d = 0
        while alive.size:
            done = lens[alive] == d
            if done.any():
                ext_nodes.append(node[done])
                alive, node = alive[~done], node[~done]
                if not alive.size:
                    break
            byte = flat[starts[alive] + d].astype(np.int64)
            if d == 0:
                child = self.level1[byte]
            elif d == 1:
                child = self.level2[flat[starts[alive]].astype(np.int64) * 256 + byte]
            else:
                keys = node * 256 + byte
                idx = np.searchsorted(self.edge_key, keys)
                idx[idx == len(self.edge_key)] = 0
                child = np.where(self.edge_key[idx] == keys, self.edge_child[idx], -1)
            found = child >= 0
            alive, node = alive[found], child[found]
            end_nodes.append(node)
            d += 1
        return np.concatenate([self._expand(self.end_ptr, self.end_tok, end_nodes),
                               self._expand(self.ext_ptr, self.ext_tok, ext_nodes)])

    def _expand(self, ptr, tok, node_lists) -> np.ndarray:
        if not node_lists:
            return np.empty(0, dtype=np.int64)
        mark = np.zeros(self.nodes, dtype=bool)
        for nodes in node_lists:
            mark[nodes] = True
        nodes = np.flatnonzero(mark)
        lo, hi = ptr[nodes], ptr[nodes + 1]
        n = hi - lo
        total = int(n.sum())
        if not total:
            return np.empty(0, dtype=np.int64)
        offs = np.repeat(lo - np.cumsum(np.r_[0, n[:-1]]), n) + np.arange(total)
        return tok[offs]


@dataclass
class TokenTries:
    """Per-vocabulary tables of the interim rule (built once per worker: :meth:`build`).

    Attributes:
        vocab_size: ``V``.
        token_text: lowercased UTF-8 bytes of every token id (``b""`` for special ids).
        starts: trie of each token's text from every word start inside it (non-word bytes skipped).
        raw: trie of each token's whole text.
        byte_tokens: per byte value, the tokens whose text holds it.
        eos: ids never banned.
    """

    vocab_size: int
    token_text: list
    starts: _Trie
    raw: _Trie
    byte_tokens: list
    eos: np.ndarray

    @classmethod
    def build(cls, tokenizer, vocab_size: int, eos_ids=()) -> "TokenTries":
        """Tables of ``tokenizer`` for logits of width ``vocab_size`` (about 0.5 s for 49,152 tokens)."""
        from fastsafe.safety.token_chars import token_bytes
        text = [_lower(b) for b in token_bytes(tokenizer, int(vocab_size))]
        eos = np.asarray(sorted(int(e) for e in eos_ids), dtype=np.int64)
        skip = set(eos.tolist())
        start_keys, raw_keys = [], []
        by_byte: list = [[] for _ in range(256)]
        for t, b in enumerate(text):
            if not b or t in skip:
                continue
            raw_keys.append((b, t))
            seen = set()
            for i in range(len(b)):
                if i and _WORD[b[i - 1]]:
                    continue
                k = b[i:].lstrip(_NONWORD)
                if k and k not in seen:
                    seen.add(k)
                    start_keys.append((k, t))
            for c in set(b):
                by_byte[c].append(t)
        return cls(int(vocab_size), text, _Trie(start_keys), _Trie(raw_keys),
                   [np.asarray(x, dtype=np.int64) for x in by_byte], eos)


@dataclass
class StartRule:
    """The start bans of one phrase set and its phrases' keys (for the continuation bans).

    Attributes:
        allowed: ``[ceil(V/32)]`` int32 packed mask (bit = 1 allowed) of the start bans.
        keys: the phrases' lowercased UTF-8 texts (leading non-word bytes skipped), by prefix.
        banned: number of tokens the start bans refuse.
    """

    allowed: np.ndarray
    keys: "_PrefixIndex"
    banned: int


def _count_allowed(words: np.ndarray, V: int) -> int:
    return int(np.unpackbits(words.astype("<i4").view(np.uint8), bitorder="little")[:V].sum())


class _PrefixIndex:
    """The phrases' keys, found by prefix: :meth:`starting_with` (for the continuation bans).

    Keys are sorted by their first 4 bytes (a ``uint32`` code, short keys padded with 0; vectorised,
    no Python per phrase); a query compares only the keys in its code range.
    """

    def __init__(self, flat: np.ndarray, starts: np.ndarray, lens: np.ndarray):
        self.flat, self.starts, self.lens = flat, starts, lens
        code = np.zeros(len(starts), dtype=np.int64)
        for d in range(4):
            code = code * 256 + np.where(lens > d, flat[np.minimum(starts + d, len(flat) - 1)], 0)
        order = np.argsort(code, kind="stable")
        self.codes, self.order = code[order], order

    def __len__(self) -> int:
        return len(self.starts)

    def starting_with(self, s: bytes) -> list:
        """The keys that begin with ``s`` and are longer than it (``bytes``)."""
        q = min(len(s), 4)
        lo_code = int.from_bytes(s[:q].ljust(4, b"\0"), "big")
        hi_code = lo_code + 256 ** (4 - q)
        lo, hi = np.searchsorted(self.codes, lo_code), np.searchsorted(self.codes, hi_code)
        out = []
        buf = self.flat
        for i in self.order[lo:hi].tolist():
            st, n = int(self.starts[i]), int(self.lens[i])
            if n > len(s) and buf[st:st + len(s)].tobytes() == s:
                out.append(buf[st:st + n].tobytes())
        return out


def _pack_allowed(banned_ids: np.ndarray, V: int, eos: np.ndarray) -> np.ndarray:
    allowed = np.ones(((V + 31) // 32) * 32, dtype=bool)
    allowed[banned_ids] = False
    allowed[eos] = True
    allowed[V:] = True
    return np.packbits(allowed, bitorder="little").view("<i4").astype(np.int32)


def _texts(phrases) -> tuple[bytes, np.ndarray, np.ndarray]:
    """The phrases' lowercased UTF-8 bytes, one buffer, with each phrase's start and length."""
    joined = "\x00".join(phrases).lower().encode("utf-8")
    flat = np.frombuffer(joined, dtype=np.uint8)
    sep = np.flatnonzero(flat == 0)
    if len(sep) != len(phrases) - 1:                 # a phrase holds NUL itself: one by one
        parts = [p.lower().encode("utf-8") for p in phrases]
        lens = np.fromiter(map(len, parts), np.int64, len(parts))
        starts = np.cumsum(np.r_[0, lens[:-1] + 1]) if len(parts) else np.zeros(0, np.int64)
        joined = b"\x01".join(parts)
        return joined, starts.astype(np.int64), lens
    starts = np.r_[0, sep + 1].astype(np.int64)
    ends = np.r_[sep, len(flat)].astype(np.int64)
    return joined, starts, ends - starts


def start_rule(tries: TokenTries, phrases) -> StartRule:
    """The start bans of ``phrases`` (strings) under ``tries``' vocabulary.

    Returns:
        :class:`StartRule`.

    Example:
        >>> rule = start_rule(tries, ["quick brown"])              # doctest: +SKIP
        >>> rule.banned                                             # " quick", "quick", "qu", "q", ...
    """
    phrases = list(phrases)
    joined, starts, lens = _texts(phrases)
    flat = np.frombuffer(joined, dtype=np.uint8)
    word = np.flatnonzero(_WORD[flat])
    # skip each phrase's leading non-word bytes: its first word byte
    j = np.searchsorted(word, starts)
    inside = j < len(word)
    first = np.full(len(starts), -1, dtype=np.int64)
    first[inside] = word[j[inside]]
    has_word = inside & (first < starts + lens)
    ws, wl = first[has_word], (starts + lens)[has_word] - first[has_word]
    banned = [tries.starts.walk(flat, ws, wl)]
    for i in np.flatnonzero(~has_word):              # no letter or digit: every token holding its first byte
        if lens[i]:
            banned.append(tries.byte_tokens[int(flat[starts[i]])])
    allowed = _pack_allowed(np.concatenate(banned), tries.vocab_size, tries.eos)
    return StartRule(allowed, _PrefixIndex(flat, ws, wl), tries.vocab_size - _count_allowed(allowed, tries.vocab_size))


def continuation_tokens(tries: TokenTries, rule: StartRule, history) -> np.ndarray:
    """Tokens that would continue a phrase the row's text already began (``history``: recent token ids).

    For every word start of the history's lowercased text whose rest is a proper prefix of a
    phrase's key, the tokens whose text is a prefix of the phrase's remainder (or the remainder
    then a non-word byte).
    """
    text = b"".join(tries.token_text[t] for t in history if 0 <= t < tries.vocab_size)
    if not text or not len(rule.keys):
        return np.empty(0, dtype=np.int64)
    rests = []
    for i in range(len(text)):
        if (i and _WORD[text[i - 1]]) or not _WORD[text[i]]:
            continue
        s = text[i:]
        rests += [k[len(s):] for k in rule.keys.starting_with(s)]
    if not rests:
        return np.empty(0, dtype=np.int64)
    lens = np.fromiter(map(len, rests), np.int64, len(rests))
    starts = np.cumsum(np.r_[0, lens[:-1]]).astype(np.int64)
    return tries.raw.walk(np.frombuffer(b"".join(rests), dtype=np.uint8), starts, lens)


def row_mask(tries: TokenTries, rule: StartRule, history) -> np.ndarray:
    """The interim rule of one row: its phrase set's start bans and its own continuation bans.

    Args:
        tries: the worker's :class:`TokenTries`.
        rule: the phrase set's :class:`StartRule`.
        history: the row's last token ids (host list).

    Returns:
        ``[ceil(V/32)]`` int32 packed mask, bit = 1 allowed.
    """
    cont = continuation_tokens(tries, rule, history)
    if not cont.size:
        return rule.allowed
    cont = cont[~np.isin(cont, tries.eos)]
    allowed = np.unpackbits(rule.allowed.astype("<i4").view(np.uint8), bitorder="little").astype(bool)
    allowed[cont] = False
    return np.packbits(allowed, bitorder="little").view("<i4").astype(np.int32)
