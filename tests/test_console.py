"""The console: compact Trainer lines, expected load reports and library bars left out unless
``--verbose``, titles and paths unbroken at 80 columns, an end line saying where the run went."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
from pathlib import Path

import pytest
from rich.console import Console

from deltakd import console as run_console

from .conftest import ROOT
from .test_cli import DELTAKD
from .test_train import tiny_recipe

COMPACT = re.compile(r"^step \d+/\d+  epoch \d+\.\d\d  loss \d\.\d{4}  grad_norm \S+  lr \d\.\d\de-\d\d$", re.M)


def cli(*args: str) -> subprocess.CompletedProcess:
    """The CLI in a process of its own, its warnings not silenced (test_cli's ``cli`` ignores them)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", run_console.VERBOSE_ENV)}
    return subprocess.run([*DELTAKD, *args], cwd=ROOT, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                          text=True, timeout=600)


def test_log_lines_are_compact_and_numbers_are_numbers():
    assert run_console.log_line({"loss": 0.68861, "grad_norm": 0.13812, "learning_rate": 3.4512e-4, "epoch": 0.064},
                                40, 1875) == "step 40/1875  epoch 0.06  loss 0.6886  grad_norm 0.1381  lr 3.45e-04"
    assert run_console.log_line({"eval_loss": 0.69112, "eval_accuracy": 0.5375, "eval_runtime": 0.63,
                                 "eval_samples_per_second": 126.6, "eval_steps_per_second": 3.2, "epoch": 1.0},
                                80, 160) == "eval  step 80/160  epoch 1.00  loss 0.6911  accuracy 0.5375"
    assert run_console.log_line({"train_runtime": 49.21, "train_samples_per_second": 9.7,
                                 "train_steps_per_second": 0.61, "total_flos": 1e9, "train_loss": 0.69491,
                                 "epoch": 1.5}, 30, 30) == "done  30 steps in 49.2 s (0.61 steps/s)  mean loss 0.6949"
    # a distillation term and a non-finite value are shown as they are
    assert run_console.log_line({"loss": float("nan"), "kd_kl": 1.23456, "epoch": 0.5}, 3, 10) == \
        "step 3/10  epoch 0.50  loss nan  kd_kl 1.235"


def _report(cls: str, rows: list[tuple[str, str]]) -> str:
    body = "\n".join(f"{k} | \x1b[31m{s}\x1b[0m | " for k, s in rows)
    return (f"\x1b[1m{cls} LOAD REPORT\x1b[0m from: /m\nKey | Status | \n----+-------+-\n{body}\n\nNotes:\n"
            "- MISSING:\tthose params were newly initialized because missing from the checkpoint. "
            "Consider training on your downstream task.")


def test_only_task_head_load_reports_are_left_out(monkeypatch):
    monkeypatch.setenv(run_console.VERBOSE_ENV, "0")  # configure() sets these: restored after the test
    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import transformers  # noqa: F401 - the filter reads the model class's base_model_prefix

    head = _report("BertForSequenceClassification", [("classifier.bias", "MISSING"), ("classifier.weight", "MISSING")])
    dropped_head = _report("BertModel", [("classifier.{bias, weight}", "UNEXPECTED")])
    body = _report("BertForSequenceClassification", [("classifier.bias", "MISSING"),
                                                     ("bert.encoder.layer.0.output.dense.weight", "MISSING")])
    mismatch = _report("BertForSequenceClassification", [("classifier.weight", "MISMATCH")])
    unknown = _report("NoSuchModelClass", [("classifier.weight", "MISSING")])
    assert run_console.head_only_report(run_console._ANSI.sub("", head))
    assert run_console.head_only_report(run_console._ANSI.sub("", dropped_head))
    for kept in (body, mismatch, unknown):
        assert not run_console.head_only_report(run_console._ANSI.sub("", kept))

    # through the logger transformers reports on: quiet drops the head report, verbose shows it
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log = logging.getLogger("transformers.modeling_utils")
    log.addHandler(handler)
    state = log.disabled, log.level
    log.disabled, log.level = False, logging.WARNING  # earlier tests may have silenced it (mlflow's alembic)
    try:
        run_console.configure(verbose=False)
        log.warning(head)
        log.warning(body)
        log.warning("an ordinary warning")
        assert seen == [body, "an ordinary warning"]
        run_console.configure(verbose=True)
        log.warning(head)
        assert seen[-1] == head
    finally:
        log.removeHandler(handler)
        log.disabled, log.level = state
        run_console.configure(verbose=False)


def test_titles_and_paths_are_not_broken_at_80_columns(monkeypatch):
    from deltakd import cli
    from deltakd.report.tables import print_results

    run_dir = Path("/data/experiments/very/long/output/folder/runs") / ("tiny--lr_1e-05--seed_1" * 2) / "20261203-155541"
    results = {"name": "tiny--lr_1e-05--seed_1", "run_dir": str(run_dir),
               "metrics": {"valid": {"accuracy": 0.5, "loss": 0.69}}}
    buf = io.StringIO()
    out = Console(width=80, file=buf, force_terminal=False)
    print_results(results, out)
    monkeypatch.setattr(cli, "console", out)
    cli._end_lines(run_dir)
    text = buf.getvalue()
    lines = text.splitlines()
    assert any(ln.strip() == "tiny--lr_1e-05--seed_1" for ln in lines), text  # the title on one line
    assert f"run folder: {run_dir}" in lines, text  # the path whole, on one line
    assert all(len(ln) <= 80 for ln in lines if "run folder" not in ln), text


def test_training_console_is_quiet_and_says_where_the_run_went(tmp_path, tiny_bert, toy_task):
    with open(toy_task / "train.tsv", "a") as f:  # data of its own: tokenised here, not found in the cache
        f.write("a quiet film\t1\n")
    recipe = tiny_recipe(tmp_path, tiny_bert, toy_task, peft="{method: lora, r: 4}", train=", max_steps: 6")
    out = cli("train", str(recipe))
    assert out.returncode == 0, out.stderr[-3000:]
    both = out.stdout + out.stderr
    for noise in ("MISSING", "LOAD REPORT", "{'loss'", "'eval_loss'", "is_gradient_checkpointing", "Saving the dataset",
                  "Writing model shards", "Loading weights", "tokenizing"):
        assert noise not in both, noise
    assert COMPACT.search(out.stdout), out.stdout
    assert re.search(r"^eval  step 6/6  epoch \S+  loss \d\.\d{4}  accuracy \d\.\d{4}$", out.stdout, re.M), out.stdout
    run = next((tmp_path / "runs" / "tiny").iterdir())
    assert f"run folder: {run}  (model/, results.json, metrics.jsonl, recipe.yaml)" in out.stdout.splitlines()
    assert f"curves: tensorboard --logdir {run / 'tensorboard'}" in out.stdout.splitlines()
    # deltakd eval restores the LoRA run's head: the head's load report is expected, so left out...
    quiet = cli("eval", str(run))
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "MISSING" not in quiet.stderr and "Loading weights" not in quiet.stderr
    assert f"tiny/{run.name} [test]" in quiet.stdout
    # ... and --verbose brings the libraries' output back
    loud = cli("--verbose", "eval", str(run))
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert "LOAD REPORT" in loud.stderr and "classifier.weight | MISSING" in loud.stderr
    assert "Loading weights" in loud.stderr


@pytest.mark.slow
def test_verbose_training_shows_the_raw_library_output(tmp_path, tiny_bert, toy_task):
    with open(toy_task / "train.tsv", "a") as f:  # data of its own: tokenised here, not found in the cache
        f.write("a verbose film\t1\n")
    recipe = tiny_recipe(tmp_path, tiny_bert, toy_task, peft="{method: lora, r: 4}", train=", max_steps: 6")
    out = cli("--verbose", "train", str(recipe))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "{'loss'" in out.stdout and not COMPACT.search(out.stdout)
    for shown in ("LOAD REPORT", "is_gradient_checkpointing", "Loading weights", "tokenizing", "Saving the dataset"):
        assert shown in out.stderr, shown
