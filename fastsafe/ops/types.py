"""Result and normalised-input types shared by every backend of ``safe_topk``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch


class SafeTopK(NamedTuple):
    """Output of :func:`fastsafe.ops.safe_topk`.

    Attributes:
        values: ``[B, k]`` float32, the k highest processed scores of each row, descending.
            Ties are broken by the lower token id. Slots beyond the number of allowed tokens
            hold ``-inf`` (and the lowest token ids not already listed).
        indices: ``[B, k]`` int64 token ids of ``values``.
        logsumexp: ``[B]`` float32, logsumexp of the processed scores over all V tokens
            (``-inf`` where every token is banned, NaN where an allowed score is NaN).
        all_banned: ``[B]`` bool, True where no token has a finite score.
    """

    values: torch.Tensor
    indices: torch.Tensor
    logsumexp: torch.Tensor
    all_banned: torch.Tensor

    def logprobs(self) -> torch.Tensor:
        """``[B, k]`` exact log-probabilities ``values - logsumexp`` of the processed distribution."""
        return self.values - self.logsumexp.unsqueeze(-1)


@dataclass
class SafeTopKInputs:
    """Validated, normalised inputs handed to a backend (the Python layer validates, kernels compute).

    * ``logits``: ``[B, V]`` fp32/fp16/bf16 with ``stride(1) == 1`` (row stride may be anything).
    * ``bias_table``: ``[L, V]`` float32 contiguous, or None.
    * ``positions``: ``[B]`` int64 contiguous, already clamped to ``[0, L-1]`` (None without a table).
    * ``banned_bitmask``: ``[W]`` (shared by every row) or ``[B, W]`` int32 contiguous, or None.
    * ``dense_reward``: ``[B, V]`` in ``logits.dtype`` with ``stride(1) == 1``, or None.
    """

    logits: torch.Tensor
    k: int
    bias_table: Optional[torch.Tensor]
    positions: Optional[torch.Tensor]
    bias_scale: float
    banned_bitmask: Optional[torch.Tensor]
    dense_reward: Optional[torch.Tensor]
    reward_weight: float
    temperature: float

    @property
    def batch(self) -> int:
        return self.logits.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.logits.shape[1]
