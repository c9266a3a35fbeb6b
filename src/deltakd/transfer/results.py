"""What a transfer experiment produces: estimates per target and seed, target runs, the summary."""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .library import SourceModule


@dataclass
class Estimate:
    target: str
    seed: int
    sources: list[str]  # leave-one-out: the target is never among them
    scores: dict[str, list[float]]  # estimator -> (S,)
    weights: dict[str, list[float]]  # start -> (S,)
    dev_after: list[float] | None = None
    digest: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "seed": self.seed, "sources": self.sources, "scores": self.scores,
                "weights": self.weights, "dev_after": self.dev_after, "digest": self.digest}


@dataclass
class TargetRun:
    target: str
    start: str
    seed: int
    run_dir: str
    metric: str
    value: float
    status: str  # ran | skipped


@dataclass
class TransferResult:
    out_dir: Path
    starts: list[str]
    runs: list[TargetRun]
    estimates: list[Estimate]
    modules: dict[str, SourceModule]
    files: dict[str, Path] = field(default_factory=dict)


def target_run(target: str, start: str, seed: int, results: Mapping[str, Any], status: str) -> TargetRun:
    metric = results.get("main_metric", "accuracy")
    metrics = results.get("metrics", {})
    split = "test" if "test" in metrics else "valid"
    value = float(metrics.get(split, {}).get(metric, math.nan))
    return TargetRun(target, start, seed, results.get("run_dir", ""), f"{split}_{metric}", value, status)


def summarise(result: TransferResult, targets: list[str]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """start -> target (and ``mean``) -> (mean, std over seeds, n)."""
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    for start in result.starts:
        row: dict[str, tuple[float, float, int]] = {}
        for t in targets:
            vals = [r.value for r in result.runs if r.start == start and r.target == t and not math.isnan(r.value)]
            row[t] = (statistics.fmean(vals) if vals else math.nan,
                      statistics.stdev(vals) if len(vals) > 1 else math.nan, len(vals))
        means = [row[t][0] for t in targets if not math.isnan(row[t][0])]
        # the average over targets; its spread is the std over seeds of the per-seed target average
        seeds = sorted({r.seed for r in result.runs})
        per_seed = []
        for s in seeds:
            v = [r.value for r in result.runs if r.start == start and r.seed == s and not math.isnan(r.value)]
            if len(v) == len(targets):
                per_seed.append(statistics.fmean(v))
        row["mean"] = (statistics.fmean(means) if means else math.nan,
                       statistics.stdev(per_seed) if len(per_seed) > 1 else math.nan, len(per_seed))
        out[start] = row
    return out


def csv_text(rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()
