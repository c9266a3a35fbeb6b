"""Sweep statistics: group trials by setting, mean ± std over seeds, the best setting; as CSV, table, chart, markdown."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from .format import fmt_num, fmt_value, lower_is_better, markdown_table, setting_label, short_keys
from .plots import bar_figure, png_bytes

if TYPE_CHECKING:  # matplotlib is optional (the report extra): imported where a chart is drawn
    from matplotlib.figure import Figure

SEED_KEY = "train.seed"
METHOD_KEY = "peft.method"
SPLITS = ("valid", "heldout", "test")  # heldout: a multistage stage's held-out pairs


class FinishedRun(Protocol):
    """What the statistics read of a finished run (:class:`deltakd.report.compare.RunInfo`)."""

    results: dict[str, Any]

    @property
    def main_metric(self) -> str: ...

    def metric(self, split: str, name: str) -> float | None: ...


@dataclass
class Trial:
    """One point of a sweep's grid: its run name, its full setting, its finished run (if any)."""

    name: str
    setting: dict[str, Any]
    run: FinishedRun | None = None


@dataclass
class SettingStats:
    """Mean and (sample, n-1) standard deviation over the seeds of one grid setting."""

    setting: dict[str, Any]  # grid keys except the seed
    trials: list[str]
    seeds: list[Any]
    mean: dict[str, float]  # "test_accuracy" -> mean
    std: dict[str, float]  # NaN with a single seed
    best: bool = False

    @property
    def n(self) -> int:
        return len(self.trials)

    @property
    def label(self) -> str:
        return setting_label(self.setting)


@dataclass
class SweepSummary:
    name: str
    keys: list[str]  # setting keys (grid keys except the seed)
    main_metric: str
    columns: list[str]  # "valid_accuracy", ..., "test_loss"
    settings: list[SettingStats]
    ranked_by: str | None  # the column the best setting was chosen on
    missing: list[str]  # trials without a finished run
    diverged: list[str] = field(default_factory=list)  # "<trial> (step N: <term> <value>)", left out of the stats

    def best(self) -> list[SettingStats]:
        return [s for s in self.settings if s.best]


def metric_columns(results: list[dict[str, Any]], main: str) -> list[str]:
    """``<split>_<metric>`` for every valid, then test metric in ``results``: main metric first, loss last."""
    cols = []
    for split in SPLITS:
        names: list[str] = []
        for r in results:
            for m in r.get("metrics", {}).get(split, {}):
                if m not in names:
                    names.append(m)
        names.sort(key=lambda m: (m != main, m == "loss"))  # main metric first, loss last
        cols += [f"{split}_{m}" for m in names]
    return cols


def _method_of(setting: dict[str, Any]) -> str:
    """The PEFT method a setting fixes (``peft.method`` or a whole ``peft`` section swept), else ''."""
    if METHOD_KEY in setting:
        return fmt_value(setting[METHOD_KEY])
    peft = setting.get("peft")
    return fmt_value(peft.get("method")) if isinstance(peft, dict) and "method" in peft else ""


def summarize(name: str, trials: Sequence[Trial], seed_key: str = SEED_KEY) -> SweepSummary:
    """Group finished trials by their setting without the seed: mean ± std of every valid/test metric.

    The best setting is the one with the best mean of the valid main metric (higher, or lower for
    losses and perplexity), one per ``peft.method`` when the grid varies the method. Without a
    valid split the test metric is used, and the summary says so.
    """
    finished = [t for t in trials if t.run is not None]
    missing = [t.name for t in trials if t.run is None]
    diverged = [f"{t.name} (step {d.get('step')}: {d.get('term')} {d.get('value')})" for t in finished
                if (d := t.run.results.get("diverged"))]  # type: ignore[union-attr]
    done = [t for t in finished if not t.run.results.get("diverged")]  # type: ignore[union-attr]
    keys: list[str] = []
    for t in trials:
        keys += [k for k in t.setting if k != seed_key and k not in keys]
    mains = [t.run.main_metric for t in done]  # type: ignore[union-attr]
    main = max(set(mains), key=mains.count) if mains else "accuracy"
    columns = metric_columns([t.run.results for t in done], main)  # type: ignore[union-attr]
    groups: dict[str, list[Trial]] = {}
    for t in done:
        groups.setdefault(json.dumps([t.setting.get(k) for k in keys], default=str), []).append(t)
    settings = []
    for members in groups.values():
        mean, std = {}, {}
        for col in columns:
            split, metric = col.split("_", 1)
            vals = [v for t in members if (v := t.run.metric(split, metric)) is not None]  # type: ignore[union-attr]
            mean[col] = statistics.fmean(vals) if vals else math.nan
            std[col] = statistics.stdev(vals) if len(vals) > 1 else math.nan
        settings.append(SettingStats({k: members[0].setting.get(k) for k in keys}, [t.name for t in members],
                                     [t.setting.get(seed_key) for t in members], mean, std))
    ranked_by = next((c for c in (f"{split}_{main}" for split in SPLITS) if c in columns), None)
    if ranked_by is not None:
        sign = -1.0 if lower_is_better(main) else 1.0
        by_method: dict[str, list[SettingStats]] = {}
        for s in settings:
            by_method.setdefault(_method_of(s.setting), []).append(s)
        for group in by_method.values():
            scored = [s for s in group if not math.isnan(s.mean[ranked_by])]
            if scored:  # ties go to the lower loss on the same split, then to the earlier setting
                tie = ranked_by.split("_", 1)[0] + "_loss"
                max(scored, key=lambda s: (sign * s.mean[ranked_by], -s.mean.get(tie, 0.0)
                                           if not math.isnan(s.mean.get(tie, 0.0)) else -math.inf)).best = True
    return SweepSummary(name, keys, main, columns, settings, ranked_by, missing, diverged)


def pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return ""
    return fmt_num(mean) if math.isnan(std) else f"{fmt_num(mean)} ± {fmt_num(std)}"


def summary_csv(summary: SweepSummary) -> str:
    """One row per setting: setting keys, n, seeds, <split>_<metric>_mean/_std (full precision), best."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*summary.keys, "n", "seeds", *[f"{c}_{s}" for c in summary.columns for s in ("mean", "std")],
                "best"])
    for s in summary.settings:
        nums = [("" if math.isnan(x) else repr(x)) for c in summary.columns for x in (s.mean[c], s.std[c])]
        w.writerow([*[fmt_value(s.setting[k]) for k in summary.keys], s.n,
                    " ".join(fmt_value(x) for x in s.seeds), *nums, "yes" if s.best else ""])
    return buf.getvalue()


def summary_table(summary: SweepSummary) -> tuple[list[str], list[list[str]]]:
    """Headers and rows (mean ± std cells) of the summary; the best setting's name in bold."""
    names = short_keys(summary.keys)
    headers = [*[names[k] for k in summary.keys], "n", *[c.replace("_", " ", 1) for c in summary.columns]]
    rows = []
    for s in summary.settings:
        cells = [fmt_value(s.setting[k]) for k in summary.keys]
        if s.best and cells:
            cells[0] = f"**{cells[0]}** ★"
        rows.append([*cells, str(s.n), *[pm(s.mean[c], s.std[c]) for c in summary.columns]])
    return headers, rows


def best_lines(summary: SweepSummary) -> list[str]:
    """A sentence per best setting: which, ranked on what, and its valid/test main metric."""
    if summary.ranked_by is None:
        return ["No finished trial has a metric to rank settings on."]
    split, metric = summary.ranked_by.split("_", 1)
    how = "lowest" if lower_is_better(metric) else "highest"
    out = []
    for s in summary.best():
        method = f" for method {_method_of(s.setting)}" if _method_of(s.setting) else ""
        scores = ", ".join(f"{c.replace('_', ' ', 1)} {pm(s.mean[c], s.std[c])}"
                           for c in (f"valid_{metric}", f"test_{metric}") if c in s.mean)
        out.append(f"Best setting{method} ({how} mean {split} {metric}): {s.label} — {scores} (n={s.n})")
    if split == "test":
        out.append("(no valid split: the best setting was chosen on test)")
    return out


def summary_chart(summary: SweepSummary) -> bytes:
    """``summary_figure`` as PNG bytes."""
    return png_bytes(summary_figure(summary))


def summary_figure(summary: SweepSummary) -> Figure:
    """Bars of the valid and test main metric per setting, error bars = std over seeds, the y axis
    zoomed to mean ± std."""

    series, errors = {}, {}
    for split in SPLITS:
        col = f"{split}_{summary.main_metric}"
        if col in summary.columns:
            series[split] = [s.mean[col] for s in summary.settings]
            errors[split] = [s.std[col] for s in summary.settings]
    best = next((i for i, s in enumerate(summary.settings) if s.best), None)
    n_seeds = sorted({s.n for s in summary.settings})
    seeds = f"n={n_seeds[0]}" if len(n_seeds) == 1 else f"n={n_seeds[0]}-{n_seeds[-1]}"
    return bar_figure([s.label for s in summary.settings], series, errors, ylabel=summary.main_metric,
                     title=f"{summary.name}: mean ± std over seeds ({seeds})", highlight=best)


def summary_markdown(summary: SweepSummary, grid: dict[str, list[Any]] | None = None,
                     chart: str | None = "summary.png") -> str:
    parts = [f"# Sweep {summary.name}", ""]
    if grid:
        parts += ["Grid: " + ", ".join(f"`{k}` ∈ [{', '.join(fmt_value(v) for v in vals)}]"
                                       for k, vals in grid.items()), ""]
    parts += [markdown_table(*summary_table(summary)), "",
              "Cells are mean ± sample standard deviation (n-1) over seeds; n is the number of seeds.", ""]
    parts += [f"- {line}" for line in best_lines(summary)]
    if summary.missing:
        parts += ["", f"Not finished ({len(summary.missing)}): " + ", ".join(f"`{m}`" for m in summary.missing)]
    if summary.diverged:
        parts += ["", f"Diverged, left out of the statistics ({len(summary.diverged)}): "
                  + ", ".join(f"`{m}`" for m in summary.diverged)]
    if chart:
        parts += ["", f"![{summary.name}]({chart})"]
    return "\n".join(parts) + "\n"
