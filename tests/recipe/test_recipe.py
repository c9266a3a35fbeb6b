from __future__ import annotations


import pytest
import yaml

from deltakd.errors import DeltakdError
from deltakd.recipe import load_raw, load_recipe, validate
from deltakd.recipe.load import parse_override

from ..conftest import ROOT, SHARED_DATA, write_recipe

RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def test_recipes_folder_is_not_empty():
    assert (ROOT / "recipes" / "quickstart.yaml") in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_loads_and_validates(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    if path.name.startswith("_"):  # partial bases are validated through the recipes that extend them
        assert isinstance(yaml.safe_load(path.read_text()), dict)
        return
    raw = load_raw(path)
    needs_shared = "../shared" in yaml.safe_dump(raw)
    check = not needs_shared or SHARED_DATA.is_dir()
    if raw.get("family") == "multistage":  # the multistage family has its own recipe model
        from deltakd.multistage.recipe import validate as validate_multistage

        recipe = validate_multistage(raw, str(path), check_files=check)
    elif "transfer" in raw:  # transfer recipes describe many runs: their own model (deltakd.transfer.recipe)
        from deltakd.transfer.recipe import validate_transfer
        from deltakd.transfer.run import check_recipe

        recipe = validate_transfer(raw, str(path), check_files=check)
        if check:
            check_recipe(recipe)  # every source and target run's ordinary recipe validates too
    else:
        recipe = validate(raw, str(path), check_files=check)
    assert recipe.name and recipe.description, "every recipe needs a name and a one-line description"


def test_extends_with_another_peft_method_replaces_the_section(tmp_path):
    from deltakd.recipe.load import deep_merge

    base = {"peft": {"method": "lora", "r": 8, "target": ["query"]}, "train": {"lr": 1e-3, "epochs": 3}}
    out = deep_merge(base, {"peft": {"method": "full"}, "train": {"lr": 1e-4}})
    assert out == {"peft": {"method": "full"}, "train": {"lr": 1e-4, "epochs": 3}}
    assert deep_merge(base, {"peft": {"r": 16}})["peft"] == {"method": "lora", "r": 16, "target": ["query"]}


def test_extends_merges_nested_sections_and_child_wins(tmp_path):
    write_recipe(tmp_path / "base.yaml", """
name: base
task: {name: sst2, data_dir: data, max_length: 64}
train: {lr: 1.0e-4, epochs: 2}
peft: {method: lora, r: 8, target: [query, value]}
""")
    write_recipe(tmp_path / "child.yaml", """
extends: base.yaml
name: child
train: {lr: 3.0e-4}
peft: {target: [query]}
""")
    r = load_recipe(tmp_path / "child.yaml", check_files=False)
    assert r.name == "child"
    assert r.train.lr == 3e-4 and r.train.epochs == 2  # merged, child wins
    assert r.task.max_length == 64
    assert r.peft.method == "lora" and r.peft.r == 8 and r.peft.target == ["query"]  # lists replace


def test_dotted_overrides_parse_yaml_values(tmp_path):
    write_recipe(tmp_path / "r.yaml", "name: r\ntask: {name: sst2, data_dir: data}\n")
    r = load_recipe(tmp_path / "r.yaml", ["train.lr=3e-5", "train.epochs=4", "peft={method: lora, r: 4}",
                                          "track=[]", "task.resplit_valid=0.1"], check_files=False)
    assert r.train.lr == pytest.approx(3e-5) and r.train.epochs == 4
    assert r.peft.method == "lora" and r.peft.r == 4
    assert r.track == [] and r.task.resplit_valid == 0.1
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])


@pytest.mark.parametrize("override, expected", [
    ("train.lrr=1", "unknown key 'train.lrr'; allowed keys: batch_size"),
    ("train.lr=fast", "train.lr: 'fast' is not allowed"),
    ("train.lr=-1", "train.lr: -1 is not allowed: Input should be greater than 0"),
    ("peft.method=lorax", "peft.method: 'lorax' is not a known method; allowed: 'full', 'lora'"),
    ("peft={method: lora, rank: 4}", "unknown key 'peft.rank'; allowed keys: alpha, dropout, full"),
    ("task.data_dir=no/such/dir", "task.data_dir: folder 'no/such/dir' does not exist"),
    ("track=[comet]", "track.0: 'comet' is not allowed: Input should be 'tensorboard', 'mlflow'"),
    ("task.resplit_valid=1.5", "task.resplit_valid: 1.5 is not allowed: Input should be less than 1"),
])
def test_bad_recipes_give_one_line_naming_key_value_and_allowed(tmp_path, override, expected):
    (tmp_path / "data").mkdir()
    write_recipe(tmp_path / "r.yaml", f"name: r\ntask: {{name: sst2, data_dir: {tmp_path / 'data'}}}\n")
    with pytest.raises(DeltakdError) as e:
        load_recipe(tmp_path / "r.yaml", [override])
    msg = str(e.value)
    assert "\n" not in msg
    assert expected in msg


def test_missing_recipe_and_extends_cycle_and_bad_yaml(tmp_path):
    with pytest.raises(DeltakdError, match="recipe file .* does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    write_recipe(tmp_path / "a.yaml", "extends: b.yaml\nname: a\n")
    write_recipe(tmp_path / "b.yaml", "extends: a.yaml\nname: b\n")
    with pytest.raises(DeltakdError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")
    write_recipe(tmp_path / "bad.yaml", "name: [unclosed\n")
    with pytest.raises(DeltakdError, match="line 2: invalid YAML"):
        load_recipe(tmp_path / "bad.yaml")


def test_a_curriculum_that_would_never_start_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    write_recipe(tmp_path / "r.yaml", f"name: r\ntask: {{name: sst2, data_dir: {tmp_path / 'data'}}}\n"
                 "teacher: {model: minilm-l6}\ntrain: {epochs: 1}\n"
                 "distill: {losses: {kd: 1.0}, curriculum: {at_epoch: 1, losses: {ce: 1.0}}}\n")
    with pytest.raises(DeltakdError, match=r"distill.curriculum.at_epoch: 1 is not before the end of training "
                                           r"\(train.epochs 1\)"):
        load_recipe(tmp_path / "r.yaml")
    assert load_recipe(tmp_path / "r.yaml", ["distill.curriculum.at_epoch=0.5"]).distill.curriculum.at_epoch == 0.5
    assert load_recipe(tmp_path / "r.yaml", ["train.max_steps=100"]).train.max_steps == 100  # steps decide
