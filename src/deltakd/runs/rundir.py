"""The run directory of DESIGN.md and the files in it.

```
runs/<name>/<YYYYmmdd-HHMMSS>/
  recipe.yaml  metrics.jsonl  results.json  checkpoints/{checkpoint-N,best,last}  model/  tensorboard/  plots/
```
``checkpoints/best`` and ``checkpoints/last`` name real ``checkpoint-<step>`` folders (relative symlinks,
or small pointer files where symlinks fail): read them through :meth:`RunDir.checkpoint`.
A run is finished exactly when ``results.json`` exists; it is written last, atomically.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import DeltakdError
from ..recipe import Recipe, dump_recipe, validate
from ..utils import atomic_write_json, atomic_write_text, follow_link, git_commit, package_versions, warning
from .results import RunResults

_NOTED_OUTSIDE: set[Path] = set()  # one note per output folder per process (a sweep makes many runs)

PROVENANCE_KEY = "provenance"


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def recipe_file(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def results_file(self) -> Path:
        return self.path / "results.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, name: str) -> Path | None:
        """The checkpoint folder ``checkpoints/<name>`` stands for (``best``, ``last`` or ``checkpoint-N``;
        a symlink or pointer file followed), or None."""
        return follow_link(self.checkpoints / name)

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tensorboard"

    @property
    def plots_dir(self) -> Path:
        return self.path / "plots"

    @property
    def finished(self) -> bool:
        return self.results_file.is_file()

    def write_recipe(self, recipe: Recipe) -> None:
        data = dump_recipe(recipe)
        data[PROVENANCE_KEY] = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "git_commit": git_commit(),
            "versions": package_versions(),
        }
        atomic_write_text(self.recipe_file, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))

    def log_event(self, event: dict[str, Any]) -> None:
        with open(self.metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")

    def read_events(self) -> list[dict[str, Any]]:
        """The metrics log; a line cut by a kill mid-write is skipped."""
        if not self.metrics_file.is_file():
            return []
        events = []
        for line in self.metrics_file.read_text(encoding="utf-8").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return events

    def truncate_events(self, after_step: int) -> None:
        """Drop events logged after ``after_step`` (a resumed run logs them again)."""
        kept = [e for e in self.read_events() if e.get("step", 0) <= after_step]
        atomic_write_text(self.metrics_file, "".join(json.dumps(e) + "\n" for e in kept))

    def write_results(self, results: RunResults) -> None:
        """Written last and atomically: its presence marks the run finished."""
        atomic_write_json(self.results_file, results.to_json())

    def read_results(self) -> RunResults:
        if not self.finished:
            raise DeltakdError(f"run '{self.path}' has not finished (no results.json); resume it with --resume")
        return RunResults.read(self.results_file)


def _note_outside_cwd(output_dir: Path) -> None:
    """One note line when runs go to a folder outside the current directory (not an error)."""
    where, cwd = output_dir.expanduser().resolve(), Path.cwd().resolve()
    if where.is_relative_to(cwd) or where in _NOTED_OUTSIDE:
        return
    _NOTED_OUTSIDE.add(where)
    warning(__name__, f"note: output_dir {where} is outside the current directory {cwd}; runs go there")


def new_run_dir(output_dir: Path, name: str) -> RunDir:
    """A new, empty ``<output_dir>/<name>/<stamp>[-n]`` folder, never one another process made.

    Safe under concurrent callers: ``mkdir`` without ``exist_ok`` claims a name atomically; a name
    taken meanwhile moves on to the next suffix.
    """
    base = Path(output_dir) / name
    _note_outside_cwd(Path(output_dir))
    base.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while True:
        path = base / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            n += 1
            continue
        return RunDir(path)


def runs_of(output_dir: Path, name: str) -> list[RunDir]:
    base = Path(output_dir) / name
    if not base.is_dir():
        return []
    return [RunDir(p) for p in sorted(base.iterdir()) if (p / "recipe.yaml").is_file()]


def finished_runs(folder: str | Path) -> list[RunDir]:
    """The finished runs directly under ``folder`` (a ``runs/<name>`` folder), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [RunDir(p) for p in sorted(folder.iterdir()) if p.is_dir() and (p / "results.json").is_file()]


def newest_finished(folder: str | Path) -> RunDir | None:
    """The newest finished run under a ``runs/<name>`` folder, or None: the one answer to "which run
    of this name counts" for reports, sweeps, ``teacher.run``, ``init_from`` and dialogue bases."""
    runs = finished_runs(folder)
    return runs[-1] if runs else None


def latest_run(output_dir: Path, name: str) -> RunDir | None:
    runs = runs_of(output_dir, name)
    return runs[-1] if runs else None


def find_resumable(output_dir: Path, name: str) -> RunDir | None:
    """The newest run of ``name`` that did not finish."""
    for run in reversed(runs_of(output_dir, name)):
        if not run.finished:
            return run
    return None


def read_recipe_data(run: RunDir) -> dict[str, Any] | None:
    """A run's ``recipe.yaml`` as a dict (provenance dropped), or None when missing or unreadable."""
    try:
        data = yaml.safe_load(run.recipe_file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(data, dict):
        return None
    data.pop(PROVENANCE_KEY, None)
    return data


def load_run_recipe(run_dir: Path | RunDir) -> Recipe:
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(Path(run_dir))
    if not run.recipe_file.is_file():
        raise DeltakdError(f"'{run.path}' is not a deltakd run directory (no recipe.yaml)")
    data = yaml.safe_load(run.recipe_file.read_text())
    data.pop(PROVENANCE_KEY, None)
    return validate(data, source=str(run.recipe_file), check_files=False)
