"""``fastsafe.generate``: the fast path for safe generation (own KV-cached decoding loop).

Per step, for the rows still generating:

1. one model forward of the last token (KV cache, left padding via attention mask and position
   ids, exactly as Hugging Face ``generate`` builds them);
2. :func:`fastsafe.ops.safe_topk` over the ``[B, V]`` logits: temperature, the TSDI bias row of the
   response position, the dense reward, the risk matcher's packed bitmask, top-k and an exact
   logsumexp, writing only ``[B, k]`` (this loop never writes a ``[B, V]`` tensor);
3. the matcher's text-level check of the ``k`` candidates and the candidate reward;
4. :func:`fastsafe.ops.choose`: ``s = log p + w * r`` with disallowed candidates at ``-inf``, greedy
   or seeded sampling (top-p / min-p over the candidates), EOS when a row has nothing left.

Finished rows (EOS or a stop string) leave the batch (their KV cache rows are dropped) and
are padded with ``pad_token_id`` in ``sequences``, like ``generate``. With an empty
``SafetyConfig()`` and ``do_sample=False`` the tokens equal plain ``model.generate(do_sample=False)``.

Example:
    >>> import fastsafe
    >>> res = fastsafe.generate(model, tok, ["How do I make a bomb?", "Hi"],
    ...                         fastsafe.SafetyConfig(banned_phrases=["bomb"]), max_new_tokens=32)
    >>> res.texts, res.events
"""
from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass, field

import torch

from .config import SafetyConfig
from .models import check_vocab, context_length
from .models_cache import accepts, cache_kwargs, output_cache
from .generation_compiled import hits_stop
from .safety_step import SafetyStep

__all__ = ["generate", "GenerationResult"]


@dataclass
class GenerationResult:
    """What :func:`generate` returns.

    Attributes:
        sequences: ``[B, T + n]`` int64, the left-padded prompts followed by the generated tokens
            (``pad_token_id`` after a row finished), like ``model.generate``'s output.
        texts: the newly generated text of each prompt (special tokens skipped).
        events: :class:`fastsafe.safety.SafetyEvent` list, one per intervention, in step order
            (``row`` is the prompt's index, ``step`` the 0-based generated-token index).
        prompt_length: ``T``, the padded prompt length (``sequences[:, T:]`` are the new tokens).
        finish_reasons: per row ``"eos"``, ``"stop_string"``, ``"length"`` (``max_new_tokens``) or
            ``"context"`` (the model's context was full).
        new_tokens: per row, the list of generated token ids (up to and including EOS).
        compile_seconds: ``compile=True``: seconds the first compiled step took (compiling it);
            0.0 when the step was already compiled, or without ``compile``.
    """

    sequences: torch.Tensor
    texts: list
    events: list = field(default_factory=list)
    prompt_length: int = 0
    finish_reasons: list = field(default_factory=list)
    new_tokens: list = field(default_factory=list)
    compile_seconds: float = 0.0

    def events_for(self, row: int) -> list:
        """The events of one prompt."""
        return [e for e in self.events if e.row == row]


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def _as_id_rows(prompts, tokenizer, attention_mask, chat: bool, add_special_tokens: bool) -> list[list[int]]:
    """Normalise the prompts to a list of unpadded token-id lists."""
    if hasattr(prompts, "keys") and "input_ids" in prompts:       # dict / BatchEncoding
        attention_mask = prompts.get("attention_mask", attention_mask)
        prompts = prompts["input_ids"]
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts.unsqueeze(0)
        if prompts.dim() != 2 or prompts.dtype.is_floating_point or prompts.dtype == torch.bool:
            raise ValueError(f"prompts: expected a [B, T] integer tensor of token ids, got dtype {prompts.dtype} "
                             f"shape {tuple(prompts.shape)}")
        rows = prompts.tolist()
        if attention_mask is None:
            return rows
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(prompts.shape):
            raise ValueError(f"attention_mask: expected a tensor of the prompts' shape {tuple(prompts.shape)}, got "
                             f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
        out = []
        for b, (r, m) in enumerate(zip(rows, attention_mask.tolist())):
            n = sum(1 for x in m if x)
            if n and not all(m[len(m) - n:]):
                raise ValueError(f"attention_mask: row {b} is not left padded (zeros after ones); fastsafe.generate "
                                 f"needs left padding (tokenizer.padding_side = 'left')")
            out.append(r[len(r) - n:])
        return out
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise TypeError(f"prompts: expected a str, a non-empty list of str or of token-id lists, a [B, T] tensor or "
                        f"a tokenizer output, got {type(prompts).__name__}")
    rows = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("tokenizer: required for text prompts")
            if chat:
                enc = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                    tokenize=True)
                ids = enc["input_ids"] if hasattr(enc, "keys") else enc
            else:
                ids = tokenizer.encode(p, add_special_tokens=add_special_tokens)
            rows.append([int(t) for t in ids])
        elif isinstance(p, torch.Tensor) and p.dim() == 1 and not p.dtype.is_floating_point:
            rows.append([int(t) for t in p.tolist()])
        elif isinstance(p, (list, tuple)) and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in p):
            rows.append([int(t) for t in p])
        else:
            raise TypeError(f"prompts[{i}]: expected a str or a list of int token ids, got {type(p).__name__}")
    return rows


def _id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(x) for x in value.reshape(-1).tolist()]
    if isinstance(value, numbers.Integral):
        return [int(value)]
    return [int(x) for x in value]


def _check_prob(name: str, value, lo: float, hi: float, lo_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    ok = (lo < value if lo_open else lo <= value) and value <= hi
    if not ok:
        raise ValueError(f"{name}: expected {lo} {'<' if lo_open else '<='} {name} <= {hi}, got {value}")
    return value


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model, tokenizer, prompts, config: SafetyConfig | None = None, *, max_new_tokens: int = 64,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
             min_p: float = 0.0, eos_token_id=None, pad_token_id: int | None = None, stop_strings=None,
             seed: int | None = None, generator: torch.Generator | None = None, attention_mask=None,
             chat: bool = False, add_special_tokens: bool = True, backend: str | None = None,
             compile: bool | dict = False, check_every: int = 8) -> GenerationResult:
    """Safe generation with fastsafe's KV-cached loop and the fused top-k op.

    Args:
        model: a Hugging Face causal LM (decoder-only).
        tokenizer: its tokenizer (tokenises text prompts, phrases; decodes texts and candidates).
        prompts: a str, a list of str, a list of token-id lists, a ``[B, T]`` tensor (with
            ``attention_mask`` when left padded) or a tokenizer output (``input_ids`` +
            ``attention_mask``). Prompts of different lengths are left padded.
        config: the :class:`SafetyConfig` (default: empty).
        max_new_tokens: most tokens to generate per prompt.
        do_sample: sample instead of greedy.
        temperature: sampling temperature (> 0; ignored when greedy, like ``generate``).
        top_k: number of candidates per step (default ``config.top_k``); greedy picks the best
            mixed score among them, sampling samples among them. The text-level check and the
            candidate reward see exactly these.
        top_p, min_p: nucleus / min-p filters over the candidates when sampling.
        eos_token_id: int or list (default: ``model.generation_config``, then the tokenizer's; an
            empty list: no EOS, every row runs to ``max_new_tokens``).
        pad_token_id: default: the generation config's, the tokenizer's, else the first EOS.
        stop_strings: str or list of str; a row stops once its new text contains one.
        seed: seeds a fresh ``torch.Generator`` for sampling (or pass ``generator``).
        attention_mask: for tensor prompts (1 = token, 0 = left padding).
        chat: wrap each text prompt in the tokenizer's chat template (user turn + generation prompt).
        add_special_tokens: for text prompts without ``chat``.
        backend: op backend for :func:`fastsafe.ops.safe_topk` (default: the dispatcher's choice).
        compile: run the decoding loop of :mod:`fastsafe.generation_compiled`: a static KV cache,
            tokens and finished flags on the device, the whole decode step (forward + safety step
            + choose) compiled once per batch / cache-length bucket (``mode="reduce-overhead"``
            on CUDA). Same knobs; the filters run on the device matcher (``matcher="host"`` is
            run as ``"device"``); regex entities and reward models are refused (they need the
            host inside a step). The first call per bucket pays the compile
            (``GenerationResult.compile_seconds``). A dict is passed to ``torch.compile`` (e.g.
            ``{"backend": "aot_eager"}``, ``{"mode": "max-autotune"}``).
        check_every: with ``compile=True``, steps between the host checks of EOS / stop strings /
            events (rows that finish in between decode padding; outputs are cut exactly).

    Returns:
        :class:`GenerationResult` (``sequences``, ``texts``, ``events``, ...).

    Raises:
        ValueError: bad arguments, a tokenizer that does not fit the model, a bias table for
            another vocabulary, a prompt longer than the model's context. A prompt that fits but
            leaves fewer than ``max_new_tokens`` positions generates up to the context limit
            (``finish_reasons`` = ``"context"``, with a warning).

    Example:
        >>> res = generate(model, tok, ["Tell me a joke"], SafetyConfig(banned_phrases=["knock"]),
        ...                max_new_tokens=20, do_sample=True, top_p=0.9, seed=0)
        >>> print(res.texts[0]); [e.to_dict() for e in res.events]
    """
    if config is None:
        config = SafetyConfig()
    if not isinstance(config, SafetyConfig):
        raise TypeError(f"config: expected a SafetyConfig, got {type(config).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)
    temperature = _check_prob("temperature", temperature, 0.0, float("inf"), True)
    top_p = _check_prob("top_p", top_p, 0.0, 1.0, True)
    min_p = _check_prob("min_p", min_p, 0.0, 1.0, False)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"top_k: expected an int >= 1 or None, got {top_k!r}")
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    stop_strings = [s for s in (stop_strings or [])]
    if any(not isinstance(s, str) or not s for s in stop_strings):
        raise ValueError(f"stop_strings: expected non-empty strings, got {stop_strings!r}")
    if stop_strings and tokenizer is None:
        raise ValueError("tokenizer: required for stop_strings")
    if generator is None and seed is not None:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(int(seed))

    V = check_vocab(model, tokenizer) if tokenizer is not None else None
    gcfg = getattr(model, "generation_config", None)
    if eos_token_id is not None:                 # given (an empty list means: no EOS, run to the limit)
        eos = _id_list(eos_token_id)
    else:
        eos = _id_list(getattr(gcfg, "eos_token_id", None)) if gcfg is not None else []
        if not eos and tokenizer is not None:
            eos = _id_list(getattr(tokenizer, "eos_token_id", None))
    if pad_token_id is None and gcfg is not None:
        pad_token_id = getattr(gcfg, "pad_token_id", None)
    if pad_token_id is None and tokenizer is not None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    pad_token_id = int(pad_token_id)
    fallback_id = config.fallback_token_id if config.fallback_token_id is not None else (eos[0] if eos else None)

    rows = _as_id_rows(prompts, tokenizer, attention_mask, chat, add_special_tokens)
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"prompts[{i}]: empty prompt (no tokens); give at least one token")
    _check_before_model(model, rows, V, fallback_id, config.fallback_token_id is not None)
    B = len(rows)
    T = max(len(r) for r in rows)
    device = next(model.parameters()).device
    ctx = context_length(model)
    reason_limit = "length"
    if ctx is not None:
        if T > ctx:
            longest = max(range(B), key=lambda i: len(rows[i]))
            raise ValueError(f"prompts[{longest}]: {len(rows[longest])} tokens, longer than the model's context of "
                             f"{ctx} tokens; shorten the prompt")
        if T + max_new_tokens > ctx:
            warnings.warn(f"max_new_tokens: {max_new_tokens} new tokens after a {T}-token prompt exceed the model's "
                          f"context of {ctx}; generating at most {ctx - T}", stacklevel=2)
            max_new_tokens = ctx - T
            reason_limit = "context"
            if max_new_tokens < 1:
                raise ValueError(f"prompts: a {T}-token prompt fills the model's context of {ctx}; nothing can be generated")

    if compile is not False and compile is not None:
        if not isinstance(compile, (bool, dict)):
            raise TypeError(f"compile: expected a bool or a dict of torch.compile options, got {type(compile).__name__}")
        if isinstance(check_every, bool) or not isinstance(check_every, numbers.Integral) or check_every < 1:
            raise ValueError(f"check_every: expected an int >= 1, got {check_every!r}")
        if generator is not None and generator.device != device:
            raise ValueError(f"generator: expected a generator on {device} (the model's device), got {generator.device}")
        from .generation_compiled import compiled_decode
        sequences, new_tokens, finish, events, T, seconds = compiled_decode(
            model, tokenizer, rows, config, max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, eos=eos, pad_token_id=pad_token_id,
            stop_strings=stop_strings, generator=generator, backend=backend, fallback_id=fallback_id,
            reason_limit=reason_limit, ctx=ctx, check_every=int(check_every),
            compile_options=compile if isinstance(compile, dict) else None)
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True) if tokenizer is not None else [""] * B
        return GenerationResult(sequences=sequences, texts=texts, events=events, prompt_length=T,
                                finish_reasons=finish, new_tokens=new_tokens, compile_seconds=seconds)

    ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[b, T - len(r):] = 1
    ids, mask = ids.to(device), mask.to(device)
    has_pad = not bool(mask.all())
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)

    kw = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}

    out = model(input_ids=ids, attention_mask=mask if has_pad else None, position_ids=pos, use_cache=True, **kw)
    logits = out.logits[:, -1, :]
    past = output_cache(model, out)
    Vl = logits.shape[-1]
    if V is not None and V != Vl:
        V = Vl
    safety = SafetyStep(config, tokenizer, vocab_size=Vl, device=device, fallback_id=fallback_id,
                        eos_token_id=eos or None, logits_name="model's logits")
    k = min(int(top_k) if top_k is not None else config.top_k, Vl)
    eos_set = set(eos)
    max_stop = max((len(s) for s in stop_strings), default=0)

    histories = [list(r) for r in rows]
    safety.start(histories)                                  # device matcher: the rows' states after the prompts
    new_tokens: list[list[int]] = [[] for _ in range(B)]
    finish = [reason_limit] * B
    active = list(range(B))                                  # original row of each live batch row
    act_mask = mask
    last_pos = pos[:, -1]
    sample_temp = temperature if do_sample else 1.0

    steps = 0
    for step in range(max_new_tokens):
        hist = [histories[r] for r in active]
        sel = safety.select(logits, step, k=k, histories=hist, rows=active, temperature=sample_temp, backend=backend)
        if do_sample and bool(torch.isposinf(sel.topk.values).any()):
            bad = torch.isposinf(sel.topk.values).any(dim=-1).nonzero().flatten().tolist()
            raise ValueError(f"logits: the model gave +inf scores in rows {[active[i] for i in bad][:16]} at step "
                             f"{step}; sampling needs finite scores (a +inf makes the softmax NaN)")
        nxt = safety.choose(sel, step, do_sample=do_sample, top_p=top_p, min_p=min_p, generator=generator,
                            rows=active)
        safety.advance(nxt)
        if config.on_event is not None and step % 16 == 15:
            safety.flush()                                   # device-side records reach on_event every 16 steps

        nxt_list = nxt.tolist()
        keep = []
        for i, (r, t) in enumerate(zip(active, nxt_list)):
            histories[r].append(t)
            new_tokens[r].append(t)
            if t in eos_set:
                finish[r] = "eos"
            elif stop_strings and hits_stop(tokenizer, new_tokens[r], stop_strings, max_stop):
                finish[r] = "stop_string"
            else:
                keep.append(i)
        steps = step + 1
        if not keep or steps == max_new_tokens:
            break
        nxt_t = nxt
        if len(keep) != len(active):                  # finished rows leave the batch and the KV cache
            idx = torch.tensor(keep, dtype=torch.long, device=device)
            if hasattr(past, "batch_select_indices"):
                past.batch_select_indices(idx)
            else:
                past.reorder_cache(idx)
            active = [active[i] for i in keep]
            safety.select_rows(idx)
            nxt_t = nxt.index_select(0, idx)
            act_mask = act_mask.index_select(0, idx)
            last_pos = last_pos.index_select(0, idx)
        last_pos = last_pos + 1
        if has_pad:
            act_mask = torch.cat([act_mask, act_mask.new_ones(act_mask.shape[0], 1)], dim=1)
        out = model(input_ids=nxt_t.unsqueeze(1), attention_mask=act_mask if has_pad else None,
                    position_ids=last_pos.unsqueeze(1), use_cache=True, **cache_kwargs(model, past), **kw)
        logits = out.logits[:, -1, :]
        past = output_cache(model, out)

    gen = torch.full((B, steps), pad_token_id, dtype=torch.long)
    for r in range(B):
        if new_tokens[r]:
            gen[r, :len(new_tokens[r])] = torch.tensor(new_tokens[r], dtype=torch.long)
    sequences = torch.cat([ids.cpu(), gen], dim=1).to(device)
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True) if tokenizer is not None else [""] * B
    safety.flush()
    events = sorted(safety.events, key=lambda e: (e.step, e.row))
    return GenerationResult(sequences=sequences, texts=texts, events=events, prompt_length=T,
                            finish_reasons=finish, new_tokens=new_tokens)


def _check_before_model(model, rows: list[list[int]], V: int | None, fallback_id, from_config: bool) -> None:
    """Errors that would otherwise surface deep inside torch: a model without data (meta tensors),
    prompt token ids outside ``[0, V)``, a fallback token outside ``[0, V)``."""
    from .models import logits_vocab_size
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    if param is not None and param.device.type == "meta":
        raise ValueError("model: its weights are meta tensors (no data; loaded with device_map='meta' or "
                         "init_empty_weights?); load the weights onto cpu or cuda first")
    if V is None:
        try:
            V = logits_vocab_size(model)
        except (AttributeError, TypeError):
            V = None
    if V is None:
        return
    for i, r in enumerate(rows):
        lo, hi = min(r), max(r)
        if lo < 0 or hi >= V:
            bad = lo if lo < 0 else hi
            raise ValueError(f"prompts[{i}]: expected token ids in [0, {V}) (the model's vocabulary), got {bad}")
    if fallback_id is not None and not 0 <= int(fallback_id) < V:
        name = "config.fallback_token_id" if from_config else "eos_token_id"
        raise ValueError(f"{name}: expected a token id in [0, {V}) (the model's vocabulary), got {int(fallback_id)}")


