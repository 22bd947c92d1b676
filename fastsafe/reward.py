"""Safety rewards for reward-guided decoding (Algorithm 1 of *Truly Safe & Truly Helpful*).

At each step the candidates are scored ``s(v) = log p(v | x) + w * r(x, v)``; disallowed
candidates get ``-inf``; the pick is greedy or sampled over ``s``. A reward comes in one of two
forms (the ``form`` attribute):

* ``"candidate"``: ``score_candidates(histories, candidate_ids, tokenizer) -> [B, k]`` float32,
  the reward of appending each of the ``k`` candidates to each row. Adapters:
  :class:`SequenceClassifierReward` (any Hugging Face sequence classifier over the last
  ``context_tokens`` tokens plus each candidate, batched as one ``B * k`` forward, reusing the
  shared prefix when the classifier is a causal LM with a score head) and
  :class:`ProfanityReward` (alt-profanity-check, the default scorer; scikit-learn).
* ``"dense"``: ``score_dense(histories, tokenizer) -> [B, V]`` float32 in one forward.
  Adapter: :class:`CausalLMDenseReward` (a causal LM as an autoregressive reward,
  ``r(x, v) = log p_reward(v | x)``), added inside the fused op (``dense_reward``).

``histories`` are lists of ``B`` token-id lists of the *policy* tokenizer (prompt without padding
plus the tokens generated so far); ``tokenizer`` is the policy's tokenizer, for adapters that
need text.

Example:
    >>> from fastsafe.reward import SequenceClassifierReward
    >>> reward = SequenceClassifierReward(classifier, classifier_tokenizer, safe_label="safe")
    >>> cfg = SafetyConfig(reward_model=reward, reward_weight=2.0, top_k=10)
"""
from __future__ import annotations

import copy
import math
import numbers
import os
from typing import Callable, Protocol, runtime_checkable

import torch

from .models_cache import accepts, cache_argument, cache_kwargs, output_cache
from .ops.validate import token_rows

__all__ = ["SafetyReward", "CandidateReward", "DenseReward", "SequenceClassifierReward", "CausalLMDenseReward",
           "ProfanityReward", "CallableReward", "load_reward", "FORMS"]

FORMS = ("candidate", "dense")


def _candidate_rows(histories, candidate_ids) -> tuple[int, int]:
    """``(B, k)`` of ``candidate_ids`` ``[B, k]`` (a tensor), with one history per row."""
    if not isinstance(candidate_ids, torch.Tensor) or candidate_ids.dim() != 2:
        raise ValueError(f"candidate_ids: expected a [B, k] tensor, got {getattr(candidate_ids, 'shape', candidate_ids)!r}")
    B, k = candidate_ids.shape
    if len(histories) != B:
        raise ValueError(f"histories: expected {B} rows (one per candidate row), got {len(histories)}")
    return B, k


@runtime_checkable
class SafetyReward(Protocol):
    """What fastsafe needs from a safety reward: a ``form`` and the matching scoring method.

    ``form == "candidate"``: ``score_candidates(histories, candidate_ids, tokenizer)`` with
    ``candidate_ids`` a ``[B, k]`` int64 tensor, returns ``[B, k]`` float (higher = safer).
    ``form == "dense"``: ``score_dense(histories, tokenizer)`` returns ``[B, V]`` float.
    """

    form: str


@runtime_checkable
class CandidateReward(Protocol):
    form: str

    def score_candidates(self, histories: list, candidate_ids: torch.Tensor, tokenizer) -> torch.Tensor: ...


@runtime_checkable
class DenseReward(Protocol):
    form: str

    def score_dense(self, histories: list, tokenizer) -> torch.Tensor: ...


def _check_context(context_tokens) -> int:
    if isinstance(context_tokens, bool) or not isinstance(context_tokens, numbers.Integral) or context_tokens < 1:
        raise ValueError(f"context_tokens: expected an int >= 1, got {context_tokens!r}")
    return int(context_tokens)


def _pad(rows: list[list[int]], pad_id: int, device, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, T]`` ids and attention mask of ``rows`` padded on ``side`` with ``pad_id``."""
    T = max(1, max((len(r) for r in rows), default=1))
    ids = torch.full((len(rows), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            cols = slice(T - len(r), T) if side == "left" else slice(0, len(r))
            ids[b, cols] = torch.tensor(r, dtype=torch.long)
            mask[b, cols] = 1
    return ids.to(device), mask.to(device)


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


class _PrefixCache:
    """KV cache of a causal model over the rows' histories, advanced incrementally between steps.

    ``advance(histories)`` returns ``(past, mask, last_output)`` for exactly those histories:
    when every history is a cached one plus one new token (rows may be dropped, reordered or
    repeated, as after finished rows leave or beams are reordered) only the new tokens run;
    otherwise the histories are prefilled. Used only while no history is longer than the
    reward's ``context_tokens`` (then nothing is truncated and the result equals a full forward);
    longer histories are recomputed over their last ``context_tokens`` tokens by the caller.
    """

    def __init__(self, forward, pad_id: int):
        self.forward = forward          # forward(ids, mask, position_ids, past) -> (output, past)
        self.pad_id = pad_id
        self.reset()

    def reset(self) -> None:
        self.rows: list[tuple] | None = None
        self.past = self.mask = self.last_pos = None

    def advance(self, histories: list[list[int]], device):
        index = {r: i for i, r in enumerate(self.rows)} if self.rows is not None else None
        pick = None
        if index is not None:
            pick = [index.get(tuple(h[:-1])) for h in histories]
            if any(i is None for i in pick):
                pick = None
        if pick is None:
            ids, mask = _pad(histories, self.pad_id, device)
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            out, past = self.forward(ids, mask, pos, None)
            self.past, self.mask, self.last_pos = past, mask, pos[:, -1]
        else:
            sel = torch.tensor(pick, dtype=torch.long, device=device)
            if pick != list(range(len(self.rows))):
                if hasattr(self.past, "batch_select_indices"):
                    self.past.batch_select_indices(sel)
                else:
                    self.past.reorder_cache(sel)
                self.mask, self.last_pos = self.mask.index_select(0, sel), self.last_pos.index_select(0, sel)
            new = torch.tensor([[h[-1]] for h in histories], dtype=torch.long, device=device)
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(histories), 1)], dim=1)
            self.last_pos = self.last_pos + 1
            out, self.past = self.forward(new, self.mask, self.last_pos.unsqueeze(1), self.past)
        self.rows = [tuple(h) for h in histories]
        return self.past, self.mask, out


class CallableReward:
    """Wrap a plain function as a reward.

    Args:
        fn: ``fn(histories, candidate_ids, tokenizer) -> [B, k]`` for ``form="candidate"``, or
            ``fn(histories, tokenizer) -> [B, V]`` for ``form="dense"``.
        form: ``"candidate"`` or ``"dense"``.

    Example:
        >>> # penalise candidate token 13 everywhere
        >>> r = CallableReward(lambda h, c, tok: (c == 13).float() * -5.0)
    """

    def __init__(self, fn: Callable, form: str = "candidate"):
        if not callable(fn):
            raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
        if form not in FORMS:
            raise ValueError(f"form: expected one of {FORMS}, got {form!r}")
        self.fn, self.form = fn, form

    def score_candidates(self, histories, candidate_ids, tokenizer=None):
        return self.fn(histories, candidate_ids, tokenizer)

    def score_dense(self, histories, tokenizer=None):
        return self.fn(histories, tokenizer)


class SequenceClassifierReward:
    """Candidate reward from any Hugging Face sequence classifier.

    ``r(x, v)`` = ``log P(safe_label | text)`` for classifiers with several labels, or the single
    logit for one-output (regression) heads, where ``text`` is the last ``context_tokens`` tokens
    of the row plus candidate ``v``. All ``B * k`` texts go through one batched forward.

    Two paths:

    * **shared vocabulary** (``tokenizer=None``: the classifier reads the policy's token ids):
      the row's last ``context_tokens`` ids plus the candidate id. If the classifier is a causal
      LM with a linear ``score`` head (``GPT2ForSequenceClassification``,
      ``LlamaForSequenceClassification``, ...) and ``reuse_prefix`` is on, the shared prefix runs
      once per row (``B`` sequences, KV cache kept), the cache is repeated ``k`` times and only the
      ``B * k`` candidate tokens run on top: the same scores as the full forward at a fraction of
      the cost. The score head reads the last position, so left padding is exact.
    * **own tokenizer**: the policy tokens are decoded to text and re-tokenised with the
      classifier's tokenizer (truncated from the left to ``max_length`` tokens).

    Args:
        model: a ``*ForSequenceClassification`` model (eval mode is set).
        tokenizer: the classifier's tokenizer, or ``None`` when it shares the policy's vocabulary.
        safe_label: index or name (``config.label2id``) of the "safe" class; default 0.
        context_tokens: policy tokens of context (default 200).
        reuse_prefix: ``"auto"`` (when possible), ``True`` (require it) or ``False``.
        max_length: classifier tokens per text on the own-tokenizer path (default: its
            ``model_max_length`` capped at 512).

    Example:
        >>> clf = AutoModelForSequenceClassification.from_pretrained("path/to/safety-clf")
        >>> reward = SequenceClassifierReward(clf, AutoTokenizer.from_pretrained("path/to/safety-clf"))
        >>> r = reward.score_candidates([[5, 6, 7]], torch.tensor([[8, 9]]), policy_tokenizer)  # [1, 2]
    """

    form = "candidate"

    def __init__(self, model, tokenizer=None, *, safe_label=None, context_tokens: int = 200,
                 reuse_prefix="auto", max_length: int | None = None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a Hugging Face sequence classifier, got {type(model).__name__}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.context_tokens = _check_context(context_tokens)
        cfg = model.config
        self.num_labels = int(getattr(cfg, "num_labels", 1))
        if safe_label is None:
            safe_label = 0
        if isinstance(safe_label, str):
            label2id = {str(k).lower(): int(v) for k, v in (getattr(cfg, "label2id", None) or {}).items()}
            if safe_label.lower() not in label2id:
                raise ValueError(f"safe_label: {safe_label!r} is not a label of the classifier "
                                 f"(labels: {sorted(label2id)})")
            safe_label = label2id[safe_label.lower()]
        if isinstance(safe_label, bool) or not isinstance(safe_label, numbers.Integral) \
                or not 0 <= safe_label < max(1, self.num_labels):
            raise ValueError(f"safe_label: expected a label index in [0, {self.num_labels}) or a label name, "
                             f"got {safe_label!r}")
        self.safe_label = int(safe_label)
        base = getattr(model, getattr(model, "base_model_prefix", ""), None)
        score = getattr(model, "score", None)
        self._base = base if isinstance(base, torch.nn.Module) else None
        self._causal = (self._base is not None and isinstance(score, torch.nn.Linear)
                        and cache_argument(self._base) is not None and accepts(self._base, "position_ids"))
        if reuse_prefix not in ("auto", True, False):
            raise ValueError(f"reuse_prefix: expected 'auto', True or False, got {reuse_prefix!r}")
        if reuse_prefix is True and (tokenizer is not None or not self._causal):
            raise ValueError("reuse_prefix: True needs a causal classifier with a linear `score` head that shares "
                             "the policy's vocabulary (tokenizer=None)")
        self.reuse_prefix = bool(reuse_prefix) and tokenizer is None and self._causal
        self._prefix = _PrefixCache(self._prefix_forward, self._pad_id())
        if max_length is None:
            mml = getattr(tokenizer, "model_max_length", 512) if tokenizer is not None else 512
            max_length = int(min(512, mml if isinstance(mml, int) and mml > 0 else 512))
        self.max_length = int(max_length)

    # ------------------------------------------------------------------ helpers
    def _to_reward(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if logits.shape[-1] == 1:
            return logits[..., 0]
        return torch.log_softmax(logits, dim=-1)[..., self.safe_label]

    def _pad_id(self) -> int:
        pid = getattr(self.model.config, "pad_token_id", None)
        return int(pid) if isinstance(pid, int) else 0

    def _prefix_forward(self, ids, mask, pos, past):
        out = self._base(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         **cache_kwargs(self._base, past))
        return None, output_cache(self._base, out)

    def reset(self) -> None:
        """Drop the cached prefix (it is rebuilt automatically when histories do not continue it)."""
        self._prefix.reset()

    def _last_logits(self, ids, mask, *, past=None, prefix_mask=None, use_cache: bool = False, **extra):
        """Causal path: the score head on the last position (exact under left padding).

        ``prefix_mask`` is the attention mask of what ``past`` already holds; ``extra`` holds
        further tokenizer outputs the base model takes (``token_type_ids``).
        """
        full_mask = mask if prefix_mask is None else torch.cat([prefix_mask, mask], dim=1)
        pos = (full_mask.cumsum(-1) - 1).clamp_min(0)[:, -ids.shape[1]:]
        extra = {k: v for k, v in extra.items() if accepts(self._base, k)}
        out = self._base(input_ids=ids, attention_mask=full_mask, position_ids=pos, use_cache=use_cache,
                         **cache_kwargs(self._base, past), **extra)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return self.model.score(hidden[:, -1, :]), output_cache(self._base, out) if use_cache else None

    @torch.no_grad()
    def score_candidates(self, histories, candidate_ids, tokenizer=None) -> torch.Tensor:
        """``[B, k]`` float32 rewards of appending each candidate to each row (see the class docstring)."""
        B, k = _candidate_rows(histories, candidate_ids)
        out_device = candidate_ids.device
        if B == 0:
            return torch.zeros(0, k, device=out_device)
        dev = _device_of(self.model)
        tails = token_rows("histories", histories, self.context_tokens)
        cands = candidate_ids.tolist()
        if self.tokenizer is None:
            if self.reuse_prefix:
                # the shared prefix once per row (kept across steps while it fits the context),
                # its KV cache repeated k times, then the B * k candidate tokens on top
                fits = all(0 < len(h) <= self.context_tokens for h in histories)
                if fits:
                    past, mask, _ = self._prefix.advance([list(h) for h in histories], dev)
                    past = copy.deepcopy(past)
                else:
                    self._prefix.reset()
                    rows = [t if t else [self._pad_id()] for t in tails]
                    ids, mask = _pad(rows, self._pad_id(), dev)
                    _, past = self._last_logits(ids, mask, use_cache=True)
                past.batch_repeat_interleave(k)
                cid = candidate_ids.reshape(B * k, 1).to(dev)
                logits, _ = self._last_logits(cid, torch.ones_like(cid), past=past,
                                              prefix_mask=mask.repeat_interleave(k, 0), use_cache=True)
            else:
                seqs = [t + [c] for t, cs in zip(tails, cands) for c in cs]
                if self._causal:
                    ids, mask = _pad(seqs, self._pad_id(), dev)
                    logits, _ = self._last_logits(ids, mask)
                else:
                    # the model's own pooling: right padding keeps absolute positions (GPT-2, BERT)
                    # and a first-token pooler where they are without padding
                    ids, mask = _pad(seqs, self._pad_id(), dev, "right")
                    logits = self.model(input_ids=ids, attention_mask=mask).logits
        else:
            if tokenizer is None:
                raise ValueError("tokenizer: the policy tokenizer is needed to decode text for a classifier "
                                 "with its own tokenizer")
            texts = tokenizer.batch_decode([t + [c] for t, cs in zip(tails, cands) for c in cs],
                                           skip_special_tokens=True)
            tok = self.tokenizer
            side = getattr(tok, "truncation_side", "right")
            pside = getattr(tok, "padding_side", "right")
            try:
                tok.truncation_side = "left"
                if self._causal:
                    tok.padding_side = "left"
                enc = tok(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            finally:
                tok.truncation_side, tok.padding_side = side, pside
            enc = {k_: v.to(dev) for k_, v in enc.items()}
            if self._causal:
                rest = {k_: v for k_, v in enc.items() if k_ not in ("input_ids", "attention_mask")}
                logits, _ = self._last_logits(enc["input_ids"], enc["attention_mask"], **rest)
            else:
                logits = self.model(**enc).logits
        return self._to_reward(logits).reshape(B, k).to(out_device)


class CausalLMDenseReward:
    """Dense ``[B, V]`` reward from a causal LM used as an autoregressive reward.

    ``r(x, v) = log p_reward(v | last context_tokens tokens of x)``: one forward of ``B`` rows per
    step. Mixed into the fused op as ``dense_reward``, which gives ``softmax(log p + w * r)`` over
    the whole vocabulary (a product of experts with a safety-tuned LM). The reward model must
    share the policy's vocabulary (same logits width).

    Args:
        model: a causal LM (eval mode is set).
        context_tokens: tokens of context (default 200).

    Example:
        >>> reward = CausalLMDenseReward(safe_lm)
        >>> r = reward.score_dense([[1, 2, 3], [4, 5]])       # [2, V] float32
    """

    form = "dense"

    def __init__(self, model, *, context_tokens: int = 200):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a Hugging Face causal LM, got {type(model).__name__}")
        self.model = model.eval()
        self.context_tokens = _check_context(context_tokens)
        from .models import logits_vocab_size
        self.vocab_size = logits_vocab_size(model)
        self._keep = accepts(model, "logits_to_keep")
        pad = getattr(model.config, "pad_token_id", None)
        self._prefix = _PrefixCache(self._forward, pad if isinstance(pad, int) else 0)

    def _forward(self, ids, mask, pos, past):
        kw = {"logits_to_keep": 1} if self._keep else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         **cache_kwargs(self.model, past), **kw)
        return out.logits[:, -1, :], output_cache(self.model, out)

    def reset(self) -> None:
        """Drop the cached KV state (rebuilt automatically when histories do not continue it)."""
        self._prefix.reset()

    @torch.no_grad()
    def score_dense(self, histories, tokenizer=None) -> torch.Tensor:
        """``[B, V]`` float32 log-probabilities of the reward LM for the next token of each row."""
        rows = [list(h.tolist() if isinstance(h, torch.Tensor) else h) for h in histories]
        if not rows:
            return torch.zeros(0, self.vocab_size)
        if any(not r for r in rows):
            raise ValueError("histories: every row needs at least one token for a dense reward")
        dev = _device_of(self.model)
        if all(len(r) <= self.context_tokens for r in rows):
            _, _, logits = self._prefix.advance(rows, dev)          # incremental while nothing is cut
        else:
            self._prefix.reset()
            tails = token_rows("histories", rows, self.context_tokens)
            pad = getattr(self.model.config, "pad_token_id", None)
            ids, mask = _pad(tails, pad if isinstance(pad, int) else 0, dev)
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            logits, _ = self._forward(ids, mask, pos, None)
        return torch.log_softmax(logits.float(), dim=-1)


class ProfanityReward:
    """The default candidate scorer: alt-profanity-check (a scikit-learn linear model).

    ``r(x, v) = log(1 - P(profane | text))`` (clamped at ``log(1e-6)``), where ``text`` is the
    decoded last ``context_tokens`` tokens plus the candidate. Needs the ``alt-profanity-check``
    package (``pip install 'fastsafe[demo]'``). It is a word-level profanity detector, not a
    general safety classifier: plug in a :class:`SequenceClassifierReward` for that.

    Args:
        context_tokens: policy tokens of context per text (default 200).

    Example:
        >>> r = ProfanityReward().score_candidates([tok.encode("you are")], torch.tensor([[3, 4]]), tok)
    """

    form = "candidate"

    def __init__(self, *, context_tokens: int = 200):
        self.context_tokens = _check_context(context_tokens)
        try:
            from profanity_check import predict_prob
        except ImportError as exc:
            raise RuntimeError("reward_model 'profanity' needs the alt-profanity-check package: "
                               "`pip install 'fastsafe[demo]'` (or `pip install alt-profanity-check`)") from exc
        self._predict_prob = predict_prob

    def score_texts(self, texts: list[str]) -> torch.Tensor:
        """``[N]`` float32 ``log(1 - P(profane))`` of each text."""
        if not texts:
            return torch.zeros(0)
        p = torch.as_tensor(self._predict_prob(list(texts)), dtype=torch.float64)
        return torch.log1p(-p).clamp_min(math.log(1e-6)).float()

    def score_candidates(self, histories, candidate_ids, tokenizer=None) -> torch.Tensor:
        """``[B, k]`` float32 rewards (see the class docstring)."""
        if tokenizer is None:
            raise ValueError("tokenizer: the policy tokenizer is needed to decode candidate text")
        B, k = _candidate_rows(histories, candidate_ids)
        tails = token_rows("histories", histories, self.context_tokens)
        texts = tokenizer.batch_decode([t + [c] for t, cs in zip(tails, candidate_ids.tolist()) for c in cs],
                                       skip_special_tokens=True)
        return self.score_texts(texts).reshape(B, k).to(candidate_ids.device)


def load_reward(spec, *, context_tokens: int = 200, safe_label=None, dtype=torch.float32):
    """A reward from a CLI-style spec.

    Args:
        spec: ``"profanity"`` (:class:`ProfanityReward`), or a local Hugging Face model folder:
            a sequence classifier (:class:`SequenceClassifierReward` with its own tokenizer) or,
            failing that, a causal LM (:class:`CausalLMDenseReward`).
        context_tokens: tokens of context.
        safe_label: the classifier's "safe" label (index or name).

    Raises:
        FileNotFoundError: the path does not exist (nothing is downloaded).
        ValueError: the folder holds neither kind of model.
    """
    if isinstance(spec, str) and spec == "profanity":
        return ProfanityReward(context_tokens=context_tokens)
    path = os.fspath(spec)
    if not os.path.exists(path):
        raise FileNotFoundError(f"reward_model: no such file or directory: {path!r} (pass 'profanity' or a "
                                f"local Hugging Face model folder)")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"reward_model: {path!r} is not a Hugging Face model folder (no config.json)")
    try:
        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"reward_model: {path!r} is not a Hugging Face model folder: {exc}") from exc
    archs = list(getattr(cfg, "architectures", None) or [])
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if any(a.endswith("ForSequenceClassification") for a in archs):
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, local_files_only=True)
        return SequenceClassifierReward(model, tok, safe_label=safe_label, context_tokens=context_tokens)
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise ValueError(f"reward_model: {path!r} is neither a sequence classifier nor a causal LM "
                         f"(architectures: {archs or 'none listed'})")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return CausalLMDenseReward(model, context_tokens=context_tokens)
