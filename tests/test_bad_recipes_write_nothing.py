"""Recipes that are wrong in a way only the data or the models show: one line, exit 2, and nothing
written first: no run folder, no cache entry (tokenised data, teacher outputs), no progress bars."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, write_recipe
from .test_partial_kd import _text


def _classifier(out: Path, tiny_bert: Path, num_labels: int, labels: list[str] | None = None, heads: int = 2) -> Path:
    """A tiny BERT classifier (random weights) with the given head, saved with its tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    names = labels or [str(i) for i in range(num_labels)]
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=heads,
                     intermediate_size=64, max_position_embeddings=128, num_labels=num_labels,
                     id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    BertForSequenceClassification(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _causal_lm(out: Path, tiny_bert: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    tok.eos_token = tok.sep_token
    GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_layer=2, n_embd=16, n_head=2, n_positions=64,
                               bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _cls(tmp_path: Path, toy: Path, teacher: Path, distill: str, student: str = "student: {from_teacher: {layers: [1]}}",
         train: str = "") -> str:
    return f"""
name: bad
task: {{name: sst2, data_dir: {toy}, resplit_valid: 0.2, max_length: 16}}
teacher: {{model: {teacher}}}
{student}
peft: {{method: full}}
distill: {distill}
train: {{epochs: 1, batch_size: 16, eval_batch_size: 64, seed: 3{train}}}
track: []
output_dir: {tmp_path / 'runs'}
"""


def _case(name: str, tmp_path: Path, tiny_bert: Path, toy: Path) -> tuple[str, str]:
    """(recipe text, the expected error line's distinctive part)."""
    def two() -> Path:
        return _classifier(tmp_path / "t2", tiny_bert, 2)

    if name == "teacher_num_labels":
        return (_cls(tmp_path, toy, _classifier(tmp_path / "t3", tiny_bert, 3), "{losses: {ce: 0.5, kd: 0.5}}"),
                "teacher: predicts 3 labels, the task has 2")
    if name == "teacher_label_names":
        t = _classifier(tmp_path / "tnames", tiny_bert, 2, ["positive", "negative"])  # SST-2's names, swapped
        return (_cls(tmp_path, toy, t, "{losses: {ce: 0.5, kd: 0.5}}"),
                "teacher: labels ['positive', 'negative'], the task has ['negative', 'positive']")
    if name == "layer_map_beyond_student":
        return (_cls(tmp_path, toy, two(), "{losses: {ce: 0.5, kd: 0.5, hidden_mse: 1.0}, layer_map: {3: 0}}"),
                "layer")
    if name == "attention_heads_differ":
        student = _classifier(tmp_path / "s4", tiny_bert, 2, heads=4)
        return (_cls(tmp_path, toy, two(), "{losses: {ce: 0.5, attention_kl: 1.0}}",
                     student=f"model: {{name: {student}}}"),
                "distill.losses.attention_kl: student has 4 attention heads, teacher 2")
    if name == "curriculum_past_the_end":
        return (_cls(tmp_path, toy, two(), "{losses: {ce: 1.0}, curriculum: {at_epoch: 3, losses: {kd: 1.0}}}"),
                "the curriculum would never start")
    if name == "rail_c_on_lm":
        data = _text(tmp_path)
        return (f"""
name: bad
task: {{name: tiny-stories, kind: lm, data_dir: {data}, train_file: train.txt, valid_file: valid.txt,
        test_file: test.txt, block_size: 32}}
teacher: {{model: {_causal_lm(tmp_path / 'lm', tiny_bert)}}}
student: {{from_teacher: {{nb_layers: 1}}}}
peft: {{method: full}}
distill: {{losses: {{ce: 0.5, rail_c: 1.0}}}}
train: {{epochs: 1, batch_size: 8, seed: 1}}
track: []
output_dir: {tmp_path / 'runs'}
""", "distill.losses: rail_c apply to classification tasks, not causal LMs")
    raise AssertionError(name)


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


CASES = ["teacher_num_labels", "teacher_label_names", "layer_map_beyond_student", "attention_heads_differ",
         "curriculum_past_the_end", "rail_c_on_lm"]


@pytest.mark.parametrize("case", CASES)
def test_bad_recipe_is_one_line_and_writes_nothing(tmp_path, tiny_bert, toy_task, case):
    text, expected = _case(case, tmp_path, tiny_bert, toy_task)
    recipe = write_recipe(tmp_path / "bad.yaml", text)
    cache = tmp_path / "cache"
    (cache / "tokenized").mkdir(parents=True)
    (cache / "tokenized" / "an-older-entry").mkdir()
    before = _listing(cache)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "DELTAKD_CACHE": str(cache),
           "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-m", "deltakd.cli", "train", str(recipe)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], out.stderr[-2000:]
    assert not (tmp_path / "runs").exists()
    assert _listing(cache) == before


@pytest.mark.parametrize("labels, expected", [
    (["a", "b", "c"], "teacher: predicts 3 labels, the task has 2"),
    (["neg", "pos"], "teacher: labels ['neg', 'pos'], the task has ['negative', 'positive']")])  # SST-2's names
def test_teacher_run_head_is_checked_before_its_weights_load(tmp_path, toy_task, monkeypatch, labels, expected):
    """A deltakd run as the teacher: its saved metadata gives the head; the weights never load."""
    import json

    from deltakd import api
    from deltakd.classify import family
    from deltakd.errors import DeltakdError
    from deltakd.models.delta import META_FILE

    model = tmp_path / "teacher-model"
    model.mkdir()
    (model / META_FILE).write_text(json.dumps({"num_labels": len(labels), "labels": labels, "format": "transformers",
                                               "problem_type": "single_label_classification"}))

    def no_weights(*a, **k):
        raise AssertionError("the teacher's weights were loaded before its head was checked")

    monkeypatch.setattr(family, "load_teacher", no_weights)
    recipe = write_recipe(tmp_path / "bad.yaml", _cls(tmp_path, toy_task, model, "{losses: {ce: 0.5, kd: 0.5}}")
                          .replace(f"teacher: {{model: {model}}}", f"teacher: {{run: {model}}}"))
    with pytest.raises(DeltakdError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        api.train(recipe)
    assert not (tmp_path / "runs").exists()
