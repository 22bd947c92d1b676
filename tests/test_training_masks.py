"""schmitt_mask and threshold_mask: values against a per-element loop, baselines, padding, bad input."""
import itertools

import pytest
import torch

from fastsafe.training import schmitt_mask, threshold_mask


def loop_schmitt(r, delta, b, valid):
    out = torch.zeros(r.shape, dtype=torch.int8)
    for idx in itertools.product(*(range(n) for n in r.shape)):
        if not valid[idx]:
            continue
        bb = b[idx[0]] if isinstance(b, torch.Tensor) and b.dim() == 1 else float(b)
        x = r[idx].item()
        out[idx] = 1 if x > bb + delta else (-1 if x < bb - delta else 0)
    return out


def test_schmitt_matches_loop_with_batch_mean_baseline():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(4, 9, generator=g)
    am = (torch.rand(4, 9, generator=g) > 0.3).long()
    r_pad = r.masked_fill(am == 0, 1e6)   # padding rewards are garbage and must not move the baseline
    m = schmitt_mask(r_pad, 0.3, attention_mask=am)
    b = r[am.bool()].mean().item()
    assert m.dtype == torch.int8
    assert torch.equal(m, loop_schmitt(r, 0.3, b, am.bool()))
    assert set(m.unique().tolist()) <= {-1, 0, 1} and (m[am == 0] == 0).all()


def test_schmitt_band_edges_and_explicit_baselines():
    r = torch.tensor([[0.0, 0.2, 0.5, 0.8, 1.0]])
    # |r - b| <= delta is the dead band (edges included)
    assert schmitt_mask(r, 0.3, baseline=0.5).tolist() == [[-1, 0, 0, 0, 1]]
    assert schmitt_mask(r, 0.0, baseline=0.5).tolist() == [[-1, -1, 0, 1, 1]]
    per_seq = torch.tensor([0.0, 1.0])
    r2 = torch.tensor([[0.5, -0.5], [0.5, 1.5]])
    assert schmitt_mask(r2, 0.1, baseline=per_seq).tolist() == [[1, -1], [-1, 1]]
    assert schmitt_mask(r2, 0.1, baseline=torch.tensor(0.5)).tolist() == [[0, -1], [0, 1]]
    # 1-D rewards (one sequence) work too
    assert schmitt_mask(torch.tensor([1.0, 0.0]), 0.1).tolist() == [1, -1]


def test_schmitt_no_valid_tokens_is_all_zero():
    r = torch.randn(2, 3)
    m = schmitt_mask(r, 0.1, attention_mask=torch.zeros(2, 3))
    assert (m == 0).all()


def test_threshold_mask_eq8():
    r = torch.tensor([[0.9, 0.1, 0.5, 7.0], [0.9, 0.1, 0.5, 7.0]])
    am = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    m = threshold_mask(r, torch.tensor([True, False]), attention_mask=am)   # baseline 0.5
    assert m.dtype == torch.int8
    assert m.tolist() == [[1, 0, 0, 0], [0, 1, 0, 0]]
    assert threshold_mask(r, True, baseline=0.0, attention_mask=am).tolist() == [[1, 1, 1, 0], [1, 1, 1, 0]]
    assert threshold_mask(r, False, baseline=0.0).tolist() == [[0, 0, 0, 0], [0, 0, 0, 0]]


@pytest.mark.parametrize("call, exc, match", [
    (lambda r: schmitt_mask(r, -0.1), ValueError, "delta: expected a number >= 0"),
    (lambda r: schmitt_mask(r, float("inf")), ValueError, "delta"),
    (lambda r: schmitt_mask(r.long(), 0.1), TypeError, "token_rewards"),
    (lambda r: schmitt_mask(r, 0.1, attention_mask=torch.ones(2, 2)), ValueError, "attention_mask: expected"),
    (lambda r: schmitt_mask(r, 0.1, baseline=torch.ones(4)), ValueError, "baseline"),
    (lambda r: schmitt_mask(r, 0.1, baseline="x"), TypeError, "baseline"),
    (lambda r: schmitt_mask(r.masked_fill(r > -9, float("nan")), 0.1), ValueError, "token_rewards: expected finite"),
    (lambda r: threshold_mask(r, torch.tensor([True])), ValueError, "is_chosen"),
    (lambda r: threshold_mask(r, torch.tensor([1, 0])), TypeError, "is_chosen"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.randn(2, 3))


def test_nan_on_padding_is_ignored():
    r = torch.tensor([[1.0, float("nan")]])
    assert schmitt_mask(r, 0.1, attention_mask=torch.tensor([[1, 0]])).tolist() == [[0, 0]]
