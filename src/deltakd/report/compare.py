"""Compare runs and sweeps: find them on disk, build a markdown + HTML report of them.

Inputs accepted by :func:`collect`:

- a run directory (``runs/<name>/<stamp>/``, finished: it has ``results.json``);
- a run-name folder (``runs/<name>/``): its newest finished run;
- a sweep directory (``runs/<name>-sweep/``, written by ``deltakd sweep``: it has ``sweep.json``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import DeltakdError
from ..runs import RunDir, RunResults, newest_finished, read_recipe_data
from ..utils import atomic_write_bytes, atomic_write_text
from .blocks import Block, blocks_markdown
from .format import fmt_duration, fmt_num, fmt_rate, fmt_value
from .html import render_html
from .plots import bar_chart, learning_curves, require_matplotlib
from .sweep_stats import Trial, best_lines, metric_columns, summarize, summary_chart, summary_table
from .tables import teacher_student_rows

SWEEP_MANIFEST = "sweep.json"


# ----------------------------------------------------------------------------- runs on disk


@dataclass
class RunInfo:
    """A finished run: its results, its recipe as saved (raw YAML) and its metrics log."""

    path: Path
    results: RunResults
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


def load_run(path: str | Path) -> RunInfo:
    """Read a finished run directory (results.json, recipe.yaml, metrics.jsonl)."""
    run = RunDir(Path(path))
    results = RunResults.read(run.path)
    return RunInfo(run.path, results, read_recipe_data(run) or {}, run.read_events())


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
        trials.append(Trial(t["name"], dict(t.get("setting", {})), load_run(done.path) if done else None))
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
            out.runs.append(load_run(done.path))
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


# ----------------------------------------------------------------------------- report


def runs_table(runs: Sequence[RunInfo]) -> tuple[list[str], list[list[str]]]:
    """Run, method, parameters, every valid/test metric, wall time, throughput."""
    mains = [r.main_metric for r in runs]
    main = max(set(mains), key=mains.count) if mains else ""
    columns = metric_columns([r.results for r in runs], main)
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


def loss_curves_of(run: RunInfo) -> dict[str, list[tuple[int, float]]]:
    """Each training loss term of ``metrics.jsonl`` against step, keyed by its panel title.

    A run that logs terms (``loss_<term>``: distillation, multistage) trains on their weighted sum:
    its ``loss`` is that objective, a panel of its own, never the one of a plain run's task loss.
    """
    weighted = bool(run.recipe.get("teacher")) or any(
        isinstance(k, str) and k.startswith("loss_") for e in run.events for k in e)
    out: dict[str, list[tuple[int, float]]] = {}
    for e in run.events:
        step = e.get("step")
        if not isinstance(step, (int, float)):
            continue
        for key, value in e.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if key == "loss":
                title = "training objective (weighted sum of terms)" if weighted else "training loss"
            elif key.startswith("loss_"):
                title = f"loss term: {key[len('loss_'):]}"
            else:
                continue
            out.setdefault(title, []).append((int(step), float(value)))
    return out


def curve_panels(runs: Sequence[RunInfo]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Panel title -> run label -> points: every loss term on its own panel, then the evaluation
    main metric (one panel per metric name)."""
    panels: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for r in runs:
        for title, pts in loss_curves_of(r).items():
            panels.setdefault(title, {})[r.label] = pts
    order = sorted(panels, key=lambda t: (not t.startswith("training"), t))
    panels = {t: panels[t] for t in order}
    for r in runs:
        ev = curves_of(r)["eval"]
        if ev:
            panels.setdefault(f"eval {r.main_metric}", {})[r.label] = ev
    return panels


def teacher_blocks(runs: Sequence[RunInfo]) -> list[Block]:
    """The teacher-vs-student table of every distilled run (as ``deltakd train`` prints it)."""
    blocks: list[Block] = []
    for r in runs:
        cells = teacher_student_rows(r.results)
        if cells is None:
            continue
        split, headers, rows, caption = cells
        blocks.append(Block("text", f"**{r.label}** on {split}: {caption}"))
        blocks.append(Block("table", headers=headers, rows=rows))
    if blocks:
        blocks.insert(0, Block("h2", "Teacher vs student"))
    return blocks


def report_blocks(data: Collected) -> list[Block]:
    runs = data.all_runs()
    if not runs:
        raise DeltakdError("report: no finished run among the paths given")
    blocks = [Block("h1", f"deltakd report: {len(runs)} run{'s' if len(runs) != 1 else ''}")]
    sources = [*(r.path for r in data.runs), *(s.path for s in data.sweeps)]
    blocks.append(Block("text", "Sources: " + ", ".join(f"`{p}`" for p in sources)))
    blocks.append(Block("h2", "Runs"))
    headers, rows = runs_table(runs)
    blocks.append(Block("table", headers=headers, rows=rows))
    blocks += teacher_blocks(runs)
    blocks.append(Block("h2", "Learning curves"))
    blocks.append(Block("image", text="learning curves", file="learning_curves.png",
                        png=learning_curves(curve_panels(runs))))
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


def build_report(paths: Iterable[str | Path], out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.md`` (with its PNGs beside it) and a self-contained ``report.html`` into ``out_dir``."""
    require_matplotlib("deltakd report")
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
