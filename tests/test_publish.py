"""Outputs that travel: a portable model/ (base model by name, label names), the model card, `deltakd push`
(the Hub calls faked, nothing leaves the machine) and `deltakd predict`."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from deltakd import api
from deltakd.cli import main
from deltakd.models import hub
from deltakd.runs import RunDir

from .conftest import write_recipe, write_toy_task

BASE_ID = "deltakd-test/tiny-bert"  # the hub id the test alias stands for


class FakeHub:
    """Records what HfApi.create_repo / upload_folder were asked to do."""

    def __init__(self, monkeypatch):
        from huggingface_hub import HfApi

        self.calls: list[tuple[str, dict]] = []
        fake = self

        def create_repo(self, repo_id, **kw):
            fake.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kw):
            folder = Path(kw["folder_path"])
            kw["files"] = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
            kw["card"] = (folder / "README.md").read_text(encoding="utf-8")
            kw["run_finished"] = (folder.parent / "results.json").is_file()
            fake.calls.append(("upload_folder", kw))

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_bert):
    """An alias for the tiny BERT (as minilm-l6 is for MiniLM), and the toy task."""
    mp = pytest.MonkeyPatch()
    mp.setitem(hub.ALIASES, "tiny-bert", lambda: str(tiny_bert))
    mp.setitem(hub.HUB_IDS, "tiny-bert", BASE_ID)
    root = tmp_path_factory.mktemp("publish")
    yield {"root": root, "toy": write_toy_task(root / "toy"), "tiny_bert": tiny_bert}
    mp.undo()


def _recipe(world, name: str, peft: dict, **extra) -> dict:
    return {"name": name, "task": {"name": "sst2", "data_dir": str(world["toy"]), "resplit_valid": 0.2,
                                   "max_length": 16, "max_train_samples": 64, "max_eval_samples": 40},
            "model": {"name": "tiny-bert"}, "peft": peft,
            "train": {"epochs": 2, "lr": 5.0e-3, "batch_size": 16, "eval_batch_size": 64, "seed": 3},
            "track": [], "output_dir": str(world["root"] / "runs"), **extra}


@pytest.fixture(scope="module")
def lora_run(world) -> RunDir:
    """A LoRA run (merged copy too), from a recipe dict."""
    results = api.train(_recipe(world, "lora", {"method": "lora", "r": 4, "target": ["query", "value"],
                                                "merge": True}))
    return RunDir(Path(results["run_dir"]))


@pytest.fixture(scope="module")
def full_run(world):
    """A full fine-tuning run from a YAML file with a hub: section; the push it makes, recorded."""
    mp = pytest.MonkeyPatch()
    fake = FakeHub(mp)
    path = write_recipe(world["root"] / "full.yaml", yaml.safe_dump(
        _recipe(world, "full", {"method": "full"}, hub={"repo": "someone/tiny-full", "private": True})))
    results = api.train(path)
    mp.undo()
    return RunDir(Path(results["run_dir"])), fake.calls


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["deltakd", *args])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


# --- 1. the base model by the name the recipe used ----------------------------------------------

def test_alias_is_recorded_by_its_hub_id_which_resolves_offline():
    packaged = hub.resolve_model_path("minilm-l6")
    assert hub.portable_name("minilm-l6") == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub.resolve_model_path("sentence-transformers/all-MiniLM-L6-v2") == packaged  # no download
    assert hub.portable_name("bert-base-uncased") == "bert-base-uncased"


def test_saved_adapter_names_the_recipes_base_model_not_a_path(lora_run, world):
    model_dir = lora_run.model_dir
    adapter = json.loads((model_dir / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == BASE_ID
    assert json.loads((model_dir / "deltakd_model.json").read_text())["base_model"] == BASE_ID
    here = str(world["tiny_bert"])
    for f in model_dir.rglob("*"):
        if f.suffix in (".json", ".md"):
            assert here not in f.read_text(encoding="utf-8"), f
    # deltakd reloads it offline (the hub id resolves to the local copy), as the adapter and as the merged model
    model, _ = api.load_trained(lora_run.path)
    assert type(model).__name__ == "PeftModelForSequenceClassification"
    merged, _ = api.load_trained(lora_run.path, merged=True)
    assert type(merged).__name__ == "BertForSequenceClassification"


# --- 2. label names ------------------------------------------------------------------------------

def test_pipeline_of_a_full_fine_tuned_model_answers_with_label_names(full_run):
    from transformers import pipeline

    run, _ = full_run
    config = json.loads((run.model_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["label2id"] == {"negative": 0, "positive": 1}
    pipe = pipeline("text-classification", model=str(run.model_dir))
    answers = pipe(["the movie was wonderful", "a dull plot"])
    assert {a["label"] for a in answers} <= {"negative", "positive"} and answers[0]["label"] in ("negative", "positive")


def test_merged_and_reloaded_adapter_carry_label_names(lora_run):
    merged = json.loads((lora_run.model_dir / "merged" / "config.json").read_text())
    assert merged["id2label"] == {"0": "negative", "1": "positive"}
    model, _ = api.load_trained(lora_run.path)
    assert model.config.id2label == {0: "negative", 1: "positive"}


# --- 3. the model card ---------------------------------------------------------------------------

def test_model_card_of_a_full_fine_tuned_run(full_run):
    from huggingface_hub import ModelCard

    run, _ = full_run
    res = json.loads(run.results_file.read_text())
    card = ModelCard.load(run.model_dir / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-classification"
    assert card.data.base_model == BASE_ID and "deltakd" in card.data.tags
    reported = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert reported[("test", "accuracy")] == res["metrics"]["test"]["accuracy"]
    text = card.text
    for split in ("valid", "test"):
        assert f"| {split} | {res['metrics'][split]['loss']:.4f} | {res['metrics'][split]['accuracy']:.4f} |" in text
    assert f"{res['params']['total']:,} in all, {res['params']['trainable']:,} trained" in text
    assert "full fine-tuning" in text and "negative, positive" in text
    assert "pipeline(\"text-classification\"" in text
    assert f"'train': {res['examples']['train']}" in text
    recipe_block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(recipe_block)["train"]["lr"] == 5.0e-3


def test_model_card_of_an_adapter_replaces_peft_template(lora_run):
    text = (lora_run.model_dir / "README.md").read_text(encoding="utf-8")
    assert "[More Information Needed]" not in text  # peft's blank template
    assert "PEFT: lora (r=4" in text and "AutoPeftModelForSequenceClassification" in text
    assert "library_name: peft" in text and 'subfolder="merged"' in text


def test_model_card_names_teacher_and_distillation_losses(tmp_path):
    from deltakd.publish import render_card

    run = RunDir(tmp_path / "run")
    run.model_dir.mkdir(parents=True)
    (run.model_dir / "deltakd_model.json").write_text(json.dumps(
        {"base_model": "/x/student", "method": "full", "problem_type": "single_label_classification",
         "num_labels": 2, "labels": ["0", "1"], "label_names": ["no", "yes"], "format": "transformers"}))
    run.recipe_file.write_text(yaml.safe_dump({
        "name": "kd", "task": {"name": "toy", "data_dir": "data/toy"}, "peft": {"method": "full"},
        "teacher": {"model": "someone/teacher", "run": None}, "student": {"from_teacher": {"layers": [0, 2]}},
        "distill": {"losses": {"ce": 0.5, "kd": 0.5}, "temperature": 2.0}}))
    results = {"name": "kd", "metrics": {"test": {"accuracy": 0.8125}}, "main_metric": "accuracy",
               "params": {"total": 1000, "trainable": 1000, "trainable_pct": 100.0},
               "distill": {"teacher_params": 4000, "speedup": 2.5}}
    text = render_card(run, results, "me/kd")
    assert "**Teacher**: `someone/teacher`" in text and "ce × 0.5, kd × 0.5 (temperature 2.0)" in text
    assert "layers {'layers': [0, 2]}" in text and "4,000" in text and "×2.5000" in text
    assert "| test | 0.8125 |" in text and 'model="me/kd"' in text and "no, yes" in text
    assert "base_model:" not in text.split("---")[1]  # a local path is no Hub id


# --- 4. push -------------------------------------------------------------------------------------

def test_push_uploads_model_folder_with_its_card(lora_run, monkeypatch, capsys):
    fake = FakeHub(monkeypatch)
    code, out, err = _cli(monkeypatch, capsys, "push", str(lora_run.path), "--repo", "me/tiny-lora", "--private")
    assert code == 0, err
    (c, create), (u, upload) = fake.calls
    assert c == "create_repo" and create["repo_id"] == "me/tiny-lora" and create["private"] is True
    assert u == "upload_folder" and upload["repo_id"] == "me/tiny-lora"
    assert Path(upload["folder_path"]) == lora_run.model_dir
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "deltakd_model.json",
            "merged/config.json"} <= set(upload["files"])
    assert 'from_pretrained("me/tiny-lora")' in upload["card"]  # the card names where it now lives
    assert "me/tiny-lora" in out


def test_push_of_an_unfinished_run_or_bad_repo_is_one_line_exit_2(lora_run, tmp_path, monkeypatch, capsys):
    fake = FakeHub(monkeypatch)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(lora_run.path, unfinished)
    (unfinished / "results.json").unlink()
    code, _, err = _cli(monkeypatch, capsys, "push", str(unfinished), "--repo", "me/x")
    assert code == 2 and err.strip().count("\n") == 0 and "has not finished (no results.json)" in err
    code, _, err = _cli(monkeypatch, capsys, "push", str(lora_run.path), "--repo", "not a repo")
    assert code == 2 and err.strip().count("\n") == 0 and "repository id 'not a repo'" in err
    assert fake.calls == []


def test_push_offline_is_one_line(lora_run, monkeypatch, capsys):
    code, _, err = _cli(monkeypatch, capsys, "push", str(lora_run.path), "--repo", "me/x")
    assert code == 2 and err.startswith("error: push to 'me/x' failed") and err.strip().count("\n") == 0


def test_recipe_hub_section_pushes_after_a_successful_run(full_run):
    run, calls = full_run
    assert [c for c, _ in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1]["repo_id"] == "someone/tiny-full" and calls[0][1]["private"] is True
    upload = calls[1][1]
    assert Path(upload["folder_path"]) == run.model_dir and upload["run_finished"]
    assert {"README.md", "config.json", "model.safetensors"} <= set(upload["files"])


# --- 5. predict ----------------------------------------------------------------------------------

def test_predict_gives_label_names_and_the_pipelines_scores(full_run, monkeypatch, capsys):
    from transformers import pipeline

    run, _ = full_run
    texts = ["the movie was wonderful", "a dull plot"]
    preds = api.predict(run.path, texts)
    pipe = pipeline("text-classification", model=str(run.model_dir))
    for p, ref in zip(preds, pipe(texts)):
        assert p["label"] == ref["label"] and p["score"] == pytest.approx(ref["score"], abs=1e-5)
        assert set(p["scores"]) == {"negative", "positive"} and sum(p["scores"].values()) == pytest.approx(1.0)
    code, out, err = _cli(monkeypatch, capsys, "predict", str(run.path), *texts)
    assert code == 0, err
    for text, p in zip(texts, preds):
        line = next(x for x in out.splitlines() if text in x)
        assert p["label"] in line and f"{p['score']:.4f}" in line


def test_predict_of_an_adapter_run_matches_its_model(lora_run):
    import torch

    model, tok = api.load_trained(lora_run.path)
    preds = api.predict(lora_run.path, "the movie was wonderful")
    with torch.no_grad():
        probs = model(**tok(["the movie was wonderful"], return_tensors="pt")).logits.softmax(-1)[0]
    assert preds[0]["label"] == ["negative", "positive"][int(probs.argmax())]
    assert preds[0]["score"] == pytest.approx(float(probs.max()), abs=1e-5)


def test_model_card_of_a_multistage_stage(tmp_path):
    from deltakd.publish import render_card

    run = RunDir(tmp_path / "run")
    run.model_dir.mkdir(parents=True)
    (run.model_dir / "modules.json").write_text("[]")
    run.recipe_file.write_text(yaml.safe_dump({
        "family": "multistage", "name": "stage", "init_from": "runs/ms/a", "teacher": {"model": "minilm-l6"},
        "data": {"train": [{"path": "data/en-de.tsv", "lang": "de"}]}, "student": {"model": None, "normalize": "auto"},
        "loss": {"mse": 1.0, "mcl": 0.5, "ce": 0.0, "temperature": 0.05}}))
    results = {"name": "stage", "metrics": {"test": {"avg/sts_spearman": 0.75}}, "family": "multistage"}
    text = render_card(run, results, "me/stage")
    assert "library_name: sentence-transformers" in text and "pipeline_tag: sentence-similarity" in text
    assert 'SentenceTransformer("me/stage")' in text and "mse × 1.0" in text and "mcl × 0.5" in text
    assert "ce × 0" not in text
    assert "from stage `runs/ms/a`" in text and "`data/en-de.tsv`" in text and "| test | 0.7500 |" in text
