"""``deltakd sweep``: run a recipe's grid (``sweep: {dotted.key: [values...]}``) as a cartesian product.

Each trial is the recipe with the grid's values applied as dotted overrides (the same machinery
as ``deltakd train RECIPE key=value``), ``sweep`` removed, and a name made from its setting::
    <output_dir>/<name>-sweep/
      sweep.json                              the grid and the trials (name, setting, run directory)
      <name>--lr_1e-05--seed_1/<stamp>/       an ordinary run directory per trial
      ...
      summary.csv  summary.md  summary.png    mean ± std over seeds per setting, best setting, bar chart

Trial names use ``key_value`` (recipe names allow only letters, digits, ``_ . -``); a key is
its last dotted part unless two grid keys share it. Every trial is validated before the first one
runs, so a bad grid value stops the sweep with one line (exit code 2) and nothing written.
Rerunning a sweep skips trials whose newest run finished and resumes unfinished ones from
their last checkpoint; adding values to the grid runs only the new trials. A sweep holds the lock
of its folder (``runs.lock``) while it runs: a second sweep of the same folder stops with one line.

``backend="ray"`` sends the trials to a Ray cluster as ``ray.remote`` tasks (one task per
trial, ``ray.wait`` collects them); the workers need deltakd installed and the recipe's paths
(data, ``output_dir``) on storage they share.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from rich.console import Console
from rich.progress_bar import ProgressBar
from rich.table import Table

from . import families
from .errors import DeltakdError, MissingExtraError, optional_import
from .recipe import apply_overrides, load_raw
from .recipe.load import parse_override
from .report.compare import SWEEP_MANIFEST, load_run
from .report.format import fmt_value, short_keys
from .report.sweep_stats import SEED_KEY, SweepSummary, Trial, summarize, summary_chart, summary_csv, summary_markdown
from .runner import Family, lifecycle
from .runs import RunDir, RunResults, latest_run, newest_finished, read_recipe_data
from .runs.lock import FolderLock
from .trackers import check_trackers
from .utils import atomic_write_bytes, atomic_write_json, atomic_write_text, warning

BACKENDS = ("local", "ray")
_NOT_SWEEPABLE = ("name", "output_dir", "sweep", "extends")
_MAX_NAME = 150


@dataclass(frozen=True)
class TrialSpec:
    """One point of the grid, validated: its run name, setting, overrides and recipe."""

    name: str
    setting: dict[str, Any]
    overrides: tuple[str, ...]
    recipe: Any  # the family's recipe model
    family: Family


@dataclass
class SweepPlan:
    name: str
    source: str
    sweep_dir: Path
    grid: dict[str, list[Any]]
    trials: list[TrialSpec]


@dataclass
class TrialOutcome:
    name: str
    setting: dict[str, Any]
    status: str  # "skipped" (finished before), "ran", "resumed"
    run_dir: Path | None


@dataclass
class SweepResult:
    sweep_dir: Path
    trials: list[TrialOutcome]
    summary: SweepSummary
    files: dict[str, Path] = field(default_factory=dict)


# ----------------------------------------------------------------------------- planning


def _override(key: str, value: Any) -> str:
    """A grid value as a dotted override ``key=value`` (JSON is YAML, so parse_override reads it back)."""
    return f"{key}={json.dumps(value, default=str, ensure_ascii=False)}"


def _normalise(key: str, value: Any) -> Any:
    """The value as the override machinery reads it (YAML 1.1 leaves ``1e-5`` a string; we mean a number)."""
    return parse_override(_override(key, value))[1]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


def trial_names(base: str, settings: list[dict[str, Any]]) -> list[str]:
    """``<base>--lr_1e-05--seed_1`` per setting; unique (a short hash is added where two would collide)."""
    if not settings:
        return []
    keys = short_keys(list(settings[0]))
    names = []
    for s in settings:
        name = "--".join([base, *(f"{_slug(keys[k])}_{_slug(fmt_value(v))}" for k, v in s.items())])
        names.append(name)
    clashes = {n for n in names if names.count(n) > 1}
    for i, (name, s) in enumerate(zip(list(names), settings)):
        if len(name) > _MAX_NAME or name in clashes:
            digest = hashlib.sha256(json.dumps(s, sort_keys=True, default=str).encode()).hexdigest()[:8]
            names[i] = f"{name[:_MAX_NAME]}--{digest}"
    return names


def _split_overrides(overrides: Iterable[str]) -> tuple[list[str], dict[str, list[Any]]]:
    """``sweep.train.lr=[1e-5,2e-5]`` on the command line sets one grid key; the rest are ordinary overrides."""
    plain, grid = [], {}
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if key.startswith("sweep.") and "=" in text:
            _, value = parse_override(text)
            grid[key.removeprefix("sweep.")] = value if isinstance(value, list) else [value]
        else:
            plain.append(text)
    return plain, grid


def plan_sweep(recipe: str | Path | Any, overrides: Iterable[str] = ()) -> SweepPlan:
    """Expand the grid into validated trials (of any family). Raises DeltakdError (one line) on any bad key or value."""
    plain, cli_grid = _split_overrides(overrides)
    if isinstance(recipe, (str, Path)):
        data, source = load_raw(recipe), str(recipe)
    else:
        data, source = families.family_of(recipe).dump(recipe), f"recipe '{recipe.name}'"
    data = apply_overrides(data, plain)
    if cli_grid:
        data["sweep"] = {**(data.get("sweep") or {}), **cli_grid}
    fam = families.family_of(data)
    base = fam.validate(data, source=source)
    if not base.sweep:
        raise DeltakdError(f"{source}: no sweep grid; add e.g. 'sweep: {{train.lr: [1.0e-5, 2.0e-5]}}' to the "
                           "recipe or pass sweep.train.lr=[1e-5,2e-5]")
    grid: dict[str, list[Any]] = {}
    for key, values in base.sweep.items():
        if key.split(".", 1)[0] in _NOT_SWEEPABLE:
            raise DeltakdError(f"{source}: sweep: '{key}' cannot be swept (it names the trials' runs)")
        normalised = [_normalise(key, v) for v in values]
        seen: list[Any] = []
        for v in normalised:
            if v in seen:
                raise DeltakdError(f"{source}: sweep.{key}: value {fmt_value(v)} is listed twice")
            seen.append(v)
        grid[key] = normalised
    settings = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    names = trial_names(base.name, settings)
    sweep_dir = Path(base.output_dir) / f"{base.name}-sweep"
    data.pop("sweep", None)
    trials = []
    for name, setting in zip(names, settings):
        ovr = tuple(_override(k, v) for k, v in setting.items())
        trial_data = apply_overrides(data, ovr)
        trial_data.update(name=name, output_dir=str(sweep_dir), sweep=None)
        trial_recipe = fam.validate(trial_data, source=f"{source} [sweep trial {' '.join(ovr)}]")
        trials.append(TrialSpec(name, setting, ovr, trial_recipe, fam))
    return SweepPlan(base.name, source, sweep_dir, grid, trials)


# ----------------------------------------------------------------------------- running


def _state(spec: TrialSpec) -> tuple[str, RunDir | None]:
    """'done' (newest run finished), 'resume' (newest run unfinished) or 'new'; a run made from a
    different recipe is an error rather than silently mixed into the summary."""
    run = latest_run(spec.recipe.output_dir, spec.name)
    if run is None:
        return "new", None
    changed = spec.family.differences(read_recipe_data(run), spec.recipe)
    if changed:
        raise DeltakdError(f"sweep: trial '{spec.name}' already has a run '{run.path}' made from a different "
                           f"recipe (differs at {', '.join(changed)}); remove it or use another output_dir")
    return ("done" if run.finished else "resume"), run


def _ray():
    return optional_import("ray", "--backend ray")  # optional dependency: only the ray backend needs it


def run_trial(recipe: Any, family: Family, resume: bool) -> RunResults | None:
    """One trial: the run lifecycle of the recipe's family (the same as ``deltakd train``)."""
    return lifecycle.run(recipe, family, resume=resume)


def _train_remote(recipe_data: dict[str, Any], resume: bool) -> str:
    """A trial on a Ray worker: the same lifecycle as the local backend; returns the run dir."""
    fam = families.family_of(recipe_data)
    results = run_trial(fam.validate(recipe_data, source="sweep trial", check_files=False), fam, resume)
    return results["run_dir"] if results is not None else ""


def _run_ray(todo: list[tuple[TrialSpec, bool]], on_done: Callable[[TrialSpec], None], address: str | None,
             cpus_per_trial: float, gpus_per_trial: float) -> None:
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True)
    task = ray.remote(_train_remote).options(num_cpus=cpus_per_trial, num_gpus=gpus_per_trial, max_retries=0)
    pending = {task.remote(spec.family.dump(spec.recipe), resume): spec for spec, resume in todo}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            spec = pending.pop(ref)
            ray.get(ref)  # a failed trial raises here
            on_done(spec)


class _Progress:
    """A rich progress line per trial boundary (no live display: the Trainer's own bars stay readable)."""

    def __init__(self, name: str, total: int, console: Console | None):
        self.name, self.total, self.done, self.console = name, total, 0, console

    def show(self, note: str) -> None:
        if self.console is None:
            return
        row = Table.grid(padding=(0, 1))
        row.add_row(f"[bold]sweep {self.name}[/bold]", ProgressBar(total=self.total, completed=self.done, width=30),
                    f"{self.done}/{self.total} trials done", note)
        self.console.print(row)


def run_sweep(recipe: str | Path | Any, overrides: Iterable[str] = (), backend: str = "local",
              ray_address: str | None = None, cpus_per_trial: float = 1.0, gpus_per_trial: float = 0.0,
              console: Console | None = None, progress: bool = True) -> SweepResult:
    """Run every trial of the grid not yet finished, then write the summary. See the module docstring."""
    if backend not in BACKENDS:
        raise DeltakdError(f"--backend: '{backend}' is not one of {', '.join(BACKENDS)}")
    if backend == "ray":
        _ray()  # fail before anything is written
    plan = plan_sweep(recipe, overrides)
    for spec in plan.trials:
        check_trackers(spec.recipe.track)
    main = os.environ.get("RANK", "0") in ("", "0")  # under torchrun only the main process writes and locks
    lock = FolderLock(plan.sweep_dir, "sweep").acquire() if main else None  # a second sweep of it: one line
    try:
        return _run_plan(plan, backend, ray_address, cpus_per_trial, gpus_per_trial, console, progress)
    finally:
        if lock is not None:
            lock.release()


def _run_plan(plan: SweepPlan, backend: str, ray_address: str | None, cpus_per_trial: float, gpus_per_trial: float,
              console: Console | None, progress: bool) -> SweepResult:
    states = {spec.name: _state(spec) for spec in plan.trials}
    _write_manifest(plan, states)
    bar = _Progress(plan.name, len(plan.trials), (console or Console(stderr=True)) if progress else None)
    bar.done = sum(1 for s, _ in states.values() if s == "done")
    todo = [(spec, states[spec.name][0] == "resume") for spec in plan.trials if states[spec.name][0] != "done"]
    bar.show(f"({bar.done} finished before, {len(todo)} to run in {plan.sweep_dir})")

    def finished(spec: TrialSpec) -> None:
        bar.done += 1
        bar.show(spec.name)

    if backend == "ray":
        _run_ray(todo, finished, ray_address, cpus_per_trial, gpus_per_trial)
    else:
        for spec, resume in todo:
            bar.show(f"{'resuming' if resume else 'running'} {spec.name}")
            run_trial(spec.recipe, spec.family, resume)
            finished(spec)
    ran = {spec.name: ("resumed" if resume else "ran") for spec, resume in todo}
    return _finish(plan, ran)


def _finish(plan: SweepPlan, ran: dict[str, str]) -> SweepResult:
    trials, outcomes = [], []
    for spec in plan.trials:
        done = newest_finished(plan.sweep_dir / spec.name)
        trials.append(Trial(spec.name, spec.setting, load_run(done.path) if done else None))
        outcomes.append(TrialOutcome(spec.name, spec.setting, ran.get(spec.name, "skipped"), done.path if done else None))
    summary = summarize(plan.name, trials)
    files = write_summary(plan.sweep_dir, summary, plan.grid)
    _write_manifest(plan, {o.name: ("done" if o.run_dir else "new", RunDir(o.run_dir) if o.run_dir else None)
                           for o in outcomes})
    return SweepResult(plan.sweep_dir, outcomes, summary, files)


def _write_manifest(plan: SweepPlan, states: dict[str, tuple[str, RunDir | None]]) -> None:
    if os.environ.get("RANK", "0") not in ("", "0"):
        return  # under torchrun only the main process writes
    atomic_write_json(plan.sweep_dir / SWEEP_MANIFEST, {
        "name": plan.name,
        "recipe": plan.source,
        "grid": plan.grid,
        "seed_key": SEED_KEY,
        "trials": [{"name": t.name, "setting": t.setting, "overrides": list(t.overrides),
                    "run_dir": str(states[t.name][1].path) if states[t.name][1] else None,
                    "finished": states[t.name][0] == "done"} for t in plan.trials],
    })


def write_summary(sweep_dir: Path, summary: SweepSummary, grid: dict[str, list[Any]] | None = None) -> dict[str, Path]:
    """``summary.csv``, ``summary.md`` and ``summary.png`` in ``sweep_dir`` (each written atomically)."""
    files = {"csv": sweep_dir / "summary.csv", "markdown": sweep_dir / "summary.md"}
    if os.environ.get("RANK", "0") not in ("", "0"):
        return {}  # under torchrun only the main process writes
    atomic_write_text(files["csv"], summary_csv(summary))
    chart = bool(summary.settings)
    if chart:
        try:
            png = summary_chart(summary)
        except MissingExtraError as e:  # the tables still count; the chart needs the report extra
            warning(__name__, f"sweep: no summary.png: {e}")
            chart = False
        else:
            files["png"] = sweep_dir / "summary.png"
            atomic_write_bytes(files["png"], png)
    atomic_write_text(files["markdown"], summary_markdown(summary, grid, chart="summary.png" if chart else None))
    return files
