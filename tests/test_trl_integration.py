"""fastsafe.integrations.trl.MaskedDPOTrainer: a few CPU steps with a tiny random Llama.

Skipped when TRL is not installed (``pip install 'fastsafe[trl]'``). Everything is offline: the
tokenizer is a character-level one built in memory and the models come from a config.
"""
import copy
import math
import os
import string

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from datasets import Dataset  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from fastsafe.integrations.trl import (DataCollatorForTokenWeightedPreference, MaskedDPOTrainer,  # noqa: E402
                                       check_trl_version)


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = list(string.ascii_lowercase + " .,!?")
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")


def tiny_models(vocab_size, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    ref = LlamaForCausalLM(cfg)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():  # make the policy differ from the reference so log-ratios are nonzero
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, ref


ROWS = [
    {"prompt": "how do i bake bread", "chosen": " use flour and water.", "rejected": " no idea!"},
    {"prompt": "tell me a joke", "chosen": " why did the cat sit?", "rejected": " go away."},
    {"prompt": "say hi", "chosen": " hi there!", "rejected": " bye"},
    {"prompt": "what is two and two", "chosen": " four.", "rejected": " five, i think"},
]


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, logging_steps=1,
                report_to=[], save_strategy="no", use_cpu=True, learning_rate=1e-3, beta=0.1,
                disable_tqdm=True, bf16=False)     # TRL defaults to bf16 autocast; the equalities are fp32
    base.update(kw)
    return DPOConfig(**base)


def tokenised_lengths(tokenizer, row):
    eos = tokenizer.eos_token
    return len(tokenizer(row["chosen"] + eos)["input_ids"]), len(tokenizer(row["rejected"] + eos)["input_ids"])


def weighted_rows(tokenizer, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for row in ROWS:
        nc, nr = tokenised_lengths(tokenizer, row)
        out.append({**row, "chosen_weights": torch.randint(-1, 2, (nc,), generator=g).float().tolist(),
                    "rejected_weights": torch.randint(-1, 2, (nr,), generator=g).float().tolist()})
    return out


def first_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return {k: v.to(trainer.accelerator.device) for k, v in batch.items()}


def test_supported_versions():
    check_trl_version()
    for bad in ("0.19.0", "2.0.0", "nonsense"):
        with pytest.raises(ImportError, match="supports trl"):
            check_trl_version(bad)


def test_without_weights_equals_trl_sigmoid_dpo(tokenizer, tmp_path):
    model, ref = tiny_models(len(tokenizer))
    ds = Dataset.from_list(ROWS)
    ours = MaskedDPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(ref), args=config(tmp_path),
                            train_dataset=ds, processing_class=tokenizer)
    theirs = DPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(ref), args=config(tmp_path),
                        train_dataset=ds, processing_class=tokenizer)
    batch = first_batch(ours)
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask"}
    ours.model.train()
    theirs.model.train()
    loss_ours = ours.compute_loss(ours.model, batch)
    loss_theirs = theirs.compute_loss(theirs.model, batch)
    assert abs(loss_ours.item() - math.log(2)) > 1e-5          # the policy differs from the reference
    torch.testing.assert_close(loss_ours, loss_theirs, atol=1e-5, rtol=1e-5)
    g_ours = torch.autograd.grad(loss_ours, ours.model.lm_head.weight)[0]
    g_theirs = torch.autograd.grad(loss_theirs, theirs.model.lm_head.weight)[0]
    # TRL's own chunked log-prob kernel is slightly less exact (ours matches a float64 full-logits
    # ground truth to ~1e-7 here): compare with a tolerance relative to the largest entry.
    torch.testing.assert_close(g_ours, g_theirs, atol=2e-4 * g_theirs.abs().max().item(), rtol=0)
    # rewards are beta * (difference of two sequence sums): TRL's kernel error shows there most
    for key, rel, abs_ in (("rewards/chosen", 1e-2, 1e-3), ("rewards/margins", 1e-2, 1e-3), ("logps/chosen", 1e-4, 0)):
        assert ours._metrics["train"][key][-1] == pytest.approx(theirs._metrics["train"][key][-1], rel=rel, abs=abs_)


def test_trains_a_few_steps_with_signed_weight_columns(tokenizer, tmp_path):
    model, ref = tiny_models(len(tokenizer))
    before = model.lm_head.weight.detach().clone()
    trainer = MaskedDPOTrainer(model=model, ref_model=ref, args=config(tmp_path),
                               train_dataset=Dataset.from_list(weighted_rows(tokenizer)), processing_class=tokenizer)
    batch = first_batch(trainer)
    w, cm = batch["completion_weights"], batch["completion_mask"]
    assert w.shape == batch["input_ids"].shape and w.dtype == torch.float32
    assert (w[cm == 0] == 0).all() and (w < 0).any()
    # the collator aligns each row's weights with its completion tokens (the sampler shuffles rows)
    by_ids = {tuple(ex["chosen_ids"]): ex["chosen_weights"] for ex in trainer.train_dataset}
    by_ids.update({tuple(ex["rejected_ids"]): ex["rejected_weights"] for ex in trainer.train_dataset})
    for i in range(w.shape[0]):
        ids = tuple(batch["input_ids"][i][cm[i] == 1].tolist())
        assert w[i][cm[i] == 1].tolist() == by_ids[ids]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(math.isfinite(h["loss"]) for h in logs)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "weights/negative_fraction", "num_tokens"):
        assert key in logs[-1]
    assert logs[-1]["weights/negative_fraction"] > 0
    assert not torch.equal(before, model.lm_head.weight.detach())


def test_reward_columns_with_schmitt_and_threshold_masks(tokenizer, tmp_path):
    g = torch.Generator().manual_seed(1)
    rows = []
    for row in ROWS:
        nc, nr = tokenised_lengths(tokenizer, row)
        rows.append({**row, "chosen_token_rewards": torch.randn(nc, generator=g).tolist(),
                     "rejected_token_rewards": torch.randn(nr, generator=g).tolist()})
    model, ref = tiny_models(len(tokenizer))
    with pytest.raises(ValueError, match="schmitt_delta: required"):
        MaskedDPOTrainer(model=model, ref_model=ref, args=config(tmp_path), train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    trainer = MaskedDPOTrainer(model=model, ref_model=ref, args=config(tmp_path), processing_class=tokenizer,
                               train_dataset=Dataset.from_list(rows), schmitt_delta=0.3)
    batch = first_batch(trainer)
    w = trainer._token_weights(batch)
    r = batch["completion_token_rewards"][:, 1:]
    valid = batch["completion_mask"][:, 1:] != 0
    b = r[valid].mean()
    n = w.shape[0] // 2
    want = ((r > b + 0.3).float() - (r < b - 0.3).float()) * valid
    torch.testing.assert_close(w, torch.cat([want[:n], -want[n:]]))
    trainer.model.train()
    assert torch.isfinite(trainer.compute_loss(trainer.model, batch))
    trainer._token_mask = "threshold"
    w = trainer._token_weights(batch)
    assert set(w.unique().tolist()) <= {0.0, 1.0}


def test_token_weights_fn_and_length_mismatch(tokenizer, tmp_path):
    model, ref = tiny_models(len(tokenizer))

    def fn(ex):  # weight only the last two completion tokens
        wc = [0.0] * len(ex["chosen_ids"])
        wc[-2:] = [1.0, 1.0]
        return {"chosen_weights": wc, "rejected_weights": [1.0] * len(ex["rejected_ids"])}

    trainer = MaskedDPOTrainer(model=model, ref_model=ref, args=config(tmp_path), processing_class=tokenizer,
                               train_dataset=Dataset.from_list(ROWS), token_weights_fn=fn)
    batch = first_batch(trainer)
    assert (batch["completion_weights"][:4].sum(1) == 2).all()
    bad = weighted_rows(tokenizer)
    bad[2]["chosen_weights"] = bad[2]["chosen_weights"][:-1]   # forgot the EOS weight
    with pytest.raises(ValueError, match="example 2: chosen_weights has"):
        MaskedDPOTrainer(model=model, ref_model=ref, args=config(tmp_path), processing_class=tokenizer,
                         train_dataset=Dataset.from_list(bad))


def test_all_zero_weights_give_log2_and_zero_grad(tokenizer, tmp_path):
    rows = [{**r, "chosen_weights": [0.0] * a, "rejected_weights": [0.0] * b}
            for r, (a, b) in ((r, tokenised_lengths(tokenizer, r)) for r in ROWS)]
    model, ref = tiny_models(len(tokenizer))
    trainer = MaskedDPOTrainer(model=model, ref_model=ref, args=config(tmp_path), processing_class=tokenizer,
                               train_dataset=Dataset.from_list(rows))
    batch = first_batch(trainer)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    assert loss.item() == pytest.approx(math.log(2))
    loss.backward()
    assert all(p.grad is None or (p.grad == 0).all() for p in trainer.model.parameters())


@pytest.mark.parametrize("kw, match", [
    (dict(loss_type="ipo"), "loss_type"),
    (dict(precompute_ref_log_probs=True), "precompute_ref_log_probs"),
    (dict(use_weighting=True), "use_weighting"),
    (dict(ld_alpha=0.5), "ld_alpha"),
    (dict(label_smoothing=0.1, loss_type="robust"), "loss_type"),
    (dict(label_smoothing=0.1), "label_smoothing"),
    (dict(f_divergence_type="js_divergence"), "f_divergence_type"),
])
def test_unsupported_options_are_refused(tokenizer, tmp_path, kw, match):
    model, ref = tiny_models(len(tokenizer))
    with pytest.raises(ValueError, match=match):
        MaskedDPOTrainer(model=model, ref_model=ref, args=config(tmp_path, **kw),
                         train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer)


def test_unsupported_trainer_arguments_are_refused(tokenizer, tmp_path):
    model, ref = tiny_models(len(tokenizer))
    ds = Dataset.from_list(ROWS)
    with pytest.raises(ValueError, match="compute_metrics"):
        MaskedDPOTrainer(model=model, ref_model=ref, args=config(tmp_path), train_dataset=ds,
                         processing_class=tokenizer, compute_metrics=lambda p: {})
    with pytest.raises(ValueError, match="token_mask"):
        MaskedDPOTrainer(model=model, ref_model=ref, args=config(tmp_path), train_dataset=ds,
                         processing_class=tokenizer, token_mask="soft")
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        MaskedDPOTrainer(model=model, ref_model=ref, args=config(tmp_path), train_dataset=ds,
                         processing_class=tokenizer)


def test_collator_truncates_weights_like_ids():
    ex = {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 1], "rejected_ids": [10, 1],
          "chosen_weights": [0.5, -1.0, 2.0], "rejected_weights": [1.0, 3.0]}
    out = DataCollatorForTokenWeightedPreference(pad_token_id=0, max_length=4, truncation_mode="keep_end")([ex])
    assert out["input_ids"].tolist() == [[6, 7, 8, 9], [5, 6, 7, 10]] or out["input_ids"].tolist() == \
        [[7, 8, 9, 1], [6, 7, 10, 1]]
    ids, w = out["input_ids"].tolist(), out["completion_weights"].tolist()
    assert ids == [[7, 8, 9, 1], [6, 7, 10, 1]]
    assert w == [[0.0, 0.5, -1.0, 2.0], [0.0, 0.0, 1.0, 3.0]]
    with pytest.raises(ValueError, match="chosen_weights: expected one value per completion token"):
        DataCollatorForTokenWeightedPreference(pad_token_id=0)([{**ex, "chosen_weights": [1.0]}])
