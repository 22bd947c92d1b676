"""A minimal V1 logits processor: bans the token ids a request lists in ``extra_args["ban_token_ids"]``.

It checks the engine-test harness itself (that a processor named by FQCN reaches the worker, that
``extra_args`` / ``vllm_xargs`` reach it, that row bookkeeping follows vLLM's batch updates), so a
failure of the fastsafe adapter's tests can be told apart from a broken harness.

With ``FASTSAFE_TEST_READD_LOG=path`` it appends one line per request vLLM hands back to the
processors with output tokens already generated (a preempted request resumed): the tests use it to
show that a preemption happened under the processors.
"""
from __future__ import annotations

import os

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

KEY = "ban_token_ids"


class BanTokensProcessor(LogitsProcessor):
    """Sets ``-inf`` on the listed token ids of each request that lists some."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.rows: dict[int, list[int]] = {}

    @classmethod
    def validate_params(cls, params):
        ids = (params.extra_args or {}).get(KEY)
        if ids is not None and not (isinstance(ids, list) and all(isinstance(t, int) and t >= 0 for t in ids)):
            raise ValueError(f"{KEY}: expected a list of non-negative token ids, got {ids!r}")

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _prompt, output in batch_update.added:
            if output and os.environ.get("FASTSAFE_TEST_READD_LOG"):
                with open(os.environ["FASTSAFE_TEST_READD_LOG"], "a") as f:
                    f.write(f"{index} {len(output)}\n")
            ids = (params.extra_args or {}).get(KEY) if params is not None else None
            if ids:
                self.rows[index] = list(ids)
            else:
                self.rows.pop(index, None)
        for a, b, direction in batch_update.moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ra is not None:
                self.rows[b] = ra
            if direction == MoveDirectionality.SWAP and rb is not None:
                self.rows[a] = rb

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, ids in self.rows.items():
            logits[index, ids] = float("-inf")
        return logits
