"""Experiment trackers of a run: one stream per run in each tracker, from the first training step
to the final metrics, the recipe and ``results.json``.

``RunTrackers(recipe, run_dir)`` gives the Trainer its callbacks (``callbacks``) and the
``report_to`` names the Trainer handles itself (wandb); ``finish(results, files)`` logs what the
lifecycle measures after training (the final metrics, TensorBoard hparams, the artifacts) and
closes every stream. Its callbacks stay open past ``on_train_end``: the Trainer's own
TensorBoard and MLflow callbacks close there, so the final ``trainer.evaluate`` used to reopen a
second TensorBoard folder (``checkpoints/runs/...``) and a second MLflow run without parameters.

- TensorBoard: one writer on ``<run>/tensorboard`` (main process); tags ``train/...``,
  ``eval/...``, ``valid/...``, ``test/...``; hparams = the flattened recipe + the final metrics.
- MLflow (through ``MlflowClient``, no global active run): experiment = recipe name, run name =
  ``<name>/<stamp>`` (a resumed run continues its MLflow run), params = the flattened recipe,
  artifacts = ``recipe.yaml`` and ``results.json``. Store: ``MLFLOW_TRACKING_URI``, else a file
  store beside the runs (``mlflow ui --backend-store-uri runs/mlruns``).
- Neptune (``neptune_run``): recipe ``track_options.neptune`` (project, tags, name).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import DeltakdError, install_hint
from .common import final_metrics
from .mlflow_run import MLflowRun, mlflow_uri
from .neptune_run import NeptuneRun
from .tensorboard_run import TensorBoardRun

# tracker -> module that must import (tensorboard is a core dependency; the others are extras)
_NEEDS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "neptune": "neptune"}


def check_trackers(names: list[str]) -> None:
    """Fail before any work when a requested tracker is not installed (one line naming the extra)."""
    for name in names:
        module = _NEEDS[name]
        if importlib.util.find_spec(module) is None:
            how = "pip install tensorboard" if module == "tensorboard" else install_hint(module)
            raise DeltakdError(f"track: '{name}' is not installed; {how} (or remove it from track)")


def flat_params(data: Mapping[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """A recipe dict as dotted keys -> scalars (lists as JSON, None as "null"): tracker parameters."""
    out: dict[str, str | int | float | bool] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flat_params(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value, default=str)
    return out


class RunTrackers:
    """The trackers of one run (see the module docstring)."""

    def __init__(self, recipe: Any, run_dir: Path) -> None:
        run_dir = Path(run_dir)
        names = list(recipe.track)
        self.run_name = f"{run_dir.parent.name}/{run_dir.name}"
        self.params = flat_params(recipe.model_dump(mode="json"))
        self.report_to = [n for n in names if n not in ("tensorboard", "mlflow", "neptune")]
        self.tensorboard = TensorBoardRun(run_dir / "tensorboard") if "tensorboard" in names else None
        self.mlflow = (MLflowRun(mlflow_uri(recipe.output_dir), recipe.name, self.run_name, self.params)
                       if "mlflow" in names else None)
        options = getattr(getattr(recipe, "track_options", None), "neptune", None)
        self.neptune = NeptuneRun(options, self.run_name, self.params) if "neptune" in names else None
        self.callbacks = [c for c in (self.tensorboard, self.mlflow, self.neptune) if c is not None]

    def finish(self, results: Mapping[str, Any] | None, files: Iterable[Path] = ()) -> None:
        """After ``results.json``: log the final metrics (those the final evaluation did not log
        already), TensorBoard hparams and the artifacts ``files``; close every stream."""
        if results is None:  # not the main process
            return
        final, files = final_metrics(results), list(files)
        if self.tensorboard is not None:
            self.tensorboard.finish(self.params, final)
        if self.mlflow is not None:
            self.mlflow.finish(final, files)
        if self.neptune is not None:
            self.neptune.finish(final, files)
