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
