"""``SafetyLogitsProcessorV2``: fastsafe for vLLM's Model Runner V2 (imports vLLM).

``VLLM_USE_V2_MODEL_RUNNER=1 vllm serve MODEL --logits-processors fastsafe.integrations.vllm:SafetyLogitsProcessorV2``.

Rows: V2 keeps each request in a persistent slot (``req_idx``) whose committed token ids live on
the device (``req_states.all_token_ids``, valid up to ``total_len``). :meth:`add_request` admits the
request (host only); :meth:`apply_staged_writes` (once per step, after vLLM flushed the slot's ids to
the device) derives the new slots' states from the last ``window`` ids of their prefill (prompt, plus
the output so far when a preempted request comes back); each :meth:`apply` then feeds every row the
ids committed since its last step (read on the device: ``all_token_ids[slot, fed:total_len]``), so
nothing is read back to the host. Rows are mapped to slots through ``ctx.idx_mapping``; rows of
requests the processor declined (no policy) are left alone.

Speculative decoding (``--speculative-config``): a request owns one logits row per draft token plus
the bonus row (``ctx.expanded_idx_mapping`` / ``ctx.expanded_local_pos``). Row ``j`` of a request is
filtered under the state reached after its committed ids *and* the drafts fed at rows ``1..j``
(``ctx.input_ids``): each draft row has a slot of its own beyond the ``max_num_reqs`` request slots
(a mirror of its request's bookkeeping, :meth:`SafetyRows.mirror`), whose state is the request's
committed state advanced by those drafts on the device, each step (``num_speculative_tokens``
masked advances per matcher; placeholder drafts ``-1`` add nothing). Its TSDI position is the
request's response position plus ``j``; the text check, the all-banned EOS fallback and the
audit are per row as without drafts. The committed state advances only by what vLLM commits
(accepted drafts and the bonus token appear in ``all_token_ids`` / ``total_len`` on the next
step, up to ``num_speculative_tokens + 1`` ids a step), never by rejected drafts. A draft the
filter bans has target probability 0 and is rejected by vLLM's rejection sampler, so the rows
after it are discarded: that is why ``rejection_sample_method = "synthetic"`` (a benchmarking mode
that accepts drafts at fixed rates whatever the target logits say) is refused at construction.
A step with drafts reads ``ctx.expanded_local_pos`` back to the host once (``[num_rows]`` int32:
the row layout, which vLLM may choose on the device under adaptive verification); a step with one
row per request (no drafts) does not. Request-only phrases under the interim rule
(:mod:`.interim`) follow drafts as they follow committed ids: the row mask is fixed at admission
(start bans of every phrase, continuation bans of the prompt's tail), so a draft row gets its
request's mask. Regex entities (host path) see the committed ids plus the row's drafts.
"""
from __future__ import annotations

import numpy as np
import torch
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor

from .engine import to_device
from .worker import args_of, make_rows, validate

__all__ = ["SafetyLogitsProcessorV2"]


def _num_speculative_tokens(vllm_config) -> int:
    """Draft tokens per request and step (0 without speculative decoding); refuses what cannot be filtered."""
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is None:
        return 0
    k = getattr(spec, "num_speculative_tokens", None)
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"fastsafe: speculative_config.num_speculative_tokens: expected an int >= 0, got {k!r}")
    method = getattr(spec, "rejection_sample_method", "standard")
    if method == "synthetic":
        raise ValueError("fastsafe: SafetyLogitsProcessorV2 cannot filter speculative decoding with "
                         "rejection_sample_method='synthetic' (drafts are accepted at fixed rates whatever the "
                         "filtered logits say, so banned drafts would be emitted); use the standard or block method")
    return k


class SafetyLogitsProcessorV2(LogitsProcessor):
    """fastsafe's risk filter and TSDI for vLLM's Model Runner V2 (see the module docstring)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Refuse a request whose ``extra_args`` fastsafe arguments are bad (``ValueError`` -> HTTP 400)."""
        validate(sampling_params)

    def __init__(self, vllm_config, req_states):
        self.num_spec = _num_speculative_tokens(vllm_config)
        self.req_states = req_states
        self.device = torch.device(req_states.device)
        self.capacity = int(req_states.max_num_reqs)            # request slots; draft-row slots follow them
        self.rows, self.policies = make_rows(vllm_config, device=self.device,
                                             capacity=self.capacity * (1 + self.num_spec),
                                             vocab_size=int(req_states.vocab_size))
        self._fed = torch.zeros(self.capacity, dtype=torch.int64, device=self.device)   # ids each slot's states saw
        self._steps = torch.arange(1 + self.num_spec, dtype=torch.int64, device=self.device)
        self._pending: list[int] = []
        self._filtered = np.zeros(self.capacity, dtype=bool)
        self._schedules: dict = {}           # id(plan) -> (plan, draft-state schedule)
        self.layout_reads = 0                # steps whose row layout was read back (steps with drafts)

    def draft_slot(self, slot, j):
        """The slot of draft row ``j`` (``1..num_speculative_tokens``) of the request in ``slot`` (ints or arrays)."""
        return self.capacity + slot * self.num_spec + (j - 1)

    def _mirror(self, slots) -> None:
        if self.num_spec and len(slots):
            src = [s for s in slots for _ in range(self.num_spec)]
            dst = [self.draft_slot(s, j) for s in slots for j in range(1, self.num_spec + 1)]
            self.rows.mirror(src, dst)

    # ------------------------------------------------------------------ admission
    def add_request(self, req_idx: int, sampling_params) -> bool:
        """Admit the request in slot ``req_idx`` (everything of its previous occupant is overwritten)."""
        rows = self.rows
        if rows is None:
            return False
        f = rows.admit(req_idx, args_of(sampling_params, self.policies, rows.logger))
        self._filtered[req_idx] = f
        self._mirror([req_idx])
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
        derived = []
        if self._pending:
            slots, self._pending = self._pending, []
            self._derive(slots, self.req_states.prefill_len.np[slots].astype(np.int64))
            derived += slots
        slots, new = rows.poll_swaps()
        slots = [s for s in slots if s < self.capacity]          # draft-row slots are set every step
        if slots:             # a store swap: the slots' committed lengths are read back once (rare)
            lengths = self.req_states.total_len.gpu[torch.as_tensor(slots, device=self.device)].cpu().numpy()
            self._derive(slots, lengths, matchers=new)
            derived += slots
        self._mirror(sorted(set(derived)))      # draft rows: the interim mask of the derivation, a swapped matcher

    # ------------------------------------------------------------------ the step
    def _histories(self, host_rows, row_slots, drafts=None):
        """Regex path only (host): the rows' committed ids (plus, for draft rows, the drafts before them)."""
        ids = self.req_states.all_token_ids.gpu
        total = self.req_states.total_len.gpu
        if drafts is not None:
            owner, local, input_ids = drafts
            fed = input_ids.cpu().tolist()
        out = []
        for r in host_rows:
            s = int(row_slots[r] if drafts is None else owner[r])
            n = int(total[s])
            h = ids[s, :n].tolist()
            if drafts is not None and local[r]:
                h += [t for t in fed[r - int(local[r]) + 1:r + 1] if t >= 0]
            out.append(h)
        return out

    def _feed(self, plan, slots) -> torch.Tensor:
        """Advance the request slots' states by the ids committed since their last step; returns ``total_len``."""
        total = self.req_states.total_len.gpu[slots].to(torch.int64)
        fed = self._fed[slots]
        ids = self.req_states.all_token_ids.gpu
        if self.num_spec == 0:                                   # one id per step at most
            active = fed < total
            tok = ids[slots, fed.clamp(max=ids.shape[1] - 1)].to(torch.int64)
            self._fed.index_copy_(0, slots, fed + active.to(torch.int64))
            self.rows.feed(plan, tok[:, None], active[:, None])
            return total
        col = fed[:, None] + self._steps[None, :]             # accepted drafts + bonus: up to num_spec + 1 ids
        active = col < total[:, None]
        tok = ids[slots[:, None], col.clamp(max=ids.shape[1] - 1)].to(torch.int64)
        self._fed.index_copy_(0, slots, fed + active.sum(dim=1))
        self.rows.feed(plan, tok, active)
        return total

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        rows = self.rows
        if rows is None:
            return logits
        idx_np = np.asarray(ctx.idx_mapping_np, dtype=np.int64)
        if not self._filtered[idx_np].any():
            return logits
        n_rows, n_reqs = logits.shape[0], len(idx_np)
        req_plan = rows.plan(idx_np)
        if req_plan.empty:
            return logits
        slots = ctx.idx_mapping[:n_reqs].to(torch.int64)
        total = self._feed(req_plan, slots)
        positions = total - self.req_states.prompt_len.gpu[slots].to(torch.int64)
        if n_rows == n_reqs:                                  # one row per request, in batch order
            return rows.apply(logits, req_plan, positions=positions,
                              host_histories=lambda host_rows: self._histories(host_rows, idx_np))
        return self._apply_drafts(logits, ctx, idx_np, positions)

    def _apply_drafts(self, logits, ctx, idx_np, positions):
        """A step with draft rows: the row layout from ``expanded_local_pos`` (one read back), draft states, apply."""
        rows = self.rows
        n_rows, n_reqs = logits.shape[0], len(idx_np)
        local = ctx.expanded_local_pos[:n_rows].cpu().numpy().astype(np.int64)
        self.layout_reads += 1
        first = local == 0
        if n_rows == 0 or not first[0] or int(first.sum()) != n_reqs or int(local.max()) > self.num_spec:
            raise ValueError(f"ctx.expanded_local_pos: expected {n_reqs} runs 0, 1, ... of at most "
                             f"{self.num_spec + 1} rows (num_speculative_tokens={self.num_spec}), got "
                             f"{local.tolist()}")
        batch = np.cumsum(first) - 1                           # row -> batch position
        owner = idx_np[batch]
        vslot = np.where(first, owner, self.draft_slot(owner, np.maximum(local, 1)))
        plan = rows.plan(vslot)
        if plan.empty:
            return logits
        self._draft_states(plan, vslot, local, ctx.input_ids[:n_rows])
        dev_batch = to_device(batch, torch.int64, self.device)
        pos = positions.index_select(0, dev_batch) + to_device(local, torch.int64, self.device)
        drafts = (owner, local, ctx.input_ids[:n_rows])
        return rows.apply(logits, plan, positions=pos,
                          host_histories=lambda host_rows: self._histories(host_rows, vslot, drafts))

    def _draft_states(self, plan, vslot, local, input_ids) -> None:
        """Set each draft row's state: its previous row's state advanced by the id fed at the row (device)."""
        hit = self._schedules.get(id(plan))
        if hit is None or hit[0] is not plan:
            hit = (plan, self._schedule(plan, vslot, local))
            if len(self._schedules) > 64:
                self._schedules.clear()
            self._schedules[id(plan)] = hit
        tok = input_ids.to(torch.int64)
        for m, levels in hit[1]:
            state = self.rows.state(m)
            for src, dst, rws in levels:
                t = tok.index_select(0, rws)
                st = state.index_select(0, src)
                state.index_copy_(0, dst, torch.where((t >= 0)[:, None], m.advance(st, t), st))

    def _schedule(self, plan, vslot, local) -> list:
        """Per matcher of the plan: per draft level ``j``, (previous rows' slots, the rows' slots, the rows)."""
        by_matcher: dict = {}
        for g in plan.groups:
            if g.matcher is self.rows.interim:                 # a fixed mask per request (mirrored)
                continue
            rs = by_matcher.setdefault(id(g.matcher), (g.matcher, set()))[1]
            rs.update(r for r in g.host_rows if local[r] > 0)
        out = []
        for m, rs in by_matcher.values():
            if not rs:
                continue
            rs = np.asarray(sorted(rs), dtype=np.int64)
            levels = []
            for j in range(1, int(local[rs].max()) + 1):
                r = rs[local[rs] == j]
                levels.append((to_device(vslot[r - 1], torch.int64, self.device),
                               to_device(vslot[r], torch.int64, self.device),
                               to_device(r, torch.int64, self.device)))
            out.append((m, levels))
        return out
