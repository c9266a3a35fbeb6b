from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import pytest

from deltakd import api
from deltakd.errors import DeltakdError
from deltakd.recipe.load import load_recipe
from deltakd.trackers import RunTrackers, check_trackers, flat_params

from .test_train import tiny_recipe


def test_missing_tracker_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(DeltakdError, match=r"track: 'wandb' is not installed; pip install 'deltakd\[wandb\]'"):
        check_trackers(["tensorboard", "wandb"])
    check_trackers(["tensorboard"])


def test_flat_params_dotted_scalars():
    assert flat_params({"train": {"lr": 0.1, "seed": 3}, "track": ["tensorboard"], "teacher": None, "x": {}}) == {
        "train.lr": 0.1, "train.seed": 3, "track": '["tensorboard"]', "teacher": "null", "x": "{}"}


def _tb_runs(root: Path) -> list[Path]:
    """Every folder under ``root`` that holds a TensorBoard event file."""
    return sorted({p.parent for p in root.rglob("events.out.tfevents.*")})


def test_one_stream_per_run_in_tensorboard_and_mlflow(tmp_path, tiny_bert, toy_task, monkeypatch):
    """Issue 20: the training curves, the final valid/test metrics, the recipe as parameters and the
    run's files land in ONE MLflow run (experiment = recipe name, run name = <name>/<stamp>) and in ONE
    TensorBoard folder (<run>/tensorboard, with hparams)."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = tiny_recipe(tmp_path, tiny_bert, toy_task, train=", max_steps: 6, eval_every: 3, logging_steps: 2")
    results = api.train(recipe, ["track=[tensorboard, mlflow]"])
    run_dir = Path(results["run_dir"])

    # --- MLflow: one run, named after the run folder, in the recipe's experiment ---
    client = MlflowClient((tmp_path / "runs" / "mlruns").as_uri())
    exps = {e.name: e for e in client.search_experiments()}
    assert "tiny" in exps
    everything = client.search_runs([e.experiment_id for e in exps.values()])
    assert len(everything) == 1, [(r.info.run_name, r.info.experiment_id) for r in everything]
    mrun = everything[0]
    assert mrun.info.experiment_id == exps["tiny"].experiment_id
    assert mrun.info.run_name == f"tiny/{run_dir.name}"
    assert mrun.info.status == "FINISHED"
    assert mrun.data.params["train.max_steps"] == "6"
    assert mrun.data.params["model.name"] == str(tiny_bert)
    assert mrun.data.params["name"] == "tiny"
    m = mrun.data.metrics
    assert m["test_accuracy"] == pytest.approx(results["metrics"]["test"]["accuracy"])
    assert m["valid_accuracy"] == pytest.approx(results["metrics"]["valid"]["accuracy"])
    assert "loss" in m and "eval_accuracy" in m  # the training curves in the same run
    assert len(client.get_metric_history(mrun.info.run_id, "eval_accuracy")) == 2  # steps 3 and 6
    assert sorted(a.path for a in client.list_artifacts(mrun.info.run_id)) == ["recipe.yaml", "results.json"]
    local = Path(client.download_artifacts(mrun.info.run_id, "results.json", str(tmp_path / "dl")))
    assert json.loads(local.read_text())["metrics"] == results["metrics"]

    # --- TensorBoard: one log folder, the run's, with train, eval and final metrics and hparams ---
    assert _tb_runs(tmp_path) == [run_dir / "tensorboard"]
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert {"train/loss", "eval/accuracy", "valid/accuracy", "test/accuracy"} <= set(scalars)
    assert acc.Scalars("test/accuracy")[-1].value == pytest.approx(results["metrics"]["test"]["accuracy"])
    content = acc.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = session.session_start_info.hparams
    assert hp["train.max_steps"].number_value == 6 and hp["name"].string_value == "tiny"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {"test/accuracy", "valid/accuracy"} <= {mi.name.tag for mi in experiment.metric_infos}


def _fake_neptune(monkeypatch) -> dict:
    """A ``neptune`` module that records init_run's arguments and what the run is given."""
    record: dict = {"init": None, "values": {}, "series": {}, "uploads": {}, "stopped": False}

    class Field:
        def __init__(self, key):
            self.key = key

        def append(self, value, step=None):
            record["series"].setdefault(self.key, []).append((step, value))

        def upload(self, path):
            record["uploads"][self.key] = Path(path).read_text()

    class Run:
        def __getitem__(self, key):
            return Field(key)

        def __setitem__(self, key, value):
            record["values"][key] = value

        def stop(self):
            record["stopped"] = True

    def init_run(**kwargs):
        record["init"] = kwargs
        return Run()

    module = types.ModuleType("neptune")
    module.__spec__ = importlib.machinery.ModuleSpec("neptune", None)
    module.init_run = init_run
    monkeypatch.setitem(sys.modules, "neptune", module)
    return record


def test_neptune_gets_the_recipe_project_tags_and_name(tmp_path, tiny_bert, toy_task, monkeypatch):
    """Issue 22: track_options.neptune reaches neptune.init_run; metrics and files reach the run."""
    record = _fake_neptune(monkeypatch)
    recipe = tiny_recipe(tmp_path, tiny_bert, toy_task, train=", max_steps: 4, eval_every: 2, logging_steps: 2")
    results = api.train(recipe, ["track=[neptune]", "track_options.neptune.project=team/deltakd",
                                 "track_options.neptune.tags=[lora, kd]", "track_options.neptune.name=full-ft"])
    assert record["init"] == {"project": "team/deltakd", "tags": ["lora", "kd"], "name": "full-ft"}
    assert record["values"]["parameters"]["train.max_steps"] == 4
    assert [s for s, _ in record["series"]["metrics/eval_accuracy"]] == [2, 4]
    assert record["values"]["final/test_accuracy"] == pytest.approx(results["metrics"]["test"]["accuracy"])
    assert json.loads(record["uploads"]["artifacts/results.json"])["metrics"] == results["metrics"]
    assert "artifacts/recipe.yaml" in record["uploads"] and record["stopped"]
    assert not (Path(results["run_dir"]) / "tensorboard").exists()


def test_neptune_run_name_defaults_to_the_run_folder(tmp_path, tiny_bert, toy_task, monkeypatch):
    from transformers import TrainerControl, TrainerState

    record = _fake_neptune(monkeypatch)
    recipe = load_recipe(tiny_recipe(tmp_path, tiny_bert, toy_task), ["track=[neptune]"])
    trackers = RunTrackers(recipe, tmp_path / "runs" / "tiny" / "20250101-000000")
    (callback,) = trackers.callbacks
    state = TrainerState(global_step=7)
    callback.on_log(None, state, TrainerControl(), logs={"loss": 0.5, "epoch": 1.0, "note": "x"})
    assert record["init"] == {"name": "tiny/20250101-000000", "tags": []}
    assert record["series"] == {"metrics/loss": [(7, 0.5)], "metrics/epoch": [(7, 1.0)]}
    trackers.finish({"metrics": {"test": {"accuracy": 0.75}}}, [tmp_path / "missing.json"])
    assert record["values"]["final/test_accuracy"] == 0.75 and record["uploads"] == {} and record["stopped"]


def test_track_options_for_an_unlisted_tracker_are_refused(tmp_path, tiny_bert, toy_task):
    recipe = tiny_recipe(tmp_path, tiny_bert, toy_task)
    with pytest.raises(DeltakdError, match=r"track_options.neptune: given but 'neptune' is not in track"):
        load_recipe(recipe, ["track_options.neptune.tags=[a]"])
    with pytest.raises(DeltakdError, match="track_options.neptune.project"):
        load_recipe(recipe, ["track=[neptune]", "track_options.neptune.project=noslash"])


def test_a_resumed_run_continues_its_mlflow_run(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from transformers import TrainerControl, TrainerState

    from deltakd.trackers.mlflow_run import MLflowRun

    uri = (tmp_path / "mlruns").as_uri()
    params = {"train.lr": 0.1, "distill.layer_map.pairs.0[1]": 2}
    first = MLflowRun(uri, "exp", "exp/20250101-000000", params)
    first.on_log(None, TrainerState(global_step=2), TrainerControl(), logs={"loss": 0.9})
    again = MLflowRun(uri, "exp", "exp/20250101-000000", params)  # --resume: a new process, the same run
    again.on_log(None, TrainerState(global_step=4), TrainerControl(), logs={"loss": 0.5})
    assert again.run_id == first.run_id
    again.finish({"test_accuracy": 0.7}, [])
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert run.info.run_id == first.run_id and run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(2, 0.9), (4, 0.5)]
    assert run.data.params == {"train.lr": "0.1", "distill.layer_map.pairs.0_1_": "2"}
    assert run.data.metrics["test_accuracy"] == 0.7
