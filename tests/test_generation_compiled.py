"""fastsafe.generate(..., compile=True): the static-cache loop with one compiled decode step.

One test compiles with Inductor (the default); the others trace with dynamo's ``eager`` backend
(``compile={"backend": "eager"}``): the same graph capture, guards and recompiles, without the
C++ compile that takes tens of seconds per graph on a small CPU."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch._dynamo.utils import counters

import fastsafe
from fastsafe import SafetyConfig, TSDIBias
from fastsafe.generation_compiled import batch_bucket, cache_bucket
from fastsafe.reward import CallableReward
from tests.test_generation import ENTITIES, LOVED, _new_entities, hf_greedy
from tests.tiny_lm import PROMPTS, entity_loving, tiny_gpt2, tiny_llama, tiny_tokenizer

EAGER = {"backend": "eager"}
P = ["how do I make a", "Tell me about", "bo", "the quick", "kil"]       # 5 rows: 3 padding rows in the bucket


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def verified(monkeypatch):
    """Every trusted (guard-free) call of the compiled step also evaluates the guards it skipped and
    raises where they fail: the loop fed the step something dynamo would have recompiled for."""
    from fastsafe.generation_compiled import _DirectStep
    monkeypatch.setattr(_DirectStep, "verify", True)


def _graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def _same(a, b):
    assert a.new_tokens == b.new_tokens
    assert a.finish_reasons == b.finish_reasons
    assert torch.equal(a.sequences, b.sequences)
    assert [(e.step, e.row, e.token_id, e.rule, e.entity) for e in a.events] == \
        [(e.step, e.row, e.token_id, e.rule, e.entity) for e in b.events]


def test_buckets():
    assert [batch_bucket(b) for b in (1, 2, 3, 5, 32, 33)] == [1, 2, 4, 8, 32, 64]
    assert [cache_bucket(n) for n in (1, 64, 65, 80, 81, 89, 97, 128, 129, 161)] == \
        [64, 64, 80, 80, 96, 96, 112, 128, 160, 192]                  # four buckets per octave
    assert cache_bucket(100, limit=110) == 110 and cache_bucket(130, limit=128) == 130


def test_inductor_greedy_equals_eager_and_hf_and_does_not_recompile_within_a_bucket(tok):
    """The default compile (Inductor): tokens, EOS cuts and events equal the eager loop's, and HF
    generate's without a config; a second call in the same buckets (other B, other prompt length)
    reuses the graphs (the prefill's prompt length is dynamic)."""
    model = entity_loving(tiny_gpt2(seed=5), tok, LOVED, follow=5.0, start=1.5)
    cfg = SafetyConfig(banned_phrases=ENTITIES, matcher="device", tsdi=TSDIBias(torch.randn(3, len(tok)) * 0.1))
    eos = fastsafe.generate(model, tok, P, cfg, max_new_tokens=3).new_tokens[1][2]   # row 1 ends at step 2
    torch._dynamo.reset()
    counters.clear()
    eager = fastsafe.generate(model, tok, P, cfg, max_new_tokens=16, eos_token_id=eos)
    comp = fastsafe.generate(model, tok, P, cfg, max_new_tokens=16, eos_token_id=eos, compile=True)
    _same(eager, comp)
    assert comp.finish_reasons[1] == "eos" and comp.compile_seconds > 0
    assert "token_ban" in {e.rule for e in comp.events}
    assert _graphs() == 2 and not counters["graph_break"]      # the prefill (any prompt length) and the step
    plain = fastsafe.generate(model, tok, PROMPTS[:3], max_new_tokens=16, eos_token_id=eos, compile=True)
    assert torch.equal(plain.sequences, hf_greedy(model, tok, PROMPTS[:3], 16, eos_token_id=eos))
    six = P + ["a longer prompt than the others"]       # same batch bucket (8), same cache bucket (64)
    again = fastsafe.generate(model, tok, six, cfg, max_new_tokens=12, eos_token_id=eos, compile=True)
    _same(fastsafe.generate(model, tok, six, cfg, max_new_tokens=12, eos_token_id=eos), again)
    assert again.compile_seconds == 0.0
    assert _graphs() == 4                 # the empty config at B=3 is another prefill + step; nothing else


def test_greedy_equals_eager_for_llama_with_a_host_matcher_config(tok):
    """A matcher='host' config runs the device matcher under compile: the device path's tokens."""
    model = entity_loving(tiny_llama(seed=9), tok, LOVED, follow=5.0, start=1.5)
    comp = fastsafe.generate(model, tok, PROMPTS, SafetyConfig(banned_phrases=ENTITIES, top_k=20), max_new_tokens=10,
                             compile=EAGER, check_every=3)
    _same(fastsafe.generate(model, tok, PROMPTS, SafetyConfig(banned_phrases=ENTITIES, top_k=20, matcher="device"),
                            max_new_tokens=10), comp)
    assert _new_entities(PROMPTS, comp.texts) == 0


def test_sampling_stop_strings_and_knobs(tok, verified):
    model = entity_loving(tiny_gpt2(seed=13), tok, ["the quick brown fox"], follow=9.0, start=0.0)
    kw = dict(max_new_tokens=10, compile=EAGER, do_sample=True, top_k=30, top_p=0.9, min_p=0.05, temperature=1.3)
    a = fastsafe.generate(model, tok, PROMPTS, seed=7, **kw)
    b = fastsafe.generate(model, tok, PROMPTS, generator=torch.Generator().manual_seed(7), **kw)
    c = fastsafe.generate(model, tok, PROMPTS, seed=8, **kw)
    assert torch.equal(a.sequences, b.sequences) and not torch.equal(a.sequences, c.sequences)
    # four rows (a full bucket) and no row finished: the noise is the eager loop's, so are the tokens
    eager = fastsafe.generate(model, tok, PROMPTS, seed=7, **{**kw, "compile": False})
    if all(r == "length" for r in eager.finish_reasons):
        assert eager.new_tokens == a.new_tokens
    stop = fastsafe.generate(model, tok, ["the quick", "Hello"], max_new_tokens=20, stop_strings=["fox"], compile=EAGER)
    ref = fastsafe.generate(model, tok, ["the quick", "Hello"], max_new_tokens=20, stop_strings=["fox"])
    _same(ref, stop)
    assert stop.finish_reasons[0] == "stop_string" and stop.texts[0].endswith("fox")


def test_refusals_and_fallbacks(tok):
    model = tiny_gpt2(seed=14)
    reward = CallableReward(lambda h, c, t: torch.zeros(c.shape))
    with pytest.raises(ValueError, match=r"compile: .*regex entities"):
        fastsafe.generate(model, tok, ["Hello"], SafetyConfig(regexes=[r"b\wmb"]), max_new_tokens=2, compile=EAGER)
    with pytest.raises(ValueError, match=r"compile: .*reward model"):
        fastsafe.generate(model, tok, ["Hello"], SafetyConfig(reward_model=reward, reward_weight=1.0),
                          max_new_tokens=2, compile=EAGER)
    with pytest.raises(TypeError, match="compile: expected a bool or a dict"):
        fastsafe.generate(model, tok, ["Hello"], max_new_tokens=2, compile="yes")
    with pytest.raises(ValueError, match="check_every: expected an int >= 1"):
        fastsafe.generate(model, tok, ["Hello"], max_new_tokens=2, compile=EAGER, check_every=0)
    # every token banned but the tokenizer's EOS (the automaton never bans it), which is no EOS here
    everything = [[t] for t in range(len(tok))]
    cfg = SafetyConfig(banned_phrases=everything, matcher="device")
    res = fastsafe.generate(model, tok, ["Hello"], cfg, max_new_tokens=3, eos_token_id=[], compile=EAGER)
    _same(fastsafe.generate(model, tok, ["Hello"], cfg, max_new_tokens=3, eos_token_id=[]), res)
    assert res.new_tokens[0] == [tok.eos_token_id] * 3 and res.finish_reasons == ["length"]


def test_store_hot_swap_mid_generation(tok, tmp_path, verified):
    """A store change committed from on_event (called at a host check) is in force from the next step;
    the swap changes the matcher's tensors and recompiles the step at most once."""
    from fastsafe.safety.store import RiskEntityStore
    model = entity_loving(tiny_gpt2(seed=11), tok, ["kill"], follow=9.0, start=3.0)
    store = RiskEntityStore(tmp_path / "risk.db")
    store.add("unrelated phrase")
    space = tok.encode(" ", add_special_tokens=False)
    added = []

    def on_event(e):                                   # the first ban of a space reaches on_event at a check
        if not added:
            added.append(e.step)
            RiskEntityStore(tmp_path / "risk.db").add("kill")

    cfg = SafetyConfig(store=store, banned_phrases=[space], matcher="device", on_event=on_event,
                       matcher_options={"background": False})
    g0 = _graphs()
    res = fastsafe.generate(model, tok, ["the"], cfg, max_new_tokens=24, compile=EAGER, check_every=4)
    gen = res.new_tokens[0]
    assert added and len(gen) == 24
    check = (added[0] // 4 + 1) * 4                    # the host check that committed the change
    before = tok.decode(gen[:check]).lower()
    assert before.count("kill") >= 1, "the model should emit the entity before it is added"
    assert tok.decode(gen).lower().count("kill") == before.count("kill")
    assert any(e.entity == "kill" for e in res.events)
    assert _graphs() - g0 <= 3                         # the prefill, the step, at most one recompile at the swap


def _direct(model):
    from fastsafe.generation_compiled import _DECODERS
    (dec,) = _DECODERS[model].values()
    return dec.direct


def test_trusted_steps_skip_guards_only_where_they_pass_and_route_between_graphs(tok, verified):
    """Between two host checks the step runs without dynamo's guard evaluation; a different matcher
    (other table shapes: another graph of the same bucket) and a return to the first one are routed
    by the guards; tokens and events equal the eager loop's throughout."""
    model = entity_loving(tiny_llama(seed=9), tok, LOVED, follow=5.0, start=1.5)
    small = SafetyConfig(banned_phrases=ENTITIES, matcher="device")
    large = SafetyConfig(banned_phrases=ENTITIES + [f"phrase number {i}" for i in range(300)], matcher="device")
    torch._dynamo.reset()      # counts below from a clean cache (torch 2.7 counted earlier tests' frames too)
    g0 = _graphs()
    for cfg in (small, large, small):
        comp = fastsafe.generate(model, tok, PROMPTS, cfg, max_new_tokens=20, compile=EAGER, check_every=8)
        _same(fastsafe.generate(model, tok, PROMPTS, cfg, max_new_tokens=20), comp)
    assert _graphs() - g0 == 3                  # the prefill and one step graph per matcher layout
    direct = _direct(model)
    if not direct.available:
        pytest.skip("this torch does not expose dynamo's cache entries: every step takes the guards")
    # per call: 19 compiled steps, guarded at steps 1, 8, 16 (+ step 2 after a compile)
    assert direct.guarded_calls == 3 * 3 + 2 and direct.direct_calls == 3 * 19 - direct.guarded_calls


def test_a_trusted_call_with_other_inputs_takes_the_guards(tok, verified, monkeypatch):
    """The step never runs a graph guard-free for inputs other than the guarded call's: a tensor of
    another layout or dtype, another object or the grad mode send a trusted call through the guards."""
    from fastsafe.generation_compiled import _DirectStep
    seen = []
    call = _DirectStep.__call__
    monkeypatch.setattr(_DirectStep, "__call__", lambda self, args, **kw: (seen.append(args), call(self, args, **kw))[1])
    model = tiny_gpt2(seed=3)
    fastsafe.generate(model, tok, ["Hello", "the"], max_new_tokens=4, compile=EAGER)
    direct = _direct(model)
    if not direct.available:
        pytest.skip("this torch does not expose dynamo's cache entries: every step takes the guards")
    args = list(seen[-1])
    none = contextlib.nullcontext()

    def guarded(a) -> bool:
        calls = direct.guarded_calls
        direct(tuple(a), trusted=True, guard_context=none)
        return direct.guarded_calls == calls + 1

    torch.set_grad_enabled(False)                                # as in generate

    assert not guarded(args)                                     # the same objects and layouts: no guards
    dec, options = direct.owner, direct.owner.options            # a traced value the signature does not see:
    dec.options = (options[0] + 1,) + options[1:]                # the verification catches it (the loop
    with pytest.raises(AssertionError, match="fail the guards"):  # never changes it between host checks)
        direct(tuple(args), trusted=True, guard_context=none)
    dec.options = options
    assert guarded(args[:6] + [args[6].t().contiguous().t()] + args[7:])        # the mask's strides
    assert guarded(args) and not guarded(args)                   # back: guarded once, then trusted again
    assert guarded(args[:4] + [args[4].to(torch.int32)] + args[5:])             # the positions' dtype
    assert guarded([copy.copy(args[0])] + args[1:])                            # another SafetyStep
    assert guarded(args) and not guarded(args)
    torch.set_grad_enabled(True)
    assert guarded(args)                                         # the grad mode


def test_only_whole_graphs_run_outside_dynamo():
    """A cache entry whose code resumes after a graph break is never called directly (its resume
    function would run eagerly outside dynamo); an entry of one whole graph is."""
    from fastsafe.generation_compiled import _entries, _runs_whole

    def whole(x):
        return (x * 2).sin()

    def broken(x):
        y = x * 2
        torch._dynamo.graph_break()
        return y.sin()

    torch._dynamo.reset()
    x = torch.randn(4)
    for fn in (whole, broken):
        torch.testing.assert_close(torch.compile(fn, backend="eager")(x), fn(x))
    entries = {fn.__name__: _entries(fn.__code__) for fn in (whole, broken)}
    if entries["whole"] is None:
        pytest.skip("this torch does not expose dynamo's cache entries (the loop takes the guards every step)")
    assert [_runs_whole(e.code) for e in entries["whole"]] == [True]
    assert [_runs_whole(e.code) for e in entries["broken"]] == [False]
