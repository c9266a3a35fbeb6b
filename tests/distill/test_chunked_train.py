"""Chunked causal-LM distillation (distill.chunked): the same training as full logits, no full logits made."""

from __future__ import annotations

import copy

import pytest
import torch

from deltakd.distill.fused_head import head_input, use_chunked
from deltakd.distill.layer_map import LayerMap
from deltakd.distill.schedule import LossSchedule

VOCAB = 300


def _gpt2(layers: int, vocab: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=32, n_head=2, vocab_size=vocab, n_positions=32,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def _rows(n: int = 16, length: int = 12) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(n):
        ids = torch.randint(0, VOCAB, (length,), generator=g)
        labels = ids.clone()
        labels[length - 1 - i % 4:] = -100  # a padded tail of 0..3 tokens
        mask = (labels != -100).long()
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return rows


def _train(tmp_path, name: str, student, teacher, losses: dict[str, float], chunked, **kw):
    from transformers import TrainingArguments

    from deltakd.distill.trainer import DistillTrainer

    args = TrainingArguments(output_dir=str(tmp_path / name), use_cpu=True, report_to=[], max_steps=4,
                             per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=3e-3,
                             logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True)
    trainer = DistillTrainer(model=student, args=args, train_dataset=_rows(), teacher=teacher,
                             schedule=LossSchedule(losses), kind="lm", temperature=2.0, jsd_beta=0.3,
                             vocab=VOCAB, chunked=chunked, chunk_tokens=5, **kw)
    trainer.train()
    return trainer, [e for e in trainer.state.log_history if "loss" in e]


@pytest.mark.parametrize("losses, widths", [
    ({"ce": 0.5, "kd": 0.3, "reverse_kl": 0.1, "jsd": 0.1}, (VOCAB, VOCAB)),
    ({"ce": 0.4, "kd": 0.4, "hidden_mse": 0.2}, (VOCAB + 4, VOCAB + 8)),  # padded heads; a hidden-state loss alongside
])
def test_chunked_training_gives_the_same_curve(tmp_path, losses, widths):
    teacher = _gpt2(2, widths[1], seed=1)
    student = _gpt2(1, widths[0], seed=2)
    extra = {"layer_map": LayerMap.build("fixed", 1, 2, [1])} if "hidden_mse" in losses else {}
    plain, plain_logs = _train(tmp_path, "plain", copy.deepcopy(student), teacher, losses, False, **extra)
    chunked, chunked_logs = _train(tmp_path, "chunked", copy.deepcopy(student), teacher, losses, True, **extra)
    assert not plain.chunked and chunked.chunked
    assert len(plain_logs) == len(chunked_logs) == 4
    for a, b in zip(plain_logs, chunked_logs):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4, rel=1e-5)
        for term in losses:
            assert b[f"loss_{term}"] == pytest.approx(a[f"loss_{term}"], abs=1e-4, rel=1e-5)
    assert plain_logs[0]["loss"] != pytest.approx(plain_logs[-1]["loss"], abs=1e-3)  # it did train
    for (n, p), (_, q) in zip(plain.model.named_parameters(), chunked.model.named_parameters()):
        torch.testing.assert_close(q, p, atol=2e-5, rtol=1e-4, msg=n)


def test_chunked_forward_makes_no_full_logits():
    model = _gpt2(1, VOCAB, seed=0)
    ids = torch.randint(0, VOCAB, (2, 7))
    with head_input(model) as captured:
        out = model(input_ids=ids)
    assert out.logits.shape == (2, 0, VOCAB)
    torch.testing.assert_close(model.lm_head(captured.hidden), model(input_ids=ids).logits)


def test_auto_turns_on_at_32k_tokens_and_true_refuses_a_head_it_cannot_fuse():
    small, big = _gpt2(1, VOCAB, 0), _gpt2(1, 32_768, 0)
    assert not use_chunked("auto", small, small, VOCAB)
    assert use_chunked("auto", big, big, 32_768)
    assert not use_chunked(False, big, big, 32_768) and use_chunked(True, small, small, VOCAB)
    capped = _gpt2(1, 32_768, 0)
    capped.config.final_logit_softcapping = 30.0
    assert not use_chunked("auto", big, capped, 32_768)
    with pytest.raises(ValueError, match="the teacher cannot be fused: its logits are changed after the head "
                                         r"\(final_logit_softcapping\)"):
        use_chunked(True, big, capped, 32_768)


@pytest.mark.slow
def test_a_recipe_with_chunked_true_trains_like_chunked_false(tmp_path, monkeypatch):
    """Through the recipe (schema -> family -> trainer): distill.chunked true gives the curve of false."""
    import json
    from pathlib import Path

    from deltakd import api
    from deltakd.distill import trainer as trainer_module

    calls = []
    real = trainer_module.chunked_terms
    monkeypatch.setattr(trainer_module, "chunked_terms", lambda *a, **k: calls.append(k["chunk_tokens"]) or real(*a, **k))

    from ..conftest import write_recipe
    from ..test_partial_kd import _base, _text

    base = _base(tmp_path, _text(tmp_path)).replace("epochs: 3,", "max_steps: 6, grad_accum: 2,")
    base = base.replace("logging_steps: 5", "logging_steps: 1")
    api.train(write_recipe(tmp_path / "t.yaml", base + """
name: t
model: {config: {model_type: gpt2, n_layer: 2, n_embd: 32, n_head: 2, n_positions: 32}, vocab_size: 300}
"""))
    curves = {}
    for chunked in ("false", "true"):
        run = api.train(write_recipe(tmp_path / f"kd_{chunked}.yaml", base + f"""
name: kd_{chunked}
teacher: {{run: {tmp_path / 'runs' / 't'}}}
student: {{from_teacher: {{nb_layers: 1}}}}
distill: {{losses: {{ce: 0.4, kd: 0.3, jsd: 0.3}}, chunked: {chunked}, chunk_tokens: 7}}
"""))
        events = [json.loads(x) for x in (Path(run["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        curves[chunked] = [(e["loss"], e["loss_kd"], e["loss_jsd"]) for e in events if "loss_kd" in e]
        assert len(calls) == (12 if chunked == "true" else 0)  # 6 steps x 2 micro-batches, chunked
    assert len(curves["true"]) == len(curves["false"]) == 6
    for a, b in zip(curves["false"], curves["true"]):
        assert b == pytest.approx(a, abs=1e-4, rel=1e-5)


def test_recipe_keys_chunked_and_chunk_tokens(tmp_path):
    from deltakd.errors import DeltakdError
    from deltakd.recipe import load_recipe

    from ..conftest import write_recipe

    path = write_recipe(tmp_path / "r.yaml", "name: r\ntask: {name: sst2, data_dir: data}\nteacher: {run: runs/t}\ndistill: {}\n")
    assert load_recipe(path, check_files=False).distill.chunked == "auto"
    assert load_recipe(path, check_files=False).distill.chunk_tokens is None
    r = load_recipe(path, ["distill.chunked=true", "distill.chunk_tokens=512"], check_files=False)
    assert r.distill.chunked is True and r.distill.chunk_tokens == 512
    assert load_recipe(path, ["distill.chunked=false"], check_files=False).distill.chunked is False
    for bad, message in (("distill.chunked=maybe", "distill.chunked"), ("distill.chunk_tokens=0", "distill.chunk_tokens")):
        with pytest.raises(DeltakdError, match=message) as e:
            load_recipe(path, [bad], check_files=False)
        assert "\n" not in str(e.value)


def test_chunked_true_with_a_head_that_cannot_be_fused_is_refused_before_training():
    from deltakd.distill.setup import check_distill
    from deltakd.errors import DeltakdError
    from deltakd.recipe.schema import DistillConfig

    student, teacher = _gpt2(1, VOCAB, 0), _gpt2(2, VOCAB, 1)
    teacher.config.final_logit_softcapping = 30.0
    d = DistillConfig(losses={"ce": 0.5, "kd": 0.5}, chunked=True)
    with pytest.raises(DeltakdError, match="distill.chunked: the teacher cannot be fused"):
        check_distill(d, student, teacher, "lm", VOCAB, None, 0)
    check_distill(d.model_copy(update={"chunked": "auto"}), student, teacher, "lm", VOCAB, None, 0)  # auto: off, no error
