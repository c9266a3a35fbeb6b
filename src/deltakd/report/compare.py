"""Compare runs and sweeps: find them on disk, summarise seeds, build a markdown + HTML report.

Inputs accepted by :func:`collect`:

- a run directory (``runs/<name>/<stamp>/``, finished: it has ``results.json``);
- a run-name folder (``runs/<name>/``): its newest finished run;
- a sweep directory (``runs/<name>-sweep/``, written by ``deltakd sweep``: it has ``sweep.json``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from ..errors import DeltakdError
from ..utils import atomic_write_bytes, atomic_write_text

SWEEP_MANIFEST = "sweep.json"
SEED_KEY = "train.seed"
METHOD_KEY = "peft.method"
SPLITS = ("valid", "test")


# ----------------------------------------------------------------------------- values


def lower_is_better(metric: str) -> bool:
    """Perplexity and losses fall as a model improves; every other metric rises."""
    return metric == "perplexity" or metric.endswith("loss")


def fmt_num(v: Any) -> str:
    """A metric for a table: 4 decimals, 1 above 100; blank when missing."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.1f}" if abs(v) >= 100 else f"{v:.4f}"


def fmt_duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or math.isnan(seconds):
        return ""
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min" if seconds < 3600 else \
        f"{seconds / 3600:.2f} h"


def fmt_rate(v: Any) -> str:
    return f"{v:,.1f}" if isinstance(v, (int, float)) and not math.isnan(v) else ""


def fmt_value(v: Any) -> str:
    """A grid value as written in names and tables: floats by shortest repr, the rest as flow YAML."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (int, str)):
        return str(v)
    if v is None:
        return "null"
    return yaml.safe_dump(v, default_flow_style=True, width=10_000).strip()


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """``train.lr`` -> ``lr``, unless two keys share their last part (then the full dotted key)."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def setting_label(setting: dict[str, Any]) -> str:
    """``{train.lr: 1e-05, peft.r: 8}`` -> ``lr=1e-05 r=8`` (``base`` for the empty setting)."""
    names = short_keys(list(setting))
    return " ".join(f"{names[k]}={fmt_value(v)}" for k, v in setting.items()) or "base"


# ----------------------------------------------------------------------------- runs on disk


@dataclass
class RunInfo:
    """A finished run: its results, its recipe as saved (raw YAML) and its metrics log."""

    path: Path
    results: dict[str, Any]
    recipe: dict[str, Any]
    events: list[dict[str, Any]]
    label: str = ""

    @property
    def name(self) -> str:
        return str(self.results.get("name") or self.recipe.get("name") or self.path.parent.name)

    @property
    def main_metric(self) -> str:
        return str(self.results.get("main_metric") or "loss")

    @property
    def method(self) -> str:
        peft = self.recipe.get("peft") or {}
        method = str(peft.get("method", "full")) if isinstance(peft, dict) else "full"
        if isinstance(peft, dict) and method == "lora" and peft.get("full"):
            method = "lora+full"
        return f"{method} (kd)" if self.recipe.get("teacher") else method

    def metric(self, split: str, name: str) -> float | None:
        v = self.results.get("metrics", {}).get(split, {}).get(name)
        return float(v) if isinstance(v, (int, float)) else None


def _is_run_dir(path: Path) -> bool:
    return (path / "results.json").is_file() or (path / "recipe.yaml").is_file()


def newest_finished(folder: Path) -> Path | None:
    """The newest finished run directory in a run-name folder (stamps sort by time)."""
    if not folder.is_dir():
        return None
    done = [p for p in sorted(folder.iterdir()) if p.is_dir() and (p / "results.json").is_file()]
    return done[-1] if done else None


def load_run(path: str | Path) -> RunInfo:
    """Read a finished run directory (results.json, recipe.yaml, metrics.jsonl)."""
    path = Path(path)
    results_file = path / "results.json"
    if not results_file.is_file():
        raise DeltakdError(f"run '{path}' has not finished (no results.json)")
    try:
        results = json.loads(results_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DeltakdError(f"'{results_file}': not valid JSON ({e.msg}, line {e.lineno})") from None
    recipe: dict[str, Any] = {}
    if (path / "recipe.yaml").is_file():
        loaded = yaml.safe_load((path / "recipe.yaml").read_text(encoding="utf-8"))
        recipe = loaded if isinstance(loaded, dict) else {}
    events = []
    metrics_file = path / "metrics.jsonl"
    if metrics_file.is_file():
        for line in metrics_file.read_text(encoding="utf-8").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write
    return RunInfo(path, results, recipe, events)


@dataclass
class Trial:
    """One point of a sweep's grid: its run name, its full setting, its finished run (if any)."""

    name: str
    setting: dict[str, Any]
    run: RunInfo | None = None


@dataclass
class SweepInfo:
    path: Path
    name: str
    grid: dict[str, list[Any]]
    trials: list[Trial]


def load_sweep(path: str | Path) -> SweepInfo:
    """A sweep directory: its manifest and the newest finished run of each trial."""
    path = Path(path)
    manifest_file = path / SWEEP_MANIFEST
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DeltakdError(f"sweep '{path}': cannot read {SWEEP_MANIFEST} ({e})") from None
    trials = []
    for t in manifest.get("trials", []):
        done = newest_finished(path / t["name"])
        trials.append(Trial(t["name"], dict(t.get("setting", {})), load_run(done) if done else None))
    return SweepInfo(path, manifest.get("name", path.name), manifest.get("grid", {}), trials)


@dataclass
class Collected:
    runs: list[RunInfo] = field(default_factory=list)  # standalone runs, in the order given
    sweeps: list[SweepInfo] = field(default_factory=list)

    def all_runs(self) -> list[RunInfo]:
        return self.runs + [t.run for s in self.sweeps for t in s.trials if t.run is not None]


def collect(paths: Iterable[str | Path]) -> Collected:
    """Classify each path as a run dir, a run-name folder or a sweep dir; anything else is an error."""
    out = Collected()
    for raw in paths:
        path = Path(raw)
        if (path / SWEEP_MANIFEST).is_file():
            out.sweeps.append(load_sweep(path))
        elif _is_run_dir(path):
            out.runs.append(load_run(path))
        elif path.is_dir() and any(_is_run_dir(p) for p in path.iterdir() if p.is_dir()):
            done = newest_finished(path)
            if done is None:
                raise DeltakdError(f"report: '{path}' has no finished run (none of its runs has results.json)")
            out.runs.append(load_run(done))
        else:
            what = "does not exist" if not path.exists() else "is not a run directory (with results.json), " \
                "a run-name folder (runs/<name>/) or a sweep directory (with sweep.json)"
            raise DeltakdError(f"report: '{path}' {what}")
    _label(out.all_runs())
    return out


def _label(runs: list[RunInfo]) -> None:
    """Run names, with the run stamp added where one name occurs more than once."""
    names = [r.name for r in runs]
    for r in runs:
        r.label = f"{r.name}/{r.path.name}" if names.count(r.name) > 1 else r.name


# ----------------------------------------------------------------------------- sweep summary


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

    def best(self) -> list[SettingStats]:
        return [s for s in self.settings if s.best]


def _columns(results: list[dict[str, Any]], main: str) -> list[str]:
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
    done = [t for t in trials if t.run is not None]
    missing = [t.name for t in trials if t.run is None]
    keys: list[str] = []
    for t in trials:
        keys += [k for k in t.setting if k != seed_key and k not in keys]
    mains = [t.run.main_metric for t in done]  # type: ignore[union-attr]
    main = max(set(mains), key=mains.count) if mains else "accuracy"
    columns = _columns([t.run.results for t in done], main)  # type: ignore[union-attr]
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
    ranked_by = next((c for c in (f"valid_{main}", f"test_{main}") if c in columns), None)
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
    return SweepSummary(name, keys, main, columns, settings, ranked_by, missing)


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
    """Bars of the valid and test main metric per setting, error bars = std over seeds."""
    from .plots import bar_chart

    series, errors = {}, {}
    for split in SPLITS:
        col = f"{split}_{summary.main_metric}"
        if col in summary.columns:
            series[split] = [s.mean[col] for s in summary.settings]
            errors[split] = [s.std[col] for s in summary.settings]
    best = next((i for i, s in enumerate(summary.settings) if s.best), None)
    n_seeds = sorted({s.n for s in summary.settings})
    seeds = f"n={n_seeds[0]}" if len(n_seeds) == 1 else f"n={n_seeds[0]}-{n_seeds[-1]}"
    return bar_chart([s.label for s in summary.settings], series, errors, ylabel=summary.main_metric,
                     title=f"{summary.name}: mean ± std over seeds ({seeds})", highlight=best)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(x: str) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


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
    if chart:
        parts += ["", f"![{summary.name}]({chart})"]
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- report


@dataclass
class Block:
    """One piece of a report page, rendered to both markdown and HTML."""

    kind: str  # "h1" | "h2" | "text" | "list" | "table" | "image"
    text: str = ""
    items: list[str] = field(default_factory=list)
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    png: bytes = b""
    file: str = ""  # the image's file name next to report.md


def runs_table(runs: Sequence[RunInfo]) -> tuple[list[str], list[list[str]]]:
    """Run, method, parameters, every valid/test metric, wall time, throughput."""
    mains = [r.main_metric for r in runs]
    main = max(set(mains), key=mains.count) if mains else ""
    columns = _columns([r.results for r in runs], main)
    tokens = any("train_tokens_per_second" in r.results for r in runs)
    headers = ["run", "method", "params", "trainable", *[c.replace("_", " ", 1) for c in columns],
               "wall time", "samples/s", *(["tokens/s"] if tokens else [])]
    rows = []
    for r in runs:
        p = r.results.get("params", {})
        trainable = fmt_num(p.get("trainable"))
        if "trainable_pct" in p:
            trainable += f" ({p['trainable_pct']:.2f}%)"
        row = [r.label, r.method, fmt_num(p.get("total")), trainable,
               *[fmt_num(r.metric(*c.split("_", 1))) for c in columns],
               fmt_duration(r.results.get("wall_time_s")), fmt_rate(r.results.get("train_samples_per_second"))]
        if tokens:
            row.append(fmt_rate(r.results.get("train_tokens_per_second")))
        rows.append(row)
    return headers, rows


def curves_of(run: RunInfo) -> dict[str, list[tuple[int, float]]]:
    """Training loss and the evaluation main metric against step, from metrics.jsonl.

    Perplexity, when not logged at evaluation, is exp(eval_loss).
    """
    main = run.main_metric
    loss, ev = [], []
    for e in run.events:
        step = e.get("step")
        if not isinstance(step, (int, float)):
            continue
        if isinstance(e.get("loss"), (int, float)):
            loss.append((int(step), float(e["loss"])))
        if isinstance(e.get(f"eval_{main}"), (int, float)):
            ev.append((int(step), float(e[f"eval_{main}"])))
        elif main == "perplexity" and isinstance(e.get("eval_loss"), (int, float)):
            ev.append((int(step), math.exp(min(float(e["eval_loss"]), 50.0))))
    return {"loss": loss, "eval": ev}


def report_blocks(data: Collected) -> list[Block]:
    from .plots import bar_chart, learning_curves

    runs = data.all_runs()
    if not runs:
        raise DeltakdError("report: no finished run among the paths given")
    blocks = [Block("h1", f"deltakd report: {len(runs)} run{'s' if len(runs) != 1 else ''}")]
    sources = [*(r.path for r in data.runs), *(s.path for s in data.sweeps)]
    blocks.append(Block("text", "Sources: " + ", ".join(f"`{p}`" for p in sources)))
    blocks.append(Block("h2", "Runs"))
    headers, rows = runs_table(runs)
    blocks.append(Block("table", headers=headers, rows=rows))
    mains = sorted({r.main_metric for r in runs})
    eval_label = f"eval {mains[0]}" if len(mains) == 1 else "eval main metric"
    blocks.append(Block("h2", "Learning curves"))
    blocks.append(Block("image", text="learning curves", file="learning_curves.png",
                        png=learning_curves({r.label: curves_of(r) for r in runs}, eval_label)))
    for i, sweep in enumerate(data.sweeps):
        summary = summarize(sweep.name, sweep.trials)
        blocks.append(Block("h2", f"Sweep {sweep.name}"))
        if sweep.grid:
            blocks.append(Block("text", "Grid: " + ", ".join(
                f"`{k}` ∈ [{', '.join(fmt_value(v) for v in vals)}]" for k, vals in sweep.grid.items())))
        h, r = summary_table(summary)
        blocks.append(Block("table", headers=h, rows=r))
        blocks.append(Block("list", items=best_lines(summary)))
        if summary.missing:
            blocks.append(Block("text", f"Not finished ({len(summary.missing)}): " + ", ".join(summary.missing)))
        if summary.settings:
            blocks.append(Block("image", text=f"sweep {sweep.name}", file=f"sweep-{i + 1}-{sweep.name}.png",
                                png=summary_chart(summary)))
    if data.runs or not data.sweeps:
        blocks.append(Block("h2", "Test main metric per run"))
        alone = data.runs
        blocks.append(Block("image", text="test main metric per run", file="bars.png", png=bar_chart(
            [r.label for r in alone], {"test": [r.metric("test", r.main_metric) for r in alone]},
            ylabel=" / ".join(sorted({r.main_metric for r in alone})), title="test main metric per run")))
    return blocks


def blocks_markdown(blocks: Sequence[Block]) -> str:
    out = []
    for b in blocks:
        if b.kind == "h1":
            out.append(f"# {b.text}")
        elif b.kind == "h2":
            out.append(f"## {b.text}")
        elif b.kind == "text":
            out.append(b.text)
        elif b.kind == "list":
            out.append("\n".join(f"- {x}" for x in b.items))
        elif b.kind == "table":
            out.append(markdown_table(b.headers, b.rows))
        elif b.kind == "image":
            out.append(f"![{b.text}]({b.file})")
    return "\n\n".join(out) + "\n"


def build_report(paths: Iterable[str | Path], out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.md`` (with its PNGs beside it) and a self-contained ``report.html`` into ``out_dir``."""
    from .html import render_html

    data = collect(paths)
    blocks = report_blocks(data)
    out = Path(out_dir)
    written: dict[str, Path] = {}
    for b in blocks:
        if b.kind == "image":
            atomic_write_bytes(out / b.file, b.png)
            written[b.file] = out / b.file
    atomic_write_text(out / "report.md", blocks_markdown(blocks))
    atomic_write_text(out / "report.html", render_html(blocks, title=blocks[0].text))
    written["markdown"], written["html"] = out / "report.md", out / "report.html"
    return written
