"""MLflow: one run per deltakd run, through ``MlflowClient`` (no global active run)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Iterable

from .common import StreamCallback


def _key(name: str) -> str:
    """A parameter or metric name as MLflow accepts it (other characters become ``_``)."""
    return re.sub(r"[^0-9A-Za-z_\-. :/]", "_", name)


def mlflow_uri(output_dir: Path) -> str:
    """``MLFLOW_TRACKING_URI``, else a local file store beside the runs."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return (Path(output_dir).resolve() / "mlruns").as_uri()


class MLflowRun(StreamCallback):
    """One MLflow run per deltakd run: created (or, on resume, found by name) at the first step."""

    def __init__(self, uri: str, experiment: str, run_name: str, params: dict[str, Any]) -> None:
        self.uri, self.experiment, self.run_name, self.params = uri, experiment, run_name, params
        self.client: Any = None
        self.run_id: str | None = None
        self.keys: set[str] = set()
        self.step = 0

    def _start(self) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        if "://" not in self.uri or self.uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks to opt in to file stores
        self.client = client = MlflowClient(tracking_uri=self.uri)
        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            try:
                exp_id = client.create_experiment(self.experiment)
            except Exception:  # created meanwhile by a parallel sweep trial
                exp_id = client.get_experiment_by_name(self.experiment).experiment_id
        else:
            exp_id = exp.experiment_id
        found = client.search_runs([exp_id], filter_string=f"attributes.run_name = '{self.run_name}'", max_results=1)
        if found:  # --resume continues its run
            self.run_id = found[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = client.create_run(exp_id, run_name=self.run_name).info.run_id
            params = [Param(_key(k), str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in self.params.items()]
            for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
                client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS_TAGS_PER_BATCH])

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_key(k), v, now, step)
                   for k, v in values.items()]
        self.keys.update(values)
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    @property
    def started(self) -> bool:
        return self.run_id is not None

    def finish(self, final: dict[str, float], files: Iterable[Path]) -> None:
        if self.run_id is None:
            return
        self.log({k: v for k, v in final.items() if k not in self.keys}, self.step)
        for f in files:
            if Path(f).is_file():
                self.client.log_artifact(self.run_id, str(f))
        self.client.set_terminated(self.run_id, "FINISHED")
        self.run_id = None

    def abort(self, interrupted: bool) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, "KILLED" if interrupted else "FAILED")
            self.run_id = None
