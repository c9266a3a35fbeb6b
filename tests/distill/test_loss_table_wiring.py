"""What the distillation setup and trainer derive from the loss table: the kind checks and their
messages, and a loss registered in the table alone (no other edit) trains through DistillTrainer."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from deltakd.distill.layer_map import LayerMap
from deltakd.distill.schedule import LossSchedule
from deltakd.distill.setup import check_kind
from deltakd.errors import DeltakdError
from deltakd.losses import table


@pytest.mark.parametrize("kind, num_labels, names, message", [
    ("lm", 2, {"ce", "rail_c"},
     "distill.losses: rail_c apply to classification tasks, not causal LMs (use hidden_mse, hidden_cos)"),
    ("lm", 2, {"rail_l", "logits_mse"}, "distill.losses: logits_mse, rail_l apply to classification tasks, "
                                         "not causal LMs (use kd, reverse_kl, jsd, hidden_mse, hidden_cos)"),
    ("classification", 3, {"kd", "jsd", "reverse_kl"},
     "distill.losses: jsd, reverse_kl are causal-LM losses; for classification use kd or logits_mse"),
    ("classification", 1, {"ce", "kd"},
     "distill.losses.kd: a regression head has one output, no distribution; use logits_mse"),
])
def test_kind_checks_come_from_the_table(kind, num_labels, names, message):
    """The messages as they were hand-written (suggestions derived now; a later loss may add one)."""
    with pytest.raises(DeltakdError) as err:
        check_kind(names, kind, num_labels)
    more = r"(, \w+)*\)$" if message.endswith(")") else r"( or \w+)*$"
    assert re.match(re.escape(message.rstrip(")")) + more, str(err.value)), str(err.value)


@pytest.mark.parametrize("kind, num_labels, names", [
    ("classification", 1, {"ce", "logits_mse", "rail_c", "hidden_mse"}),
    ("classification", 2, {"kd", "rail_l", "attention_kl", "lora_ild"}),
    ("lm", 50, {"ce", "kd", "reverse_kl", "jsd", "hidden_cos", "lora_ild"}),
])
def test_kind_checks_accept_what_the_table_allows(kind, num_labels, names):
    check_kind(names, kind, num_labels)  # raises on a rejected name


def _logits_l1(x) -> torch.Tensor:
    return (x.student.logits - x.teacher_logits).abs().mean()  # (B, C) -> ()


def _hidden_l1(x) -> torch.Tensor:
    return torch.stack([(a - b).abs().mean() for _, a, b in x.mapped_hidden]).mean()  # pairs of (B, L, H)


EXTRA = {
    "logits_l1": table.LossSpec("logits_l1", frozenset({table.CLASSIFICATION}), frozenset({table.TEACHER_LOGITS}),
                                True, _logits_l1, "L1 between logits"),
    "hidden_l1": table.LossSpec("hidden_l1", table.BOTH, frozenset({table.HIDDEN, table.LAYER_MAP}), False,
                                _hidden_l1, "L1 between mapped hidden states"),
}


def _tiny_bert(seed: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, vocab_size=50, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def test_a_loss_registered_in_the_table_alone_trains_through_the_distill_trainer(tmp_path, monkeypatch):
    from transformers import TrainingArguments

    from deltakd.distill.trainer import DistillTrainer

    student, teacher = _tiny_bert(0), _tiny_bert(1)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    schedule = LossSchedule({"ce": 0.5, "logits_l1": 0.3, "hidden_l1": 0.2})
    trainer = DistillTrainer(model=student, args=args, teacher=teacher, schedule=schedule, kind="classification",
                             layer_map=LayerMap.build("fixed", 2, 2, [1, 0]))
    batch = {"input_ids": torch.randint(0, 50, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long),
             "labels": torch.tensor([0, 1, 2, 1])}
    student.train()
    with pytest.raises(ValueError, match="unknown losses \\['hidden_l1', 'logits_l1'\\]"):
        trainer.compute_loss(student, dict(batch))  # not registered yet

    monkeypatch.setattr(table, "LOSSES", {**table.LOSSES, **EXTRA})
    check_kind({"ce", "logits_l1", "hidden_l1"}, "classification", 3)
    with pytest.raises(DeltakdError, match="logits_l1 apply to classification tasks, not causal LMs \\(use kd, "):
        check_kind({"logits_l1"}, "lm", 3)
    loss = trainer.compute_loss(student, dict(batch))
    assert trainer.teacher_forwards == 1  # hidden_l1 is not cacheable (and there is no cache): a live teacher
    assert list(trainer._term_sums) == ["ce", "logits_l1", "hidden_l1"]  # logged on their own, in table order

    feed = {k: v for k, v in batch.items() if k != "labels"}
    s = student(**feed, output_hidden_states=True)
    with torch.no_grad():
        t = teacher(**feed, output_hidden_states=True)
    by_hand = {"ce": F.cross_entropy(s.logits, batch["labels"]), "logits_l1": (s.logits - t.logits).abs().mean(),
               "hidden_l1": ((s.hidden_states[1] - t.hidden_states[2]).abs().mean()
                             + (s.hidden_states[2] - t.hidden_states[1]).abs().mean()) / 2}
    for name, value in by_hand.items():
        assert trainer._term_sums[name] == pytest.approx(value.item(), rel=1e-5)
    assert loss.item() == pytest.approx((0.5 * by_hand["ce"] + 0.3 * by_hand["logits_l1"]
                                         + 0.2 * by_hand["hidden_l1"]).item(), rel=1e-5)
    loss.backward()
    assert student.bert.encoder.layer[0].output.dense.weight.grad.abs().sum() > 0
