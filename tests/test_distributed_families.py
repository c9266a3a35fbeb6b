"""Every family under torchrun with two CPU processes (gloo): classification KD with the cached and
with the live teacher (bf16, the teacher replicated in half precision on each process), causal-LM
KD and a dialogue run. Each checks that only the main process wrote the run directory (one run
folder, one results.json, each logged step once), that the teacher cache was built once (one entry,
one process ran the build) and that the result is sensible (finite loss, the steps of two processes).

Each rank's output goes to its own log file (``torchrun --log-dir --redirects 3``), so a test can
tell which process did what. All slow: two processes start, import torch and train.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deltakd import api

from .conftest import ROOT, write_recipe
from .test_train import tiny_recipe

pytestmark = pytest.mark.slow


def torchrun(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict[int, str]]:
    """``deltakd ARGS`` under torchrun, 2 CPU processes; the result and each rank's output (stdout + stderr)."""
    logs = tmp_path / "torchrun-logs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "DELTAKD_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--log-dir", str(logs), "--redirects", "3", "-m", "deltakd.cli", *args],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    ranks: dict[int, str] = {}
    for rank in (0, 1):
        files = sorted(logs.glob(f"*/attempt_*/{rank}/std*.log"))
        ranks[rank] = "".join(f.read_text(errors="replace") for f in files)
    assert out.returncode == 0, (out.stderr[-2000:], ranks[0][-3000:], ranks[1][-3000:])
    return out, ranks


def only_main_wrote(runs: Path) -> dict:
    """One run folder with one results.json; each training step logged once (not by both processes)."""
    (run,) = [p for p in runs.iterdir() if not p.name.startswith(".")]
    assert [p.name for p in run.glob("results*.json")] == ["results.json"]
    results = json.loads((run / "results.json").read_text())
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in events if "loss" in e and "eval_loss" not in e and "train_runtime" not in e]
    assert steps and len(steps) == len(set(steps)), steps
    assert all(math.isfinite(e["loss"]) for e in events if "loss" in e)
    assert (run / "model").is_dir()
    return results


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, tiny_bert) -> dict:
    """A fine-tuned tiny BERT teacher (one process), for the students under torchrun."""
    from .conftest import write_toy_task

    tmp = tmp_path_factory.mktemp("dist-teacher")
    write_toy_task(tmp / "toy")
    return api.train(tiny_recipe(tmp, tiny_bert, tmp / "toy", name="teacher", train=", max_steps: 40"))


def _student(tmp_path: Path, teacher: dict, name: str, distill: str, train: str = "") -> Path:
    toy = Path(teacher["run_dir"]).parents[2] / "toy"
    return write_recipe(tmp_path / f"{name}.yaml", f"""
name: {name}
task: {{name: sst2, data_dir: {toy}, resplit_valid: 0.2, max_length: 16}}
teacher: {{run: {teacher['run_dir']}}}
student: {{from_teacher: {{layers: [1]}}}}
peft: {{method: full}}
distill: {distill}
train: {{epochs: 1, lr: 5.0e-3, batch_size: 16, seed: 5, logging_steps: 2{train}}}
track: []
output_dir: {tmp_path / 'runs'}
""")


def test_classification_kd_with_the_cached_teacher_builds_the_cache_once(tmp_path, teacher_run):
    recipe = _student(tmp_path, teacher_run, "cached", "{losses: {ce: 0.5, kd: 0.5}, cache_teacher: true}")
    _, ranks = torchrun(tmp_path, "train", str(recipe))
    results = only_main_wrote(tmp_path / "runs" / "cached")
    # 320 examples, 16 per process and step, 2 processes: 10 steps (20 on one process)
    assert results["train_steps"] == 10
    assert results["distill"]["teacher_cache"] and results["distill"]["teacher_forwards"] == 0
    assert math.isfinite(results["metrics"]["test"]["loss"]) and 0 <= results["metrics"]["test"]["accuracy"] <= 1
    # the teacher's comparison ran on every process (under torchrun its evaluation is distributed)
    assert 0 <= results["distill"]["teacher_metrics"]["test"]["accuracy"] <= 1
    entries = [p for p in (tmp_path / "cache" / "teacher").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and json.loads((entries[0] / "meta.json").read_text())["examples"] == 320
    built = [r for r, text in ranks.items() if "caching teacher outputs" in text]
    assert built == [0]  # the main process built it; the other loaded it


def test_classification_kd_with_the_live_teacher_in_bf16(tmp_path, teacher_run):
    recipe = _student(tmp_path, teacher_run, "live", "{losses: {ce: 0.4, kd: 0.4, hidden_mse: 0.2}, cache_teacher: false}",
                      train=", bf16: force")
    _, ranks = torchrun(tmp_path, "train", str(recipe))
    results = only_main_wrote(tmp_path / "runs" / "live")
    assert results["train_steps"] == 10
    # the main process's teacher ran every step: a replica per process, no cache
    assert results["distill"]["teacher_forwards"] == 10 and not results["distill"]["teacher_cache"]
    assert not (tmp_path / "cache" / "teacher").exists()
    assert not any("caching teacher outputs" in text for text in ranks.values())
    assert math.isfinite(results["metrics"]["test"]["loss"])


def test_causal_lm_kd(tmp_path):
    from .test_partial_kd import _base, _text

    base = _base(tmp_path, _text(tmp_path))
    api.train(write_recipe(tmp_path / "t.yaml", base.replace("epochs: 3", "epochs: 1") + """
name: t
model: {config: {model_type: gpt2, n_layer: 4, n_embd: 32, n_head: 2, n_positions: 32}, vocab_size: 300}
"""))
    recipe = write_recipe(tmp_path / "kd.yaml", base.replace("epochs: 3", "epochs: 1") + f"""
name: kd
teacher: {{run: {tmp_path / 'runs' / 't'}}}
student: {{from_teacher: {{nb_layers: 2}}}}
distill: {{losses: {{ce: 0.5, kd: 0.5}}}}
""")
    torchrun(tmp_path, "train", str(recipe))
    results = only_main_wrote(tmp_path / "runs" / "kd")
    blocks = results["examples"]["train"]
    assert results["train_steps"] == math.ceil(blocks / (8 * 2))  # batch 8 per process, 2 processes, 1 epoch
    assert math.isfinite(results["metrics"]["test"]["loss"]) and results["metrics"]["test"]["perplexity"] < 300


def test_dialogue_lora(tmp_path):
    from .dialogue.test_e2e import GPT, _common, _task

    api.train(write_recipe(tmp_path / "pre.yaml", f"""
name: pre
{_task('lm')}
model: {{config: {GPT}, vocab_size: 400}}
train: {{max_steps: 6, lr: 1.0e-2, batch_size: 16, eval_batch_size: 32, seed: 1, logging_steps: 2}}
{_common(tmp_path)}"""))
    recipe = write_recipe(tmp_path / "lora.yaml", f"""
name: lora
{_task('dialogue')}
model: {{name: {tmp_path / 'runs' / 'pre'}}}
peft: {{method: lora, r: 4, alpha: 8, dropout: 0.0, target: [c_attn]}}
train: {{epochs: 1, lr: 2.0e-2, batch_size: 8, eval_batch_size: 32, seed: 1, logging_steps: 2}}
{_common(tmp_path)}""")
    torchrun(tmp_path, "train", str(recipe))
    results = only_main_wrote(tmp_path / "runs" / "lora")
    assert results["train_steps"] == math.ceil(results["examples"]["train"] / (8 * 2))
    assert math.isfinite(results["metrics"]["test"]["loss"])


def test_transfer_target_runs(tmp_path, tiny_bert):
    """``deltakd transfer`` under torchrun over a finished library (built in one process): every target
    run trains on both processes, the main process writes each run, the manifest and the tables."""
    import yaml

    from deltakd.transfer.library import build_module
    from deltakd.transfer.recipe import load_transfer_recipe

    from .transfer.test_e2e import _recipe

    data = _recipe(tmp_path, tiny_bert)
    spec = data["transfer"]
    spec["library"]["grid"] = {"lr": [2e-2], "batch_size": [16]}
    spec["target"]["seeds"] = [1]
    spec["estimate"]["estimators"] = ["cosine"]
    spec["fusion"] = {"factor_baseline": False}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    recipe = load_transfer_recipe(path)
    for source in spec["sources"]:
        build_module(recipe, source, progress=False)
    torchrun(tmp_path, "transfer", str(path))
    out = tmp_path / "out" / "tiny-transfer"
    manifest = json.loads((out / "runs.json").read_text())
    assert sorted(manifest) == sorted(f"pos--{s}--s1" for s in ("random", "uniform", "best_single", "cosine"))
    for name, entry in manifest.items():
        results = only_main_wrote(Path(entry["run_dir"]).parent)
        assert results["name"] == name and results["train_steps"] == 4
        assert math.isfinite(results["metrics"]["test"]["loss"])
    assert (out / "results.md").is_file() and len(list((out / "estimates").iterdir())) == 1
