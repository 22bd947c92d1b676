"""``fastsafe generate``: safe generation from the command line.

Examples::

    fastsafe generate --prompt "How do I make a bomb?" --ban bomb --ban explosives
    fastsafe generate --prompt "Hi" --model path/to/hf_model --entities risk.db --tsdi bias.safetensors
    fastsafe generate --prompt "Insult me" --reward-model profanity --reward-weight 2 --json

Without ``--model`` it runs on the embedded default model (SmolLM2-135M-Instruct, offline).
Text prompts go through the model's chat template when it has one (``--raw`` to skip it).
"""
from __future__ import annotations

import json
import sys


def add_parser(sub):
    p = sub.add_parser("generate", help="generate text with risk filtering, TSDI and a safety reward",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--model", default=None, help="local Hugging Face model folder or .gguf file "
                                                 "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--entities", default=None, metavar="DB", help="risk-entity database (see `fastsafe entities`)")
    p.add_argument("--ban", action="append", default=[], metavar="PHRASE", help="banned phrase (repeatable)")
    p.add_argument("--regex", action="append", default=[], metavar="PATTERN", help="banned regular expression")
    p.add_argument("--tsdi", default=None, metavar="BIAS", help="TSDI bias file (from `fastsafe estimate-bias`)")
    p.add_argument("--tsdi-scale", type=float, default=1.0)
    p.add_argument("--tsdi-beyond", choices=("last", "none"), default="last",
                   help="bias for positions past the table's length (default: last row)")
    p.add_argument("--reward-model", default=None, metavar="PATH|profanity",
                   help="'profanity' (alt-profanity-check) or a local sequence classifier / causal LM folder")
    p.add_argument("--reward-weight", type=float, default=None, help="w in log p + w * r (default 1 with a reward model)")
    p.add_argument("--safe-label", default=None, help="the classifier's safe label (index or name; default 0)")
    p.add_argument("--top-k", type=int, default=10, help="candidates per step (default 10)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, metavar="STRING", help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--compile", action="store_true",
                   help="compiled decoding loop: static KV cache, the whole step compiled once (the first run "
                        "pays the compile; regex entities and reward models are refused)")
    p.add_argument("--json", action="store_true", help="print texts and events as JSON")
    p.set_defaults(func=run)


def build_config(args, tokenizer=None):
    """The :class:`fastsafe.SafetyConfig` of the parsed arguments."""
    from fastsafe.config import SafetyConfig
    from fastsafe.tsdi import TSDIBias
    reward, weight = None, 0.0
    if args.reward_model:
        from fastsafe.reward import load_reward
        safe_label = args.safe_label
        if safe_label is not None and safe_label.isdigit():
            safe_label = int(safe_label)
        reward = load_reward(args.reward_model, safe_label=safe_label)
        weight = 1.0 if args.reward_weight is None else args.reward_weight
    elif args.reward_weight:
        raise ValueError("--reward-weight needs --reward-model")
    store = None
    if args.entities:
        from fastsafe.safety.store import RiskEntityStore
        store = RiskEntityStore(args.entities, create=False)
    tsdi = TSDIBias.load(args.tsdi) if args.tsdi else None
    return SafetyConfig(banned_phrases=list(args.ban), regexes=list(args.regex), store=store, tsdi=tsdi,
                        tsdi_scale=args.tsdi_scale, tsdi_beyond=args.tsdi_beyond, reward_model=reward,
                        reward_weight=weight, top_k=args.top_k)


def run(args) -> int:
    import fastsafe
    from fastsafe.models import load_model
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: expected >= 1, got {args.max_new_tokens}")
    model, tok = load_model(args.model)
    cfg = build_config(args, tok)
    chat = not args.raw and getattr(tok, "chat_template", None) is not None
    res = fastsafe.generate(model, tok, args.prompt, cfg, max_new_tokens=args.max_new_tokens,
                            do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, stop_strings=args.stop, chat=chat, compile=args.compile)
    if args.json:
        json.dump({"prompts": args.prompt, "texts": res.texts, "finish_reasons": res.finish_reasons,
                   "events": [e.to_dict() for e in res.events]}, sys.stdout, indent=2, ensure_ascii=False)
        print()
        return 0
    for i, (prompt, text) in enumerate(zip(args.prompt, res.texts)):
        if len(args.prompt) > 1:
            print(f"[{i}] {prompt}")
        print(text)
        evs = res.events_for(i)
        if evs:
            print(f"  ({len(evs)} intervention{'s' if len(evs) != 1 else ''})", file=sys.stderr)
            for e in evs:
                print("  " + format_event(e), file=sys.stderr)
    return 0


def format_event(e) -> str:
    """One line per intervention for people reading a terminal."""
    what = {"token_ban": "banned token", "text_match": "blocked candidate", "regex": "regex blocked",
            "reward": "reward demoted", "all_banned_fallback": "all candidates banned, emitted"}.get(e.rule, e.rule)
    line = f"step {e.step:>3}: {what} {e.token_text!r}"
    if e.entity:
        line += f" (entity {e.entity!r}"
        if e.category:
            line += f", {e.category}"
        if e.severity is not None:
            line += f", severity {e.severity}"
        line += ")"
    return line
