"""Concurrency of run folders: atomic creation, one process per run / sweep folder, the teacher cache."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from deltakd import api, families
from deltakd.errors import DeltakdError
from deltakd.recipe import load_raw
from deltakd.runner import lifecycle
from deltakd.runs import RunDir, new_run_dir
from deltakd.runs.lock import LOCK_FILE, FolderLock, lock_holder

from .conftest import write_recipe


def _make_dirs(out: str, barrier, queue) -> None:
    """5 new run folders, started together with the other processes; mkdir made slow to widen any race."""
    real_mkdir = Path.mkdir

    def slow_mkdir(self, *args, **kwargs):
        time.sleep(0.005)
        return real_mkdir(self, *args, **kwargs)

    Path.mkdir = slow_mkdir
    barrier.wait()
    made = []
    for _ in range(5):
        try:
            made.append(str(new_run_dir(Path(out), "r").path))
        except Exception as e:  # reported to the parent, which fails the test
            made.append(f"error: {e!r}")
    queue.put(made)


def test_new_run_dir_from_8_processes_gives_40_distinct_folders(tmp_path):
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_make_dirs, args=(str(tmp_path), barrier, queue)) for _ in range(8)]
    for p in procs:
        p.start()
    made = [path for _ in procs for path in queue.get(timeout=120)]
    for p in procs:
        p.join(timeout=60)
    assert [m for m in made if m.startswith("error")] == []
    assert len(made) == len(set(made)) == 40
    assert sorted(str(p) for p in (tmp_path / "r").iterdir()) == sorted(made)
    assert all(not any(Path(m).iterdir()) for m in made)  # each one new and empty


def _hold(folder: str, what: str, ready) -> None:
    FolderLock(folder, what).acquire()
    ready.set()
    time.sleep(600)  # killed by the test


def _holder_process(folder: Path, what: str = "run"):
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_hold, args=(str(folder), what, ready))
    proc.start()
    assert ready.wait(60)
    return proc


def test_a_lock_names_its_holder_and_a_kill_frees_it(tmp_path):
    folder = tmp_path / "runs" / "x" / "20260101-000000"
    proc = _holder_process(folder)
    try:
        assert lock_holder(folder) == proc.pid
        with pytest.raises(DeltakdError) as e:
            FolderLock(folder).acquire()
        assert str(e.value).startswith(f"run '{folder}' is in use by another process (pid {proc.pid}); ")
        assert "\n" not in str(e.value)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
    assert lock_holder(folder) is None  # the OS dropped the killed holder's lock
    with FolderLock(folder) as lock:
        assert lock.held and lock_holder(folder) == os.getpid()
        assert (folder / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert lock_holder(folder) is None
    assert lock_holder(tmp_path / "never-locked") is None and not (tmp_path / "never-locked").exists()


def classification_recipe(tmp_path: Path, data: Path, model: str = "some/model"):
    path = write_recipe(tmp_path / "tiny.yaml", f"""
name: tiny
task: {{name: sst2, data_dir: {data}, resplit_valid: 0.2, max_length: 16}}
model: {{name: {model}}}
peft: {{method: full}}
train: {{max_steps: 2, eval_every: 1, batch_size: 16, eval_batch_size: 64, seed: 0}}
track: []
output_dir: {tmp_path / 'runs'}
""")
    data = load_raw(path)
    fam = families.family_of(data)
    return path, fam.validate(data, source=str(path)), fam


def unfinished_runs(recipe, n: int) -> list[RunDir]:
    runs = []
    for _ in range(n):
        run = new_run_dir(recipe.output_dir, recipe.name)
        run.write_recipe(recipe)
        runs.append(run)
    return runs


def test_resume_skips_a_run_in_use_and_refuses_when_every_one_is(tmp_path, toy_task):
    _, recipe, fam = classification_recipe(tmp_path, toy_task)
    older, newer = unfinished_runs(recipe, 2)
    assert lifecycle.resumable_run(recipe, fam) == newer
    with FolderLock(newer.path):  # a live process trains the newest run: resume the other one
        assert lifecycle.resumable_run(recipe, fam) == older
        with FolderLock(older.path):
            with pytest.raises(DeltakdError) as e:
                lifecycle.resumable_run(recipe, fam)
    assert str(e.value).startswith(f"run '{newer.path}' is in use by another process (pid {os.getpid()}); ")
    assert lifecycle.resumable_run(recipe, fam) == newer


def test_a_killed_runs_folder_is_resumable_again(tmp_path, toy_task):
    _, recipe, fam = classification_recipe(tmp_path, toy_task)
    (run,) = unfinished_runs(recipe, 1)
    proc = _holder_process(run.path)
    with pytest.raises(DeltakdError, match=f"pid {proc.pid}"):
        lifecycle.resumable_run(recipe, fam)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    assert lifecycle.resumable_run(recipe, fam) == run


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    from deltakd import cli

    monkeypatch.setattr(sys, "argv", ["deltakd", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    return e.value.code or 0, capsys.readouterr().err


def test_train_resume_of_a_run_in_use_is_one_line_before_anything_is_written(tmp_path, toy_task, monkeypatch,
                                                                               capsys):
    path, recipe, fam = classification_recipe(tmp_path, toy_task)
    (run,) = unfinished_runs(recipe, 1)
    prepared = []
    monkeypatch.setattr(type(fam), "prepare", lambda self, r: prepared.append(r))
    with FolderLock(run.path):
        before = {p.name: p.read_bytes() for p in run.path.iterdir()}
        for call in (lambda: api.train(path, resume=True),
                     lambda: lifecycle.run(recipe, fam, resume=True, run_dir=run)):
            with pytest.raises(DeltakdError) as e:
                call()
            assert str(e.value).startswith(f"run '{run.path}' is in use by another process (pid {os.getpid()}); ")
        code, err = run_cli(monkeypatch, capsys, "train", str(path), "--resume")
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and f"run '{run.path}' is in use by another process" in lines[0], err
        assert prepared == [] and {p.name: p.read_bytes() for p in run.path.iterdir()} == before


def test_a_run_holds_its_lock_until_results_json_is_written(tmp_path, tiny_bert, toy_task, monkeypatch):
    import torch

    torch.set_num_threads(1)
    path, _, _ = classification_recipe(tmp_path, toy_task, model=str(tiny_bert))
    seen = []
    real_write = RunDir.write_results

    def write_results(self, results):
        seen.append((self.path, lock_holder(self.path)))
        real_write(self, results)

    monkeypatch.setattr(RunDir, "write_results", write_results)
    results = api.train(path)
    run_path = Path(results["run_dir"])
    assert seen == [(run_path, os.getpid())]
    assert lock_holder(run_path) is None  # released once results.json is written
    # a failed run releases it too: it can be resumed
    failed = []

    def fail(self, results):
        failed.append(self.path)
        raise RuntimeError("disk full")

    monkeypatch.setattr(RunDir, "write_results", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        api.train(path)
    assert len(failed) == 1 and failed[0] != run_path and lock_holder(failed[0]) is None
    _, recipe, fam = classification_recipe(tmp_path, toy_task, model=str(tiny_bert))
    assert lifecycle.resumable_run(recipe, fam).path == failed[0]


# ----------------------------------------------------------------------------- teacher cache


def _build_teacher_cache(root: str, log: str, barrier, queue) -> None:
    """A process building the teacher cache of a tiny seeded teacher; reports the tensors it read."""
    import torch
    from datasets import Dataset
    from transformers import BertConfig, BertForSequenceClassification

    from deltakd.distill import cache

    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                       num_attention_heads=2, intermediate_size=64))
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (24, 8), generator=gen).tolist()
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 8] * 24})
    real = cache.compute_teacher_outputs

    def counted(*args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # a slow teacher: the other builders arrive meanwhile
        return real(*args, **kwargs)

    cache.compute_teacher_outputs = counted

    def collate(rows):
        return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}

    barrier.wait()
    entry = cache.load_or_build(teacher, ds, collate, 8, root=Path(root))
    digest = hashlib.sha256(entry.logits.numpy().tobytes() + entry.pooled.numpy().tobytes()).hexdigest()
    queue.put((str(entry.path), digest, tuple(entry.pooled.shape)))


def test_concurrent_teacher_cache_builders_make_one_complete_entry(tmp_path):
    ctx = mp.get_context("forkserver")  # children of a server that only imported torch: fork-safe and quick
    ctx.set_forkserver_preload(["torch", "transformers", "datasets", "deltakd.distill.cache"])
    n = 3
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    log = tmp_path / "builds.log"
    procs = [ctx.Process(target=_build_teacher_cache, args=(str(tmp_path / "cache"), str(log), barrier, queue))
             for _ in range(n)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * n
    assert len(set(got)) == 1 and got[0][2] == (24, 3, 32)  # every reader: the same entry, the same tensors
    assert len(log.read_text().splitlines()) == 1  # built once; the others waited and read it
    entries = sorted(p.name for p in (tmp_path / "cache" / "teacher").iterdir() if not p.name.startswith("."))
    assert entries == [Path(got[0][0]).name]
    assert sorted(p.name for p in Path(got[0][0]).iterdir()) == ["meta.json", "teacher.safetensors"]
    assert not [p for p in (tmp_path / "cache" / "teacher").iterdir() if p.name.startswith((".tmp-", ".stale-"))]


def test_cached_dir_replaces_an_incomplete_folder(tmp_path):
    from deltakd.utils import cached_dir

    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "partial.bin").write_bytes(b"half")  # not made by cached_dir: no ready file

    def build(tmp: Path) -> None:
        (tmp / "data.bin").write_bytes(b"whole")
        (tmp / "ready").write_text("ok")

    path = cached_dir(tmp_path, "k", build, ready="ready")
    assert sorted(p.name for p in path.iterdir()) == ["data.bin", "ready"]
    assert (path / "data.bin").read_bytes() == b"whole"
