"""``fastsafe.generate(..., compile=True)``: a decoding loop that stays on the device.

The eager loop (:mod:`fastsafe.generation`) reads every step's tokens back to the host, keeps
Python bookkeeping per row and grows a dynamic KV cache. This loop instead:

* holds the KV cache in transformers' ``StaticCache``, sized from the prompt length plus
  ``max_new_tokens`` and rounded up to a bucket (:func:`cache_bucket`), and the batch rounded up
  to a power of two (:func:`batch_bucket`; the extra rows decode padding and are dropped), so the
  step's shapes repeat across calls and recompiles stay bounded;
* keeps the tokens, the finished flags and the safety automaton's row states on the device;
* runs the whole decode step — model forward of the last token, :meth:`SafetyStep.select`
  (token bans, TSDI, fused top-k, text check) and :meth:`SafetyStep.choose` — as one
  ``torch.compile``'d function (``mode="reduce-overhead"`` on CUDA: one CUDA graph per step; the
  default mode elsewhere), compiled once per bucket;
* evaluates dynamo's guards of the step once per block of ``check_every`` steps (and at a new
  matcher), not at every step: the steps in between call the compiled graph directly
  (:class:`_DirectStep`; the tensors' layouts and the objects are checked to be the guarded call's);
* reads the host only every ``check_every`` steps: EOS and stop strings are checked there (a row
  that finished in between keeps decoding padding until the check; outputs are cut exactly at EOS /
  the stop string as in the eager loop), the audit records become events, and the store's new
  matcher (if any) is swapped in between two steps (a swap changes tensors, not the step).

The prompt (prefill) is compiled too, with its length marked dynamic (one graph per bucket for
every prompt length).

Refused under ``compile=True`` (a clear ``ValueError``): what needs the host inside a step — the
host matcher's text check is replaced by the device matcher (``matcher="host"`` configs run
``matcher="device"``), but regex entities and reward models (they read text) are refused.

Example:
    >>> res = fastsafe.generate(model, tok, ["Hi"] * 8, SafetyConfig(banned_phrases=["bomb"]),
    ...                         max_new_tokens=64, compile=True)
    >>> res.texts, res.events, res.compile_seconds
"""
from __future__ import annotations

import inspect
import os
import time
import types
import weakref

import torch

from .models_cache import accepts, cache_argument
from .ops.types import SafeTopK
from .safety_step import SafetyStep, StepSelection

__all__ = ["batch_bucket", "cache_bucket", "compiled_decode", "record_step", "CHECK_EVERY", "compile_stats"]

#: Steps between two host checks (EOS, stop strings, events, the store's swap).
CHECK_EVERY = 8
#: Smallest cache length bucket; larger ones are powers of two.
MIN_CACHE = 64

# one decoder per (model, bucket, options): the StaticCache and the compiled step are reused
_DECODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_STATS = {"compiles": 0, "compile_seconds": 0.0}


def batch_bucket(batch: int) -> int:
    """The batch size the compiled step runs at: the next power of two >= ``batch``.

    >>> [batch_bucket(b) for b in (1, 3, 8, 9)]
    [1, 4, 8, 16]
    """
    return 1 << max(0, int(batch) - 1).bit_length()


def cache_bucket(length: int, limit: int | None = None) -> int:
    """The static cache length for ``length`` positions: ``max(length, 64)`` rounded up to a
    multiple of an eighth of its power of two (four buckets per octave: 64, 80, 96, 112, 128, 160,
    ...), capped at ``limit`` (the model's context) when given. Attention reads the whole static
    cache every step, so a bucket much longer than needed costs time; four per octave keep the
    waste under 25% and the recompiles few.

    >>> [cache_bucket(n) for n in (10, 64, 65, 89, 300)]
    [64, 64, 80, 96, 320]
    """
    n = max(int(length), MIN_CACHE)
    step = 1 << ((n - 1).bit_length() - 3)
    b = -(-n // step) * step
    return max(int(length), min(b, limit)) if limit is not None else b


def compile_stats() -> dict:
    """How many decode steps were compiled in this process and the seconds spent compiling."""
    return dict(_STATS)


def refuse(safety: SafetyStep) -> None:
    """``ValueError`` naming what in ``safety`` cannot run inside a compiled step."""
    if safety.graph_safe:
        return
    parts = "; ".join(safety.host_parts)
    raise ValueError(f"compile: compile=True runs the whole step on the device, but this config has host-only parts "
                     f"({parts}); use compile=False for them")


def _static_cache(model, batch: int, length: int, device, dtype):
    """transformers' ``StaticCache`` for ``batch`` rows of ``length`` positions (whichever
    constructor the installed release has: older ones take the batch size and device up front)."""
    from transformers import StaticCache
    params = inspect.signature(StaticCache.__init__).parameters
    kw = {"config": model.config, "max_cache_len": length}
    if "max_batch_size" in params:
        kw["max_batch_size"] = batch
    elif "batch_size" in params:
        kw["batch_size"] = batch
    if "device" in params:
        kw["device"] = device
    if "dtype" in params:
        kw["dtype"] = dtype
    return StaticCache(**kw)


class _Decoder:
    """The static cache and the compiled step and prefill of one (model, batch bucket, cache bucket, options)."""

    def __init__(self, model, batch: int, length: int, device, options: tuple, compile_options: dict):
        self.model = model
        self.batch, self.length = batch, length
        self.cache = _static_cache(model, batch, length, device, next(model.parameters()).dtype)
        self.cache_name = cache_argument(model) or "past_key_values"
        self.extra = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}
        kw = {"dynamic": False}
        if torch.device(device).type == "cuda":
            kw["mode"] = "reduce-overhead"
        kw.update(compile_options)
        step = _own_code(self._step, f"decode_step_b{batch}_l{length}")
        self.step = torch.compile(step, **kw)
        self.direct = _DirectStep(self.step, step)
        # the prompt: one graph for every prompt length (its dimension is marked dynamic at each call)
        # (no CUDA graphs there: one per prompt length would be recorded)
        pre = {"dynamic": None, **compile_options}
        self._prefill = torch.compile(_own_code(self.forward, f"prefill_b{batch}_l{length}"), **pre)
        self.gqa = _GroupedAttention(torch.device(device))
        self.options = options
        self._initialize_cache(device)

    @torch.no_grad()
    def _initialize_cache(self, device) -> None:
        """One eager forward of a token per row, then a reset: transformers' ``StaticCache`` allocates
        its tensors at the first update and marks their addresses static only outside a trace, so the
        compiled prefill must not be the first to write it (it would also recompile for the second)."""
        ids = torch.zeros((self.batch, 1), dtype=torch.long, device=device)
        self.forward(ids, ids, torch.zeros(1, dtype=torch.long, device=device),
                     torch.ones((self.batch, self.length), dtype=torch.long, device=device))
        self.cache.reset()

    def prefill(self, ids, position_ids, cache_position, attention_mask):
        """``[B, V]`` logits of the prompts' last position; fills the static cache (compiled, any ``T``)."""
        for t in (ids, position_ids):
            torch._dynamo.maybe_mark_dynamic(t, 1)
        torch._dynamo.maybe_mark_dynamic(cache_position, 0)
        with self.gqa:
            return self._prefill(ids, position_ids, cache_position, attention_mask)

    def forward(self, ids, position_ids, cache_position, attention_mask):
        out = self.model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache_position=cache_position, use_cache=True, **{self.cache_name: self.cache},
                         **self.extra)
        return out.logits[:, -1, :]

    def _step(self, safety, matcher, state, ids, position_ids, cache_position, attention_mask, finished,
              position, noise, eos, pad):
        logits = self.forward(ids, position_ids, cache_position, attention_mask)
        return self.pick(safety, matcher, state, logits, finished, position, noise, eos, pad)

    def pick(self, safety, matcher, state, logits, finished, position, noise, eos, pad):
        """Select and choose one token per row (the safety part of a step; ``_step`` adds the forward)."""
        (k, temperature, do_sample, top_p, min_p, backend) = self.options
        sel = safety.select(logits, position, k=k, temperature=temperature, backend=backend, record=False,
                            matcher=matcher, state=state)
        sel = sel.masked(~finished)
        nxt = safety.choose(sel, do_sample=do_sample, top_p=top_p, min_p=min_p, noise=noise, record=False)
        nxt = torch.where(finished, pad, nxt)
        if matcher is not None:
            state = matcher.advance(state, nxt)
        hit_eos = (nxt.unsqueeze(1) == eos.unsqueeze(0)).any(dim=1)
        posinf = torch.isposinf(sel.topk.values).any(dim=1) & ~finished
        return (nxt, state, finished | hit_eos, posinf, sel.topk.values, sel.topk.indices, sel.topk.logsumexp,
                sel.topk.all_banned, sel.ok, sel.dead, sel.ban_best, sel.ban_hit, sel.text_entity, sel.text_tokens,
                sel.ban_entity)


class _GroupedAttention:
    """While entered (around the compiled calls, on the CPU only): transformers' SDPA attention passes
    ``enable_gqa=True`` to ``scaled_dot_product_attention`` instead of copying each key / value head
    to its query heads (``repeat_kv``: a ``[B, H, L, D]`` copy of the whole static cache per layer and
    step). PyTorch's CPU attention kernel reads the grouped heads in place; its results are the
    same bits (checked on SmolLM2's shapes). transformers reads the switch, the environment variable
    ``TRANSFORMERS_SDPA_FORCE_GQA``, while dynamo traces, and dynamo guards on it, so it is set for
    every compiled call and restored after (the variable is process-wide: another thread's eager
    SDPA call on the CPU in that window also takes the grouped path, with the same results)."""

    NAME = "TRANSFORMERS_SDPA_FORCE_GQA"

    def __init__(self, device):
        self.on = device.type == "cpu"
        self._saved = []

    def __enter__(self):
        if self.on:
            self._saved.append(os.environ.get(self.NAME))
            os.environ[self.NAME] = "1"
        return self

    def __exit__(self, *exc):
        if self.on:
            old = self._saved.pop()
            if old is None:
                os.environ.pop(self.NAME, None)
            else:
                os.environ[self.NAME] = old
        return False


class _DirectStep:
    """The compiled step, called without dynamo's per-call guard evaluation where the loop vouches
    for its inputs.

    Every call through ``torch.compile`` first evaluates the guards of the step's cached graphs
    (on SmolLM2 ~1.3 ms per step, 2% of a B=1 step on the CPU). Within one decoding loop the step
    is fed the same objects and same-layout tensors at every step, so between two host checks the
    guards are evaluated once: a *guarded* call looks up the cache entry whose guards pass (as
    dynamo does; dynamo compiles when none does) and remembers it with the layouts of the tensor
    arguments; a *trusted* call runs that entry's code directly. A trusted call falls back to a
    guarded one when the caller does not vouch (the first step of a generation, the first step
    after every host check — where ``on_event`` and a store's swap may have run —, a new matcher),
    or when any tensor argument's shape / stride / dtype / device / ``requires_grad``, the grad
    mode or an argument's identity (for non-tensors) differs from the guarded call's. Process-wide
    state is not touched (unlike ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``, which
    would also skip the guards of other threads' compiled calls).

    Built on dynamo's cache entries (``torch._C._dynamo.eval_frame._debug_get_cache_entry_list``,
    ``CacheEntry.code`` / ``.guard_manager.check``); where the installed torch lacks them, or the
    entry's code has free variables or a graph break, every call is a plain guarded ``torch.compile`` call.

    ``verify`` (tests): evaluate the remembered entry's guards at every trusted call as well and
    raise ``AssertionError`` where they fail (the loop fed what the skipped guards would catch).
    """

    verify = False
    #: False: every call takes the guards (dynamo's own path; for A/B measurements)
    enabled = True

    def __init__(self, compiled, fn):
        self.compiled = compiled
        self.code = fn.__func__.__code__
        self.globals = fn.__func__.__globals__
        self.owner = fn.__self__
        self.names = self.code.co_varnames[1:self.code.co_argcount]        # after self
        self.available = _entries(self.code) is not None
        self.direct_calls = 0
        self.guarded_calls = 0
        self._entry = None          # (function of the cache entry's code, guard manager, signature)

    @staticmethod
    def signature(args) -> tuple:
        return (torch.is_grad_enabled(),) + tuple(
            (a.shape, a.stride(), a.dtype, a.device, a.requires_grad) if isinstance(a, torch.Tensor) else id(a)
            for a in args)

    def __call__(self, args, *, trusted: bool, guard_context):
        entry = self._entry
        if trusted and entry is not None and self.enabled and entry[2] == self.signature(args):
            if self.verify:
                with guard_context:
                    if not entry[1].check(self._locals(args)):
                        raise AssertionError("compiled step: a trusted call's inputs fail the guards of its graph")
            self.direct_calls += 1
            return entry[0](self.owner, *args)
        self.guarded_calls += 1
        self._entry = None
        with guard_context:
            found = self._lookup(args) if self.available else None
            if found is not None:
                self._entry = found
                return found[0](self.owner, *args)
            return self.compiled(*args)                            # compiles (or a graph with free variables)

    def _lookup(self, args):
        """``(function, guard manager, signature)`` of the newest cache entry whose guards pass ``args``
        (dynamo's own lookup order), or None."""
        try:
            f_locals = self._locals(args)
            for e in _entries(self.code) or ():
                if _runs_whole(e.code) and e.guard_manager.check(f_locals):
                    return types.FunctionType(e.code, self.globals, self.code.co_name), e.guard_manager, \
                        self.signature(args)
        except (AttributeError, TypeError):                        # another torch's cache entries
            self.available = False
        return None

    def _locals(self, args) -> dict:
        return {"self": self.owner, **dict(zip(self.names, args))}


def _runs_whole(code) -> bool:
    """Whether a cache entry's code can run outside dynamo as it would inside: no free variables and no
    graph break (a resume function called outside dynamo would run eagerly, uncompiled)."""
    return not code.co_freevars and not any(n.startswith("__resume_at") for n in code.co_names)


def _entries(code):
    """dynamo's cache entries of ``code`` (newest first), or None where this torch does not expose them."""
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
        entries = _debug_get_cache_entry_list(code)
        for e in entries:
            e.code, e.guard_manager.check                           # noqa: B018 - the attributes used
        return entries
    except (ImportError, AttributeError, TypeError):
        return None


def _own_code(method, name: str):
    """``method`` with a code object of its own: dynamo keeps its compiled graphs (and its recompile
    limit) per code object, so each decoder's step is cached apart from the other buckets'."""
    fn = method.__func__
    code = fn.__code__.replace(co_name=name)
    return types.MethodType(types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__),
                            method.__self__)


def _decoder(model, batch, length, device, options, compile_options: dict) -> _Decoder:
    per_model = _DECODERS.setdefault(model, {})
    key = (batch, length, str(device)) + options + tuple(sorted((k, repr(v)) for k, v in compile_options.items()))
    dec = per_model.get(key)
    if dec is None:
        dec = per_model[key] = _Decoder(model, batch, length, device, options, compile_options)
    return dec


def _graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def _count_compiles(before: int, t0: float) -> float:
    """Seconds since ``t0`` when graphs were compiled since ``before`` (counted in :func:`compile_stats`), else 0."""
    if _graphs() == before:
        return 0.0
    seconds = time.perf_counter() - t0
    _STATS["compiles"] += _graphs() - before
    _STATS["compile_seconds"] += seconds
    return seconds


@torch.no_grad()
def compiled_decode(model, tokenizer, rows, safety_config, *, max_new_tokens: int, do_sample: bool,
                    temperature: float, top_k: int | None, top_p: float, min_p: float, eos: list, pad_token_id: int,
                    stop_strings: list, generator, backend, fallback_id, reason_limit: str, ctx: int | None,
                    check_every: int = CHECK_EVERY, compile_options: dict | None = None):
    """The compiled loop behind ``fastsafe.generate(..., compile=True)``; arguments as there, already
    validated. Returns ``(sequences, new_tokens, finish, events, T, compile_seconds)``."""
    config = safety_config
    if config.has_filter:
        config = config.with_matcher("device")
    B = len(rows)
    T = max(len(r) for r in rows)
    device = next(model.parameters()).device
    Bb = batch_bucket(B)
    Lb = cache_bucket(T + max_new_tokens, ctx)

    # ---- prompts, left padded, plus the bucket's extra rows (one pad token each, finished from the start)
    ids = torch.full((Bb, T), pad_token_id, dtype=torch.long)
    mask = torch.zeros((Bb, Lb), dtype=torch.long)
    for b in range(Bb):
        r = rows[b] if b < B else [pad_token_id]
        ids[b, T - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[b, T - len(r):T] = 1
    mask[:, T:] = 1                                  # generated positions (causality hides the future ones)
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask[:, :T].cumsum(-1) - 1).clamp(min=0)

    # ---- the safety step, checked for host-only parts before anything runs
    Vl = _logits_width(model)     # the logits' width (the eager loop reads it from the first logits)
    safety = SafetyStep(config, tokenizer, vocab_size=Vl, device=device, fallback_id=fallback_id,
                        eos_token_id=eos or None, logits_name="model's logits")
    refuse(safety)
    k = min(int(top_k) if top_k is not None else config.top_k, Vl)
    options = (k, float(temperature if do_sample else 1.0), bool(do_sample), float(top_p), float(min_p), backend)
    dec = _decoder(model, Bb, Lb, device, options, dict(compile_options or {}))
    dec.cache.reset()

    # ---- prefill (compiled with the prompt length dynamic: one graph per bucket for every T)
    compile_seconds = 0.0
    before, t0 = _graphs(), time.perf_counter()
    logits = dec.prefill(ids, pos, torch.arange(T, device=device), mask)
    compile_seconds += _count_compiles(before, t0)
    histories = [list(r) for r in rows] + [[pad_token_id]] * (Bb - B)
    safety.start(histories)
    eos_t = torch.tensor(eos if eos else [-1], dtype=torch.long, device=device)
    pad_t = torch.tensor(pad_token_id, dtype=torch.long, device=device)
    finished = torch.zeros(Bb, dtype=torch.bool, device=device)
    finished[B:] = True
    last_pos = pos[:, -1:].clone()
    new_tokens: list[list[int]] = [[] for _ in range(B)]
    finish = [reason_limit] * B
    done = [False] * B
    max_stop = max((len(s) for s in stop_strings), default=0)
    pending: list = []                           # [Bb] token tensors since the last check
    posinf_any = torch.zeros(Bb, dtype=torch.bool, device=device)
    dead_any = torch.zeros(Bb, dtype=torch.bool, device=device)
    cuda = device.type == "cuda"

    def noise_for():                             # drawn outside the graph, as choose draws it eagerly
        if not do_sample:
            return None
        return torch.empty(Bb, k, dtype=torch.float32, device=device).exponential_(1.0, generator=generator)

    steps = 0
    last_matcher = None
    for step in range(max_new_tokens):
        if cuda:
            torch.compiler.cudagraph_mark_step_begin()
        matcher = safety.matcher()               # a store's new version swaps in here, between two steps
        state = safety.state
        position = torch.tensor(step, dtype=torch.long, device=device)
        if step == 0:
            res = dec.pick(safety, matcher, state, logits, finished, position, noise_for(), eos_t, pad_t)
        else:
            last_pos = last_pos + 1
            cache_position = torch.tensor([T + step - 1], dtype=torch.long, device=device)
            args = (safety, matcher, state, nxt.unsqueeze(1), last_pos, cache_position, mask, finished, position,
                    noise_for(), eos_t, pad_t)
            # guards evaluated at the first compiled step, after every host check and at a new matcher
            trusted = step > 1 and step % check_every != 0 and matcher is last_matcher
            before, t0 = _graphs(), time.perf_counter()
            res = dec.direct(args, trusted=trusted, guard_context=dec.gqa)
            compile_seconds += _count_compiles(before, t0)
            last_matcher = matcher
            if cuda:                             # CUDA graph outputs are overwritten by the next replay
                res = tuple(None if t is None else t.clone() for t in res)
        nxt, new_finished, posinf, dead = record_step(safety, matcher, res, step)
        posinf_any |= posinf
        dead_any |= dead
        finished = new_finished
        pending.append(nxt)
        steps = step + 1
        if steps % check_every == 0 or steps == max_new_tokens:
            all_done = _check(pending, new_tokens, done, finish, eos, stop_strings, max_stop, tokenizer, B, steps,
                              do_sample, posinf_any, dead_any, safety, finished)
            pending = []
            if all_done:
                break
            if config.on_event is not None:
                safety.flush()

    if pending:
        _check(pending, new_tokens, done, finish, eos, stop_strings, max_stop, tokenizer, B, steps, do_sample,
               posinf_any, dead_any, safety, finished)
    safety.flush()
    lengths = [len(t) for t in new_tokens]
    events = sorted((e for e in safety.events if e.row < B and e.step < lengths[e.row]), key=lambda e: (e.step, e.row))
    width = max(lengths, default=0)
    gen = torch.full((B, width), pad_token_id, dtype=torch.long)
    for r in range(B):
        if new_tokens[r]:
            gen[r, :lengths[r]] = torch.tensor(new_tokens[r], dtype=torch.long)
    sequences = torch.cat([ids[:B].cpu(), gen], dim=1).to(device)
    return sequences, new_tokens, finish, events, T, compile_seconds


def record_step(safety: SafetyStep, matcher, res: tuple, step: int):
    """The host's part of one compiled step, outside the graph: ``res`` (what :meth:`_Decoder.pick`
    returns) becomes a :class:`StepSelection` recorded for its events, and the rows' automaton states
    are adopted. Returns ``(next ids [B], finished [B], +inf rows [B], dead rows [B])``."""
    (nxt, new_state, new_finished, posinf, values, indices, lse, all_banned, ok, dead, ban_best, ban_hit,
     text_entity, text_tokens, ban_entity) = res
    sel = StepSelection(topk=SafeTopK(values, indices, lse, all_banned), allowed=None,
                        candidate_reward=None, ok=ok, dead=dead, ban_best=ban_best, ban_hit=ban_hit, ban_entity=ban_entity,
                        text_entity=text_entity, text_tokens=text_tokens)
    safety.record(sel, step)
    safety.record_choice(sel, nxt, step)
    if matcher is not None:
        safety.adopt(nxt, new_state)
    return nxt, new_finished, posinf, dead


def _check(pending, new_tokens, done, finish, eos, stop_strings, max_stop, tokenizer, B, steps, do_sample,
           posinf_any, dead_any, safety, finished) -> bool:
    """The host check every few steps: append the new tokens of the rows still going, cut them at
    EOS / a stop string, raise the errors the eager loop raises per step. True when every row is done."""
    block = torch.stack(pending, dim=1).cpu().tolist()      # [Bb, n] - the one host read of these steps
    if do_sample and bool(posinf_any[:B].any()):
        bad = posinf_any[:B].nonzero().flatten().tolist()
        raise ValueError(f"logits: the model gave +inf scores in rows {bad[:16]} before step {steps}; sampling "
                         f"needs finite scores (a +inf makes the softmax NaN)")
    safety.require_fallback(dead_any[:B])
    eos_set = set(eos)
    stop_rows = []
    for r in range(B):
        if done[r]:
            continue
        for t in block[r]:
            new_tokens[r].append(t)
            if t in eos_set:
                finish[r], done[r] = "eos", True
                break
            if stop_strings and hits_stop(tokenizer, new_tokens[r], stop_strings, max_stop):
                finish[r], done[r] = "stop_string", True
                stop_rows.append(r)
                break
    if stop_rows:                                           # rows stopped by text: decode padding from now on
        finished[torch.tensor(stop_rows, device=finished.device)] = True
    return all(done)


def hits_stop(tokenizer, tokens: list[int], stop_strings: list[str], max_stop: int) -> bool:
    """True when the text of the last tokens contains one of ``stop_strings`` (the eager loop's rule too)."""
    tail = tokenizer.decode(tokens[-(max_stop + 4):], skip_special_tokens=False)
    return any(s in tail for s in stop_strings)


def _logits_width(model) -> int:
    from .models import logits_vocab_size
    return int(logits_vocab_size(model))
