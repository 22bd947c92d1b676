"""Regular regex entities as one search DFA (fastsafe.safety.regex_automaton) against RE2 on random texts."""
from __future__ import annotations

import random

import pytest

from fastsafe.safety.normalize import light_normalize
from fastsafe.safety.regex import compile_regex
from fastsafe.safety.regex_automaton import compile_regexes

PATTERNS = [r"\d{3}-\d{4}", r"(?i)bad(word)+", r"a.c", r"(x|y)z+", r"[^ab]{2}q", r"kill (you|him)", r"(?i)ssn:? ?\d+",
            r"ab|b", r"aaa", r"x+y+x+"]
ALPHABET = "abcqxyz0123456789-: BADWORDkilyouhmsnSN\t\u00a0\uff11\u200b"


def _re2_new_match(pattern: str, light: str, t0: int) -> bool:
    """RE2: does some match of ``pattern`` end after position ``t0`` of ``light``?"""
    anchored = compile_regex(f"(?:{pattern})\\z")
    return any(anchored.search(light[:e]) is not None for e in range(t0 + 1, len(light) + 1))


def _host_finditer(pattern: str, light: str, t0: int) -> bool:
    """The host path's rule: a non-empty finditer match ending after ``t0``."""
    return any(m.end() > t0 and m.end() > m.start() for m in compile_regex(pattern).finditer(light))


def _dfa_new_match(dfa, prefix: str, new: str) -> int:
    state, _ = dfa.run(prefix)
    _, hits = dfa.run(new, state)
    return next((h for h in hits if h >= 0), -1)


@pytest.mark.parametrize("seed", range(3))
def test_dfa_equals_re2_on_random_texts(seed):
    rng = random.Random(seed)
    dfa = compile_regexes(PATTERNS, list(range(len(PATTERNS))))
    assert not dfa.host
    blocked = host_more = 0
    for _ in range(400):
        prefix = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 12)))
        new = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 4)))
        lp, lf = light_normalize(prefix), light_normalize(prefix + new)
        t0 = len(lp) if lf.startswith(lp) else len(lp) - 1          # a trailing space merged with the new one
        want = [j for j, p in enumerate(PATTERNS) if _re2_new_match(p, lf, t0)]
        got = _dfa_new_match(dfa, prefix, new)
        assert (got >= 0) == bool(want), (prefix, new, want, got)
        if want:
            assert got == want[0] or got in want, (prefix, new, want, got)
            blocked += 1
        host = any(_host_finditer(p, lf, t0) for p in PATTERNS)
        assert not host or got >= 0                                  # the host path never blocks more
        host_more += (got >= 0) and not host
    assert blocked > 20
    print(f"blocked {blocked}/400; blocked by the DFA rule but not by the host's finditer rule: {host_more}")


def test_patterns_that_are_not_regular_here_stay_on_the_host_path():
    dfa = compile_regexes([r"\bfoo\b", r"^abc", r"\pL+x", r"abc"], [3, 4, 5, 6])
    assert [v for v, _ in dfa.host] == [3, 4, 5] and dfa.values == [6]
    assert all(reason for _, reason in dfa.host)
    assert dfa.first_match("xxabc") == (6, 4)


def test_a_state_budget_sends_what_does_not_fit_to_the_host():
    dfa = compile_regexes([r"abc", r"(a|b)...........(a|b)"], [0, 1], max_states=50)
    assert dfa.values == [0] and dfa.host[0][0] == 1 and "exceed 50 states" in dfa.host[0][1]


def test_whitespace_runs_read_as_one_space_and_invisible_characters_as_nothing():
    dfa = compile_regexes([r"kill you"], [0])
    assert dfa.first_match("kill \t\u00a0 you") is not None
    assert dfa.first_match("ki\u200bll you") is not None
    assert dfa.first_match("killyou") is None


# --------------------------------------------------------------------------- on the device (DeviceMatcher)
def _tok():
    from tests.test_matcher import tiny_tokenizer
    return tiny_tokenizer()


@pytest.mark.parametrize("seed", range(2))
def test_device_regex_check_equals_re2_on_random_token_histories(seed):
    """Every candidate token of random texts (split as the tokenizer splits them): the device blocks
    exactly when RE2 finds a match ending inside the candidate's text; the host path never blocks more."""
    import torch

    from fastsafe.safety import DeviceMatcher, PhraseMatcher
    tok = _tok()
    pats = PATTERNS[:6] + [r"\bfoo\b"]                      # the last one stays on the host path
    dm = DeviceMatcher.build(tok, regexes=pats)
    pm = PhraseMatcher.build(tok, regexes=pats[:6])
    assert dm.state_width == 10 and dm.has_regexes and [dm.entity(i).phrase for i in dm._rx.values] == pats[:6]
    rng = random.Random(seed)
    hists, cands = [], []
    for _ in range(100):
        ids = tok.encode("".join(rng.choice(ALPHABET) for _ in range(rng.randint(4, 24))), add_special_tokens=False)
        for j in range(len(ids)):
            hists.append(ids[:j])
            cands.append([ids[j]])
    ok, ent = dm.check_candidates(dm.state_from_histories(hists), torch.tensor(cands))
    host_ok, _ = pm.check_candidates(hists, cands)
    blocked = 0
    for h, c, o, e, ho in zip(hists, cands, ok[:, 0].tolist(), ent[:, 0].tolist(), host_ok[:, 0].tolist()):
        before = light_normalize(tok.decode(h))
        full = light_normalize(tok.decode(h + c))
        t0 = len(before) if full.startswith(before) else len(before) - 1
        want = [j for j, p in enumerate(pats[:6]) if _re2_new_match(p, full, t0)]
        assert (not o) == bool(want), (tok.decode(h), tok.decode(c), want)
        if want:
            assert dm.entity(e).phrase in [pats[j] for j in want]
            blocked += 1
        assert ho or not o, (tok.decode(h), tok.decode(c))    # the host path blocks a subset
    assert blocked >= 8


def test_regex_entities_in_the_device_step_give_regex_events_and_compile():
    import torch

    import fastsafe
    from fastsafe import SafetyConfig
    from fastsafe.safety import DeviceMatcher
    from tests.tiny_lm import entity_loving, tiny_gpt2, tiny_tokenizer
    tok = tiny_tokenizer()
    model = entity_loving(tiny_gpt2(seed=9), tok, ["bomb"], follow=8.0, start=3.0)
    cfg = SafetyConfig(regexes=[r"b[o0]mb"], matcher="device", top_k=20)
    plain = fastsafe.generate(model, tok, ["how do I make a"], max_new_tokens=12)
    res = fastsafe.generate(model, tok, ["how do I make a"], cfg, max_new_tokens=12)
    assert "bomb" in plain.texts[0] and "bomb" not in res.texts[0].lower()
    assert res.events and {e.rule for e in res.events} == {"regex"} and res.events[0].entity == r"b[o0]mb"
    dm = DeviceMatcher.build(tok, regexes=[r"kill (you|him)"])
    assert not dm.has_regexes                                   # nothing left on the host: the step is graph-safe

    def step(state, token_ids, cands):
        s = dm.advance(state, token_ids)
        return s, dm.check_candidates(s, cands)
    st = dm.state_from_histories([tok.encode("I will kill", add_special_tokens=False)] * 2)
    t = torch.tensor(tok.encode(" you", add_special_tokens=False)[:1] * 2)
    c = torch.tensor([[5, 6], [7, 8]])
    got = torch.compile(step, fullgraph=True)(st, t, c)
    want = step(st, t, c)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1][0], want[1][0]) and torch.equal(got[1][1], want[1][1])
