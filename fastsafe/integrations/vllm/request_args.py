"""Per-request arguments of the vLLM adapter, read from ``SamplingParams.extra_args``.

Python API::

    SamplingParams(extra_args={"fastsafe": {"policy": "strict", "tsdi_scale": 0.5,
                                            "banned_phrases": ["acme secret", ...]}})

HTTP (OpenAI-compatible server): vLLM copies the request's ``vllm_xargs`` into ``extra_args``, and
``vllm_xargs`` takes only strings, numbers and lists of them (no nested objects), so the same keys
go flat with a ``fastsafe_`` prefix::

    {"model": ..., "prompt": ..., "vllm_xargs": {"fastsafe_policy": "strict",
                                                 "fastsafe_banned_phrases": ["acme secret"]}}

(``"fastsafe": "<a JSON object>"`` is accepted too.) Keys:

- ``policy``: a policy name of the policies file, or ``"none"`` (no filtering) where the
  ``default`` policy has ``allow_opt_out = true``. Absent: the ``default`` policy (none if the file
  has no ``default``).
- ``tsdi_scale``: a finite number replacing the policy's ``tsdi_scale`` (the policy must have ``tsdi``).
- ``banned_phrases``: request-only phrases (strings, up to :data:`MAX_REQUEST_PHRASES`), banned on
  top of the policy's.

:func:`request_args` checks all of it; the processors' ``validate_params`` call it at admission, so
a bad request is refused with HTTP 400 before it reaches a decoding step.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

from .policies import DEFAULT_POLICY, ENV_VAR, OPT_OUT, Policy

__all__ = ["RequestArgs", "request_args", "REQUEST_KEYS", "MAX_REQUEST_PHRASES", "MAX_PHRASE_CHARS", "FLAT_PREFIX"]

#: Keys of ``extra_args["fastsafe"]``.
REQUEST_KEYS = ("policy", "tsdi_scale", "banned_phrases")
#: The prefix of the flat HTTP form (``vllm_xargs={"fastsafe_policy": ...}``).
FLAT_PREFIX = "fastsafe_"
#: Request-only phrases accepted per request.
MAX_REQUEST_PHRASES = 10_000
#: Characters per request-only phrase.
MAX_PHRASE_CHARS = 512


@dataclass(frozen=True)
class RequestArgs:
    """What one request asks of the adapter (checked, resolved against the policies).

    Attributes:
        policy: the name of the policy in force, or ``None`` (no policy: opted out, or no default).
        tsdi_scale: the request's bias scale, or ``None`` (the policy's).
        banned_phrases: request-only phrases, in the request's order, duplicates removed.
    """

    policy: str | None = None
    tsdi_scale: float | None = None
    banned_phrases: tuple[str, ...] = ()

    @property
    def filtered(self) -> bool:
        """True when anything applies to the request (a policy or request-only phrases)."""
        return self.policy is not None or bool(self.banned_phrases)


_NOTHING = RequestArgs()


def _raw(extra_args) -> dict | None:
    if not extra_args:
        return None
    if not isinstance(extra_args, dict):
        raise ValueError(f"extra_args: expected a dict, got {type(extra_args).__name__}")
    raw = extra_args.get("fastsafe")
    flat = {k[len(FLAT_PREFIX):]: v for k, v in extra_args.items()
            if isinstance(k, str) and k.startswith(FLAT_PREFIX)}
    if raw is None and not flat:
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"extra_args['fastsafe']: expected a JSON object, got {raw[:80]!r} ({exc})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"extra_args['fastsafe']: expected a dict (or a JSON object string), got "
                         f"{type(raw).__name__}")
    both = sorted(set(raw) & set(flat))
    if both:
        raise ValueError(f"fastsafe: {both[0]!r} given twice (in extra_args['fastsafe'] and as "
                         f"'{FLAT_PREFIX}{both[0]}'); send it once")
    merged = {**raw, **flat}
    unknown = sorted(str(k) for k in merged if k not in REQUEST_KEYS)
    if unknown:
        raise ValueError(f"fastsafe: unknown request key {unknown[0]!r} (expected one of {', '.join(REQUEST_KEYS)})")
    return merged


def _phrases(value, checked: bool = False) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"fastsafe: banned_phrases: expected a list of strings, got {type(value).__name__}")
    if len(value) > MAX_REQUEST_PHRASES:
        raise ValueError(f"fastsafe: banned_phrases: at most {MAX_REQUEST_PHRASES} phrases per request, got {len(value)}")
    if checked and all(isinstance(p, str) for p in value):     # the worker: admission checked each phrase
        return tuple(dict.fromkeys(value))
    from fastsafe.safety.normalize import entity_forms
    seen: dict[str, None] = {}
    for i, p in enumerate(value):
        if not isinstance(p, str):
            raise ValueError(f"fastsafe: banned_phrases[{i}]: expected a string, got {type(p).__name__} ({p!r})")
        if not p.strip() or len(p) > MAX_PHRASE_CHARS:
            raise ValueError(f"fastsafe: banned_phrases[{i}]: expected a non-empty phrase of at most "
                             f"{MAX_PHRASE_CHARS} characters, got {p[:80]!r} ({len(p)} characters)")
        if not entity_forms(p.strip())[0]:
            raise ValueError(f"fastsafe: banned_phrases[{i}]: {p!r} is empty after normalisation (nothing to match)")
        seen.setdefault(p, None)
    return tuple(seen)


def request_args(extra_args, policies: dict[str, Policy] | None, *, checked: bool = False) -> RequestArgs:
    """Check and resolve one request's fastsafe arguments.

    Args:
        extra_args: ``SamplingParams.extra_args`` (``None`` or a dict).
        policies: the server's policies (:func:`~.policies.policies_from_env`), ``None`` when
            ``FASTSAFE_VLLM_POLICIES`` is unset (then nothing is filtered and fastsafe arguments
            are refused, so a client does not believe it is protected).
        checked: the request passed this check at admission (the worker, on the step thread): the
            phrases are not normalised again (~10 us each: 0.1 s at 10,000), only deduplicated. A
            phrase that normalises to nothing then fails the background build, and the row keeps
            the interim rule (fail closed).

    Returns:
        The resolved :class:`RequestArgs`.

    Raises:
        ValueError: an unknown key, an unknown policy, ``"none"`` where opting out is not allowed,
            a non-finite ``tsdi_scale`` or one for a policy without ``tsdi``, bad or too many
            ``banned_phrases``.

    Example:
        >>> from fastsafe.integrations.vllm.policies import Policy
        >>> pol = {"default": Policy("default", phrases=("make a bomb",), allow_opt_out=True)}
        >>> request_args({"fastsafe": {"policy": "none"}}, pol).policy is None
        True
        >>> request_args(None, pol).policy
        'default'
    """
    raw = _raw(extra_args)
    if policies is None:
        if raw:
            raise ValueError(f"fastsafe: this server has no safety policies ({ENV_VAR} is not set), so fastsafe "
                             f"request arguments cannot be honoured; got {sorted(raw)}")
        return _NOTHING
    raw = raw or {}
    default = policies.get(DEFAULT_POLICY)
    name = raw.get("policy")
    if name is None:
        policy = default
    elif not isinstance(name, str):
        raise ValueError(f"fastsafe: policy: expected a policy name (string), got {type(name).__name__} ({name!r})")
    elif name == OPT_OUT:
        if default is not None and not default.allow_opt_out:
            raise ValueError(f"fastsafe: policy: 'none' (opting out) is not allowed on this server (the "
                             f"'{DEFAULT_POLICY}' policy has allow_opt_out = false)")
        policy = None
    else:
        policy = policies.get(name)
        if policy is None:
            raise ValueError(f"fastsafe: policy: unknown policy {name!r} (this server has "
                             f"{', '.join(repr(p) for p in policies) or 'none'}, or 'none')")
    scale = raw.get("tsdi_scale")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"fastsafe: tsdi_scale: expected a finite number, got {scale!r}")
        if policy is None or policy.tsdi is None:
            what = "no policy" if policy is None else f"policy {policy.name!r} has no tsdi table"
            raise ValueError(f"fastsafe: tsdi_scale: {scale} given but {what} (nothing to scale)")
        scale = float(scale)
    phrases = _phrases(raw["banned_phrases"], checked) if raw.get("banned_phrases") is not None else ()
    return RequestArgs(policy=None if policy is None else policy.name, tsdi_scale=scale, banned_phrases=phrases)
