"""fastsafe.integrations.trl.MaskedGRPOTrainer: a few CPU steps with a tiny random Llama.

Skipped when TRL is not installed. Offline: the tokenizer (tests/tiny_lm.py) is trained in memory
and the model comes from a config, saved to a temporary folder so that TRL can load the reference
model from the policy's ``name_or_path`` (``beta != 0``). Everything runs in fp32 (``bf16=False``;
TRL's configs default to bf16 autocast).
"""
import copy
import math
import os

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from fastsafe.integrations.trl import MaskedGRPOTrainer, _check_token_rewards  # noqa: E402
from fastsafe.training import masked_grpo_loss, schmitt_mask, threshold_mask  # noqa: E402
from tests.tiny_lm import tiny_llama, tiny_tokenizer  # noqa: E402

# TRL 1.16's GRPOTrainer calls transformers' renamed gradient-checkpointing methods (FutureWarning);
# tests/deprecations.py blames the nearest fastsafe frame, MaskedGRPOTrainer's super() call, so
# these third-party deprecations are let through here by message.
pytestmark = pytest.mark.filterwarnings("ignore:`[a-z_]*gradient_checkpointing[a-z_]*` is deprecated:FutureWarning")

PROMPTS = ["the quick brown fox", "how do I make a", "Hello world", "The capital of France is"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The model is tiny: on a busy 2-core machine a second intra-op thread makes each step ~8x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    model = tiny_llama(seed=0)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def load(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def dataset():
    return Dataset.from_dict({"prompt": PROMPTS, "topic": ["animals", "howto", "greeting", "geography"]})


def seq_reward(completions, **kw):
    return [float(c.count("e") - c.count("o")) + 0.1 * len(c) for c in completions]


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2, max_completion_length=6,
                max_steps=3, learning_rate=2e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                bf16=False, disable_tqdm=True, seed=1, gradient_checkpointing=False)
    base.update(kw)
    return GRPOConfig(**base)


def trainer(cls, model_dir, tmp_path, *, cfg=None, **kw):
    return cls(model=load(model_dir), reward_funcs=[seq_reward], args=config(tmp_path, **(cfg or {})),
               train_dataset=dataset(), processing_class=copy.deepcopy(tiny_tokenizer()), **kw)


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


EQUAL_CASES = [
    ("grpo", {}),
    ("bnpo", {}),
    ("dr_grpo", {}),
    ("dapo", {}),
    ("dapo", dict(gradient_accumulation_steps=2, num_iterations=2, max_steps=2)),
    ("grpo", dict(gradient_accumulation_steps=2, num_iterations=2, max_steps=2, beta=0.05, epsilon_high=0.28,
                  delta=1.5, use_bias_correction_kl=True)),
    ("dr_grpo", dict(gradient_accumulation_steps=2, max_steps=2, beta=0.05, gradient_checkpointing=True)),
]


@pytest.mark.parametrize("loss_type, cfg", EQUAL_CASES, ids=[f"{t}-{i}" for i, (t, _) in enumerate(EQUAL_CASES)])
def test_without_token_rewards_training_equals_grpo_trainer(model_dir, tmp_path, loss_type, cfg):
    initial = load(model_dir).state_dict()
    runs = {}
    for cls in (GRPOTrainer, MaskedGRPOTrainer):
        tr = trainer(cls, model_dir, tmp_path, cfg=dict(loss_type=loss_type, **cfg))
        tr.train()
        logs = [h for h in tr.state.log_history if "loss" in h]
        runs[cls] = (tr.model.state_dict(), logs, list(tr._logs["completion"]))
    (theirs, logs_t, comp_t), (ours, logs_o, comp_o) = runs[GRPOTrainer], runs[MaskedGRPOTrainer]
    assert comp_o == comp_t                                     # same seed, same completions
    assert max_diff(theirs, initial) > 1e-3                     # the weights did move
    assert max_diff(ours, theirs) < 1e-5                        # ... and the same way (AdamW, fp32)
    assert len(logs_o) == len(logs_t) == cfg.get("max_steps", 3)
    for lo, lt in zip(logs_o, logs_t):
        assert lo["loss"] == pytest.approx(lt["loss"], rel=1e-5, abs=1e-7)
        assert lo["grad_norm"] == pytest.approx(lt["grad_norm"], rel=1e-5)   # AdamW would hide a scale error
        assert lo["entropy"] == pytest.approx(lt["entropy"], rel=1e-5)
        for key in ("region_mean", "low_mean", "high_mean", "low_min", "high_max"):
            key = "clip_ratio/" + key
            assert lo[key] == pytest.approx(lt[key], abs=1e-6, nan_ok=True), key
        if cfg.get("beta"):
            assert lo["kl"] == pytest.approx(lt["kl"], rel=1e-4, abs=1e-7)


def test_all_neutral_token_rewards_zero_loss_weights_untouched(model_dir, tmp_path):
    """Every token gets the same reward: the batch-mean baseline makes every mask entry 0.

    AdamW's decoupled weight decay moves the weights even with a zero gradient, so this test sets
    ``weight_decay=0`` (also TrainingArguments' default). ``beta != 0`` adds the KL term, whose
    gradient is exactly 0 while the policy equals the reference.
    """
    calls = []

    def neutral(prompts, completions, completion_ids, **kw):
        calls.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **kw))
        return [[0.25] * len(ids) for ids in completion_ids]

    initial = load(model_dir).state_dict()
    tr = trainer(MaskedGRPOTrainer, model_dir, tmp_path, cfg=dict(loss_type="dapo", beta=0.05, weight_decay=0.0,
                                                                  max_steps=2),
                 token_reward_fn=neutral, mask_delta=0.1)
    tr.train()
    assert max_diff(tr.model.state_dict(), initial) == 0.0
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(h["loss"] == 0.0 for h in logs)
    assert all(h["mask/positive_fraction"] == 0 and h["mask/negative_fraction"] == 0 for h in logs)
    assert all(h["token_reward/mean"] == pytest.approx(0.25) for h in logs)
    # called like a TRL reward function: prompts, completions, completion_ids and the dataset columns
    call = calls[0]
    assert len(call["prompts"]) == len(call["completions"]) == len(call["completion_ids"]) == 4
    assert set(call["prompts"]) <= set(PROMPTS) and set(call["topic"]) <= {"animals", "howto", "greeting",
                                                                          "geography"}
    assert call["trainer_state"] is tr.state and callable(call["log_metric"])
    assert isinstance(call["completions"][0], str) and isinstance(call["completion_ids"][0][0], int)


def generated_batch(tr):
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    torch.manual_seed(0)
    raw = next(iter(tr.get_train_dataloader()))
    return tr._generate_and_score_completions(raw)


def token_reward_of_ids(completion_ids, **kw):
    return [[(t % 7) / 7.0 for t in ids] for ids in completion_ids]


@pytest.mark.parametrize("mask", ["schmitt", "threshold"])
def test_token_mask_from_token_rewards(model_dir, tmp_path, mask):
    delta = 0.1 if mask == "schmitt" else 0.0
    tr = trainer(MaskedGRPOTrainer, model_dir, tmp_path, token_reward_fn=token_reward_of_ids, mask=mask,
                 mask_delta=delta)
    out = generated_batch(tr)
    comp = out["completion_mask"]
    rewards = torch.where(comp.bool(), (out["completion_ids"] % 7) / 7.0, 0.0)
    if mask == "schmitt":  # negated in completions worse than their group (MaskedDPOTrainer's rejected)
        want = schmitt_mask(rewards, delta, attention_mask=comp) * torch.where(out["advantages"] < 0, -1, 1)[:, None]
    else:
        want = threshold_mask(rewards, out["advantages"] >= 0, attention_mask=comp)
    assert torch.equal(out["token_mask"], want.float())
    assert (want != 0).any() and (want == 0).any()


@pytest.mark.parametrize("baseline, sign", [(1.5, -1.0), (-1.0, 1.0)])
def test_tokens_move_with_their_reward_whatever_the_advantage(model_dir, tmp_path, baseline, sign):
    """Rewards 0 against a baseline above (below) them: every token is below (above) the band.

    Then every token is pushed down (up) by ``|advantage|``, in completions better and worse than
    their group alike: on-policy, that is TRL's loss with advantages ``sign * |A|``.
    """
    ours = trainer(MaskedGRPOTrainer, model_dir, tmp_path, cfg=dict(loss_type="bnpo"), mask_delta=0.5,
                   mask_baseline=baseline, token_reward_fn=lambda completion_ids, **kw: [[0.0] * len(i)
                                                                                         for i in completion_ids])
    theirs = trainer(GRPOTrainer, model_dir, tmp_path, cfg=dict(loss_type="bnpo"))
    theirs.model.train()
    theirs.current_gradient_accumulation_steps = 1
    batch = generated_batch(ours)
    adv, on = batch["advantages"], batch["completion_mask"].bool()
    assert (adv > 0).any() and (adv < 0).any() and "old_per_token_logps" not in batch
    flip = torch.where(adv < 0, -1.0, 1.0)[:, None].expand_as(on)
    assert torch.all(batch["token_mask"][on] == (sign * flip)[on]) and torch.all(batch["token_mask"][~on] == 0)
    trl_batch = {**{k: v for k, v in batch.items() if k != "token_mask"}, "advantages": sign * adv.abs()}
    loss_o = ours.compute_loss(ours.model, batch)
    loss_t = theirs.compute_loss(theirs.model, trl_batch)
    g_o = torch.autograd.grad(loss_o, ours.model.lm_head.weight)[0]
    g_t = torch.autograd.grad(loss_t, theirs.model.lm_head.weight)[0]
    assert g_t.abs().max() > 1e-4
    torch.testing.assert_close(g_o, g_t, atol=1e-5 * g_t.abs().max().item(), rtol=0)
    assert loss_o.item() == pytest.approx(loss_t.item(), rel=1e-5, abs=1e-7)


def test_loss_never_builds_logits_and_matches_the_loss_function(model_dir, tmp_path):
    tr = trainer(MaskedGRPOTrainer, model_dir, tmp_path, token_reward_fn=token_reward_of_ids, mask_delta=0.05)
    batch = generated_batch(tr)
    g = torch.Generator().manual_seed(0)
    batch["old_per_token_logps"] = -torch.rand(batch["completion_mask"].shape, generator=g)

    def no_logits(*args, **kwargs):
        raise AssertionError("the lm_head's own forward ran: [B, T, V] logits were built")

    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    am = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    C = batch["completion_ids"].shape[1]
    hooked = []   # what an engine's hooks see: the fused head runs *as* the lm_head's and the model's forward
    handles = [m.register_forward_hook(lambda mod, a, out, name=name: hooked.append(name))
               for name, m in (("model", tr.model), ("lm_head", tr.model.lm_head))]
    tr.model.lm_head.forward = no_logits
    try:
        loss = tr.compute_loss(tr.model, batch)
        loss.backward()
        with torch.no_grad():   # the hook TRL calls for the old policy and the reference
            old, none, _ = tr._get_per_token_logps_and_entropies(tr.model, ids, am, C, batch_size=3)
    finally:
        del tr.model.lm_head.forward
        for h in handles:
            h.remove()
    assert hooked == ["lm_head", "model"] * 3     # one call for the loss, two batches of 3 for the old log-probs
    # the same loss from full float64 logits and the plain loss function
    m = tr.model
    with torch.no_grad():
        logits = m(input_ids=ids, attention_mask=am).logits[:, -C - 1:-1].double()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, -C:, None])[..., 0]
    assert none is None
    torch.testing.assert_close(old.double(), lp * batch["completion_mask"], atol=1e-5, rtol=0)
    want, _ = masked_grpo_loss(lp, batch["old_per_token_logps"].double(), batch["advantages"].double(),
                               batch["completion_mask"], batch["token_mask"], loss_type="dapo",
                               num_items=batch["num_items_in_batch"])
    assert abs(want.item()) > 1e-4
    assert loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)


def test_bad_token_rewards_are_clear_errors(model_dir, tmp_path):
    ids = [[5, 6, 7], [8]]
    assert _check_token_rewards([[0, 1, 2.5], torch.tensor([0.5])], ids) == [[0.0, 1.0, 2.5], [0.5]]
    with pytest.raises(ValueError, match="expected a list of 2 rows"):
        _check_token_rewards([[0, 1, 2]], ids)
    with pytest.raises(ValueError, match="completion 1 has 1 tokens, expected as many rewards, got 2 values"):
        _check_token_rewards([[0, 1, 2], [0, 1]], ids)
    with pytest.raises(ValueError, match="completion 0: expected finite rewards, got nan at token 1"):
        _check_token_rewards([[0, float("nan"), 2], [0]], ids)
    tr = trainer(MaskedGRPOTrainer, model_dir, tmp_path,
                 token_reward_fn=lambda completion_ids, **kw: [[float("inf")] * len(i) for i in completion_ids])
    with pytest.raises(ValueError, match="token_reward_fn: completion 0: expected finite rewards, got inf"):
        generated_batch(tr)


REFUSED_CONFIG = [
    (dict(loss_type="sapo"), "loss_type='sapo'"),
    (dict(loss_type="cispo"), "loss_type='cispo'"),
    (dict(importance_sampling_level="sequence"), "importance_sampling_level='sequence'"),
    (dict(use_liger_kernel=True), "use_liger_kernel=True"),
    (dict(cast_lm_head_to_fp32=True), "cast_lm_head_to_fp32=True"),
    (dict(off_policy_mask_threshold=0.5), "off_policy_mask_threshold"),
    (dict(top_entropy_quantile=0.5), "top_entropy_quantile"),
    (dict(entropy_coef=0.01), "an entropy bonus"),
]


@pytest.mark.parametrize("cfg, match", REFUSED_CONFIG, ids=[m for _, m in REFUSED_CONFIG])
def test_refuses_unsupported_config(model_dir, tmp_path, cfg, match):
    with pytest.raises(ValueError, match="MaskedGRPOTrainer does not support " + match.replace("(", r"\(")):
        trainer(MaskedGRPOTrainer, model_dir, tmp_path, cfg=cfg)


def test_refuses_vllm_and_bad_arguments(model_dir, tmp_path):
    args = config(tmp_path)
    args.use_vllm = True  # set after construction: GRPOConfig itself needs vLLM installed to accept it
    with pytest.raises(ValueError, match="does not support use_vllm=True"):
        MaskedGRPOTrainer(model=load(model_dir), reward_funcs=[seq_reward], args=args, train_dataset=dataset(),
                          processing_class=tiny_tokenizer())
    for kw, exc, match in [
        (dict(mask="sigmoid"), ValueError, r"mask: expected one of \('schmitt', 'threshold'\), got 'sigmoid'"),
        (dict(mask_delta=-0.1), ValueError, "mask_delta: expected a finite number >= 0, got -0.1"),
        (dict(mask_delta=float("nan")), ValueError, "mask_delta: expected a finite number >= 0"),
        (dict(mask="threshold", mask_delta=0.2), ValueError, "mask_delta: the threshold mask"),
        (dict(mask_baseline=float("inf")), ValueError, "mask_baseline: expected a finite number or None"),
        (dict(mask_baseline="mean"), ValueError, "mask_baseline: expected a finite number or None"),
        (dict(token_reward_fn=3), TypeError, "token_reward_fn: expected a callable or None, got int"),
        (dict(tools=[seq_reward]), ValueError, "does not support tools"),
        (dict(peft_config=object()), ValueError, "does not support PEFT models"),
    ]:
        with pytest.raises(exc, match=match):
            trainer(MaskedGRPOTrainer, model_dir, tmp_path, **kw)
    with pytest.raises(ValueError, match="args: expected a trl.GRPOConfig"):
        MaskedGRPOTrainer(model=load(model_dir), reward_funcs=[seq_reward], args=None, train_dataset=dataset())
    with pytest.raises(ValueError, match="does not support a model id string"):
        MaskedGRPOTrainer(model=model_dir, reward_funcs=[seq_reward], args=config(tmp_path), train_dataset=dataset())


def test_evaluate_with_token_mask(model_dir, tmp_path):
    tr = trainer(MaskedGRPOTrainer, model_dir, tmp_path, cfg=dict(per_device_eval_batch_size=4),
                 token_reward_fn=token_reward_of_ids, mask_delta=0.05)
    tr.eval_dataset = dataset()
    out = tr.evaluate()
    assert math.isfinite(out["eval_loss"]) and out["eval_loss"] != 0
    assert 0 < out["eval_mask/negative_fraction"] < 1 and 0 < out["eval_mask/positive_fraction"] < 1
