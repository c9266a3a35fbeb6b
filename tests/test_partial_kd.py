"""Causal-LM family end to end on tiny GPT-2s: teacher from scratch, student from its layers, KD."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from deltakd import api
from deltakd.errors import DeltakdError
from deltakd.models.student import every_other, student_from_teacher

from .conftest import ROOT, write_recipe

SAMPLE = ROOT / "data" / "tinystories"


def _text(tmp_path: Path) -> Path:
    """A few KB of the shipped TinyStories sample, split into train/valid/test files."""
    d = tmp_path / "lm"
    d.mkdir()
    stories = (SAMPLE / "train.txt").read_text(encoding="utf-8").split("<|endoftext|>")
    stories = [s.strip() for s in stories if s.strip()]
    (d / "train.txt").write_text("<|endoftext|>".join(stories[:60]), encoding="utf-8")
    (d / "valid.txt").write_text("<|endoftext|>".join(stories[60:70]), encoding="utf-8")
    (d / "test.txt").write_text("<|endoftext|>".join(stories[70:80]), encoding="utf-8")
    return d


def _base(tmp_path: Path, data: Path) -> str:
    return f"""
task: {{name: tiny-stories, kind: lm, data_dir: {data}, train_file: train.txt, valid_file: valid.txt,
        test_file: test.txt, block_size: 32}}
peft: {{method: full}}
train: {{epochs: 3, lr: 3.0e-3, batch_size: 8, eval_batch_size: 16, seed: 1, logging_steps: 5}}
track: []
output_dir: {tmp_path / 'runs'}
"""


def test_student_from_teacher_copies_chosen_layers():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
    student = student_from_teacher(teacher, every_other(4, 2))
    assert every_other(4, 2) == [0, 2] and every_other(6, 3) == [0, 2, 4] and student.config.n_layer == 2
    torch.testing.assert_close(student.transformer.h[1].attn.c_attn.weight, teacher.transformer.h[2].attn.c_attn.weight)
    torch.testing.assert_close(student.transformer.wte.weight, teacher.transformer.wte.weight)
    assert student.lm_head.weight.data_ptr() == student.transformer.wte.weight.data_ptr()  # still tied
    with pytest.raises(DeltakdError, match=r"must be non-empty indices in 0..3"):
        student_from_teacher(teacher, [0, 4])


def test_teacher_from_scratch_then_kd_and_nokd_students(tmp_path):
    data = _text(tmp_path)
    base = _base(tmp_path, data)
    teacher = write_recipe(tmp_path / "teacher.yaml", base + """
name: t
model: {config: {model_type: gpt2, n_layer: 4, n_embd: 32, n_head: 2, n_positions: 32}, vocab_size: 300}
""")
    t = api.train(teacher)
    assert t["metrics"]["test"]["perplexity"] == pytest.approx(math.exp(t["metrics"]["test"]["loss"]))
    assert t["metrics"]["test"]["perplexity"] < 300 / 3  # learned well beyond the uniform 300
    assert t["train_tokens_per_second"] > 0
    student = base + f"""
teacher: {{run: {tmp_path / 'runs' / 't'}}}
student: {{from_teacher: {{nb_layers: 2}}}}
"""
    kd = api.train(write_recipe(tmp_path / "kd.yaml", student + "name: kd\ndistill: {losses: {ce: 0.5, kd: 0.5}}\n"))
    assert kd["params"]["total"] < t["params"]["total"]
    events = [json.loads(x) for x in (Path(kd["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    logged = [e for e in events if "loss_kd" in e]
    assert logged and all("loss_ce" in e for e in logged)  # each term logged on its own
    nokd = api.train(write_recipe(tmp_path / "nokd.yaml", student + "name: nokd\ndistill: {losses: {ce: 1.0}}\n"))
    assert not any("loss_kd" in json.loads(x) for x in (Path(nokd["run_dir"]) / "metrics.jsonl").read_text().splitlines())
    for r in (kd, nokd):
        assert r["metrics"]["test"]["perplexity"] < 300 / 2
    # saved students reload with plain transformers and evaluate to the same perplexity
    again = api.evaluate(kd["run_dir"], "test")
    assert again["perplexity"] == pytest.approx(kd["metrics"]["test"]["perplexity"], rel=1e-5)
    out = api.generate(kd["run_dir"], "Once upon a time", max_new_tokens=8, greedy=True)
    assert len(out) == 1 and out[0].strip()
    with pytest.raises(DeltakdError, match="holds no finished deltakd run"):
        api.train(write_recipe(tmp_path / "bad.yaml", student.replace(str(tmp_path / "runs" / "t"), str(tmp_path))
                               + "name: bad\n"))


def test_block_size_beyond_positions_is_refused(tmp_path):
    data = _text(tmp_path)
    recipe = write_recipe(tmp_path / "r.yaml", _base(tmp_path, data).replace("block_size: 32", "block_size: 64") + """
name: r
model: {config: {model_type: gpt2, n_layer: 1, n_embd: 16, n_head: 2, n_positions: 32}, vocab_size: 300}
""")
    with pytest.raises(DeltakdError, match="task.block_size: 64 exceeds the model's 32 positions"):
        api.train(recipe)
    assert not (tmp_path / "runs").exists()


def test_untrained_student_from_the_teacher_shape_learns(tmp_path):
    """``student.scratch``: the teacher's config with fewer layers, freshly initialised (nothing copied
    from the teacher), distilled; the shipped recipe says so, and a few steps lower the loss."""
    from deltakd.families import FAMILIES
    from deltakd.recipe import load_recipe

    shipped = load_recipe(ROOT / "recipes" / "partial_kd" / "student_scratch.yaml", check_files=False)
    assert shipped.student.scratch and shipped.student.from_teacher.nb_layers == 2
    assert shipped.distill.losses == {"ce": 0.5, "kd": 0.5}

    data = _text(tmp_path)
    base = _base(tmp_path, data)
    base = base.replace("epochs: 3", "max_steps: 12").replace("logging_steps: 5", "logging_steps: 2")
    api.train(write_recipe(tmp_path / "teacher.yaml", base.replace("max_steps: 12", "max_steps: 4") + """
name: t
model: {config: {model_type: gpt2, n_layer: 4, n_embd: 32, n_head: 2, n_positions: 32}, vocab_size: 300}
"""))
    student = write_recipe(tmp_path / "scratch.yaml", base + f"""
name: scratch
teacher: {{run: {tmp_path / 'runs' / 't'}}}
student: {{from_teacher: {{nb_layers: 2}}, scratch: true}}
distill: {{losses: {{ce: 0.5, kd: 0.5}}}}
""")
    prep = FAMILIES["lm"].prepare(load_recipe(student))
    s, t = prep.model, prep.teacher
    assert s.config.n_layer == 2 and len(s.transformer.h) == 2 and t.config.n_layer == 4
    assert s.config.n_embd == t.config.n_embd and s.config.vocab_size == t.config.vocab_size
    for name, p in s.named_parameters():  # no weight matrix is the teacher's (layer norms start at 1/0 anyway)
        if p.dim() == 2:
            theirs = dict(t.named_parameters())[name]
            assert not torch.equal(p, theirs), name
    copied = FAMILIES["lm"].prepare(load_recipe(student, ["student.scratch=false"])).model
    torch.testing.assert_close(copied.transformer.h[1].attn.c_attn.weight, t.transformer.h[2].attn.c_attn.weight)

    r = api.train(student)
    losses = [e["loss"] for e in map(json.loads, (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines())
              if "loss" in e and "loss_kd" in e]
    assert len(losses) >= 3 and losses[-1] < 0.95 * losses[0] and losses[-1] == min(losses), losses
    assert r["metrics"]["test"]["perplexity"] < 300  # below the uniform guess over the 300-token vocabulary
    assert json.loads((Path(r["run_dir"]) / "model" / "config.json").read_text())["n_layer"] == 2
