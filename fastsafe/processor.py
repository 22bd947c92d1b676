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

Under sampling, candidates outside the ``top_k`` are covered by the token-level bans, and by the
text-level check only with ``text_check="vocab"`` (the default on CUDA with the device matcher:
every token is checked and the blocked ones folded into the bitmask); otherwise use
:func:`fastsafe.generate` (which only ever picks among the checked ``top_k``) or a larger ``top_k``.
"""
from __future__ import annotations

import torch

from .config import SafetyConfig
from .ops.bitmask import unpack_bitmask
from .safety_step import SafetyStep

__all__ = ["SafeLogitsProcessor"]

NEG_INF = float("-inf")
#: Which tokens get the text-level check: the ``top_k`` candidates, every token of the vocabulary
#: (device matcher), or ``"auto"``: the vocabulary where the scores are on a GPU, else the top-k.
TEXT_CHECKS = ("auto", "top_k", "vocab")


class SafeLogitsProcessor:
    """A Hugging Face ``LogitsProcessor`` applying a :class:`SafetyConfig` (see the module docstring).

    Args:
        tokenizer: the model's tokenizer (phrase tokenisation, decoding candidates, EOS / pad ids).
        config: the :class:`SafetyConfig` (default: empty, a no-op).
        eos_token_id: fallback token when every candidate is banned (default: ``config.fallback_token_id``,
            then ``tokenizer.eos_token_id``).
        pad_token_id: leading tokens stripped from histories (default: ``tokenizer.pad_token_id``).
        text_check: ``"top_k"`` checks the ``config.top_k`` best candidates at text level;
            ``"vocab"`` checks every token of the vocabulary (``SafetyConfig(matcher="device")``
            only; the host matcher always checks the top-k), so sampling cannot draw an unchecked
            token; ``"auto"`` (default): ``"vocab"`` where the scores are on CUDA (a few table
            lookups per token, cheap there), else ``"top_k"``.

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
                 pad_token_id: int | None = None, text_check: str = "auto"):
        if text_check not in TEXT_CHECKS:
            raise ValueError(f"text_check: expected one of {TEXT_CHECKS}, got {text_check!r}")
        self.text_check = text_check
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
        self._step = None                     # the SafetyStep for the scores' V and device (checks the fallback id)
        self.events: list = []
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the prompt length and the events (call between ``generate`` calls)."""
        self._prompt_len: int | None = None
        self._last_len: int | None = None
        self._prev_ids = None                 # the last call's input_ids (device matcher: advance or restart)
        self.events = []

    def _position(self, input_ids: torch.Tensor) -> int:
        T = int(input_ids.shape[1])
        if self._last_len is None or T != self._last_len + 1:
            if self._last_len is not None:
                self.events = []          # a new generation
            self._prompt_len = T
        self._last_len = T
        return T - self._prompt_len

    def _safety_step(self, vocab_size: int, device) -> SafetyStep:
        step = self._step
        if step is None or step.vocab_size != vocab_size or step.device != device:
            step = self._step = SafetyStep(self.config, self.tokenizer, vocab_size=vocab_size, device=device,
                                           fallback_id=self.eos_token_id, eos_token_id=self.eos_token_id,
                                           logits_name="scores", fallback_name="eos_token_id", sink=self._emit)
        return step

    @property
    def reward(self):
        """The resolved safety reward of the config (or ``None``)."""
        return self.config.resolve_reward()

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
        step = self._safety_step(V, scores.device)
        out = scores
        dtype = scores.dtype

        row = step.bias_row(position)
        if row is not None:
            out = (out.float() - cfg.tsdi_scale * row).to(dtype)

        matcher = step.matcher()
        # host token lists: for the host matcher, the reward, the regex host path (the device matcher needs none)
        needs_lists = step.reward is not None or (matcher is not None and (not step.on_device or matcher.has_regexes))
        histories = self._histories(input_ids) if needs_lists else None
        if step.on_device:
            self._follow(step, input_ids, histories)
        cand_reward = step.reward is not None and step.reward.form == "candidate"
        if matcher is None and not cand_reward:          # TSDI and / or a dense reward only
            dense = step.dense_reward(histories) if histories is not None else None
            return out if dense is None else (out.float() + cfg.reward_weight * dense).to(dtype)

        vocab = self._check_vocab(step, matcher, scores)
        sel = step.select(scores, position, k=min(cfg.top_k, V), histories=histories, ban_scores=out,
                          check_vocab=vocab)
        if sel.banned_bitmask is not None:
            out = out.masked_fill(~unpack_bitmask(sel.banned_bitmask, V), NEG_INF)
        if sel.dense_reward is not None:
            out = (out.float() + cfg.reward_weight * sel.dense_reward).to(dtype)

        cands, ok, dead = sel.topk.indices, sel.ok, sel.dead
        if cand_reward:      # Algorithm 1: only the checked top-k, re-scored by log p + w * r
            s = (sel.topk.logprobs() + cfg.reward_weight * sel.candidate_reward.float()).masked_fill(~ok, NEG_INF)
            step.choose(sel, position)                   # the greedy pick: records reward overrides and fallbacks
            out = torch.full_like(out, NEG_INF).scatter(1, cands, s.to(dtype))
        else:
            if sel.allowed is not None and not bool(ok.all()):
                kept = torch.where(ok, out.gather(1, cands), torch.full_like(sel.topk.values, NEG_INF).to(dtype))
                out = out.scatter(1, cands, kept)
            # a row whose checked candidates are all out falls back (nothing checked is left to pick)
            step.record_choice(sel, None, position)
        if bool(dead.any()):
            rows = dead.nonzero().flatten()
            out = out.clone() if out is scores else out
            out[rows] = NEG_INF
            out[rows, step.fallback_id] = 0.0
        step.flush()
        return out

    def _check_vocab(self, step: SafetyStep, matcher, scores: torch.Tensor) -> bool:
        """Whether this call text-checks every token (see ``text_check``)."""
        if not step.on_device or not matcher.has_device_text:
            return False
        mode = self.text_check
        return mode == "vocab" or (mode == "auto" and scores.is_cuda)

    def _follow(self, step: SafetyStep, input_ids: torch.Tensor, histories) -> None:
        """Device matcher: advance the rows' states by their last token when this call continues the
        previous one row for row, else (a new generation, beams reordered) re-derive them."""
        prev = self._prev_ids
        if (prev is not None and step.state is not None and prev.shape[0] == input_ids.shape[0]
                and input_ids.shape[1] == prev.shape[1] + 1 and torch.equal(input_ids[:, :-1], prev)):
            step.advance(input_ids[:, -1])
        else:
            step.start(histories if histories is not None else self._histories(input_ids))
        self._prev_ids = input_ids

    def _check_call(self, scores: torch.Tensor, V: int) -> None:
        """Clear errors for inputs that would otherwise fail deep inside torch (or sample garbage)."""
        if scores.device.type == "meta":
            raise ValueError("scores: expected a tensor with data, got a meta tensor (the model's weights are "
                             "meta tensors?)")
        if bool(torch.isposinf(scores).any()):
            rows = torch.isposinf(scores).any(dim=-1).nonzero().flatten().tolist()
            raise ValueError(f"scores: +inf in rows {rows[:16]}; expected finite scores or -inf (a +inf score "
                             f"makes the softmax NaN under sampling; did an earlier logits processor write +inf?)")
