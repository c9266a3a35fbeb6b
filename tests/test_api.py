"""The Python API from the package: light import, the names, recipes as path / dict / object, label names."""

from __future__ import annotations

import subprocess
import sys

import pytest

from deltakd.errors import DeltakdError

from .conftest import write_recipe, write_toy_task


def test_import_deltakd_is_light_and_names_the_api_functions():
    code = "import sys, deltakd; print('torch' in sys.modules, deltakd.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "0.1.0"]

    import deltakd
    from deltakd import api, evaluate, load_trained, predict, report, sweep, train

    assert (train, evaluate, sweep, report, predict, load_trained) == \
        (api.train, api.evaluate, api.sweep, api.report, api.predict, api.load_trained)
    import deltakd.evaluate.metrics  # noqa: F401  importing the modules of the same names changes nothing
    import deltakd.report.compare  # noqa: F401
    import deltakd.sweep  # noqa: F401

    assert deltakd.sweep is api.sweep and deltakd.report is api.report and deltakd.evaluate is api.evaluate
    assert sys.modules["deltakd.sweep"].run_sweep is not None and "push" in dir(deltakd)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        deltakd.nothing  # noqa: B018


def _data(tmp_path, **task) -> dict:
    return {"name": "r", "task": {"name": "sst2", "data_dir": str(write_toy_task(tmp_path / "toy")), **task},
            "model": {"name": "minilm-l6"}, "train": {"lr": 1e-3}, "output_dir": str(tmp_path / "runs")}


def test_recipe_as_path_dict_or_object_validated_alike(tmp_path):
    from deltakd import api
    from deltakd.recipe import Recipe

    data = _data(tmp_path)
    path = write_recipe(tmp_path / "r.yaml", __import__("yaml").safe_dump(data))
    from_path, fam = api.resolve_recipe(path, ["train.lr=2e-3"])
    from_dict, _ = api.resolve_recipe(data, ["train.lr=2e-3"])
    from_obj, _ = api.resolve_recipe(from_dict)
    assert isinstance(from_obj, Recipe) and fam.name == "classification"
    assert from_path.model_dump() == from_dict.model_dump() == from_obj.model_dump()
    assert from_dict.train.lr == 2e-3
    with pytest.raises(DeltakdError, match="lr"):
        api.resolve_recipe({**data, "train": {"lr": "fast"}})
    bad = from_dict.model_copy()
    object.__setattr__(bad, "name", "bad name!")  # an invalid object is validated too
    with pytest.raises(DeltakdError, match="name"):
        api.resolve_recipe(bad)
    with pytest.raises(DeltakdError, match="hub.repo"):
        api.resolve_recipe({**data, "hub": {"repo": "no-owner"}})


def test_label_names_from_preset_and_recipe(tmp_path):
    from deltakd import api
    from deltakd.data import load_task

    preset, _ = api.resolve_recipe(_data(tmp_path))
    assert load_task(preset.task, 0).label_names == ("negative", "positive")
    custom, _ = api.resolve_recipe(_data(tmp_path, name="toy", text_columns=["sentence"], label_column="label",
                                         label_names={0: "bad", 1: "good"}))  # YAML-style number keys
    task = load_task(custom.task, 0)
    assert task.labels == ("0", "1") and task.label_names == ("bad", "good")
    plain, _ = api.resolve_recipe(_data(tmp_path, name="toy", text_columns=["sentence"], label_column="label"))
    assert load_task(plain.task, 0).label_names == ("0", "1")
    wrong, _ = api.resolve_recipe(_data(tmp_path, label_names={"2": "maybe"}))
    with pytest.raises(DeltakdError, match=r"task.label_names: \['2'\] are not labels of this task"):
        load_task(wrong.task, 0)
    same, _ = api.resolve_recipe(_data(tmp_path, label_names={"0": "x", "1": "x"}))
    with pytest.raises(DeltakdError, match="same name"):
        load_task(same.task, 0)


def test_teacher_head_check_accepts_unnamed_and_task_names():
    from types import SimpleNamespace

    from deltakd.classify.family import check_teacher_head
    from deltakd.models.delta import Head

    head = Head(2, ("0", "1"), names=("negative", "positive"))
    for names in (("0", "1"), ("LABEL_0", "LABEL_1"), ("negative", "positive")):
        check_teacher_head(SimpleNamespace(num_labels=2, id2label=dict(enumerate(names))), head)
    with pytest.raises(DeltakdError, match=r"teacher: labels \['positive', 'negative'\], the task has"):
        check_teacher_head(SimpleNamespace(num_labels=2, id2label={0: "positive", 1: "negative"}), head)
