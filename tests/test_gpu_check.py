"""benchmarks/gpu_check.py --tiny: the seed-scale jobs' code, on CPU with tiny shapes."""

from __future__ import annotations

import importlib.util
import math

import pytest

from .conftest import ROOT


@pytest.mark.slow
def test_gpu_check_tiny_runs_every_job_and_prints_the_ratios(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DELTAKD_CACHE", str(tmp_path / "cache"))  # the benchmark points it at its own folder
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--tiny", "--steps", "2"])
    ratios = rows.pop("ratios")
    jobs = ["tiny-bert LoRA teacher", "multistage MiniLM-L6 stage", "dialogue LoRA (tiny-gpt2-shaped)",
            "partial_kd tiny-gpt2-shaped teacher", "partial_kd tiny-gpt2-shaped, student 2 layers"]
    jobs += [f"KD 2-layer student, {c}, {p}" for c in ("live", "cached") for p in ("fp32", "bf16")]
    assert sorted(rows) == sorted(jobs)
    for name, row in rows.items():
        assert row["samples_s"] > 0 and row["peak_mb"] > 0 and math.isfinite(row["loss"]), name
    assert set(ratios) == {"bf16/fp32 (live)", "bf16/fp32 (cached)", "cached/live (fp32)", "cached/live (bf16)"}
    assert all(r > 0 and math.isfinite(r) for r in ratios.values())
    out = capsys.readouterr().out
    assert "| job | samples/s | peak memory (MB) | final loss |" in out and "cached/live (fp32) = " in out
