"""``SafetyLogitsProcessorV2``: fastsafe for vLLM's Model Runner V2 (imports vLLM).

``VLLM_USE_V2_MODEL_RUNNER=1 vllm serve MODEL --logits-processors fastsafe.integrations.vllm:SafetyLogitsProcessorV2``.

Rows: V2 keeps each request in a persistent slot (``req_idx``) whose committed token ids live on
the device (``req_states.all_token_ids``, valid up to ``total_len``). :meth:`add_request` admits the
request (host only); :meth:`apply_staged_writes` (once per step, after vLLM flushed the slot's ids to
the device) derives the new slots' states from the last ``window`` ids of their prefill (prompt, plus
the output so far when a preempted request comes back); each :meth:`apply` then feeds every row the
one id committed since its last step (read on the device: ``all_token_ids[slot, fed]`` where
``fed < total_len``), so nothing is read back to the host. Rows are mapped to slots through
``ctx.idx_mapping``; rows of requests the processor declined (no policy) are left alone.

Speculative decoding (several rows per request) is refused at construction: the automaton state
of a draft row would have to follow the drafts before it, which this adapter does not do yet.
"""
from __future__ import annotations

import numpy as np
import torch
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor

from .engine import to_device
from .worker import args_of, make_rows, validate

__all__ = ["SafetyLogitsProcessorV2"]


class SafetyLogitsProcessorV2(LogitsProcessor):
    """fastsafe's risk filter and TSDI for vLLM's Model Runner V2 (see the package docstring)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Refuse a request whose ``extra_args`` fastsafe arguments are bad (``ValueError`` -> HTTP 400)."""
        validate(sampling_params)

    def __init__(self, vllm_config, req_states):
        spec = getattr(vllm_config, "speculative_config", None)
        if spec is not None:
            raise ValueError("fastsafe: SafetyLogitsProcessorV2 does not support speculative decoding yet (draft rows "
                             "would need the automaton state of the drafts before them); serve without "
                             "--speculative-config")
        self.req_states = req_states
        self.device = torch.device(req_states.device)
        self.capacity = int(req_states.max_num_reqs)
        self.rows, self.policies = make_rows(vllm_config, device=self.device, capacity=self.capacity,
                                             vocab_size=int(req_states.vocab_size))
        self._fed = torch.zeros(self.capacity, dtype=torch.int64, device=self.device)   # ids each slot's states saw
        self._pending: list[int] = []
        self._filtered = np.zeros(self.capacity, dtype=bool)

    # ------------------------------------------------------------------ admission
    def add_request(self, req_idx: int, sampling_params) -> bool:
        """Admit the request in slot ``req_idx`` (everything of its previous occupant is overwritten)."""
        rows = self.rows
        if rows is None:
            return False
        f = rows.admit(req_idx, args_of(sampling_params, self.policies, rows.logger))
        self._filtered[req_idx] = f
        if f:
            self._pending.append(req_idx)
        return f

    def _derive(self, slots, lengths, matchers=None) -> None:
        """States of ``slots`` from their committed ids ``[0, lengths)`` (the last ``window`` of them), on the device."""
        rows = self.rows
        W = rows.window
        T = int(min(W, max(lengths))) if len(lengths) else 0
        if T == 0:
            rows.derive(list(slots), torch.zeros(len(slots), 0, dtype=torch.int64, device=self.device),
                        torch.zeros(len(slots), 0, dtype=torch.bool, device=self.device), matchers=matchers)
            return
        ids = self.req_states.all_token_ids.gpu
        lengths = np.asarray(lengths, dtype=np.int64)
        start = lengths - T                                     # right-aligned window
        col = start[:, None] + np.arange(T)[None, :]
        ok = col >= 0
        sl = to_device(np.asarray(slots, dtype=np.int64), torch.int64, self.device)
        dcol = to_device(np.clip(col, 0, ids.shape[1] - 1), torch.int64, self.device)
        tok = ids[sl[:, None], dcol].to(torch.int64)
        rows.derive(list(slots), tok, to_device(ok, torch.bool, self.device), matchers=matchers)
        self._fed.index_copy_(0, sl, to_device(lengths, torch.int64, self.device))

    def apply_staged_writes(self) -> None:
        """Between steps: count finished audit records, derive new slots' states, swap store versions."""
        rows = self.rows
        if rows is None:
            return
        rows.audit.drain()
        if self._pending:
            slots, self._pending = self._pending, []
            self._derive(slots, self.req_states.prefill_len.np[slots].astype(np.int64))
        slots, new = rows.poll_swaps()
        if slots:             # a store swap: the slots' committed lengths are read back once (rare)
            lengths = self.req_states.total_len.gpu[torch.as_tensor(slots, device=self.device)].cpu().numpy()
            self._derive(slots, lengths, matchers=new)

    # ------------------------------------------------------------------ the step
    def _histories(self, host_rows, row_slots):
        """Regex path only (host): the rows' committed ids, read back from the device."""
        ids = self.req_states.all_token_ids.gpu
        total = self.req_states.total_len.gpu
        out = []
        for r in host_rows:
            s = int(row_slots[r])
            n = int(total[s])
            out.append(ids[s, :n].tolist())
        return out

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        rows = self.rows
        if rows is None:
            return logits
        idx_np = np.asarray(ctx.idx_mapping_np, dtype=np.int64)
        if not self._filtered[idx_np].any():
            return logits
        n_rows, n_reqs = logits.shape[0], len(idx_np)
        row_slots = np.full(n_rows, -1, dtype=np.int64)
        row_slots[:min(n_rows, n_reqs)] = idx_np[:n_rows]
        plan = rows.plan(row_slots)
        if plan.empty:
            return logits
        slots = ctx.idx_mapping[:n_rows].to(torch.int64)
        total = self.req_states.total_len.gpu[slots].to(torch.int64)
        fed = self._fed[slots]
        active = fed < total
        ids = self.req_states.all_token_ids.gpu
        tok = ids[slots, fed.clamp(max=ids.shape[1] - 1)].to(torch.int64)
        self._fed.index_copy_(0, slots, fed + active.to(torch.int64))
        if n_rows > n_reqs:
            pad = n_rows - n_reqs
            tok = torch.cat([tok, tok.new_full((pad,), -1)])
            active = torch.cat([active, active.new_zeros(pad)])
            total = torch.cat([total, total.new_zeros(pad)])
            slots = torch.cat([slots, slots.new_zeros(pad)])
        rows.feed(plan, tok[:, None], active[:, None])
        positions = total - self.req_states.prompt_len.gpu[slots].to(torch.int64)
        return rows.apply(logits, plan, positions=positions,
                          host_histories=lambda host_rows: self._histories(host_rows, row_slots))
