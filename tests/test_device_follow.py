"""The device matcher follows a risk-entity store: background builds, exact swaps between steps,
freshness, a failing build keeps the old matcher (SafetyConfig(matcher="device", store=...))."""
from __future__ import annotations

import random
import threading
import time

import pytest
import torch

import fastsafe
from fastsafe import SafetyConfig
from fastsafe.safety import DeviceMatcher, RiskEntityStore
from fastsafe.safety.device_follow import FixedDeviceMatcher, LiveDeviceMatcher, RowStates
from tests.tiny_lm import entity_loving, tiny_gpt2, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _kills(tok, ids) -> int:
    return tok.decode(ids).lower().count("kill")


def _kill_ban(dm, tok) -> bool:
    """True when the device matcher ``dm`` blocks " kill" after "I will" (token ban or text check)."""
    pre = tok.encode("I will", add_special_tokens=False)
    kill = tok.encode(" kill", add_special_tokens=False)
    st = dm.state_from_histories([pre + kill[:-1]])
    ok, _ = dm.check_candidates(st, torch.tensor([[kill[-1]]]))
    return not bool(ok[0, 0])


def _commit_at(model, store_path, calls_at: int, change):
    """Run ``change(store)`` (from another thread, a writer of its own) in forward call ``calls_at``,
    i.e. before the step that call's logits feed starts."""
    calls = {"n": 0}

    def pre(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] == calls_at:
            t = threading.Thread(target=lambda: change(RiskEntityStore(store_path)))
            t.start()
            t.join()
    model.register_forward_pre_hook(pre, with_kwargs=True)


def test_row_states_swap_equals_deriving_the_full_histories(tok, tmp_path):
    """After advances and row selections, the swapped state is the new matcher's state of the whole histories."""
    store = RiskEntityStore(tmp_path / "r.db")
    store.add("bomb")
    live = LiveDeviceMatcher(store, tok, vocab_size=len(tok), background=True)
    rows = RowStates(live)
    rng = random.Random(0)
    hist = [[rng.randrange(len(tok)) for _ in range(rng.randint(1, 9))] for _ in range(5)]
    dm, state = rows.start(hist)
    assert dm is live.current() and torch.equal(state, dm.state_from_histories(hist))
    store.add("kill")
    store.add("nerve agent")
    for step in range(12):
        t = [rng.randrange(len(tok)) for _ in hist]
        state = rows.advance(dm, state, torch.tensor(t))
        for h, x in zip(hist, t):
            h.append(x)
        if step in (3, 7):                                    # rows leave / reorder
            keep = sorted(rng.sample(range(len(hist)), len(hist) - 1), reverse=True)
            state = rows.select(state, torch.tensor(keep))
            hist = [hist[i] for i in keep]
        dm, state = rows.poll(dm, state)
        if step == 1:
            assert live.wait_for(store.version(), 60)
        if step == 5:
            assert rows.wait(60)
    assert rows.last_error is None
    assert dm.version == store.version() and rows.swaps == [(1, 3)]
    assert torch.equal(state, dm.state_from_histories(hist))
    assert _kill_ban(dm, tok)


@pytest.mark.parametrize("background", [False, True])
def test_entity_added_mid_generation_is_banned_from_the_next_steps(tok, tmp_path, monkeypatch, background):
    """background=False: committed before step t => in force at step t (the host path's rule).
    Default (background): in force from the step of the swap on (build + re-derivation done)."""
    db = tmp_path / "r.db"
    store = RiskEntityStore(db)
    store.add("unrelated words")
    model = entity_loving(tiny_gpt2(seed=11), tok, ["kill"], follow=9.0, start=3.0)
    add_at = 6                                                 # forward call 6 computes step 5's logits
    _commit_at(model, db, add_at, lambda s: s.add("kill", category="violence", severity=3))
    swaps, sources = [], []
    poll = RowStates.poll

    def spy(self, matcher, state):                             # the step (advances so far) of each swap
        sources.append(self.source)
        new, st = poll(self, matcher, state)
        if new is not matcher:
            swaps.append(sum(kind == "advance" for kind, _ in self._log))
        return new, st
    monkeypatch.setattr(RowStates, "poll", spy)
    if background:                                             # let the build finish during step 5's forward
        _commit_at(model, db, add_at + 1, lambda s: sources[-1].wait_for(store.version(), 60))
    cfg = SafetyConfig(store=str(db), matcher="device", matcher_options={"background": background})
    res = fastsafe.generate(model, tok, ["the"], cfg, max_new_tokens=30)
    gen = res.new_tokens[0]
    step_t = add_at - 1
    assert len(swaps) == 1 and (swaps[0] == step_t if not background else step_t < swaps[0] <= step_t + 10)
    assert _kills(tok, gen[:step_t]) >= 1, "the model should emit the entity before it is added"
    assert _kills(tok, gen[:swaps[0]]) == _kills(tok, gen), f"entity emitted after it came in force: {tok.decode(gen)!r}"
    hits = [e for e in res.events if e.entity == "kill" or e.rule == "token_ban"]
    assert hits and min(e.step for e in hits) >= swaps[0]


def test_entity_removed_mid_generation_is_allowed_again(tok, tmp_path):
    db = tmp_path / "r.db"
    store = RiskEntityStore(db)
    store.add("kill")
    model = entity_loving(tiny_gpt2(seed=11), tok, ["kill"], follow=9.0, start=3.0)
    _commit_at(model, db, 6, lambda s: s.remove("kill"))
    cfg = SafetyConfig(store=str(db), matcher="device", matcher_options={"background": False})
    res = fastsafe.generate(model, tok, ["the"], cfg, max_new_tokens=24)
    gen = res.new_tokens[0]
    assert _kills(tok, gen[:5]) == 0 and _kills(tok, gen[5:]) >= 1
    assert res.events and all(e.step < 5 for e in res.events)


def test_a_failing_build_keeps_the_old_matcher_and_reports(tok, tmp_path, monkeypatch):
    db = tmp_path / "r.db"
    store = RiskEntityStore(db)
    store.add("kill")
    errors = []
    live = LiveDeviceMatcher(store, tok, vocab_size=len(tok), on_error=errors.append)
    old = live.current()
    assert _kill_ban(old, tok)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated out of memory")
    monkeypatch.setattr(DeviceMatcher, "from_store", broken)
    store.add("bomb")
    with pytest.warns(RuntimeWarning, match=r"could not be compiled.*simulated out of memory.*version 1 stays in force"):
        assert not live.wait_for(store.version(), 30)
    assert live.current() is old and isinstance(live.last_error, RuntimeError) and len(errors) == 1
    live.current()
    assert len(errors) == 1, "the same failed version is not rebuilt on every step"
    monkeypatch.undo()
    store.add("nerve agent")                                  # the next change tries again
    assert live.wait_for(store.version(), 60) and live.last_error is None
    assert live.current().version == store.version() and len(live.current()) == 3


def test_a_step_never_waits_for_a_build(tok, tmp_path, monkeypatch):
    """While a (slow) build runs, current() returns the old matcher at once."""
    store = RiskEntityStore(tmp_path / "r.db")
    store.add("kill")
    live = LiveDeviceMatcher(store, tok, vocab_size=len(tok))
    old = live.current()
    release = threading.Event()
    real = DeviceMatcher.from_store.__func__

    def slow(cls, *args, **kwargs):
        release.wait(30)
        return real(cls, *args, **kwargs)
    monkeypatch.setattr(DeviceMatcher, "from_store", classmethod(slow))
    store.add("bomb")
    t0 = time.perf_counter()
    for _ in range(5):
        assert live.current() is old
    assert time.perf_counter() - t0 < 10.0 and live.building            # the build waits 30 s
    release.set()
    assert live.wait_for(store.version(), 60) and live.current() is not old


def test_config_builds_a_follower_only_with_a_store(tok, tmp_path):
    from fastsafe.safety_builder import build_device_matcher, device_matcher_source
    cfg = SafetyConfig(banned_phrases=["kill"], matcher="device")
    src = device_matcher_source(cfg, tok, vocab_size=len(tok), device="cpu")
    assert isinstance(src, FixedDeviceMatcher) and src.current() is build_device_matcher(cfg, tok, vocab_size=len(tok),
                                                                                           device="cpu")
    store = RiskEntityStore(tmp_path / "r.db")
    store.add("bomb")
    cfg = SafetyConfig(banned_phrases=["kill"], store=store, matcher="device")
    src = device_matcher_source(cfg, tok, vocab_size=len(tok), device="cpu")
    assert isinstance(src, LiveDeviceMatcher) and {e.phrase for e in src.current().entities} == {"kill", "bomb"}
    assert device_matcher_source(cfg, tok, vocab_size=len(tok), device="cpu") is src      # cached by content


def test_uncompilable_store_entities_are_skipped_alone_like_the_host_matcher(tok):
    from fastsafe.safety import PhraseMatcher, RiskEntity
    V = len(tok)
    ents = [RiskEntity(1, "fine words"), RiskEntity(3, "12 99999", "token_ids"), RiskEntity(4, "3 4", "token_ids"),
            RiskEntity(5, r"(a)\1", "regex"), RiskEntity(6, "x+", "regex"), RiskEntity(7, "a b", "words"),
            RiskEntity(8, "\u200b", "phrase"), RiskEntity(9, "nope", "token_ids"), RiskEntity(10, "kill")]
    dm = DeviceMatcher.build(tok, entities=ents, vocab_size=V, skip_invalid=True, warn=False)
    pm = PhraseMatcher.build(tok, entities=ents, vocab_size=V, skip_invalid=True, warn=False)
    assert [(s.entity.id, s.reason) for s in dm.skipped] == [(s.entity.id, s.reason) for s in pm.skipped]
    assert {s.entity.id for s in dm.skipped} == {3, 5, 7, 8, 9}
    assert _kill_ban(dm, tok) and dm.has_device_text and not dm.has_regexes  # the valid ones are in force
    assert [dm.entity(i).phrase for i in dm._rx.values] == ["x+"]             # (the regex on the device)
    with pytest.raises(ValueError, match="outside the vocabulary"):            # without skip_invalid: raise
        DeviceMatcher.build(tok, entities=ents[1:2], vocab_size=V)
    with pytest.raises(ValueError, match="outside the vocabulary"):            # the caller's own config raises
        DeviceMatcher.build(tok, token_id_phrases=[[V + 5]], vocab_size=V, skip_invalid=True)


def test_a_bad_store_entity_does_not_stop_the_device_path_or_later_updates(tok, tmp_path):
    db = tmp_path / "r.db"
    store = RiskEntityStore(db)
    store.add("unrelated words")
    store.add("99999 5", kind="token_ids")                # valid ids, but not for this vocabulary
    skipped = []
    with pytest.warns(RuntimeWarning, match=r"not enforced.*99999 5.*outside the vocabulary"):
        live = LiveDeviceMatcher(store, tok, vocab_size=len(tok), background=False, on_skip=skipped.append)
    assert [s.entity.phrase for s in live.skipped] == ["99999 5"] and len(skipped) == 1
    store.add("kill", category="violence", severity=3)     # an update after the bad entity
    m = live.current()
    assert m.version == store.version() and _kill_ban(m, tok) and live.last_error is None
    assert len(skipped) == 1, "a skipped entity is reported once"
