"""Results of a transfer experiment: the table of starts x targets and the heatmap of fusion weights."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MissingExtraError
from ..report.format import fmt_num, markdown_table
from ..report.plots import _new_figure, png_bytes
from ..utils import atomic_write_bytes, atomic_write_text, warning
from .recipe import TransferRecipe
from .results import TransferResult, csv_text, summarise


def pm(mean: float, std: float) -> str:
    """``81.25 ± 1.30`` (points), ``81.25`` with one seed, empty when missing."""
    if math.isnan(mean):
        return ""
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def mean_weights(result: TransferResult, start: str, sources: list[str], targets: list[str]) -> list[list[float]]:
    """``(S, T)`` fusion weights of ``start`` averaged over seeds; NaN where the source is the target
    (left out) or was never a source of that target."""
    out = []
    for s in sources:
        row = []
        for t in targets:
            vals = [e.weights[start][e.sources.index(s)] for e in result.estimates
                    if e.target == t and start in e.weights and s in e.sources]
            row.append(statistics.fmean(vals) if vals else math.nan)
        out.append(row)
    return out


def weights_heatmap(result: TransferResult, starts: list[str], sources: list[str], targets: list[str],
                    title: str) -> bytes:
    """One panel per start: sources (rows) x targets (columns), cells = mean weight over seeds."""
    n = len(starts)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, _ = _new_figure(1.2 + 0.6 * len(targets) * cols + 1.0 * cols, 0.9 + 0.4 * len(sources) * rows, ncols=0)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    for ax, start in zip(axes, starts):
        m = np.array(mean_weights(result, start, sources, targets), dtype=float)
        masked = np.ma.masked_invalid(m)
        im = ax.imshow(masked, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(start, fontsize=9)
        ax.set_xticks(range(len(targets)), targets, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(sources)), sources, fontsize=7)
        for i in range(len(sources)):
            for j in range(len(targets)):
                ax.text(j, i, "–" if math.isnan(m[i, j]) else f"{m[i, j]:.2f}", ha="center", va="center",
                        fontsize=6, color="white" if not math.isnan(m[i, j]) and m[i, j] < 0.5 else "black")
    fig.colorbar(im, ax=axes, shrink=0.8, label="fusion weight")
    fig.suptitle(title, fontsize=10)
    return png_bytes(fig)


def results_rows(result: TransferResult, targets: list[str]) -> tuple[list[str], list[list[str]], list[list[Any]]]:
    """Markdown headers/rows and CSV rows of the results table."""
    table = summarise(result, targets)
    metric = next((r.metric for r in result.runs), "test_accuracy")
    random_mean = table.get("random", {}).get("mean", (math.nan,))[0]
    headers = ["start", *targets, "mean", "Δ vs random"]
    md_rows, csv_rows = [], [["start", "target", "metric", "n", "mean", "std", "values"]]
    best = max((s for s in result.starts if s != "random" and not math.isnan(table[s]["mean"][0])),
               key=lambda s: table[s]["mean"][0], default=None)
    for start in result.starts:
        row = table[start]
        delta = row["mean"][0] - random_mean
        name = f"**{start}**" if start == best else start
        md_rows.append([name, *[pm(row[t][0] * 100, row[t][1] * 100) for t in targets],
                        pm(row["mean"][0] * 100, row["mean"][1] * 100),
                        "" if start == "random" or math.isnan(delta) else f"{delta * 100:+.2f}"])
        for t in [*targets, "mean"]:
            vals = [r.value for r in result.runs if r.start == start and (t == "mean" or r.target == t)]
            csv_rows.append([start, t, metric, row[t][2], repr(row[t][0]), "" if math.isnan(row[t][1])
                             else repr(row[t][1]), " ".join(fmt_num(v) for v in vals) if t != "mean" else ""])
    return headers, md_rows, csv_rows


def write_results(result: TransferResult, recipe: TransferRecipe) -> dict[str, Path]:
    """``results.csv``, ``results.md``, ``weights.csv``, ``weights.png`` in the experiment folder, atomically."""
    spec = recipe.transfer
    targets, sources = list(spec.targets), list(spec.sources)
    root = result.out_dir
    files = {"csv": root / "results.csv", "markdown": root / "results.md", "weights_csv": root / "weights.csv",
             "heatmap": root / "weights.png"}
    headers, md_rows, csv_rows = results_rows(result, targets)
    weighted = [s for s in result.starts if s != "random"]
    wrows: list[list[Any]] = [["start", "target", "seed", "source", "weight", "score"]]
    for e in result.estimates:
        for start in weighted:
            for i, s in enumerate(e.sources):
                score = e.scores.get(start, [None] * len(e.sources))[i]
                wrows.append([start, e.target, e.seed, s, repr(e.weights[start][i]), "" if score is None else repr(score)])
    metric = next((r.metric for r in result.runs), "test_accuracy")
    seeds = spec.target.seeds
    md = [f"# Transfer {recipe.name}", "",
          f"Backbone `{spec.backbone}`, method `{spec.peft.method}`, {spec.target.k}-shot targets, seeds "
          f"{', '.join(map(str, seeds))}; fusion `{spec.fusion.lora if spec.peft.method == 'lora' else 'average'}` "
          f"+ `{spec.fusion.combine}`; softmax temperature {spec.estimate.temperature} over "
          f"{'z-scored' if spec.estimate.normalize == 'zscore' else 'raw'} scores.", "",
          f"Target {metric.replace('_', ' ')} (×100), mean ± std over seeds; `mean` averages the targets "
          "(its ± is the std over seeds of the per-seed average). Leave-one-out: a target's own module never "
          "takes part. Best non-random start in bold.", "",
          markdown_table(headers, md_rows), ""]
    try:
        heatmap = weights_heatmap(result, weighted, sources, targets, f"{recipe.name}: fusion weights (mean over seeds)")
    except MissingExtraError as e:  # the tables still count; the heatmap needs the report extra
        warning(__name__, f"transfer: no weights.png: {e}")
        heatmap = None
        del files["heatmap"]
        md += ["Fusion weights per seed: `weights.csv`.", ""]
    else:
        md += ["Fusion weights (mean over seeds), sources × targets: `weights.png`, per seed: `weights.csv`.", "",
               "![fusion weights](weights.png)", ""]
    atomic_write_text(files["csv"], csv_text(csv_rows))
    atomic_write_text(files["weights_csv"], csv_text(wrows))
    if heatmap is not None:
        atomic_write_bytes(files["heatmap"], heatmap)
    atomic_write_text(files["markdown"], "\n".join(md))
    return files
