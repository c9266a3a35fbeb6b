from __future__ import annotations

from pathlib import Path

import pytest

from deltakd import api
from deltakd.errors import DeltakdError
from deltakd.trackers import check_trackers

from .test_train import tiny_recipe


def test_missing_tracker_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(DeltakdError, match="track: 'wandb' is not installed; pip install wandb"):
        check_trackers(["tensorboard", "wandb"])
    check_trackers(["tensorboard"])


def test_mlflow_local_file_store(tmp_path, tiny_bert, toy_task, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = tiny_recipe(tmp_path, tiny_bert, toy_task, train=", max_steps: 4")
    results = api.train(recipe, ["track=[tensorboard, mlflow]"])
    assert Path(results["run_dir"]).is_dir()
    store = tmp_path / "runs" / "mlruns"
    metrics = [p.name for p in store.rglob("metrics/*")]
    assert "eval_accuracy" in metrics or "train_loss" in metrics, sorted(store.rglob("*"))[:20]
