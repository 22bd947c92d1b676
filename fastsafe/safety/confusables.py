"""Look-alike characters from Unicode's confusables data (UTS #39), folded to Latin letters and digits.

The data is the ``confusables.json`` that the ``confusable-homoglyphs`` package ships (generated
from Unicode's ``confusables.txt``): for each character, the characters that look like it. Only
single non-ASCII letters and digits that look like one ASCII letter or digit are folded (``"о"``
-> ``"o"``, ``"ѕ"`` -> ``"s"``, ``"𝐛"`` -> ``"b"``; symbols such as ``"×"`` are not, so word
boundaries never move); ASCII is never changed, so English text
folds exactly as :func:`~fastsafe.safety.normalize.normalize_text` folds it. Where a character
looks like several letters, the first lower-case letter in ``a..z`` wins, then digits.
"""
from __future__ import annotations

import json
import os
import string
from functools import lru_cache

__all__ = ["confusable_map"]


@lru_cache(maxsize=1)
def confusable_map() -> dict[str, str]:
    """``{look-alike char: ascii letter or digit}`` (lower case), from UTS #39 data.

    Raises:
        ImportError: ``confusable-homoglyphs`` is not installed (``pip install confusable-homoglyphs``).

    Example:
        >>> confusable_map()["\\u0455"]          # CYRILLIC SMALL LETTER DZE
        's'
    """
    try:
        import confusable_homoglyphs
    except ImportError as exc:  # pragma: no cover - dependency of fastsafe
        raise ImportError("confusable-homoglyphs is required for the device matcher's look-alike folding: "
                          "pip install confusable-homoglyphs") from exc
    path = os.path.join(os.path.dirname(confusable_homoglyphs.__file__), "confusables.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    out: dict[str, str] = {}
    order = list(string.ascii_lowercase) + list(string.ascii_uppercase) + list(string.digits)
    for target in order:
        for entry in data.get(target, ()):
            c = entry.get("c", "").replace("\u200e", "").replace("\u200f", "")
            # letters and digits only: a symbol that looks like a letter ("×", "∨") stays a non-word
            # character, so folding never moves a word boundary
            if len(c) == 1 and ord(c) >= 0x80 and c.isalnum() and c not in out:
                out[c] = target.lower()
    return out
