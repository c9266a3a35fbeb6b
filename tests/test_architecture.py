"""The layering of ARCHITECTURE.md holds: import-linter contracts, file sizes, the family table and
the one recipe discriminator."""

from __future__ import annotations


import pytest
import yaml

from deltakd.families import FAMILIES, family, family_of, load
from deltakd.errors import DeltakdError
from deltakd.recipe.kinds import recipe_kind
from deltakd.runner import Family
from deltakd.runs import RunResults

from .conftest import ROOT

SRC = ROOT / "src" / "deltakd"


def test_import_contracts_hold(capsys):
    """`lint-imports` with the contracts in pyproject.toml: layers from the CLI down, families
    independent of each other, no import cycle between sibling modules at any depth."""
    from importlinter.cli import lint_imports

    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    assert code == 0, capsys.readouterr().out[-3000:]


def test_no_source_file_over_500_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert not long


def test_every_family_in_the_table_is_a_family_and_named_by_its_key():
    assert set(FAMILIES) == {"classification", "lm", "dialogue", "multistage"}
    for name, fam in FAMILIES.items():
        assert isinstance(fam, Family) and fam.name == name


@pytest.mark.parametrize("raw, kind", [
    ({"task": {"name": "sst2"}}, "classification"),
    ({"task": {"name": "stsb", "kind": "regression"}}, "classification"),
    ({"task": {"name": "tiny", "kind": "lm"}}, "lm"),
    ({"task": {"name": "dd", "kind": "dialogue"}}, "dialogue"),
    ({"family": "multistage", "data": {}}, "multistage"),
    ({"name": "t", "transfer": {}}, "transfer"),
])
def test_one_discriminator_tells_recipe_kinds_apart(raw, kind):
    assert recipe_kind(raw) == kind


def test_unknown_family_and_transfer_recipes_are_refused_with_one_line():
    with pytest.raises(DeltakdError, match=r"family: 'vision' is not one of classification, lm, dialogue, multistage"):
        family(recipe_kind({"family": "vision"}))
    with pytest.raises(DeltakdError, match="deltakd transfer"):
        family("transfer")


def test_every_shipped_recipe_has_a_kind_and_its_family_validates_it():
    for path in sorted((ROOT / "recipes").rglob("*.yaml")):
        if path.name.startswith("_"):
            continue
        raw = yaml.safe_load(path.read_text())
        if recipe_kind(raw) == "transfer":
            continue
        recipe, fam = load(path, check_files=False)
        assert family_of(recipe) is fam, path


def test_run_results_round_trip_flat_and_typed(tmp_path):
    r = RunResults("x", str(tmp_path), family="classification", metrics={"test": {"accuracy": 0.75}},
                   train_steps=3, extra={"distill": {"speedup": 2.0}})
    data = r.to_json()
    assert data["distill"] == {"speedup": 2.0} and "extra" not in data and data["train_steps"] == 3
    back = RunResults.from_json(data)
    assert back == r and back["metrics"]["test"]["accuracy"] == 0.75 and back.get("distill")["speedup"] == 2.0
    assert dict(back) == data
    with pytest.raises(ValueError, match="shadow"):
        RunResults("x", "y", extra={"metrics": {}}).to_json()
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(DeltakdError, match="not a readable results file"):
        RunResults.read(tmp_path)
