"""Plain-PyTorch training loop with the fused token-masked DPO loss (no trainer framework).

A tiny random Llama learns, from synthetic preference pairs, to avoid a set of "harmful" token
ids. Each token gets a reward (harmful ids: -1, others: small noise); a Schmitt mask turns the
rewards into weights: chosen weights ``M_chosen``, rejected weights ``-M_rejected``, so harmful
tokens are pushed down and good tokens up wherever they appear. The loss takes the backbone's
hidden states and the lm_head weight: the ``[2N, T, V]`` logits are never built.

Run (CPU, a few seconds):

    python examples/train_masked_dpo.py --steps 20

Swap in a real model by loading it with ``AutoModelForCausalLM.from_pretrained`` and reading
``model.model(...)`` (the backbone) and ``model.lm_head.weight`` the same way.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from typing import Dict, List, Optional

import torch

from fastsafe.training import FusedLinearMaskedDPOLoss, schmitt_mask


def build_model(vocab_size: int, hidden_size: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def synthetic_batch(g: torch.Generator, n_pairs: int, prompt_len: int, resp_len: int, vocab_size: int,
                    harmful: torch.Tensor):
    """``[chosen; rejected]`` token ids ``[2N, P+R]``, targets (prompt = -100) and per-token rewards."""
    prompts = torch.randint(0, vocab_size, (n_pairs, prompt_len), generator=g)
    safe_ids = torch.tensor([v for v in range(vocab_size) if v not in set(harmful.tolist())])
    chosen = safe_ids[torch.randint(0, len(safe_ids), (n_pairs, resp_len), generator=g)]
    rejected = safe_ids[torch.randint(0, len(safe_ids), (n_pairs, resp_len), generator=g)]
    # Rejected answers carry harmful tokens; a few also slip into chosen answers (token-level noise
    # that sequence-level DPO would reinforce, and the mask corrects).
    bad_r = torch.rand(n_pairs, resp_len, generator=g) < 0.4
    bad_c = torch.rand(n_pairs, resp_len, generator=g) < 0.1
    rejected[bad_r] = harmful[torch.randint(0, len(harmful), (int(bad_r.sum()),), generator=g)]
    chosen[bad_c] = harmful[torch.randint(0, len(harmful), (int(bad_c.sum()),), generator=g)]
    ids = torch.cat([torch.cat([prompts, chosen], 1), torch.cat([prompts, rejected], 1)], 0)
    targets = ids[:, 1:].clone()
    targets[:, : prompt_len - 1] = -100
    rewards = 0.1 * torch.randn(targets.shape, generator=g)
    rewards[torch.isin(targets, harmful)] = -1.0
    return ids, targets, rewards


def main(argv: Optional[List[str]] = None) -> List[Dict[str, float]]:
    """Run the loop; returns the metrics of every step."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--pairs", type=int, default=8, help="preference pairs per batch")
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--response-len", type=int, default=16)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--delta", type=float, default=0.2, help="Schmitt band half-width")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=["torch", "triton"], default=None)
    p.add_argument("--json", action="store_true", help="print one JSON line of metrics per step")
    args = p.parse_args(argv)

    policy = build_model(args.vocab_size, args.hidden_size, args.seed)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    harmful = torch.arange(10, 10 + max(4, args.vocab_size // 32))
    loss_fn = FusedLinearMaskedDPOLoss(beta=args.beta, backend=args.backend)
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed + 1)
    n = args.pairs
    history: List[Dict[str, float]] = []
    for step in range(1, args.steps + 1):
        ids, targets, rewards = synthetic_batch(g, n, args.prompt_len, args.response_len, args.vocab_size, harmful)
        valid = targets != -100
        mask = schmitt_mask(rewards, args.delta, attention_mask=valid).float()
        weights = torch.cat([mask[:n], -mask[n:]])          # good tokens up, bad tokens down, in both answers
        hidden = policy.model(input_ids=ids).last_hidden_state[:, :-1]
        with torch.no_grad():
            ref_hidden = reference.model(input_ids=ids).last_hidden_state[:, :-1]
        loss, m = loss_fn(hidden, policy.lm_head.weight, targets, weights,
                          ref_hidden=ref_hidden, ref_weight=reference.lm_head.weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # how likely the policy finds the harmful ids, on average over positions
            logp = torch.log_softmax(policy.lm_head(hidden.detach()[:1]), -1)
            p_harmful = logp[..., harmful].exp().sum(-1).mean()
        metrics = {"step": step, "loss": loss.item(), **{k: v.item() for k, v in m.items()},
                   "p_harmful": p_harmful.item()}
        history.append(metrics)
        if args.json:
            print(json.dumps(metrics), flush=True)
        else:
            print(f"step {step:3d}  loss {metrics['loss']:.4f}  margin {metrics['rewards/margins']:+.4f}  "
                  f"acc {metrics['rewards/accuracies']:.2f}  p(harmful) {metrics['p_harmful']:.4f}", flush=True)
    return history


if __name__ == "__main__":
    main(sys.argv[1:])
