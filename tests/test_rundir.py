"""Run folders: a run that goes outside the current directory says so, once, in one note line."""

from __future__ import annotations

import logging

from deltakd.runs import new_run_dir, rundir


def _notes(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "deltakd.runs.rundir"]


def test_output_dir_outside_the_working_directory_gets_one_note(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(rundir, "_NOTED_OUTSIDE", set())
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    with caplog.at_level(logging.WARNING, logger="deltakd.runs.rundir"):
        inside = new_run_dir("runs", "a")
        new_run_dir(work / "deep" / "runs", "a")
        assert _notes(caplog) == []
        outside = new_run_dir(work / ".." / "elsewhere", "a")
        new_run_dir(elsewhere, "b")  # the same folder: noted once
    assert inside.path.parent.resolve() == work / "runs" / "a" and outside.path.parent.resolve() == elsewhere / "a"
    assert _notes(caplog) == [f"note: output_dir {elsewhere} is outside the current directory {work}; runs go there"]
