"""``SafetyStep``: the per-step safety work, one object for every decoding path.

Every caller — :class:`fastsafe.SafeLogitsProcessor` (Hugging Face ``generate``, which needs
``[B, V]`` scores back), :func:`fastsafe.generate` (fastsafe's own loop, eager or compiled) and the
serving adapters — runs one step through two methods:

* :meth:`SafetyStep.select` — the token bans of the risk automaton (packed bitmask), the TSDI bias
  row of each response position (positions past ``L`` per ``tsdi_beyond``), the dense reward, the
  fused top-k (:func:`fastsafe.ops.safe_topk`), the text-level check of the top-k candidates (or of
  the whole vocabulary, ``check_vocab=True``), the candidate reward and its ``-inf`` veto, the rows
  left with nothing to emit, and the audit records. Returns a :class:`StepSelection`.
* :meth:`SafetyStep.choose` — ``s = log p + w * r`` over the allowed candidates, greedy or sampled,
  the all-banned fallback, and the reward / fallback records.

With the device matcher (``SafetyConfig(matcher="device")``) and no host-only part (regex
entities, a reward model that reads text), ``select(..., record=False)`` followed by
``choose(..., record=False)`` is a tensor program: no host synchronisation, no Python loop over
rows, ``torch.compile(fullgraph=True)``-able; the caller hands the selection to :meth:`record`
(and the ids to :meth:`record_choice`) outside the compiled region, which only keeps tensor
references until :meth:`flush` turns them into events. :attr:`SafetyStep.graph_safe` says whether
the step qualifies. The parts come from :mod:`fastsafe.safety_builder` (cached by content); the
step itself holds only the row states and the events of one generation.

Example:
    >>> step = SafetyStep(cfg, tok, vocab_size=V, device=logits.device, fallback_id=eos)
    >>> step.start(prompt_ids)                           # device matcher: the rows' states
    >>> sel = step.select(logits, position, k=10, histories=histories)
    >>> ids = step.choose(sel, position)                 # [B] int64 (greedy)
    >>> step.advance(ids)
    >>> step.flush(); step.events
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .ops import safe_topk
from .ops.bitmask import fit_bitmask, pack_bitmask
from .ops.choose import choose as ops_choose, sampling_noise
from .ops.custom_ops import choose_op
from .ops.types import SafeTopK
from .safety.events import SafetyEvent
from .safety.device_follow import RowStates
from .safety_builder import bias_table_on, build_matcher, device_matcher_source, resolve_reward

__all__ = ["SafetyStep", "StepSelection"]


@dataclass
class StepSelection:
    """What :meth:`SafetyStep.select` returns for one step of ``B`` rows (tensors on the logits' device).

    Attributes:
        topk: the :class:`fastsafe.ops.SafeTopK` of the processed scores (``values`` / ``indices``
            ``[B, k]``, ``logsumexp`` / ``all_banned`` ``[B]``).
        allowed: ``[B, k]`` bool, the text-level check of the candidates (None: no text rules, or
            checked over the whole vocabulary through ``banned_bitmask``).
        candidate_reward: ``[B, k]`` float32 candidate rewards, or None.
        ok: ``[B, k]`` bool: finite score, allowed, not vetoed by a ``-inf`` reward.
        dead: ``[B]`` bool: rows left with no candidate (they emit the fallback token).
        banned_bitmask: ``[B, ceil(V/32)]`` int32 of the bans applied (bit 1 = allowed), or None.
        dense_reward: ``[B, V]`` float32 dense reward added, or None.
        ban_best: ``[B]`` int64, each row's best token by ``ban_scores`` (for ``token_ban`` events), or None.
        ban_hit: ``[B]`` bool, ``ban_best`` was banned by the automaton, or None.
        ban_entity: ``[B]`` int32 id of the entity ``ban_best`` completes (-1: not banned), or None
            (device matcher only).
        text_entity: ``[B, k]`` int32 entity id matched by each candidate (-1: none), or None
            (device matcher only; with ``check_vocab`` it is ``[B, 1]`` for ``ban_best``).
        text_tokens: the ``[B, k]`` (or ``[B, 1]``) token ids ``text_entity`` refers to, or None.
    """

    topk: SafeTopK
    allowed: Optional[torch.Tensor]
    candidate_reward: Optional[torch.Tensor]
    ok: torch.Tensor
    dead: torch.Tensor
    banned_bitmask: Optional[torch.Tensor] = None
    dense_reward: Optional[torch.Tensor] = None
    ban_best: Optional[torch.Tensor] = None
    ban_hit: Optional[torch.Tensor] = None
    text_entity: Optional[torch.Tensor] = None
    text_tokens: Optional[torch.Tensor] = None
    ban_entity: Optional[torch.Tensor] = None

    def masked(self, live: torch.Tensor) -> "StepSelection":
        """The same selection with the audit hits of rows where ``live`` (``[B]`` bool) is False
        dropped (rows that already finished and only decode padding)."""
        hit = None if self.ban_hit is None else self.ban_hit & live
        ent = None if self.text_entity is None else torch.where(live[:, None], self.text_entity, -1)
        ban_ent = None if self.ban_entity is None else torch.where(live, self.ban_entity, -1)
        return StepSelection(self.topk, self.allowed, self.candidate_reward, self.ok, self.dead & live,
                             self.banned_bitmask, self.dense_reward, self.ban_best, hit, ent, self.text_tokens,
                             ban_ent)


class SafetyStep:
    """The per-step safety work of one generation under a :class:`fastsafe.SafetyConfig`.

    Args:
        config: the settings.
        tokenizer: the model's tokenizer (entity tokenisation, event texts, reward text).
        vocab_size: ``V``, the logits width.
        device: where the logits live (the bias table is placed there).
        fallback_id: the token a row whose every candidate is banned emits (``None``: such a row
            is an error).
        eos_token_id: EOS id(s), never banned by the automaton.
        logits_name: what error messages call the ``[B, V]`` input ("logits" or "scores").
        fallback_name: what error messages call the fallback token (the argument it came from).
        sink: where events go (default: :attr:`events` and ``config.on_event``).

    Raises:
        ValueError: the tokenizer has more tokens than ``V``, the bias table is for another
            vocabulary, ``fallback_id`` outside ``[0, V)``.

    Attributes:
        events: the :class:`fastsafe.safety.SafetyEvent` s recorded so far (``config.on_event``
            is called with each as it is recorded).
        state: ``[B, W]`` int64 automaton states of the rows (``W = matcher.state_width``) (device matcher only, else None).
    """

    def __init__(self, config, tokenizer, *, vocab_size: int, device, fallback_id=None, eos_token_id=None,
                 logits_name: str = "logits", fallback_name: str = "fallback_token_id", sink=None):
        self.config = config
        self._sink = sink
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.device = torch.device(device)
        if fallback_id is not None and (isinstance(fallback_id, bool) or not isinstance(fallback_id, int)
                                        or not 0 <= fallback_id < self.vocab_size):
            raise ValueError(f"{fallback_name}: expected a token id in [0, {self.vocab_size}), got {fallback_id!r} "
                             f"(V of the {logits_name})")
        self.fallback_id = None if fallback_id is None else int(fallback_id)
        self._source = None
        self._device_matcher = None
        self.state = None                   # [B, W] automaton states of the rows (device matcher only)
        self._rows = None                   # RowStates: a store's new matcher swaps in between steps
        self._steps = self._polled = 0      # state moves (start / advance) and the last one matcher() polled at
        self._records: list = []            # device-side event records, turned into events by flush()
        if config.has_filter:
            if tokenizer is not None and len(tokenizer) > self.vocab_size:
                raise ValueError(f"tokenizer: vocabulary mismatch: the tokenizer has {len(tokenizer)} tokens but the "
                                 f"{logits_name} have V = {self.vocab_size}; the tokenizer belongs to another model")
            if config.matcher == "device":
                source = device_matcher_source(config, tokenizer, vocab_size=self.vocab_size, device=self.device,
                                               eos_token_id=eos_token_id)
                self._rows = RowStates(source, background=bool(config.matcher_options.get("background", True)))
                self._device_matcher = source.current()
            else:
                self._source = build_matcher(config, tokenizer, vocab_size=self.vocab_size, eos_token_id=eos_token_id)
        self._table = None
        self._graph_table = None            # [L (+1), V]: the table of tensor positions (see bias_inputs)
        if config.tsdi is not None:
            config.tsdi.check_vocab(self.vocab_size, what=f"the {logits_name}")
            self._table = bias_table_on(config.tsdi, self.device)
            t = self._table                 # built here, so a compiled step sees a fixed tensor
            self._graph_table = torch.cat([t, t.new_zeros(1, t.shape[1])]) if config.tsdi_beyond == "none" else t
        self.reward = resolve_reward(config)
        self._vocab_ids = None              # [1, V] int64 (whole-vocabulary text check)
        if self._device_matcher is not None:
            self._vocab_ids = torch.arange(self._device_matcher.vocab_size, device=self._device_matcher.device)[None]
        self.events: list = []

    # ------------------------------------------------------------------ the parts of a step
    def matcher(self):
        """The matcher in force for this step (a store's newest version, or the device matcher), or
        ``None`` without filters."""
        if self._device_matcher is not None:
            if self._polled != self._steps and self.state is not None:      # once per step, before its first use
                self._polled = self._steps
                self._swap(*self._rows.poll(self._device_matcher, self.state))
            return self._device_matcher
        return self._source.current() if self._source is not None else None

    @property
    def on_device(self) -> bool:
        """True when the token bans and the text check run as tensor programs on the device."""
        return self._device_matcher is not None

    @property
    def host_parts(self) -> list[str]:
        """What of this step runs on the host (empty: :meth:`select` + :meth:`choose` are a tensor
        program): the host matcher, regex entities, a reward model (it reads the rows' text)."""
        parts = []
        if self._source is not None:
            parts.append("the host matcher (SafetyConfig(matcher='host'))")
        if self._device_matcher is not None and self._device_matcher.has_regexes:
            parts.append("regex entities (checked on the host with RE2)")
        if self.reward is not None:
            parts.append(f"the {self.reward.form} reward model (it scores the rows' text on the host)")
        return parts

    @property
    def graph_safe(self) -> bool:
        """True when a step has no host part (see :attr:`host_parts`): it can be compiled whole."""
        return not self.host_parts

    # ------------------------------------------------------------------ row states (device matcher)
    def start(self, histories) -> None:
        """The rows' automaton states after their prompts (``histories``: token-id lists or ``[B, T]``)."""
        if self._device_matcher is not None:
            self._swap(*self._rows.start(histories))
            self._steps += 1

    def advance(self, token_ids) -> None:
        """Every row appends its token (``token_ids`` ``[B]``): the states move on the device."""
        if self._device_matcher is not None:
            self._steps += 1
            self.state = self._rows.advance(self._device_matcher, self._live_state(len(token_ids)), token_ids)

    def adopt(self, token_ids, state) -> None:
        """The rows appended ``token_ids`` (``[B]``) and ``state`` is their new ``[B, W]`` state,
        computed by the caller (``matcher.advance`` inside a compiled step): kept as :attr:`state`
        and logged for a store's hot swap, as :meth:`advance` does."""
        if self._device_matcher is not None:
            self._steps += 1
            self._rows.log_advance(token_ids)
            self.state = state

    def select_rows(self, index) -> None:
        """Keep the rows ``index`` (``[B']`` int64), in that order (finished rows leave, beams reorder)."""
        if self.state is not None:
            self.state = self._rows.select(self.state, index)

    def _ban_entities(self, dm, best, hit):
        """``[B]`` int32 id of the entity each banned ``best`` token completes (-1 where ``hit`` is
        False), from the rows' current states: call it before :meth:`advance` moves them."""
        ent = dm.banned_entity(self._live_state(best.shape[0]), best.to(dm.device, torch.int64))
        return torch.where(hit.to(ent.device), ent, -1)

    def _swap(self, matcher, state) -> None:
        """Put ``matcher`` and the rows' ``state`` under it in force (a store's new version); the
        records of the old matcher become events first (their entity ids are the old matcher's)."""
        if matcher is not self._device_matcher:
            self.flush()
            self._device_matcher = matcher
        self.state = state

    def _live_state(self, batch: int | None):
        if self.state is None or (batch is not None and self.state.shape[0] != batch):
            got = None if self.state is None else self.state.shape[0]
            raise ValueError(f"state: the device matcher holds states for {got} rows but the step has {batch}; "
                             f"call start(histories) at prompt time and select_rows() when rows leave")
        return self.state

    def bias_table(self, position: int):
        """The ``[L, V]`` table to subtract at response ``position``, or ``None`` (no TSDI, or past
        ``L`` with ``tsdi_beyond="none"``); the fused op clamps positions past ``L`` to the last row."""
        if self._table is None or (self.config.tsdi_beyond == "none" and position >= self.config.tsdi.length):
            return None
        return self._table

    def bias_row(self, position: int):
        """The ``[V]`` bias row of response ``position`` (see :meth:`bias_table`), or ``None``."""
        table = self.bias_table(position)
        return None if table is None else table[min(position, self.config.tsdi.length - 1)]

    def bias_inputs(self, position, batch: int):
        """``(bias_table, positions)`` for :func:`fastsafe.ops.safe_topk` at response ``position``.

        ``position``: an int (the table is left out past ``L`` with ``tsdi_beyond="none"``), or an
        int64 tensor (``[]`` or ``[B]``, on the device): then the table always goes in, and
        ``tsdi_beyond="none"`` reads an appended row of zeros past ``L`` — no host decision, so a
        compiled step needs no recompile as the position moves.
        """
        if self._table is None:
            return None, None
        if not isinstance(position, torch.Tensor):
            table = self.bias_table(position)
            return table, (position if table is not None else None)
        L = self.config.tsdi.length
        pos = position.to(self.device, torch.int64).reshape(-1).expand(batch)
        if self.config.tsdi_beyond == "none":
            pos = torch.where(pos >= L, L, pos)
        return self._graph_table, pos.contiguous()

    def banned_bitmask(self, matcher, histories, device, state=None):
        """``[B, ceil(V/32)]`` int32 token bans of the rows (bit 1 = allowed), or ``None``.
        ``state``: the device matcher's row states (default: :attr:`state`)."""
        if matcher is None:
            return None
        if state is not None or matcher is self._device_matcher:
            if state is None:
                state = self._live_state(None if histories is None else len(histories))
            return matcher.banned_bitmask(state).to(device)
        return fit_bitmask(matcher.banned_bitmask(histories, device=device), self.vocab_size)

    def dense_reward(self, histories):
        """The dense ``[B, V]`` float32 reward of the rows, or ``None`` (no dense reward)."""
        if self.reward is None or self.reward.form != "dense":
            return None
        r = self.reward.score_dense(histories, self.tokenizer)
        shape = (len(histories), self.vocab_size)
        if tuple(r.shape) != shape:
            raise ValueError(f"reward_model: score_dense returned shape {tuple(r.shape)}, expected [B, V] = {list(shape)}")
        return r.to(self.device).float()

    def check_candidates(self, matcher, histories, candidates, position: int, rows=None):
        """Text-level check of the ``[B, k]`` candidates: ``[B, k]`` bool (True = allowed) on the
        candidates' device, or ``None`` when there are no text rules. Records the matches."""
        allowed, entity = self._text_check(matcher, histories, candidates, position, rows, None)
        if entity is not None:
            self._records.append(("text_match", position, None if rows is None else list(rows), candidates, entity))
        return allowed

    def _text_check(self, matcher, histories, candidates, position, rows, state):
        """``(allowed [B, k] or None, entity [B, k] int32 or None)``; host matches are emitted here,
        device matches come back as ``entity`` (recorded by the caller)."""
        if matcher is None or not matcher.has_text_rules:
            return None, None
        if state is None and matcher is not self._device_matcher:
            allowed, events = matcher.check_candidates(histories, candidates)
            self._emit_host(events, position, rows)
            return allowed.to(candidates.device), None
        dm = matcher
        allowed, entity = None, None
        if dm.has_device_text:              # phrase entities and regular regexes
            st = self._live_state(candidates.shape[0]) if state is None else state
            ok, entity = dm.check_candidates(st, candidates.to(dm.device))
            allowed = ok.to(candidates.device)
        if dm.has_regexes:                   # the one host part: regex entities (RE2)
            ok, events = dm.host_regex_check(histories, candidates)
            self._emit_host(events, position, rows)
            allowed = ok.to(candidates.device) if allowed is None else allowed & ok.to(candidates.device)
        return allowed, entity

    def _vocab_text_bans(self, dm, batch: int, state):
        """``(ok [B, V] bool, entity [B, V] int32)``: the text check of every token of the vocabulary."""
        st = self._live_state(batch) if state is None else state
        ids = self._vocab_ids if self._vocab_ids.device == dm.device else self._vocab_ids.to(dm.device)
        return dm.check_candidates(st, ids.expand(batch, -1))

    def _emit_host(self, events, position, rows) -> None:
        for e in events:
            e.step = position
            e.row = rows[e.row] if rows is not None else e.row
            self.emit(e)

    def candidate_reward(self, histories, candidates):
        """``[B, k]`` float32 rewards of the candidates, or ``None`` (no candidate reward)."""
        if self.reward is None or self.reward.form != "candidate":
            return None
        r = self.reward.score_candidates(histories, candidates, self.tokenizer)
        if tuple(r.shape) != tuple(candidates.shape):
            raise ValueError(f"reward_model: score_candidates returned shape {tuple(r.shape)}, expected "
                             f"[B, k] = {list(candidates.shape)}")
        return r.to(candidates.device)

    def candidate_ok(self, values, allowed, reward):
        """``[B, k]`` bool: a finite score, allowed by the text check, not vetoed by a ``-inf`` reward."""
        ok = torch.isfinite(values)
        if allowed is not None:
            ok &= allowed
        if reward is not None and self.config.reward_weight != 0.0:
            ok &= ~torch.isneginf(reward * self.config.reward_weight)
        return ok

    def require_fallback(self, dead, rows=None) -> None:
        """Raise when a row has nothing left to emit (``dead`` ``[B]`` bool) and there is no fallback
        (reads ``dead`` on the host only then)."""
        if self.fallback_id is None and bool(dead.any()):
            ids = dead.nonzero().flatten().tolist()
            ids = [rows[i] for i in ids] if rows is not None else ids
            raise ValueError(f"every candidate is banned in rows {ids[:16]} and there is no EOS token to fall back "
                             f"to; pass eos_token_id= or SafetyConfig(fallback_token_id=...)")

    # ------------------------------------------------------------------ one step
    def select(self, logits, position, *, k: int, histories=None, rows=None, temperature: float = 1.0,
               backend: str | None = None, ban_scores=None, check_vocab: bool = False,
               record: bool = True, matcher=None, state=None) -> StepSelection:
        """Run the safety rules of one step over ``logits`` and return the checked top-k.

        Args:
            logits: ``[B, V]`` float scores of the next token.
            position: the response position (0-based count of generated tokens): an int, or an
                int64 tensor ``[]`` / ``[B]`` on the device (see :meth:`bias_inputs`).
            k: candidates per row (``1 <= k <= V``).
            histories: the rows' token-id lists (prompt + generated), needed by the host matcher,
                regex entities and reward models; ``None`` with the device matcher alone.
            rows: the caller's row index of each batch row (events name it), or None.
            temperature: divides the logits before everything else (1.0 when greedy).
            backend: :func:`fastsafe.ops.safe_topk` backend (default: the dispatcher's).
            ban_scores: ``[B, V]`` scores whose best token a ``token_ban`` event names (default:
                ``logits``).
            check_vocab: device matcher: text-check every token of the vocabulary and fold the
                result into the bitmask (the top-k are then all checked; for callers that may emit
                a token outside the top-k, e.g. HF sampling). Regex entities stay on the top-k.
            record: record the events now (and raise for dead rows without a fallback); False
                keeps the step a pure tensor program: call :meth:`record` later.
            matcher, state: a compiled step passes the device matcher in force and the rows'
                ``[B, W]`` states explicitly (from :meth:`matcher` and :attr:`state`, read outside
                the compiled region: the store's hot swap happens there); default: the step's own.

        Returns:
            :class:`StepSelection`.

        Example:
            >>> sel = step.select(logits, 3, k=10, histories=[[1, 2, 3]])
            >>> sel.topk.indices.shape, sel.ok.shape, sel.dead.shape
            (torch.Size([1, 10]), torch.Size([1, 10]), torch.Size([1]))
        """
        cfg = self.config
        B = logits.shape[0]
        if matcher is None:
            matcher = self.matcher()
        bitmask = self.banned_bitmask(matcher, histories, logits.device, state)
        on_device = matcher is not None and (state is not None or matcher is self._device_matcher)
        ban_best = ban_hit = ban_entity = None
        if bitmask is not None and cfg.report_token_bans:
            ban_best = (logits if ban_scores is None else ban_scores).argmax(dim=-1)
            bit = (bitmask.gather(1, (ban_best // 32).unsqueeze(1)).squeeze(1) >> (ban_best % 32)) & 1
            ban_hit = bit == 0
            if on_device:                    # the entity, read from the rows' states before they move
                st = self._live_state(B) if state is None else state
                ent = matcher.banned_entity(st, ban_best.to(matcher.device))
                ban_entity = torch.where(ban_hit.to(ent.device), ent, -1).to(logits.device)
        text_tokens = text_entity = None
        vocab_check = check_vocab and on_device and matcher.has_device_text
        if vocab_check:
            vok, vent = self._vocab_text_bans(matcher, B, state)
            words = pack_bitmask(vok.to(logits.device))
            words = fit_bitmask(words, self.vocab_size)
            bitmask = words if bitmask is None else bitmask & words
            if ban_best is None:
                ban_best = (logits if ban_scores is None else ban_scores).argmax(dim=-1)
            text_tokens = ban_best.unsqueeze(1)
            text_entity = vent.gather(1, text_tokens.to(vent.device)).to(logits.device)
        table, positions = self.bias_inputs(position, B)
        dense = self.dense_reward(histories)
        res = safe_topk(logits, k, bias_table=table, positions=positions, bias_scale=cfg.tsdi_scale,
                        banned_bitmask=bitmask, dense_reward=dense,
                        reward_weight=cfg.reward_weight if dense is not None else 0.0,
                        temperature=temperature, backend=backend)
        if vocab_check:
            allowed = None
            if matcher.has_regexes:
                allowed = matcher.host_regex_check(histories, res.indices)[0].to(logits.device)
        else:
            allowed, text_entity = self._text_check(matcher, histories, res.indices, position, rows, state)
            text_tokens = res.indices if text_entity is not None else None
        cand_r = self.candidate_reward(histories, res.indices)
        ok = self.candidate_ok(res.values, allowed, cand_r)
        dead = ~ok.any(dim=-1)
        sel = StepSelection(topk=res, allowed=allowed, candidate_reward=cand_r, ok=ok, dead=dead,
                            banned_bitmask=bitmask, dense_reward=dense, ban_best=ban_best, ban_hit=ban_hit,
                            text_entity=text_entity, text_tokens=text_tokens, ban_entity=ban_entity)
        if record:
            self.record(sel, position, rows, histories=histories, matcher=matcher)
            self.require_fallback(dead, rows=rows)
        return sel

    def choose(self, sel: StepSelection, position=None, *, do_sample: bool = False, top_p: float = 1.0,
               min_p: float = 0.0, generator=None, noise=None, rows=None, record: bool = True):
        """Pick one token per row among ``sel``'s allowed candidates: ``[B]`` int64.

        ``s = log p + reward_weight * r``; greedy, or sampling after top-p / min-p with ``generator``
        (or pre-drawn ``noise`` ``[B, k]`` Exp(1), see :func:`fastsafe.ops.choose_impl.sampling_noise`:
        what a compiled step takes instead of a generator). Dead rows emit the fallback token.
        ``record``: report the reward overrides and fallbacks now (else :meth:`record_choice`).
        """
        cfg = self.config
        r = sel.candidate_reward
        w = cfg.reward_weight if r is not None else 0.0
        fb = self.fallback_id
        if not do_sample:
            ids = ops_choose(sel.topk, candidate_reward=r, reward_weight=w, candidate_allowed=sel.allowed,
                             fallback_id=fb if fb is not None or record else 0)
        else:
            if noise is None:
                noise = sampling_noise(sel.topk.values, sel.topk.logsumexp, r, w, generator)
            ids = choose_op(sel.topk.values, sel.topk.indices, sel.topk.logsumexp, r, sel.allowed, float(w), noise,
                            float(top_p), float(min_p), fb if fb is not None or record else 0)
        if record:
            self.record_choice(sel, ids, position, rows=rows, do_sample=do_sample)
        return ids

    # ------------------------------------------------------------------ events
    def emit(self, event) -> None:
        """Record ``event`` and pass it to ``config.on_event`` (or to the ``sink`` given)."""
        if self._sink is not None:
            self._sink(event)
            return
        self.events.append(event)
        if self.config.on_event is not None:
            self.config.on_event(event)

    def record(self, sel: StepSelection, position, rows=None, histories=None, matcher=None) -> None:
        """Record the audit trail of :meth:`select`: ``text_match`` (device matcher) and ``token_ban``
        events. Device results are kept as tensors until :meth:`flush`; host ones are emitted now
        (``matcher``: the host matcher the selection used, default: the current one)."""
        rows = None if rows is None else list(rows)
        if sel.text_entity is not None:
            self._records.append(("text_match", position, rows, sel.text_tokens, sel.text_entity))
        if sel.ban_hit is not None:
            if self._device_matcher is not None:
                self._records.append(("token_ban", position, rows, sel.ban_best, sel.ban_entity))
            else:
                matcher = matcher if matcher is not None else self._source.current()
                self._report_host_bans(matcher, position, histories, sel.ban_best, sel.ban_hit, rows)

    def record_choice(self, sel: StepSelection, ids, position, rows=None, do_sample: bool = False) -> None:
        """Record the ``reward`` overrides (greedy with a candidate reward) and the
        ``all_banned_fallback`` rows of one :meth:`choose`."""
        rows = None if rows is None else list(rows)
        plain_ids = None
        if sel.candidate_reward is not None and not do_sample:
            plain = sel.ok.to(torch.int8).argmax(dim=-1)         # first allowed candidate = best by log p
            plain_ids = sel.topk.indices.gather(1, plain.unsqueeze(1)).squeeze(1)
        if self._device_matcher is not None:                      # recorded on the device; events at flush()
            if plain_ids is not None:
                self._records.append(("reward", position, rows, plain_ids, (plain_ids != ids) & ~sel.dead))
            self._records.append(("all_banned_fallback", position, rows, None, sel.dead))
            return
        if plain_ids is not None:
            self.report_reward_overrides(position, plain_ids, ids, ~sel.dead, rows=rows)
        self.report_fallbacks(position, sel.dead, rows=rows)

    def _report_host_bans(self, matcher, position, histories, best, hit, rows) -> None:
        for i in hit.nonzero().flatten().tolist():
            tok = int(best[i])
            ent = matcher.explain_token_ban(histories[i], tok)
            self.emit(SafetyEvent(step=position, row=rows[i] if rows is not None else i, token_id=tok,
                                  token_text=self.text(tok), rule="token_ban", entity=getattr(ent, "phrase", ent),
                                  category=getattr(ent, "category", None), severity=getattr(ent, "severity", None)))

    def report_token_bans(self, matcher, position: int, histories, scores, bitmask, rows=None) -> None:
        """A ``token_ban`` event for each row whose best-scoring token (``scores`` ``[B, V]``) the
        automaton banned (``bitmask``), naming the entity it completes."""
        if bitmask is None or not self.config.report_token_bans:
            return
        best = scores.argmax(dim=-1)
        bit = (bitmask.gather(1, (best // 32).unsqueeze(1)).squeeze(1) >> (best % 32)) & 1
        if matcher is self._device_matcher:   # recorded on the device; events at flush()
            self._records.append(("token_ban", position, None if rows is None else list(rows), best,
                                  self._ban_entities(matcher, best, bit == 0)))
            return
        self._report_host_bans(matcher, position, histories, best, bit == 0, rows)

    def report_reward_overrides(self, position: int, plain_ids, chosen_ids, live, rows=None) -> None:
        """A ``reward`` event for each live row where the reward overturned the best allowed
        candidate by log-probability (``plain_ids`` vs ``chosen_ids``, ``[B]``)."""
        for i in ((plain_ids != chosen_ids) & live).nonzero().flatten().tolist():
            tok = int(plain_ids[i])
            self.emit(SafetyEvent(step=position, row=rows[i] if rows is not None else i, token_id=tok,
                                  token_text=self.text(tok), rule="reward"))

    def report_fallbacks(self, position: int, dead, rows=None) -> None:
        """An ``all_banned_fallback`` event for each row of ``dead`` (``[B]`` bool)."""
        for i in dead.nonzero().flatten().tolist():
            self.emit(SafetyEvent(step=position, row=rows[i] if rows is not None else i, token_id=self.fallback_id,
                                  token_text=self.text(self.fallback_id), rule="all_banned_fallback"))

    def flush(self) -> None:
        """Turn the device-side records into :class:`SafetyEvent` s (one host read per record), in
        (step, row) order, and emit them. Called at the end of a generation (and between steps when
        events must reach ``on_event`` sooner). A record's ``position`` may be a 0-d tensor."""
        records, self._records = self._records, []
        events = []
        for rule, position, rows, tokens, hits in records:
            position = int(position)
            tokens, hits = (None if tokens is None else tokens.cpu()), hits.cpu()
            name = (lambda i: rows[i]) if rows is not None else (lambda i: i)
            if rule == "text_match":
                for i, j in (hits >= 0).nonzero().tolist():
                    tok, ent = int(tokens[i, j]), self._device_matcher.entity(int(hits[i, j]))
                    events.append(SafetyEvent(step=position, row=name(i), token_id=tok, token_text=self.text(tok),
                                              rule="regex" if ent.kind == "regex" else "text_match",
                                              entity=ent.phrase, category=ent.category, severity=ent.severity))
                continue
            if rule == "token_ban":            # hits: entity ids (-1: not banned)
                for i in (hits >= 0).nonzero().flatten().tolist():
                    tok, ent = int(tokens[i]), self._device_matcher.entity(int(hits[i]))
                    events.append(SafetyEvent(step=position, row=name(i), token_id=tok, token_text=self.text(tok),
                                              rule="token_ban", entity=ent.phrase, category=ent.category,
                                              severity=ent.severity))
                continue
            for i in hits.nonzero().flatten().tolist():
                tok = self.fallback_id if tokens is None else int(tokens[i])
                events.append(SafetyEvent(step=position, row=name(i), token_id=tok, token_text=self.text(tok),
                                          rule=rule))
        for e in sorted(events, key=lambda e: (e.step, e.row)):
            self.emit(e)

    def text(self, token_id) -> str:
        """The text of one token for the audit trail ("" when it cannot be decoded)."""
        if self.tokenizer is None or token_id is None:
            return ""
        try:
            return self.tokenizer.decode([int(token_id)], skip_special_tokens=False)
        except Exception:  # noqa: BLE001 - text is for the audit trail only
            return ""
