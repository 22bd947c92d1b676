"""choose(): reward mixing, candidate bans, greedy, HF-compatible top-p / min-p, seeded sampling."""
import pytest
import torch
from transformers.generation.logits_process import MinPLogitsWarper, TopPLogitsWarper

from fastsafe.ops import choose, safe_topk
from fastsafe.ops.choose import min_p_filter, top_p_filter


def test_greedy_is_argmax_of_logits():
    x = torch.randn(16, 500)
    assert torch.equal(choose(safe_topk(x, 10)), x.argmax(1))


def test_reward_mixing_changes_the_pick():
    x = torch.tensor([[3.0, 2.9, 0.0, -1.0]])
    out = safe_topk(x, 3)
    assert choose(out).item() == 0
    r = torch.tensor([[-1.0, 0.0, 0.0]])
    assert choose(out, candidate_reward=r, reward_weight=1.0).item() == 1
    assert choose(out, candidate_reward=r, reward_weight=0.0).item() == 0
    s = (out.values - out.logsumexp[:, None]) + 5.0 * r
    assert choose(out, candidate_reward=r, reward_weight=5.0).item() == out.indices[0, s.argmax()].item()


def test_candidate_allowed_and_fallback():
    x = torch.randn(3, 50)
    out = safe_topk(x, 4)
    allowed = torch.ones(3, 4, dtype=torch.bool)
    allowed[0, 0] = False
    allowed[2] = False
    ids = choose(out, candidate_allowed=allowed, fallback_id=49)
    assert ids[0].item() == out.indices[0, 1].item()
    assert ids[1].item() == out.indices[1, 0].item()
    assert ids[2].item() == 49
    with pytest.raises(ValueError, match=r"rows \[2\].*fallback_id"):
        choose(out, candidate_allowed=allowed)


def test_all_banned_row_needs_fallback():
    from fastsafe.ops import pack_bitmask
    x = torch.randn(2, 40)
    allowed = torch.ones(2, 40, dtype=torch.bool)
    allowed[1] = False
    out = safe_topk(x, 3, banned_bitmask=pack_bitmask(allowed))
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        choose(out)
    assert choose(out, fallback_id=7)[1].item() == 7
    assert choose(out, fallback_id=7, do_sample=True, generator=torch.Generator().manual_seed(0))[1].item() == 7


def test_nan_rows_are_refused():
    x = torch.randn(2, 40)
    x[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN in rows \[1\]"):
        choose(safe_topk(x, 3))


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.8, 0.95, 1.0])
def test_top_p_matches_hf(top_p):
    torch.manual_seed(0)
    s = torch.randn(8, 20) * 2
    ours = top_p_filter(s, top_p)
    hf = TopPLogitsWarper(top_p=top_p)(None, s.clone()) if top_p < 1.0 else s
    assert torch.equal(torch.isneginf(ours), torch.isneginf(hf))


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 0.9])
def test_min_p_matches_hf(min_p):
    torch.manual_seed(1)
    s = torch.randn(8, 20) * 2
    ours = min_p_filter(s, min_p)
    hf = MinPLogitsWarper(min_p=min_p)(None, s.clone())
    assert torch.equal(torch.isneginf(ours), torch.isneginf(hf))


def test_sampling_is_seeded_and_follows_the_distribution():
    x = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05] + [1e-9] * 10]))
    out = safe_topk(x, 4)
    a = [choose(out, do_sample=True, generator=torch.Generator().manual_seed(s)).item() for s in range(5)]
    b = [choose(out, do_sample=True, generator=torch.Generator().manual_seed(s)).item() for s in range(5)]
    assert a == b
    g = torch.Generator().manual_seed(123)
    big = out._replace(values=out.values.expand(4000, 4), indices=out.indices.expand(4000, 4),
                       logsumexp=out.logsumexp.expand(4000), all_banned=out.all_banned.expand(4000))
    ids = choose(big, do_sample=True, generator=g)
    freq = torch.bincount(ids, minlength=4)[:4].float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    # top_p=0.6 keeps {0, 1}; min_p=0.5 keeps {0, 1} (0.3 >= 0.25)
    ids = choose(big, do_sample=True, top_p=0.6, generator=g)
    assert set(ids.tolist()) == {0, 1}
    ids = choose(big, do_sample=True, min_p=0.5, generator=g)
    assert set(ids.tolist()) == {0, 1}


def test_bad_arguments():
    out = safe_topk(torch.randn(2, 30), 4)
    with pytest.raises(ValueError, match=r"candidate_reward: expected shape \[B, k\] = \[2, 4\]"):
        choose(out, candidate_reward=torch.zeros(2, 5), reward_weight=1.0)
    with pytest.raises(TypeError, match="candidate_allowed: expected dtype bool"):
        choose(out, candidate_allowed=torch.ones(2, 4))
    with pytest.raises(ValueError, match="top_p"):
        choose(out, top_p=0.0)
    with pytest.raises(ValueError, match="min_p"):
        choose(out, min_p=1.5)
    with pytest.raises(TypeError, match="out: expected the SafeTopK"):
        choose(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="candidate_reward: contains NaN"):
        choose(out, candidate_reward=torch.full((2, 4), float("nan")), reward_weight=1.0)
