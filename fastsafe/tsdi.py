"""TSDI: token-level safety-debiasing bias, estimated once and subtracted at generation time.

Safety alignment shifts some logits regardless of the context (a bias towards refusal tokens).
:class:`TSDIBias` estimates that shift per output position ``i = 1..L`` as the mean logit
difference ``aligned - reference`` over random prompts followed by random response prefixes,
stores it as an ``[L, V]`` float32 ``bias_table`` and saves it to safetensors with metadata.

Estimation, for each sampled prompt ``x`` and random response tokens ``r_1..r_{L-1}``::

    bias_table[i - 1] += logits_aligned(x, r_<i) - logits_reference(x, r_<i)     (i = 1..L)

averaged over the prompts. Both models see the same sequences; one forward per model and batch
gives every position (the logits at the last prompt token predict output position 1, and so on).

Example:
    >>> bias = TSDIBias.estimate(aligned, reference, tokenizer, length=16, num_prompts=256)
    >>> bias.save("bias.safetensors")
    >>> bias = TSDIBias.load("bias.safetensors", vocab_size=model.config.vocab_size)
    >>> bias.bias_table.shape           # [L, V] float32
"""
from __future__ import annotations

import json
import numbers
import os
import random
from dataclasses import dataclass, field

import torch

from .ops.validate import check_int

__all__ = ["TSDIBias", "sample_sequences", "PROMPT_POOLS", "FORMAT_VERSION"]

PROMPT_POOLS = ("random", "lines", "tokens", "file")
FORMAT_VERSION = "1"
TABLE_KEY = "bias_table"


def _model_name(model) -> str:
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", "") or getattr(cfg, "name_or_path", "")
    return str(name) if name else type(model).__name__


def _usable_token_ids(tokenizer, vocab_size: int) -> list[int]:
    """Ordinary (non-special) token ids below ``vocab_size``: the pool for random tokens."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    limit = min(vocab_size, len(tokenizer)) if tokenizer is not None else vocab_size
    ids = [i for i in range(limit) if i not in special]
    if not ids:
        raise ValueError(f"tokenizer: no ordinary token ids below the vocabulary size {vocab_size}")
    return ids


def _read_prompt_file(prompt_file) -> list[str]:
    path = os.fspath(prompt_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt_file: no such file: {path!r}")
    with open(path, encoding="utf-8") as fh:
        lines = [ln.strip() for ln in fh]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise ValueError(f"prompt_file: {path!r} contains no non-empty lines")
    return lines


def sample_sequences(tokenizer, vocab_size: int, *, length: int, num_prompts: int, seed: int = 0,
                     prompt_pool: str = "random", prompt_file=None, prompt_length=(4, 32)):
    """The random prompts and response prefixes that :meth:`TSDIBias.estimate` uses.

    Args:
        tokenizer: the models' tokenizer (special tokens are never drawn; ``prompt_file`` is
            tokenised with it, without special tokens).
        vocab_size: ``V`` of the models' logits.
        length: ``L``; every response prefix has ``L - 1`` tokens.
        num_prompts: ``N``.
        seed: seeds Python's ``random.Random`` (the draws do not touch torch's global RNG).
        prompt_pool: ``"random"`` (uniform ordinary vocabulary tokens), ``"lines"`` (each prompt
            is a random non-empty line of ``prompt_file``; ``"file"`` is an alias), or
            ``"tokens"`` (prompt tokens drawn from the tokenised ``prompt_file``).
        prompt_file: text file for the ``"lines"`` / ``"tokens"`` pools.
        prompt_length: ``(min, max)`` tokens of a random prompt (``"random"``/``"tokens"``) or the
            truncation length of a line (``max`` only, keeping the line's end).

    Returns:
        list of ``(prompt_ids, response_ids)`` pairs of Python int lists; response tokens are
        uniform ordinary vocabulary tokens (``"random"``/``"lines"``) or drawn from the file
        (``"tokens"``).
    """
    length = check_int("length", length, 1)
    num_prompts = check_int("num_prompts", num_prompts, 1)
    if prompt_pool not in PROMPT_POOLS:
        raise ValueError(f"prompt_pool: expected one of {PROMPT_POOLS}, got {prompt_pool!r}")
    if prompt_pool == "file":
        prompt_pool = "lines"
    if prompt_pool != "random" and prompt_file is None:
        raise ValueError(f"prompt_file: required for prompt_pool={prompt_pool!r}")
    try:
        lo, hi = (int(prompt_length), int(prompt_length)) if isinstance(prompt_length, numbers.Integral) \
            else (int(prompt_length[0]), int(prompt_length[1]))
    except (TypeError, IndexError, ValueError):
        raise TypeError(f"prompt_length: expected an int or a (min, max) pair, got {prompt_length!r}") from None
    if not 1 <= lo <= hi:
        raise ValueError(f"prompt_length: expected 1 <= min <= max, got {prompt_length!r}")

    rng = random.Random(seed)
    ordinary = _usable_token_ids(tokenizer, vocab_size)
    lines = _read_prompt_file(prompt_file) if prompt_pool != "random" else None
    file_tokens = None
    if prompt_pool == "tokens":
        file_tokens = [t for ln in lines for t in tokenizer.encode(ln, add_special_tokens=False) if t < vocab_size]
        if not file_tokens:
            raise ValueError(f"prompt_file: {os.fspath(prompt_file)!r} tokenises to nothing")

    out = []
    for _ in range(num_prompts):
        if prompt_pool == "random":
            prompt = [rng.choice(ordinary) for _ in range(rng.randint(lo, hi))]
        elif prompt_pool == "tokens":
            prompt = [rng.choice(file_tokens) for _ in range(rng.randint(lo, hi))]
        else:
            prompt = [t for t in tokenizer.encode(rng.choice(lines), add_special_tokens=False) if t < vocab_size]
            prompt = prompt[-hi:] or [rng.choice(ordinary)]
        pool = file_tokens if prompt_pool == "tokens" else ordinary
        response = [rng.choice(pool) for _ in range(length - 1)]
        out.append((prompt, response))
    return out


@dataclass
class TSDIBias:
    """An ``[L, V]`` float32 TSDI bias table plus its metadata.

    Row ``i - 1`` is the mean logit shift at output position ``i`` (the ``i``-th generated token).
    At generation the row of the current response position is multiplied by ``tsdi_scale`` and
    subtracted from the logits; positions past ``L`` use the last row or none
    (``SafetyConfig(tsdi_beyond="last" | "none")``).

    Attributes:
        bias_table: ``[L, V]`` float32.
        metadata: str -> str (aligned / reference model names, length, num_prompts, vocab_size,
            seed, prompt_pool, format_version).
    """

    bias_table: torch.Tensor
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        t = self.bias_table
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"bias_table: expected a torch.Tensor [L, V], got {type(t).__name__}")
        if t.dim() == 1:
            t = t.unsqueeze(0)
        if t.dim() != 2 or t.shape[0] < 1 or t.shape[1] < 1:
            raise ValueError(f"bias_table: expected a non-empty [L, V] tensor, got shape {tuple(self.bias_table.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"bias_table: expected a floating point dtype, got {t.dtype}")
        if t.device.type == "meta":
            raise ValueError(f"bias_table: expected a tensor with data (cpu or cuda), got a meta tensor of shape "
                             f"{tuple(t.shape)}")
        t = t.to(torch.float32).contiguous()
        if not bool(torch.isfinite(t).all()):
            raise ValueError("bias_table: contains NaN or infinite values")
        self.bias_table = t
        self.metadata = {str(k): str(v) for k, v in (self.metadata or {}).items()}
        self.metadata.setdefault("length", str(t.shape[0]))
        self.metadata.setdefault("vocab_size", str(t.shape[1]))

    @property
    def length(self) -> int:
        """``L``: the number of output positions covered."""
        return int(self.bias_table.shape[0])

    @property
    def vocab_size(self) -> int:
        """``V``: the vocabulary size the table was estimated for."""
        return int(self.bias_table.shape[1])

    def to(self, device) -> "TSDIBias":
        """A copy whose table lives on ``device``."""
        return TSDIBias(self.bias_table.to(device), dict(self.metadata))

    def check_vocab(self, vocab_size: int, *, what: str = "the model's logits") -> None:
        """Raise ``ValueError`` unless the table was estimated for ``vocab_size`` tokens."""
        if int(vocab_size) != self.vocab_size:
            raise ValueError(
                f"tsdi: vocabulary size mismatch: the bias table has V = {self.vocab_size} "
                f"(estimated for {self.metadata.get('aligned', '?')!r}) but {what} has V = {int(vocab_size)}; "
                f"estimate a bias for this model with `fastsafe estimate-bias`")

    # ------------------------------------------------------------------ estimation
    @classmethod
    @torch.no_grad()
    def estimate(cls, aligned, reference, tokenizer, *, length: int = 16, num_prompts: int = 256,
                 prompt_file=None, prompt_pool: str = "random", prompt_length=(4, 32), batch_size: int = 16,
                 seed: int = 0, device=None, progress: bool = True) -> "TSDIBias":
        """Estimate the ``[L, V]`` TSDI bias of ``aligned`` against ``reference``.

        Args:
            aligned: the safety-aligned causal LM (a ``PreTrainedModel`` or a path / ``"default"``,
                loaded with :func:`fastsafe.models.load_model`).
            reference: its reference (SFT) model; same vocabulary.
            tokenizer: the shared tokenizer (``None``: the aligned model's, when given as a path).
            length: ``L``, the number of output positions.
            num_prompts: ``N`` random prompts.
            prompt_file: optional text file; with it the default pool is ``"lines"``.
            prompt_pool: ``"random"``, ``"lines"`` (alias ``"file"``) or ``"tokens"``; see
                :func:`sample_sequences`.
            prompt_length: ``(min, max)`` prompt tokens.
            batch_size: sequences per forward (left padded; attention mask and position ids set).
            seed: seeds the prompt / response draws.
            device: where to run (default: the aligned model's device).
            progress: show a tqdm progress bar.

        Returns:
            :class:`TSDIBias` with a ``[L, V]`` float32 table on the CPU and metadata.

        Example:
            >>> bias = TSDIBias.estimate(aligned, reference, tok, length=8, num_prompts=64, batch_size=8)
        """
        from .models import load_model, logits_vocab_size
        aligned_name, reference_name = _model_name(aligned), _model_name(reference)
        if isinstance(aligned, (str, os.PathLike)):
            aligned, tok = load_model(aligned)
            tokenizer = tokenizer if tokenizer is not None else tok
        if isinstance(reference, (str, os.PathLike)):
            reference, _ = load_model(reference)
        if tokenizer is None:
            raise ValueError("tokenizer: required when the aligned model is given as a model object")
        length = check_int("length", length, 1)
        num_prompts = check_int("num_prompts", num_prompts, 1)
        batch_size = check_int("batch_size", batch_size, 1)
        if prompt_file is not None and prompt_pool == "random":
            prompt_pool = "lines"
        va, vr = logits_vocab_size(aligned), logits_vocab_size(reference)
        if va != vr:
            raise ValueError(f"reference: vocabulary size mismatch: aligned model has V = {va}, reference has V = {vr}")
        if len(tokenizer) > va:
            raise ValueError(f"tokenizer: has {len(tokenizer)} tokens but the models' vocabulary has V = {va}")
        seqs = sample_sequences(tokenizer, va, length=length, num_prompts=num_prompts, seed=seed,
                                prompt_pool=prompt_pool, prompt_file=prompt_file, prompt_length=prompt_length)
        dev = torch.device(device) if device is not None else next(aligned.parameters()).device
        total = torch.zeros(length, va, dtype=torch.float64, device=dev)
        batches = [seqs[i:i + batch_size] for i in range(0, len(seqs), batch_size)]
        it = batches
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(batches, desc="TSDI bias", unit="batch")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        for batch in it:
            full = [p + r for p, r in batch]
            T = max(len(s) for s in full)
            ids = torch.full((len(full), T), pad, dtype=torch.long)
            mask = torch.zeros((len(full), T), dtype=torch.long)
            for b, s in enumerate(full):
                ids[b, T - len(s):] = torch.tensor(s, dtype=torch.long)
                mask[b, T - len(s):] = 1
            ids, mask = ids.to(dev), mask.to(dev)
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            la = aligned(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
            lr = reference(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
            # the last prompt token sits at T - L (every response has L - 1 tokens)
            diff = la[:, T - length:, :va].double() - lr[:, T - length:, :va].double()
            total += diff.sum(0)
        table = (total / num_prompts).float().cpu()
        meta = {
            "format_version": FORMAT_VERSION, "aligned": aligned_name, "reference": reference_name,
            "length": length, "num_prompts": num_prompts, "vocab_size": va, "seed": seed,
            "prompt_pool": prompt_pool, "prompt_file": os.fspath(prompt_file) if prompt_file else "",
            "prompt_length": json.dumps(list(prompt_length) if not isinstance(prompt_length, numbers.Integral)
                                        else [prompt_length, prompt_length]),
        }
        return cls(table, meta)

    # ------------------------------------------------------------------ files
    def save(self, path) -> None:
        """Write the table and metadata to a safetensors file (key ``"bias_table"``)."""
        from safetensors.torch import save_file
        path = os.fspath(path)
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"path: directory {parent!r} does not exist")
        meta = dict(self.metadata)
        meta["length"], meta["vocab_size"] = str(self.length), str(self.vocab_size)
        meta.setdefault("format_version", FORMAT_VERSION)
        save_file({TABLE_KEY: self.bias_table.detach().cpu().contiguous()}, path, metadata=meta)

    @classmethod
    def load(cls, path, vocab_size: int | None = None, device="cpu") -> "TSDIBias":
        """Read a bias written by :meth:`save`.

        Args:
            path: the ``.safetensors`` file.
            vocab_size: if given, raise ``ValueError`` unless the table has exactly this ``V``
                (pass the model's logits size, ``model.get_output_embeddings().weight.shape[0]``).
            device: where to put the table.

        Example:
            >>> bias = TSDIBias.load("bias.safetensors", vocab_size=49152)
        """
        from safetensors import SafetensorError
        from safetensors import safe_open
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path: no TSDI bias file at {path!r}")
        try:
            with safe_open(path, framework="pt", device="cpu") as fh:
                keys = list(fh.keys())
                meta = dict(fh.metadata() or {})
                if TABLE_KEY not in keys:
                    raise ValueError(f"path: {path!r} has no {TABLE_KEY!r} tensor (keys: {keys}); "
                                     f"not a fastsafe TSDI bias file")
                table = fh.get_tensor(TABLE_KEY)
        except SafetensorError as exc:
            raise ValueError(f"path: {path!r} is not a readable safetensors file: {exc}") from None
        if table.dim() != 2:
            raise ValueError(f"path: {path!r}: expected a [L, V] {TABLE_KEY}, got shape {tuple(table.shape)}")
        if "vocab_size" in meta:
            try:
                meta_v = int(meta["vocab_size"])
            except ValueError:
                raise ValueError(f"path: {path!r}: metadata vocab_size: expected an integer, got "
                                 f"{meta['vocab_size']!r}") from None
            if meta_v != table.shape[1]:
                raise ValueError(f"path: {path!r}: metadata vocab_size {meta['vocab_size']} does not match the "
                                 f"table's {table.shape[1]} columns")
        bias = cls(table, meta)
        if vocab_size is not None:
            bias.check_vocab(check_int("vocab_size", vocab_size, 1), what="vocab_size")
        return bias.to(device) if str(device) != "cpu" else bias

    def rows_for(self, position: int, beyond: str = "last"):
        """The table to use at response ``position`` (0-based), or ``None`` past ``L`` with ``beyond="none"``."""
        if beyond == "none" and position >= self.length:
            return None
        return self.bias_table

    def __repr__(self) -> str:
        return (f"TSDIBias(L={self.length}, V={self.vocab_size}, aligned={self.metadata.get('aligned', '?')!r}, "
                f"reference={self.metadata.get('reference', '?')!r}, num_prompts={self.metadata.get('num_prompts', '?')})")
