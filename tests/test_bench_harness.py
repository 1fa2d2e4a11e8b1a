"""The benchmark harness end to end on a tiny GroupNorm case, on CPU, without the C++ extension."""

import json

import torch
from genfast.benchmarks import bench_norm, harness

PROVIDERS = ["genfast[reference]", "torch", "reference"]  # not torch.compile: it compiles for a minute


def test_quick_run_writes_every_report_file(tmp_path, monkeypatch):
    # genfast's reference backend stands in for the native ones, which need the compiled extension.
    monkeypatch.setattr(harness, "NATIVE_BACKENDS", {"cpu": ("reference",)})
    monkeypatch.setattr(harness, "families", lambda: [bench_norm])
    monkeypatch.setattr(bench_norm, "CASES", bench_norm.group_norm_cases("tiny", (2, 64, 8, 8), quick=True))
    monkeypatch.setattr(harness, "QUICK_BUDGET_S", 0.05)
    # The machine rates only need to be measured, not measured well, here.
    monkeypatch.setattr(harness, "COPY_BYTES", {"cpu": 8 << 20})
    monkeypatch.setattr(harness, "MATMUL", {"cpu": (256, torch.float32)})

    code = harness.run(quick=True, filters=[], out_dir=str(tmp_path), device="cpu", providers=PROVIDERS)

    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["rates"]["memory_bytes_per_s"] > 0
    assert results["rates"]["matmul_flops_per_s"] > 0
    assert [case["direction"] for case in results["cases"]] == ["forward", "backward"]
    for case in results["cases"]:
        assert case["fastest_genfast"] == "genfast[reference]"
        assert list(case["providers"]) == PROVIDERS
        for measured in case["providers"].values():
            assert measured["status"] == "ok"
            assert measured["median_s"] > 0
            assert measured["genfast_speedup"] > 0
        assert case["providers"]["genfast[reference]"]["genfast_speedup"] == 1
    assert "| tiny 2x64x8x8 | backward |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "group_norm.png").stat().st_size > 0


def test_no_matching_case_is_exit_code_2(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "families", lambda: [bench_norm])
    assert harness.run(quick=True, filters=["no such case"], out_dir=str(tmp_path), device="cpu") == 2
