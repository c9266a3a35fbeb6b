"""Hub ids in every family, offline: tiny models in a hub-cache layout under a temporary ``HF_HOME``
(``tests/hubcache.py``), loaded by ``org/name`` (and ``revision``) with ``HF_HUB_OFFLINE=1``.

Classification (teacher + own student), causal-LM KD (padded vocabularies), dialogue with its act
classifier, a multistage stage (sentence-transformers teacher and student) and a transfer backbone.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from deltakd import api
from deltakd.errors import DeltakdError
from deltakd.runs import RunDir

from .conftest import ROOT, sentiment_rows, write_recipe, write_tsv
from .hubcache import BERT, BERT_STUDENT, GPT2, GPT2_OTHER, GPT2_STUDENT, PINNED, SENTENCE

DIALOGUE = ROOT / "data" / "dailydialog_sample"


def _events(res) -> list[dict]:
    return RunDir(Path(res.run_dir)).read_events()


def _classification(tmp_path: Path, toy: Path, body: str) -> Path:
    return write_recipe(tmp_path / "c.yaml", f"""
name: c
output_dir: {tmp_path / 'runs'}
task: {{name: sst2, data_dir: {toy}, resplit_valid: 0.2, max_length: 16, max_train_samples: 64}}
train: {{max_steps: 2, batch_size: 16, eval_batch_size: 32, seed: 3, logging_steps: 1}}
track: []
{body}
""")


def test_classification_teacher_and_own_student_by_hub_id(hub_home, tmp_path, toy_task):
    """Teacher and a LoRA student, both hub ids pinned to their snapshot's commit; the student trains and saves
    with its own tokenizer, its adapter names the hub id and revision, and reloads offline from the cache."""
    res = api.train(_classification(tmp_path, toy_task, f"""
teacher: {{model: {BERT}, revision: {hub_home[BERT]}}}
model: {{name: {BERT_STUDENT}, revision: {hub_home[BERT_STUDENT]}}}
peft: {{method: lora, r: 2, target: [query, value]}}
distill: {{losses: {{ce: 0.5, kd: 0.5}}, cache_teacher: false}}
"""))
    model_dir = Path(res.run_dir) / "model"
    meta = json.loads((model_dir / "deltakd_model.json").read_text())
    assert (meta["base_model"], meta["base_revision"], meta["format"]) == (BERT_STUDENT, hub_home[BERT_STUDENT], "peft")
    assert json.loads((model_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == BERT_STUDENT
    tok = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tok["model_max_length"] == 64  # the student's own tokenizer (the teacher's says 512)
    assert res["distill"]["teacher_forwards"] == 2 and res["distill"]["teacher_params"] > res.params["total"]
    model, tokenizer = api.load_trained(res.run_dir)  # the base from the hub cache, at the recorded revision
    assert model.base_model.model.bert.config.num_hidden_layers == 1 and tokenizer.model_max_length == 64


def test_classification_full_student_by_hub_id_at_main(hub_home, tmp_path, toy_task):
    res = api.train(_classification(tmp_path, toy_task, f"""
teacher: {{model: {BERT}}}
model: {{name: {BERT_STUDENT}}}
peft: {{method: full}}
distill: {{losses: {{kd: 1.0}}}}
"""))
    meta = json.loads((Path(res.run_dir) / "model" / "deltakd_model.json").read_text())
    assert meta["base_model"] == BERT_STUDENT and "base_revision" not in meta and res["distill"]["teacher_cache"]


def test_an_unknown_revision_is_one_line_exit_2(hub_home, tmp_path, toy_task, capsys, monkeypatch):
    from deltakd import cli

    path = _classification(tmp_path, toy_task, f"model: {{name: {BERT}, revision: v9.9}}")
    monkeypatch.setattr(sys, "argv", ["deltakd", "train", str(path)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines == [f"error: tokenizer '{BERT}': revision 'v9.9' is not in the local hub cache "
                     f"(cached: main, {hub_home[BERT]})"]
    assert not (tmp_path / "runs").exists()


def test_a_model_missing_from_the_cache_names_the_revision(hub_home):
    from deltakd.models.hub import model_dir

    with pytest.raises(DeltakdError, match=r"^teacher.model 'deltakd-test/absent' \(revision 'abc'\): not found "
                                           r"locally and the hub is offline \(HF_HUB_OFFLINE=1\)"):
        model_dir("deltakd-test/absent", "abc", "teacher.model")
    assert model_dir(SENTENCE).name == hub_home[SENTENCE]  # refs/main -> the snapshot folder
    assert model_dir(SENTENCE, hub_home[SENTENCE]).name == hub_home[SENTENCE]


# --- causal LMs -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("lm")
    stories = [s.strip() for s in (ROOT / "data" / "tinystories" / "train.txt").read_text(encoding="utf-8")
               .split("<|endoftext|>") if s.strip()]
    (d / "train.txt").write_text("<|endoftext|>".join(stories[:30]), encoding="utf-8")
    (d / "valid.txt").write_text("<|endoftext|>".join(stories[30:35]), encoding="utf-8")
    return d


def _lm(tmp_path: Path, data: Path, body: str) -> Path:
    return write_recipe(tmp_path / "lm.yaml", f"""
name: lm
output_dir: {tmp_path / 'runs'}
task: {{name: tiny-stories, kind: lm, data_dir: {data}, train_file: train.txt, valid_file: valid.txt, block_size: 16}}
peft: {{method: full}}
train: {{max_steps: 3, batch_size: 8, eval_batch_size: 8, seed: 1, logging_steps: 1}}
track: []
{body}
""")


def _vocab(folder: Path) -> dict[str, int]:
    return json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]


def _snapshot(repo: str) -> Path:
    """The cached snapshot folder of ``repo`` (huggingface_hub, offline)."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo))


def test_lm_kd_between_padded_vocabularies_by_hub_id(hub_home, tmp_path, lm_data):
    """Teacher logits over 320 rows, student over 384, one 300-token tokenizer: KD compares the shared tokens."""
    res = api.train(_lm(tmp_path, lm_data, f"""
teacher: {{model: {GPT2}, revision: {hub_home[GPT2]}}}
model: {{name: {GPT2_STUDENT}}}
distill: {{losses: {{ce: 0.5, kd: 0.5}}}}
"""))
    kd = [e["loss_kd"] for e in _events(res) if "loss_kd" in e]
    assert len(kd) == 3 and all(math.isfinite(v) and v > 0 for v in kd)
    saved = Path(res.run_dir) / "model"
    assert _vocab(saved) == _vocab(_snapshot(GPT2_STUDENT)) and len(_vocab(saved)) == 300
    assert json.loads((saved / "config.json").read_text())["vocab_size"] == 384  # the student's rows, kept


def test_lm_model_by_hub_id_trains_with_its_own_tokenizer(hub_home, tmp_path, lm_data):
    """No teacher, no model.tokenizer: the pretrained model's tokenizer, not a BPE trained on the data."""
    res = api.train(_lm(tmp_path, lm_data, f"model: {{name: {GPT2}, revision: main}}"))
    assert _vocab(Path(res.run_dir) / "model") == _vocab(_snapshot(GPT2))
    assert math.isfinite(res.metrics["valid"]["perplexity"])


def test_lm_students_of_another_tokenizer_are_refused_naming_both(hub_home, tmp_path, lm_data):
    with pytest.raises(DeltakdError) as e:
        api.train(_lm(tmp_path, lm_data, f"""
teacher: {{model: {GPT2}}}
model: {{name: {GPT2_OTHER}}}
distill: {{losses: {{ce: 0.5, kd: 0.5}}}}
"""))
    msg = str(e.value)
    assert "\n" not in msg and f"'{GPT2}' (300 tokens)" in msg and f"'{GPT2_OTHER}' (280 tokens)" in msg
    assert "distill.losses kd compare distributions over the teacher's vocabulary" in msg
    assert not (tmp_path / "runs").exists()


# --- dialogue -------------------------------------------------------------------------------------


def _dialogue(tmp_path: Path, name: str, kind: str, body: str) -> Path:
    return write_recipe(tmp_path / f"{name}.yaml", f"""
name: {name}
output_dir: {tmp_path / 'runs'}
task:
  name: dd
  kind: {kind}
  data_dir: {DIALOGUE}
  max_length: 48
  dialogue: {{context_turns: 2, max_response_tokens: 16, max_dialogues: 20, max_eval_dialogues: 5}}
train: {{max_steps: 2, batch_size: 8, eval_batch_size: 16, seed: 1, logging_steps: 1}}
track: []
{body}
""")


def test_dialogue_lm_by_hub_id(hub_home, tmp_path):
    lm = api.train(_dialogue(tmp_path, "dlg", "dialogue", f"""
model: {{name: {GPT2}, revision: {hub_home[GPT2]}}}
peft: {{method: lora, r: 2, alpha: 4, target: [c_attn]}}
"""))
    meta = json.loads((Path(lm.run_dir) / "model" / "deltakd_model.json").read_text())
    assert (meta["base_model"], meta["base_revision"]) == (GPT2, hub_home[GPT2])
    assert _vocab(Path(lm.run_dir) / "model") == _vocab(_snapshot(GPT2))  # the hub model's own tokenizer
    model, _ = api.load_trained(lm.run_dir)
    assert model.get_input_embeddings().num_embeddings == 320


def test_every_load_of_a_dialogue_run_uses_the_revision(hub_home, tmp_path):
    """A repository cached under the tag v1 only (no main): tokenizer, config, model, prompt tuning's init_text
    tokenizer and the reload of the saved adapter's base all have to ask for v1."""
    res = api.train(_dialogue(tmp_path, "pinned", "dialogue", f"""
model: {{name: {PINNED}, revision: v1}}
peft: {{method: prompt, num_virtual_tokens: 4, init_text: "reply to the dialogue"}}
"""))
    meta = json.loads((Path(res.run_dir) / "model" / "deltakd_model.json").read_text())
    assert (meta["base_model"], meta["base_revision"]) == (PINNED, "v1")
    model, _ = api.load_trained(res.run_dir)
    assert model.peft_config["default"].num_virtual_tokens == 4
    with pytest.raises(DeltakdError, match=rf"^tokenizer '{PINNED}': revision 'main' is not in the local hub cache "
                                           rf"\(cached: v1, {hub_home[PINNED]}\)$"):
        api.train(_dialogue(tmp_path, "unpinned", "dialogue", f"model: {{name: {PINNED}, revision: main}}\n"
                                                              "peft: {method: full}"))


def test_dialogue_act_classifier_by_hub_id(hub_home, tmp_path):
    acts = api.train(_dialogue(tmp_path, "acts", "classification", f"model: {{name: {BERT}}}\npeft: {{method: full}}"))
    config = json.loads((Path(acts.run_dir) / "model" / "config.json").read_text())
    assert sorted(config["id2label"].values()) == ["commissive", "directive", "inform", "question"]
    assert config["num_hidden_layers"] == 2


# --- multistage -----------------------------------------------------------------------------------


def test_multistage_teacher_and_student_by_hub_id(hub_home, tmp_path):
    pairs = tmp_path / "train.en-de.tsv"
    en = {"cat": "Katze", "dog": "Hund", "bird": "Vogel", "cow": "Kuh", "girl": "Mädchen", "man": "Mann"}
    verbs = {"sleeps": "schläft", "runs": "läuft", "sings": "singt"}
    pairs.write_text("".join(f"the {a} {v}\tdie {b} {w}\n" for a, b in en.items() for v, w in verbs.items()),
                     encoding="utf-8")
    recipe = write_recipe(tmp_path / "ms.yaml", f"""
family: multistage
name: ms
output_dir: {tmp_path / 'runs'}
teacher: {{model: {SENTENCE}, revision: {hub_home[SENTENCE]}}}
student: {{model: {BERT}, revision: main}}
data: {{train: [{pairs}], heldout: 2, max_length: 16}}
eval: {{speed_sentences: 4}}
loss: {{mse: 1.0}}
train: {{max_steps: 2, batch_size: 4, lr: 1.0e-3, logging_steps: 1}}
""")
    res = api.train(recipe)
    losses = [e["loss"] for e in _events(res) if "loss" in e and "eval_loss" not in e]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    saved = yaml.safe_load((Path(res.run_dir) / "recipe.yaml").read_text())
    assert saved["teacher"] == {"model": SENTENCE, "revision": hub_home[SENTENCE], "max_seq_length": None}


def test_multistage_unknown_student_revision_is_one_line(hub_home, tmp_path):
    pairs = tmp_path / "train.en-de.tsv"
    pairs.write_text("".join(f"cat {i}\tKatze {i}\n" for i in range(8)), encoding="utf-8")
    recipe = write_recipe(tmp_path / "ms.yaml", f"""
family: multistage
name: ms
output_dir: {tmp_path / 'runs'}
teacher: {{model: {SENTENCE}}}
student: {{model: {BERT}, revision: nope}}
data: {{train: [{pairs}], heldout: 2}}
""")
    with pytest.raises(DeltakdError, match=rf"^student.model '{BERT}': revision 'nope' is not in the local hub cache"):
        api.train(recipe)


# --- transfer -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_transfer_with_a_hub_backbone(hub_home, tmp_path):
    from deltakd.models.delta import find_model_dir, read_meta
    from deltakd.transfer.run import run_transfer

    tasks = {}
    for i, name in enumerate(["pos", "neg"]):
        for split, n, seed in (("train", 48, 10 * i + 1), ("dev", 16, 10 * i + 2), ("test", 16, 10 * i + 3)):
            write_tsv(tmp_path / "data" / name / f"{split}.tsv",
                      [(x, 1 - y if name == "neg" else y) for x, y in sentiment_rows(n, seed)])
        tasks[name] = {"name": name, "data_dir": str(tmp_path / "data" / name), "text_columns": ["sentence"],
                       "label_column": "label", "max_length": 16}
    recipe = tmp_path / "t.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "hub-transfer", "description": "transfer on a hub backbone", "output_dir": str(tmp_path / "out"),
        "transfer": {
            "backbone": BERT, "backbone_revision": hub_home[BERT], "peft": {"method": "lora", "r": 2, "alpha": 4},
            "tasks": tasks, "sources": ["pos", "neg"], "targets": ["pos"],
            "library": {"dir": str(tmp_path / "lib"), "grid": {"lr": [1e-2], "batch_size": [16]},
                        "train": {"max_steps": 2, "eval_every": 2, "logging_steps": 1}},
            "target": {"k": 8, "seeds": [1], "train": {"max_steps": 2, "batch_size": 8, "eval_every": 2,
                                                      "logging_steps": 1}},
            "estimate": {"estimators": ["loss"], "steps": 1, "batch_size": 8, "dev_samples": 8, "folds": 2},
        },
    }))
    result = run_transfer(recipe, progress=False)
    libs = [p for p in (tmp_path / "lib").rglob("deltakd_model.json")]
    assert libs, "the source library was trained"
    for meta_file in libs:
        meta = read_meta(meta_file.parent)
        assert (meta["base_model"], meta["base_revision"]) == (BERT, hub_home[BERT])
    targets = list((tmp_path / "out").rglob("results.json"))
    assert targets and result is not None
    assert read_meta(find_model_dir(targets[0].parent))["base_model"] == BERT
