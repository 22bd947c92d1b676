"""GRPO with an adaptive token mask (the paper's APPO, eq. 9) through TRL: MaskedGRPOTrainer.

A tiny random Llama with a character-level tokenizer (built in memory: offline, no downloads)
answers a few prompts. Some letters are "harmful". The sequence reward (TRL's ``reward_funcs``)
counts harmful letters against the answer; the token reward gives -1 to a harmful letter and 0 to
any other token. A Schmitt mask around the batch-mean token reward turns these into ``+1`` (keep
the token's push), ``0`` (drop it) and ``-1`` (reverse it): a harmful letter in a completion that
was better than its group is pushed down, not up. Per-token log-probs come from fastsafe's fused
``token_logps`` on the hidden states and the lm_head weight.

Run (CPU, well under a minute):

    python examples/train_masked_grpo.py --steps 10

Swap in a real model and tokenizer with ``AutoModelForCausalLM.from_pretrained`` /
``AutoTokenizer.from_pretrained``, and a real token-level reward (a safety classifier's per-token
scores, a risk-entity matcher) as ``token_reward_fn``.
"""
from __future__ import annotations

import argparse
import os
import string
import sys
import tempfile
from typing import Dict, List, Optional

import torch

HARMFUL = "xzqjk"
PROMPTS = ["tell me a story", "how do i bake bread", "say something nice", "what is two and two",
           "name a colour", "describe the sea", "give me advice", "write a short poem"]


def char_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` (pad=0, eos=1, then letters and punctuation)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = list(string.ascii_lowercase + " .,!?")
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")


def build_model(path: str, vocab_size: int, hidden_size: int, seed: int):
    """A random 2-layer Llama saved to ``path`` and loaded back (TRL loads the reference from there)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def harmful_letters(completions, **kwargs) -> List[float]:
    """Sequence reward: minus the number of harmful letters, plus a little for length."""
    return [-float(sum(c.count(h) for h in HARMFUL)) + 0.05 * len(c) for c in completions]


def make_token_rewards(tokenizer):
    harmful_ids = {tokenizer.convert_tokens_to_ids(h) for h in HARMFUL}

    def token_rewards(completion_ids, **kwargs) -> List[List[float]]:
        """Token reward: -1 on a harmful letter, 0 on any other completion token."""
        return [[-1.0 if t in harmful_ids else 0.0 for t in ids] for ids in completion_ids]

    return token_rewards, sorted(harmful_ids)


@torch.no_grad()
def harmful_probability(model, tokenizer, harmful_ids) -> float:
    """Mean next-token probability of the harmful letters after each prompt (an evaluation metric)."""
    model.eval()
    ids = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    logits = model(**ids).logits[:, -1].float()
    model.train()
    return torch.softmax(logits, -1)[:, harmful_ids].sum(-1).mean().item()


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    """Train; returns ``{"history": [logged metrics per step], "p_harmful": (before, after)}``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--hidden-size", type=int, default=32)
    p.add_argument("--generations", type=int, default=4, help="completions per prompt (the GRPO group)")
    p.add_argument("--completion-length", type=int, default=8)
    p.add_argument("--loss-type", default="dapo", choices=["grpo", "bnpo", "dr_grpo", "dapo"])
    p.add_argument("--mask", default="schmitt", choices=["schmitt", "threshold"])
    p.add_argument("--delta", type=float, default=0.05, help="Schmitt band half-width")
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient (TRL loads the reference model)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=["torch", "triton"], default=None)
    p.add_argument("--output-dir", default=None, help="default: a temporary folder")
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datasets import Dataset
    from trl import GRPOConfig

    from fastsafe.integrations.trl import MaskedGRPOTrainer

    tokenizer = char_tokenizer()
    token_rewards, harmful_ids = make_token_rewards(tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.output_dir or tmp
        model = build_model(os.path.join(tmp, "model"), len(tokenizer), args.hidden_size, args.seed)
        p_before = harmful_probability(model, tokenizer, harmful_ids)
        config = GRPOConfig(output_dir=out, per_device_train_batch_size=2 * args.generations,
                            num_generations=args.generations, max_completion_length=args.completion_length,
                            max_steps=args.steps, learning_rate=args.lr, loss_type=args.loss_type, beta=args.beta,
                            logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False,
                            gradient_checkpointing=False, disable_tqdm=True, seed=args.seed)
        trainer = MaskedGRPOTrainer(model=model, reward_funcs=[harmful_letters], args=config,
                                    train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer,
                                    token_reward_fn=token_rewards, mask=args.mask,
                                    mask_delta=args.delta if args.mask == "schmitt" else 0.0, backend=args.backend)
        trainer.train()
        p_after = harmful_probability(trainer.model, tokenizer, harmful_ids)
    history = [h for h in trainer.state.log_history if "loss" in h]
    for h in history:
        print(f"step {h['step']:3d}  loss {h['loss']:+.4f}  reward {h['reward']:+.3f}  "
              f"mask +{h['mask/positive_fraction']:.2f} -{h['mask/negative_fraction']:.2f}", flush=True)
    print(f"p(harmful next letter): {p_before:.4f} -> {p_after:.4f}", flush=True)
    return {"history": history, "p_harmful": (p_before, p_after)}


if __name__ == "__main__":
    main(sys.argv[1:])
