"""Run a plan of offline ``LLM.generate`` jobs in one vLLM engine and write the outputs as JSON.

Started by the engine tests as a subprocess (``python -m tests.vllm_engine.offline_run PLAN OUT``), so
a test process never holds an engine and each engine loads once per plan. The plan (JSON)::

    {"engine": {LLM keyword arguments; "model" defaults to fastsafe's cached SmolLM2},
     "jobs": [{"name": "greedy", "requests": [{"prompt": "chat message" | "prompt_token_ids": [...],
                                               "params": {SamplingParams keyword arguments}}]}]}

Each job is one ``LLM.generate`` call (its requests share the engine's batch: continuous batching).
A chat message is rendered with the model's chat template and sent as token ids. The output::

    {"load_s": float, "jobs": {name: {"gen_s": float, "requests": [
        {"prompt_token_ids": [...], "outputs": [{"token_ids": [...], "text": str, "finish_reason": str}]}]}}}
"""
from __future__ import annotations

import json
import os
import sys
import time


def render(tokenizer, request: dict) -> list[int]:
    """Token ids of a plan request (its ``prompt_token_ids``, or its chat ``prompt`` rendered)."""
    if "prompt_token_ids" in request:
        return list(request["prompt_token_ids"])
    return list(tokenizer.apply_chat_template([{"role": "user", "content": request["prompt"]}],
                                              add_generation_prompt=True, tokenize=True, return_dict=False))


def run(plan: dict) -> dict:
    from vllm import LLM, SamplingParams
    from fastsafe.models import default_cache_path

    engine = dict(plan.get("engine", {}))
    engine.setdefault("model", default_cache_path())
    start = time.perf_counter()
    llm = LLM(**engine)
    result = {"load_s": time.perf_counter() - start, "jobs": {}}
    tokenizer = llm.get_tokenizer()
    marks = os.environ.get("FASTSAFE_TEST_READD_LOG")       # see tests/vllm_engine/ban_processor.py
    for job in plan["jobs"]:
        if marks:
            with open(marks, "a") as f:
                f.write(f"job {job['name']}\n")
        prompts = [{"prompt_token_ids": render(tokenizer, r)} for r in job["requests"]]
        params = [SamplingParams(**r.get("params", {})) for r in job["requests"]]
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        gen_s = time.perf_counter() - start
        result["jobs"][job["name"]] = {"gen_s": gen_s, "requests": [
            {"prompt_token_ids": list(o.prompt_token_ids),
             "outputs": [{"token_ids": list(c.token_ids), "text": c.text, "finish_reason": c.finish_reason}
                         for c in o.outputs]}
            for o in outs]}
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m tests.vllm_engine.offline_run PLAN.json OUT.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        plan = json.load(f)
    result = run(plan)
    with open(argv[1], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
