"""The command line as a user meets it: exit codes, one-line errors, nothing half-written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deltakd import __version__

from .conftest import ROOT
from .test_train import tiny_recipe

DELTAKD = [sys.executable, "-m", "deltakd.cli"]


def cli(*args: str, cwd: Path = ROOT, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*DELTAKD, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, **kw)


def test_version_and_recipes_listing():
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"deltakd {__version__}"
    out = cli("recipes", "recipes")
    assert out.returncode == 0
    assert "recipes/quickstart.yaml" in out.stdout and "MiniLM-L6 + LoRA" in out.stdout


@pytest.mark.parametrize("problem, override, expected", [
    ("unknown key", "train.lrr=1", "unknown key 'train.lrr'"),
    ("wrong type", "train.epochs=many", "train.epochs: 'many' is not allowed"),
    ("bad value", "peft.method=lorra", "peft.method: 'lorra' is not a known method"),
    ("missing folder", "task.data_dir=/no/such/folder", "task.data_dir: folder '/no/such/folder' does not exist"),
    ("missing file", "task.train_file=missing.tsv", "missing.tsv' does not exist"),
    ("bad model path", "model.name=./no/model/here", "model './no/model/here': path does not exist"),
    ("hub id offline", "model.name=someone/unknown-model", "not found locally and the hub is offline"),
    ("tracker not installed", "track=[neptune]", "track: 'neptune' is not installed; pip install 'deltakd[neptune]'"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, tiny_bert, toy_task, problem, override,
                                                            expected, capsys, monkeypatch):
    from deltakd import cli as cli_module

    recipe = tiny_recipe(tmp_path, tiny_bert, toy_task)
    monkeypatch.setattr(sys, "argv", ["deltakd", "train", str(recipe), override])
    with pytest.raises(SystemExit) as e:
        cli_module.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert not (tmp_path / "runs").exists()


def test_bad_recipe_in_a_real_process(tmp_path, tiny_bert, toy_task):
    out = cli("train", str(tiny_recipe(tmp_path, tiny_bert, toy_task)), "train.batch_size=0")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'tiny.yaml'}: train.batch_size: 0 is not allowed: Input should be greater than 0")
    assert not (tmp_path / "runs").exists()


def test_malformed_data_row_exits_2_naming_file_and_line(tmp_path, tiny_bert, toy_task):
    with open(toy_task / "train.tsv", "a") as f:
        f.write("a fine film\tpositive\n")
    out = cli("train", str(tiny_recipe(tmp_path, tiny_bert, toy_task)))
    assert out.returncode == 2
    assert "train.tsv line 402: label 'positive' is not in the label set ['0', '1']" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_eval_of_a_missing_run_dir_and_resume_without_a_run(tmp_path, tiny_bert, toy_task):
    out = cli("eval", str(tmp_path / "nope"))
    assert out.returncode == 2 and "is not a deltakd run directory" in out.stderr
    out = cli("train", str(tiny_recipe(tmp_path, tiny_bert, toy_task)), "--resume")
    assert out.returncode == 2 and "--resume: no unfinished run of 'tiny'" in out.stderr


def _results(tmp_path: Path) -> dict:
    import json

    found = list((tmp_path / "runs" / "tiny").glob("*/results.json"))
    assert len(found) == 1
    return json.loads(found[0].read_text())


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, tiny_bert, toy_task):
    train = ", epochs: 2, batch_size: 8, eval_every: 10, save_total_limit: 3, lr: 1.0e-3"
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    ref_dir.mkdir(), cut_dir.mkdir()
    # the uninterrupted reference
    out = cli("train", str(tiny_recipe(ref_dir, tiny_bert, toy_task, train=train)))
    assert out.returncode == 0, out.stderr[-2000:]
    reference = _results(ref_dir)
    # the same recipe, killed with SIGKILL as soon as a checkpoint exists (40 steps per epoch)
    recipe = tiny_recipe(cut_dir, tiny_bert, toy_task, train=train)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([*DELTAKD, "train", str(recipe)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((cut_dir / "runs").glob("tiny/*/checkpoints/checkpoint-20")):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run_dirs = list((cut_dir / "runs" / "tiny").iterdir())
    assert len(run_dirs) == 1 and not (run_dirs[0] / "results.json").exists(), "killed before finishing"
    steps = sorted(int(p.name.split("-")[1]) for p in (run_dirs[0] / "checkpoints").glob("checkpoint-*"))
    assert steps and steps[-1] < 40, f"killed mid-epoch 1, checkpoints at {steps}"
    out = cli("eval", str(run_dirs[0]))
    assert out.returncode == 2 and "no model/" in out.stderr  # an unfinished run is not passed off as a result
    out = cli("train", str(recipe), "--resume")
    assert out.returncode == 0, out.stderr[-2000:]
    resumed = _results(cut_dir)
    # the newest checkpoint may have been cut mid-write; then the one before it is used
    assert resumed["resumed_from"] in {f"checkpoint-{s}" for s in steps}
    assert resumed["train_steps"] == reference["train_steps"] == 80
    for split in ("valid", "test"):
        for k, v in reference["metrics"][split].items():
            assert resumed["metrics"][split][k] == pytest.approx(v, abs=1e-6), (split, k)
    # metrics.jsonl has no duplicated steps after the resume
    import json

    events = [json.loads(x) for x in (run_dirs[0] / "metrics.jsonl").read_text().splitlines()]
    eval_steps = [e["step"] for e in events if "eval_loss" in e]
    assert eval_steps == sorted(set(eval_steps))


def test_eval_cli_prints_metrics_of_a_finished_run(tmp_path, tiny_bert, toy_task):
    out = cli("train", str(tiny_recipe(tmp_path, tiny_bert, toy_task, train=", max_steps: 5")))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "accuracy" in out.stdout and "trainable" in out.stdout
    run = next((tmp_path / "runs" / "tiny").iterdir())
    res = _results(tmp_path)
    out = cli("eval", str(run), "--split", "test")
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"{res['metrics']['test']['accuracy']:.4f}" in out.stdout
    out = cli("eval", str(run), "--split", "bogus")
    assert out.returncode == 2 and "--split: 'bogus' not in this task; available: train, valid, test" in out.stderr


@pytest.mark.parametrize("command", ["train", "sweep", "pipeline", "transfer"])
def test_binary_recipe_file_is_one_line_exit_2(tmp_path, command, capsys, monkeypatch):
    from deltakd import cli as cli_module

    recipe = tmp_path / "model.yaml"
    recipe.write_bytes(b"name: x\n\x00\x01\xff\xfe\x89PNG")
    monkeypatch.setattr(sys, "argv", ["deltakd", command, str(recipe)])
    with pytest.raises(SystemExit) as e:
        cli_module.main()
    assert e.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines == [f"error: {recipe}: not a YAML recipe: byte 0xff at offset 10 is not UTF-8 text"]


def test_recipes_listing_skips_over_a_binary_yaml(tmp_path):
    from deltakd import api

    (tmp_path / "bad.yaml").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "list.yaml").write_text("- a\n", encoding="utf-8")
    (tmp_path / "ok.yaml").write_text("description: fine\n", encoding="utf-8")
    assert api.list_recipes(tmp_path) == [(str(tmp_path / "bad.yaml"), ""), (str(tmp_path / "list.yaml"), ""),
                                          (str(tmp_path / "ok.yaml"), "fine")]
