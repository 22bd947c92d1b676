"""What both vLLM processors need from the worker they run in: the tokenizer, ``V``, EOS, a logger.

Kept apart so tests can replace :func:`load_tokenizer` (a real ``VllmConfig`` needs a model) and
so neither processor module repeats it.
"""
from __future__ import annotations

import logging
import os

from .policies import policies_from_env
from .request_args import RequestArgs, request_args

__all__ = ["load_tokenizer", "vocab_size_of", "logger", "make_rows", "args_of", "validate"]

#: Seconds between summary log lines (``FASTSAFE_VLLM_LOG_INTERVAL``).
LOG_INTERVAL_ENV = "FASTSAFE_VLLM_LOG_INTERVAL"
#: Seconds between store version checks (``FASTSAFE_VLLM_POLL_INTERVAL``).
POLL_INTERVAL_ENV = "FASTSAFE_VLLM_POLL_INTERVAL"
#: ``0`` logs only the summary lines, not every intervention (``FASTSAFE_VLLM_LOG_EVENTS``).
LOG_EVENTS_ENV = "FASTSAFE_VLLM_LOG_EVENTS"
#: ``background`` (default) or ``step``: where a new request-only phrase set's matcher is built.
REQUEST_BUILD_ENV = "FASTSAFE_VLLM_REQUEST_BUILD"


def logger():
    """vLLM's logger (a child of ``vllm``, so vLLM's handler and format apply), or a plain one."""
    try:
        from vllm.logger import init_logger
        return init_logger("vllm.fastsafe")
    except ImportError:  # pragma: no cover - the processors only run inside vLLM
        return logging.getLogger("fastsafe.integrations.vllm")


def load_tokenizer(vllm_config):
    """The served model's tokenizer, as vLLM loads it (``tokenizer``, ``tokenizer_mode``, revision)."""
    mc = vllm_config.model_config
    try:
        from vllm.tokenizers.registry import cached_tokenizer_from_config
        tok = cached_tokenizer_from_config(mc)
        if tok is not None:
            return tok
    except ImportError:  # pragma: no cover - older layouts
        pass
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(mc.tokenizer, revision=getattr(mc, "tokenizer_revision", None),
                                         trust_remote_code=bool(getattr(mc, "trust_remote_code", False)))


def vocab_size_of(vllm_config) -> int:
    """``V`` of the logits the processors see (the model's vocabulary size)."""
    return int(vllm_config.model_config.get_vocab_size())


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        v = float(raw)
    except ValueError:
        raise ValueError(f"{name}: expected a number of seconds, got {raw!r}") from None
    if not v >= 0:
        raise ValueError(f"{name}: expected a number of seconds >= 0, got {raw!r}")
    return v


def _request_build_mode() -> str:
    """``FASTSAFE_VLLM_REQUEST_BUILD``: ``background`` (default: a new request-only phrase set is built
    off the step thread, the row under the interim rule meanwhile) or ``step`` (built where the
    request is admitted; that step waits for it)."""
    raw = os.environ.get(REQUEST_BUILD_ENV, "").strip().lower() or "background"
    if raw not in ("background", "step"):
        raise ValueError(f"{REQUEST_BUILD_ENV}: expected 'background' or 'step', got {raw!r}")
    return raw


def make_rows(vllm_config, *, device, capacity: int, vocab_size: int):
    """The :class:`~.engine.SafetyRows` of a worker, or ``None`` when ``FASTSAFE_VLLM_POLICIES`` is unset."""
    policies = policies_from_env()
    if policies is None:
        return None, None
    from .engine import SafetyRows
    log = logger()
    tok = load_tokenizer(vllm_config)
    if tok is None:
        raise ValueError("fastsafe: the vLLM adapter needs the model's tokenizer (skip_tokenizer_init is set)")
    eos = getattr(tok, "eos_token_id", None)
    rows = SafetyRows(policies, tok, vocab_size=vocab_size, device=device, capacity=capacity, eos_token_id=eos,
                      logger=log, log_interval=_env_float(LOG_INTERVAL_ENV, 60.0),
                      poll_interval=_env_float(POLL_INTERVAL_ENV, 0.5),
                      log_events=os.environ.get(LOG_EVENTS_ENV, "1").strip() not in ("0", "false", "no"),
                      background_request_builds=_request_build_mode() == "background")
    log.info("fastsafe: %d safety policies (%s) from %s, V=%d, %d slots, device %s", len(policies),
             ", ".join(f"{n}: {b.matcher()!r}" for n, b in rows.built.items()), os.environ.get("FASTSAFE_VLLM_POLICIES"),
             vocab_size, capacity, device)
    return rows, policies


def validate(sampling_params) -> None:
    """``validate_params`` of both processors: check the request's fastsafe arguments (``ValueError``)."""
    request_args(getattr(sampling_params, "extra_args", None), policies_from_env())


def args_of(sampling_params, policies, log) -> RequestArgs:
    """The request's arguments in the worker (on the step thread). They were checked at admission, so
    the phrases are not normalised again; should the policies file have changed since, the request
    gets the default policy (fail closed) and an error line."""
    try:
        return request_args(getattr(sampling_params, "extra_args", None), policies, checked=True)
    except ValueError as exc:
        log.error("fastsafe: request arguments refused in the worker (%s); the default policy applies", exc)
        return request_args(None, policies)
