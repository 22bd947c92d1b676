"""``SafetyStep``: the per-step safety work, one object for every decoding path.

Both callers — :class:`fastsafe.SafeLogitsProcessor` (Hugging Face ``generate``, which needs
``[B, V]`` scores back) and :func:`fastsafe.generate` (fastsafe's own loop, top-k form) — run the
same rules through it: the TSDI bias row of each response position (positions past ``L`` per
``tsdi_beyond``), the token-level bans of the risk automaton, the text-level check of the top-k
candidates, the safety reward (dense ``[B, V]`` or per candidate), the all-banned fallback, and the
audit events with their callback. The parts come from :mod:`fastsafe.safety_builder` (cached by
content); the step itself holds only the events of one generation.

Example:
    >>> step = SafetyStep(cfg, tok, vocab_size=V, device=logits.device, fallback_id=eos)
    >>> matcher = step.matcher()
    >>> mask = step.banned_bitmask(matcher, histories, logits.device)     # [B, ceil(V/32)] or None
    >>> res = safe_topk(logits, k, bias_table=step.bias_table(position), positions=position, banned_bitmask=mask)
    >>> allowed = step.check_candidates(matcher, histories, res.indices, position)
"""
from __future__ import annotations

import torch

from .ops.bitmask import fit_bitmask
from .safety.events import SafetyEvent
from .safety.device_follow import RowStates
from .safety_builder import bias_table_on, build_matcher, device_matcher_source, resolve_reward

__all__ = ["SafetyStep"]


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
        self.state = None                   # [B, 6] automaton states of the rows (device matcher only)
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
        if config.tsdi is not None:
            config.tsdi.check_vocab(self.vocab_size, what=f"the {logits_name}")
            self._table = bias_table_on(config.tsdi, self.device)
        self.reward = resolve_reward(config)
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

    def banned_bitmask(self, matcher, histories, device):
        """``[B, ceil(V/32)]`` int32 token bans of the rows (bit 1 = allowed), or ``None``."""
        if matcher is None:
            return None
        if matcher is self._device_matcher:
            return matcher.banned_bitmask(self._live_state(None if histories is None else len(histories))).to(device)
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
        if matcher is None:
            return None
        if matcher is self._device_matcher:
            return self._device_check(matcher, histories, candidates, position, rows)
        if not matcher.has_text_rules:
            return None
        allowed, events = matcher.check_candidates(histories, candidates)
        for e in events:
            e.step = position
            e.row = rows[e.row] if rows is not None else e.row
            self.emit(e)
        return allowed.to(candidates.device)

    def _device_check(self, dm, histories, candidates, position, rows):
        if not dm.has_text_rules:
            return None
        has_text = dm.alphabet is not None
        allowed = torch.ones(candidates.shape, dtype=torch.bool, device=candidates.device)
        if has_text:
            ok, entity = dm.check_candidates(self._live_state(candidates.shape[0]), candidates.to(dm.device))
            self._records.append(("text_match", position, None if rows is None else list(rows), candidates, entity))
            allowed &= ok.to(candidates.device)
        if dm.has_regexes:                   # the one host part: regex entities (RE2)
            ok, events = dm.host_regex_check(histories, candidates)
            for e in events:
                e.step = position
                e.row = rows[e.row] if rows is not None else e.row
                self.emit(e)
            allowed &= ok.to(candidates.device)
        return allowed

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
        """Raise when a row has nothing left to emit (``dead`` ``[B]`` bool) and there is no fallback."""
        if self.fallback_id is None and bool(dead.any()):
            ids = dead.nonzero().flatten().tolist()
            ids = [rows[i] for i in ids] if rows is not None else ids
            raise ValueError(f"every candidate is banned in rows {ids[:16]} and there is no EOS token to fall back "
                             f"to; pass eos_token_id= or SafetyConfig(fallback_token_id=...)")

    # ------------------------------------------------------------------ events
    def emit(self, event) -> None:
        """Record ``event`` and pass it to ``config.on_event`` (or to the ``sink`` given)."""
        if self._sink is not None:
            self._sink(event)
            return
        self.events.append(event)
        if self.config.on_event is not None:
            self.config.on_event(event)

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
        for i in (bit == 0).nonzero().flatten().tolist():
            tok = int(best[i])
            ent = matcher.explain_token_ban(histories[i], tok)
            self.emit(SafetyEvent(step=position, row=rows[i] if rows is not None else i, token_id=tok,
                                  token_text=self.text(tok), rule="token_ban", entity=getattr(ent, "phrase", ent),
                                  category=getattr(ent, "category", None), severity=getattr(ent, "severity", None)))

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
        events must reach ``on_event`` sooner)."""
        records, self._records = self._records, []
        events = []
        for rule, position, rows, tokens, hits in records:
            tokens, hits = tokens.cpu(), hits.cpu()
            if rule == "token_ban":            # hits: entity ids (-1: not banned)
                for i in (hits >= 0).nonzero().flatten().tolist():
                    tok, ent = int(tokens[i]), self._device_matcher.entity(int(hits[i]))
                    events.append(SafetyEvent(step=position, row=rows[i] if rows is not None else i, token_id=tok,
                                              token_text=self.text(tok), rule="token_ban", entity=ent.phrase,
                                              category=ent.category, severity=ent.severity))
            else:
                for i, j in (hits >= 0).nonzero().tolist():
                    tok, ent = int(tokens[i, j]), self._device_matcher.entity(int(hits[i, j]))
                    events.append(SafetyEvent(step=position, row=rows[i] if rows is not None else i, token_id=tok,
                                              token_text=self.text(tok), rule="text_match", entity=ent.phrase,
                                              category=ent.category, severity=ent.severity))
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
