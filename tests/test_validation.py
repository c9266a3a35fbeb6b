"""A bad recipe is refused before torch, transformers or datasets load (one line, exit 2, fast);
``--dry-run`` prints the resolved recipe without them; the light validators are the families'."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT, write_recipe, write_toy_task

HEAVY = ("torch", "transformers", "datasets", "peft", "accelerate", "sentence_transformers")

# runs the CLI in this process and, whatever happens, prints the heavy modules it loaded
WRAPPER = f"""
import json, sys
try:
    from deltakd.cli import main
    main()
finally:
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
    sys.stderr.write("\\nHEAVY " + json.dumps(heavy) + "\\n")
"""


def _cli_light(*args: str, cwd: Path = ROOT) -> tuple[subprocess.CompletedProcess, list[str], float, float]:
    """(process, heavy modules loaded, wall seconds, CPU seconds of the child)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", WRAPPER, *args], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=300)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    marker = [ln for ln in out.stderr.splitlines() if ln.startswith("HEAVY ")]
    assert marker, out.stderr[-2000:]
    return out, json.loads(marker[-1].removeprefix("HEAVY ")), wall, cpu


def _run_recipe(tmp_path: Path) -> Path:
    data = write_toy_task(tmp_path / "toy")
    return write_recipe(tmp_path / "tiny.yaml", f"""
name: tiny
task: {{name: sst2, data_dir: {data}, resplit_valid: 0.2, max_length: 16}}
model: {{name: minilm-l6}}
peft: {{method: lora, r: 4}}
train: {{epochs: 1, batch_size: 16}}
track: []
output_dir: {tmp_path / 'runs'}
""")


def _error_lines(out: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in out.stderr.splitlines() if ln.strip() and not ln.startswith("HEAVY ")]


@pytest.mark.parametrize("command, recipe, extra, expected", [
    ("train", "run", ["train.batch_size=0"], "train.batch_size: 0 is not allowed: Input should be greater than 0"),
    ("train", "run", ["task.data_dir=/no/such/folder"], "task.data_dir: folder '/no/such/folder' does not exist"),
    ("train", "transfer", [], "this is a transfer recipe (many runs); run it with `deltakd transfer`"),
    ("sweep", "run", ["sweep.train.lr=[1e-4,2e-4]", "train.lrr=1"], "unknown key 'train.lrr'"),
    ("pipeline", "run", [], "not a multistage recipe (needs 'family: multistage')"),
    ("pipeline", "multistage", ["--set", "train.lrr=1"], "unknown key 'train.lrr'"),
    ("transfer", "transfer", ["transfer.estimate.estimators=[bogus]"], "estimate.estimators: unknown ['bogus']"),
])
def test_bad_recipe_is_refused_before_the_heavy_imports(tmp_path, command, recipe, extra, expected):
    path = {"run": lambda: _run_recipe(tmp_path), "transfer": lambda: ROOT / "recipes/transfer/small.yaml",
            "multistage": lambda: ROOT / "recipes/multistage/mse.yaml"}[recipe]()
    out, heavy, wall, cpu = _cli_light(command, str(path), *extra)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = _error_lines(out)
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert heavy == [], f"refused only after importing {sorted({m.split('.')[0] for m in heavy})}"
    # importing torch + transformers alone costs several CPU seconds; CPU time is steadier than wall
    # time on a shared machine (wall time is printed: pytest -s)
    print(f"{command} refused in {wall:.2f} s wall, {cpu:.2f} s CPU")
    assert cpu < 2.0, f"refusal took {cpu:.2f} s of CPU"
    assert not (tmp_path / "runs").exists()


def test_dry_run_prints_the_resolved_recipe_without_the_heavy_imports(tmp_path):
    from deltakd import families

    path = _run_recipe(tmp_path)
    out, heavy, _, _ = _cli_light("train", str(path), "train.lr=3e-4", "--dry-run")
    assert out.returncode == 0, out.stderr[-2000:]
    assert heavy == []
    printed = yaml.safe_load(out.stdout)
    recipe, fam = families.load(path, ["train.lr=3e-4"])
    assert printed == fam.dump(recipe)  # every default filled in, as the run's recipe.yaml
    assert printed["train"]["lr"] == 3e-4 and printed["peft"]["r"] == 4 and "grad_accum" in printed["train"]
    assert not (tmp_path / "runs").exists()


def test_dry_run_of_a_sweep_and_a_transfer_recipe(tmp_path):
    path = _run_recipe(tmp_path)
    out, heavy, _, _ = _cli_light("sweep", str(path), "sweep.train.lr=[1e-4,2e-4]", "--dry-run")
    assert out.returncode == 0 and heavy == [], out.stderr[-2000:]
    grid = yaml.safe_load(out.stdout)["sweep"]
    assert list(grid) == ["train.lr"] and [float(v) for v in grid["train.lr"]] == [1e-4, 2e-4]
    out, heavy, _, _ = _cli_light("transfer", str(ROOT / "recipes/transfer/small.yaml"), "--dry-run")
    assert out.returncode == 0 and heavy == [], out.stderr[-2000:]
    assert "estimate" in yaml.safe_load(out.stdout)["transfer"]


def test_the_light_validators_are_the_families():
    from deltakd.families import FAMILIES
    from deltakd.recipe import load_raw
    from deltakd.recipe.kinds import TRANSFER, recipe_kind
    from deltakd.transfer.estimator_names import ESTIMATOR_NAMES
    from deltakd.transfer.estimators import ESTIMATORS
    from deltakd.validation import RUN_KINDS, VALIDATORS

    assert RUN_KINDS == tuple(FAMILIES)
    assert ESTIMATOR_NAMES == tuple(ESTIMATORS)
    seen = set()
    for path in sorted((ROOT / "recipes").rglob("*.yaml")):
        if path.name.startswith("_"):
            continue
        raw = load_raw(path)
        kind = recipe_kind(raw)
        seen.add(kind)
        light = VALIDATORS[kind](raw, source=str(path), check_files=False)
        if kind != TRANSFER:
            full = FAMILIES[kind].validate(raw, source=str(path), check_files=False)
            assert type(light) is type(full) and light == full, path
    assert seen == set(VALIDATORS)
