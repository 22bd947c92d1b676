"""Training-mix composition: general data plus explicit / implicit / mixed harmful data at set ratios.

The *Truly Safe & Truly Helpful* paper identifies three kinds of harmful training data and
recommends mixing them with general data at (harmful : general) ratios of

==========  ===================================  =======================
category    meaning                              paper's recommendation
==========  ===================================  =======================
``ehd``     explicit harmful data                1:30 to 1:20
``ihd``     implicit harmful data                1:100 to 1:50
``mhd``     mixed harmful data                   1:100
==========  ===================================  =======================

:func:`compose_mix` draws ``round(len(general) * ratio)`` examples of each category (without
replacement, unless ``oversample=True``), tags every example with its category, shuffles, and
reports the counts. It is deterministic for a given ``seed`` and accepts Hugging Face
``datasets.Dataset`` objects or lists of dicts.
"""
from __future__ import annotations

import logging
import numbers
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["compose_mix", "DataMix", "CATEGORIES", "DEFAULT_RATIOS", "PAPER_RATIO_RANGES", "parse_ratio"]

logger = logging.getLogger(__name__)

CATEGORIES = ("ehd", "ihd", "mhd")
#: The paper's recommended (harmful : general) ratio ranges.
PAPER_RATIO_RANGES = {"ehd": (1 / 30, 1 / 20), "ihd": (1 / 100, 1 / 50), "mhd": (1 / 100, 1 / 100)}
#: Defaults, inside the paper's ranges: EHD 1:25, IHD 1:75, MHD 1:100.
DEFAULT_RATIOS = {"ehd": 1 / 25, "ihd": 1 / 75, "mhd": 1 / 100}

Ratio = Union[float, str, Tuple[float, float]]


class DataMix(NamedTuple):
    """Result of :func:`compose_mix`: the mixed ``data`` and the ``counts`` per category (+ ``"total"``)."""

    data: Any
    counts: Dict[str, int]


def parse_ratio(name: str, value: Ratio) -> float:
    """A (harmful : general) ratio as a float: ``0.04``, ``"1:25"`` or ``(1, 25)``."""
    if isinstance(value, str):
        parts = value.split(":")
        try:
            a, b = (float(p) for p in parts) if len(parts) == 2 else (None, None)
        except ValueError:
            a = b = None
        if a is None or b is None or b <= 0 or a < 0:
            raise ValueError(f"ratios[{name!r}]: expected 'a:b' with a >= 0 and b > 0 (e.g. '1:30'), got {value!r}")
        return a / b
    if isinstance(value, tuple) and len(value) == 2:
        return parse_ratio(name, f"{value[0]}:{value[1]}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(float(value)):
        raise TypeError(f"ratios[{name!r}]: expected a number, 'a:b' string or (a, b) tuple, got {value!r}")
    if float(value) < 0:
        raise ValueError(f"ratios[{name!r}]: expected a ratio >= 0, got {value}")
    return float(value)


def _is_hf_dataset(x) -> bool:
    return hasattr(x, "select") and hasattr(x, "column_names") and hasattr(x, "features")


def _check_source(name: str, src) -> int:
    if _is_hf_dataset(src):
        return len(src)
    if isinstance(src, (list, tuple)):
        for i, row in enumerate(src):
            if not isinstance(row, Mapping):
                raise TypeError(f"{name}: expected a datasets.Dataset or a list of dicts, got a list whose item {i} "
                                f"is a {type(row).__name__}")
        return len(src)
    raise TypeError(f"{name}: expected a datasets.Dataset or a list of dicts, got {type(src).__name__}")


def _draw(rng: np.random.Generator, n_have: int, n_want: int, oversample: bool, name: str) -> np.ndarray:
    if n_want <= n_have:
        return rng.permutation(n_have)[:n_want]
    if not oversample:
        raise ValueError(f"{name}: the ratio asks for {n_want} examples but only {n_have} are available; "
                         f"pass oversample=True to repeat examples, lower the ratio, or add data")
    if n_have == 0:
        raise ValueError(f"{name}: the ratio asks for {n_want} examples but the dataset is empty")
    reps, rest = divmod(n_want, n_have)
    parts = [rng.permutation(n_have) for _ in range(reps)] + [rng.permutation(n_have)[:rest]]
    return np.concatenate(parts)


def _rows(src, idx: Sequence[int]) -> List[dict]:
    if _is_hf_dataset(src):
        sub = src.select([int(i) for i in idx])
        return [dict(r) for r in sub]
    return [dict(src[int(i)]) for i in idx]


def compose_mix(general, *, ehd=None, ihd=None, mhd=None, ratios: Optional[Mapping[str, Ratio]] = None,
                seed: int = 0, shuffle: bool = True, oversample: bool = False,
                category_column: Optional[str] = "category") -> DataMix:
    """Compose a training set of general data plus harmful data of three kinds at given ratios.

    Args:
        general: the general (helpful) data: a ``datasets.Dataset`` or a list of dicts.
        ehd, ihd, mhd: explicit / implicit / mixed harmful data (same kinds; ``None`` to leave out).
        ratios: (harmful : general) ratio per category, as a float (``1/30``), an ``"a:b"`` string
            (``"1:30"``) or an ``(a, b)`` tuple. Categories not listed use :data:`DEFAULT_RATIOS`
            (EHD 1:25, IHD 1:75, MHD 1:100, inside the paper's ranges). A ratio for a category
            with no data is an error.
        seed: makes the draw and the shuffle deterministic.
        shuffle: shuffle the final mix (else: general first, then ehd, ihd, mhd).
        oversample: repeat harmful examples when a ratio asks for more than there are (else ValueError).
        category_column: name of the column tagging each example with ``"general"``, ``"ehd"``,
            ``"ihd"`` or ``"mhd"`` (``None``: no tag). Must not already exist in the data.

    Returns:
        :class:`DataMix` ``(data, counts)``: ``data`` is a ``datasets.Dataset`` when ``general``
        is one, else a list of dicts (shallow copies); ``counts`` maps each category and
        ``"total"`` to a number of examples. The counts are also logged at INFO level.

    Example:
        >>> general = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(300)]
        >>> harmful = [{"prompt": f"h{i}", "chosen": "refuse", "rejected": "comply"} for i in range(40)]
        >>> mix, counts = compose_mix(general, ehd=harmful, ratios={"ehd": "1:30"}, seed=0)
        >>> counts
        {'general': 300, 'ehd': 10, 'ihd': 0, 'mhd': 0, 'total': 310}
    """
    sources = {"ehd": ehd, "ihd": ihd, "mhd": mhd}
    ratios = dict(ratios or {})
    for key in ratios:
        if key not in CATEGORIES:
            raise ValueError(f"ratios: expected keys among {CATEGORIES}, got {key!r}")
        if sources[key] is None:
            raise ValueError(f"ratios[{key!r}]: given, but {key}=None (no {key.upper()} data to mix in)")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    n_general = _check_source("general", general)
    as_hf = _is_hf_dataset(general)

    base_cols = set(general.column_names) if as_hf else (set(general[0]) if n_general else None)
    if category_column is not None and base_cols is not None and category_column in base_cols:
        raise ValueError(f"category_column: {category_column!r} is already a column of general; pass another "
                         f"name or category_column=None")

    counts = {"general": n_general}
    picked: Dict[str, Tuple[Any, np.ndarray]] = {}
    for i, cat in enumerate(CATEGORIES):
        src = sources[cat]
        if src is None:
            counts[cat] = 0
            continue
        n_have = _check_source(cat, src)
        ratio = parse_ratio(cat, ratios.get(cat, DEFAULT_RATIOS[cat]))
        n_want = int(round(n_general * ratio))
        rng = np.random.default_rng([int(seed), i + 1])
        picked[cat] = (src, _draw(rng, n_have, n_want, oversample, cat))
        counts[cat] = n_want
    counts["total"] = sum(counts[c] for c in ("general",) + CATEGORIES)

    order = np.arange(counts["total"])
    if shuffle:
        order = np.random.default_rng([int(seed), 0]).permutation(counts["total"])

    if as_hf:
        data = _compose_hf(general, picked, category_column, order)
    else:
        rows = [dict(r) for r in general]
        tags = ["general"] * len(rows)
        for cat in CATEGORIES:
            if cat in picked:
                src, idx = picked[cat]
                new = _rows(src, idx)
                rows += new
                tags += [cat] * len(new)
        if category_column is not None:
            for r, tag in zip(rows, tags):
                if category_column in r and tag != "general":
                    raise ValueError(f"category_column: {category_column!r} is already a key of the {tag} data")
                r[category_column] = tag
        data = [rows[int(j)] for j in order]
    logger.info("compose_mix: %s", ", ".join(f"{k}={v}" for k, v in counts.items()))
    return DataMix(data, counts)


def _compose_hf(general, picked, category_column, order):
    from datasets import Dataset, concatenate_datasets

    parts = []

    def tag(ds, name):
        if category_column is None:
            return ds
        if category_column in ds.column_names:
            raise ValueError(f"category_column: {category_column!r} is already a column of the {name} data")
        return ds.add_column(category_column, [name] * len(ds))

    parts.append(tag(general, "general"))
    for cat in CATEGORIES:
        if cat not in picked:
            continue
        src, idx = picked[cat]
        sub = src.select([int(i) for i in idx]) if _is_hf_dataset(src) else Dataset.from_list(_rows(src, idx))
        if set(sub.column_names) != set(general.column_names) and len(sub):
            raise ValueError(f"{cat}: expected the columns of general {sorted(general.column_names)}, got "
                             f"{sorted(sub.column_names)}")
        if len(sub):
            sub = sub.cast(general.features) if sub.features != general.features else sub
            parts.append(tag(sub, cat))
    mixed = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return mixed.select([int(j) for j in order])
