"""fastsafe's vLLM adapter in a running OpenAI-compatible ``vllm serve`` (real HTTP on 127.0.0.1).

One server for the module, started with ``--logits-processors
fastsafe.integrations.vllm:SafetyLogitsProcessor`` and a policies file whose default policy follows
a risk-entity store. Requests carry fastsafe's per-request arguments in ``vllm_xargs`` (flat
``fastsafe_*`` keys). The greedy outputs of a policy that bans nothing are compared with plain
offline vLLM (the baseline engine of ``test_vllm_engine_offline``, run once per session). Runs in
.venv-vllm (``.ci/run``); skipped without vLLM.
"""
import json
import os
import subprocess
import sys
import time

import pytest

from tests.vllm_engine import harness
from tests.vllm_engine.harness import PROMPTS, mentioned, mentions

harness.require_vllm()
harness.require_adapter()

from tests.test_vllm_engine_offline import NEVER_SAID, baseline_plan  # noqa: E402  (after the skips)

POLICY_PHRASES = ["Paris", "make a bomb"]
STORE_ENTITY = "chocolate chip"          # in the store from the start
HOT_ENTITY = "Eiffel Tower"              # added with `fastsafe entities add` while the server runs
DEFAULT_BANS = POLICY_PHRASES + [STORE_ENTITY]
EOS = 2
QUESTIONS = list(PROMPTS)
HOT_QUESTION = "Tell me about the Eiffel Tower."
SWAP_LOG = "store version"               # the adapter's log line when a new store version is in force

POLICIES_TOML = f"""
[policy.default]
store = "risk.db"
phrases = {json.dumps(POLICY_PHRASES)}
allow_opt_out = true

[policy.open]
phrases = ["{NEVER_SAID}"]

[policy.allbanned]
regexes = ["."]
top_k = 3
"""


@pytest.fixture(scope="module")
def baseline():
    return harness.run_plan_cached(baseline_plan())


@pytest.fixture(scope="module")
def server(baseline, tmp_path_factory):
    """The server (started after the baseline engine has finished: one engine at a time)."""
    from fastsafe import RiskEntityStore
    work = tmp_path_factory.mktemp("vllm_server")
    RiskEntityStore(str(work / "risk.db")).add(STORE_ENTITY)
    (work / "policies.toml").write_text(POLICIES_TOML)
    srv = harness.Server([harness.ADAPTER], env={"FASTSAFE_VLLM_POLICIES": str(work / "policies.toml"),
                                                 "VLLM_LOGGING_LEVEL": "INFO"},
                         log_path=str(work / "server.log"))
    srv.store = str(work / "risk.db")
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def _prompt_ids(baseline, job="open_greedy") -> list[list[int]]:
    return [r["prompt_token_ids"] for r in baseline["jobs"][job]["requests"]]


def _complete(server, prompts, xargs=None, **params):
    body = {"model": "smollm2", "prompt": prompts, "return_token_ids": True, "max_tokens": 32, **params}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    status, reply = server.post("/v1/completions", body)
    assert status == 200, reply
    return sorted(reply["choices"], key=lambda c: c["index"])


def _chat(server, question, xargs=None, **params):
    body = {"model": "smollm2", "messages": [{"role": "user", "content": question}], "max_tokens": 32,
            "temperature": 0.0, **params}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    return server.post("/v1/chat/completions", body)


def test_ban_nothing_policy_over_http_equals_plain_vllm(server, baseline):
    want = [r["outputs"][0]["token_ids"] for r in baseline["jobs"]["open_greedy"]["requests"]]
    got = _complete(server, _prompt_ids(baseline), {"fastsafe_policy": "open"}, temperature=0.0)
    assert [c["token_ids"] for c in got] == want


@pytest.mark.parametrize("params", [{"temperature": 0.0}, {"temperature": 0.8, "seed": 7, "n": 3}],
                         ids=["greedy", "sampled_n3"])
def test_default_policy_over_http(server, baseline, params):
    """No request arguments: the default policy (phrases + store) applies."""
    texts = [c["text"] for c in _complete(server, _prompt_ids(baseline), **params)]
    assert len(texts) == len(QUESTIONS) * params.get("n", 1)
    assert mentioned(texts, DEFAULT_BANS) == []


def test_chat_route_with_request_only_phrases(server):
    q = "Who wrote Romeo and Juliet?"
    status, plain = _chat(server, q, {"fastsafe_policy": "none"})
    assert status == 200 and mentions(plain["choices"][0]["message"]["content"], "Shakespeare"), plain
    status, reply = _chat(server, q, {"fastsafe_policy": "none", "fastsafe_banned_phrases": ["Shakespeare"]})
    assert status == 200, reply
    assert not mentions(reply["choices"][0]["message"]["content"], "Shakespeare"), reply


def test_1000_request_only_phrases_are_accepted(server, baseline):
    phrases = [f"zq{i:04d} vx" for i in range(999)] + ["Paris"]
    got = _complete(server, _prompt_ids(baseline)[:1], {"fastsafe_policy": "none", "fastsafe_banned_phrases": phrases},
                    temperature=0.0)
    assert not mentions(got[0]["text"], "Paris"), got[0]["text"]


@pytest.mark.parametrize("xargs, message", [
    ({"fastsafe_policy": "no-such-policy"}, "unknown policy"),
    ({"fastsafe_colour": "red"}, "unknown request key"),
    ({"fastsafe_tsdi_scale": 2.0}, "tsdi_scale"),
])
def test_bad_request_arguments_are_http_400(server, baseline, xargs, message):
    status, reply = server.post("/v1/completions", {"model": "smollm2", "prompt": _prompt_ids(baseline)[:1],
                                                    "max_tokens": 4, "vllm_xargs": xargs})
    assert status == 400, reply
    assert message in json.dumps(reply), reply


def test_all_banned_row_over_http_is_eos_not_token_0(server, baseline):
    got = _complete(server, _prompt_ids(baseline)[:2], {"fastsafe_policy": "allbanned"}, temperature=0.0,
                    max_tokens=8)
    for c in got:
        assert c["token_ids"] == [EOS], c
        assert c["finish_reason"] == "stop" and c["text"] == ""


def test_store_entity_added_while_serving_is_banned(server):
    """Hot swap: `fastsafe entities add` on the running server's store, no restart."""
    status, before = _chat(server, HOT_QUESTION)
    assert status == 200 and mentions(before["choices"][0]["message"]["content"], HOT_ENTITY), before
    swaps_before = server.log().count(SWAP_LOG)
    cli = os.path.join(os.path.dirname(sys.executable), "fastsafe")
    subprocess.run([cli, "entities", "--db", server.store, "add", HOT_ENTITY], check=True, capture_output=True,
                   timeout=120)
    added = time.monotonic()
    status, first = _chat(server, HOT_QUESTION)          # the first request after the change
    assert status == 200
    # the new store version is built off the step thread and swapped in between two steps; wait for it
    deadline = added + 120
    while server.log().count(SWAP_LOG) == swaps_before and time.monotonic() < deadline:
        _chat(server, "Hello", max_tokens=2)
        time.sleep(0.5)
    assert server.log().count(SWAP_LOG) > swaps_before, "the server never logged the new store version in force"
    in_force_s = time.monotonic() - added
    for params in ({"temperature": 0.0}, {"temperature": 0.8, "seed": 3, "n": 3}):
        status, after = _chat(server, HOT_QUESTION, **params)
        assert status == 200
        texts = [c["message"]["content"] for c in after["choices"]]
        assert mentioned(texts, [HOT_ENTITY]) == [], (in_force_s, texts)
    print(f"hot swap: in force {in_force_s:.1f} s after `entities add`; first request after it "
          f"{'still said' if mentions(first['choices'][0]['message']['content'], HOT_ENTITY) else 'did not say'} "
          f"{HOT_ENTITY!r}")
