"""``deltakd report``: which paths it accepts, the tables it writes, the plots it embeds."""

from __future__ import annotations

import base64
import json
import math
import re
import statistics
import sys
from pathlib import Path

import pytest
import yaml

from deltakd.errors import DeltakdError
from deltakd.report.compare import build_report, collect, curves_of, load_run
from deltakd.report.sweep_stats import Trial, summarize, summary_csv

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(root: Path, name: str, stamp: str, valid: dict | None = None, test: dict | None = None,
             peft: dict | None = None, params=(1000, 10), main: str = "accuracy", finished: bool = True,
             teacher: bool = False, setting_seed: int = 0) -> Path:
    """A run directory as deltakd writes it: recipe.yaml, metrics.jsonl, results.json (when finished)."""
    path = root / name / stamp
    path.mkdir(parents=True)
    recipe = {"name": name, "task": {"name": "sst2"}, "peft": peft or {"method": "full"},
              "train": {"seed": setting_seed}, "provenance": {"git_commit": None}}
    if teacher:
        recipe["teacher"] = {"run": "runs/t"}
    (path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    events = [{"step": 5, "epoch": 0.5, "loss": 0.69}, {"step": 10, "epoch": 1.0, "loss": 0.5},
              {"step": 10, "epoch": 1.0, "eval_loss": 0.45, f"eval_{main}": (valid or {}).get(main, 0.8)},
              {"step": 10, "epoch": 1.0, "train_loss": 0.6, "train_runtime": 3.0}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + '{"step": 11, "lo')
    if finished:
        total, trainable = params
        (path / "results.json").write_text(json.dumps({
            "name": name, "run_dir": str(path), "task": "sst2", "main_metric": main,
            "metrics": {"valid": valid or {"accuracy": 0.8, "loss": 0.45},
                        "test": test or {"accuracy": 0.75, "loss": 0.5}},
            "params": {"total": total, "trainable": trainable, "trainable_pct": 100.0 * trainable / total},
            "train_samples_per_second": 38.25, "wall_time_s": 125.0}))
    return path


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from deltakd import cli

    monkeypatch.setattr(sys, "argv", ["deltakd", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def embedded_pngs(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_report_of_runs_markdown_and_self_contained_html(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    lora = make_run(runs, "sst2-lora", "20250101-000000", {"accuracy": 0.9125, "loss": 0.31},
                    {"accuracy": 0.875, "loss": 0.35}, peft={"method": "lora", "r": 8}, params=(22_713_216, 74_496))
    make_run(runs, "sst2-kd", "20250101-000000", teacher=True)
    code, out, err = run_cli(monkeypatch, capsys, "report", str(lora), str(runs / "sst2-kd"), "--out",
                             str(tmp_path / "rep"))
    assert code == 0, err
    md = (tmp_path / "rep" / "report.md").read_text()
    assert ("| run | method | params | trainable | valid accuracy | valid loss | test accuracy | test loss "
            "| wall time | samples/s |") in md
    assert ("| sst2-lora | lora | 22,713,216 | 74,496 (0.33%) | 0.9125 | 0.3100 | 0.8750 | 0.3500 | 2.1 min "
            "| 38.2 |") in md
    assert "| sst2-kd | full (kd) | 1,000 | 10 (1.00%) | 0.8000 | 0.4500 | 0.7500 | 0.5000 |" in md
    assert "![learning curves](learning_curves.png)" in md and "![test main metric per run](bars.png)" in md
    for png in ("learning_curves.png", "bars.png"):
        assert (tmp_path / "rep" / png).read_bytes().startswith(PNG_MAGIC)
    html = (tmp_path / "rep" / "report.html").read_text()
    images = embedded_pngs(html)
    assert len(images) == 2 and all(img.startswith(PNG_MAGIC) for img in images)
    assert "<td>sst2-lora</td><td>lora</td><td>22,713,216</td><td>74,496 (0.33%)</td><td>0.9125</td>" in html
    assert "<td>sst2-kd</td><td>full (kd)</td>" in html
    # opens offline: nothing fetched, nothing run
    assert "<script" not in html and not re.search(r'(src|href)="(https?:)?//', html)


def test_run_name_folder_means_its_newest_finished_run(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, "x", "20250101-000000", {"accuracy": 0.1, "loss": 1.0})
    newest_done = make_run(runs, "x", "20250102-000000", {"accuracy": 0.2, "loss": 1.0})
    make_run(runs, "x", "20250103-000000", finished=False)
    (data,) = collect([runs / "x"]).runs
    assert data.path == newest_done and data.metric("valid", "accuracy") == 0.2
    # the same name twice gets the run stamp in its label
    both = collect([runs / "x", runs / "x" / "20250101-000000"]).runs
    assert [r.label for r in both] == ["x/20250102-000000", "x/20250101-000000"]


def test_paths_that_are_not_runs_fail_naming_the_path(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    unfinished = make_run(runs, "y", "20250101-000000", finished=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    cases = {tmp_path / "nope": "does not exist", tmp_path / "empty": "is not a run directory",
             tmp_path / "file.txt": "is not a run directory", unfinished: "has not finished",
             runs / "y": "has no finished run"}
    for path, why in cases.items():
        with pytest.raises(DeltakdError, match=re.escape(str(path)) + ".*" + why):
            collect([path])
    code, _, err = run_cli(monkeypatch, capsys, "report", str(tmp_path / "empty"), "--out", str(tmp_path / "rep"))
    assert code == 2 and err.strip() == (f"error: report: '{tmp_path / 'empty'}' is not a run directory (with "
                                         "results.json), a run-name folder (runs/<name>/) or a sweep directory "
                                         "(with sweep.json)")
    assert not (tmp_path / "rep").exists()


def make_sweep(tmp_path: Path) -> tuple[Path, dict]:
    """A sweep dir as ``deltakd sweep`` writes it: 2 lrs x 3 seeds, plus one trial never finished."""
    sweep = tmp_path / "runs" / "s-sweep"
    acc = {(1e-5, 1): 0.80, (1e-5, 2): 0.84, (1e-5, 3): 0.83, (2e-5, 1): 0.86, (2e-5, 2): 0.88, (2e-5, 3): 0.85}
    trials = []
    for (lr, seed), a in acc.items():
        name = f"s--lr_{lr!r}--seed_{seed}"
        make_run(sweep, name, "20250101-000000", {"accuracy": a, "loss": 1 - a},
                 {"accuracy": a - 0.05, "loss": 1.1 - a})
        trials.append({"name": name, "setting": {"train.lr": lr, "train.seed": seed}})
    trials.append({"name": "s--lr_3e-05--seed_1", "setting": {"train.lr": 3e-5, "train.seed": 1}})
    (sweep / "sweep.json").write_text(json.dumps({"name": "s", "grid": {"train.lr": [1e-5, 2e-5, 3e-5],
                                                                        "train.seed": [1, 2, 3]}, "trials": trials}))
    return sweep, acc


def test_sweep_dir_report_has_the_summary_and_its_bar_chart(tmp_path):
    sweep, acc = make_sweep(tmp_path)
    files = build_report([sweep], tmp_path / "rep")
    md = files["markdown"].read_text()
    hi = [0.86, 0.88, 0.85]
    lo = [0.80, 0.84, 0.83]
    row = f"| **2e-05** ★ | 3 | {statistics.mean(hi):.4f} ± {statistics.stdev(hi):.4f} |"
    assert row in md and f"| 1e-05 | 3 | {statistics.mean(lo):.4f} ± {statistics.stdev(lo):.4f} |" in md
    assert (f"Best setting (highest mean valid accuracy): lr=2e-05 — valid accuracy {statistics.mean(hi):.4f} ± "
            f"{statistics.stdev(hi):.4f}, test accuracy {statistics.mean(hi) - 0.05:.4f}") in md
    assert "Not finished (1): s--lr_3e-05--seed_1" in md
    for name in (f"s--lr_{lr!r}--seed_{s}" for lr, s in acc):
        assert f"| {name} | full |" in md
    assert "![sweep s](sweep-1-s.png)" in md and "bars.png" not in md  # sweep given: its chart, not per-run bars
    html = files["html"].read_text()
    assert len(embedded_pngs(html)) == 2 and "<strong>2e-05</strong> ★" in html


def test_summary_statistics_by_hand(tmp_path):
    sweep, acc = make_sweep(tmp_path)
    trials = [Trial(f"s--lr_{lr!r}--seed_{s}", {"train.lr": lr, "train.seed": s},
                    load_run(sweep / f"s--lr_{lr!r}--seed_{s}" / "20250101-000000")) for lr, s in acc]
    summary = summarize("s", trials)
    assert summary.keys == ["train.lr"] and summary.columns == ["valid_accuracy", "valid_loss", "test_accuracy",
                                                                 "test_loss"]
    for st in summary.settings:
        vals = [a for (lr, _), a in acc.items() if lr == st.setting["train.lr"]]
        assert st.n == 3 and st.seeds == [1, 2, 3]
        assert st.mean["valid_accuracy"] == pytest.approx(statistics.mean(vals), abs=1e-12)
        assert st.std["valid_accuracy"] == pytest.approx(statistics.stdev(vals), abs=1e-12)
        assert st.mean["test_loss"] == pytest.approx(1.1 - statistics.mean(vals), abs=1e-12)
    assert [st.best for st in summary.settings] == [False, True]
    header, first = summary_csv(summary).splitlines()[:2]
    assert header == ("train.lr,n,seeds,valid_accuracy_mean,valid_accuracy_std,valid_loss_mean,valid_loss_std,"
                      "test_accuracy_mean,test_accuracy_std,test_loss_mean,test_loss_std,best")
    assert first.startswith("1e-05,3,1 2 3,")
    # perplexity: lower is better; the best setting is picked per PEFT method
    ppl = {("lora", 8): 30.0, ("lora", 16): 25.0, ("full", None): 20.0, ("full", 0): 22.0}
    trials = []
    for i, ((method, r), p) in enumerate(ppl.items()):
        path = make_run(tmp_path / "lm", f"lm{i}", "1", {"perplexity": p, "loss": math.log(p)}, main="perplexity")
        trials.append(Trial(f"lm{i}", {"peft.method": method, "peft.r": r}, load_run(path)))
    best = [(s.setting["peft.method"], s.setting["peft.r"]) for s in summarize("lm", trials).settings if s.best]
    assert best == [("lora", 16), ("full", None)]


def test_learning_curves_come_from_metrics_jsonl(tmp_path):
    run = load_run(make_run(tmp_path, "c", "1"))  # its last line is cut mid-write: skipped
    assert curves_of(run) == {"loss": [(5, 0.69), (10, 0.5)], "eval": [(10, 0.8)]}
    lm = load_run(make_run(tmp_path, "lm", "1", {"perplexity": 9.0, "loss": 2.2}, main="perplexity"))
    lm.events = [{"step": 4, "eval_loss": 2.0}]
    assert curves_of(lm)["eval"] == [(4, pytest.approx(math.exp(2.0)))]


def _distilled(root: Path) -> Path:
    """A distilled run whose results.json has the teacher comparison ``deltakd train`` prints."""
    path = make_run(root, "sst2-kd", "20250101-000000", teacher=True)
    results = json.loads((path / "results.json").read_text())
    results.update({"distill": {"teacher_metrics": {"test": {"accuracy": 0.9312, "loss": 0.21}},
                                "teacher_params": 109_482_240, "teacher_eval_samples_per_second": 120.5,
                                "speedup": 3.25},
                    "eval_samples_per_second": 391.6})
    (path / "results.json").write_text(json.dumps(results))
    events = [{"step": s, "loss": 2.0 / s, "loss_ce": 0.7 / s, "loss_kd": 3.1 / s} for s in (5, 10)]
    events.append({"step": 10, "eval_loss": 0.45, "eval_accuracy": 0.8})
    (path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return path


def test_html_has_the_teacher_vs_student_table(tmp_path):
    kd = _distilled(tmp_path / "runs")
    html = build_report([kd], tmp_path / "rep")["html"].read_text()
    assert "<h2>Teacher vs student</h2>" in html
    assert ("<tr><td>teacher</td><td>0.9312</td><td>0.2100</td><td>109,482,240</td><td>120.5</td></tr>") in html
    assert ("<tr><td>student</td><td>0.7500</td><td>0.5000</td><td>1,000</td><td>391.6</td></tr>") in html
    assert "student: 80.5% of the teacher&#x27;s accuracy" in html or "student: 80.5% of the teacher's accuracy" in html
    assert "109482.24x fewer parameters, 3.25x faster" in html


def test_each_loss_term_has_its_own_panel(tmp_path):
    """A teacher's cross-entropy and a student's weighted distillation objective never share an axis."""
    from deltakd.report.compare import curve_panels
    from deltakd.report.plots import curves_figure

    teacher = load_run(make_run(tmp_path / "runs", "teacher", "20250101-000000"))
    student = load_run(_distilled(tmp_path / "runs"))
    teacher.label, student.label = "teacher", "student"
    panels = curve_panels([teacher, student])
    assert list(panels) == ["training loss", "training objective (weighted sum of terms)", "loss term: ce",
                            "loss term: kd", "eval accuracy"]
    assert panels["training loss"] == {"teacher": [(5, 0.69), (10, 0.5)]}
    assert panels["training objective (weighted sum of terms)"] == {"student": [(5, 0.4), (10, 0.2)]}
    assert panels["loss term: kd"] == {"student": [(5, 3.1 / 5), (10, 3.1 / 10)]}
    assert set(panels["eval accuracy"]) == {"teacher", "student"}
    fig = curves_figure(panels)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == list(panels)
    by_title = {ax.get_title(): ax for ax in fig.axes}
    assert [line.get_label() for line in by_title["training loss"].lines] == ["teacher"]
    assert [line.get_label() for line in by_title["training objective (weighted sum of terms)"].lines] == ["student"]


def test_metric_bars_are_zoomed_to_the_data_with_error_bars(tmp_path):
    from deltakd.report.plots import bar_figure
    from deltakd.report.sweep_stats import summary_figure

    (ax,) = bar_figure(["a", "b"], {"test": [0.86, 0.85]}).axes
    low, high = ax.get_ylim()
    assert 0.8 < low < 0.85 and 0.86 < high < 0.9, (low, high)

    sweep, acc = make_sweep(tmp_path)
    trials = [Trial(f"s--lr_{lr!r}--seed_{s}", {"train.lr": lr, "train.seed": s},
                    load_run(sweep / f"s--lr_{lr!r}--seed_{s}" / "20250101-000000")) for lr, s in acc]
    summary = summarize("s", trials)
    (ax,) = summary_figure(summary).axes
    low, high = ax.get_ylim()
    ends = [s.mean[c] + sign * s.std[c] for s in summary.settings for c in ("valid_accuracy", "test_accuracy")
            for sign in (-1, 1)]
    assert 0 < low <= min(ends) and high >= max(ends), (low, high, ends)
    assert low > 0.7  # valid 0.82-0.86, test 0.77-0.81: not from zero
    bars = [c for c in ax.containers if hasattr(c, "errorbar")]
    assert len(bars) == 2 and all(c.errorbar is not None for c in bars)  # valid and test, each with mean ± std
    (bottom, top), _ = bars[0].errorbar.lines[2][0].get_segments()  # valid, lr 1e-05: mean ± std
    assert top[1] - bottom[1] == pytest.approx(2 * statistics.stdev([0.80, 0.84, 0.83]))
