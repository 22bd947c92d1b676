"""How long a store change takes to come in force on the device path (SafetyConfig(matcher="device", store=...)).

Run ``python -m benchmarks.device_follow [--entities 1000 10000 100000] [--batch 8] [--step-ms 20]``.

A decoding loop is simulated on the CPU: ``B`` rows with 64-token histories, one ``RowStates.poll`` +
``advance`` per step and ``--step-ms`` of other work (the model's forward). An entity is committed
to the store (``n`` two-word filler entities, the store of ``tests/test_fail_closed.py``) before step
5; reported: seconds and steps from the commit to the swap (background build of the whole matcher +
re-derivation of the rows' states), the longest step while that ran (no step waits for the build),
and, for reference, the same change with ``background=False`` (the step that sees it builds and
waits: the host path's freshness rule, at the cost of one long step). Writes
``benchmarks/results/device-follow-cpu.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

import torch


def filler_store(path, n: int):
    """A new :class:`~fastsafe.safety.RiskEntityStore` at ``path`` holding ``n`` distinct two-word
    filler phrases over 600 made-up words (the word units tokenise once each); also the store of
    ``tests/test_fail_closed.py``'s freshness tests.

    Example:
        >>> len(filler_store(tmp / "f.db", 1000))      # doctest: +SKIP
        1000
    """
    from fastsafe.safety import RiskEntityStore
    rng = random.Random(0)
    syll = ["ka", "lo", "mi", "zu", "re", "ta", "po", "ne", "shi", "vo", "gra", "bel"]
    vocab: set = set()
    while len(vocab) < 600:
        vocab.add("".join(rng.choice(syll) for _ in range(rng.randint(2, 4))))
    vocab = sorted(vocab)
    phrases: set = set()
    while len(phrases) < n:
        phrases.add(f"{rng.choice(vocab)} {rng.choice(vocab)}")
    store = RiskEntityStore(path)
    store.add_many(sorted(phrases), category="filler")
    return store


def _run(store, tok, B, step_ms, background):
    from fastsafe.safety.device_follow import LiveDeviceMatcher, RowStates
    t0 = time.perf_counter()
    live = LiveDeviceMatcher(store, tok, vocab_size=len(tok), background=background)
    first_build = time.perf_counter() - t0
    rows = RowStates(live, background=background)
    rng = random.Random(1)
    dm, state = rows.start([[rng.randrange(len(tok)) for _ in range(64)] for _ in range(B)])
    committed = swap_at = None
    longest = 0.0
    step = 0
    with torch.no_grad():
        while swap_at is None and step < 100000:
            if step == 5:
                store.add("kill")
                committed = time.perf_counter()
            s0 = time.perf_counter()
            new, state = rows.poll(dm, state)
            if new is not dm:
                swap_at = (time.perf_counter() - committed, step - 5)
                dm = new
            state = rows.advance(dm, state, torch.tensor([rng.randrange(len(tok)) for _ in range(B)]))
            if committed is not None:
                longest = max(longest, time.perf_counter() - s0)
            time.sleep(step_ms / 1000)
            step += 1
    return {"first_build_s": round(first_build, 2), "commit_to_in_force_s": round(swap_at[0], 3),
            "steps_until_in_force": swap_at[1], "longest_safety_call_s": round(longest, 3),
            "build_s": round(live.last_build_s or 0.0, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entities", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--step-ms", type=float, default=20.0)
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args(argv)
    from fastsafe.safety.benchmark import load_smollm2_tokenizer
    tok = load_smollm2_tokenizer()
    res = {"benchmark": "device_follow", "tokenizer": "SmolLM2-135M (GGUF)", "batch": args.batch,
           "step_ms": args.step_ms, "threads": torch.get_num_threads(), "runs": []}
    for n in args.entities:
        for background in (True, False):
            with tempfile.TemporaryDirectory() as d:
                store = filler_store(os.path.join(d, "r.db"), n)
                r = {"entities": n, "background": background, **_run(store, tok, args.batch, args.step_ms, background)}
            print(json.dumps(r), file=sys.stderr)
            res["runs"].append(r)
    out = json.dumps(res, indent=2)
    print(out)
    path = args.output or os.path.join(os.path.dirname(__file__), "results", "device-follow-cpu.json")
    with open(path, "w") as f:
        f.write(out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
