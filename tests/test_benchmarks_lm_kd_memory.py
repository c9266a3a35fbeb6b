"""benchmarks/lm_kd_memory.py --smoke: the table prints its ratios, and chunking saves memory."""

from __future__ import annotations

import importlib.util
import re

from .conftest import ROOT


def _bench():
    spec = importlib.util.spec_from_file_location("bench_lm_kd_memory", ROOT / "benchmarks" / "lm_kd_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_prints_ratios_and_chunked_memory_is_below_naive(capsys):
    rows = _bench().main(["--smoke", "--losses", "kd"])
    out = capsys.readouterr().out
    assert "chunked/naive mem" in out and "fused/naive mem" in out
    line = next(x for x in out.splitlines() if x.startswith("kd "))
    numbers = [float(v) for v in re.findall(r"\d+\.\d+", line)]
    assert len(numbers) == 10  # 3 x (MiB, s) and 2 x (memory ratio, time ratio)
    (row,) = rows
    naive_mib = row["naive"][0]
    assert naive_mib > 200  # (1024, 16384) float32 logits are 64 MiB each; naive keeps several
    # resident memory moves by up to ~0.1 GiB between runs (code pages, the allocator's arenas)
    assert row["chunked"][0] < naive_mib and row["fused"][0] < 0.5 * naive_mib, row
    for way in ("chunked", "fused"):
        assert row[f"{way}_ratio"][0] == row[way][0] / naive_mib and row[f"{way}_ratio"][1] > 0
