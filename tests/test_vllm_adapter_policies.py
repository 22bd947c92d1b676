"""vLLM adapter: the policies file (FASTSAFE_VLLM_POLICIES) and per-request arguments. No vLLM needed."""
from __future__ import annotations

import pytest

from fastsafe.integrations.vllm import (MAX_REQUEST_PHRASES, Policy, PolicyError, load_policies, policies_from_env,
                                        request_args)


def _write(tmp_path, text, name="policies.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_policies_parse_every_key(tmp_path):
    from fastsafe import RiskEntityStore
    RiskEntityStore(tmp_path / "risk.db").add("nerve agent")
    (tmp_path / "bias.safetensors").write_bytes(b"x")          # only existence is checked at parse time
    p = _write(tmp_path, """
[policy.default]
store = "risk.db"
phrases = ["make a bomb", [5, 7]]
regexes = ['\\bkill\\s+him\\b']
tsdi = "bias.safetensors"
tsdi_scale = 0.5
top_k = 4
allow_opt_out = true

[policy.strict]
phrases = ["kill"]
""")
    pol = load_policies(p)
    assert list(pol) == ["default", "strict"]
    d = pol["default"]
    assert d.store == str((tmp_path / "risk.db").resolve()) and d.tsdi == str((tmp_path / "bias.safetensors").resolve())
    assert d.phrases == ("make a bomb", (5, 7)) and d.regexes == (r"\bkill\s+him\b",)
    assert (d.tsdi_scale, d.top_k, d.allow_opt_out) == (0.5, 4, True)
    s = pol["strict"]
    assert (s.store, s.tsdi, s.tsdi_scale, s.top_k, s.allow_opt_out) == (None, None, 1.0, 10, False)
    assert s.has_filter and not Policy("x").has_filter and Policy("x").is_empty


@pytest.mark.parametrize("body, where, what", [
    ('[policy.default]\nphrase = ["a"]\n', "[policy.default] phrase", "unknown key"),
    ('[policy.default]\nphrases = "a"\n', "[policy.default] phrases", "expected a list"),
    ('[policy.default]\nphrases = [""]\n', "[policy.default] phrases[0]", "non-empty"),
    ('[policy.default]\nphrases = [1.5]\n', "[policy.default] phrases[0]", "expected a string"),
    ('[policy.default]\nregexes = ["(a"]\n', "[policy.default] regexes[0]", "not a valid regular expression"),
    ('[policy.default]\ntop_k = 0\n', "[policy.default] top_k", "expected an int in [1, 1024]"),
    ('[policy.default]\ntop_k = true\n', "[policy.default] top_k", "expected an int"),
    ('[policy.default]\nallow_opt_out = "yes"\n', "[policy.default] allow_opt_out", "true or false"),
    ('[policy.default]\nstore = "missing.db"\n', "[policy.default] store", "file not found"),
    ('[policy.default]\ntsdi = "missing.safetensors"\n', "[policy.default] tsdi", "file not found"),
    ('[policy.default]\ntsdi_scale = 2.0\n', "[policy.default] tsdi_scale", "without tsdi"),
    ('[policy.none]\nphrases = ["a"]\n', "policies.toml", "opting out"),
    ('[policy."a b"]\nphrases = ["a"]\n', "policies.toml", "policy name 'a b'"),
    ('[server]\nx = 1\n', "policies.toml", "unknown top-level key 'server'"),
    ('[policy.default\n', "policies.toml", "not valid TOML"),
])
def test_bad_policies_name_file_policy_and_key(tmp_path, body, where, what):
    p = _write(tmp_path, body)
    with pytest.raises(PolicyError) as e:
        load_policies(p)
    msg = str(e.value)
    assert msg.startswith(str(p)) and where in msg and what in msg, msg


def test_policies_from_env(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTSAFE_VLLM_POLICIES", raising=False)
    assert policies_from_env() is None
    p = _write(tmp_path, '[policy.default]\nphrases = ["make a bomb"]\n')
    monkeypatch.setenv("FASTSAFE_VLLM_POLICIES", str(p))
    first = policies_from_env()
    assert first["default"].phrases == ("make a bomb",) and policies_from_env() is first      # parsed once
    monkeypatch.setenv("FASTSAFE_VLLM_POLICIES", str(tmp_path / "nope.toml"))
    with pytest.raises(PolicyError, match="cannot read the policies file"):
        policies_from_env()


POLICIES = {"default": Policy("default", phrases=("make a bomb",), tsdi="/x.safetensors", allow_opt_out=False),
            "strict": Policy("strict", phrases=("kill",))}


def test_request_args_resolve():
    assert request_args(None, POLICIES).policy == "default"
    assert request_args({}, POLICIES).policy == "default"
    assert request_args({"other": 1}, POLICIES).policy == "default"
    a = request_args({"fastsafe": {"policy": "strict", "banned_phrases": ["acme", "acme", "zeta"]}}, POLICIES)
    assert (a.policy, a.tsdi_scale, a.banned_phrases) == ("strict", None, ("acme", "zeta"))
    # HTTP: vllm_xargs arrive flat (no nested objects) or as one JSON string
    b = request_args({"fastsafe_policy": "default", "fastsafe_tsdi_scale": 2, "fastsafe_banned_phrases": ["acme"]},
                     POLICIES)
    assert (b.policy, b.tsdi_scale, b.banned_phrases) == ("default", 2.0, ("acme",))
    assert request_args({"fastsafe": '{"policy": "strict"}'}, POLICIES).policy == "strict"
    no_default = {"strict": POLICIES["strict"]}
    assert request_args(None, no_default).policy is None and not request_args(None, no_default).filtered
    assert request_args({"fastsafe": {"policy": "none"}}, no_default).policy is None
    opt = {"default": Policy("default", phrases=("x",), allow_opt_out=True)}
    assert request_args({"fastsafe": {"policy": "none"}}, opt).policy is None
    assert request_args(None, None).policy is None          # no policies file: nothing filtered


@pytest.mark.parametrize("extra, what", [
    ({"fastsafe": {"policy": "lenient"}}, "unknown policy 'lenient'"),
    ({"fastsafe": {"policy": "none"}}, "opting out) is not allowed"),
    ({"fastsafe": {"policy": 3}}, "policy: expected a policy name"),
    ({"fastsafe": {"polcy": "strict"}}, "unknown request key 'polcy'"),
    ({"fastsafe_polcy": "strict"}, "unknown request key 'polcy'"),
    ({"fastsafe": {"policy": "strict"}, "fastsafe_policy": "strict"}, "given twice"),
    ({"fastsafe": "{not json"}, "expected a JSON object"),
    ({"fastsafe": [1]}, "expected a dict"),
    ({"fastsafe": {"tsdi_scale": float("nan")}}, "tsdi_scale: expected a finite number"),
    ({"fastsafe": {"tsdi_scale": True}}, "tsdi_scale: expected a finite number"),
    ({"fastsafe": {"policy": "strict", "tsdi_scale": 1.0}}, "policy 'strict' has no tsdi table"),
    ({"fastsafe": {"banned_phrases": [""]}}, "banned_phrases[0]: expected a non-empty phrase"),
    ({"fastsafe": {"banned_phrases": ["ok", 5]}}, "banned_phrases[1]: expected a string"),
    ({"fastsafe": {"banned_phrases": ["\u200b"]}}, "empty after normalisation"),
    ({"fastsafe": {"banned_phrases": {"a": 1}}}, "banned_phrases: expected a list"),
    ({"fastsafe": {"banned_phrases": ["x" * 600]}}, "at most 512 characters"),
    ({"fastsafe": {"banned_phrases": ["p"] * (MAX_REQUEST_PHRASES + 1)}}, "at most 10000 phrases"),
])
def test_bad_request_args_are_refused_with_a_clear_message(extra, what):
    with pytest.raises(ValueError) as e:
        request_args(extra, POLICIES)
    assert what in str(e.value) and str(e.value).startswith(("fastsafe", "extra_args")), str(e.value)


def test_fastsafe_args_without_policies_file_are_refused():
    with pytest.raises(ValueError, match="FASTSAFE_VLLM_POLICIES is not set"):
        request_args({"fastsafe": {"banned_phrases": ["acme"]}}, None)


def test_a_thousand_request_phrases_are_accepted():
    phrases = [f"secret project {i}" for i in range(1000)]
    assert len(request_args({"fastsafe": {"banned_phrases": phrases}}, POLICIES).banned_phrases) == 1000


def test_policies_read_with_tomli_where_tomllib_is_missing_and_a_clear_error_without_either(tmp_path, monkeypatch):
    """Python 3.10 has no tomllib: tomli is used; with neither, the error names what to install."""
    import sys
    import tomllib
    p = _write(tmp_path, '[policy.default]\nphrases = ["make a bomb"]\n')
    monkeypatch.setitem(sys.modules, "tomllib", None)                # import tomllib -> ImportError
    monkeypatch.setitem(sys.modules, "tomli", tomllib)               # a stand-in tomli with the same API
    assert load_policies(p)["default"].phrases == ("make a bomb",)
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(ImportError, match=r"needs tomllib \(Python >= 3.11\) or, on Python 3.10, the tomli "
                                          r"package: pip install tomli"):
        load_policies(p)
