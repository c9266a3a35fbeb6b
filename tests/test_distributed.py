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
