"""Every recipe of the loraild family runs end to end, shrunk to a tiny 6-layer model and a few steps."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltakd import api

from ..conftest import ROOT, sentiment_rows, write_tsv

STUDENTS = ["nokd", "lorakd", "railkd_c", "railkd_l", "curriculum_railkd", "curriculum_full_loraild",
            "loraild_average", "loraild_random"]


@pytest.fixture(scope="module")
def setting(tmp_path_factory, minilm_path):
    """A 6-layer hidden-32 BERT (MiniLM's tokenizer), toy data, and the loraild teacher trained on them."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("loraild")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_path)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder / "bert6")
    tok.save_pretrained(folder / "bert6")
    write_tsv(folder / "toy" / "train.tsv", sentiment_rows(200, 1))
    write_tsv(folder / "toy" / "dev.tsv", sentiment_rows(60, 2))
    common = [f"task.data_dir={folder / 'toy'}", "task.max_length=16", f"output_dir={folder / 'runs'}",
              "train.batch_size=16", "train.eval_batch_size=64", "train.logging_steps=1"]
    teacher = api.train(ROOT / "recipes/loraild/teacher.yaml",
                        [*common, f"model.name={folder / 'bert6'}", "train.max_steps=4"])
    return common + [f"teacher.run={teacher['run_dir']}"], teacher


@pytest.mark.parametrize("method", STUDENTS)
def test_student_recipe_runs_and_logs_its_losses(setting, method):
    overrides, teacher = setting
    res = api.train(ROOT / f"recipes/loraild/{method}.yaml", [*overrides, "train.max_steps=4", "train.batch_size=96",
                                                              "train.eval_every=2"])
    assert res["train_steps"] == 4
    assert res["params"]["total"] < res["distill"]["teacher_params"]  # 3 of the teacher's 6 layers
    from deltakd.runs import RunDir

    logged = set().union(*(e.keys() for e in RunDir(Path(res["run_dir"])).read_events()))
    recipe = api.load_recipe(ROOT / f"recipes/loraild/{method}.yaml", overrides)
    active = {k for k, w in recipe.distill.losses.items() if w > 0}
    if recipe.distill.curriculum is not None:
        active |= {k for k, w in (recipe.distill.curriculum.losses or {}).items() if w > 0}
    # each term with weight at some point is logged on its own (2 steps per epoch: the curriculum is reached)
    assert {f"loss_{k}" for k in active} <= logged


def test_own_student_recipe_trains_a_named_student_with_its_own_tokenizer(setting, tmp_path, minilm_path):
    """loraild_own_student.yaml with its model.name pointed at a tiny 4-layer, hidden-16 BERT (not copied
    from the hidden-32 teacher) whose tokenizer is MiniLM's saved with model_max_length 48: the run tokenises
    with it and saves it, and lora_ild runs across the widths (same LoRA rank)."""
    import json

    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from deltakd.runs import RunDir

    overrides, teacher = setting
    torch.manual_seed(1)
    tok = AutoTokenizer.from_pretrained(minilm_path, model_max_length=48)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(tmp_path / "own")
    tok.save_pretrained(tmp_path / "own")
    res = api.train(ROOT / "recipes/loraild/loraild_own_student.yaml",
                    [*overrides, f"model.name={tmp_path / 'own'}", "train.max_steps=4", "train.batch_size=96"])
    assert res["train_steps"] == 4 and res["distill"]["layer_map"] == "random"
    model_dir = RunDir(Path(res["run_dir"])).model_dir
    saved = json.loads((model_dir / "tokenizer_config.json").read_text())
    teacher_saved = json.loads((RunDir(Path(teacher["run_dir"])).model_dir / "tokenizer_config.json").read_text())
    assert saved["model_max_length"] == 48 and teacher_saved["model_max_length"] == 512  # the student's, not the teacher's
    config = json.loads(next(model_dir.rglob("config.json")).read_text())
    assert config["hidden_size"] == 16 and config["num_hidden_layers"] == 4  # the named student, not teacher layers
    terms = [e["loss_lora_ild"] for e in RunDir(Path(res["run_dir"])).read_events() if "loss_lora_ild" in e]
    assert terms and all(t > 0 for t in terms)
