"""Run directories: layout, resolved recipe with provenance, metrics log, results, resume."""

from .rundir import (RunDir, find_resumable, latest_run, load_run_recipe, new_run_dir)

__all__ = ["RunDir", "find_resumable", "latest_run", "load_run_recipe", "new_run_dir"]
