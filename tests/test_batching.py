"""Faster default path (issue 19): length-grouped training batches, length-sorted evaluation, loss terms
summed on the device, and no second evaluation of the weights training already evaluated."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from deltakd import api
from deltakd.distill.trainer import TermLoggingTrainer
from deltakd.recipe import validate
from deltakd.runner.batching import SortedSampler, fast_batches, token_lengths
from deltakd.runner.evaluation import evaluation_of_current_weights

from .test_train import tiny_recipe


def _ds(lengths: list[int]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"input_ids": [[1] * n for n in lengths], "labels": [0] * len(lengths)})


def test_token_lengths_follow_selections_and_skip_datasets_without_token_lists():
    ds = _ds([3, 1, 4, 1, 5, 9, 2, 6])
    assert token_lengths(ds) == [3, 1, 4, 1, 5, 9, 2, 6]
    assert token_lengths(ds.select([5, 0, 7])) == [9, 3, 6]  # an indices mapping: the dataset's own order
    assert token_lengths(ds.with_format("torch")) == [3, 1, 4, 1, 5, 9, 2, 6]
    assert token_lengths(datasets.Dataset.from_dict({"english": ["a", "b"]})) is None
    assert token_lengths([{"input_ids": [1, 2]}]) is None


def test_sorted_sampler_is_longest_first_and_stable():
    assert list(SortedSampler([2, 5, 2, 7, 5])) == [3, 1, 4, 0, 2]


def _trainer(ds, strategy="group_by_length", batch=4):
    args = SimpleNamespace(train_sampling_strategy=strategy, world_size=1, train_batch_size=batch,
                           gradient_accumulation_steps=1)
    return fast_batches(SimpleNamespace(args=args, train_dataset=ds, _get_train_sampler=lambda ds=None: "own",
                                        _get_eval_sampler=lambda ds: "own"))


def test_training_order_is_transformers_length_grouped_order():
    lengths = [(i * 37) % 23 + 1 for i in range(200)]
    ds = _ds(lengths)
    torch.manual_seed(5)
    ours = list(_trainer(ds)._get_train_sampler())
    torch.manual_seed(5)
    theirs = list(LengthGroupedSampler(4, dataset=ds))  # lengths read example by example
    assert ours == theirs and sorted(ours) == list(range(200))
    assert _trainer(ds, strategy="random")._get_train_sampler() == "own"


def test_evaluation_order_is_sorted_and_kept_for_the_same_dataset():
    ds = _ds([2, 8, 5])
    t = _trainer(ds)
    sampler = t._get_eval_sampler(ds)
    assert list(sampler) == [1, 2, 0] and t._get_eval_sampler(ds) is sampler
    assert t._get_eval_sampler(_ds([4, 4, 4])) == "own"  # one length: nothing to sort


def test_default_training_batches_are_random_not_length_grouped():
    # length grouping is faster but changed the KD job's dev accuracy by 1.8-3.9 points: opt in only
    recipe = validate({"name": "x", "task": {"name": "sst2", "data_dir": "d"}, "model": {"name": "minilm-l6"}},
                      check_files=False)
    assert recipe.train.group_by_length is False


def test_loss_terms_add_up_on_the_device_and_are_read_at_log_steps(tmp_path, tiny_bert):
    from transformers import AutoModelForSequenceClassification, TrainingArguments

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    trainer = TermLoggingTrainer(model=model, args=TrainingArguments(str(tmp_path), report_to="none", use_cpu=True))
    trainer.record_terms({"ce": torch.tensor(1.0, requires_grad=True) * 1, "kd": torch.tensor(0.5)})
    trainer.record_terms({"ce": torch.tensor(3.0), "kd": torch.tensor(float("nan"))})
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in trainer.last_terms.values())
    assert isinstance(trainer._term_sums["ce"], torch.Tensor)  # not read back per step
    logs = {"loss": 1.0}
    trainer.log(logs)
    assert logs["loss_ce"] == pytest.approx(2.0) and str(logs["loss_kd"]) == "nan"
    assert trainer._term_count == 0 and not trainer._term_sums


def test_the_weights_evaluated_at_the_best_checkpoint_are_not_evaluated_again():
    history = [{"loss": 0.7, "step": 5}, {"eval_loss": 0.6, "eval_accuracy": 0.7, "step": 10},
               {"eval_loss": 0.5, "eval_accuracy": 0.8, "step": 20}]
    ds = object()

    def trainer(best, step=20, strategy="epoch", load_best=True, eval_ds=ds):
        return SimpleNamespace(args=SimpleNamespace(eval_strategy=strategy, load_best_model_at_end=load_best),
                               state=SimpleNamespace(best_model_checkpoint=best, global_step=step,
                                                     log_history=history), eval_dataset=eval_ds)

    with tempfile.TemporaryDirectory() as tmp:
        best10 = Path(tmp, "checkpoint-10")
        best10.mkdir()
        assert evaluation_of_current_weights(trainer(str(best10)), ds)["eval_accuracy"] == 0.7
        assert evaluation_of_current_weights(trainer(None), ds)["eval_accuracy"] == 0.8  # the final weights
        assert evaluation_of_current_weights(trainer(None, step=25), ds) is None  # trained past the last eval
        assert evaluation_of_current_weights(trainer(str(Path(tmp, "checkpoint-20"))), ds) is None  # not on disk
        assert evaluation_of_current_weights(trainer(str(best10)), object()) is None  # another split
        assert evaluation_of_current_weights(trainer(str(best10), strategy="no"), ds) is None


def test_a_run_evaluates_the_dev_set_once_at_the_end(tmp_path, tiny_bert, toy_task):
    res = api.train(tiny_recipe(tmp_path, tiny_bert, toy_task, train=", epochs: 1", name="once"))
    events = [json.loads(x) for x in (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if "eval_loss" in e]
    final = [e for e in events if "valid_loss" in e]
    assert len(evals) == 1 and len(final) == 1
    # the final metrics are training's evaluation of the same weights, logged again under valid_
    assert final[0]["valid_runtime"] == evals[0]["eval_runtime"]
    assert res["metrics"]["valid"]["accuracy"] == evals[0]["eval_accuracy"]
    assert res["metrics"]["valid"]["loss"] == pytest.approx(evals[0]["eval_loss"])
    assert "test" in res["metrics"]  # the other split is still evaluated


def test_the_optimizer_is_the_fused_adamw(tmp_path):
    from deltakd.runner import training_arguments
    from deltakd.runner.arguments import fused_adamw
    from deltakd.runs import new_run_dir

    recipe = validate({"name": "x", "task": {"name": "sst2", "data_dir": "d"}, "model": {"name": "minilm-l6"}},
                      check_files=False)
    args = training_arguments(recipe.train, new_run_dir(tmp_path, "x"), [], "accuracy")
    assert fused_adamw() == "adamw_torch_fused"  # torch >= 2.4 runs it on CPU
    assert args.optim == "adamw_torch_fused"


def test_a_lora_model_is_evaluated_merged_and_stays_unmerged(tmp_path, tiny_bert):
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        Trainer,
        TrainingArguments,
    )

    from deltakd.runner.evaluation import mergeable_lora, merged_evaluation

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a trained-looking adapter (B starts at zero)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ds = datasets.Dataset.from_dict({"input_ids": [[101, 7 + i, 9, 102] for i in range(12)],
                                     "attention_mask": [[1] * 4] * 12, "labels": [i % 2 for i in range(12)]})
    args = TrainingArguments(str(tmp_path), report_to="none", use_cpu=True, per_device_eval_batch_size=4,
                             remove_unused_columns=False)
    plain = Trainer(model=model, args=args).evaluate(ds)
    seen = []
    trainer = merged_evaluation(Trainer(model=model, args=args))
    original = trainer.prediction_step
    trainer.prediction_step = lambda m, *a, **k: (seen.append(m), original(m, *a, **k))[1]
    merged = trainer.evaluate(ds)
    assert mergeable_lora(model) and seen and not any(mergeable_lora(m) for m in seen)  # ran on the merged copy
    assert not any("lora" in n for m in seen for n, _ in m.named_parameters())
    assert merged["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-5)
    assert trainer.model is model and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(getattr(m, "merged", False) for m in model.modules() if hasattr(m, "merged_adapters"))
