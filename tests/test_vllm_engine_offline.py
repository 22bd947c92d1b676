"""fastsafe's vLLM adapter in a real vLLM engine, offline (``LLM.generate``).

Two engines, one after the other, each loaded once for the module (subprocesses, see
``tests/vllm_engine``): plain vLLM (the baseline) and vLLM with the adapter plus the harness' own
token-ban processor, under a policies file (``FASTSAFE_VLLM_POLICIES``) with four policies. Both
engines get the same requests in the same order, so a filter that bans nothing must leave every
token as the baseline has it. Runs in .venv-vllm (``.ci/run``); skipped without vLLM.
"""
import json
import os

import pytest

from tests.vllm_engine import harness
from tests.vllm_engine.harness import PROMPTS, mentioned

harness.require_vllm()

ENTITIES = list(PROMPTS.values())
HALF = ENTITIES[:4]              # policy "half" bans these; the other four stay allowed
NEVER_SAID = "qzxv wlpk"         # policy "open" bans only this, which the model never says
EOS = 2                          # SmolLM2's <|im_end|>
MAX_TOKENS = 32
PREEMPT_TOKENS = 120             # 8 rows x ~155 tokens do not fit the small KV cache: preemptions
QUESTIONS = list(PROMPTS)


def _greedy(max_tokens=MAX_TOKENS, **extra):
    return {"temperature": 0.0, "max_tokens": max_tokens, **extra}


def _sampled(seed, max_tokens=MAX_TOKENS, **extra):
    return {"temperature": 0.8, "top_p": 0.95, "seed": seed, "max_tokens": max_tokens, **extra}


def _fs(**args):
    return {"extra_args": {"fastsafe": args}}


def _jobs(adapter: bool) -> list[dict]:
    """The same requests for both engines; the adapter engine's carry fastsafe arguments."""
    fs = _fs if adapter else (lambda **_: {})
    jobs = [
        {"name": "open_greedy", "requests": [{"prompt": q, "params": {**_greedy(), **fs(policy="open")}}
                                             for q in QUESTIONS]},
        {"name": "none_greedy", "requests": [{"prompt": q, "params": {**_greedy(), **fs(policy="none")}}
                                             for q in QUESTIONS]},
        {"name": "open_sampled", "requests": [{"prompt": q, "params": {**_sampled(i), **fs(policy="open")}}
                                              for i, q in enumerate(QUESTIONS)]},
        {"name": "preempt_open", "requests": [{"prompt": q, "params": {**_greedy(PREEMPT_TOKENS, ignore_eos=True),
                                                                       **fs(policy="open")}} for q in QUESTIONS]},
    ]
    if not adapter:
        return jobs
    jobs += [
        {"name": "default_greedy", "requests": [{"prompt": q, "params": _greedy()} for q in QUESTIONS]},
        {"name": "default_sampled", "requests": [{"prompt": q, "params": _sampled(100 + i)}
                                                 for i, q in enumerate(QUESTIONS)]},
        {"name": "default_n4", "requests": [{"prompt": q, "params": _sampled(200 + i, max_tokens=24, n=4)}
                                            for i, q in enumerate(QUESTIONS)]},
        {"name": "mixed", "requests": _mixed_requests()},
        {"name": "preempt_default", "requests": [{"prompt": q, "params": _sampled(400 + i, PREEMPT_TOKENS,
                                                                                  ignore_eos=True)}
                                                 for i, q in enumerate(QUESTIONS)]},
        {"name": "all_banned", "requests": [{"prompt": q, "params": {**_greedy(8), **_fs(policy="allbanned")}}
                                            for q in QUESTIONS[:2]]},
    ]
    return jobs


#: (policy or None for the default, request-only phrases) per row of the mixed job, in turn
MIXED_POLICIES = [(None, ()), ("half", ()), ("open", ()), ("none", ()), ("open", ("Paris", "make a bomb")),
                  ("none", tuple(ENTITIES[4:]))]


def _mixed_requests() -> list[dict]:
    """24 requests (3 per prompt) over 8 slots (``max_num_seqs``): rows join as others finish
    (different ``max_tokens``), so vLLM adds, removes and moves rows under the adapter."""
    out = []
    for i in range(24):
        policy, phrases = MIXED_POLICIES[i % len(MIXED_POLICIES)]
        args = {}
        if policy is not None:
            args["policy"] = policy
        if phrases:
            args["banned_phrases"] = list(phrases)
        sample = (i // len(MIXED_POLICIES)) % 2 == 1
        max_tokens = 8 + (i * 7) % 33
        params = _sampled(300 + i, max_tokens) if sample else _greedy(max_tokens)
        out.append({"prompt": QUESTIONS[i % len(QUESTIONS)], "params": {**params, **_fs(**args)},
                    "policy": policy, "phrases": list(phrases)})
    return out


def _banned_for(policy, phrases) -> list[str]:
    by_policy = {None: ENTITIES, "half": HALF, "open": [], "none": []}
    return list(by_policy[policy]) + list(phrases)


POLICIES_TOML = f"""
[policy.default]
phrases = {json.dumps(ENTITIES)}
allow_opt_out = true

[policy.half]
phrases = {json.dumps(HALF)}

[policy.open]
phrases = ["{NEVER_SAID}"]

[policy.allbanned]
regexes = ["."]
top_k = 3
"""


def baseline_plan() -> dict:
    """The plain-vLLM plan (the server tests compare with it too; it runs once per session)."""
    return _plan((), _jobs(adapter=False))


def _plan(processors, jobs):
    engine = dict(harness.ENGINE, **harness.SMALL_KV_CACHE, model=harness.model_path())
    if processors:
        engine["logits_processors"] = list(processors)
    return {"engine": engine, "jobs": jobs}


def _ban_jobs(vocab_size: int, first_greedy_token: int, adapter: bool) -> list[dict]:
    """Requests for the harness' ban processor alone (they opt out of the adapter's default policy)."""
    q = QUESTIONS[0]
    opt_out = {"fastsafe": {"policy": "none"}} if adapter else {}
    return [
        {"name": "ban_first", "requests": [{"prompt": q, "params": {
            **_greedy(4), "extra_args": {"ban_token_ids": [first_greedy_token], **opt_out}}}]},
        {"name": "ban_all", "requests": [{"prompt": q, "params": {
            **_greedy(1), "extra_args": {"ban_token_ids": list(range(vocab_size)), **opt_out}}}]},
    ]


def _vocab_size() -> int:
    with open(os.path.join(harness.model_path(), "config.json")) as f:
        return json.load(f)["vocab_size"]


@pytest.fixture(scope="module")
def baseline():
    return harness.run_plan_cached(baseline_plan())


@pytest.fixture(scope="module")
def adapter_available():
    try:
        harness.require_adapter()
    except pytest.skip.Exception:
        return False
    return True


@pytest.fixture(scope="module")
def filtered(baseline, adapter_available, tmp_path_factory):
    """The adapter engine (plus the ban processor); without the adapter, the ban processor only."""
    work = tmp_path_factory.mktemp("vllm_offline")
    policies = work / "policies.toml"
    policies.write_text(POLICIES_TOML)
    first = baseline["jobs"]["open_greedy"]["requests"][0]["outputs"][0]["token_ids"][0]
    processors = [harness.BAN_PROCESSOR] + ([harness.ADAPTER] if adapter_available else [])
    jobs = (_jobs(adapter=True) if adapter_available else []) + _ban_jobs(_vocab_size(), first, adapter_available)
    env = harness.subprocess_env(FASTSAFE_VLLM_POLICIES=str(policies),
                                 FASTSAFE_TEST_READD_LOG=str(work / "readded.txt"))
    out = harness.run_plan(_plan(processors, jobs), env=env, workdir=str(work))
    out["readded"] = _readded_by_job(work / "readded.txt")
    return out


def _readded_by_job(path) -> dict[str, int]:
    """Requests resumed with tokens already generated (after a preemption), per job."""
    counts, job = {}, None
    for line in (path.read_text().splitlines() if path.exists() else []):
        if line.startswith("job "):
            job = line[4:]
            counts.setdefault(job, 0)
        elif job is not None:
            counts[job] += 1
    return counts


@pytest.fixture
def adapter(filtered, adapter_available):
    if not adapter_available:
        harness.require_adapter()
    return filtered


def _texts(job) -> list[str]:
    return [c["text"] for r in job["requests"] for c in r["outputs"]]


def _tokens(job) -> list[list[int]]:
    return [c["token_ids"] for r in job["requests"] for c in r["outputs"]]


# --- the harness itself (the ban processor), and what plain vLLM does with an all-banned row ---

def test_plain_model_says_every_entity(baseline):
    """Precondition of every ban test below: unfiltered, the model says each entity."""
    said = {e for e, _ in mentioned(_texts(baseline["jobs"]["open_greedy"]), ENTITIES)}
    assert said == set(ENTITIES), f"the plain model did not say {sorted(set(ENTITIES) - said)}"


def test_harness_processor_reaches_the_engine(baseline, filtered):
    first = baseline["jobs"]["open_greedy"]["requests"][0]["outputs"][0]["token_ids"][0]
    got = filtered["jobs"]["ban_first"]["requests"][0]["outputs"][0]["token_ids"]
    assert got[0] != first


def test_plain_vllm_all_banned_row_emits_token_0(filtered):
    """vLLM's own behaviour (its issue 57986): a row with every logit -inf samples token 0."""
    assert filtered["jobs"]["ban_all"]["requests"][0]["outputs"][0]["token_ids"] == [0]


# --- the adapter ---

@pytest.mark.parametrize("job", ["open_greedy", "none_greedy", "open_sampled"])
def test_nothing_banned_equals_plain_vllm(baseline, adapter, job):
    assert _tokens(adapter["jobs"][job]) == _tokens(baseline["jobs"][job])


@pytest.mark.parametrize("job", ["default_greedy", "default_sampled", "default_n4"])
def test_no_entity_is_said(adapter, job):
    texts = _texts(adapter["jobs"][job])
    assert mentioned(texts, ENTITIES) == []
    assert all(t.strip() for t in texts)            # answers, not empty rows


def test_n4_completions_are_distinct_samples(adapter):
    for r in adapter["jobs"]["default_n4"]["requests"]:
        assert len(r["outputs"]) == 4
        assert len({tuple(c["token_ids"]) for c in r["outputs"]}) > 1


def test_mixed_policies_under_continuous_batching(baseline, adapter):
    """Each row keeps its own policy while rows join, leave and move in the batch."""
    spec = _mixed_requests()
    got = adapter["jobs"]["mixed"]["requests"]
    allowed_said = set()
    for s, r in zip(spec, got):
        text = r["outputs"][0]["text"]
        banned = _banned_for(s["policy"], s["phrases"])
        assert mentioned([text], banned) == [], (s["policy"], s["phrases"], text)
        allowed_said |= {e for e, _ in mentioned([text], [e for e in ENTITIES if e not in banned])}
    # rows whose policy allows an entity still say it: the policies do not leak between rows
    assert allowed_said, "no row said an entity its policy allows"


def test_mixed_unfiltered_greedy_rows_equal_plain_vllm(baseline, adapter):
    plain = {r["prompt_token_ids"].__repr__(): r["outputs"][0]["token_ids"]
             for r in baseline["jobs"]["open_greedy"]["requests"]}
    spec = _mixed_requests()
    checked = 0
    for s, r in zip(spec, adapter["jobs"]["mixed"]["requests"]):
        if s["policy"] in ("open", "none") and not s["phrases"] and s["params"]["temperature"] == 0.0:
            ref = plain[r["prompt_token_ids"].__repr__()]
            n = min(len(ref), s["params"]["max_tokens"])
            assert r["outputs"][0]["token_ids"][:n] == ref[:n]
            checked += 1
    assert checked >= 2


def test_preempted_rows_keep_their_filter(baseline, adapter):
    """Rows preempted for KV space and resumed (vLLM re-adds them with their tokens so far)."""
    for job in ("preempt_open", "preempt_default"):
        assert adapter["readded"].get(job), f"{job}: no request was preempted and resumed (nothing tested)"
    assert _tokens(adapter["jobs"]["preempt_open"]) == _tokens(baseline["jobs"]["preempt_open"])
    assert mentioned(_texts(adapter["jobs"]["preempt_default"]), ENTITIES) == []


def test_all_banned_row_gets_eos_not_token_0(adapter):
    for r in adapter["jobs"]["all_banned"]["requests"]:
        out = r["outputs"][0]
        assert out["token_ids"] == [EOS], out
        assert out["finish_reason"] == "stop"
