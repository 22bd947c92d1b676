"""Each token's text as character-class slots: the ``[V, max_len]`` table of the device text check.

A token's text is taken as the exact bytes it adds inside a sequence (leading space included):
for byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM2, ...) from the token string through the
byte-level alphabet; otherwise by decoding ``[anchor, token]`` and removing the anchor's text
(SentencePiece ``<0xNN>`` byte tokens give their byte). Special tokens have no text (as with
``skip_special_tokens=True``).

Slots: a complete character inside the token is folded (:func:`~fastsafe.safety.char_automaton.fold_char`)
into one slot per folded character (its class). A character split across tokens is assembled on
the device from each token's *head* (UTF-8 continuation bytes at its start) and *tail* (an
unfinished character at its end); the first two folded characters of the completed codepoint are
fed before the token's own slots. Runs that cannot change the automaton are shortened (a run of
separators or of ``OTHER_NONWORD`` to one slot, a run of one word class to four, except ``i``
whose repeats are plain characters, and a run of another non-word class to one more than its
longest run in any entity: ``"#" * 80`` is two slots unless an entity has ``"##"``).
"""
from __future__ import annotations

import re

import numpy as np

from .char_automaton import OTHER_NONWORD, PSEP, SEP, USEP, CharAlphabet, fold_char

__all__ = ["token_bytes", "token_slots", "bytes_slots"]

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet (printable stand-ins for the 256 byte values), reversed."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = list(keep)
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    dec = getattr(backend, "decoder", None) if backend is not None else None
    return dec is not None and type(dec).__name__ == "ByteLevel" or "ByteLevel" in repr(dec)


def token_bytes(tokenizer, vocab_size: int) -> list[bytes]:
    """The UTF-8 bytes each token id ``0 .. vocab_size-1`` adds to a text (``b""`` for special and padding ids).

    Raises:
        ValueError: the tokenizer cannot turn ids into text (no ``decode`` / ``convert_ids_to_tokens``,
            or decoding fails).
    """
    n = min(int(vocab_size), len(tokenizer))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    out: list[bytes] = [b""] * int(vocab_size)
    try:
        if _is_byte_level(tokenizer):
            strs = tokenizer.convert_ids_to_tokens(list(range(n)))
            inv = _byte_decoder()
            for i, s in enumerate(strs):
                if i in special or s is None:
                    continue
                if i in added:
                    out[i] = tokenizer.decode([i], skip_special_tokens=True).encode("utf-8")
                    continue
                try:
                    out[i] = bytes(inv[c] for c in s)
                except KeyError:
                    out[i] = tokenizer.decode([i], skip_special_tokens=True).encode("utf-8")
            return out
        anchor = tokenizer.encode("a", add_special_tokens=False)
        a_text = tokenizer.decode(anchor, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        texts = tokenizer.batch_decode([anchor + [i] for i in range(n)], skip_special_tokens=True,
                                       clean_up_tokenization_spaces=False)
        strs = tokenizer.convert_ids_to_tokens(list(range(n)))
    except Exception as exc:
        raise ValueError(f"tokenizer: cannot decode its tokens to text for the text check "
                         f"({type(exc).__name__}: {exc})") from exc
    for i, (t, s) in enumerate(zip(texts, strs)):
        if i in special:
            continue
        m = _BYTE_TOKEN.match(s or "")
        if m is not None:
            out[i] = bytes([int(m.group(1), 16)])
        elif t.startswith(a_text):
            out[i] = t[len(a_text):].encode("utf-8")
        else:
            out[i] = tokenizer.decode([i], skip_special_tokens=True,
                                      clean_up_tokenization_spaces=False).encode("utf-8")
    return out


def _char_len(lead: int) -> int:
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0        # continuation or invalid lead


def bytes_slots(b: bytes, alphabet: CharAlphabet, memo: dict | None = None) -> tuple[bytes, list[int], bytes]:
    """``(head, classes, tail)`` of one token's bytes: leading UTF-8 continuation bytes, the classes
    of its complete characters (runs shortened, see the module docstring), an unfinished character.

    ``memo`` (character -> its classes) may be shared between calls with one alphabet (build speed)."""
    if memo is None:
        memo = {}

    def char_classes(ch: str) -> list[int]:
        cl = memo.get(ch)
        if cl is None:
            cl = memo[ch] = alphabet.classes(fold_char(ch))
        return cl

    if b.isascii():                         # no partial characters: the common case, quickly
        try:
            out = [c for ch in b.decode("ascii") for c in memo[ch]]
        except KeyError:
            out = [c for ch in b.decode("ascii") for c in char_classes(ch)]
        return b"", _shorten(out, alphabet), b""
    i, n = 0, len(b)
    while i < n and 0x80 <= b[i] <= 0xBF and i < 3:
        i += 1
    head = b[:i]
    out: list[int] = []
    tail = b""
    while i < n:
        L = _char_len(b[i])
        if L == 0:
            out.append(OTHER_NONWORD)
            i += 1
            continue
        if i + L > n:                       # unfinished character: raw bytes for the next token
            tail = b[i:]
            if any(not 0x80 <= x <= 0xBF for x in tail[1:]):
                out.append(OTHER_NONWORD)
                tail = b""
            break
        try:
            ch = b[i:i + L].decode("utf-8")
        except UnicodeDecodeError:
            out.append(OTHER_NONWORD)
            i += 1
            continue
        out.extend(char_classes(ch))
        i += L
    return head, _shorten(out, alphabet), tail


_SEPS = (SEP, PSEP, USEP)


def _shorten(out: list[int], alphabet: CharAlphabet) -> list[int]:
    """Drop the slots of runs that cannot change the automaton (see the module docstring)."""
    if all(a != b and not (a in _SEPS and b in _SEPS) for a, b in zip(out, out[1:])):
        return out                          # no two neighbours alike: nothing to drop
    res: list[int] = []
    cap = alphabet.run_cap
    for c in out:
        if res and (c == res[-1] == OTHER_NONWORD or c in _SEPS and res[-1] in _SEPS):
            continue                        # later separators of a run change nothing (its first decides)
        n = cap[c]
        if n and len(res) >= n and all(x == c for x in res[-n:]):
            continue                        # longer than any entity's run of c (+1): the state is stable
        if alphabet.is_word[c] and not alphabet.plain_repeat[c] and len(res) >= 4 and res[-1] == res[-2] == res[-3] \
                == res[-4] == c:
            continue                        # a 5th repeat of a letter and later ones are nothing (SQ4 is the 4th)
        res.append(c)
    return res


def partial_char_fields(heads, tails, has_body, rows: int) -> dict[str, np.ndarray]:
    """The UTF-8 bookkeeping of tokens that split characters, one entry per token (``rows`` >= the
    number of tokens; the rows past them stay zero).

    Args:
        heads: per token, its leading continuation bytes (the end of a character begun before).
        tails: per token, its unfinished last character (lead byte + the continuation bytes present).
        has_body: per token, whether it has complete characters of its own.

    Returns:
        ``{"head_n", "head_bits", "tail_n", "tail_bits", "tail_need", "body"}``, each ``[rows]``
        int64: byte counts, the bytes' payload bits, the continuation bytes the tail still needs,
        and 1 when the token has complete characters or an unfinished one.
    """
    f = {k: np.zeros(rows, np.int64) for k in ("head_n", "head_bits", "tail_n", "tail_bits", "tail_need", "body")}
    for i, (head, tail) in enumerate(zip(heads, tails)):
        if head:
            f["head_n"][i] = len(head)
            bits = 0
            for x in head:
                bits = (bits << 6) | (x & 0x3F)
            f["head_bits"][i] = bits
        if tail:
            lead = tail[0]
            bits = lead & (0x1F if lead < 0xE0 else 0x0F if lead < 0xF0 else 0x07)
            for x in tail[1:]:
                bits = (bits << 6) | (x & 0x3F)
            f["tail_n"][i] = len(tail)
            f["tail_bits"][i] = bits
            f["tail_need"][i] = (2 if lead < 0xE0 else 3 if lead < 0xF0 else 4) - len(tail)
        f["body"][i] = int(bool(has_body[i]) or bool(tail))
    return f


def token_slots(tokenizer, vocab_size: int, alphabet: CharAlphabet,
                token_bytes_list: list[bytes] | None = None) -> dict[str, np.ndarray]:
    """The per-token tables of the device text check (cached by :func:`fastsafe.safety.text_tables.text_tables`).

    ``token_bytes_list``: ``token_bytes(tokenizer, vocab_size)`` when the caller already has it.

    Returns:
        ``{"slots": [V + 1, max_len] int32 classes (``alphabet.num_classes`` = none; row ``V`` is
        the empty row of out-of-range ids), "head_n", "head_bits": leading continuation bytes and
        their 6-bit groups, "tail_n", "tail_bits", "tail_need": an unfinished character (its bits
        and the continuation bytes it still needs), "body": 1 when the token has complete
        characters or an unfinished one (it ends a pending character)}``, each ``[V + 1]`` int64.
    """
    V = int(vocab_size)
    memo = {chr(i): alphabet.classes(fold_char(chr(i))) for i in range(128)}
    if token_bytes_list is None:
        token_bytes_list = token_bytes(tokenizer, V)
    parts = [bytes_slots(b, alphabet, memo) for b in token_bytes_list]
    L = max([len(p[1]) for p in parts] + [1])
    none = alphabet.num_classes
    slots = np.full((V + 1, L), none, np.int32)
    for i, (_, body, _) in enumerate(parts):
        if body:
            slots[i, :len(body)] = body
    f = partial_char_fields([p[0] for p in parts], [p[2] for p in parts], [bool(p[1]) for p in parts], V + 1)
    f["slots"] = slots
    return f
