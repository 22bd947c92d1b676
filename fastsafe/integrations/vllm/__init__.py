"""fastsafe inside vLLM: the risk filter, the text check and TSDI as vLLM logits processors.

README section (draft)
======================

Serving with vLLM
-----------------

```bash
export FASTSAFE_VLLM_POLICIES=/etc/fastsafe/policies.toml
vllm serve MODEL --logits-processors fastsafe.integrations.vllm:SafetyLogitsProcessor
# Model Runner V2 (VLLM_USE_V2_MODEL_RUNNER=1): fastsafe.integrations.vllm:SafetyLogitsProcessorV2
```

```python
from vllm import LLM, SamplingParams
from fastsafe.integrations.vllm import SafetyLogitsProcessor
llm = LLM(MODEL, logits_processors=[SafetyLogitsProcessor])
llm.generate(prompts, SamplingParams(extra_args={"fastsafe": {"policy": "strict", "banned_phrases": ["acme secret"]}}))
```

**Server-wide policies** (``FASTSAFE_VLLM_POLICIES`` names a TOML file; without it nothing is
filtered and fastsafe request arguments are refused)::

    [policy.default]                 # every request that names no policy
    store = "risk.db"                # RiskEntityStore, followed live (fastsafe entities add -> banned in the next steps)
    phrases = ["make a bomb"]        # strings (every tokenisation variant + text check) or token-id lists
    regexes = ['\\bkill\\s+him\\b']  # text level, host path (one device->host read per step for that policy)
    tsdi = "bias.safetensors"        # the bias row of each response position is subtracted ...
    tsdi_scale = 1.0                 # ... times this
    top_k = 10                       # candidates of each row the text-level check looks at
    allow_opt_out = false            # may a request send policy = "none"?

Relative paths are relative to the file. Unknown keys or bad values fail at start with the file,
policy and key named. Each policy's automaton is built once per worker at start.

**Per request**: ``SamplingParams(extra_args={"fastsafe": {...}})``; over HTTP ``vllm_xargs`` (flat:
``{"fastsafe_policy": "strict", "fastsafe_tsdi_scale": 0.5, "fastsafe_banned_phrases": [...]}``,
because ``vllm_xargs`` takes no nested objects). Keys: ``policy`` (a name, or ``"none"`` where
``default`` has ``allow_opt_out = true``), ``tsdi_scale``, ``banned_phrases`` (up to 10,000
request-only phrases, on top of the policy). Bad arguments are refused at admission
(``validate_params``: HTTP 400 with the reason), never inside a step.

**What a step does** (per row, for the row's policy; rows of several policies in one batch are
grouped on the host when the batch changes): subtract the TSDI row of the response position;
set every token the automaton bans to ``-inf`` (token level: every banned token sequence, the rule
of ``NoBadWordsLogitsProcessor``); check the row's ``top_k`` candidates (one fused
:func:`fastsafe.ops.safe_topk` pass) at text level (normalised characters, any tokenisation) and
set failing ones to ``-inf``; a row left with nothing gets EOS (counted as
``all_banned_fallback``), never token 0. Every edit is in place; on the CPU the bans and the
fallback touch only the banned entries (:mod:`.inplace`; the audit's "best token banned" comes
from a row maximum, not an argmax), so at 32 rows, V = 49,152 and 128 words a step costs ~2.5 ms
on one shared core (~20 ms before; vLLM's own ``bad_words`` ~2 ms there). Automaton states live on the device, one per
request, advanced from the ids vLLM feeds back; ``apply`` reads nothing back to the host (regex
entities excepted). Under sampling, tokens outside ``top_k`` get the token-level bans but not
the text check (as with ``SafeLogitsProcessor``). Reward re-scoring (Algorithm 1) is not run in the
server: it needs a reward-model forward per step and candidate, which is what a server cannot afford.

**Rows** (both runners): continuous batching, rows moved / swapped (V1), reordered (V2), requests
preempted and recomputed (re-added: the state is re-derived from their ids), ``n > 1`` (each child
request has its own state), async scheduling (V1's ``-1`` placeholders are fed once vLLM fills
them in; V2 reads committed ids on the device). A new or re-added request's state is derived from
its last 64 ids (``HISTORY_WINDOW``; 64 masked automaton steps for all requests added in that step
together, between steps). Speculative decoding: V1 refuses custom logits processors with it
(vLLM's own check); under V2 each draft row is filtered with the state after the committed ids and
the drafts before it (computed on the device each step), the committed state follows only the ids
vLLM accepts, and ``rejection_sample_method="synthetic"`` is refused at start (see :mod:`.v2`).

**Request-only phrases**: their matcher is kept by content (the 64 most recent phrase sets; a
repeated set costs nothing; two requests with the same set share one matcher). A *new* set is
built in a background thread of the worker, never on the step thread, and the step never waits
for it. Until it is ready the row is under the **interim rule** (:mod:`.interim`), fail closed and
built without the tokenizer: **start bans** — every token that can begin a phrase under any
tokenisation (its lowercased text, from a word start inside it, is a prefix of the phrase, or the
whole phrase then a non-word byte), found by a vectorised walk of the phrases through a byte trie
of the vocabulary made once per worker — and **continuation bans** for the phrases the row's last
64 tokens already began (a prompt ending in ``"the quick"`` cannot go on with ``" brown"``). So no
phrase can appear at a word start in the row's lowercased text; the price is that the tokens that
can begin a phrase (``" quick"``, ``"qu"``, ``"q"`` for ``"quick brown"``) are unavailable to the row
for the build's duration. What the interim rule does not have is the full matcher's normalisation
(NFKC, confusables, leetspeak, separators between letters): a phrase spelled that way is caught
only once the full matcher is in force. Between two steps (V1 ``update_state``, V2
``apply_staged_writes``) a finished build replaces the interim rule and the row's state is derived
from its last 64 ids. A build that fails keeps the interim rule for that request (logged).
``FASTSAFE_VLLM_REQUEST_BUILD=step`` restores the old in-step build (the step waits).

On the step thread a new set costs (SmolLM2 tokenizer, one shared CPU core, load average ~6):
~1 ms at 1,000 phrases and ~9 ms at 10,000 for the start bans (no tokenizer call, no matcher
built: the tests count both), well under 1 ms per row for its continuation bans; the worker does
not normalise the phrases again (admission did). Before, the interim rule tokenised every variant
and built a token automaton on the step thread: ~0.09 s at 1,000 phrases, ~0.8 s at 10,000, plus
~0.1 s of normalisation at 10,000. The vocabulary tables cost ~1 s once, when the processor starts.
The background build (full matcher: the first in a process ~1.4 s CPU, then 0.08-0.13 s for a set
in the canonical alphabet, ~0.5 s for one with other characters) is Python and numpy, so it holds
the GIL part of the time and slows the step thread's own Python work while it runs (it never
blocks it). Put phrase sets that many requests share in a policy (built once, at start).

**Store hot swap**: a policy with a ``store`` polls its version (every 0.5 s,
``FASTSAFE_VLLM_POLL_INTERVAL``) and builds the new matcher in a background thread; the swap happens
between two steps, and every row of that policy is re-derived from its ids then. With tensor
parallelism every worker swaps on its own, possibly one step apart.

**Audit**: every intervention is logged at INFO through vLLM's logger (``vllm.fastsafe``)::

    fastsafe: policy=default rule=token_ban request=0 row=0 step=23 token=' Paris' entity='Paris'

(``request`` numbers requests in the order the worker admitted them; ``rule`` is ``token_ban``,
``text_match``, ``regex`` or ``all_banned_fallback``; ``FASTSAFE_VLLM_LOG_EVENTS=0`` keeps only the
summaries) and counted per policy and rule; a summary line every 60 s when something changed
(``FASTSAFE_VLLM_LOG_INTERVAL``). ``fastsafe.integrations.vllm.metrics()`` returns the counts of the
calling process: the worker's. vLLM's API server and the ``LLM`` object run in another process than
the engine, where ``metrics()`` is empty, so operators read the log lines; no Prometheus counter
(vLLM's registry lives in the API server process). The step's records are copied to the host
without waiting (pinned memory and a CUDA event) and counted between steps.
"""
from __future__ import annotations

import importlib

from .audit import metrics
from .policies import DEFAULT_POLICY, ENV_VAR, OPT_OUT, Policy, PolicyError, load_policies, policies_from_env
from .request_args import MAX_REQUEST_PHRASES, RequestArgs, request_args

__all__ = ["SafetyLogitsProcessor", "SafetyLogitsProcessorV2", "Policy", "PolicyError", "load_policies",
           "policies_from_env", "RequestArgs", "request_args", "metrics", "ENV_VAR", "DEFAULT_POLICY", "OPT_OUT",
           "MAX_REQUEST_PHRASES"]

_LAZY = {"SafetyLogitsProcessor": ".v1", "SafetyLogitsProcessorV2": ".v2"}


def __getattr__(name):
    """The processor classes subclass vLLM's base classes, so they are built (vLLM imported) on first access."""
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(mod, __name__), name)
    except ImportError as exc:
        raise ImportError(f"fastsafe.integrations.vllm.{name} needs vLLM (pip install vllm): {exc}") from exc
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
