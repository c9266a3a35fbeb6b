"""Experiment trackers through the Trainer's ``report_to``; TensorBoard writes into the run dir."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from transformers.integrations import TensorBoardCallback

from .errors import DeltakdError

# tracker -> (module that must import, pip package to suggest)
_NEEDS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
    "neptune": ("neptune", "neptune"),
}


def check_trackers(names: list[str]) -> None:
    """Fail before any work when a requested tracker is not installed."""
    for name in names:
        module, package = _NEEDS[name]
        if importlib.util.find_spec(module) is None:
            raise DeltakdError(f"track: '{name}' is not installed; pip install {package} (or remove it from track)")


def tracker_callbacks(names: list[str], run_dir: Path, output_dir: Path) -> tuple[list[str], list]:
    """(report_to names for the Trainer, extra callbacks). TensorBoard logs go to ``run_dir/tensorboard``."""
    report_to = [n for n in names if n != "tensorboard"]
    callbacks = []
    if "tensorboard" in names:
        callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run_dir / "tensorboard"))))
    if "mlflow" in names and not os.environ.get("MLFLOW_TRACKING_URI"):
        # a local file store beside the runs: `mlflow ui --backend-store-uri runs/mlruns`
        os.environ["MLFLOW_TRACKING_URI"] = (Path(output_dir).resolve() / "mlruns").as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks to opt in to file stores
    return report_to, callbacks
