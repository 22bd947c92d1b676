"""The guardrail must not fail open (issue 12): the six reproductions, each a test, plus a fuzz test.

1. one bad entity must not switch off later updates (fail closed per entity, reported);
2. a change committed before step t starts is in force at step t (default settings, 100,000 entities);
3. no regex can stall a step (RE2, linear time);
4. fallback token ids must lie in [0, V);
5. corrupt stores refuse writes and say how to recover; foreign SQLite files are not written;
6. bad arguments get clear errors naming the argument, before any model work.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import fastsafe
from benchmarks.device_follow import filler_store
from fastsafe import SafeLogitsProcessor, SafetyConfig, TSDIBias
from fastsafe.cli import main as cli
from fastsafe.safety import LiveMatcher, PhraseMatcher, RiskEntity, RiskEntityStore, RiskStoreError
from tests.tiny_lm import entity_loving, tiny_gpt2, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _forward_counter(model):
    calls = {"n": 0}

    def pre(module, args, kwargs):
        calls["n"] += 1
    model.register_forward_pre_hook(pre, with_kwargs=True)
    return calls


def _ends_with_kill(tok, ids) -> int:
    return tok.decode(ids).lower().count("kill")


# --------------------------------------------------------------------------- 1. fail closed per entity
def test_1_bad_entity_is_skipped_and_reported_and_later_updates_stay_in_force(tok, tmp_path):
    db = tmp_path / "risk.db"
    store = RiskEntityStore(db)
    store.add("unrelated words")
    V = len(tok)
    cfg = SafetyConfig(store=store)
    live = cfg.build_matcher(tok, vocab_size=V)
    assert isinstance(live, LiveMatcher)
    store.add("99999 5", kind="token_ids")                # valid ids, but not for this vocabulary
    with pytest.warns(RuntimeWarning, match=r"not enforced.*99999 5.*outside the vocabulary \[0, %d\)" % V):
        m = live.current()
    assert m.version == store.version() and live.last_error is None
    assert [(s.entity.phrase, s.entity.kind) for s in live.skipped] == [("99999 5", "token_ids")]
    store.add("kill", category="violence", severity=3)     # an update after the bad entity
    m = live.current()
    kill = tok.encode(" kill", add_special_tokens=False)
    assert m.version == store.version()
    assert kill[-1] in m.banned_tokens(kill[:-1]) or len(kill) == 1 and kill[0] in m.banned_tokens([])
    allowed, events = m.check_candidates([tok.encode("I will", add_special_tokens=False)], [[kill[0]]])
    if len(kill) == 1:
        assert allowed.tolist() == [[False]] and events[0].entity == "kill"
    # a fresh config on that store starts (and generates without the entity), with the warning
    model = entity_loving(tiny_gpt2(seed=11), tok, ["kill"], follow=9.0, start=3.0)
    plain = fastsafe.generate(model, tok, ["the", "a"], max_new_tokens=12, do_sample=True, seed=0)
    assert any("kill" in t for t in plain.texts)
    with pytest.warns(RuntimeWarning, match="not enforced"):
        res = fastsafe.generate(model, tok, ["the", "a"], SafetyConfig(store=str(db)), max_new_tokens=12,
                                do_sample=True, seed=0)
    assert all("kill" not in t.lower() for t in res.texts)
    assert any(e.entity == "kill" for e in res.events)


def test_1_every_kind_of_uncompilable_entity_is_skipped_alone():
    class NullTokenizer:                      # a tokenizer that drops some texts entirely
        eos_token_id = None
        unk_token_id = None

        def __len__(self):
            return 50

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[] if "zzz" in t.lower() else [7, 8] for t in texts]}

    ents = [RiskEntity(1, "fine words"), RiskEntity(2, "zzz"), RiskEntity(3, "12 99", "token_ids"),
            RiskEntity(4, "3 4", "token_ids"), RiskEntity(5, r"(a)\1", "regex"), RiskEntity(6, "x+", "regex"),
            RiskEntity(7, "a b", "words"), RiskEntity(8, "\u200b", "phrase"), RiskEntity(9, "nope", "token_ids")]
    m = PhraseMatcher.build(NullTokenizer(), entities=ents, skip_invalid=True, warn=False)
    reasons = {s.entity.id: s.reason for s in m.skipped}
    assert set(reasons) == {2, 3, 5, 7, 8, 9}
    assert "tokenises to nothing" in reasons[2] and "outside the vocabulary [0, 50)" in reasons[3]
    assert "linear-time" in reasons[5] and "unknown kind" in reasons[7] and "normalisation" in reasons[8]
    assert 4 in m.banned_tokens([3]) and 8 in m.banned_tokens([1, 7])       # the valid ones are in force
    assert m.num_regexes == 1
    with pytest.raises(ValueError, match="outside the vocabulary"):            # without skip_invalid: raise
        PhraseMatcher.build(NullTokenizer(), entities=ents[2:3])
    with pytest.raises(ValueError, match="outside the vocabulary"):            # the caller's own config raises
        PhraseMatcher.build(NullTokenizer(), token_id_phrases=[[60]], skip_invalid=True)


def test_1_a_phrase_whose_normalisation_raises_is_skipped_with_one_reason_everywhere(monkeypatch):
    """PhraseMatcher.build and banned_sequences (the device matcher's token sequences) share one
    phrase-forms builder, so they skip the same entity with the same reason."""
    from fastsafe.safety import token_sequences
    from fastsafe.safety.token_sequences import banned_sequences
    real = token_sequences.entity_forms

    def forms(text):
        if text == "boom":
            raise UnicodeError("no fold")
        return real(text)
    monkeypatch.setattr(token_sequences, "entity_forms", forms)
    tok = tiny_tokenizer()
    ents = [RiskEntity(1, "fine words"), RiskEntity(2, "boom"), RiskEntity(3, "\u200b")]
    m = PhraseMatcher.build(tok, entities=ents, skip_invalid=True, warn=False)
    host = {s.entity.id: s.reason for s in m.skipped}
    assert host == {2: "cannot be normalised (UnicodeError: no fold)",
                    3: "empty after normalisation (nothing to match)"}
    seen: dict = {}
    flat, lens, owners = banned_sequences(tok, ents, len(tok), set(),
                                          fail=lambda i, why: seen.setdefault(ents[i].id, why))
    assert seen == host and set(owners.tolist()) == {0}
    assert set(m._forms) == {"fine words", "\u200b"}        # the reuse cache holds what could be normalised
    with pytest.raises(ValueError, match="entity 'boom': cannot be normalised"):
        PhraseMatcher.build(tok, entities=ents[:2])
def test_1_b_a_phrase_with_a_lone_surrogate_is_skipped_not_a_crash():
    """A phrase no tokenizer can take (a lone surrogate, e.g. from a damaged import) is skipped by
    both builders with one reason; the tokenizer's TypeError never reaches the caller."""
    from fastsafe.safety import DeviceMatcher
    tok = tiny_tokenizer()
    ents = [RiskEntity(1, "fine words"), RiskEntity(2, "bo\ud800mb"), RiskEntity(3, "a\udc00+", "regex")]
    host = PhraseMatcher.build(tok, entities=ents, skip_invalid=True, warn=False)
    dev = DeviceMatcher.build(tok, entities=ents, vocab_size=len(tok), skip_invalid=True, warn=False)
    for m in (host, dev):
        reasons = {s.entity.id: s.reason for s in m.skipped}
        assert set(reasons) == {2, 3}
        assert reasons[2].startswith("cannot be normalised (UnicodeEncodeError") and "surrogate" in reasons[3]
    fine = tok("fine words", add_special_tokens=False)["input_ids"]
    assert fine[-1] in host.banned_tokens(fine[:-1])           # the valid entity is in force
    with pytest.raises(ValueError, match="entity 'bo.*cannot be normalised"):
        PhraseMatcher.build(tok, entities=ents[:2])


# --------------------------------------------------------------------------- 2. freshness
def _big_store(path, n: int = 100_000) -> RiskEntityStore:
    """``n`` two-word filler entities over 600 made-up words (the word units tokenise once each)."""
    store = filler_store(path, n)
    assert len(store) == n
    return store


def test_2_a_change_committed_before_step_t_is_in_force_at_step_t_with_100k_entities(tok, tmp_path):
    """Default settings. The forward pre-hook runs inside the forward that computes step t's logits,
    i.e. before step t starts; the entity it commits must not be completed from step t on."""
    store = _big_store(tmp_path / "big.db")
    model = entity_loving(tiny_gpt2(seed=11), tok, ["kill"], follow=9.0, start=3.0)
    cfg = SafetyConfig(store=str(store.path))                  # defaults: poll_interval=0, background merge
    live = cfg.build_matcher(tok, vocab_size=model.get_output_embeddings().weight.shape[0],
                             eos_token_id=[tok.eos_token_id])  # the matcher generate will use (cached)
    assert len(live.current()) == 100_000
    add_at = 6                                                 # forward call 6 computes step 5's logits
    calls = {"n": 0}
    timing = {}

    def add_in_forward(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] == add_at:
            t = threading.Thread(target=lambda: RiskEntityStore(store.path).add("kill"))
            t.start()
            t.join()
            timing["committed"] = time.perf_counter()

    model.register_forward_pre_hook(add_in_forward, with_kwargs=True)
    res = fastsafe.generate(model, tok, ["the"], cfg, max_new_tokens=24)
    gen = res.new_tokens[0]
    step_t = add_at - 1
    assert len(gen) == 24
    before = _ends_with_kill(tok, gen[:step_t])
    assert before >= 1, "the model should emit the entity before it is added"
    assert _ends_with_kill(tok, gen) == before, f"entity emitted after it was committed: {tok.decode(gen)!r}"
    assert any(e.entity == "kill" and e.step >= step_t for e in res.events)
    # the same rule at the matcher level, for an add and a remove, with the measured commit-to-in-force time
    filler = store.entities()[123].phrase
    for change, check in [(lambda: store.add("bomb"), lambda m: bool(m.check_candidates(
                              [tok.encode("a", add_special_tokens=False)],
                              [[tok.encode(" bomb", add_special_tokens=False)[0]]])[1]) or
                              tok.encode(" bomb", add_special_tokens=False)[-1] in m.banned_tokens(
                              tok.encode(" bomb", add_special_tokens=False)[:-1])),
                          (lambda: store.remove(filler), lambda m: all(e.phrase != filler for e in m.entities)),
                          (lambda: store.remove("kill"), lambda m: all(e.phrase != "kill" for e in m.entities))]:
        change()
        t0 = time.perf_counter()
        m = live.current()
        in_force_s = time.perf_counter() - t0
        assert m.version == store.version() and check(m)
        print(f"commit -> in force: {in_force_s * 1000:.1f} ms ({m!r})")
    kill = tok.encode(" kill", add_special_tokens=False)
    assert kill[-1] not in live.current().banned_tokens(kill[:-1])            # the removal is in force
    assert live.wait_merged(120)                                              # and survives the merge
    m = live.current()
    assert isinstance(m, PhraseMatcher) and m.version == store.version() and len(m) == 100_000


def test_2_refresh_with_many_changes_and_purge(tok, tmp_path):
    store = RiskEntityStore(tmp_path / "r.db")
    store.add_many(["alpha", "beta", "gamma"])
    live = LiveMatcher(store, tok)
    for i in range(5):
        store.add(f"word{i}")
        store.remove("beta" if i % 2 == 0 else "gamma")
        store.add("beta" if i % 2 else "gamma")
        m = live.current()
        names = {e.phrase for e in m.entities}
        assert m.version == store.version() and {f"word{j}" for j in range(i + 1)} <= names
        assert names == {e.phrase for e in store.entities()} | set()
    store.remove("alpha")
    store.purge()                                              # the store cannot list purged rows: full build
    m = live.current()
    assert {e.phrase for e in m.entities} == {e.phrase for e in store.entities()}
    assert live.wait_merged(60)


# --------------------------------------------------------------------------- 3. regexes
_STALL_CHECK = r"""
import sys
sys.path.insert(0, sys.argv[1])
import fastsafe
from fastsafe import SafetyConfig
from fastsafe.safety import LiveMatcher, PhraseMatcher, RiskEntityStore
from tests.tiny_lm import tiny_gpt2, tiny_tokenizer
tok = tiny_tokenizer()
enc = lambda t: tok.encode(t, add_special_tokens=False)
res = fastsafe.generate(tiny_gpt2(seed=3), tok, [enc("a" * 60)], SafetyConfig(regexes=["(a+)+b"]), max_new_tokens=2)
assert len(res.new_tokens[0]) == 2
# correctness on long inputs: a 'b' after a long run of a's is a match, another letter is not
m = PhraseMatcher.build(tok, regexes=["(a+)+b"])
hist = [enc("a" * 5000)]
allowed, events = m.check_candidates(hist, [[enc("b")[0], enc("c")[0]]])
assert allowed.tolist() == [[False, True]] and [e.rule for e in events] == ["regex"], (allowed, events)
# a hostile pattern from the store: accepted (RE2 runs it in linear time) and enforced
store = RiskEntityStore(sys.argv[2])
store.add("(a+)+$", kind="regex")
allowed, _ = LiveMatcher(store, tok).current().check_candidates(hist, [[enc("a")[0], enc(" x")[0]]])
assert allowed.tolist() == [[False, True]], allowed
print("done")
"""


def test_3_no_regex_can_stall_a_step(tok, tmp_path):
    """Run in a child process with an obviously huge timeout: a backtracking engine holds the GIL and
    never finishes (9 s for 2 tokens at 22 ``a``; this prompt has 60), RE2 finishes at once."""
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run([sys.executable, "-c", _STALL_CHECK, repo, str(tmp_path / "r.db")],
                             capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("a regex entity stalled generation for more than 300 s (catastrophic backtracking)")
    assert out.returncode == 0 and out.stdout.strip().endswith("done"), out.stderr[-3000:]
    # patterns that need backtracking are refused at add time, with the reason
    store = RiskEntityStore(tmp_path / "r2.db")
    for pat in [r"(a)\1", r"(?=a)a", r"(?<!x)y"]:
        with pytest.raises(ValueError, match="linear-time engine"):
            store.add(pat, kind="regex")
    with pytest.raises(ValueError, match="linear-time engine"):
        SafetyConfig(regexes=[r"(a)\1"]).build_matcher(tok)


# --------------------------------------------------------------------------- 4. fallback ids
def test_4_fallback_ids_must_lie_in_the_vocabulary(tok):
    from fastsafe.ops import choose, safe_topk
    model = tiny_gpt2(seed=4)
    V = model.get_output_embeddings().weight.shape[0]
    calls = _forward_counter(model)
    for bad in (V, V + 1000):
        with pytest.raises(ValueError, match=rf"fallback_token_id: expected a token id in \[0, {V}\).*got {bad}"):
            fastsafe.generate(model, tok, ["Hello"], SafetyConfig(banned_phrases=["bomb"], fallback_token_id=bad),
                              max_new_tokens=2)
    with pytest.raises(ValueError, match="fallback_token_id"):
        SafetyConfig(fallback_token_id=-1)
    assert calls["n"] == 0                                    # before any model work
    out = safe_topk(torch.randn(2, 50), 3)
    for bad in (-5, -1, 2.0, True):
        with pytest.raises(ValueError, match="fallback_id"):
            choose(out, fallback_id=bad)
    proc = SafeLogitsProcessor(tok, SafetyConfig(banned_phrases=["bomb"]), eos_token_id=V + 7)
    with pytest.raises(ValueError, match=rf"eos_token_id: .*\[0, {V}\).*got {V + 7}"):
        proc(torch.tensor([[5, 6]]), torch.randn(1, V))


# --------------------------------------------------------------------------- 5. stores you can trust
def _filled(path, n: int = 3000) -> str:
    s = RiskEntityStore(path)
    s.add_many([f"phrase number {i} with some padding text" for i in range(n)])
    s.close()
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return str(path)


def test_5_a_store_overwritten_in_the_middle_refuses_writes_and_says_how_to_recover(tmp_path, capsys):
    db = _filled(tmp_path / "mid.db")
    size = os.path.getsize(db)
    with open(db, "r+b") as f:
        f.seek(size // 2)
        f.write(b"\x5a" * 8192)
    s = RiskEntityStore(db)
    assert s.damaged and "quick_check" in s.damaged
    with pytest.raises(RiskStoreError, match=r"damaged.*refused.*export rescued.jsonl.*import rescued.jsonl"):
        s.add("new phrase")
    with pytest.raises(RiskStoreError, match="damaged"):
        s.import_file(tmp_path / "nothing.txt")
    # the CLI: info says damaged, add fails with the recovery, export saves what is readable
    assert cli(["entities", "--db", db, "add", "another"]) == 1
    assert "export rescued.jsonl" in capsys.readouterr().err
    assert cli(["entities", "--db", db, "info"]) == 0
    assert "state=damaged" in capsys.readouterr().out
    rescued = str(tmp_path / "rescued.jsonl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert cli(["entities", "--db", db, "export", rescued]) == 0
    assert cli(["entities", "--db", str(tmp_path / "new.db"), "import", rescued]) == 0
    capsys.readouterr()
    n = len(RiskEntityStore(tmp_path / "new.db"))
    assert 0 < n <= 3000


def test_5_a_zeroed_index_page_refuses_writes_and_creates_no_duplicates(tmp_path):
    db = _filled(tmp_path / "idx.db")
    con = sqlite3.connect(db)
    root = con.execute("SELECT rootpage FROM sqlite_master WHERE name LIKE 'sqlite_autoindex_entities%'").fetchone()[0]
    page = con.execute("PRAGMA page_size").fetchone()[0]
    con.close()
    with open(db, "r+b") as f:
        f.seek((root - 1) * page)
        f.write(b"\0" * page)
    s = RiskEntityStore(db)
    assert s.damaged
    with pytest.raises(RiskStoreError, match="damaged"):
        s.add("phrase number 1 with some padding text")
    with pytest.raises(RiskStoreError, match="damaged"):
        s.add_many(["phrase number 2 with some padding text"])
    ents = s.entities()
    assert len(ents) == len({e.phrase for e in ents}) == 3000          # nothing duplicated, all readable


def test_5_add_refuses_a_foreign_sqlite_file_unless_asked_to_initialise_it(tmp_path, capsys):
    db = str(tmp_path / "app.db")
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE users(name TEXT)")
    con.execute("INSERT INTO users VALUES ('ann')")
    con.commit()
    con.close()
    with pytest.raises(RiskStoreError, match=r"another application.*\['users'\].*init=True"):
        RiskEntityStore(db)
    assert cli(["entities", "--db", db, "add", "make a bomb"]) == 1
    assert "--init" in capsys.readouterr().err
    con = sqlite3.connect(db)
    assert [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")] == ["users"]
    con.close()
    assert cli(["entities", "--db", db, "add", "make a bomb", "--init"]) == 0
    capsys.readouterr()
    s = RiskEntityStore(db)
    assert [e.phrase for e in s.entities()] == ["make a bomb"]
    con = sqlite3.connect(db)
    assert con.execute("SELECT name FROM users").fetchall() == [("ann",)]     # their data is untouched
    con.close()


# --------------------------------------------------------------------------- 6. bad arguments
def test_6_csv_with_an_unterminated_quote_is_an_error(tmp_path):
    s = RiskEntityStore(tmp_path / "r.db")
    f = tmp_path / "list.csv"
    f.write_text('phrase,category\nbomb,weapons\n"nerve agent,chemical\nsarin,chemical\nkill,violence\n',
                 encoding="utf-8")
    with pytest.raises(ValueError, match=r"list.csv:\d+: .*(unterminated quote|unexpected end)"):
        s.import_file(f)
    f.write_text('phrase,category\n"bomb,weapons\nsarin",chemical\nkill,violence\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"list.csv:\d+: .*spans several lines"):
        s.import_file(f)
    assert len(s) == 0


def test_6_huge_severities_are_clear_errors(tmp_path, capsys):
    db = str(tmp_path / "r.db")
    assert cli(["entities", "--db", db, "add", "bomb", "--severity", "999999999999999999999"]) == 1
    err = capsys.readouterr().err
    assert "severity: expected an integer in [0, 100], got 999999999999999999999" in err
    f = tmp_path / "l.jsonl"
    f.write_text('{"phrase": "ok"}\n{"phrase": "bomb", "severity": 1e400}\n', encoding="utf-8")
    assert cli(["entities", "--db", db, "import", str(f)]) == 1
    err = capsys.readouterr().err
    assert "l.jsonl:2: severity: expected an integer in [0, 100], got inf" in err
    s = RiskEntityStore(db)
    for bad in (1e400, float("nan"), -1, 101, 10 ** 30, "1e400"):
        with pytest.raises(ValueError, match="severity: expected an integer in"):
            s.add("bomb", severity=bad)
    assert len(s) == 0


def test_6_import_and_export_of_a_directory(tmp_path, capsys):
    db = str(tmp_path / "r.db")
    d = tmp_path / "folder"
    d.mkdir()
    assert cli(["entities", "--db", db, "add", "bomb"]) == 0
    assert cli(["entities", "--db", db, "import", str(d)]) == 1
    assert "is a directory" in capsys.readouterr().err
    assert cli(["entities", "--db", db, "export", str(d)]) == 1
    assert "is a directory" in capsys.readouterr().err
    assert not os.path.exists(str(d) + ".tmp") and os.listdir(d) == []
    assert cli(["entities", "--db", db, "export", str(tmp_path / "missing" / "x.csv")]) == 1
    assert "does not exist" in capsys.readouterr().err


def _as_other_user(fn):
    """Run ``fn`` in a child process as user 'nobody' (root ignores file permissions)."""
    pid = os.fork()
    if pid == 0:                                       # pragma: no cover - child
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            code = fn()
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_6_reads_work_in_read_only_folders_and_files(tmp_path, capsys):
    import shutil
    import tempfile
    tmp_path = __import__("pathlib").Path(tempfile.mkdtemp(prefix="fastsafe-ro-"))   # reachable by 'nobody'
    os.chmod(tmp_path, 0o755)
    folder = tmp_path / "ro"
    folder.mkdir()
    db = str(folder / "risk.db")
    s = RiskEntityStore(db)
    s.add("make a bomb", category="weapons", severity=3)
    s.close()
    os.chmod(db, 0o444)
    os.chmod(folder, 0o555)
    os.chmod(tmp_path, 0o755)
    out = str(tmp_path / "out.jsonl")

    def reads() -> int:
        from fastsafe.cli import main
        r = RiskEntityStore(db)
        assert r.read_only and [e.phrase for e in r.entities()] == ["make a bomb"] and r.version() == 1
        try:
            r.add("x")
        except RiskStoreError as exc:
            assert "read-only" in str(exc)
        else:
            return 3
        assert main(["entities", "--db", db, "list"]) == 0
        assert main(["entities", "--db", db, "info"]) == 0
        assert main(["entities", "--db", db, "add", "y"]) == 1
        return 0

    try:
        if os.geteuid() == 0:
            os.chmod(tmp_path, 0o777)
            rc = _as_other_user(reads)
        else:
            rc = reads()
        assert rc == 0
        r = RiskEntityStore(db, read_only=True)
        assert r.export(out) == 1 and r.read_only
    finally:
        os.chmod(folder, 0o755)
        os.chmod(db, 0o644)
        shutil.rmtree(tmp_path, ignore_errors=True)
    capsys.readouterr()


def test_6_tsdi_metadata_meta_tensors_inf_scores_and_prompt_ids(tok, tmp_path):
    from safetensors.torch import save_file
    path = str(tmp_path / "bias.safetensors")
    save_file({"bias_table": torch.zeros(2, 10)}, path, metadata={"vocab_size": "abc"})
    with pytest.raises(ValueError, match=r"bias.safetensors.*vocab_size: expected an integer, got 'abc'"):
        TSDIBias.load(path)
    with pytest.raises(ValueError, match="bias_table: .*meta tensor"):
        TSDIBias(torch.zeros(2, 10, device="meta"))
    model = tiny_gpt2(seed=6)
    V = model.get_output_embeddings().weight.shape[0]
    calls = _forward_counter(model)
    for bad in (V, V + 5, -1):
        with pytest.raises(ValueError, match=rf"prompts\[1\]: expected token ids in \[0, {V}\).*got {bad}"):
            fastsafe.generate(model, tok, [[5, 6], [5, bad]], max_new_tokens=2)
    assert calls["n"] == 0
    with torch.device("meta"):
        meta_model = tiny_gpt2(seed=6)
    with pytest.raises(ValueError, match="model: .*meta tensors"):
        fastsafe.generate(meta_model, tok, ["Hello"], max_new_tokens=2)
    proc = SafeLogitsProcessor(tok, SafetyConfig(banned_phrases=["bomb"]))
    scores = torch.randn(2, V)
    scores[1, 17] = float("inf")
    with pytest.raises(ValueError, match=r"scores: \+inf in rows \[1\]"):
        proc(torch.tensor([[5, 6], [7, 8]]), scores)
    with pytest.raises(ValueError, match="scores: .*meta tensor"):
        proc(torch.tensor([[5, 6]]), torch.zeros(1, V, device="meta"))
    # under sampling in Hugging Face generate: the same clear error, not a torch error
    plus_inf = lambda ids, s: s.index_fill(1, torch.tensor([17]), float("inf"))  # noqa: E731
    with pytest.raises(ValueError, match=r"scores: \+inf"):
        model.generate(input_ids=torch.tensor([[5, 6]]), max_new_tokens=2, do_sample=True,
                       logits_processor=[plus_inf, SafeLogitsProcessor(tok, SafetyConfig(banned_phrases=["b"]))])
    # and in fastsafe.generate: a model whose logits hold +inf, sampled
    hot = tiny_gpt2(seed=6)
    hot.get_output_embeddings().register_forward_hook(
        lambda mod, args, out: out.index_fill(-1, torch.tensor([17]), float("inf")))
    with pytest.raises(ValueError, match=r"logits: the model gave \+inf scores in rows \[0, 1\] at step 0"):
        fastsafe.generate(hot, tok, ["Hello", "the quick"], max_new_tokens=2, do_sample=True, seed=0)
    greedy = fastsafe.generate(hot, tok, ["Hello"], max_new_tokens=2)        # greedy: the +inf token wins
    assert greedy.new_tokens[0] == [17, 17]


# --------------------------------------------------------------------------- fuzz
_FASTSAFE_ERRORS = (ValueError, TypeError, RiskStoreError, FileNotFoundError)
_ids = st.lists(st.integers(min_value=-3, max_value=600), min_size=0, max_size=4)
_regex = st.one_of(st.sampled_from(["(a+)+$", r"(a)\1", r"\d{3}-\d{4}", "a*", "(", "b[", r"(?=x)y", "[[:alpha:]]+z",
                                    "(?i)bomb", "x{1001}", ""]),
                   st.text(alphabet="ab()+*?|[]\\^$.{}0123", min_size=0, max_size=12))
_entity = st.one_of(
    st.builds(lambda p, s: {"phrase": p, "severity": s}, st.text(max_size=20),
              st.one_of(st.integers(-5, 200), st.floats(allow_nan=True), st.text(max_size=4))),
    st.builds(lambda ids: {"phrase": ids, "kind": "token_ids"}, _ids),
    st.builds(lambda ids: {"phrase": " ".join(map(str, ids)), "kind": "token_ids"}, _ids),
    st.builds(lambda r: {"phrase": r, "kind": "regex"}, _regex),
)


def _check_build(tok, store) -> None:
    """Every active entity is either compiled into the matcher or reported as skipped."""
    v, ents = store.snapshot()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        m = PhraseMatcher.build(tok, entities=ents, version=v, skip_invalid=True)
    skipped = {s.entity.id for s in m.skipped}
    assert {e.id for e in m.entities} == {e.id for e in ents}
    for i, e in enumerate(m.entities):
        if e.id in skipped:
            continue
        if e.kind == "token_ids":
            ids = e.token_ids()
            assert ids[-1] in m.banned_tokens(ids[:-1]) or ids == [tok.eos_token_id], e
        elif e.kind == "regex":
            assert any(j == i for _, j in m._regexes), e
        else:
            assert i in m._text_map.values() or any(m._text_map.get(k) is not None for k in [
                m._forms[e.phrase][0]]), e


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(rows=st.lists(_entity, max_size=6))
def test_fuzz_add_many_and_build(tok, tmp_path_factory, rows):
    store = RiskEntityStore(tmp_path_factory.mktemp("fz") / "r.db")
    n0 = len(store)
    try:
        store.add_many(rows)
    except _FASTSAFE_ERRORS as exc:
        assert "rows[" in str(exc)
        assert len(store) == n0                               # all or nothing
    else:
        assert len(store) >= 1 or not rows                    # the rows landed
    _check_build(tok, store)
    store.close()


_line = st.one_of(st.text(max_size=30), st.sampled_from(['"', '"abc', 'a,"b', "\x00", "\ud800", "1e400", "#x"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(fmt=st.sampled_from(["csv", "jsonl", "txt"]), lines=st.lists(_line, max_size=6),
       objs=st.lists(_entity, max_size=4), raw=st.binary(max_size=40))
def test_fuzz_import_bytes(tok, tmp_path_factory, fmt, lines, objs, raw):
    d = tmp_path_factory.mktemp("fi")
    store = RiskEntityStore(d / "r.db")
    path = d / f"in.{fmt}"
    if fmt == "csv":
        body = "phrase,severity,kind\n" + "\n".join(lines)
    elif fmt == "jsonl":
        body = "\n".join([json.dumps(o) for o in objs] + lines)
    else:
        body = "\n".join(lines)
    data = body.encode("utf-8", "surrogatepass") + raw
    path.write_bytes(data)
    try:
        n = store.import_file(path)
    except _FASTSAFE_ERRORS as exc:
        assert str(path) in str(exc) or "in." in str(exc)     # the message names the file
        assert len(store) == 0                                # nothing half-imported
    else:
        assert n == len(store)
        if fmt == "txt":                                      # no line lost without a report
            text = data.decode("utf-8-sig")
            want = {s.strip() for s in text.splitlines() if s.strip() and not s.strip().startswith("#")}
            assert {e.phrase for e in store.entities()} == want
    _check_build(tok, store)
    store.close()
