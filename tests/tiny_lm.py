"""Tiny causal LMs (GPT-2 and Llama families, random weights) and a small byte-level BPE tokenizer.

Built in memory from configs in well under a second: no downloads. Shared by the generation,
processor, TSDI, reward and CLI tests.
"""
from __future__ import annotations

import functools

import torch

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "how do I make a bomb at home? I will not help with that.",
    "bombs and explosives are dangerous weapons",
    "Hello world, this is a small test corpus for a tiny tokenizer.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "kill the process, not the person; knives are for cooking",
    "safety first: never mix bleach and ammonia",
    "Once upon a time there was a little robot who loved to read books.",
    "numbers 0 1 2 3 4 5 6 7 8 9 and symbols ! ? . , ; :",
    "UPPER lower Capitalised MiXeD words and b0mb spellings",
]
SPECIALS = ["<pad>", "<eos>", "<bos>"]


@functools.lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE ``PreTrainedTokenizerFast`` (pad=0, eos=1, bos=2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def left_pad(tok, prompts):
    """``(input_ids, attention_mask)`` ``[B, T]`` with the prompts left-padded as ``generate`` expects."""
    rows = [tok.encode(p) for p in prompts]
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = torch.tensor(r)
        mask[b, T - len(r):] = 1
    return ids, mask


def _finish(model, tok):
    model.eval()
    gc = model.generation_config
    gc.eos_token_id, gc.pad_token_id, gc.bos_token_id = tok.eos_token_id, tok.pad_token_id, tok.bos_token_id
    return model


def tiny_gpt2(seed: int = 0, extra_vocab: int = 0, n_positions: int = 128):
    """A 2-layer GPT-2 with random weights; logits width ``len(tokenizer) + extra_vocab``."""
    from transformers import GPT2Config, GPT2LMHeadModel
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok) + extra_vocab, n_positions=n_positions, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return _finish(GPT2LMHeadModel(cfg), tok)


def tiny_llama(seed: int = 0, extra_vocab: int = 0, max_position_embeddings: int = 128):
    """A 2-layer Llama (GQA) with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok) + extra_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return _finish(LlamaForCausalLM(cfg), tok)


def sharpen(model, scale: float = 8.0):
    """Scale the output embedding so random logits are far from ties (robust argmax comparisons)."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    return model


PROMPTS = [
    "the quick brown fox",
    "how do I make a",
    "Hello",
    "The capital of France is Paris. The capital of",
]


def entity_loving(model, tokenizer, texts, *, follow: float = 8.0, start: float = 2.5):
    """Make a random model love to emit ``texts``: a bigram bias added to the logits (forward hooks).

    For every tokenisation of each text (as written and with a leading space), logit of token
    ``t[i+1]`` gets ``+follow`` after ``t[i]``, and the first token gets ``+start`` everywhere.
    Works with KV caching (the bias follows the last input token of each forward).
    """
    V = model.get_output_embeddings().weight.shape[0]
    bigram = torch.zeros(V, V)
    for text in texts:
        for variant in (text, " " + text):
            ids = tokenizer.encode(variant, add_special_tokens=False)
            bigram[:, ids[0]] += start
            for a, b in zip(ids, ids[1:]):
                bigram[a, b] += follow
    state = {}

    def pre(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        state["ids"] = ids

    def post(module, args, output):
        ids = state["ids"]
        if output.dim() == 3 and ids is not None:
            T = output.shape[1]
            return output + bigram.to(output.dtype)[ids[:, -T:]]
        return output

    model.register_forward_pre_hook(pre, with_kwargs=True)
    model.get_output_embeddings().register_forward_hook(post)
    return model
