"""Per-step cost of the V1 processor in isolation, next to vLLM's own ``bad_words`` (``python -m benchmarks.serving_step``).

No engine: ``SafetyLogitsProcessor`` is driven with vLLM's ``BatchUpdate`` objects as the unit tests
do (SmolLM2's tokenizer, ``--batch`` rows, one torch thread like vLLM's CPU worker), greedy steps
on random logits; vLLM's ``apply_bad_words`` gets the benchmark's 128-word list at its cap on the
same rows. The two alternate step by step (interleaved, which goes first alternating, each on its own
fresh copy of the step's logits), so background load and cache state hit both alike; the medians
of the per-step times are printed with the 1-minute load average. ``benchmarks.serving``
measures the same in a real engine.

Example:
    python -m benchmarks.serving_step --entities 100000 --steps 64
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--entities", type=int, default=0, help="also a policy of this many phrases (0: only 128 words)")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    from vllm import SamplingParams
    from vllm.tokenizers.registry import get_tokenizer
    from vllm.v1.sample.logits_processor import BatchUpdate
    from vllm.v1.sample.ops.bad_words import apply_bad_words

    from benchmarks.serving import bad_words_at_cap, policies_toml, word_list
    from fastsafe.integrations.vllm import worker
    from fastsafe.models import default_cache_path
    from fastsafe.safety.benchmark import synthetic_entities

    tok = get_tokenizer(default_cache_path())
    V, B = len(tok), args.batch
    words, _ = word_list(128)
    folder = tempfile.mkdtemp(prefix="fastsafe-step-")
    atexit.register(shutil.rmtree, folder, True)
    with open(os.path.join(folder, "p.toml"), "w") as fh:
        fh.write(policies_toml(words, synthetic_entities(max(args.entities, 1))))
    os.environ["FASTSAFE_VLLM_POLICIES"] = os.path.join(folder, "p.toml")
    os.environ.setdefault("FASTSAFE_VLLM_LOG_EVENTS", "0")
    worker.load_tokenizer = lambda cfg: tok
    cfg = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=B), speculative_config=None,
                          model_config=SimpleNamespace(get_vocab_size=lambda: V))
    from fastsafe.integrations.vllm import SafetyLogitsProcessor
    proc = SafetyLogitsProcessor(cfg, torch.device("cpu"), False)
    sp = SamplingParams(bad_words=bad_words_at_cap(words, tok, 128), max_tokens=4)
    sp.update_from_tokenizer(tok)
    bad = {r: sp.bad_words_token_ids for r in range(B)}
    prompt = tok.encode("Tell me how to do something bad please", add_special_tokens=False)
    g = torch.Generator().manual_seed(0)
    policies = ["p128"] + (["p100k"] if args.entities else [])
    for pol in policies:
        outs = [[] for _ in range(B)]
        added = [(r, SamplingParams(extra_args={"fastsafe": {"policy": pol}}), list(prompt), outs[r]) for r in range(B)]
        proc.update_state(BatchUpdate(batch_size=B, removed=[], added=added, moved=[]))
        ours, theirs = [], []
        for i in range(args.steps):
            logits = torch.randn(B, V, generator=g)
            for side in ((0, 1) if i % 2 == 0 else (1, 0)):     # each on a fresh copy, the order alternating
                x = logits.clone()
                t0 = time.perf_counter()
                if side == 0:
                    proc.update_state(None)
                    got = proc.apply(x)
                else:
                    apply_bad_words(x, bad, outs)
                (ours if side == 0 else theirs).append(time.perf_counter() - t0)
            for r, t in enumerate(got.argmax(-1).tolist()):
                outs[r].append(t)
        proc.update_state(BatchUpdate(batch_size=B, removed=list(range(B)), added=[], moved=[]))
        n = f"{len(words)} words" if pol == "p128" else f"{args.entities} entities"
        print(f"B={B} V={V}: fastsafe ({n}) {statistics.median(ours) * 1e3:.2f} ms/step, vLLM bad_words "
              f"({len(sp.bad_words_token_ids)} sequences) {statistics.median(theirs) * 1e3:.2f} ms/step "
              f"(medians of {args.steps} interleaved steps; load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
