"""Smoke test of `python -m benchmarks.losses` on a tiny shape: it runs, checks and writes JSON."""
import json

import pytest


def test_losses_benchmark_tiny(tmp_path, capsys):
    losses = pytest.importorskip("benchmarks.losses")
    out = tmp_path / "losses.json"
    assert losses.main(["--device", "cpu", "--vocab", "300", "--hidden", "8", "--tokens", "32", "--seq", "8",
                        "--repeat", "1", "--threads", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {(r["workload"], r["impl"]): r for r in data["results"]}
    assert set(rows) >= {("token_logps", "unfused"), ("token_logps", "fused[torch]"),
                         ("masked_dpo", "unfused"), ("masked_dpo", "fused[torch]")}
    for (workload, impl), r in rows.items():
        assert "error" not in r, r
        assert r["median_ms"] > 0 and r["flops"] == (8 if workload == "token_logps" else 10) * 32 * 8 * 300
        if impl != "unfused":
            assert r["check"]["max_abs_diff_output"] < 1e-4
            assert r["check"]["max_rel_diff_grad_weight"] < 1e-4
    assert "targets" in data and "wrote" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--tokens"):
        losses.main(["--device", "cpu", "--tokens", "30", "--seq", "8", "--out", str(out)])
