"""The row model shared by both vLLM processors: per-slot automaton states and the filtering step.

vLLM's two runners speak about requests differently (V1: batch rows that move; Model Runner V2:
persistent request slots, rows reordered every step). Both processors map their requests onto
*slots* (V1 assigns one from a free list at ``added``; V2's slot is its ``req_idx``) and call
:class:`SafetyRows`, which keeps, per slot, host bookkeeping (policy, request-only matcher, bias
scale, request number) and, per :class:`fastsafe.safety.DeviceMatcher` in use, one ``[capacity, state_width]``
int64 state tensor on the device.

Per step (:meth:`SafetyRows.apply`), for a :class:`Plan` of the batch (rows grouped by policy and
matcher, built on the host when the layout changes, its index tensors kept on the device):

1. each row's new tokens advance its states (masked: ``-1`` pads add nothing);
2. the TSDI bias row of each row's response position, times the row's scale, is subtracted;
3. every matcher's ``banned_bitmask`` of the rows' states (a row whose request-only phrases are
   still building: its interim mask, :mod:`.interim`) sets banned tokens to ``-inf``, in place
   (:mod:`.inplace`: only the banned entries on the CPU);
4. the policy's ``top_k`` candidates (one fused :func:`fastsafe.ops.safe_topk` pass) get the
   text-level check (``check_candidates``); failing ones
   become ``-inf``;
5. a row left with nothing (every token banned, or every checked candidate failing) gets EOS only;
6. the interventions are recorded on the device (:mod:`.audit`).

No step reads a device tensor back to the host (regex entities excepted: they run on the host,
as everywhere in fastsafe). States of new rows, of rows whose token list was rewritten, and of every
row after a store swap are re-derived from the last ``window`` tokens of their histories
(:meth:`SafetyRows.derive`): ``window`` masked steps for all such rows together, between steps
(an interim row's tokens are read on the host there, once, for its continuation bans).
"""
from __future__ import annotations

import numpy as np
import torch

from fastsafe.ops import safe_topk

from .audit import Audit
from .built import RequestMatchers, build_policy
from .candidates import top_candidates
from .inplace import ban_, ban_max_, fallback_
from .policies import OPT_OUT

__all__ = ["SafetyRows", "Plan", "HISTORY_WINDOW", "to_device"]

#: Tokens of a row's history its state is derived from when a row is (re)added or re-derived.
#: Longer than any realistic entity's token sequence; a phrase that starts more than this many
#: tokens before the response and ends inside it is not seen.
HISTORY_WINDOW = 64
_NEG_INF = float("-inf")


def to_device(values, dtype, device) -> torch.Tensor:
    """A host list / array as a tensor on ``device`` without waiting for the device (pinned staging on CUDA)."""
    if device.type == "cpu" and isinstance(values, list):
        return torch.tensor(values, dtype=dtype)
    t = torch.as_tensor(np.asarray(values), dtype=dtype)
    if device.type == "cpu":
        return t.clone() if isinstance(values, np.ndarray) else t
    return t.pin_memory().to(device, non_blocking=True)


def _device_text(matcher) -> bool:
    """True when the matcher's text check runs on the device (phrases, or regexes compiled to a DFA)."""
    return bool(getattr(matcher, "has_device_text", matcher.alphabet is not None))


class InterimRule:
    """The stand-in "matcher" of rows whose request-only phrases are still building (one per
    :class:`SafetyRows`): a per-slot packed mask (:mod:`.interim`) instead of an automaton state."""
    has_text_rules = False
    has_regexes = False
    has_device_text = False
    alphabet = None

    def entity(self, index):
        return None

    def __repr__(self) -> str:
        return "InterimRule()"


class _Group:
    """The rows of one policy that one matcher checks."""
    __slots__ = ("matcher", "key", "slots", "rows", "local", "host_rows", "seqs", "every", "index")

    def __init__(self, matcher, key, slots, rows, local, host_rows, seqs, every=False, index=0):
        self.matcher, self.key, self.slots, self.rows, self.local = matcher, key, slots, rows, local
        self.host_rows, self.seqs = host_rows, seqs
        self.every = every          # its rows are the plan's rows 0..num_rows-1, in order
        self.index = index          # its position in Plan.groups


class _PolicyRows:
    __slots__ = ("name", "table", "top_k", "rows", "all_rows", "scale", "groups", "host_rows", "seqs")


class Plan:
    """The batch layout of one step, grouped for :meth:`SafetyRows.apply` (device index tensors).

    Attributes:
        policies: per policy present, its rows, bias scale per row and matcher groups.
        num_rows: the logits rows of the layout.
        row_slots: host list, the slot of each logits row (-1: not a request).
        tsdi: some policy of the plan has a TSDI table (``apply`` needs ``positions``).

    A plan is cached by its layout (:meth:`SafetyRows.plan`) and dropped whenever a slot's request
    or matchers change, so everything derived from it here is computed once per layout.
    """

    def __init__(self, num_rows: int, row_slots=None):
        self.num_rows = num_rows
        self.row_slots = list(row_slots) if row_slots is not None else [-1] * num_rows
        self.policies: list[_PolicyRows] = []
        self.groups: list[_Group] = []
        self.tsdi = False
        self._host_rows = None
        self._host_slots = None

    @property
    def empty(self) -> bool:
        return not self.policies

    @property
    def host_rows(self) -> list:
        """The filtered rows (host list, ascending; computed once per plan)."""
        if self._host_rows is None:
            self._host_rows = sorted(r for pr in self.policies for r in pr.host_rows)
        return self._host_rows

    @property
    def host_slots(self) -> list:
        """The slots of :attr:`host_rows` (host list, aligned with it)."""
        if self._host_slots is None:
            self._host_slots = [self.row_slots[r] for r in self.host_rows]
        return self._host_slots


class SafetyRows:
    """Slots, states and the filtering step of one processor.

    Args:
        policies: ``{name: Policy}`` (``None``: nothing filtered).
        tokenizer: the served model's tokenizer.
        vocab_size: ``V``.
        device: the worker's device.
        capacity: slots (vLLM's ``max_num_seqs`` / ``max_num_reqs``).
        eos_token_id: the token an all-banned row emits (and that the automaton never bans).
        logger: vLLM's logger.
        window: :data:`HISTORY_WINDOW`.
        log_interval: seconds between audit summary lines.
        poll_interval: seconds between store version checks.
        log_events: log every intervention (else only the summaries).
        background_request_builds: build a new request-only phrase set's matcher in a background
            thread, the row protected by the interim rule until it is ready (:meth:`poll_swaps` puts
            it in force); False builds it in :meth:`admit` (the step waits).
    """

    def __init__(self, policies, tokenizer, *, vocab_size: int, device, capacity: int, eos_token_id, logger,
                 window: int = HISTORY_WINDOW, log_interval: float = 60.0, poll_interval: float = 0.5,
                 log_events: bool = True, background_request_builds: bool = True):
        self.policies = policies or {}
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.device = torch.device(device)
        self.capacity = int(capacity)
        self.window = int(window)
        self.logger = logger
        if isinstance(eos_token_id, (list, tuple)):
            eos_token_id = eos_token_id[0] if eos_token_id else None
        if eos_token_id is None or not 0 <= int(eos_token_id) < self.vocab_size:
            raise ValueError(f"eos_token_id: expected a token id in [0, {self.vocab_size}) for the all-banned "
                             f"fallback, got {eos_token_id!r} (the tokenizer has no EOS token)")
        self.eos_token_id = int(eos_token_id)
        self.built = {}
        for i, (name, pol) in enumerate(self.policies.items()):
            self.built[name] = build_policy(pol, tokenizer, vocab_size=self.vocab_size, device=self.device,
                                            eos_token_id=self.eos_token_id, index=i, poll_interval=poll_interval,
                                            logger=logger)
        self.request_matchers = RequestMatchers(tokenizer, vocab_size=self.vocab_size, device=self.device,
                                                eos_token_id=self.eos_token_id,
                                                background=background_request_builds, logger=logger)
        self.request_matchers.prepare()           # the interim rule's vocabulary tables, at start
        self._interim_slots: set = set()          # slots whose request-only matcher is still the interim one
        self.interim = InterimRule()
        self._interim_rule: list = [None] * self.capacity            # per interim slot: its set's StartRule
        W = (self.vocab_size + 31) // 32
        self._interim_words = torch.full((self.capacity, W), -1, dtype=torch.int32, device=self.device)
        self.interim_row_masks = 0                # row masks computed (admission / derive), for tests
        self.audit = Audit(list(self.policies) + [OPT_OUT], logger, text=self.text, log_interval=log_interval,
                           log_events=log_events)
        # host bookkeeping per slot
        self.slot_args = [None] * self.capacity
        self.slot_policy: list = [None] * self.capacity          # policy name or None
        self.slot_request_matcher = [None] * self.capacity
        self.slot_scale = np.zeros(self.capacity, dtype=np.float32)
        self.slot_seq = np.full(self.capacity, -1, dtype=np.int64)
        self._matchers_of_policy = {name: b.matcher() for name, b in self.built.items()}
        self._states: dict[int, tuple] = {}                     # id(matcher) -> (matcher, [capacity, state_width] state)
        self._plans: dict = {}
        self.step = 0
        self._next_seq = 0
        #: Bans and the fallback touch only the banned entries (CPU) rather than ``[B, V]`` passes
        #: (other devices: no host sync); see :mod:`.inplace`. Both give the same logits.
        self.sparse_writes = self.device.type == "cpu"

    # ------------------------------------------------------------------ host side
    def text(self, token_id) -> str:
        try:
            return self.tokenizer.decode([int(token_id)], skip_special_tokens=False)
        except Exception:  # noqa: BLE001 - text for the audit trail only
            return str(token_id)

    def admit(self, slot: int, args) -> bool:
        """Put a request (its :class:`~.request_args.RequestArgs`) into ``slot``; returns whether it is filtered.

        The slot's states must then be derived (:meth:`derive`) before its next step.
        """
        replaced_own = self.slot_request_matcher[slot] is not None     # V2 reuses slots without a release
        self.slot_args[slot] = args
        self.slot_seq[slot] = self._next_seq
        self._next_seq += 1
        self.audit.requests += 1
        pol = args.policy if args is not None else None
        self.slot_policy[slot] = pol
        self._interim_slots.discard(slot)
        self._interim_rule[slot] = None
        if args is not None and args.banned_phrases:
            m, final = self.request_matchers.lookup(args.banned_phrases)     # never waits for a full build
            if final:
                self.slot_request_matcher[slot] = m
            else:                                 # the interim rule: start bans now, the row's own at derive
                self.slot_request_matcher[slot] = self.interim
                self._interim_rule[slot] = m
                self._interim_words[slot] = torch.from_numpy(m.allowed).to(self.device)
                self._interim_slots.add(slot)
        else:
            self.slot_request_matcher[slot] = None
        scale = 0.0
        if pol is not None and self.built[pol].table is not None:
            scale = self.policies[pol].tsdi_scale if args.tsdi_scale is None else args.tsdi_scale
        self.slot_scale[slot] = scale
        self._plans.clear()
        if replaced_own:
            self._gc_states()
        return self.filtered(slot)

    def release(self, slot: int) -> None:
        """The request in ``slot`` left the batch (a request-only matcher no row uses any more loses its state)."""
        had_own = self.slot_request_matcher[slot] is not None
        self._interim_slots.discard(slot)
        self._interim_rule[slot] = None
        self.slot_args[slot] = None
        self.slot_policy[slot] = None
        self.slot_request_matcher[slot] = None
        self.slot_scale[slot] = 0.0
        self._plans.clear()
        if had_own:
            self._gc_states()

    def filtered(self, slot: int) -> bool:
        pol = self.slot_policy[slot]
        has_policy = pol is not None and (self._matchers_of_policy[pol] is not None or self.built[pol].table is not None)
        return has_policy or self.slot_request_matcher[slot] is not None

    def matchers_of(self, slot: int) -> list:
        out = []
        pol = self.slot_policy[slot]
        if pol is not None and self._matchers_of_policy[pol] is not None:
            out.append(self._matchers_of_policy[pol])
        if self.slot_request_matcher[slot] is not None:
            out.append(self.slot_request_matcher[slot])
        return out

    def _state(self, matcher) -> torch.Tensor:
        hit = self._states.get(id(matcher))
        if hit is None or hit[0] is not matcher:
            hit = (matcher, matcher.initial_state(self.capacity))
            self._states[id(matcher)] = hit
        return hit[1]

    def _gc_states(self) -> None:
        live = {id(m) for s in range(self.capacity) if self.slot_args[s] is not None for m in self.matchers_of(s)}
        for k in [k for k in self._states if k not in live]:
            del self._states[k]

    def state(self, matcher) -> torch.Tensor:
        """The ``[capacity, state_width]`` int64 states of ``matcher`` (device; one row per slot)."""
        return self._state(matcher)

    def mirror(self, src, dst) -> None:
        """Make each slot ``dst[i]`` a copy of slot ``src[i]`` (host lists): the same request
        bookkeeping (policy, request-only matcher, bias scale, request number) and interim mask, not
        counted as a request. The automaton states are not copied: the caller sets them (Model
        Runner V2 under speculative decoding gives each draft row such a slot, its state the owner's
        advanced by the drafts before the row)."""
        if not len(src):
            return
        for s, d in zip(src, dst):
            self.slot_args[d] = self.slot_args[s]
            self.slot_policy[d] = self.slot_policy[s]
            self.slot_request_matcher[d] = self.slot_request_matcher[s]
            self._interim_rule[d] = self._interim_rule[s]
            self.slot_scale[d] = self.slot_scale[s]
            self.slot_seq[d] = self.slot_seq[s]
        s_t = to_device(list(src), torch.int64, self.device)
        self._interim_words.index_copy_(0, to_device(list(dst), torch.int64, self.device),
                                        self._interim_words.index_select(0, s_t))
        self._plans.clear()

    # ------------------------------------------------------------------ states from histories
    def derive(self, slots, tokens: torch.Tensor, valid: torch.Tensor, matchers=None) -> None:
        """Set the states of ``slots`` (host list) from their histories.

        Args:
            slots: host list of ``n`` slots.
            tokens: ``[n, T]`` int64 on the device (the last ``T <= window`` tokens, any alignment).
            valid: ``[n, T]`` bool, which entries are tokens.
            matchers: only these matchers (default: every matcher of each slot).
        """
        if not len(slots):
            return
        by_matcher: dict[int, tuple] = {}
        for i, s in enumerate(slots):
            for m in (self.matchers_of(s) if matchers is None else [m for m in matchers if m in self.matchers_of(s)]):
                by_matcher.setdefault(id(m), (m, []))[1].append(i)
        interim = by_matcher.pop(id(self.interim), None)
        if interim is not None:
            ii = to_device(interim[1], torch.int64, self.device)
            self._derive_interim([slots[i] for i in interim[1]], tokens.index_select(0, ii),
                                 valid.index_select(0, ii))
        for m, idx in by_matcher.values():
            ii = to_device(idx, torch.int64, self.device)
            tok, ok = tokens.index_select(0, ii), valid.index_select(0, ii)
            st = m.initial_state(len(idx))
            for j in range(tok.shape[1]):
                st = torch.where(ok[:, j:j + 1], m.advance(st, tok[:, j].contiguous()), st)
            sl = to_device([slots[i] for i in idx], torch.int64, self.device)
            self._state(m).index_copy_(0, sl, st)

    def _derive_interim(self, slots, tokens: torch.Tensor, valid: torch.Tensor) -> None:
        """Interim slots: their set's start bans and the continuation bans of their own recent tokens
        (:func:`.interim.row_mask`; the tokens are read on the host: once per admission)."""
        from .interim import row_mask
        tok, ok = tokens.cpu().numpy(), valid.cpu().numpy()
        tries = self.request_matchers.tries
        for s, t, o in zip(slots, tok, ok):
            words = row_mask(tries, self._interim_rule[s], t[o].tolist())
            self._interim_words[s] = torch.from_numpy(words).to(self.device)
            self.interim_row_masks += 1

    def poll_swaps(self):
        """Store policies whose newest built matcher differs from the one in force, and request-only
        matchers whose background build is done (replacing their interim matcher): swap them in.

        Returns the slots whose states must be re-derived (host list) and the new matchers; the
        caller re-derives (:meth:`derive`) before the next step. Never waits for a build.
        """
        slots, new = [], []
        for s in sorted(self._interim_slots):
            m = self.request_matchers.ready(self.slot_args[s].banned_phrases)
            if m is None:
                continue
            self._interim_slots.discard(s)
            self._interim_rule[s] = None
            self.slot_request_matcher[s] = m
            slots.append(s)
            if all(m is not x for x in new):
                new.append(m)
            self._plans.clear()
        for name, b in self.built.items():
            if b.follower is None:
                continue
            m = b.matcher()
            if m is self._matchers_of_policy[name]:
                continue
            self.logger.info("fastsafe: policy %s: store version %s in force (%d entities)", name, m.version, len(m))
            self._matchers_of_policy[name] = m
            new.append(m)
            slots += [s for s in range(self.capacity) if self.slot_args[s] is not None and self.slot_policy[s] == name]
            self._plans.clear()
        if new:
            self._gc_states()
        return sorted(set(slots)), new

    # ------------------------------------------------------------------ plans
    def plan(self, row_slots: np.ndarray) -> Plan:
        """The :class:`Plan` of a batch whose logits row ``r`` belongs to slot ``row_slots[r]`` (-1: not a request)."""
        key = row_slots.tobytes()
        hit = self._plans.get(key)
        if hit is not None:
            return hit
        dev = self.device
        slot_list = row_slots.tolist()
        plan = Plan(len(slot_list), slot_list)
        by_policy: dict = {}
        for r, s in enumerate(slot_list):
            if s < 0 or self.slot_args[s] is None or not self.filtered(s):
                continue
            by_policy.setdefault(self.slot_policy[s], []).append((r, s))
        for pol, members in by_policy.items():
            pr = _PolicyRows()
            pr.name = OPT_OUT if pol is None else pol
            b = self.built.get(pol) if pol is not None else None
            pr.table = None if b is None else b.table
            plan.tsdi = plan.tsdi or pr.table is not None
            pr.top_k = min(10 if b is None else b.top_k, self.vocab_size)
            rows = [r for r, _ in members]
            pr.host_rows = rows
            pr.seqs = [int(self.slot_seq[s]) for _, s in members]
            pr.all_rows = rows == list(range(len(row_slots)))
            pr.rows = to_device(rows, torch.int64, dev)
            pr.scale = to_device(self.slot_scale[[s for _, s in members]], torch.float32, dev)[:, None]
            pr.groups = []
            groups: dict = {}
            for i, (r, s) in enumerate(members):
                for m in self.matchers_of(s):
                    groups.setdefault(id(m), (m, []))[1].append(i)
            for m, idx in groups.values():
                full = len(idx) == len(members)
                g_rows = [members[i][0] for i in idx]
                g = _Group(m, id(m), to_device([members[i][1] for i in idx], torch.int64, dev),
                           to_device(g_rows, torch.int64, dev),
                           None if full else to_device(idx, torch.int64, dev),
                           g_rows, [pr.seqs[i] for i in idx], every=g_rows == list(range(len(slot_list))),
                           index=len(plan.groups))
                pr.groups.append(g)
                plan.groups.append(g)
            plan.policies.append(pr)
        if len(self._plans) > 64:
            self._plans.clear()
        self._plans[key] = plan
        return plan

    # ------------------------------------------------------------------ the step
    def feed(self, plan: Plan, tokens: torch.Tensor, valid: torch.Tensor | None) -> list:
        """Advance the states of the plan's rows by their new tokens.

        Args:
            tokens: ``[num_rows, m]`` int64 on the device, aligned with the logits rows.
            valid: ``[num_rows, m]`` bool (``False``: no token at that place), or ``None`` when every
                row of the plan has ``m`` tokens.

        Returns:
            Per group of ``plan.groups``, its rows' new states (``[b, state_width]``, the rows of the
            group's slots; ``None`` for interim rows): :meth:`apply` takes them as ``states`` when
            nothing changes the states in between.
        """
        out = []
        for g in plan.groups:
            if g.matcher is self.interim:            # a mask per slot, no automaton state
                out.append(None)
                continue
            state = self._state(g.matcher)
            st = state.index_select(0, g.slots)
            tok = tokens if g.every else tokens.index_select(0, g.rows)
            ok = None if valid is None else (valid if g.every else valid.index_select(0, g.rows))
            for j in range(tok.shape[1]):
                nxt = g.matcher.advance(st, tok[:, j].contiguous())
                st = nxt if ok is None else torch.where(ok[:, j:j + 1], nxt, st)
            state.index_copy_(0, g.slots, st)
            out.append(st)
        return out

    def _record_ban(self, pr, g, st, best, hit) -> None:
        """The audit record of a group's bans (``best [b]`` int64, ``hit [b]`` bool; see :func:`.inplace.ban_`)."""
        if _device_text(g.matcher):       # the entity the banned token completes (text check of it)
            ent = g.matcher.check_candidates(st, best[:, None])[1][:, 0].to(torch.int64)
        else:
            ent = torch.full_like(best, -1)
        self.audit.record("token_ban", pr.name, self.step, g.host_rows, g.seqs,
                          torch.stack([best, hit.to(torch.int64), ent], dim=1), g.matcher)

    def _record_sparse_bans(self, pr, bans, after: torch.Tensor) -> None:
        """CPU: the policy's token-ban records from :func:`.inplace.ban_max_` results (``bans``: per
        group ``(g, st, banned_max, banned_id)``) and the rows' maxima after every ban (``after``,
        ``[rows of pr]``): a row's maximum before the bans is the larger of it and what was banned."""
        before = after.float().numpy().copy()
        for g, _, bmax, _ in bans:
            loc = slice(None) if g.local is None else g.local.numpy()
            before[loc] = np.maximum(before[loc], bmax.numpy())
        for g, st, bmax, bid in bans:
            b = bmax.numpy()
            hit = np.isfinite(b) & (b == (before if g.local is None else before[g.local.numpy()]))
            if hit.any():                     # a record only when there is an event
                self._record_ban(pr, g, st, torch.from_numpy(np.where(hit, bid.numpy(), 0)), torch.from_numpy(hit))

    def apply(self, logits: torch.Tensor, plan: Plan, positions=None, host_histories=None,
              states=None) -> torch.Tensor:
        """Filter ``logits`` (``[num_rows, V]`` float, modified in place) under ``plan``.

        Args:
            positions: ``[num_rows]`` int64 response positions on the device (needed with TSDI,
                :attr:`Plan.tsdi`).
            host_histories: ``rows -> list of token lists`` (only called for regex entities).
            states: what :meth:`feed` returned for this plan, when the states have not changed
                since (saves reading them again); default: read from the slots.

        Every edit is made in place on ``logits``: bans and the fallback in the sparse form on the
        CPU, the dense one elsewhere (:mod:`.inplace`, :attr:`sparse_writes`); the candidates of the
        text check come from one fused top-k pass (:func:`fastsafe.ops.safe_topk`) per policy.
        """
        if plan.empty:
            return logits
        if logits.dim() != 2 or logits.shape[1] != self.vocab_size:
            raise ValueError(f"logits: expected [num_rows, {self.vocab_size}] (the policies were built for "
                             f"V={self.vocab_size}), got {list(logits.shape)}")
        self.step += 1
        self.audit.steps += 1
        sparse = self.sparse_writes
        for pr in plan.policies:                     # TSDI first: the audit's row maximum is after it
            if pr.table is None:
                continue
            L = pr.table.shape[0]
            pos = positions if pr.all_rows else positions.index_select(0, pr.rows)
            bias = pr.scale * pr.table.index_select(0, pos.clamp(0, L - 1))
            if pr.all_rows:
                logits.sub_(bias)
            else:
                logits.index_copy_(0, pr.rows, logits.index_select(0, pr.rows).sub_(bias))
        # [num_rows] maxima before any ban (audit: "the best token was banned"). The CPU form takes
        # them from the rows' maxima after the bans (its top-k pass has them) and the banned values.
        row_max = logits.amax(dim=-1) if plan.groups and not sparse else None
        for pr in plan.policies:
            text_groups, bans = [], []
            for g in pr.groups:
                if g.matcher is self.interim:
                    st, words = None, self._interim_words.index_select(0, g.slots)
                else:
                    st = states[g.index] if states is not None else self._state(g.matcher).index_select(0, g.slots)
                    words = g.matcher.banned_bitmask(st)
                if sparse:
                    bans.append((g, st) + ban_max_(logits, g.rows, words))
                else:
                    best, hit = ban_(logits, g.rows, words, row_max.index_select(0, g.rows), sparse=False)
                    self._record_ban(pr, g, st, best, hit)
                if g.matcher.has_text_rules:
                    text_groups.append((g, st))
            x = logits if pr.all_rows else logits.index_select(0, pr.rows)
            if text_groups:
                if sparse:
                    vals, cands, after = top_candidates(x, pr.top_k)
                else:
                    top = safe_topk(x, pr.top_k)
                    vals, cands = top.values, top.indices
            elif bans:
                after = x.amax(dim=-1)
            if bans:
                self._record_sparse_bans(pr, bans, after)
            if text_groups:
                ok = torch.isfinite(vals)
                for g, st in text_groups:
                    c = cands if g.local is None else cands.index_select(0, g.local)
                    okg = None
                    if _device_text(g.matcher):
                        okg, ent = g.matcher.check_candidates(st, c)
                        if not sparse or (ent.numpy() >= 0).any():
                            self.audit.record("text_match", pr.name, self.step, g.host_rows, g.seqs,
                                              torch.cat([c, ent.to(torch.int64)], dim=1), g.matcher)
                    if g.matcher.has_regexes:          # the host path (RE2 over recent text): reads cands back
                        okr, events = g.matcher.host_regex_check(host_histories(g.host_rows), c.cpu())
                        okr = okr.to(c.device)
                        okg = okr if okg is None else okg & okr
                        for e in events:
                            self.audit.count_host(pr.name, "regex")
                            self.audit.log_event(pr.name, "regex", g.seqs[e.row], g.host_rows[e.row], self.step,
                                                 e.token_id, e.entity)
                    if okg is None:
                        continue
                    if g.local is None:
                        ok &= okg
                    else:
                        ok.index_copy_(0, g.local, ok.index_select(0, g.local) & okg)
                if sparse and ok.numpy().all():        # (CPU) every candidate stays: nothing to write, no row dead
                    continue
                kept = torch.where(ok, vals, _NEG_INF).to(logits.dtype)
                if pr.all_rows:
                    logits.scatter_(1, cands, kept)
                else:
                    logits.index_put_((pr.rows[:, None].expand_as(cands), cands), kept)
                dead = ~ok.any(dim=-1)
            else:
                dead = torch.isneginf(after if bans else x.amax(dim=-1))
            fallback_(logits, pr.rows, dead, self.eos_token_id, sparse=sparse, all_rows=pr.all_rows)   # never token 0
            if not sparse or bool(dead.any()):
                self.audit.record("all_banned_fallback", pr.name, self.step, pr.host_rows, pr.seqs, dead)
        return logits
