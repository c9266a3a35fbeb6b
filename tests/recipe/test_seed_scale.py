"""The seeds' configurations as shipped recipes (``recipes/<family>/seed_scale/``): one or more per
family, each validating offline with no model weights anywhere (model fields are resolved when a run
starts, not when a recipe is checked), without torch or transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from deltakd.recipe import load_raw
from deltakd.recipe.kinds import recipe_kind

from ..conftest import ROOT, SHARED_DATA

SEED = sorted(p for p in (ROOT / "recipes").rglob("seed_scale/*.yaml") if not p.name.startswith("_"))
HEAVY = ("torch", "transformers", "datasets", "peft", "accelerate", "sentence_transformers", "huggingface_hub")


def _models(recipe: dict) -> list[str]:
    """Every model a recipe names: model, teacher, student (multistage), as written."""
    found = [(recipe.get("model") or {}).get("name"), (recipe.get("teacher") or {}).get("model"),
             (recipe.get("student") or {}).get("model")]
    return [m for m in found if m]


def test_every_family_has_its_seed_configurations():
    by_folder: dict[str, set[str]] = {}
    for path in SEED:
        by_folder.setdefault(path.parent.parent.name, set()).add(recipe_kind(load_raw(path)))
    assert by_folder == {"loraild": {"classification"}, "multistage": {"multistage"}, "dialogue": {"dialogue"},
                         "partial_kd": {"lm"}}
    models = {m for p in SEED for m in _models(load_raw(p))}
    assert {"FacebookAI/roberta-large", "FacebookAI/xlm-roberta-base", "microsoft/Multilingual-MiniLM-L12-H384",
            "microsoft/DialoGPT-small", "microsoft/DialoGPT-medium", "openai-community/gpt2"} <= models
    dialogue = {load_raw(p)["peft"]["method"] for p in SEED if p.parent.parent.name == "dialogue"}
    assert dialogue == {"full", "prefix", "prompt", "lora"}
    names = [load_raw(p)["name"] for p in SEED]
    assert len(set(names)) == len(names), "every seed recipe has its own run folder"


SCRIPT = """
import json, sys
from deltakd.recipe import load_raw
from deltakd.recipe.kinds import recipe_kind
from deltakd.validation import VALIDATORS
out = {}
check = sys.argv[1] == "1"
for path in sys.argv[2:]:
    raw = load_raw(path)
    recipe = VALIDATORS[recipe_kind(raw)](raw, source=path, check_files=check)
    dumped = recipe.model_dump(mode="json")
    out[path] = [dumped.get("model", {}).get("name"), (dumped.get("teacher") or {}).get("model"),
                 (dumped.get("student") or {}).get("model")]
heavy = sorted(m for m in sys.modules if m.split(".")[0] in %r)
print(json.dumps({"models": out, "heavy": heavy}))
""" % (HEAVY,)


def test_seed_recipes_validate_offline_without_weights_or_heavy_imports(tmp_path):
    """An empty Hugging Face cache, offline: every seed recipe validates (its data checked where ../shared
    is present), its hub ids kept as written, and nothing imports torch, transformers or huggingface_hub."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home"),
           "PYTHONWARNINGS": "ignore"}
    env.pop("HF_HUB_CACHE", None)
    check = "1" if SHARED_DATA.is_dir() else "0"
    out = subprocess.run([sys.executable, "-c", SCRIPT, check, *map(str, SEED)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    for path in SEED:
        assert [m for m in result["models"][str(path)] if m] == _models(load_raw(path)), path
    assert not (tmp_path / "empty-hf-home").exists(), "validation looked nothing up in the hub cache"


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="the seed recipes read ../shared data")
def test_dry_run_of_a_seed_recipe_prints_it_resolved(tmp_path):
    path = ROOT / "recipes" / "partial_kd" / "seed_scale" / "student_kd_pretrained.yaml"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")}
    out = subprocess.run([sys.executable, "-m", "deltakd.cli", "train", str(path), "--dry-run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    printed = yaml.safe_load(out.stdout)
    assert printed["teacher"]["model"] == "openai-community/gpt2" and printed["teacher"]["revision"] is None
    assert printed["student"]["from_teacher"]["nb_layers"] == 6 and printed["train"]["bf16"] is True
