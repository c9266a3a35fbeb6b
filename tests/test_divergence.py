"""The divergence guard: a non-finite training loss stops the run within ``train.nan_patience``,
``model/`` is the newest finite checkpoint, ``results.json`` names the step and the loss term, the
CLI exits 3 with one line; non-finite evaluation metrics are reported."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, Trainer

from deltakd import api
from deltakd.distill.trainer import DistillTrainer
from deltakd.errors import DivergedError
from deltakd.runner.divergence import finite_weights, nonfinite_metric_warnings
from deltakd.runs import RunDir, RunResults

from .multistage.test_run import STAGES, teacher_dir, tiny, world  # noqa: F401 - the module fixtures
from .test_train import tiny_recipe

MSE = STAGES / "mse.yaml"

NAN_FROM = 5  # the first optimizer step (1-based, as logged) whose loss is NaN
TRAIN = ", epochs: 1, eval_every: 2, save_total_limit: 20"


@pytest.fixture()
def nan_loss(monkeypatch):
    """Every training loss from optimizer step NAN_FROM on is NaN (the gradients and then the weights too)."""
    original = Trainer.compute_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = original(self, model, inputs, return_outputs, num_items_in_batch)
        if not model.training or self.state.global_step + 1 < NAN_FROM:
            return out
        return (out[0] * float("nan"), out[1]) if return_outputs else out * float("nan")

    monkeypatch.setattr(Trainer, "compute_loss", compute_loss)


def _run_dir(tmp_path: Path) -> RunDir:
    (run,) = [p for p in (tmp_path / "runs" / "tiny").iterdir() if p.is_dir()]
    return RunDir(run)


def test_nan_loss_stops_at_its_step_keeps_the_finite_checkpoint_and_raises(tmp_path, tiny_bert, toy_task, nan_loss):
    with pytest.raises(DivergedError) as e:
        api.train(tiny_recipe(tmp_path, tiny_bert, toy_task, train=TRAIN))
    assert str(e.value).startswith(f"training diverged at step {NAN_FROM}: the training loss is nan")
    assert "model/ is checkpoint-4" in str(e.value) and "\n" not in str(e.value)
    run = _run_dir(tmp_path)
    saved = json.loads(run.results_file.read_text())
    d = saved["diverged"]
    assert (d["step"], d["term"], d["value"], d["stopped_at"], d["model_step"]) == (NAN_FROM, "loss", "nan", NAN_FROM, 4)
    assert saved["train_steps"] == NAN_FROM  # stopped at once (patience 0), not after 20 steps
    # model/ is the step-4 checkpoint: finite, the same weights
    model = AutoModelForSequenceClassification.from_pretrained(run.model_dir)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    ckpt = AutoModelForSequenceClassification.from_pretrained(run.checkpoints / "checkpoint-4")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ckpt.state_dict().values()))
    # no checkpoint of the non-finite weights was written; the NaN loss is logged as NaN, not hidden
    assert not (run.checkpoints / f"checkpoint-{NAN_FROM}").exists()
    losses = {e["step"]: e["loss"] for e in run.read_events() if "loss" in e}
    assert all(math.isfinite(v) for s, v in losses.items() if s < NAN_FROM)


def test_patience_two_stops_two_steps_later(tmp_path, tiny_bert, toy_task, nan_loss):
    with pytest.raises(DivergedError) as e:
        api.train(tiny_recipe(tmp_path, tiny_bert, toy_task, train=TRAIN + ", nan_patience: 2"))
    assert f"stopped at step {NAN_FROM + 2} (train.nan_patience=2)" in str(e.value)
    run = _run_dir(tmp_path)
    d = json.loads(run.results_file.read_text())["diverged"]
    assert (d["step"], d["stopped_at"], d["patience"]) == (NAN_FROM, NAN_FROM + 2, 2)
    # the step-6 checkpoint holds NaN weights: model/ is the newest finite one (step 4)
    assert not finite_weights(run.checkpoints / "checkpoint-6") and d["model_step"] == 4
    model = AutoModelForSequenceClassification.from_pretrained(run.model_dir)
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _NanGrad(torch.autograd.Function):
    """The identity forward; a NaN gradient backward (a finite loss, non-finite gradients)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_a_non_finite_gradient_norm_under_a_finite_loss_stops_the_run(tmp_path, tiny_bert, toy_task, monkeypatch):
    original = Trainer.compute_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = original(self, model, inputs, return_outputs, num_items_in_batch)
        return _NanGrad.apply(loss) if model.training and self.state.global_step + 1 >= NAN_FROM else loss

    monkeypatch.setattr(Trainer, "compute_loss", compute_loss)
    with pytest.raises(DivergedError, match=f"training diverged at step {NAN_FROM}: the gradient norm is nan"):
        api.train(tiny_recipe(tmp_path, tiny_bert, toy_task, train=TRAIN))
    d = json.loads(_run_dir(tmp_path).results_file.read_text())["diverged"]
    assert (d["step"], d["term"], d["model_step"]) == (NAN_FROM, "grad_norm", 4)


def test_no_finite_checkpoint_no_model(tmp_path, tiny_bert, toy_task, nan_loss, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "NAN_FROM", 1)
    with pytest.raises(DivergedError, match="no checkpoint has finite weights, so no model/ was saved"):
        api.train(tiny_recipe(tmp_path, tiny_bert, toy_task, train=TRAIN))
    run = _run_dir(tmp_path)
    assert not run.model_dir.exists()
    assert json.loads(run.results_file.read_text())["diverged"]["step"] == 1


def test_cli_exits_3_with_one_line(tmp_path, tiny_bert, toy_task, nan_loss, capsys, monkeypatch):
    from deltakd import cli as cli_module

    monkeypatch.setattr(sys, "argv", ["deltakd", "train", str(tiny_recipe(tmp_path, tiny_bert, toy_task, train=TRAIN))])
    with pytest.raises(SystemExit) as e:
        cli_module.main()
    assert e.value.code == 3
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "diverged" in ln]
    assert len(lines) == 1 and lines[0].startswith(f"error: training diverged at step {NAN_FROM}"), err


def test_distillation_names_the_non_finite_term(tmp_path, tiny_bert, toy_task, monkeypatch):
    original = DistillTrainer._terms

    def terms(self, weights, inputs):
        out = original(self, weights, inputs)
        if self.state.global_step + 1 >= 3:
            out["kd"] = out["kd"] * float("nan")
        return out

    monkeypatch.setattr(DistillTrainer, "_terms", terms)
    (tmp_path / "t").mkdir()
    teacher = api.train(tiny_recipe(tmp_path / "t", tiny_bert, toy_task, train=", max_steps: 2", name="teacher"))
    recipe = tiny_recipe(tmp_path, tiny_bert, toy_task, train=", max_steps: 10, nan_patience: 1")
    text = recipe.read_text().replace(f"model: {{name: {tiny_bert}}}\n", f"teacher: {{run: {teacher['run_dir']}}}\n"
                                      "student: {from_teacher: {layers: [1]}}\n"
                                      "distill: {losses: {ce: 0.5, kd: 0.5}}\n")
    recipe.write_text(text)
    with pytest.raises(DivergedError) as e:
        api.train(recipe)
    assert str(e.value).startswith("training diverged at step 3: the training loss term 'kd' is nan; "
                                   "stopped at step 4 (train.nan_patience=1)")
    d = json.loads(_run_dir(tmp_path).results_file.read_text())["diverged"]
    assert (d["step"], d["term"], d["value"]) == (3, "kd", "nan")


def test_non_finite_and_huge_eval_metrics_are_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="deltakd.runner.divergence"):
        lines = nonfinite_metric_warnings({"valid": {"loss": float("nan"), "perplexity": 2.6e14, "accuracy": 0.5},
                                           "test": {"loss": 3.0, "perplexity": 20.1}})
    assert lines == ["valid loss is nan: the model diverged or the metric overflowed",
                     "valid perplexity is 2.6e+14 (> 1e+06): the model is no better than a near-random one, "
                     "or diverged"]
    assert [r.getMessage() for r in caplog.records] == lines


def test_a_multistage_stage_names_its_term_and_stops_the_pipeline(tmp_path, world, monkeypatch):
    import deltakd.multistage.trainer as ms_trainer

    original = ms_trainer.loss_terms

    steps = []

    def loss_terms(s_en, s_tr, t_en, cfg, gather=None):
        out = original(s_en, s_tr, t_en, cfg, gather=gather)
        if s_en.requires_grad:  # a training step (evaluation runs without gradients)
            steps.append(len(steps) + 1)
            if steps[-1] >= 4:
                out["mse"] = out["mse"] * float("inf")
        return out

    monkeypatch.setattr(ms_trainer, "loss_terms", loss_terms)
    sets = tiny(world, MSE, tmp_path / "runs")
    with pytest.raises(DivergedError) as e:
        api.pipeline([MSE], sets)
    assert str(e.value).startswith("pipeline stage 'mse' (")
    assert "training diverged at step 4: the training loss term 'mse' is inf" in str(e.value)
    (run_dir,) = list((tmp_path / "runs" / "mse").iterdir())
    assert json.loads((run_dir / "results.json").read_text())["diverged"]["term"] == "mse"
    with pytest.raises(DivergedError, match="training diverged at step 4"):  # a rerun does not go on from it
        api.pipeline([MSE], sets)


def test_a_sweep_records_diverged_trials_and_leaves_them_out_of_the_summary(tmp_path, tiny_bert, toy_task,
                                                                           monkeypatch):
    original = Trainer.compute_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = original(self, model, inputs, return_outputs, num_items_in_batch)
        seed_two = model.training and self.args.seed == 2 and self.state.global_step + 1 >= NAN_FROM
        return loss * float("nan") if seed_two else loss

    monkeypatch.setattr(Trainer, "compute_loss", compute_loss)
    recipe = tiny_recipe(tmp_path, tiny_bert, toy_task, train=TRAIN)
    res = api.sweep(recipe, ["sweep.train.seed=[1,2]"], progress=False)
    assert [o.status for o in res.trials] == ["ran", "ran"]
    results = [RunResults.read(o.run_dir) for o in res.trials]
    assert "diverged" not in results[0] and results[1]["diverged"]["step"] == NAN_FROM
    (setting,) = res.summary.settings
    assert setting.n == 1 and res.summary.diverged == [f"{res.trials[1].name} (step {NAN_FROM}: loss nan)"]
    assert f"Diverged, left out of the statistics (1): `{res.trials[1].name} (step {NAN_FROM}: loss nan)`" in \
        (res.sweep_dir / "summary.md").read_text()


def test_a_run_with_a_nan_eval_loss_warns_and_finishes(tmp_path, tiny_bert, toy_task, monkeypatch, caplog):
    original = Trainer.compute_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = original(self, model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            return out
        return (out[0] * float("nan"), out[1]) if return_outputs else out * float("nan")

    monkeypatch.setattr(Trainer, "compute_loss", compute_loss)
    with caplog.at_level(logging.WARNING, logger="deltakd.runner.divergence"):
        results = api.train(tiny_recipe(tmp_path, tiny_bert, toy_task, train=", max_steps: 2"))
    assert "diverged" not in results and math.isnan(results["metrics"]["valid"]["loss"])
    messages = [r.getMessage() for r in caplog.records]
    assert "valid loss is nan: the model diverged or the metric overflowed" in messages, messages
