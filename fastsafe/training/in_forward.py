"""Run a fused loss inside a wrapped module's forward, so DDP / FSDP2 / ZeRO-3 hooks fire.

The fused losses read the ``lm_head`` weight directly instead of calling ``lm_head(hidden)``.
Under a sharding engine that weight only exists in full *inside* the forward of the module the
engine hooked: FSDP2 (``torch.distributed.fsdp.fully_shard``) all-gathers a module's parameters
in its pre-forward hook, frees them after the forward, gathers them again in a pre-backward hook
it puts on the forward's outputs and reduce-scatters the gradients after; DeepSpeed ZeRO-3 does
the same per submodule. A loss computed outside that forward sees the local shard (or an empty
placeholder), and its gradient skips the engine's reduction: the crash or silent error of
TRL issues 3368 and 4544. :func:`run_in_forward` makes the loss *be* that forward for one call
(the pattern TRL uses for Liger-Kernel, ``_forward_redirection``).

Which module to pass:

- FSDP2: the ``fully_shard``-ed module whose parameter group holds ``lm_head.weight`` — the root
  model when only the root and the blocks were sharded, or ``model.lm_head`` when it was sharded
  on its own. Run the whole loss (hidden states and all) inside the root's forward, so every
  block's hooks fire in order too.
- DDP: the ``DistributedDataParallel`` wrapper (its ``.module``'s forward is redirected), so the
  loss is the output DDP sees (``find_unused_parameters``, static graph, buffer broadcast).
- DeepSpeed ZeRO-3: the ``lm_head`` module itself (``engine.module.lm_head``, the ``nn.Linear``
  that holds the weight), called inside ``run_in_forward(engine, ...)`` for the rest of the loss:
  ZeRO-3 gathers a submodule's own parameters in that submodule's pre-forward hook, releases them
  after, and regathers them for the backward through the hook it puts on the outputs, so the fused
  backward reads the full weight and ZeRO reduce-scatters its gradient (tested with DeepSpeed's
  CPU accelerator and gloo)::

      def head_loss(hidden, labels):
          return token_logps(hidden, model.lm_head.weight, labels).sum()

      def loss_fn(input_ids, labels):
          hidden = model.model(input_ids=input_ids).last_hidden_state
          return run_in_forward(model.lm_head, head_loss, hidden, labels)

      loss = run_in_forward(engine, loss_fn, input_ids, labels)    # model = engine.module
      engine.backward(loss)

  For a computation without gradient (reference or old-policy log-probs) gathering by hand is
  enough::

      with torch.no_grad(), deepspeed.zero.GatheredParameters([ref_model.lm_head.weight]):
          ref_logps = token_logps(ref_hidden, ref_model.lm_head.weight, targets)

A weight still sharded when it reaches ``token_logps`` (an FSDP2 ``DTensor``, a ZeRO-3 empty
placeholder) is refused with a TypeError that says so.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

__all__ = ["run_in_forward"]

_WRAPPER_TYPES = ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine", "PipelineEngine")


def _inner(module: nn.Module) -> nn.Module:
    """The user's module inside a DDP / DataParallel / DeepSpeed wrapper (else ``module``)."""
    for cls in type(module).__mro__:
        if cls.__name__ in _WRAPPER_TYPES and isinstance(getattr(module, "module", None), nn.Module):
            return module.module
    return module


def run_in_forward(module: nn.Module, fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Call ``fn(*args, **kwargs)`` as the forward of ``module`` and return what it returns.

    ``module(*args, **kwargs)`` is called with its ``forward`` (for a DDP / DeepSpeed wrapper:
    the wrapped module's ``forward``) replaced by ``fn`` for that one call, so every forward hook,
    pre-forward hook and output hook that an engine registered on ``module`` runs around ``fn``:
    FSDP2 and ZeRO-3 gather the parameters before ``fn`` and again before its backward, DDP sees
    ``fn``'s output. The original ``forward`` is restored before ``fn`` runs (so ``fn`` may call
    the module normally) and also if anything raises. Pass tensors through ``args`` / ``kwargs``
    (the engine may move or hook them) and close over the modules.

    Args:
        module: the module an engine hooked (see the module doc for which one under FSDP2,
            DDP and ZeRO-3); any ``nn.Module`` works (without an engine this is just ``fn(...)``).
        fn: the loss computation; its output (a tensor, or a tuple / dict holding tensors)
            becomes ``module``'s output.

    Returns:
        ``fn``'s output, as returned by ``module``'s call (after the engine's post-forward hooks).

    Example (FSDP2, lm_head in the root's parameter group)::

        fully_shard(model.model.layers[i]) for each block; fully_shard(model)
        loss_fn = FusedLinearMaskedDPOLoss(beta=0.1)

        def dpo(input_ids, attention_mask, labels, weights, ref_logps):
            hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return loss_fn(hidden[:, :-1], model.lm_head.weight, labels[:, 1:], weights[:, 1:],
                           ref_logps=ref_logps)[0]

        loss = run_in_forward(model, dpo, input_ids, attention_mask, labels, weights, ref_logps)
        loss.backward()
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module (the wrapped model or the lm_head module), "
                        f"got {type(module).__name__}")
    if not callable(fn):
        raise TypeError(f"fn: expected a callable (the loss computation), got {type(fn).__name__}")
    inner = _inner(module)
    had_own = "forward" in inner.__dict__
    own = inner.__dict__.get("forward")

    def restore():
        if had_own:
            inner.forward = own
        else:
            inner.__dict__.pop("forward", None)

    def redirected(*a, **k):
        restore()
        return fn(*a, **k)

    inner.forward = redirected
    try:
        return module(*args, **kwargs)
    finally:
        restore()
