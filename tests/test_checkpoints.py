"""Checkpoints on disk: the best one verified when chosen and when a resumed run inherits it, best/last as
links to real checkpoint-<step> folders (the Trainer's get_last_checkpoint finds the final one),
train.keep_checkpoints, train.save_optimizer, and files written with the user's umask."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from deltakd import api
from deltakd.runs import RunDir

from .conftest import write_toy_task
from .test_train import tiny_recipe


def _crash_after_training(recipe: Path) -> RunDir:
    """Train ``recipe`` and crash before best/last are kept (every checkpoint left, no results.json)."""
    from deltakd.runner import lifecycle

    def crash(*a, **k):
        raise RuntimeError("killed after training")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(lifecycle, "keep_best_and_last", crash)
        with pytest.raises(RuntimeError, match="killed after training"):
            api.train(recipe)
    [run] = [r for r in (recipe.parent / "runs" / "tiny").iterdir() if not (r / "results.json").exists()]
    return RunDir(run)


@pytest.fixture(scope="module")
def crashed(tmp_path_factory, tiny_bert) -> tuple[Path, RunDir, Path]:
    """A full fine-tuning of 40 steps, a checkpoint every 10 (all kept), crashed after training; with a
    pristine copy of its run folder (a test restores it in place: resume needs the same output_dir)."""
    folder = tmp_path_factory.mktemp("ckpt")
    recipe = tiny_recipe(folder, tiny_bert, write_toy_task(folder / "toy"),
                         train=", max_steps: 40, eval_every: 10, save_total_limit: 5")
    run = _crash_after_training(recipe)
    shutil.copytree(run.path, folder / "pristine", symlinks=True)
    return recipe, run, folder / "pristine"


def _restored(crashed) -> tuple[Path, RunDir]:
    recipe, run, pristine = crashed
    shutil.rmtree(run.path)
    shutil.copytree(pristine, run.path, symlinks=True)
    return recipe, run


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _scores(run: RunDir) -> dict[int, float]:
    return {e["step"]: e["eval_accuracy"] for e in run.read_events() if "eval_accuracy" in e}


# --- issue 21: a damaged best checkpoint ---------------------------------------------------------

def test_a_damaged_inherited_best_falls_back_and_the_resumed_run_still_finishes(crashed, caplog):
    """checkpoint-30's state names checkpoint-10 (cut) as the best: on the old code the Trainer found it only
    when loading the best model at the end, and the run crashed without model/ or results.json."""
    from deltakd.runner.checkpoints import write_manifest

    recipe, run = _restored(crashed)
    ckpts = run.checkpoints
    state_file = ckpts / "checkpoint-30" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state.update(best_model_checkpoint=str(ckpts / "checkpoint-10"), best_metric=2.0, best_global_step=10)
    state_file.write_text(json.dumps(state))  # an accuracy of 2.0: no later evaluation beats it
    write_manifest(ckpts / "checkpoint-30")
    shutil.rmtree(ckpts / "checkpoint-40")  # resume from checkpoint-30
    _cut(ckpts / "checkpoint-10" / "model.safetensors")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deltakd.runner.checkpoints"):
        resumed = api.train(recipe, resume=True)
    [line] = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert "best checkpoint checkpoint-10 is damaged: model.safetensors has" in line, line
    assert resumed["resumed_from"] == "checkpoint-30" and run.finished and run.model_dir.is_dir()
    scores = _scores(run)
    fallback = max((20, 30), key=lambda s: (scores[s], s))  # the best sound one, the newest among equals
    want = 40 if scores[40] > scores[fallback] else fallback
    assert resumed["best_step"] == str(want) and run.checkpoint("best") == ckpts / f"checkpoint-{want}"


def test_a_damaged_checkpoint_is_refused_when_it_becomes_best(crashed, caplog):
    from transformers import TrainerControl, TrainerState

    from deltakd.runner.checkpoints import ManifestCallback

    _, run = _restored(crashed)
    ckpts = run.checkpoints
    state = TrainerState.load_from_json(str(ckpts / "checkpoint-40" / "trainer_state.json"))
    state.best_model_checkpoint, state.best_global_step = str(ckpts / "checkpoint-30"), 30
    _cut(ckpts / "checkpoint-30" / "optimizer.pt")
    args = SimpleNamespace(output_dir=str(ckpts), metric_for_best_model="accuracy", greater_is_better=True,
                           load_best_model_at_end=True, should_save=False)
    with caplog.at_level(logging.WARNING, logger="deltakd.runner.checkpoints"):
        ManifestCallback().on_save(args, state, TrainerControl())
    scores = _scores(run)
    want = max((10, 20, 40), key=lambda s: (scores[s], s))
    assert state.best_model_checkpoint == str(ckpts / f"checkpoint-{want}") and state.best_global_step == want
    assert state.best_metric == scores[want]
    assert any("checkpoint-30 is damaged: optimizer.pt" in r.getMessage() for r in caplog.records)
    assert (ckpts / "checkpoint-30" / "optimizer.pt").is_file(), "a damaged checkpoint is left on disk"


# --- issue 20 / 22: links, keep_checkpoints, get_last_checkpoint, umask ----------------------------

@contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keep_all_keeps_every_checkpoint_through_a_resume_with_umask_modes(tmp_path, tiny_bert, toy_task):
    """keep_checkpoints: all keeps all six checkpoints (the Trainer's save_total_limit would keep 2), resume
    works, best/last are links the Trainer's get_last_checkpoint sees past, and every file deltakd writes
    (results.json, recipe.yaml, metrics.jsonl rewritten on resume, manifests, weights) has the umask's mode."""
    from transformers.trainer_utils import get_last_checkpoint

    from deltakd.runner.checkpoints import MANIFEST, step_folders

    recipe = tiny_recipe(tmp_path, tiny_bert, toy_task, train=", max_steps: 30, eval_every: 5, "
                         "keep_checkpoints: all")
    with _umask(0o022):
        run = _crash_after_training(recipe)
        (run.checkpoints / "checkpoint-30" / "trainer_state.json").unlink()  # killed mid-save
        resumed = api.train(recipe, resume=True)
    steps = [5, 10, 15, 20, 25, 30]
    assert resumed["resumed_from"] == "checkpoint-25" and resumed["last_step"] == "30"
    assert [p.name for p in step_folders(run.checkpoints)] == [f"checkpoint-{s}" for s in steps]
    assert (run.checkpoints / "last").is_symlink() and os.readlink(run.checkpoints / "last") == "checkpoint-30"
    assert run.checkpoint("best") == run.checkpoints / f"checkpoint-{resumed['best_step']}"
    assert get_last_checkpoint(str(run.checkpoints)) == str(run.checkpoints / "checkpoint-30")
    files = [run.results_file, run.recipe_file, run.metrics_file, run.model_dir / "model.safetensors",
             run.checkpoints / "checkpoint-30" / MANIFEST, run.checkpoints / "checkpoint-30" / "model.safetensors"]
    assert {f.relative_to(run.path).as_posix(): oct(_mode(f)) for f in files} == \
        {f.relative_to(run.path).as_posix(): "0o644" for f in files}
    assert oct(_mode(run.model_dir)) == "0o755"


def test_atomic_writers_and_published_folders_honour_any_umask(tmp_path):
    from deltakd.utils import atomic_save_tensors, atomic_write_json, cached_dir, replace_dir

    with _umask(0o027):
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        import torch
        atomic_save_tensors(tmp_path / "w.safetensors", {"w": torch.zeros(2)})
        import tempfile
        tmp = Path(tempfile.mkdtemp(dir=tmp_path))  # 0700, as any mkdtemp
        (tmp / "f").write_text("x")
        replace_dir(tmp, tmp_path / "published")
        entry = cached_dir(tmp_path / "cache" / "kind", "key", lambda d: (d / "ready").write_text("1"), ready="ready")
    assert [oct(_mode(p)) for p in (tmp_path / "a.json", tmp_path / "w.safetensors")] == ["0o640", "0o640"]
    assert [oct(_mode(p)) for p in (tmp_path / "published", entry)] == ["0o750", "0o750"]


def test_links_fall_back_to_pointer_files_and_readers_follow_them(tmp_path, monkeypatch):
    from deltakd.runner.checkpoints import check_resumable
    from deltakd.errors import DeltakdError
    from deltakd.utils import follow_link, link_dir

    run = RunDir(tmp_path / "run")
    (run.checkpoints / "checkpoint-7").mkdir(parents=True)
    assert link_dir(run.checkpoints / "best", "checkpoint-7") == "symlink"

    def refuse(*a, **k):
        raise OSError("symlinks not supported here")

    monkeypatch.setattr(os, "symlink", refuse)
    assert link_dir(run.checkpoints / "best", "checkpoint-7") == "pointer"  # replaces the symlink
    assert (run.checkpoints / "best").is_file() and not (run.checkpoints / "best").is_symlink()
    assert (run.checkpoints / "best").stat().st_size < 64
    assert run.checkpoint("best") == run.checkpoints / "checkpoint-7" == follow_link(run.checkpoints / "best")
    assert run.checkpoint("last") is None
    link_dir(run.checkpoints / "last", "checkpoint-7")
    recipe = SimpleNamespace(name="x", train=SimpleNamespace(save_optimizer=True))
    with pytest.raises(DeltakdError, match=r"\(checkpoints/last exist\)"):  # a trained run, seen through the pointer
        check_resumable(run, recipe)
    with pytest.raises(ValueError):
        link_dir(run.checkpoints / "best", "../elsewhere")


def test_save_optimizer_false_keeps_weights_only_and_refuses_resume(tmp_path, tiny_bert, toy_task):
    from deltakd.errors import DeltakdError
    from deltakd.runner.checkpoints import step_folders

    recipe = tiny_recipe(tmp_path, tiny_bert, toy_task, train=", max_steps: 10, eval_every: 5, save_optimizer: false")
    run = _crash_after_training(recipe)
    names = {p.name for p in (run.checkpoints / "checkpoint-10").iterdir()}
    assert "model.safetensors" in names and "trainer_state.json" in names
    assert not names & {"optimizer.pt", "scheduler.pt", "rng_state.pth"}, names
    with pytest.raises(DeltakdError, match="train.save_optimizer: false, so its checkpoints hold the weights only") \
            as err:
        api.train(recipe, resume=True)
    assert "\n" not in str(err.value)
    assert not run.finished and [p.name for p in step_folders(run.checkpoints)] == ["checkpoint-5", "checkpoint-10"]
    assert not (run.checkpoints / "last").exists()


def test_keep_checkpoints_and_save_total_limit_are_not_both_set():
    from deltakd.recipe.schema import TrainConfig

    assert TrainConfig(keep_checkpoints=3).keep_checkpoints == 3
    with pytest.raises(ValueError, match="train.save_total_limit and train.keep_checkpoints: all both say"):
        TrainConfig(keep_checkpoints="all", save_total_limit=3)


# --- manifests: sizes at the save, digests after it ------------------------------------------------

def test_manifest_sizes_at_save_digests_later_and_both_find_damage(tmp_path):
    from deltakd.runner.checkpoints import MANIFEST, add_digests, checkpoint_problem, write_manifest
    from deltakd.utils import file_digest

    ckpt = tmp_path / "checkpoints" / "checkpoint-5"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(bytes(range(256)) * 40)
    (ckpt / "sub" / "adapter.bin").write_bytes(b"x" * 100)
    (ckpt / "trainer_state.json").write_text('{"global_step": 5}')
    write_manifest(ckpt, digests=False)
    files = json.loads((ckpt / MANIFEST).read_text())["files"]
    assert files == {"model.safetensors": {"size": 10240}, "sub/adapter.bin": {"size": 100},
                     "trainer_state.json": {"size": 18}}
    assert checkpoint_problem(ckpt) is None
    good = (ckpt / "model.safetensors").read_bytes()
    _cut(ckpt / "model.safetensors")  # sizes alone find a cut file
    assert checkpoint_problem(ckpt) == "model.safetensors has 5120 bytes, 10240 saved"
    assert not add_digests(ckpt) and "sha256" not in json.loads((ckpt / MANIFEST).read_text())["files"]["sub/adapter.bin"]
    (ckpt / "model.safetensors").write_bytes(good)
    assert add_digests(ckpt)
    files = json.loads((ckpt / MANIFEST).read_text())["files"]
    assert {n: e["sha256"] for n, e in files.items()} == {n: file_digest(ckpt / n) for n in files}
    (ckpt / "model.safetensors").write_bytes(good[::-1])  # same size, other bytes: only the digest sees it
    assert checkpoint_problem(ckpt) == "model.safetensors differs from the saved sha256"
    shutil.rmtree(ckpt)  # rotated away by the Trainer before the digests were written: no folder remade
    assert not add_digests(ckpt) and not ckpt.exists()
