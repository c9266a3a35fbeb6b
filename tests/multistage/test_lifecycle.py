"""Multistage stages on the shared run lifecycle: sweeps, trackers, --resume and torchrun, as for
every other family."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deltakd import api
from deltakd.runs import RunResults

from ..conftest import ROOT
from .test_run import STAGES, teacher_dir, tiny, world  # noqa: F401, F811 - the module fixtures

MSE = STAGES / "mse.yaml"


def test_a_stage_sweeps_two_grid_points_then_skips_them(world, tmp_path):
    sets = [*tiny(world, MSE, tmp_path / "runs"), "sweep.train.lr=[1.0e-3,1.0e-4]"]
    res = api.sweep(MSE, sets, progress=False)
    assert [o.status for o in res.trials] == ["ran", "ran"]
    assert len({o.run_dir.parent for o in res.trials}) == 2, "one run directory per trial"
    results = [RunResults.read(o.run_dir) for o in res.trials]
    assert [r.family for r in results] == ["multistage", "multistage"]
    assert all(r["tested"] and "avg/acc" in r.metrics["heldout"] for r in results)
    assert [r.train_steps for r in results] == [24, 24]
    # the learning rate reached each trial: ten times the rate moves the student further
    assert results[0]["train_loss"] != pytest.approx(results[1]["train_loss"], rel=1e-3)
    assert len(res.summary.settings) == 2 and sum(s.best for s in res.summary.settings) == 1
    assert res.summary.main_metric == "avg/sts_spearman" and (res.sweep_dir / "summary.md").is_file()
    again = api.sweep(MSE, sets, progress=False)
    assert [o.status for o in again.trials] == ["skipped", "skipped"]
    assert [o.run_dir for o in again.trials] == [o.run_dir for o in res.trials]


def test_a_stage_logs_to_trackers_and_resumes_with_train_resume(world, tmp_path, monkeypatch):
    import deltakd.runner.lifecycle as lifecycle

    runs = tmp_path / "runs"
    sets = [*tiny(world, MSE, runs), "train.eval_every=8", "train.save_total_limit=3", "track=[tensorboard]"]
    real = lifecycle.keep_best_and_last

    def crash(*a, **k):
        raise RuntimeError("killed after training")

    monkeypatch.setattr(lifecycle, "keep_best_and_last", crash)
    with pytest.raises(RuntimeError):
        api.train(MSE, sets)
    monkeypatch.setattr(lifecycle, "keep_best_and_last", real)
    [run_dir] = list((runs / "mse").iterdir())
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents*")), "the tracker wrote events"
    (run_dir / "checkpoints" / "checkpoint-24" / "trainer_state.json").unlink()  # as if killed mid-save
    results = api.train(MSE, sets, resume=True)
    assert Path(results.run_dir) == run_dir
    assert results.resumed_from == "checkpoint-16" and results.train_steps == 24 and results["tested"]
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk["family"] == "multistage" and on_disk["resumed_from"] == "checkpoint-16"
    with pytest.raises(Exception, match="no unfinished run of 'mse'"):
        api.train(MSE, sets, resume=True)


def test_a_stage_sweep_under_torchrun_two_processes(world, tmp_path):
    runs = tmp_path / "runs"
    sets = [*tiny(world, MSE, runs), "sweep.train.lr=[1.0e-3,1.0e-4]"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "-m", "deltakd.cli", "sweep", str(MSE), *sets],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    sweep_dir = runs / "mse-sweep"
    trials = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert len(trials) == 2
    for trial in trials:
        [run_dir] = list(trial.iterdir())  # the two processes share one run directory per trial
        results = RunResults.read(run_dir)
        # 80 pairs minus 8 held out: 72 training pairs; 24 steps of 8 per process
        assert results.family == "multistage" and results.train_steps == 24 and results["tested"]
        assert (run_dir / "model" / "config.json").is_file()
    assert json.loads((sweep_dir / "sweep.json").read_text())["trials"][0]["finished"]
