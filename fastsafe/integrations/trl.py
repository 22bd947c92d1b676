"""TRL integration: a ``DPOTrainer`` that trains with the fused token-weighted (masked) DPO loss.

:class:`MaskedDPOTrainer` keeps TRL's data pipeline (prompt extraction, EOS, tokenisation,
truncation, padding) and replaces the loss: the policy's and the reference's last hidden states go
through :class:`fastsafe.training.FusedLinearMaskedDPOLoss` with the lm_head weight, so the
``[2B, L, V]`` logits are never built, and every completion token carries a weight.

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

import functools
import types
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch

try:
    import trl
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError("fastsafe.integrations.trl needs TRL: pip install 'fastsafe[trl]' "
                      f"(trl {'>=1.16,<2'}, datasets)") from exc

from fastsafe.training import FusedLinearMaskedDPOLoss, schmitt_mask, threshold_mask

__all__ = ["MaskedDPOTrainer", "DataCollatorForTokenWeightedPreference", "SUPPORTED_TRL", "check_trl_version",
           "WEIGHT_COLUMNS", "REWARD_COLUMNS"]

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


def _add_backbone_forward(model) -> None:
    """Let ``model(..., fastsafe_backbone=True)`` return the backbone output (final hidden states).

    Going through ``model.forward`` (instead of calling the backbone directly) keeps wrappers such
    as DDP in the loop. Other calls go to the previous forward unchanged.
    """
    if getattr(model, "_fastsafe_backbone_forward", False):
        return
    previous = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, fastsafe_backbone: bool = False, **kwargs):
        if not fastsafe_backbone:
            return previous(*args, **kwargs)
        return self.base_model(*args, **kwargs)

    model.forward = types.MethodType(forward, model)
    model._fastsafe_backbone_forward = True


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
    if peft_config is not None or hasattr(model, "peft_config"):
        no("PEFT models", "not tested with this trainer; merge the adapter or train the full model")
    if isinstance(model, str):
        no("a model id string", "pass an instantiated causal LM (and ref_model)")
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
        _add_backbone_forward(self.model)
        if self.ref_model is not None:
            _add_backbone_forward(self.accelerator.unwrap_model(self.ref_model))

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

    def _hidden(self, model, inputs):
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False,
                    fastsafe_backbone=True)
        return out.last_hidden_state[:, :-1]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        if return_outputs:
            raise ValueError("MaskedDPOTrainer.compute_loss: return_outputs=True is not supported (no logits are "
                             "built); use prediction_loss_only")
        completion = inputs["completion_mask"][:, 1:] != 0
        targets = inputs["input_ids"][:, 1:].masked_fill(~completion, self._loss_fn.ignore_index)
        weights = self._token_weights(inputs)
        hidden = self._hidden(model, inputs)
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        if self.ref_model is None:
            raise ValueError("ref_model: MaskedDPOTrainer needs a reference model, got None")
        with torch.no_grad():
            ref_hidden = self._hidden(self.ref_model, inputs)
        ref_head = self.accelerator.unwrap_model(self.ref_model).get_output_embeddings()
        hidden = hidden.to(head.weight.device)
        ref_hidden = ref_hidden.to(head.weight.device).to(hidden.dtype)
        loss, metrics = self._loss_fn(hidden, head.weight, targets, weights, head.bias, ref_hidden=ref_hidden,
                                      ref_weight=ref_head.weight.to(head.weight.device),
                                      ref_bias=None if ref_head.bias is None else ref_head.bias.to(head.weight.device))
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
