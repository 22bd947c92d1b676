"""Smoke tests of the decode benchmark and the ``fastsafe bench`` command (tiny sizes, no timing assertions)."""
from __future__ import annotations

import json
import statistics

import pytest
import torch

from benchmarks import common, decode
from fastsafe.commands import bench

TINY = ["--batch", "1,3", "--vocab", "257", "--k", "5", "--banned", "20", "--dense-ban", "0.9",
        "--repeat", "2", "--warmup", "1"]


def _backends():
    from fastsafe.ops import backends
    return ",".join(b for b in ("torch", "cpp") if backends()[b].available)


def _load(path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def test_decode_main_writes_json(tmp_path):
    out = tmp_path / "decode.json"
    chosen = _backends().split(",")
    assert decode.main(TINY + ["--backends", ",".join(chosen), "--out", str(out)]) == 0
    data = _load(out)
    assert data["benchmark"] == "decode"
    assert data["device"]["type"] == "cpu" and data["device"]["slug"] == "cpu" and data["device"]["name"]
    env = data["environment"]
    assert env["torch"] == torch.__version__
    assert {"triton", "transformers", "torch_threads", "date"} <= set(env)
    impls = [decode.HF, decode.TORCH_OPS] + [decode.fastsafe_impl(b) for b in chosen]
    assert set(data["implementations"]) == set(impls)
    rows = data["results"]
    # 2 batch sizes x (20 banned, 90% banned) x every implementation
    assert len(rows) == 2 * 2 * len(impls)
    for r in rows:
        assert r["check"] == "ok", r
        assert r["median_ms"] > 0 and r["stats"]["runs"] == 2
        assert r["warm_median_ms"] > 0 and r["warm_stats"]["runs"] == 2 and r["warm_speedup_vs_hf"] > 0
        assert r["bytes"] == decode.required_bytes(decode.Case(r["batch"], 257, 5, r["banned"]), torch.float32)
        if r["impl"] == decode.HF:
            assert r["speedup_vs_hf"] == pytest.approx(1.0)
        assert ("time_vs_base_ban" in r) == r["dense_ban"]
    assert sorted({r["banned"] for r in rows}) == [20, round(0.9 * 257)]
    assert {r["banned_label"] for r in rows} == {"20", "90%"}


def test_interleaved_timing_primed_runs_each_callable_right_before_its_timed_run():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = common.time_cpu_interleaved(fns, repeat=2, warmup=0, primed=True)
    assert calls == ["a", "a", "b", "b"] * 2 and all(len(t) == 2 for t in times.values())
    calls.clear()
    common.time_cpu_interleaved(fns, repeat=2, warmup=1)
    assert calls == ["a", "b"] * 3


def test_cli_bench_decode_runs_the_checkout_benchmark(tmp_path):
    from fastsafe.cli import main
    out = tmp_path / "cli.json"
    argv = ["bench", "decode", "--batch", "2", "--vocab", "100", "--k", "3", "--banned", "4",
            "--dense-ban", "0", "--repeat", "1", "--warmup", "0", "--backends", "torch", "--out", str(out)]
    assert main(argv) == 0
    rows = _load(out)["results"]
    assert [r["impl"] for r in rows] == [decode.HF, decode.TORCH_OPS, "fastsafe[torch]"]
    assert all(r["check"] == "ok" for r in rows)


def test_bench_missing_checkout_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"benchmark 'decode' not found: expected .*benchmarks"):
        bench.load_benchmark("decode", root=tmp_path)
    with pytest.raises(ValueError, match="name: expected one of"):
        bench.load_benchmark("nope", root=tmp_path)
    assert bench.load_benchmark("decode") is decode


def test_triton_is_not_timed_on_the_cpu_by_default():
    chosen, skipped = decode.select_backends(None, torch.device("cpu"))
    assert "torch" in chosen and "triton" not in chosen and "cuda" not in chosen
    assert {s["backend"] for s in skipped} >= {"triton", "cuda"}
    with pytest.raises(ValueError, match="--backends: expected names"):
        decode.select_backends(["fast"], torch.device("cpu"))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="--k"):
        decode.main(["--vocab", "100", "--k", "101", "--out", "unused.json"])
    with pytest.raises(ValueError, match="--batch"):
        decode.main(["--batch", "0", "--out", "unused.json"])
    with pytest.raises(ValueError, match="--dense-ban"):
        decode.main(["--dense-ban", "1.0", "--out", "unused.json"])


def test_check_outputs_catches_a_wrong_implementation():
    case = decode.Case(2, 300, 4, 30)
    inp = decode.make_inputs(case, torch.float32, torch.device("cpu"))
    good = decode.torch_ops(inp, 4)()
    values, indices, lse = good
    shifted = (values, (indices + 1) % 300, lse)
    checks = decode.check_outputs(inp, 4, {"good": good, "hf": decode.hf_chain(inp, 4)(), "bad": shifted,
                                           "bad_lse": (values, indices, lse + 0.1)})
    assert checks == {"good": "ok", "hf": "ok", "bad": "MISMATCH", "bad_lse": "MISMATCH"}


def test_peak_bandwidth_table_and_estimate():
    assert common.lookup_peak_bandwidth("NVIDIA H100 80GB HBM3") == pytest.approx(3.35e12)
    assert common.lookup_peak_bandwidth("NVIDIA H100 PCIe") == pytest.approx(2.0e12)
    assert common.lookup_peak_bandwidth("NVIDIA H100 NVL") == pytest.approx(3.9e12)
    assert common.lookup_peak_bandwidth("NVIDIA H200") == pytest.approx(4.8e12)
    assert common.lookup_peak_bandwidth("NVIDIA A100-SXM4-80GB") == pytest.approx(2.039e12)
    assert common.lookup_peak_bandwidth("NVIDIA A100-PCIE-40GB") == pytest.approx(1.555e12)
    assert common.lookup_peak_bandwidth("Some Future GPU") is None
    # H100 SXM: 2619 MHz HBM3 on a 5120-bit bus
    assert common.estimate_peak_bandwidth(2_619_000, 5120) == pytest.approx(3.352e12, rel=1e-3)
    assert common.peak_bandwidth(torch.device("cuda"), "NVIDIA H100 PCIe")[0] == pytest.approx(2.0e12)
    assert common.peak_bandwidth(torch.device("cpu"))[0] is None


def test_bandwidth_report_and_helpers():
    rep = common.bandwidth_report(2e9, 2.0, 2e12)   # 2 GB in 2 ms = 1 TB/s, roofline 1 ms
    assert rep["achieved_GBps"] == pytest.approx(1000.0)
    assert rep["peak_fraction"] == pytest.approx(0.5)
    assert rep["roofline_ratio"] == pytest.approx(2.0)
    assert "roofline_ratio" not in common.bandwidth_report(1e6, 1.0, None)
    assert common.summarize([3.0, 1.0, 2.0])["median_ms"] == 2.0
    assert common.parse_int_list("1, 8,64", "--batch") == [1, 8, 64]
    assert common.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert common.device_slug(torch.device("cpu")) == "cpu"
    table = common.format_table([["a", 1], ["bb", 22]], ["name", "n"])
    assert table.splitlines()[2] == "a      1"
    # 8 x 151936 fp32 logits + 4748 mask words + one bias row + positions, then [8, 50] values/ids + lse/flag
    assert decode.required_bytes(decode.Case(8, 151936, 50, 1000), torch.float32) == (
        8 * 151936 * 4 + 4748 * 4 + 151936 * 4 + 8 * 8 + 8 * 50 * 12 + 8 * 5)


def test_gpu_table_and_targets_render_from_rows():
    # The GPU columns cannot run here; check they render from rows shaped like the GPU path writes.
    row = {"batch": 8, "vocab": 151936, "k": 50, "banned": 1000, "banned_label": "1000", "dense_ban": False,
           "impl": "fastsafe[triton]", "check": "ok", "median_ms": 0.0025, "warm_median_ms": 0.002,
           "latency_median_ms": 0.05, "speedup_vs_hf": 40.0}
    row.update(common.bandwidth_report(decode.required_bytes(decode.Case(8, 151936, 50, 1000), torch.float32),
                                       0.0025, 3.35e12))
    table = decode.render_table([row], gpu=True)
    assert "x roofline" in table.splitlines()[0] and "66%" in table.splitlines()[2]
    targets = decode.summarize_targets([row], torch.device("cuda"))
    assert targets["worst_roofline_ratio_B_ge_8"]["fastsafe[triton]"] == pytest.approx(row["roofline_ratio"])
    cpu_row = dict(row, impl="fastsafe[cpp]", speedup_vs_hf=12.0)
    assert decode.summarize_targets([cpu_row], torch.device("cpu"))["cpp_speedup_vs_hf_B8_V151936"] == 12.0


def test_median_ci_brackets_the_median_and_separates_a_real_shift():
    from benchmarks.common import median_ci
    vals = [1.02, 0.98, 1.05, 1.01, 1.03, 0.99, 1.04, 1.00]
    lo, hi = median_ci(vals)
    assert min(vals) <= lo <= statistics.median(vals) <= hi <= max(vals)
    assert median_ci(vals) == (lo, hi)                                  # seeded
    assert median_ci([v + 0.2 for v in vals])[0] > 1.1 and median_ci(vals)[0] < 1.0
    assert median_ci([v - 1.0 for v in vals], level=0.5)[1] - median_ci([v - 1.0 for v in vals], level=0.5)[0] \
        <= hi - lo
    with pytest.raises(ValueError, match="values"):
        median_ci([])
    with pytest.raises(ValueError, match="level"):
        median_ci(vals, level=1.5)


def _tiny_generation_bench(monkeypatch, tmp_path, *extra):
    from benchmarks import generation
    import fastsafe.models
    from tests.tiny_lm import tiny_llama, tiny_tokenizer
    tok = tiny_tokenizer()
    monkeypatch.setattr(fastsafe.models, "load_model", lambda *a, **k: (tiny_llama(), tok))
    out = tmp_path / "gen.json"
    assert generation.main_compiled(["--compiled", "--batches", "2", "--new-tokens", "3", "--repeat", "3",
                                     "--entities", "40", "--output", str(out), *extra]) == 0
    return {r["config"]: r for r in _load(out)["results"]}


def test_compiled_generation_bench_pairs_the_filter_rows_without_references(monkeypatch, tmp_path):
    rows = _tiny_generation_bench(monkeypatch, tmp_path, "--only", "fastsafe_eager,fastsafe_eager_filter", "--exact",
                                  "--filter-work", "4")
    work = _load(tmp_path / "gen.json")["filter_work"]
    assert len(work) == 1 and work[0]["iterations"] == 4 and work[0]["entities"] == 40
    assert set(work[0]["step_ms"]) == {"plain", "filter"} and all(v > 0 for v in work[0]["step_ms"].values())
    assert "tokens_per_s_cost" not in work[0]            # no compiled row to take a share of
    assert set(rows) == {"fastsafe_eager", "fastsafe_eager_filter"}
    filt = rows["fastsafe_eager_filter"]
    assert len(filt["filter_cost_per_round"]) == 3 and filt["filter_cost_round_median"] < 1.0
    lo, hi = filt["filter_cost_round_ci95"]
    assert lo <= filt["filter_cost_round_median"] <= hi
    assert "relative_to_hf_compiled" not in filt and "matches_hf_eager" not in filt
    assert "filter_cost_per_round" not in rows["fastsafe_eager"]


def test_compiled_generation_bench_rates_rows_against_the_hf_references(monkeypatch, tmp_path):
    rows = _tiny_generation_bench(monkeypatch, tmp_path, "--only", "fastsafe_eager", "--entities", "0")
    assert set(rows) == {"hf_eager", "hf_compiled", "fastsafe_eager"}
    row = rows["fastsafe_eager"]
    assert row["matches_hf_eager"] is True and len(row["relative_to_hf_compiled_per_round"]) == 3
    assert 0 <= row["rounds_at_least_hf_compiled"] <= 3
    assert rows["hf_compiled"]["relative_to_hf_compiled_round_ci95"] == [1.0, 1.0]      # itself, from the JSON


def test_the_random_1b_preset_has_llama_1b_shapes():
    from transformers import AutoModelForCausalLM
    from benchmarks.generation import random_model_config
    cfg = random_model_config("1b", 49152)
    with torch.device("meta"):                       # shapes only: no 4 GB of weights
        model = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 1.0e9 < n < 1.3e9 and cfg.num_key_value_heads == 8 and cfg.vocab_size == 49152
    with pytest.raises(ValueError, match="--random-model"):
        random_model_config("7b", 49152)
