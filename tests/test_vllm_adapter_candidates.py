"""vLLM adapter, CPU step: the chunked top-k of the text check and the bans that report their maxima,
against safe_topk / amax / ban_. No vLLM needed."""
from __future__ import annotations

import pytest
import torch

from fastsafe.integrations.vllm.candidates import top_candidates
from fastsafe.integrations.vllm.inplace import ban_, ban_max_
from fastsafe.ops import pack_bitmask, safe_topk

NEG = float("-inf")


def _cases():
    g = torch.Generator().manual_seed(3)
    ties = torch.randint(0, 4, (6, 203), generator=g).float()          # many ties, also across chunks
    ties[2, :] = 3.0                                                      # one value everywhere
    sparse = torch.full((4, 203), NEG)                                    # few finite scores per row
    sparse[0, [5, 77, 150]] = 1.0
    sparse[1, :] = torch.randn(203, generator=g)
    sparse[2, 190:] = 2.0                                                 # only in the short last chunk
    sparse[3, [3, 9]] = float("inf")
    nan = torch.randn(3, 203, generator=g)
    nan[1, 40] = float("nan")
    nan[1, 41] = 100.0                                                    # the best score, beside the NaN
    rank = torch.zeros(2, 203)                                            # a tie across chunks ranked the other way:
    rank[:, 0] = 1.0                                                      # id 0 in a chunk of max 1 ...
    rank[:, 17] = 5.0                                                     # ... id 18 in the chunk of max 5
    rank[:, 18] = 1.0
    return {"rank": rank, "ties": ties, "sparse": sparse, "nan": nan, "bf16": torch.randn(5, 203, generator=g).bfloat16(),
            "even": torch.randint(0, 3, (4, 192), generator=g).float(), "strided": torch.randn(4, 400, generator=g)[:, ::2],
            "row_strided": torch.randint(0, 3, (4, 260), generator=g).float()[:, :192]}


@pytest.mark.parametrize("name", list(_cases()))
@pytest.mark.parametrize("chunk", [4, 8, 16])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_top_candidates_equal_safe_topk_and_amax(name, chunk, k):
    x = _cases()[name]
    ref = safe_topk(x, k)
    values, indices, row_max = top_candidates(x, k, chunk=chunk)
    assert torch.equal(indices, ref.indices), (name, chunk, k)
    assert torch.equal(values, ref.values)
    torch.testing.assert_close(row_max, x.amax(-1), equal_nan=True, rtol=0, atol=0)


def test_top_candidates_refuses_bad_arguments():
    with pytest.raises(ValueError, match="1 <= k <= V"):
        top_candidates(torch.zeros(2, 8), 9)
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        top_candidates(torch.zeros(2, 8, dtype=torch.int64), 2)


@pytest.mark.parametrize("every", [True, False])
def test_ban_max_gives_ban_results_from_the_maxima_after_the_bans(every, monkeypatch):
    import fastsafe.integrations.vllm.inplace as inplace
    monkeypatch.setattr(inplace, "SHARED_MIN_WORDS", 1)                  # also the column path of shared bans
    g = torch.Generator().manual_seed(5)
    B, V = 6, 200
    logits = torch.randint(0, 5, (B, V), generator=g).float()
    allowed = torch.rand(B, V, generator=g) > 0.1
    allowed[:, 64:96] = False                                             # banned in every row
    allowed[3] = True                                                     # a row with no ban
    rows = torch.arange(B) if every else torch.tensor([5, 0, 2, 3, 1, 4])
    if not every:
        logits = torch.cat([logits, torch.zeros(1, V)])
    want = logits.clone()
    best, hit = ban_(want, rows, pack_bitmask(allowed), want.amax(-1).index_select(0, rows), sparse=False)
    got = logits.clone()
    bmax, bid = ban_max_(got, rows, pack_bitmask(allowed))
    assert torch.equal(got, want)
    before = torch.maximum(got.amax(-1).index_select(0, rows), bmax)
    assert torch.equal(before, logits.amax(-1).index_select(0, rows))
    h = torch.isfinite(bmax) & (bmax == before)
    assert torch.equal(h, hit) and bool(hit.any()) and not bool(hit.all())
    assert torch.equal(torch.where(h, bid, 0), best)
    assert torch.isneginf(bmax[3 if every else 3]) and int(bid[3]) == V
