"""fastsafe.data.compose_mix: counts at the ratios, determinism, lists and HF datasets, bad input."""
import pytest

from fastsafe.data import DEFAULT_RATIOS, PAPER_RATIO_RANGES, compose_mix, parse_ratio


def rows(prefix, n):
    return [{"prompt": f"{prefix}{i}", "chosen": "c", "rejected": "r"} for i in range(n)]


GENERAL, EHD, IHD, MHD = rows("g", 600), rows("e", 50), rows("i", 30), rows("m", 10)


def test_counts_follow_ratios_and_tags():
    mix, counts = compose_mix(GENERAL, ehd=EHD, ihd=IHD, mhd=MHD,
                              ratios={"ehd": "1:30", "ihd": (1, 60), "mhd": 0.01}, seed=3)
    assert counts == {"general": 600, "ehd": 20, "ihd": 10, "mhd": 6, "total": 636}
    assert len(mix) == 636
    by_cat = {}
    for r in mix:
        by_cat.setdefault(r["category"], []).append(r["prompt"])
    assert {k: len(v) for k, v in by_cat.items()} == {"general": 600, "ehd": 20, "ihd": 10, "mhd": 6}
    assert all(p.startswith("e") for p in by_cat["ehd"]) and len(set(by_cat["ehd"])) == 20  # no repeats
    assert sorted(by_cat["general"]) == sorted(r["prompt"] for r in GENERAL)
    assert "category" not in GENERAL[0]  # inputs are not modified


def test_defaults_are_inside_paper_ranges():
    for cat, (lo, hi) in PAPER_RATIO_RANGES.items():
        assert lo <= DEFAULT_RATIOS[cat] <= hi
    _, counts = compose_mix(GENERAL, ehd=EHD, ihd=IHD, mhd=MHD)
    assert counts == {"general": 600, "ehd": 24, "ihd": 8, "mhd": 6, "total": 638}


def test_deterministic_with_seed_and_seed_matters():
    a, _ = compose_mix(GENERAL, ehd=EHD, ihd=IHD, seed=1)
    b, _ = compose_mix(GENERAL, ehd=EHD, ihd=IHD, seed=1)
    c, _ = compose_mix(GENERAL, ehd=EHD, ihd=IHD, seed=2)
    assert [r["prompt"] for r in a] == [r["prompt"] for r in b]
    assert [r["prompt"] for r in a] != [r["prompt"] for r in c]
    d, _ = compose_mix(GENERAL, ehd=EHD, seed=1, shuffle=False, category_column=None)
    assert [r["prompt"] for r in d[:600]] == [r["prompt"] for r in GENERAL] and "category" not in d[0]


def test_oversample_and_not_enough_data():
    with pytest.raises(ValueError, match="ihd: the ratio asks for 12 examples but only 3"):
        compose_mix(GENERAL, ihd=IHD[:3], ratios={"ihd": 1 / 50})
    mix, counts = compose_mix(GENERAL, ihd=IHD[:3], ratios={"ihd": 1 / 50}, oversample=True)
    got = [r["prompt"] for r in mix if r["category"] == "ihd"]
    assert counts["ihd"] == 12 and len(got) == 12 and sorted(set(got)) == ["i0", "i1", "i2"]
    assert all(got.count(p) == 4 for p in set(got))  # whole copies first: balanced repeats


def test_hf_datasets_in_and_out_same_order_as_lists():
    datasets = pytest.importorskip("datasets")
    g = datasets.Dataset.from_list(GENERAL[:200])
    e = datasets.Dataset.from_list(EHD)
    mix, counts = compose_mix(g, ehd=e, ihd=IHD, ratios={"ehd": "1:20", "ihd": "1:50"}, seed=5)
    assert isinstance(mix, datasets.Dataset)
    assert counts == {"general": 200, "ehd": 10, "ihd": 4, "mhd": 0, "total": 214}
    assert mix.column_names == ["prompt", "chosen", "rejected", "category"]
    lst, _ = compose_mix(GENERAL[:200], ehd=EHD, ihd=IHD, ratios={"ehd": "1:20", "ihd": "1:50"}, seed=5)
    assert mix["prompt"] == [r["prompt"] for r in lst]
    assert mix["category"] == [r["category"] for r in lst]


def test_parse_ratio():
    assert parse_ratio("ehd", "1:25") == pytest.approx(0.04)
    assert parse_ratio("ehd", (1, 50)) == pytest.approx(0.02)
    assert parse_ratio("ehd", 0.5) == 0.5
    for bad in ("1/30", "1:0", "a:b", "-1:3"):
        with pytest.raises(ValueError, match=r"ratios\['ehd'\]"):
            parse_ratio("ehd", bad)
    with pytest.raises(TypeError, match=r"ratios\['ehd'\]"):
        parse_ratio("ehd", [1, 30])


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(ratios={"xhd": 0.1}), ValueError, "ratios: expected keys"),
    (dict(ratios={"mhd": 0.1}), ValueError, r"ratios\['mhd'\]: given, but mhd=None"),
    (dict(ehd="not data"), TypeError, "ehd: expected a datasets.Dataset or a list of dicts"),
    (dict(ehd=[1, 2]), TypeError, "item 0"),
    (dict(ehd=rows("e", 50), ratios={"ehd": -0.1}), ValueError, ">= 0"),
    (dict(ehd=rows("e", 50), category_column="prompt"), ValueError, "category_column"),
    (dict(seed="0"), TypeError, "seed"),
])
def test_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        compose_mix(GENERAL, **kwargs)
    with pytest.raises(TypeError, match="general"):
        compose_mix("x")
