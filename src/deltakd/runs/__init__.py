"""Run directories: layout, resolved recipe with provenance, metrics log, typed results, resume."""

from .results import RunResults
from .rundir import (RunDir, find_resumable, finished_runs, latest_run, load_run_recipe, new_run_dir, newest_finished,
                     read_recipe_data)

__all__ = ["RunDir", "RunResults", "find_resumable", "finished_runs", "latest_run", "load_run_recipe", "new_run_dir",
           "newest_finished", "read_recipe_data"]
