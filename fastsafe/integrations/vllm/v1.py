"""``SafetyLogitsProcessor``: fastsafe for vLLM's V1 model runner (imports vLLM).

``vllm serve MODEL --logits-processors fastsafe.integrations.vllm:SafetyLogitsProcessor`` or
``LLM(MODEL, logits_processors=[SafetyLogitsProcessor])``.

Rows: vLLM's persistent batch hands every request to :meth:`update_state` once (``added``: index,
``SamplingParams``, prompt ids, and a *reference* to the output-id list it appends to), then moves
(swap / one-way) and removes rows. The processor gives each request a slot of
:class:`~.engine.SafetyRows` for the time it is in the batch, so a move is a host-side relabel (no
device work). At :meth:`apply`, each row's new output ids (those past what its state has seen) are
fed to its automata; async scheduling's ``-1`` placeholders are not fed until vLLM has replaced them
(it does so right before the logits processors run). A list that shrank or whose last seen id
changed (tokens discarded after a KV-load failure) has its state re-derived; so does a request that
comes back after preemption (vLLM re-adds it with its tokens so far).
"""
from __future__ import annotations

import numpy as np
import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from .engine import to_device
from .worker import args_of, make_rows, validate, vocab_size_of

__all__ = ["SafetyLogitsProcessor"]


class SafetyLogitsProcessor(LogitsProcessor):
    """fastsafe's risk filter and TSDI for vLLM's V1 model runner (see the package docstring)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Refuse a request whose ``extra_args`` fastsafe arguments are bad (``ValueError`` -> HTTP 400)."""
        validate(sampling_params)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.device = torch.device(device)
        capacity = int(vllm_config.scheduler_config.max_num_seqs)
        self.capacity = capacity
        self.rows, self.policies = make_rows(vllm_config, device=self.device, capacity=capacity,
                                             vocab_size=vocab_size_of(vllm_config))
        self._row_slot = np.full(capacity, -1, dtype=np.int64)     # batch row -> slot
        self._free = list(range(capacity - 1, -1, -1))
        self._prompt: list = [None] * capacity                      # per slot
        self._out: list = [None] * capacity
        self._fed = [0] * capacity                                  # output ids the states have seen
        self._last = [-2] * capacity                                # the last of them (-2: none)
        self._num_filtered = 0

    def is_argmax_invariant(self) -> bool:
        """False: bans and TSDI change the argmax."""
        return False

    # ------------------------------------------------------------------ batch changes
    def _release_row(self, row: int) -> None:
        slot = int(self._row_slot[row])
        if slot < 0:
            return
        self._row_slot[row] = -1
        if self.rows.filtered(slot):
            self._num_filtered -= 1
        self.rows.release(slot)
        self._prompt[slot] = self._out[slot] = None
        self._free.append(slot)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        rows = self.rows
        if rows is None:
            return
        rows.audit.drain()
        pending = []
        if batch_update is not None:
            for row in batch_update.removed:
                self._release_row(row)
            for row, params, prompt_ids, output_ids in batch_update.added:
                self._release_row(row)               # an added request may replace the row's occupant
                slot = self._free.pop()
                self._row_slot[row] = slot
                self._prompt[slot] = list(prompt_ids) if prompt_ids is not None else []
                self._out[slot] = output_ids
                if rows.admit(slot, args_of(params, self.policies, rows.logger)):
                    self._num_filtered += 1
                    pending.append(slot)
            for a, b, direction in batch_update.moved:
                if direction == MoveDirectionality.SWAP:
                    self._row_slot[a], self._row_slot[b] = self._row_slot[b], self._row_slot[a]
                else:
                    if b != a:
                        self._release_row(b)
                        self._row_slot[b] = self._row_slot[a]
                        self._row_slot[a] = -1
        slots, new = rows.poll_swaps()
        if slots:
            self._derive(slots, matchers=new)
        if pending:
            self._derive(pending)

    def _known(self, slot: int) -> list:
        out = self._out[slot]
        n = len(out)
        while n and out[n - 1] == -1:          # async scheduling: not sampled yet (seen at the next step)
            n -= 1
        return out[:n]

    def _derive(self, slots, matchers=None) -> None:
        rows, W = self.rows, self.rows.window
        hist = []
        for s in slots:
            known = self._known(s)
            if -1 in known:
                known = known[:known.index(-1)]
            self._fed[s] = len(known)
            self._last[s] = known[-1] if known else -2
            hist.append((self._prompt[s] + known)[-W:])
        T = max((len(h) for h in hist), default=0)
        tok = np.zeros((len(hist), T), dtype=np.int64)
        ok = np.zeros((len(hist), T), dtype=bool)
        for i, h in enumerate(hist):
            if h:
                tok[i, T - len(h):] = h
                ok[i, T - len(h):] = True
        rows.derive(list(slots), to_device(tok, torch.int64, self.device), to_device(ok, torch.bool, self.device),
                    matchers=matchers)

    def _histories(self, host_rows):
        return [self._prompt[s] + self._known(s) for s in (int(self._row_slot[r]) for r in host_rows)]

    def _new_ids(self, slots) -> tuple[list, list]:
        """Per slot, the output ids its states have not seen (up to the first ``-1``), and the slots
        whose list shrank or whose last seen id changed (to be re-derived; no new ids)."""
        outs, fed, last = self._out, self._fed, self._last
        new, redo = [], []
        for s in slots:
            out, n = outs[s], fed[s]
            if len(out) < n or (n and out[n - 1] != last[s]):
                redo.append(s)                 # ids were discarded / rewritten: start again from the ids
                new.append(())
                continue
            tail = out[n:]
            if -1 in tail:
                tail = tail[:tail.index(-1)]
            new.append(tail)
        return new, redo

    # ------------------------------------------------------------------ the step
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rows = self.rows
        if rows is None or self._num_filtered == 0:
            return logits
        B = logits.shape[0]
        plan = rows.plan(self._row_slot[:B])
        if plan.empty:
            return logits
        host_rows, slots = plan.host_rows, plan.host_slots
        new, redo = self._new_ids(slots)
        if redo:
            self._derive(redo)
        fed, last = self._fed, self._last
        lens = [len(t) for t in new]
        for s, t, n in zip(slots, new, lens):
            if n:
                fed[s] += n
                last[s] = t[-1]
        m = max(lens, default=0)
        states = None
        if m:
            if len(host_rows) == B and min(lens) == m:      # the usual step: m ids (one) in every row
                states = rows.feed(plan, to_device(new, torch.int64, self.device), None)
            else:
                tok = np.full((B, m), -1, dtype=np.int64)
                for r, t in zip(host_rows, new):
                    if t:
                        tok[r, :len(t)] = t
                dtok = to_device(tok, torch.int64, self.device)
                states = rows.feed(plan, dtok, dtok >= 0)
        positions = None
        if plan.tsdi:
            pos = np.zeros(B, dtype=np.int64)
            pos[host_rows] = [fed[s] for s in slots]
            positions = to_device(pos, torch.int64, self.device)
        return rows.apply(logits, plan, positions=positions, host_histories=self._histories, states=states)
