"""Smoke test of `python -m benchmarks.losses --long-context` on a tiny shape (masked GRPO, Liger rows)."""
import json

import pytest


def test_long_context_benchmark_tiny(tmp_path, monkeypatch):
    losses = pytest.importorskip("benchmarks.losses")
    out = tmp_path / "lc.json"
    assert losses.main(["--long-context", "--device", "cpu", "--vocab", "300", "--hidden", "8", "--tokens", "32",
                        "--seq", "8", "--threads", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {(r["workload"], r["impl"]): r for r in data["results"]}
    assert set(rows) >= {("token_logps", "unfused"), ("token_logps", "fused[torch]"),
                         ("masked_dpo", "fused[torch]"), ("masked_grpo", "fused[torch]")}
    for r in rows.values():
        assert "error" not in r and r["median_ms"] > 0 and r["peak_extra_bytes"] > 0, r
        # every implementation ends holding its weight and hidden-state gradients; the previous
        # implementation's, freed before the measure, do not lower the peak
        assert r["peak_extra_bytes"] >= r["gradient_bytes"] == (300 + 32) * 8 * 4, r
    assert rows[("token_logps", "unfused")]["min_extra_bytes"] == 2 * 32 * 300 * 4
    assert rows[("token_logps", "fused[torch]")]["check"]["max_abs_diff_output"] < 1e-4
    try:
        import liger_kernel.chunked_loss  # noqa: F401
    except Exception:
        return
    # 0/1 DPO weights: fastsafe's masked DPO is standard DPO, so Liger's must agree; GRPO likewise.
    for w in ("masked_dpo", "masked_grpo"):
        chk = rows[(w, "liger")]["check"]
        assert chk["max_abs_diff_output"] < 1e-4 and chk["max_rel_diff_grad_weight"] < 1e-3, (w, chk)
        assert "speedup_vs_liger" in rows[(w, "fused[torch]")]
    assert "memory_at_most_0.05x_liger" in data["targets"]
    # An implementation whose lower bound does not fit is recorded, not run.
    monkeypatch.setattr(losses, "available_bytes", lambda: 1000)
    out2 = tmp_path / "lc2.json"
    assert losses.main(["--long-context", "--device", "cpu", "--vocab", "300", "--hidden", "8", "--tokens", "32",
                        "--seq", "8", "--threads", "1", "--workloads", "masked_dpo", "--impls", "fused[torch],liger",
                        "--one-call", "--out", str(out2)]) == 0
    rows2 = {r["impl"]: r for r in json.loads(out2.read_text())["results"]}
    assert rows2["liger"]["error"].startswith("not run: needs at least")
    assert rows2["fused[torch]"]["memory_vs_liger_lower_bound"] > 0


def test_rss_memory_needs_the_pinned_mmap_threshold(monkeypatch):
    losses = pytest.importorskip("benchmarks.losses")
    import torch
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    with pytest.raises(RuntimeError, match="MALLOC_MMAP_THRESHOLD_=131072"):
        losses.peak_extra_bytes(lambda: None, torch.device("cpu"), method="rss")
