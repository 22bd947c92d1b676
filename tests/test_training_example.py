"""examples/train_masked_dpo.py runs a few steps and learns to avoid the harmful token ids."""
import importlib.util
import math
import pathlib

import pytest

pytest.importorskip("transformers")
EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_masked_dpo.py"


def test_example_loop_reduces_harmful_probability(capsys):
    spec = importlib.util.spec_from_file_location("train_masked_dpo", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    history = mod.main(["--steps", "8", "--vocab-size", "128", "--hidden-size", "32", "--pairs", "4"])
    first, last = history[0], history[-1]
    assert len(history) == 8 and first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert math.isfinite(last["loss"]) and last["loss"] < first["loss"]
    assert last["p_harmful"] < 0.8 * first["p_harmful"]
    assert last["rewards/margins"] > 0
    assert "step   8" in capsys.readouterr().out


GRPO_EXAMPLE = EXAMPLE.parent / "train_masked_grpo.py"


# TRL's GRPOTrainer calls transformers' renamed gradient-checkpointing methods; tests/deprecations.py
# blames MaskedGRPOTrainer's super() call for them (third-party deprecations, let through by message).
@pytest.mark.filterwarnings("ignore:`[a-z_]*gradient_checkpointing[a-z_]*` is deprecated:FutureWarning")
def test_grpo_example_pushes_harmful_letters_down(capsys):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    import torch
    spec = importlib.util.spec_from_file_location("train_masked_grpo", GRPO_EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # a tiny model: a second thread only adds contention on a busy machine
    try:
        out = mod.main(["--steps", "6"])
    finally:
        torch.set_num_threads(threads)
    history, (before, after) = out["history"], out["p_harmful"]
    assert len(history) == 6 and all(math.isfinite(h["loss"]) for h in history)
    assert any(h["mask/negative_fraction"] > 0 for h in history)      # harmful letters were masked -1
    assert after < 0.7 * before
    assert "p(harmful next letter)" in capsys.readouterr().out
