"""Regex entities on a linear-time engine (RE2, from the ``google-re2`` package).

Python's ``re`` backtracks: ``(a+)+b`` against a run of ``a`` takes time exponential in the run's
length, so one hostile regex entity could stall every decoding step. RE2 matches in time linear
in the text (and bounded memory), whatever the pattern; patterns that need backtracking
(backreferences ``\\1``, lookahead / lookbehind ``(?=...)``, possessive quantifiers) do not compile
and are rejected with a clear message when the entity is added.

Syntax notes (RE2, not ``re``): ``\\d``, ``\\w``, ``\\s`` and ``\\b`` are ASCII; use ``\\pL`` (any
letter), ``\\pN`` (any number) or ``[[:alpha:]]`` for Unicode classes; ``(?i)`` makes a pattern
case-insensitive.

>>> pat = compile_regex(r"\\d{3}-\\d{4}")
>>> bool(pat.search("call 555-1234"))
True
>>> compile_regex(r"(a)\\1")                              # doctest: +IGNORE_EXCEPTION_DETAIL
Traceback (most recent call last):
ValueError: phrase: regular expression '(a)\\\\1' is not supported by the linear-time engine ...
"""
from __future__ import annotations

import functools

__all__ = ["compile_regex", "RE2_MAX_MEM"]

#: Memory cap of one compiled pattern (bytes); larger patterns are rejected (bounded per-step cost).
RE2_MAX_MEM = 8 << 20


def _re2():
    try:
        import re2
    except ImportError:  # pragma: no cover - a declared dependency
        raise ImportError("regex entities need the google-re2 package (linear-time matching): "
                          "pip install google-re2") from None
    return re2


@functools.lru_cache(maxsize=4096)
def compile_regex(pattern: str, name: str = "phrase"):
    """Compile ``pattern`` with RE2; ``ValueError`` (naming ``name``) if it cannot be used.

    Args:
        pattern: the regular expression (RE2 syntax, see the module docstring).
        name: the argument name used in error messages.

    Returns:
        a compiled RE2 pattern (``search``, ``finditer`` like ``re``), cached per pattern.

    Raises:
        TypeError: ``pattern`` is not a str.
        ValueError: RE2 cannot compile it (syntax, backtracking-only features, too large), or it
            matches the empty string (it would block every candidate).
    """
    if not isinstance(pattern, str):
        raise TypeError(f"{name}: expected a regular expression str, got {type(pattern).__name__}")
    try:
        pattern.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name}: regular expression {pattern!r} contains unpaired surrogates "
                         f"(not valid Unicode text)") from None
    if not pattern:
        raise ValueError(f"{name}: regular expression {pattern!r} matches the empty string")
    re2 = _re2()
    opts = re2.Options()
    opts.log_errors = False
    opts.max_mem = RE2_MAX_MEM
    try:
        pat = re2.compile(pattern, opts)
    except re2.error as exc:
        msg = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise ValueError(f"{name}: regular expression {pattern!r} is not supported by the linear-time engine "
                         f"(RE2: {msg}); backreferences and lookaround need backtracking, which could stall "
                         f"generation, so they are not accepted (invalid regular expression?)") from None
    if pat.search("") is not None:
        raise ValueError(f"{name}: regular expression {pattern!r} matches the empty string")
    return pat
