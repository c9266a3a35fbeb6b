"""--resume: exact continuation (distillation projections, teacher cache, curriculum switching before
or after the resume point, a live teacher, causal-LM distillation, multistage stages, a dialogue
LoRA), damaged checkpoints, finished-but-unrecorded runs, and teacher runs that never finished."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from deltakd import api
from deltakd.runs import RunDir

from .conftest import write_recipe, write_toy_task
from .multistage.test_run import teacher_dir, world  # noqa: F401  (the tiny multistage world, as fixtures)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return write_toy_task(tmp_path_factory.mktemp("toy-resume"))


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, tiny_bert, toy) -> dict:
    folder = tmp_path_factory.mktemp("resume-teacher")
    return api.train(write_recipe(folder / "teacher.yaml", f"""
name: teacher
output_dir: {folder / 'runs'}
task: {{name: sst2, data_dir: {toy}, resplit_valid: 0.2, max_length: 16}}
model: {{name: {tiny_bert}}}
peft: {{method: full}}
train: {{epochs: 1, lr: 5.0e-3, batch_size: 16, seed: 3, logging_steps: 5}}
"""))


def _student(folder: Path, teacher: dict, toy: Path, name: str, distill: str) -> Path:
    """Two epochs of 20 steps, a checkpoint every 10 (all kept)."""
    return write_recipe(folder / f"{name}.yaml", f"""
name: {name}
output_dir: {folder / 'runs'}
task: {{name: sst2, data_dir: {toy}, resplit_valid: 0.2, max_length: 16}}
teacher: {{run: {teacher['run_dir']}}}
student: {{from_teacher: {{layers: [1]}}}}
peft: {{method: full}}
distill: {distill}
train: {{epochs: 2, eval_every: 10, save_total_limit: 5, lr: 5.0e-3, batch_size: 16, seed: 5, logging_steps: 2}}
""")


def _killed_between_checkpoints(recipe: Path, monkeypatch) -> RunDir:
    """Train ``recipe``, crash after training, and drop the newest checkpoint's state file (a kill mid-save)."""
    return _killed(lambda: api.train(recipe), recipe.parent / "runs" / recipe.stem, monkeypatch)


def _killed(train: Callable[[], Any], runs: Path, monkeypatch) -> RunDir:
    """Run ``train`` (its run lands in ``runs``), crash after training, and drop the newest checkpoint's
    state file (a kill mid-save): the run resumes from checkpoint-30 of 40."""
    from deltakd.runner import lifecycle

    def crash(*a, **k):
        raise RuntimeError("killed after training")

    with monkeypatch.context() as m:
        m.setattr(lifecycle, "keep_best_and_last", crash)
        with pytest.raises(RuntimeError, match="killed after training"):
            train()
    [run] = [r for r in runs.iterdir() if not (r / "results.json").exists()]
    steps = sorted(int(c.name.split("-")[1]) for c in (run / "checkpoints").glob("checkpoint-*"))
    assert steps == [10, 20, 30, 40]
    (run / "checkpoints" / "checkpoint-40" / "trainer_state.json").unlink()
    return RunDir(run)


def _tensors(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of checkpoints/last (model or adapter, projections), keyed ``<file>.<name>``."""
    last = Path(run_dir) / "checkpoints" / "last"
    files = sorted(last.rglob("*.safetensors"))
    assert files, f"no weights in {last}"
    return {f"{f.relative_to(last).with_suffix('')}.{k}": v for f in files for k, v in load_file(str(f)).items()}


def _max_differences(reference: str | Path, resumed: str | Path) -> dict[str, float]:
    ref, res = _tensors(reference), _tensors(resumed)
    assert set(ref) == set(res)
    return {k: float((ref[k] - res[k]).abs().max()) for k in ref}


@pytest.mark.parametrize("name, distill", [
    ("railc", "{losses: {ce: 0.34, kd: 0.33, rail_c: 0.33}, layer_map: {mode: random, k: 1}}"),
    ("kd", "{losses: {ce: 0.5, kd: 0.5}}"),
    # RAIL-KD at rail_dim: the student's projections and the teacher's fixed one, resumed with the heads
    pytest.param("railc_dim", "{losses: {ce: 0.34, kd: 0.33, rail_c: 0.33}, layer_map: {mode: random, k: 1}, "
                 "rail_dim: 8}", marks=pytest.mark.slow),
    # curriculum (loss weights and lr) switching after the resume point (step 35 > 30) and before it (step 10)
    pytest.param("curriculum_after", "{losses: {ce: 0.5, kd: 0.5}, curriculum: {at_epoch: 1.75, losses: {kd: 1.0}, "
                 "lr: 1.0e-3}}", marks=pytest.mark.slow),
    pytest.param("curriculum_before", "{losses: {ce: 0.5, kd: 0.5}, curriculum: {at_epoch: 0.5, losses: {kd: 1.0}, "
                 "lr: 1.0e-3}}", marks=pytest.mark.slow),
    # a live teacher: hidden_mse cannot use the cache (default layer map)
    pytest.param("live_hidden", "{losses: {ce: 0.5, kd: 0.25, hidden_mse: 0.25}}", marks=pytest.mark.slow),
])
def test_a_killed_distillation_resumes_exactly(tmp_path, teacher_run, toy, monkeypatch, name, distill):
    recipe = _student(tmp_path, teacher_run, toy, name, distill)
    reference = api.train(recipe)
    live = name.startswith("live")
    assert (reference["distill"]["teacher_forwards"] > 0) == live
    assert live or reference["distill"]["teacher_cache"]
    run = _killed_between_checkpoints(recipe, monkeypatch)
    resumed = api.train(recipe, resume=True)
    assert Path(resumed["run_dir"]) == run.path and resumed["resumed_from"] == "checkpoint-30"
    diffs = _max_differences(reference["run_dir"], run.path)
    assert name != "railc" or "distill_heads.rail_c.weight" in diffs, sorted(diffs)
    assert name != "railc_dim" or {"distill_heads.rail_c.weight", "distill_heads.rail_c_teacher.weight"} <= set(diffs)
    assert max(diffs.values()) == 0.0, {k: d for k, d in diffs.items() if d}
    assert resumed["metrics"] == reference["metrics"]



# --- other families: causal-LM distillation, a multistage stage, a dialogue LoRA ------------------

def _exact_after_kill(reference: str | Path, train: Callable[[], Any], resume: Callable[[], Any], runs: Path,
                      monkeypatch) -> None:
    """``train`` again, killed, then ``resume`` from checkpoint-30: every tensor of checkpoints/last
    equal to the uninterrupted ``reference`` run's."""
    run = _killed(train, runs, monkeypatch)
    resume()
    results = json.loads((run.path / "results.json").read_text())
    assert results["resumed_from"] == "checkpoint-30" and results["train_steps"] == 40
    diffs = _max_differences(reference, run.path)
    assert max(diffs.values()) == 0.0, {k: d for k, d in diffs.items() if d}


STEPS = "max_steps: 40, eval_every: 10, save_total_limit: 5"


@pytest.mark.slow
def test_a_killed_causal_lm_distillation_resumes_exactly(tmp_path, monkeypatch):
    from .test_partial_kd import _base, _text

    base = _base(tmp_path, _text(tmp_path)).replace("epochs: 3,", f"{STEPS},")
    api.train(write_recipe(tmp_path / "t.yaml", base.replace(STEPS, "epochs: 1") + """
name: t
model: {config: {model_type: gpt2, n_layer: 2, n_embd: 32, n_head: 2, n_positions: 32}, vocab_size: 300}
"""))
    recipe = write_recipe(tmp_path / "kd.yaml", base + f"""
name: kd
teacher: {{run: {tmp_path / 'runs' / 't'}}}
student: {{from_teacher: {{nb_layers: 1}}}}
distill: {{losses: {{ce: 0.5, kd: 0.5}}}}
""")
    _exact_after_kill(api.train(recipe)["run_dir"], lambda: api.train(recipe), lambda: api.train(recipe, resume=True),
                      tmp_path / "runs" / "kd", monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["mse", "bottleneck_distill"])
def test_a_killed_multistage_stage_resumes_exactly(tmp_path, world, monkeypatch, stage):  # noqa: F811
    from deltakd import pipeline

    from .multistage.test_run import STAGES, tiny

    path = STAGES / f"{stage}.yaml"
    runs = tmp_path / "runs"
    sets = [*tiny(world, path, runs), "train.max_steps=40", "train.eval_every=10", "train.save_total_limit=5"]

    def train() -> Path:
        [done] = pipeline.run_pipeline([path], sets, test=False)
        return done.run_dir

    reference = train()
    shutil.move(str(reference), str(tmp_path / "reference"))  # the pipeline would skip a finished stage
    _exact_after_kill(tmp_path / "reference", train, lambda: pipeline.run_pipeline([path], sets, test=False),
                      runs / stage, monkeypatch)


@pytest.mark.slow
def test_a_killed_dialogue_lora_resumes_exactly(tmp_path, monkeypatch):
    from .dialogue.test_e2e import GPT, _common, _task

    api.train(write_recipe(tmp_path / "pre.yaml", f"""
name: pre
{_task('lm')}
model: {{config: {GPT}, vocab_size: 400}}
train: {{epochs: 1, lr: 1.0e-2, batch_size: 16, seed: 1}}
{_common(tmp_path)}"""))
    recipe = write_recipe(tmp_path / "lora.yaml", f"""
name: lora
{_task('dialogue')}
model: {{name: {tmp_path / 'runs' / 'pre'}}}
peft: {{method: lora, r: 4, alpha: 8, dropout: 0.1, target: [c_attn]}}
train: {{{STEPS}, lr: 2.0e-2, batch_size: 8, seed: 1, logging_steps: 5}}
{_common(tmp_path)}""")
    _exact_after_kill(api.train(recipe)["run_dir"], lambda: api.train(recipe), lambda: api.train(recipe, resume=True),
                      tmp_path / "runs" / "lora", monkeypatch)


# --- damaged checkpoints ------------------------------------------------------------------------

CKPT_FILES = ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"]


def _crashed_plain_run(tmp_path: Path, tiny_bert: Path, toy_task: Path, monkeypatch) -> tuple[Path, RunDir]:
    """A full fine-tuning of 40 steps, checkpoints every 10, crashed after training (all checkpoints kept)."""
    from deltakd.runner import lifecycle

    from .test_train import tiny_recipe

    recipe = tiny_recipe(tmp_path, tiny_bert, toy_task, train=", max_steps: 40, eval_every: 10, save_total_limit: 5")

    def crash(*a, **k):
        raise RuntimeError("killed after training")

    with monkeypatch.context() as m:
        m.setattr(lifecycle, "keep_best_and_last", crash)
        with pytest.raises(RuntimeError, match="killed after training"):
            api.train(recipe)
    [run] = list((tmp_path / "runs" / "tiny").iterdir())
    return recipe, RunDir(run)


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_every_checkpoint_has_a_manifest_and_a_damaged_one_is_skipped_not_deleted(tmp_path, tiny_bert, toy_task,
                                                                                   monkeypatch, caplog):
    from deltakd.runner.checkpoints import MANIFEST, last_complete_checkpoint, step_folders
    from deltakd.utils import file_digest

    recipe, run = _crashed_plain_run(tmp_path, tiny_bert, toy_task, monkeypatch)
    ckpt = run.checkpoints / "checkpoint-40"
    files = json.loads((ckpt / MANIFEST).read_text())["files"]
    assert set(CKPT_FILES) <= set(files)
    assert all(files[f] == {"size": (ckpt / f).stat().st_size, "sha256": file_digest(ckpt / f)} for f in CKPT_FILES)
    for name in CKPT_FILES:  # any file of the newest checkpoint cut short: the one before it is used
        copy = tmp_path / "copies" / name
        shutil.copytree(run.checkpoints, copy)
        _cut(copy / "checkpoint-40" / name)
        caplog.clear()
        assert last_complete_checkpoint(copy) == str(copy / "checkpoint-30"), name
        assert (copy / "checkpoint-40" / name).is_file(), f"{name}: the damaged checkpoint was deleted"
        [line] = [r.getMessage() for r in caplog.records if "--resume" in r.getMessage()]
        assert "resuming from checkpoint-30" in line and f"checkpoint-40 ({name}" in line, line
    # end to end: a cut optimizer state is no traceback; the run resumes from the checkpoint before
    _cut(ckpt / "optimizer.pt")
    caplog.clear()
    resumed = api.train(recipe, resume=True)
    assert resumed["resumed_from"] == "checkpoint-30" and resumed["train_steps"] == 40
    assert any("skipped damaged checkpoint-40 (optimizer.pt" in r.getMessage() for r in caplog.records)
    assert int(resumed["last_step"]) == 40 and run.checkpoint("last") == run.checkpoints / "checkpoint-40"
    assert {p.name for p in step_folders(run.checkpoints)} == {f"checkpoint-{resumed['best_step']}", "checkpoint-40"}
    steps = [e["step"] for e in run.read_events() if "loss" in e]
    assert steps == sorted(steps) and len(steps) == len(set(steps))


# --- a trained run without results.json ----------------------------------------------------------

def test_resume_never_retrains_a_trained_run_whose_results_were_removed(tmp_path, tiny_bert, toy_task):
    from deltakd.errors import DeltakdError

    from .test_train import tiny_recipe

    recipe = tiny_recipe(tmp_path, tiny_bert, toy_task, train=", max_steps: 10")
    results = api.train(recipe)
    run = RunDir(Path(results["run_dir"]))
    run.results_file.unlink()
    events, kept = run.metrics_file.read_text(), sorted(p.name for p in run.checkpoints.iterdir())
    with pytest.raises(DeltakdError, match=r"finished training \(checkpoints/last and model exist\) but has no "
                                           r"results.json; it is not retrained") as err:
        api.train(recipe, resume=True)
    assert "\n" not in str(err.value) and f"deltakd eval {run.path}" in str(err.value)
    assert run.metrics_file.read_text() == events and sorted(p.name for p in run.checkpoints.iterdir()) == kept
    assert sorted(p.name for p in run.path.parent.iterdir()) == [run.path.name]  # no new run either
    shutil.rmtree(run.model_dir)  # only checkpoints/last left (killed before model/ was saved): refused too
    with pytest.raises(DeltakdError, match=r"\(checkpoints/last exist\)"):
        api.train(recipe, resume=True)


# --- teacher.run must be a finished run, in every form ------------------------------------------

def test_teacher_run_accepts_only_finished_runs_in_every_form(tmp_path, teacher_run, toy):
    from deltakd.errors import DeltakdError
    from deltakd.models.delta import find_model_dir

    done = Path(teacher_run["run_dir"])
    assert find_model_dir(done) == done / "model" and find_model_dir(done / "model") == done / "model"
    unfinished = tmp_path / "teachers" / "teacher" / done.name
    shutil.copytree(done, unfinished)
    (unfinished / "results.json").unlink()
    for form in (unfinished, unfinished / "model", unfinished.parent):
        recipe = _student(tmp_path, {"run_dir": form}, toy, "student", "{losses: {ce: 0.5, kd: 0.5}}")
        with pytest.raises(DeltakdError, match="teacher.run: ") as err:
            api.train(recipe)
        assert "\n" not in str(err.value)
        assert ("has not finished (no results.json)" if form != unfinished.parent
                else "holds no finished deltakd run") in str(err.value), str(err.value)
        assert not (tmp_path / "runs").exists(), "nothing written"
    shutil.copytree(done / "model", tmp_path / "plain-model")  # a saved model folder outside any run: accepted
    assert find_model_dir(tmp_path / "plain-model") == tmp_path / "plain-model"
