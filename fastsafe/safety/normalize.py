"""Unicode normalisation for text-level entity matching.

Entities and generated text are compared after the *same* folding, so a listed ``"b0mb"`` and a
listed ``"bomb"`` both catch ``"B0MB"``, ``"b\\u200bomb"`` and ``"ｂｏｍｂ"``.

:func:`normalize_text` applies, in this order:

1. **NFKC** (compatibility composition): full-width and mathematical letters, ligatures,
   superscripts, circled letters, ... become their plain forms (``"ｂｏｍｂ"`` -> ``"bomb"``).
2. **Case folding** (``str.casefold``: ``"BOMB"`` -> ``"bomb"``, ``"ß"`` -> ``"ss"``).
3. **Diacritics removed**: NFKD, then the combining marks of the blocks U+0300-036F,
   U+1AB0-1AFF, U+1DC0-1DFF, U+20D0-20FF and U+FE20-FE2F are dropped (``"bómb"`` -> ``"bomb"``,
   "zalgo" text is cleaned). Marks of other scripts are kept.
4. **Invisible characters removed**: every character of Unicode category ``Cf`` (format:
   zero-width space/joiners, soft hyphen, word joiner, BOM, bidirectional controls, tag
   characters), ``Cn`` (unassigned, noncharacters) and ``Co`` (private use), the variation
   selectors (U+FE00-FE0F, U+E0100-E01EF), the combining grapheme joiner U+034F, the Hangul
   fillers (U+115F, U+1160, U+3164, U+FFA0) and the control characters (``Cc``) other than
   whitespace.
5. **Confusables** (only with ``confusables=True``): Cyrillic and Greek look-alikes of Latin
   letters map to the Latin letter (:data:`CONFUSABLES`; e.g. Cyrillic ``"о"`` -> ``"o"``, Greek
   ``"ρ"`` -> ``"p"``; upper-case look-alikes are covered because folding came first), plus a few
   Latin ones (dotless ``"ı"`` -> ``"i"``).
6. **Leetspeak** (only with ``leet=True``): ``0->o 1->i 3->e 4->a 5->s 7->t @->a $->s``, and
   ``l->i`` (so ``"1"`` written for either ``"i"`` or ``"l"`` matches; the fold is applied to both
   sides, so ``"kill"``, ``"k1ll"`` and ``"ki11"`` all become ``"kiii"``).
7. **Whitespace**: every run of whitespace characters becomes one ``" "``; leading and trailing
   spaces are kept (they carry word boundaries).
8. **NFC** of the result.

Not handled (by design; see the README): letters separated by punctuation or spaces
(``"b.o.m.b"``), homophones and misspellings, and transliteration between scripts.
:func:`light_normalize` (steps 1, 4, 7, 8) is what regex entities see.
"""
from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

__all__ = ["normalize_text", "light_normalize", "deleet_forms", "entity_forms", "CONFUSABLES", "LEET", "is_word_char"]

#: Cyrillic / Greek / Latin look-alikes (already case-folded) -> Latin letter.
CONFUSABLES: dict[str, str] = {
    # Cyrillic (lower case, and the lower case of upper-case look-alikes)
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o",
    "р": "p", "с": "c", "т": "t", "у": "y", "х": "x", "ѕ": "s", "і": "i", "ї": "i", "ј": "j",
    "ԁ": "d", "ԛ": "q", "ԝ": "w", "һ": "h", "ӏ": "i", "ь": "b", "ɡ": "g",
    # Greek (the lower case of upper-case look-alikes, and lower-case look-alikes)
    "α": "a", "β": "b", "ε": "e", "ζ": "z", "η": "h", "ι": "i", "κ": "k", "μ": "m", "ν": "n",
    "ο": "o", "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "ϲ": "c", "ϳ": "j",
    # Latin look-alikes
    "ı": "i", "ȷ": "j", "ℓ": "l",
}

#: Leetspeak digits and symbols -> letter (applied after confusables; ``l`` folds to ``i``).
LEET: dict[str, str] = {
    "0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "l": "i",
}

_DIACRITIC_RANGES = ((0x0300, 0x036F), (0x1AB0, 0x1AFF), (0x1DC0, 0x1DFF), (0x20D0, 0x20FF), (0xFE20, 0xFE2F))
_EXTRA_INVISIBLE = {0x034F, 0x115F, 0x1160, 0x3164, 0xFFA0}
_WS_RUN = re.compile(r"\s+")


@lru_cache(maxsize=65536)
def _drop_invisible_only(ch: str) -> bool:
    cp = ord(ch)
    if 0xFE00 <= cp <= 0xFE0F or 0xE0100 <= cp <= 0xE01EF or cp in _EXTRA_INVISIBLE:
        return True
    cat = unicodedata.category(ch)
    if cat in ("Cf", "Cn", "Co"):
        return True
    return cat == "Cc" and not ch.isspace()


@lru_cache(maxsize=65536)
def _drop(ch: str) -> bool:
    """Invisible characters and combining diacritics."""
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _DIACRITIC_RANGES) or _drop_invisible_only(ch)


_FOLD_ALL = str.maketrans({**CONFUSABLES, **LEET})
_FOLD_CONF = str.maketrans(CONFUSABLES)
_FOLD_LEET = str.maketrans(LEET)


def normalize_text(text: str, *, confusables: bool = True, leet: bool = True) -> str:
    """Fold ``text`` for entity matching (see the module docstring for the exact steps).

    Args:
        text: any string.
        confusables: map Cyrillic/Greek look-alikes to Latin letters.
        leet: fold leetspeak digits/symbols (``0 1 3 4 5 7 @ $``) and ``l`` (to ``i``).

    Returns:
        The folded string (may be shorter or longer than ``text``; positions are not preserved).

    Example:
        >>> normalize_text("B0MB"), normalize_text("b\\u200bomb"), normalize_text("ｂｏｍｂ")
        ('bomb', 'bomb', 'bomb')
        >>> normalize_text("Kill  it")
        'kiii it'
    """
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    if not text:
        return text
    t = _fold_stage(text)
    if confusables and leet:
        t = t.translate(_FOLD_ALL)
    elif confusables:
        t = t.translate(_FOLD_CONF)
    elif leet:
        t = t.translate(_FOLD_LEET)
    return _finish(t)


def _fold_stage(text: str) -> str:
    """Steps 1-4: NFKC, case folding, diacritics and invisible characters removed."""
    if text.isascii():                      # NFKC and NFKD are the identity on ASCII
        t = text.lower()
        if not t.isprintable():
            t = "".join(ch for ch in t if not _drop(ch))
        return t
    t = unicodedata.normalize("NFKC", text).casefold()
    if not t.isascii():
        t = unicodedata.normalize("NFKD", t)
        t = "".join(ch for ch in t if not _drop(ch))
    elif not t.isprintable():
        t = "".join(ch for ch in t if not _drop(ch))
    return t


def _finish(t: str) -> str:
    """Steps 7-8: whitespace runs to one space, NFC."""
    if not t.isprintable() or "  " in t:
        t = _WS_RUN.sub(" ", t)
    if not t.isascii():
        t = unicodedata.normalize("NFC", t)
    return t


def light_normalize(text: str) -> str:
    """NFKC, invisible characters removed, whitespace runs collapsed; case and letters kept.

    This is the text regex entities are matched against.

    Example:
        >>> light_normalize("ＳＳＮ:\\u200b 123-45-6789")
        'SSN: 123-45-6789'
    """
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    t = unicodedata.normalize("NFKC", text)
    if not t.isascii() or not t.isprintable():
        t = "".join(ch for ch in t if not _drop_invisible_only(ch))
    return _WS_RUN.sub(" ", t)


def is_word_char(ch: str) -> bool:
    """True for characters that form words in space-separated scripts (letters, digits, ``_``).

    Letters of scripts written without spaces (CJK ideographs, kana, Thai, ...) are *not* word
    characters here, so an entity in those scripts matches anywhere in the text.
    """
    if ch == "_":
        return True
    if not ch.isalnum():
        return False
    cp = ord(ch)
    if cp < 0x0E00:
        return True
    # Thai, Lao, Tibetan, Myanmar, Khmer; CJK, kana, Hangul, ...: no spaces between words.
    if 0x0E00 <= cp <= 0x109F or 0x1780 <= cp <= 0x17FF or 0x2E80 <= cp <= 0xDFFF or 0xF900 <= cp <= 0xFAFF \
            or 0x20000 <= cp <= 0x3FFFF:
        return False
    return True


_DELEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"})


def deleet_forms(text: str) -> list[str]:
    """Plausible plain spellings of ``text``: folded like :func:`normalize_text` but with ``l`` kept
    and leetspeak read back (``1`` as ``i``, and also as ``l`` when there is a ``1``).

    Used to tokenise extra variants of an entity (``"b0mb"`` also bans the tokens of ``"bomb"``);
    the text-level check does not need it.

    Example:
        >>> deleet_forms("K1ll"), deleet_forms("b0mb")
        (['kill', 'klll'], ['bomb'])
    """
    return entity_forms(text)[1]


def entity_forms(text: str) -> tuple[str, list[str]]:
    """``(normalize_text(text).strip(), deleet_forms(text))`` with the shared steps done once."""
    t = _fold_stage(text)
    norm = _finish(t.translate(_FOLD_ALL)).strip()
    base = _finish(t.translate(_FOLD_CONF)).strip()
    first = base.translate(_DELEET)
    out = [first]
    if "1" in base:
        alt = base.replace("1", "l").translate(_DELEET)
        if alt not in out:
            out.append(alt)
    return norm, out
