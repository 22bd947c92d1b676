"""Tolerance-aware comparison of a ``safe_topk`` result with the torch reference.

Tolerances (stated once, used by every backend test): scores are computed in float32 from the
same inputs, so values agree to ``atol = rtol = 1e-5`` (temperature division and fused
multiply-adds may differ in the last bits). Indices may legitimately differ only among
candidates whose reference scores tie within that tolerance, so we check that each returned
index carries its returned value in the reference, ids are distinct, and values match the
reference's sorted top-k.
"""
import torch

from fastsafe.ops.reference import processed_scores, topk_lowest_id_ties
from fastsafe.ops.validate import validate_safe_topk

ATOL = 1e-5
RTOL = 1e-5


def reference_for(logits, k, **kw):
    inp = validate_safe_topk(logits, k, **kw)
    scores = processed_scores(inp)
    vals, idx = topk_lowest_id_ties(scores, inp.k)
    return scores, vals, idx, torch.logsumexp(scores, dim=1)


def _close(a, b):
    fin = torch.isfinite(a) & torch.isfinite(b)
    same_inf = (a == b) | (torch.isnan(a) & torch.isnan(b))
    ok = torch.where(fin, (a - b).abs() <= ATOL + RTOL * b.abs(), same_inf)
    return ok


def assert_matches_reference(out, logits, k, exact_ids: bool = False, **kw):
    scores, rvals, ridx, rlse = reference_for(logits, k, **kw)
    B = logits.shape[0]
    assert out.values.shape == (B, k) and out.values.dtype == torch.float32
    assert out.indices.shape == (B, k) and out.indices.dtype == torch.int64
    assert out.logsumexp.shape == (B,) and out.logsumexp.dtype == torch.float32
    vals, idx, lse = out.values.cpu(), out.indices.cpu(), out.logsumexp.cpu()
    scores, rvals, ridx, rlse = scores.cpu(), rvals.cpu(), ridx.cpu(), rlse.cpu()
    assert _close(vals, rvals).all(), f"values differ:\n{vals}\nvs reference\n{rvals}"
    assert _close(lse, rlse).all(), f"logsumexp differs: {lse} vs reference {rlse}"
    assert ((idx >= 0) & (idx < logits.shape[1])).all(), "index out of range"
    for b in range(B):
        assert len(set(idx[b].tolist())) == k, f"row {b}: repeated ids {idx[b].tolist()}"
    key = scores.masked_fill(torch.isnan(scores), float("-inf"))
    assert _close(key.gather(1, idx), vals).all(), "returned ids do not carry their returned values"
    # descending order
    assert (vals[:, :-1] >= vals[:, 1:]).all() | torch.isneginf(vals[:, 1:]).all(), "values not descending"
    if exact_ids:
        assert torch.equal(idx, ridx), f"ids differ:\n{idx}\nvs reference\n{ridx}"
    assert torch.equal(out.all_banned.cpu(), torch.isneginf(rlse))
