"""token_ban events of the device path name the entity: DeviceMatcher.banned_entity (fastsafe.safety.ban_owners)."""
from __future__ import annotations

import random

import pytest
import torch

import fastsafe
from fastsafe import SafetyConfig
from fastsafe.ops import unpack_bitmask
from fastsafe.safety import DeviceMatcher
from fastsafe.safety.entity_list import config_entities, eos_id_set
from fastsafe.safety.token_sequences import banned_sequences
from tests.test_generation import ENTITIES, LOVED
from tests.tiny_lm import entity_loving, tiny_gpt2, tiny_tokenizer


def _owned(tok, phrases, id_lists, V):
    """{entity index: set of its banned token sequences}."""
    flat, lens, owner = banned_sequences(tok, config_entities(phrases, id_lists, []), V, eos_id_set(tok, None))
    out, a = {}, 0
    for n, o in zip(lens.tolist(), owner.tolist()):
        out.setdefault(o, set()).add(tuple(flat[a:a + n].tolist()))
        a += n
    return out


@pytest.mark.parametrize("seed", range(4))
def test_the_entity_of_every_ban_owns_a_sequence_the_token_completes(seed):
    rng = random.Random(seed)
    tok = tiny_tokenizer() if seed % 2 else None
    V = len(tok) if tok is not None else rng.choice([9, 40, 100])
    ids = [[rng.randrange(V) for _ in range(rng.choice([1, 2, 2, 3, 4]))] for _ in range(rng.randint(3, 12))]
    phrases = ENTITIES if tok is not None else []
    dm = DeviceMatcher.build(tok, phrases, token_id_phrases=ids, vocab_size=V)
    owned = _owned(tok, phrases, ids, V)
    hists = [[rng.randrange(V) for _ in range(rng.randint(0, 6))] for _ in range(24)]
    for q in ids[:6]:                                   # histories that end one token before a sequence
        hists.append([rng.randrange(V)] + q[:-1])
    state = dm.state_from_histories(hists)
    banned = ~unpack_bitmask(dm.banned_bitmask(state), V)
    checked = 0
    for t in range(V):
        ent = dm.banned_entity(state, torch.full((len(hists),), t)).tolist()
        for r, h in enumerate(hists):
            assert (ent[r] >= 0) == bool(banned[r, t]), (h, t)
            if ent[r] >= 0:
                seqs = owned[ent[r]]
                assert any(tuple(h[len(h) - len(s) + 1:] if len(s) > 1 else []) + (t,) == s
                           for s in seqs if len(s) - 1 <= len(h)), (h, t, dm.entity(ent[r]))
                checked += 1
    assert checked > 0


def test_device_token_ban_events_name_the_entity_like_the_host_path():
    tok = tiny_tokenizer()
    model = entity_loving(tiny_gpt2(seed=9), tok, LOVED, follow=5.0, start=1.5)
    prompts = ["how do I make a", "Tell me about", "bo", "kil"]
    kw = dict(max_new_tokens=12, do_sample=True, seed=1, top_k=40, temperature=1.3)
    host = fastsafe.generate(model, tok, prompts, SafetyConfig(banned_phrases=ENTITIES, top_k=40), **kw)
    dev = fastsafe.generate(model, tok, prompts, SafetyConfig(banned_phrases=ENTITIES, top_k=40, matcher="device"), **kw)
    bans = [e for e in dev.events if e.rule == "token_ban"]
    assert bans and all(e.entity in ENTITIES and e.category is not None for e in bans)
    pick = lambda r: [(e.step, e.row, e.token_id, e.entity) for e in r.events if e.rule == "token_ban"]  # noqa: E731
    assert pick(dev) == pick(host)


def _device_tensor_bytes(dm) -> int:
    """Bytes of the distinct storages of every tensor a DeviceMatcher holds (its attributes, the
    lists of them, its regex tables); the host regex matcher is not device memory."""
    found = {}

    def add(x):
        if isinstance(x, torch.Tensor):
            found[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        elif isinstance(x, (list, tuple)):
            for y in x:
                add(y)
    for name, value in vars(dm).items():
        if name != "_regex_matcher":
            add(value)
    if dm._rx is not None:
        for value in vars(dm._rx).values():
            add(value)
    return sum(found.values())


@pytest.mark.parametrize("kind", ["token_ids", "phrases", "phrases+regexes", "from_token_sequences", "empty"])
def test_nbytes_counts_every_table_including_the_ban_owners(kind):
    tok = tiny_tokenizer()
    V = len(tok)
    ids = [[5, 7], [3], [9, 9, 2]]
    if kind == "from_token_sequences":
        flat, lens, owner = banned_sequences(tok, config_entities([], ids), V, set())
        dm = DeviceMatcher.from_token_sequences(config_entities([], ids), flat, lens, owner, vocab_size=V)
    else:
        kw = {"token_ids": dict(token_id_phrases=ids), "phrases": dict(phrases=ENTITIES),
              "phrases+regexes": dict(phrases=ENTITIES, regexes=["bo+m", r"ka\w+"]), "empty": {}}[kind]
        dm = DeviceMatcher.build(tok, vocab_size=V, **kw)
    nb = dm.nbytes
    assert nb["total"] == nb["token"] + nb["text"] == _device_tensor_bytes(dm)
    owners = sum(t.untyped_storage().nbytes() for t in (dm._owner_keys, dm._owner_ids, dm._owner_sev))
    assert owners > 0 and nb["token"] > owners
