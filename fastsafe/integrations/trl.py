"""TRL integration: ``DPOTrainer`` and ``GRPOTrainer`` subclasses that train with fastsafe's fused,
token-masked losses.

- :class:`MaskedDPOTrainer`: token-weighted (masked) DPO, described below.
- :class:`MaskedGRPOTrainer`: GRPO whose clipped surrogate is multiplied by a token mask built from
  a per-token reward function (the paper's eq. 9); see its docstring.

:class:`MaskedDPOTrainer` keeps TRL's data pipeline (prompt extraction, EOS, tokenisation,
truncation, padding) and replaces the loss: the policy's and the reference's last hidden states go
through :class:`fastsafe.training.FusedLinearMaskedDPOLoss` with the lm_head weight, so the
``[2B, L, V]`` logits are never built, and every completion token carries a weight. Both trainers
run the backbone and the fused head as the forward of the (engine-wrapped) model and of its lm_head
module (:func:`fastsafe.training.run_in_forward`), so DDP / FSDP2 / ZeRO-3 hooks fire around them.

Where the per-token weights come from (checked in this order, per batch):

1. ``chosen_weights`` / ``rejected_weights`` dataset columns: one float per completion token, as
   TRL tokenises the completion (``len(chosen_weights) == len(chosen_ids)``, the EOS TRL appends
   included). ``token_weights_fn(example) -> {"chosen_weights": [...], "rejected_weights": [...]}``
   computes them after tokenisation (it sees ``prompt_ids``, ``chosen_ids``, ``rejected_ids``).
2. ``chosen_token_rewards`` / ``rejected_token_rewards`` columns (one float per completion token)
   with ``token_mask="schmitt"`` (needs ``schmitt_delta``) or ``"threshold"`` (eq. 8): the mask is
   computed per batch with the batch-mean baseline; chosen weights are ``M_chosen`` and rejected
   weights ``-M_rejected`` for the Schmitt mask (good tokens pushed up, bad tokens down, in both
   responses), and the eq. 8 mask as is.
3. Neither: the completion mask, i.e. exactly TRL's sigmoid DPO loss.

Supported TRL versions: :data:`SUPPORTED_TRL` (tested with 1.16.0). Options this trainer does not
implement raise ``ValueError`` at construction instead of being silently ignored.

Example:
    >>> from trl import DPOConfig
    >>> from fastsafe.integrations.trl import MaskedDPOTrainer
    >>> trainer = MaskedDPOTrainer(model=model, ref_model=ref_model, args=DPOConfig("out", beta=0.1),
    ...                            train_dataset=ds, processing_class=tokenizer)   # ds has chosen_weights, ...
    >>> trainer.train()
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch

try:
    import trl
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError("fastsafe.integrations.trl needs TRL: pip install 'fastsafe[trl]' "
                      f"(trl {'>=1.16,<2'}, datasets)") from exc

from fastsafe.training import (FusedLinearMaskedDPOLoss, masked_grpo_loss, run_in_forward, schmitt_mask, threshold_mask,
                               token_logps)
from fastsafe.training.losses_ppo import GRPO_LOSS_TYPES

__all__ = ["MaskedDPOTrainer", "MaskedGRPOTrainer", "DataCollatorForTokenWeightedPreference", "SUPPORTED_TRL",
           "check_trl_version", "WEIGHT_COLUMNS", "REWARD_COLUMNS"]

#: TRL versions this integration supports (it relies on DPOTrainer's dataset preparation,
#: DataCollatorForPreference and the ``_metrics`` logging of the 1.x series).
SUPPORTED_TRL = ">=1.16,<2"
WEIGHT_COLUMNS = ("chosen_weights", "rejected_weights")
REWARD_COLUMNS = ("chosen_token_rewards", "rejected_token_rewards")
TOKEN_MASKS = ("schmitt", "threshold")


def check_trl_version(version: Optional[str] = None) -> str:
    """Raise ImportError unless ``version`` (default: the installed TRL) is in :data:`SUPPORTED_TRL`."""
    version = version or trl.__version__
    try:
        ok = Version(version) in SpecifierSet(SUPPORTED_TRL)
    except Exception:
        ok = False
    if not ok:
        raise ImportError(f"fastsafe.integrations.trl supports trl{SUPPORTED_TRL}, found trl {version}; "
                          f"install a supported version (pip install 'trl{SUPPORTED_TRL}')")
    return version


def _truncate(rows: List[list], max_length, truncation_mode) -> List[list]:
    if max_length is None:
        return rows
    sl = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
    return [r[sl] for r in rows]


@dataclass
class DataCollatorForTokenWeightedPreference(DataCollatorForPreference):
    """TRL's preference collator plus per-token weight (or reward) columns.

    Besides ``input_ids``, ``attention_mask`` and ``completion_mask`` (``[2B, L]``, chosen rows
    first), it returns ``completion_weights`` when the examples have ``chosen_weights`` /
    ``rejected_weights``, and ``completion_token_rewards`` when they have
    ``chosen_token_rewards`` / ``rejected_token_rewards``: float32 ``[2B, L]`` aligned with
    ``input_ids``, 0 on prompt and padding, truncated like the ids.
    """

    def torch_call(self, examples: List[Dict[str, Any]]) -> Dict[str, Any]:
        out = super().torch_call(examples)
        length = out["input_ids"].shape[1]
        for (col_c, col_r), key in ((WEIGHT_COLUMNS, "completion_weights"),
                                    (REWARD_COLUMNS, "completion_token_rewards")):
            if col_c not in examples[0]:
                continue
            rows = []
            for col, ids_key in ((col_c, "chosen_ids"), (col_r, "rejected_ids")):
                for i, ex in enumerate(examples):
                    vals = ex.get(col)
                    if vals is None or len(vals) != len(ex[ids_key]):
                        got = "missing" if vals is None else f"{len(vals)} values"
                        raise ValueError(f"{col}: expected one value per completion token ({len(ex[ids_key])} for "
                                         f"{ids_key} of batch example {i}, EOS included), got {got}")
                    rows.append([0.0] * len(ex["prompt_ids"]) + [float(v) for v in vals])
            rows = _truncate(rows, self.max_length, self.truncation_mode)
            t = torch.zeros(len(rows), length, dtype=torch.float32)
            for i, r in enumerate(rows):
                t[i, :len(r)] = torch.tensor(r, dtype=torch.float32)
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{col_c}/{col_r}: expected finite values, got NaN or inf")
            out[key] = t
        return out


def _fused_forward(accelerator, model, head_fn, input_ids, attention_mask, *head_args):
    """``head_fn(hidden, head, *head_args)`` on the backbone's last hidden states, run as ``model``'s forward.

    ``hidden`` is ``[B, L, H]`` (the backbone output for ``input_ids``), ``head`` the lm_head module.
    The whole computation goes through :func:`fastsafe.training.run_in_forward` on ``model`` (what
    the engine returned: a DDP / DeepSpeed wrapper, an FSDP2 ``fully_shard`` module, or the plain
    model), and the head part also through the lm_head module's own forward, so every hook an engine
    registered fires: DDP sees the loss as the forward's output (``find_unused_parameters`` finds
    the lm_head), FSDP2 and ZeRO-3 gather the lm_head weight before ``head_fn`` reads it and again
    for its backward, then reduce-scatter its gradient. Without an engine this is a plain call.
    """
    inner = accelerator.unwrap_model(model)
    head = inner.get_output_embeddings()

    def forward(input_ids, attention_mask, *args):
        hidden = inner.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return run_in_forward(head, lambda h, *a: head_fn(h, head, *a), hidden.last_hidden_state, *args)

    return run_in_forward(model, forward, input_ids, attention_mask, *head_args)


def _refuse(args: DPOConfig, model, processing_class, compute_metrics, peft_config) -> None:
    def no(what: str, why: str):
        raise ValueError(f"MaskedDPOTrainer does not support {what}: {why}")

    loss_type = args.loss_type if isinstance(args.loss_type, list) else [args.loss_type]
    if loss_type != ["sigmoid"]:
        no(f"loss_type={args.loss_type!r}", "it trains the token-weighted sigmoid DPO loss; use loss_type='sigmoid'")
    if getattr(args, "loss_weights", None) not in (None, [1.0]):
        no(f"loss_weights={args.loss_weights!r}", "there is a single loss")
    if getattr(args, "ld_alpha", None) is not None:
        no("ld_alpha (LD-DPO)", "length desensitisation is not implemented; weight the tail tokens instead")
    ftype = getattr(args, "f_divergence_type", "reverse_kl")
    ftype = getattr(ftype, "value", ftype)
    if ftype != "reverse_kl":
        no(f"f_divergence_type={ftype!r}", "only the reverse KL (standard DPO) is implemented")
    if getattr(args, "label_smoothing", 0.0):
        no(f"label_smoothing={args.label_smoothing}", "TRL's sigmoid loss ignores it; use the fastsafe loss directly")
    if getattr(args, "use_weighting", False):
        no("use_weighting=True (WPO)", "per-token weights replace it")
    if getattr(args, "precompute_ref_log_probs", False):
        no("precompute_ref_log_probs=True", "token weights need per-token reference log-probs, not sequence sums")
    if getattr(args, "padding_free", False):
        no("padding_free=True", "batches are padded")
    if getattr(args, "use_liger_kernel", False):
        no("use_liger_kernel=True", "fastsafe's fused loss replaces Liger's")
    if compute_metrics is not None:
        no("compute_metrics", "the fused loss never builds the logits it would need")
    _refuse_model(no, model, processing_class, peft_config)


def _refuse_model(no, model, processing_class, peft_config) -> None:
    """Refuse the models and processors the fused log-probs cannot serve (shared by both trainers)."""
    if peft_config is not None or hasattr(model, "peft_config"):
        no("PEFT models", "not tested with this trainer; merge the adapter or train the full model")
    if isinstance(model, str):
        no("a model id string", "pass an instantiated causal LM (AutoModelForCausalLM.from_pretrained(...))")
    try:
        from transformers import ProcessorMixin
        if isinstance(processing_class, ProcessorMixin):
            no("processors (vision-language models)", "only text causal LMs are supported")
    except ImportError:  # pragma: no cover
        pass
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    if softcap is not None:
        no(f"models with final_logit_softcapping={softcap}", "token_logps computes plain logits")
    for attr in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        value = getattr(text_config, attr, None)
        if value is not None and value != 1.0:
            no(f"models with {attr}={value}", "token_logps computes plain (hidden @ W.T + b) / temperature logits")
    if getattr(text_config, "output_router_logits", False):
        no("MoE router auxiliary losses (output_router_logits=True)", "the auxiliary loss is not added")
    if getattr(model, "base_model", model) is model:
        no(f"{type(model).__name__}", "it has no separate backbone (base_model) to read hidden states from")
    if model.get_output_embeddings() is None:
        no(f"{type(model).__name__}", "it has no output embeddings (lm_head)")


class MaskedDPOTrainer(DPOTrainer):
    """TRL ``DPOTrainer`` with the fused token-weighted DPO loss (see the module docstring).

    Args:
        model, ref_model, args, data_collator, train_dataset, eval_dataset, processing_class,
        callbacks, optimizers: as for ``trl.DPOTrainer`` (``ref_model`` is needed unless TRL can
        load the reference from the model's name). ``args.beta`` is the DPO beta.
        token_weights_fn: optional ``fn(example) -> {"chosen_weights": [...], "rejected_weights": [...]}``
            run on the tokenised dataset (one weight per completion token).
        token_mask: ``"schmitt"`` or ``"threshold"``: how ``*_token_rewards`` columns become weights.
        schmitt_delta: the Schmitt band half-width (required for ``token_mask="schmitt"``).
        chunk_size, backend: passed to :func:`fastsafe.training.token_logps`.

    Logged metrics (per logging step, as TRL logs them): ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``,
    ``weights/positive_fraction``, ``weights/negative_fraction`` and ``num_tokens``.
    """

    def __init__(self, model, ref_model=None, args: Optional[DPOConfig] = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, compute_metrics=None,
                 callbacks=None, optimizers=(None, None), peft_config=None, *,
                 token_weights_fn: Optional[Callable[[dict], dict]] = None, token_mask: str = "schmitt",
                 schmitt_delta: Optional[float] = None, chunk_size: Optional[int] = None,
                 backend: Optional[str] = None):
        check_trl_version()
        if args is None:
            raise ValueError("args: expected a trl.DPOConfig (output_dir, beta, ...), got None")
        _refuse(args, model, processing_class, compute_metrics, peft_config)
        if token_mask not in TOKEN_MASKS:
            raise ValueError(f"token_mask: expected one of {TOKEN_MASKS}, got {token_mask!r}")
        if schmitt_delta is not None and (not isinstance(schmitt_delta, (int, float)) or schmitt_delta < 0):
            raise ValueError(f"schmitt_delta: expected a number >= 0 or None, got {schmitt_delta!r}")
        self._token_weights_fn = token_weights_fn
        self._token_mask = token_mask
        self._schmitt_delta = schmitt_delta
        if data_collator is None and processing_class is not None:
            tok = getattr(processing_class, "tokenizer", processing_class)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            data_collator = DataCollatorForTokenWeightedPreference(
                pad_token_id=tok.pad_token_id, max_length=args.max_length,
                truncation_mode=args.truncation_mode, pad_to_multiple_of=args.pad_to_multiple_of)
        super().__init__(model=model, ref_model=ref_model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         callbacks=callbacks, optimizers=optimizers)
        if getattr(self, "aux_loss_enabled", False):
            raise ValueError("MaskedDPOTrainer does not support MoE router auxiliary losses")
        self._loss_fn = FusedLinearMaskedDPOLoss(beta=args.beta, chunk_size=chunk_size, backend=backend)

    # ---- data ------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if self._token_weights_fn is not None:
            fn = self._token_weights_fn
            dataset = dataset.map(lambda ex: dict(fn(ex)))
        first = next(iter(dataset))
        for cols in (WEIGHT_COLUMNS, REWARD_COLUMNS):
            if (cols[0] in first) != (cols[1] in first):
                raise ValueError(f"{dataset_name} dataset: expected both {cols[0]!r} and {cols[1]!r} columns, "
                                 f"got only one of them")
        if REWARD_COLUMNS[0] in first and WEIGHT_COLUMNS[0] not in first:
            if self._token_mask == "schmitt" and self._schmitt_delta is None:
                raise ValueError("schmitt_delta: required to turn the *_token_rewards columns into a Schmitt mask "
                                 "(or pass token_mask='threshold'), got None")

        def check(ex, idx):
            for cols in (WEIGHT_COLUMNS, REWARD_COLUMNS):
                for col, ids_key in zip(cols, ("chosen_ids", "rejected_ids")):
                    if col in ex and len(ex[col]) != len(ex[ids_key]):
                        raise ValueError(f"{dataset_name} dataset, example {idx}: {col} has {len(ex[col])} values "
                                         f"but the tokenised completion {ids_key} has {len(ex[ids_key])} tokens "
                                         f"(EOS included); give one value per completion token")
            return ex

        if any(c in first for c in WEIGHT_COLUMNS + REWARD_COLUMNS):
            dataset = dataset.map(check, with_indices=True)
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for col in WEIGHT_COLUMNS + REWARD_COLUMNS:
            if col not in self._signature_columns:
                self._signature_columns.append(col)

    # ---- loss ------------------------------------------------------------------------------------

    def _token_weights(self, inputs) -> torch.Tensor:
        completion = inputs["completion_mask"][:, 1:] != 0
        n = completion.shape[0] // 2
        if "completion_weights" in inputs:
            w = inputs["completion_weights"][:, 1:].float()
        elif "completion_token_rewards" in inputs:
            r = inputs["completion_token_rewards"][:, 1:].float()
            if self._token_mask == "schmitt":
                m = schmitt_mask(r, self._schmitt_delta, attention_mask=completion).float()
                w = torch.cat([m[:n], -m[n:]])
            else:
                is_chosen = torch.arange(2 * n, device=r.device) < n
                w = threshold_mask(r, is_chosen, attention_mask=completion).float()
        else:
            w = completion.float()
        return torch.where(completion, w, torch.zeros((), device=w.device))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        if return_outputs:
            raise ValueError("MaskedDPOTrainer.compute_loss: return_outputs=True is not supported (no logits are "
                             "built); use prediction_loss_only")
        if self.ref_model is None:
            raise ValueError("ref_model: MaskedDPOTrainer needs a reference model, got None")
        completion = inputs["completion_mask"][:, 1:] != 0
        loss_fn = self._loss_fn
        targets = inputs["input_ids"][:, 1:].masked_fill(~completion, loss_fn.ignore_index)
        weights = self._token_weights(inputs)
        ids, am = inputs["input_ids"], inputs["attention_mask"]

        def ref_head(hidden, head, targets, weights):
            w = head.weight
            return token_logps(hidden[:, :-1].to(w.device), w, targets.to(w.device), head.bias, loss_fn.ignore_index,
                               loss_fn.temperature, active=weights.to(w.device), chunk_size=loss_fn.chunk_size,
                               backend=loss_fn.backend)

        def policy_head(hidden, head, targets, weights, ref_logps):
            w = head.weight
            return loss_fn(hidden[:, :-1].to(w.device), w, targets.to(w.device), weights.to(w.device), head.bias,
                           ref_logps=ref_logps.to(w.device))

        with torch.no_grad():
            ref_logps = _fused_forward(self.accelerator, self.ref_model, ref_head, ids, am, targets, weights)
        loss, metrics = _fused_forward(self.accelerator, model, policy_head, ids, am, targets, weights, ref_logps)
        self._log_metrics(mode, metrics, weights, completion, inputs)
        return loss

    def _log_metrics(self, mode, metrics, weights, completion, inputs):
        gather = self.accelerator.gather_for_metrics
        for key, value in metrics.items():
            self._metrics[mode][key].append(gather(value.reshape(1)).float().mean().item())
        n_tok = completion.sum().clamp(min=1).float()
        self._metrics[mode]["weights/positive_fraction"].append(
            gather(((weights > 0).sum() / n_tok).reshape(1)).mean().item())
        self._metrics[mode]["weights/negative_fraction"].append(
            gather(((weights < 0).sum() / n_tok).reshape(1)).mean().item())
        if mode == "train":
            n_tokens = int(gather(inputs["attention_mask"].sum().reshape(1)).sum().item())
            self._total_train_tokens = getattr(self, "_total_train_tokens", 0) + n_tokens
        self._metrics[mode]["num_tokens"] = [getattr(self, "_total_train_tokens", 0)]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


# ---- GRPO ------------------------------------------------------------------------------------------

def _refuse_grpo(args: GRPOConfig, model, processing_class, peft_config, tools, rollout_func,
                 environment_factory) -> None:
    def no(what: str, why: str):
        raise ValueError(f"MaskedGRPOTrainer does not support {what}: {why}")

    if args.loss_type not in GRPO_LOSS_TYPES:
        no(f"loss_type={args.loss_type!r}", f"the masked clipped surrogate is implemented for {GRPO_LOSS_TYPES}")
    if args.importance_sampling_level != "token":
        no(f"importance_sampling_level={args.importance_sampling_level!r}",
           "the token mask acts on per-token ratios; use importance_sampling_level='token'")
    if args.use_vllm:
        no("use_vllm=True", "generation through vLLM (and its importance-sampling correction) is not wired in; "
           "generate with transformers (use_vllm=False)")
    if getattr(args, "use_transformers_continuous_batching", False):
        no("use_transformers_continuous_batching=True", "not tested with the token mask")
    if args.use_liger_kernel:
        no("use_liger_kernel=True", "fastsafe's fused token_logps replaces Liger's")
    if args.cast_lm_head_to_fp32:
        no("cast_lm_head_to_fp32=True", "token_logps accumulates in fp32 already; leave it False")
    if args.off_policy_mask_threshold is not None:
        no(f"off_policy_mask_threshold={args.off_policy_mask_threshold}", "the off-policy sequence mask is not "
           "implemented")
    if args.top_entropy_quantile < 1.0:
        no(f"top_entropy_quantile={args.top_entropy_quantile}", "the high-entropy token mask is not implemented")
    if args.entropy_coef != 0.0 or args.use_adaptive_entropy:
        no(f"an entropy bonus (entropy_coef={args.entropy_coef}, use_adaptive_entropy={args.use_adaptive_entropy})",
           "not implemented")
    if args.router_aux_loss_coef:
        no(f"router_aux_loss_coef={args.router_aux_loss_coef}", "the MoE auxiliary loss is not added")
    for name, value in (("tools", tools), ("rollout_func", rollout_func),
                        ("environment_factory", environment_factory)):
        if value:
            no(name, "multi-turn / custom rollouts are not tested with the token mask")
    _refuse_model(no, model, processing_class, peft_config)


class MaskedGRPOTrainer(GRPOTrainer):
    """TRL ``GRPOTrainer`` whose clipped surrogate is multiplied by a per-token mask (the paper's eq. 9).

    Generation, sequence rewards and advantages are TRL's. ``token_reward_fn`` is called like a TRL
    reward function, ``token_reward_fn(prompts=..., completions=..., completion_ids=..., trainer_state=...,
    log_extra=..., log_metric=..., **dataset_columns)``, and returns one float per completion token
    (a list of lists, ``len(rows[i]) == len(completion_ids[i])``; NaN or inf is an error). The
    rewards of each generation batch become a token mask:

    - ``mask="schmitt"``: :func:`fastsafe.training.schmitt_mask` ``M`` with ``delta=mask_delta``:
      ``+1`` above ``b + delta``, ``0`` inside the band, ``-1`` below ``b - delta``. In a
      completion with advantage ``>= 0`` the mask is ``M`` (``+1`` keeps the token's push up, ``0``
      drops it, ``-1`` reverses it); with advantage ``< 0`` it is ``-M``, as
      :class:`MaskedDPOTrainer` weights a rejected response: ``+1`` keeps a bad token's push down,
      ``-1`` reverses a good token's. So every token above the band is pushed up and every token
      below it down, by ``|advantage|`` (with ``M`` alone, a harmful token of a completion worse
      than its group would be pushed up).
    - ``mask="threshold"`` (eq. 8, binary): :func:`fastsafe.training.threshold_mask` with the
      completions of advantage ``>= 0`` as "chosen" (keep their tokens above ``b``) and the others
      as "rejected" (keep their tokens below ``b``). ``mask_delta`` must be 0.

    ``b = mask_baseline``, or (``None``) the mean token reward over all completion tokens of the
    generation batch, across processes. ``token_reward_fn=None``: the mask is all ones and the
    training is ``GRPOTrainer``'s. The per-token log-probs of the policy, the old policy and the
    reference come from :func:`fastsafe.training.token_logps` on the backbone's hidden states and
    the lm_head weight (the ``[B, T, V]`` logits are never built), and the loss is
    :func:`fastsafe.training.masked_grpo_loss` with TRL's normaliser for ``args.loss_type``
    (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``): the mask changes which tokens push and in which
    direction, not the normaliser.

    Past one process: the backbone and the fused head run as the forward of the model TRL passes
    (the DDP / DeepSpeed wrapper or the FSDP2 module; :func:`fastsafe.training.run_in_forward`),
    the head also as the lm_head module's forward, so the engine gathers a sharded lm_head weight
    before ``token_logps`` reads it and reduces its gradient (tested: DDP and FSDP2 with 2 gloo
    ranks equal one process on the global batch, ``tests/test_trl_grpo_distributed.py``).

    Supported TRL versions: :data:`SUPPORTED_TRL`. Options this trainer does not implement (other
    loss types, sequence-level importance sampling, vLLM, Liger, entropy bonus or masks, off-policy
    masks, tools / custom rollouts, PEFT, vision-language models, MoE auxiliary losses) raise
    ``ValueError`` at construction.

    Args:
        model, reward_funcs, args, train_dataset, eval_dataset, processing_class,
        reward_processing_classes, callbacks, optimizers: as for ``trl.GRPOTrainer`` (``model`` an
        instantiated causal LM; with ``args.beta != 0`` TRL loads the reference from the model's
        ``name_or_path``).
        token_reward_fn: optional per-token reward function (see above).
        mask: ``"schmitt"`` or ``"threshold"``.
        mask_delta: the Schmitt band half-width, a number >= 0.
        mask_baseline: ``None`` (batch mean) or a number.
        chunk_size, backend: passed to :func:`fastsafe.training.token_logps`.

    Logged metrics: TRL's (``reward``, ``kl``, ``entropy``, ``clip_ratio/*``, ...) plus, with a
    ``token_reward_fn``, ``mask/positive_fraction``, ``mask/negative_fraction`` and
    ``token_reward/mean`` per generation batch.

    Example:
        >>> from trl import GRPOConfig
        >>> from fastsafe.integrations.trl import MaskedGRPOTrainer
        >>> def token_rewards(completion_ids, **kw):      # -1 on a banned token, 0 elsewhere
        ...     return [[-1.0 if t in banned else 0.0 for t in ids] for ids in completion_ids]
        >>> trainer = MaskedGRPOTrainer(model, reward_funcs=[seq_reward], args=GRPOConfig("out"),
        ...                             train_dataset=ds, processing_class=tokenizer,
        ...                             token_reward_fn=token_rewards, mask_delta=0.1)
        >>> trainer.train()
    """

    def __init__(self, model, reward_funcs=None, args: Optional[GRPOConfig] = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, reward_processing_classes=None, callbacks=None,
                 optimizers=(None, None), peft_config=None, tools=None, rollout_func=None,
                 environment_factory=None, *, token_reward_fn: Optional[Callable[..., List[List[float]]]] = None,
                 mask: str = "schmitt", mask_delta: float = 0.0, mask_baseline: Optional[float] = None,
                 chunk_size: Optional[int] = None, backend: Optional[str] = None, **kwargs):
        check_trl_version()
        if kwargs:
            raise ValueError(f"MaskedGRPOTrainer does not support {sorted(kwargs)}: not tested with the token mask")
        if args is None or not isinstance(args, GRPOConfig):
            raise ValueError(f"args: expected a trl.GRPOConfig (output_dir, loss_type, ...), got {args!r}")
        _refuse_grpo(args, model, processing_class, peft_config, tools, rollout_func, environment_factory)
        if token_reward_fn is not None and not callable(token_reward_fn):
            raise TypeError(f"token_reward_fn: expected a callable or None, got {type(token_reward_fn).__name__}")
        if mask not in TOKEN_MASKS:
            raise ValueError(f"mask: expected one of {TOKEN_MASKS}, got {mask!r}")
        if isinstance(mask_delta, bool) or not isinstance(mask_delta, (int, float)) or not mask_delta >= 0 \
                or mask_delta == float("inf"):
            raise ValueError(f"mask_delta: expected a finite number >= 0, got {mask_delta!r}")
        if mask == "threshold" and mask_delta != 0:
            raise ValueError(f"mask_delta: the threshold mask (eq. 8) has no band; expected 0, got {mask_delta}")
        if mask_baseline is not None and (isinstance(mask_baseline, bool) or not isinstance(mask_baseline, (int, float))
                                          or mask_baseline != mask_baseline or abs(mask_baseline) == float("inf")):
            raise ValueError(f"mask_baseline: expected a finite number or None (the batch mean), got {mask_baseline!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size: expected an int >= 1 or None, got {chunk_size!r}")
        self._token_reward_fn = token_reward_fn
        self._mask_kind = mask
        self._mask_delta = float(mask_delta)
        self._mask_baseline = None if mask_baseline is None else float(mask_baseline)
        self._chunk_size = chunk_size
        self._backend = backend
        self._pending_token_rewards = None
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class,
                         reward_processing_classes=reward_processing_classes, callbacks=callbacks,
                         optimizers=optimizers)
        if self.aux_loss_enabled:
            raise ValueError("MaskedGRPOTrainer does not support MoE router auxiliary losses")

    # ---- per-token log-probs -------------------------------------------------------------------

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        """TRL's hook, served by the fused ``token_logps`` on the backbone's last hidden states.

        Returns ``(logps [B, C], entropies [B, C] or None, None)`` for the last ``C = logits_to_keep``
        positions, 0 where ``attention_mask`` is 0 (as TRL's fused head does).
        """
        if compute_aux_loss:
            raise ValueError("MaskedGRPOTrainer does not support MoE router auxiliary losses")
        extra = sorted(k for k, v in multimodal.items() if v is not None)
        if extra:
            raise ValueError(f"MaskedGRPOTrainer does not support multimodal inputs, got {extra}")
        batch_size = batch_size or input_ids.size(0)
        keep = logits_to_keep

        def head_fn(hidden, head, targets):
            w = head.weight
            return token_logps(hidden[:, -keep - 1:-1].to(w.device), w, targets.to(w.device), head.bias,
                               temperature=self.temperature, return_entropy=compute_entropy,
                               chunk_size=self._chunk_size, backend=self._backend)

        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids = input_ids[start:start + batch_size]
            am = attention_mask[start:start + batch_size]
            targets = ids[:, -keep:].masked_fill(am[:, -keep:] == 0, -100)
            with self.accelerator.autocast():  # the head in the same autocast as the backbone, as TRL's fused head
                res = _fused_forward(self.accelerator, model, head_fn, ids, am, targets)
            if compute_entropy:
                logps.append(res[0])
                entropies.append(res[1])
            else:
                logps.append(res)
        return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None

    # ---- token rewards -> mask -----------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self._token_reward_fn is not None:
            keys = [k for k in inputs[0] if k not in ("prompt", "completion", "completion_ids")]
            kwargs = {k: [ex[k] for ex in inputs] for k in keys}
            kwargs.update(trainer_state=self.state, log_extra=self._log_completion_extra,
                          log_metric=self._log_metric)
            rows = self._token_reward_fn(prompts=prompts, completions=completions,
                                         completion_ids=completion_ids_list, **kwargs)
            self._pending_token_rewards = _check_token_rewards(rows, completion_ids_list)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        self._pending_token_rewards = None
        output = super()._generate_and_score_completions(inputs)
        if self._token_reward_fn is None:
            return output
        rows, self._pending_token_rewards = self._pending_token_rewards, None
        if rows is None:  # pragma: no cover - TRL changed where rewards are computed
            raise RuntimeError("MaskedGRPOTrainer: token_reward_fn was not called (unsupported TRL code path)")
        loss_mask = output["completion_mask"]
        if "tool_mask" in output:
            loss_mask = loss_mask * output["tool_mask"]
        valid = loss_mask != 0
        rewards = torch.zeros(loss_mask.shape, dtype=torch.float32, device=loss_mask.device)
        for i, r in enumerate(rows):
            n = min(len(r), rewards.shape[1])
            rewards[i, :n] = torch.tensor(r[:n], dtype=torch.float32)
        local = torch.stack([torch.where(valid, rewards, 0.0).sum(), valid.sum().float()])
        total = self.accelerator.reduce(local, reduction="sum")  # over all processes
        batch_mean = total[0] / total[1].clamp(min=1)
        baseline = batch_mean if self._mask_baseline is None else self._mask_baseline
        if self._mask_kind == "schmitt":
            token_mask = schmitt_mask(rewards, self._mask_delta, baseline=baseline, attention_mask=valid)
            # negative advantage: the completion plays DPO's "rejected" (MaskedDPOTrainer uses -M there),
            # so a token above the band is pushed up and one below pushed down whatever the advantage
            token_mask = torch.where((output["advantages"] < 0)[:, None], -token_mask, token_mask)
        else:
            token_mask = threshold_mask(rewards, output["advantages"] >= 0, baseline=baseline, attention_mask=valid)
        output["token_mask"] = token_mask.float()
        mode = "train" if self.model.training else "eval"
        counts = self.accelerator.reduce(torch.stack([(token_mask > 0).sum(), (token_mask < 0).sum()]).float(),
                                         reduction="sum") / total[1].clamp(min=1)
        positive, negative, mean = torch.cat([counts, batch_mean.reshape(1)]).tolist()   # one host sync
        self._metrics[mode]["mask/positive_fraction"].append(positive)
        self._metrics[mode]["mask/negative_fraction"].append(negative)
        self._metrics[mode]["token_reward/mean"].append(mean)
        return output

    # ---- loss ------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True)
        old = inputs.get("old_per_token_logps")
        old = logps.detach() if old is None else old
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        num_items = None
        if self.loss_type == "dapo":
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                num_items = num_items * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        loss, metrics = masked_grpo_loss(
            logps, old, inputs["advantages"], mask, inputs.get("token_mask"), loss_type=self.loss_type,
            clip_eps=self.epsilon_low, clip_eps_high=self.epsilon_high, ratio_max=self.args.delta,
            ref_logps=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None, beta=self.beta,
            kl_importance_correction=self.args.use_bias_correction_kl,
            max_completion_length=self.max_completion_length, num_items=num_items)
        if self.loss_type != "dapo":
            loss = loss / accumulation
        self._log_loss_metrics(mode, metrics, logps, old, entropies, inputs["advantages"], mask)
        return loss

    def _log_loss_metrics(self, mode, metrics, logps, old, entropies, advantages, mask):
        """TRL's per-step metrics (global token means over processes), from the fused log-probs.

        One gather over processes and one device-to-host copy per step: the local token sums and
        the per-sequence clip fractions travel together.
        """
        with torch.no_grad():
            maskf = mask.float()
            ratio = torch.exp(logps.detach() - old)
            adv = advantages[:, None] if advantages.dim() == 1 else advantages
            low = ((ratio < 1 - self.epsilon_low) & (adv < 0)).float()
            high = ((ratio > 1 + self.epsilon_high) & (adv > 0)).float()
            n_tok = maskf.sum()
            kl = metrics["kl"].to(maskf.device) * n_tok if self.beta != 0.0 else torch.zeros_like(n_tok)
            sums = torch.stack([n_tok, kl] + [(x * maskf).sum() for x in (entropies, low, high, torch.maximum(low, high))])
            per_seq = torch.stack([(x * maskf).sum(-1) / maskf.sum(-1) for x in (low, high)])   # [2, B]
            table = self.accelerator.gather(torch.cat([sums, per_seq.reshape(-1)])[None]).double().cpu()
        totals = table[:, :sums.numel()].sum(0)
        n = totals[0].clamp(min=1.0)
        values = dict(zip(("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"),
                          (totals[1:] / n).tolist()))
        if self.beta == 0.0:
            del values["kl"]
        low_seq, high_seq = table[:, sums.numel():].reshape(-1, 2, per_seq.shape[1]).transpose(0, 1).reshape(2, -1)
        values["clip_ratio/low_min"] = _nan_reduce(low_seq, torch.min)
        values["clip_ratio/high_max"] = _nan_reduce(high_seq, torch.max)
        for key, value in values.items():
            self._metrics[mode][key].append(value)


def _nan_reduce(x: torch.Tensor, op) -> float:
    x = x[~torch.isnan(x)]
    return float("nan") if x.numel() == 0 else op(x).item()


def _check_token_rewards(rows, completion_ids_list) -> List[List[float]]:
    """``token_reward_fn``'s output: one finite float per completion token of each completion."""
    n = len(completion_ids_list)
    if isinstance(rows, torch.Tensor) or not hasattr(rows, "__len__") or len(rows) != n:
        got = f"{len(rows)} rows" if hasattr(rows, "__len__") and not isinstance(rows, torch.Tensor) \
            else type(rows).__name__
        raise ValueError(f"token_reward_fn: expected a list of {n} rows (one per completion), each with one float "
                         f"per completion token, got {got}")
    out = []
    for i, (row, ids) in enumerate(zip(rows, completion_ids_list)):
        vals = row.detach().float().cpu().tolist() if isinstance(row, torch.Tensor) else row
        if not hasattr(vals, "__len__") or len(vals) != len(ids):
            got = f"{len(vals)} values" if hasattr(vals, "__len__") else type(vals).__name__
            raise ValueError(f"token_reward_fn: completion {i} has {len(ids)} tokens, expected as many rewards, "
                             f"got {got}")
        try:
            vals = [float(v) for v in vals]
        except (TypeError, ValueError):
            raise ValueError(f"token_reward_fn: completion {i}: expected floats, got {vals!r}") from None
        bad = [j for j, v in enumerate(vals) if v != v or v in (float("inf"), float("-inf"))]
        if bad:
            raise ValueError(f"token_reward_fn: completion {i}: expected finite rewards, got {vals[bad[0]]} at "
                             f"token {bad[0]} ({len(bad)} non-finite)")
        out.append(vals)
    return out
