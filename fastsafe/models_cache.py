"""Passing a KV cache to a Hugging Face model, whatever the transformers release calls it.

transformers 5.24 renamed the forward argument and the output field ``past_key_values`` to
``cache`` (the old name still works there with a ``FutureWarning`` and goes away in 5.40); older
releases only know ``past_key_values``. fastsafe detects the name once per model class from the
forward signature and uses it everywhere it runs a model with a cache (its own decoding loop, the
reward's prefix cache): no version-string compares.

Example:
    >>> from fastsafe.models_cache import cache_kwargs, output_cache
    >>> out = model(input_ids=ids, use_cache=True, **cache_kwargs(model, None))
    >>> past = output_cache(model, out)                       # a transformers Cache
    >>> out = model(input_ids=nxt, use_cache=True, **cache_kwargs(model, past))
"""
from __future__ import annotations

import functools
import inspect

__all__ = ["CACHE_ARGUMENTS", "accepts", "cache_argument", "cache_kwargs", "output_cache"]

#: The KV-cache argument names, newest first.
CACHE_ARGUMENTS = ("cache", "past_key_values")


@functools.lru_cache(maxsize=None)
def _parameters(forward) -> frozenset:
    try:
        return frozenset(inspect.signature(forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def _forward_of(module):
    forward = getattr(type(module), "forward", None) or getattr(module, "forward", None)
    return getattr(forward, "__func__", forward)


def accepts(module, name: str) -> bool:
    """Whether ``module.forward`` names the parameter ``name`` in its signature.

    Example:
        >>> accepts(model, "logits_to_keep")
        True
    """
    forward = _forward_of(module)
    if forward is None:
        return False
    try:
        return name in _parameters(forward)
    except TypeError:                      # an unhashable callable: inspect it directly
        try:
            return name in inspect.signature(forward).parameters
        except (TypeError, ValueError):
            return False


@functools.lru_cache(maxsize=1)
def _library_cache_argument() -> str:
    """The installed transformers' name, read from its own output class (for models whose
    forward hides its parameters behind ``*args, **kwargs``, e.g. wrapped modules)."""
    try:
        from transformers.modeling_outputs import CausalLMOutputWithPast
    except ImportError:
        return "past_key_values"
    fields = getattr(CausalLMOutputWithPast, "__dataclass_fields__", {})
    return "cache" if "cache" in fields else "past_key_values"


def cache_argument(module) -> str | None:
    """The name under which ``module.forward`` takes a KV cache.

    ``"cache"`` (transformers >= 5.24) or ``"past_key_values"`` (older releases, and models that
    only know that name), read from the forward signature; for a forward with only
    ``*args, **kwargs`` the installed transformers' own name; ``None`` when the forward takes
    named parameters but neither of these (the model has no KV cache).

    Example:
        >>> cache_argument(AutoModelForCausalLM.from_config(cfg))
        'cache'
    """
    for name in CACHE_ARGUMENTS:
        if accepts(module, name):
            return name
    forward = _forward_of(module)
    try:
        params = inspect.signature(forward).parameters.values() if forward is not None else ()
    except (TypeError, ValueError):
        params = ()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params) and not accepts(module, "input_ids"):
        return _library_cache_argument()
    return None


def cache_kwargs(module, cache) -> dict:
    """``{name: cache}`` for ``module.forward`` (see :func:`cache_argument`).

    Raises:
        TypeError: ``module`` takes no KV cache at all.

    Example:
        >>> out = model(input_ids=ids, use_cache=True, **cache_kwargs(model, past))
    """
    name = cache_argument(module)
    if name is None:
        raise TypeError(f"model: {type(module).__name__}.forward takes no KV cache (neither `cache` nor "
                        f"`past_key_values`); fastsafe needs a Hugging Face causal LM with a KV cache")
    return {name: cache}


def output_cache(module, output):
    """The KV cache a forward of ``module`` returned (``output.cache`` or ``output.past_key_values``).

    Reads the field under the name ``module`` takes (so no deprecated alias is touched), falling
    back to the other name for outputs of a mixed kind; ``None`` when the output holds none.

    Example:
        >>> past = output_cache(model, model(input_ids=ids, use_cache=True))
    """
    first = cache_argument(module) or _library_cache_argument()
    names = (first,) + tuple(n for n in CACHE_ARGUMENTS if n != first)
    fields = getattr(type(output), "__dataclass_fields__", None)
    for name in names:
        if fields is not None and name not in fields:
            continue
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None
