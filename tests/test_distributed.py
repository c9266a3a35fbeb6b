"""The same recipe under torchrun with two CPU processes (gloo), through the Trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT
from .test_train import tiny_recipe


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path, tiny_bert, toy_task):
    recipe = tiny_recipe(tmp_path, tiny_bert, toy_task, train="")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "-m", "deltakd.cli", "train", str(recipe)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = list((tmp_path / "runs" / "tiny").iterdir())
    assert len(runs) == 1, "both processes share one run directory"
    results = json.loads((runs[0] / "results.json").read_text())
    # 320 training examples, 16 per process and step, 2 processes -> 10 steps per epoch (20 on one process), 6 epochs
    assert results["train_steps"] == 6 * 10
    assert results["metrics"]["test"]["accuracy"] >= 0.9
    assert (runs[0] / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_torchrun_resume_takes_the_lock_on_rank_0_and_continues_the_run(tmp_path, tiny_bert, toy_task):
    """An interrupted two-process run (its last checkpoints, model/ and results.json removed) resumes
    under torchrun in the same folder from the newest remaining checkpoint (rank 0 claims and locks
    the folder, rank 1 follows); after the run the lock is free and a further --resume is refused."""
    import shutil

    from deltakd.runs.lock import lock_holder

    recipe = tiny_recipe(tmp_path, tiny_bert, toy_task,
                         train=", max_steps: 12, eval_every: 4, keep_checkpoints: all")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def torchrun(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "-m", "deltakd.cli", "train", str(recipe), *extra],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)

    first = torchrun()
    assert first.returncode == 0, first.stderr[-3000:]
    run = next((tmp_path / "runs" / "tiny").iterdir())
    reference = json.loads((run / "results.json").read_text())
    # as if killed after step 4: later checkpoints, the links, model/ and results.json gone
    for p in (run / "checkpoints").iterdir():
        if p.name != "checkpoint-4":
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    shutil.rmtree(run / "model")
    (run / "results.json").unlink()
    (run / "model_card.md").unlink(missing_ok=True)

    resumed = torchrun("--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [p.name for p in (tmp_path / "runs" / "tiny").iterdir()] == [run.name]  # the same folder
    results = json.loads((run / "results.json").read_text())
    assert results["resumed_from"] == "checkpoint-4" and results["train_steps"] == 12
    assert results["metrics"]["test"]["accuracy"] == pytest.approx(reference["metrics"]["test"]["accuracy"], abs=0.05)
    assert lock_holder(run) is None  # released by rank 0
    again = torchrun("--resume")  # a finished run is never trained again
    assert again.returncode != 0 and "--resume: no unfinished run of 'tiny'" in again.stderr  # torchrun exits 1
    assert json.loads((run / "results.json").read_text()) == results
