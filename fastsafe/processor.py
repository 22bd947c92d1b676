"""``SafeLogitsProcessor``: safe decoding as a drop-in Hugging Face ``LogitsProcessor``.

Example:
    >>> from fastsafe import SafeLogitsProcessor, SafetyConfig
    >>> proc = SafeLogitsProcessor(tokenizer, SafetyConfig(banned_phrases=["make a bomb"]))
    >>> out = model.generate(**inputs, logits_processor=[proc], max_new_tokens=32)
    >>> proc.events                      # interventions of the last generate call

Each call gets ``input_ids [B, T]`` (prompt + tokens so far, one row per sequence or beam) and
``scores [B, V]`` and returns processed ``[B, V]`` scores, in this order:

1. **TSDI**: ``scores -= tsdi_scale * bias_table[position]`` (positions past ``L``: the last
   row, or nothing with ``tsdi_beyond="none"``).
2. **Token bans**: every token that would complete a banned phrase after the row's history
   gets ``-inf`` (the matcher's packed bitmask). With token-id-list phrases this is exactly
   ``NoBadWordsLogitsProcessor``.
3. **Text-level check** (string phrases, regexes, a store): the ``top_k`` best candidates are
   checked after Unicode normalisation; blocked ones get ``-inf``.
4. **Reward** (``reward_model`` and ``reward_weight != 0``): dense rewards add
   ``reward_weight * r`` over the whole vocabulary; candidate rewards re-score the ``top_k``
   candidates as ``log_softmax(scores) + w * r`` and every other token gets ``-inf``
   (Algorithm 1 picks among the top-k).
5. **Fallback**: a row left without any finite score (all of its candidates banned) gets
   ``-inf`` everywhere except the fallback token (EOS), and an ``"all_banned_fallback"`` event.

**Response position.** The position is the number of tokens generated so far. The processor
learns the prompt length on its first call: ``position = input_ids.shape[1] - prompt_length``.
A call whose length is not the previous call's plus one starts a new generation (a new prompt
length); call :meth:`SafeLogitsProcessor.reset` between ``generate`` calls to be explicit (needed
when a new call's prompt happens to be exactly one token longer than the last step).

Histories: leading ``pad_token_id`` tokens (left padding) are stripped before matching. Rows are
described entirely by ``input_ids`` at each call, so greedy, sampling and beam search (whose
beams are reordered between steps) need no bookkeeping.

Under sampling, candidates outside the ``top_k`` are covered by the token-level bans but not by
the text-level check; use :func:`fastsafe.generate` (which only ever picks among the checked
``top_k``) or a larger ``top_k`` when that matters.
"""
from __future__ import annotations

import torch

from .config import SafetyConfig
from .ops.bitmask import fit_bitmask, unpack_bitmask
from .safety_builder import bias_table_on

__all__ = ["SafeLogitsProcessor"]

NEG_INF = float("-inf")


class SafeLogitsProcessor:
    """A Hugging Face ``LogitsProcessor`` applying a :class:`SafetyConfig` (see the module docstring).

    Args:
        tokenizer: the model's tokenizer (phrase tokenisation, decoding candidates, EOS / pad ids).
        config: the :class:`SafetyConfig` (default: empty, a no-op).
        eos_token_id: fallback token when every candidate is banned (default: ``config.fallback_token_id``,
            then ``tokenizer.eos_token_id``).
        pad_token_id: leading tokens stripped from histories (default: ``tokenizer.pad_token_id``).

    Attributes:
        events: list of :class:`fastsafe.safety.SafetyEvent` of the latest generation (cleared by
            :meth:`reset` and when a new generation is detected); ``step`` = response position,
            ``row`` = row of ``input_ids`` (the beam index under beam search).

    Call: ``processor(input_ids [B, T] int64, scores [B, V] float) -> [B, V]`` (the same dtype;
    the input tensor is not modified).

    Example:
        >>> proc = SafeLogitsProcessor(tok, SafetyConfig(banned_phrases=[[42], [7, 9]]))
        >>> model.generate(**inputs, logits_processor=[proc], do_sample=True, top_p=0.9)
    """

    def __init__(self, tokenizer, config: SafetyConfig | None = None, *, eos_token_id: int | None = None,
                 pad_token_id: int | None = None):
        if config is None:
            config = SafetyConfig()
        if not isinstance(config, SafetyConfig):
            raise TypeError(f"config: expected a SafetyConfig, got {type(config).__name__}")
        self.tokenizer = tokenizer
        self.config = config
        if eos_token_id is None:
            eos_token_id = config.fallback_token_id
        if eos_token_id is None and tokenizer is not None:
            eos = getattr(tokenizer, "eos_token_id", None)
            eos_token_id = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id if pad_token_id is not None else getattr(tokenizer, "pad_token_id", None)
        self.reward = config.resolve_reward()
        self._matcher_source = None
        self._matcher_vocab = None
        self._checked_vocab = None
        self.events: list = []
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the prompt length and the events (call between ``generate`` calls)."""
        self._prompt_len: int | None = None
        self._last_len: int | None = None
        self.events = []

    def _position(self, input_ids: torch.Tensor) -> int:
        T = int(input_ids.shape[1])
        if self._last_len is None or T != self._last_len + 1:
            if self._last_len is not None:
                self.events = []          # a new generation
            self._prompt_len = T
        self._last_len = T
        return T - self._prompt_len

    def _matcher(self, vocab_size: int):
        if not self.config.has_filter:
            return None
        if self._matcher_source is None or self._matcher_vocab != vocab_size:
            if self.tokenizer is not None and len(self.tokenizer) > vocab_size:
                raise ValueError(f"tokenizer: vocabulary mismatch: the tokenizer has {len(self.tokenizer)} tokens "
                                 f"but the scores have V = {vocab_size}; the tokenizer belongs to another model")
            self._matcher_source = self.config.build_matcher(self.tokenizer, vocab_size=vocab_size,
                                                             eos_token_id=self.eos_token_id)
            self._matcher_vocab = vocab_size
        return self._matcher_source.current()

    def _histories(self, input_ids: torch.Tensor) -> list[list[int]]:
        rows = input_ids.tolist()
        pad = self.pad_token_id
        if pad is None:
            return rows
        out = []
        for r in rows:
            i = 0
            while i < len(r) - 1 and r[i] == pad:
                i += 1
            out.append(r[i:])
        return out

    def _emit(self, event) -> None:
        self.events.append(event)
        if self.config.on_event is not None:
            self.config.on_event(event)

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        from .safety.events import SafetyEvent
        if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
            raise ValueError(f"scores: expected a [B, V] tensor, got {getattr(scores, 'shape', type(scores).__name__)}")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != scores.shape[0]:
            raise ValueError(f"input_ids: expected a [B, T] tensor with B = {scores.shape[0]}, got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        cfg = self.config
        position = self._position(input_ids)
        if cfg.is_empty:
            return scores
        B, V = scores.shape
        self._check_call(scores, V)
        out = scores
        dtype = scores.dtype

        if cfg.tsdi is not None and not (cfg.tsdi_beyond == "none" and position >= cfg.tsdi.length):
            cfg.tsdi.check_vocab(V, what="the scores")
            table = bias_table_on(cfg.tsdi, scores.device)          # the user's TSDIBias is not touched
            row = table[min(position, cfg.tsdi.length - 1)]
            out = (out.float() - cfg.tsdi_scale * row).to(dtype)

        matcher = self._matcher(V)
        histories = None
        if matcher is not None:
            histories = self._histories(input_ids)
            mask = fit_bitmask(matcher.banned_bitmask(histories, device=scores.device), V)
            allowed = unpack_bitmask(mask, V)
            if cfg.report_token_bans and not bool(allowed.all()):
                best = out.argmax(dim=-1)
                hit = (~allowed.gather(1, best.unsqueeze(1))).squeeze(1)
                for b in hit.nonzero().flatten().tolist():
                    tok = int(best[b])
                    ent = matcher.explain_token_ban(histories[b], tok)
                    self._emit(SafetyEvent(step=position, row=b, token_id=tok, token_text=self._text(tok),
                                           rule="token_ban", entity=getattr(ent, "phrase", ent),
                                           category=getattr(ent, "category", None),
                                           severity=getattr(ent, "severity", None)))
            out = out.masked_fill(~allowed, NEG_INF)

        reward = self.reward
        if reward is not None and reward.form == "dense":
            if histories is None:
                histories = self._histories(input_ids)
            r = reward.score_dense(histories, self.tokenizer)
            if r.shape != (B, V):
                raise ValueError(f"reward_model: score_dense returned shape {tuple(r.shape)}, expected [B, V] = [{B}, {V}]")
            out = (out.float() + cfg.reward_weight * r.to(out.device).float()).to(dtype)

        text_rules = matcher is not None and matcher.has_text_rules
        cand_reward = reward is not None and reward.form == "candidate"
        if text_rules or cand_reward:
            if histories is None:
                histories = self._histories(input_ids)
            k = min(cfg.top_k, V)
            values, cands = torch.topk(out.float(), k, dim=-1)
            ok = torch.isfinite(values)
            if text_rules:
                allowed_c, events = matcher.check_candidates(histories, cands)
                for e in events:
                    e.step = position
                    self._emit(e)
                ok &= allowed_c.to(ok.device)
            if cand_reward:
                logp = values - torch.logsumexp(out.float(), dim=-1, keepdim=True)
                r = reward.score_candidates(histories, cands, self.tokenizer)
                if tuple(r.shape) != (B, k):
                    raise ValueError(f"reward_model: score_candidates returned shape {tuple(r.shape)}, expected "
                                     f"[B, k] = [{B}, {k}]")
                s = (logp + cfg.reward_weight * r.to(logp.device).float()).masked_fill(~ok, NEG_INF)
                self._reward_events(position, values, s, cands, ok)
                out = torch.full_like(out, NEG_INF).scatter(1, cands, s.to(dtype))
            else:
                if not bool(ok.all()):
                    kept = torch.where(ok, out.gather(1, cands), torch.full_like(values, NEG_INF).to(dtype))
                    out = out.scatter(1, cands, kept)
            # a row whose checked candidates are all out falls back (nothing checked is left to pick)
            dead = ~ok.any(dim=-1)
        else:
            dead = torch.isneginf(out).all(dim=-1) if matcher is not None else None

        if dead is not None and bool(dead.any()):
            if self.eos_token_id is None:
                raise ValueError("every candidate is banned in rows "
                                 f"{dead.nonzero().flatten().tolist()[:16]} and there is no EOS token to fall back "
                                 f"to; pass eos_token_id= or SafetyConfig(fallback_token_id=...)")
            fb = int(self.eos_token_id)
            rows = dead.nonzero().flatten()
            out = out.clone() if out is scores else out
            out[rows] = NEG_INF
            out[rows, fb] = 0.0
            for b in rows.tolist():
                self._emit(SafetyEvent(step=position, row=b, token_id=fb, token_text=self._text(fb),
                                       rule="all_banned_fallback"))
        return out

    def _check_call(self, scores: torch.Tensor, V: int) -> None:
        """Clear errors for inputs that would otherwise fail deep inside torch (or sample garbage)."""
        if scores.device.type == "meta":
            raise ValueError("scores: expected a tensor with data, got a meta tensor (the model's weights are "
                             "meta tensors?)")
        if self.eos_token_id is not None and self._checked_vocab != V:
            fb = self.eos_token_id
            if isinstance(fb, bool) or not isinstance(fb, int) or not 0 <= fb < V:
                raise ValueError(f"eos_token_id: the fallback token must be a token id in [0, {V}) (the scores' "
                                 f"V), got {fb!r} (from eos_token_id=, config.fallback_token_id or the tokenizer)")
            self._checked_vocab = V
        if bool(torch.isposinf(scores).any()):
            rows = torch.isposinf(scores).any(dim=-1).nonzero().flatten().tolist()
            raise ValueError(f"scores: +inf in rows {rows[:16]}; expected finite scores or -inf (a +inf score "
                             f"makes the softmax NaN under sampling; did an earlier logits processor write +inf?)")

    def _reward_events(self, position, values, s, cands, ok) -> None:
        """Report rows where the reward overturned the best allowed candidate by log-probability."""
        from .safety.events import SafetyEvent
        plain = values.masked_fill(~ok, NEG_INF)
        if not bool(ok.any()):
            return
        best_plain = plain.argmax(dim=-1)
        best_mixed = s.argmax(dim=-1)
        live = ok.any(dim=-1)
        for b in ((best_plain != best_mixed) & live).nonzero().flatten().tolist():
            tok = int(cands[b, best_plain[b]])
            self._emit(SafetyEvent(step=position, row=b, token_id=tok, token_text=self._text(tok), rule="reward"))

    def _text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return ""
        try:
            return self.tokenizer.decode([int(token_id)], skip_special_tokens=False)
        except Exception:  # noqa: BLE001 - text is for the audit trail only
            return ""
