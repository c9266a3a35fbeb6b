"""Sweeps: grid expansion, one validated run per trial, resume/skip, summary over seeds, Ray backend."""

from __future__ import annotations

import csv
import importlib
import json
import os
import statistics
import sys
import types
from pathlib import Path

import pytest
import yaml

from deltakd import api
from deltakd.errors import DeltakdError
from deltakd.report.format import short_keys
from deltakd.runs import RunDir, find_resumable, new_run_dir
from deltakd.runs import RunResults
from deltakd.runs.lock import FolderLock, lock_holder
from deltakd.sweep import plan_sweep, trial_names

from .conftest import write_recipe

sweep_module = importlib.import_module("deltakd.sweep")  # `deltakd.sweep`, the attribute, is api.sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sweep_recipe(tmp_path: Path, model: Path | str, data: Path, grid: str, train: str = "", name: str = "tiny") -> Path:
    return write_recipe(tmp_path / f"{name}.yaml", f"""
name: {name}
description: tiny sweep
task: {{name: sst2, data_dir: {data}, resplit_valid: 0.2, max_length: 16}}
model: {{name: {model}}}
train: {{max_steps: 6, eval_every: 2, logging_steps: 1, batch_size: 16, eval_batch_size: 100, seed: 0{train}}}
track: []
output_dir: {tmp_path / 'runs'}
sweep: {grid}
""")


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from deltakd import cli

    monkeypatch.setattr(sys, "argv", ["deltakd", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def fake_train(calls: list):
    """Stands in for a trial's run (sweep.run_trial): a run directory with results made from the trial's lr and seed."""

    def train(recipe, family=None, resume=False):
        calls.append((recipe.name, resume))
        run = find_resumable(recipe.output_dir, recipe.name) if resume else new_run_dir(recipe.output_dir, recipe.name)
        if not resume:
            run.write_recipe(recipe)
        acc = round(0.5 + 10 * recipe.train.lr + recipe.train.seed / 100, 6)
        run.log_event({"step": 1, "loss": 0.7})
        run.log_event({"step": 2, "eval_loss": 0.6, "eval_accuracy": acc})
        results = {"name": recipe.name, "run_dir": str(run.path), "main_metric": "accuracy",
                   "metrics": {"valid": {"loss": 1 - acc, "accuracy": acc},
                               "test": {"loss": 1.1 - acc, "accuracy": acc - 0.1}},
                   "params": {"total": 100, "trainable": 10, "trainable_pct": 10.0},
                   "train_samples_per_second": 50.0, "wall_time_s": 3.0}
        run.write_results(RunResults.from_json(results))
        return results

    return train


def test_grid_expansion_names_and_normalised_values(tmp_path, toy_task):
    # YAML 1.1 reads 1e-3 as a string; the grid means the number, like a CLI override does
    recipe = sweep_recipe(tmp_path, "some/model", toy_task, "{train.lr: [1e-3, 2.0e-3], train.seed: [1, 2, 3]}")
    plan = plan_sweep(recipe)
    assert plan.sweep_dir == tmp_path / "runs" / "tiny-sweep"
    assert plan.grid == {"train.lr": [1e-3, 2e-3], "train.seed": [1, 2, 3]}
    assert [t.name for t in plan.trials] == [f"tiny--lr_{lr}--seed_{s}" for lr in ("0.001", "0.002") for s in (1, 2, 3)]
    for t in plan.trials:  # each trial: the recipe with the overrides applied, no sweep, its own name/output
        assert t.recipe.train.lr == t.setting["train.lr"] and t.recipe.train.seed == t.setting["train.seed"]
        assert t.recipe.sweep is None and t.recipe.name == t.name and t.recipe.output_dir == plan.sweep_dir
        assert t.recipe.train.max_steps == 6
    # a grid key on the command line replaces the recipe's; ordinary overrides apply to every trial
    plan = plan_sweep(recipe, ["sweep.train.seed=[7]", "train.max_steps=3"])
    assert [t.name for t in plan.trials] == ["tiny--lr_0.001--seed_7", "tiny--lr_0.002--seed_7"]
    assert {t.recipe.train.max_steps for t in plan.trials} == {3}
    # whole sections can be swept too
    plan = plan_sweep(recipe, ["sweep={peft: [{method: lora, r: 4}, {method: full}]}"])
    assert [t.name for t in plan.trials] == ["tiny--peft_method-lora-r-4", "tiny--peft_method-full"]
    assert [t.recipe.peft.method for t in plan.trials] == ["lora", "full"]
    # keys sharing a last part keep their full dotted name; colliding names get a hash
    assert short_keys(["train.seed", "task.k_shot.seed", "train.lr"]) == {
        "train.seed": "train.seed", "task.k_shot.seed": "task.k_shot.seed", "train.lr": "lr"}
    names = trial_names("t", [{"a": "x y"}, {"a": "x/y"}])
    assert len(set(names)) == 2 and all(n.startswith("t--a_x-y--") for n in names)


@pytest.mark.parametrize("grid, expected", [
    ("{train.lr: [1.0e-3, 2.0], train.seed: [1]}",
     "[sweep trial train.lr=2.0 train.seed=1]: train.lr: 2.0 is not allowed: Input should be less than 1"),
    ("{train.lrr: [1.0e-3]}", "unknown key 'train.lrr'"),
    ("{task.data_dir: [/no/such/folder]}", "task.data_dir: folder '/no/such/folder' does not exist"),
    ("{name: [a, b]}", "sweep: 'name' cannot be swept"),
    ("{train.lr: [1.0e-3, 0.001]}", "sweep.train.lr: value 0.001 is listed twice"),
    ("{train.lr: []}", "sweep.train.lr: [] is not allowed"),
    ("{}", "no sweep grid"),
])
def test_bad_grid_exits_2_before_any_trial(tmp_path, toy_task, monkeypatch, capsys, grid, expected):
    calls: list = []
    monkeypatch.setattr(sweep_module, "run_trial", fake_train(calls))
    code, _, err = run_cli(monkeypatch, capsys, "sweep", str(sweep_recipe(tmp_path, "some/model", toy_task, grid)))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert calls == [] and not (tmp_path / "runs").exists()


def test_ray_backend_without_ray_says_pip_install(tmp_path, toy_task, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, installed or not
    recipe = sweep_recipe(tmp_path, "some/model", toy_task, "{train.seed: [1, 2]}")
    code, _, err = run_cli(monkeypatch, capsys, "sweep", str(recipe), "--backend", "ray")
    assert code == 2 and "--backend ray needs ray: pip install 'deltakd[ray]'" in err
    assert not (tmp_path / "runs").exists()
    code, _, err = run_cli(monkeypatch, capsys, "sweep", str(recipe), "--backend", "slurm")
    assert code == 2 and "--backend: 'slurm' is not one of local, ray" in err


def test_ray_backend_sends_each_trial_as_a_remote_task(tmp_path, toy_task, monkeypatch):
    """The Ray path against a stand-in ``ray`` module (Ray is not installed here): one task per trial."""
    log: dict = {"options": None, "submitted": 0}

    class Ref:
        def __init__(self, fn, args):
            self.fn, self.args = fn, args

    class Remote:
        def __init__(self, fn):
            self.fn = fn

        def options(self, **kw):
            log["options"] = kw
            return self

        def remote(self, *args):
            log["submitted"] += 1
            return Ref(self.fn, args)

    fake = types.SimpleNamespace(is_initialized=lambda: False, init=lambda **kw: log.setdefault("init", kw),
                                 remote=Remote, wait=lambda refs, num_returns: (refs[:num_returns], refs[num_returns:]),
                                 get=lambda ref: ref.fn(*ref.args))
    monkeypatch.setitem(sys.modules, "ray", fake)
    calls: list = []
    monkeypatch.setattr(sweep_module, "run_trial", fake_train(calls))
    recipe = sweep_recipe(tmp_path, "some/model", toy_task, "{train.lr: [1.0e-3, 2.0e-3], train.seed: [1, 2]}")
    result = api.sweep(recipe, backend="ray", ray_address="auto", gpus_per_trial=1, progress=False)
    assert log["submitted"] == 4 and log["init"]["address"] == "auto"
    assert log["options"] == {"num_cpus": 1.0, "num_gpus": 1, "max_retries": 0}
    assert sorted(calls) == sorted((t.name, False) for t in result.trials)
    assert [s.n for s in result.summary.settings] == [2, 2]


def test_summary_resume_and_extension_with_a_stand_in_trainer(tmp_path, toy_task, monkeypatch):
    calls: list = []
    monkeypatch.setattr(sweep_module, "run_trial", fake_train(calls))
    recipe = sweep_recipe(tmp_path, "some/model", toy_task, "{train.lr: [1.0e-3, 2.0e-3], train.seed: [1, 2, 3]}")
    result = api.sweep(recipe, progress=False)
    assert len(calls) == 6 and {t.status for t in result.trials} == {"ran"}
    rows = read_csv(result.files["csv"])
    assert [r["train.lr"] for r in rows] == ["0.001", "0.002"]  # full dotted keys in the CSV
    for row, lr in zip(rows, (1e-3, 2e-3)):
        accs = [round(0.5 + 10 * lr + s / 100, 6) for s in (1, 2, 3)]
        assert row["n"] == "3" and row["seeds"] == "1 2 3"
        assert float(row["valid_accuracy_mean"]) == pytest.approx(statistics.mean(accs), abs=1e-12)
        assert float(row["valid_accuracy_std"]) == pytest.approx(statistics.stdev(accs), abs=1e-12)  # n-1
        assert float(row["test_accuracy_mean"]) == pytest.approx(statistics.mean(accs) - 0.1, abs=1e-12)
        assert float(row["test_loss_std"]) == pytest.approx(statistics.stdev(accs), abs=1e-12)
    assert [r["best"] for r in rows] == ["", "yes"]  # higher valid accuracy
    # an interrupted trial (no results.json) is resumed, finished ones are skipped
    unfinished = next((result.sweep_dir / "tiny--lr_0.001--seed_2").iterdir())
    (unfinished / "results.json").unlink()
    calls.clear()
    result = api.sweep(recipe, progress=False)
    assert calls == [("tiny--lr_0.001--seed_2", True)]
    assert [t.status for t in result.trials].count("resumed") == 1
    assert len(list((result.sweep_dir / "tiny--lr_0.001--seed_2").iterdir())) == 1  # same run dir, resumed
    # a longer grid runs only the new trials; a changed recipe is refused, not mixed in
    calls.clear()
    result = api.sweep(recipe, ["sweep.train.lr=[1.0e-3, 2.0e-3, 3.0e-3]"], progress=False)
    assert sorted(calls) == [(f"tiny--lr_0.003--seed_{s}", False) for s in (1, 2, 3)]
    assert [r["best"] for r in read_csv(result.files["csv"])] == ["", "", "yes"]
    with pytest.raises(DeltakdError, match=r"trial 'tiny--lr_0.001--seed_1' already has a run .* \(differs at "
                                           r"train.max_steps\)"):
        api.sweep(recipe, ["train.max_steps=5"], progress=False)


def test_a_second_sweep_of_the_same_folder_refuses_with_one_line(tmp_path, toy_task, monkeypatch, capsys):
    calls: list = []
    held: list = []
    trainer = fake_train(calls)

    def train(recipe, family=None, resume=False):
        held.append(lock_holder(recipe.output_dir))  # the sweep folder, while a trial trains
        return trainer(recipe, family, resume)

    monkeypatch.setattr(sweep_module, "run_trial", train)
    recipe = sweep_recipe(tmp_path, "some/model", toy_task, "{train.seed: [1, 2]}")
    sweep_dir = tmp_path / "runs" / "tiny-sweep"
    with FolderLock(sweep_dir, "sweep"):  # another sweep of the same folder is running
        code, _, err = run_cli(monkeypatch, capsys, "sweep", str(recipe))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: sweep '{sweep_dir}' is in use by another process (pid {os.getpid()}); ")
    assert calls == [] and not (sweep_dir / "sweep.json").exists()
    # once free, the sweep runs, holds its folder while the trials train, and lets go at the end
    result = api.sweep(recipe, progress=False)
    assert len(calls) == 2 and held == [os.getpid()] * 2 and {t.status for t in result.trials} == {"ran"}
    assert lock_holder(sweep_dir) is None


def test_single_seed_and_lower_is_better(tmp_path, toy_task, monkeypatch):
    """Without train.seed in the grid n=1 and std is blank; losses rank lowest-first."""
    from deltakd.report.compare import load_run
    from deltakd.report.sweep_stats import Trial, summarize

    calls: list = []
    monkeypatch.setattr(sweep_module, "run_trial", fake_train(calls))
    result = api.sweep(sweep_recipe(tmp_path, "some/model", toy_task, "{train.lr: [1.0e-3, 2.0e-3]}"), progress=False)
    rows = read_csv(result.files["csv"])
    assert [r["n"] for r in rows] == ["1", "1"] and {r["valid_accuracy_std"] for r in rows} == {""}
    trials = []
    for t in result.trials:
        run = load_run(t.run_dir)
        run.results["main_metric"] = "loss"
        trials.append(Trial(t.name, t.setting, run))
    best = [s.setting["train.lr"] for s in summarize("x", trials).settings if s.best]
    assert best == [2e-3]  # valid loss 1 - acc is lowest where accuracy is highest


def test_real_tiny_sweep_through_the_cli_then_rerun_skips(tmp_path, tiny_bert, toy_task, monkeypatch, capsys):
    """A 2x2 grid of tiny BERT runs trained for real; the summary matches the runs' results.json."""
    recipe = sweep_recipe(tmp_path, tiny_bert, toy_task, "{train.lr: [5.0e-3, 2.0e-2], train.seed: [1, 2]}")
    code, out, err = run_cli(monkeypatch, capsys, "sweep", str(recipe), "train.max_steps=12", "train.eval_every=6")
    assert code == 0, err[-3000:]
    sweep_dir = tmp_path / "runs" / "tiny-sweep"
    names = [f"tiny--lr_{lr}--seed_{s}" for lr in ("0.005", "0.02") for s in (1, 2)]
    assert "4/4 trials done" in err and "4 trial(s) run, 0 finished before" in out
    results = {}
    for name in names:
        (run_path,) = list((sweep_dir / name).iterdir())
        run = RunDir(run_path)
        results[name] = json.loads(run.results_file.read_text())
        saved = yaml.safe_load(run.recipe_file.read_text())
        assert saved["name"] == name and saved["sweep"] is None
        assert (saved["train"]["lr"], saved["train"]["seed"]) == (float(name.split("_")[1].split("--")[0]),
                                                                 int(name[-1]))
        assert results[name]["train_steps"] == 12
    rows = read_csv(sweep_dir / "summary.csv")
    assert [r["train.lr"] for r in rows] == ["0.005", "0.02"]
    for row, lr in zip(rows, ("0.005", "0.02")):
        for split in ("valid", "test"):
            for metric in ("accuracy", "loss"):
                vals = [results[f"tiny--lr_{lr}--seed_{s}"]["metrics"][split][metric] for s in (1, 2)]
                assert float(row[f"{split}_{metric}_mean"]) == pytest.approx(statistics.mean(vals), abs=1e-12)
                assert float(row[f"{split}_{metric}_std"]) == pytest.approx(statistics.stdev(vals), abs=1e-12)
    # best: highest mean valid accuracy, ties to the lower mean valid loss
    key = [(float(r["valid_accuracy_mean"]), -float(r["valid_loss_mean"])) for r in rows]
    assert [r["best"] for r in rows] == (["yes", ""] if key[0] >= key[1] else ["", "yes"])
    md = (sweep_dir / "summary.md").read_text()
    assert "| lr | n | valid accuracy |" in md and "Best setting (highest mean valid accuracy): lr=" in md
    assert "![tiny](summary.png)" in md and (sweep_dir / "summary.png").read_bytes().startswith(PNG_MAGIC)
    manifest = json.loads((sweep_dir / "sweep.json").read_text())
    assert [t["name"] for t in manifest["trials"]] == names and all(t["finished"] for t in manifest["trials"])

    # rerun: every trial finished, nothing trains, no run directory changes
    before = {p: p.stat().st_mtime_ns for p in sweep_dir.rglob("results.json")}
    calls: list = []
    monkeypatch.setattr(sweep_module, "run_trial", fake_train(calls))
    code, out, err = run_cli(monkeypatch, capsys, "sweep", str(recipe), "train.max_steps=12", "train.eval_every=6")
    assert code == 0 and calls == [] and "0 trial(s) run, 4 finished before" in out
    assert {p: p.stat().st_mtime_ns for p in sweep_dir.rglob("results.json")} == before

    # the report reads the real sweep: its runs, curves and summary chart
    code, out, err = run_cli(monkeypatch, capsys, "report", str(sweep_dir), "--out", str(tmp_path / "rep"))
    assert code == 0, err
    html = (tmp_path / "rep" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2  # learning curves + the sweep's bar chart
    for name in names:
        assert f"<td>{name}</td>" in html
