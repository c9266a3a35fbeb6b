"""End-to-end training on tiny models: run directory, learning, PEFT save/reload, eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from deltakd import api
from deltakd.models.delta import load_trained
from deltakd.runs import RunDir

from .conftest import write_recipe


def tiny_recipe(tmp_path: Path, model: Path, data: Path, peft: str = "{method: full}", train: str = "",
                name: str = "tiny") -> Path:
    return write_recipe(tmp_path / f"{name}.yaml", f"""
name: {name}
description: tiny model on the toy task
task: {{name: sst2, data_dir: {data}, resplit_valid: 0.2, max_length: 16}}
model: {{name: {model}}}
peft: {peft}
train: {{epochs: 6, lr: 5.0e-3, batch_size: 16, eval_batch_size: 64, seed: 3, logging_steps: 5{train}}}
track: [tensorboard]
output_dir: {tmp_path / 'runs'}
""")


def test_full_finetuning_learns_and_writes_the_run_directory(tmp_path, tiny_bert, toy_task):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    results = api.train(tiny_recipe(tmp_path, tiny_bert, toy_task))
    run = RunDir(Path(results["run_dir"]))
    # learned: the toy label is the polarity word; chance is 0.5
    assert results["metrics"]["valid"]["accuracy"] >= 0.9
    assert results["metrics"]["test"]["accuracy"] >= 0.9
    # run directory contents
    saved = json.loads(run.results_file.read_text())
    assert saved["metrics"] == results["metrics"] and saved["examples"] == {"train": 320, "valid": 80, "test": 100}
    model = AutoModelForSequenceClassification.from_pretrained(run.model_dir)
    assert saved["params"]["total"] == sum(p.numel() for p in model.parameters())
    assert saved["params"]["trainable"] == saved["params"]["total"]
    assert saved["train_steps"] == 6 * 20 and saved["train_samples_per_second"] > 0 and saved["wall_time_s"] > 0
    recipe = yaml.safe_load(run.recipe_file.read_text())
    assert recipe["train"]["lr"] == 5e-3 and "transformers" in recipe["provenance"]["versions"]
    events = run.read_events()
    evals = [e for e in events if "eval_accuracy" in e]
    assert [round(e["epoch"]) for e in evals] == [1, 2, 3, 4, 5, 6]
    assert any("loss" in e for e in events)
    # best/ and last/ name real checkpoint-<step> folders, the only ones kept; the Trainer finds the final one
    from transformers.trainer_utils import get_last_checkpoint

    from deltakd.runner.checkpoints import step_folders

    best, last = run.checkpoint("best"), run.checkpoint("last")
    assert last == run.checkpoints / "checkpoint-120" and saved["last_step"] == "120"
    assert best == run.checkpoints / f"checkpoint-{saved['best_step']}"
    assert {p.name for p in step_folders(run.checkpoints)} == {best.name, last.name}
    assert get_last_checkpoint(str(run.checkpoints)) == str(last)
    assert list(run.tensorboard_dir.glob("events.out.tfevents.*"))
    # the saved model alone reproduces the reported test accuracy
    tok = AutoTokenizer.from_pretrained(run.model_dir)
    from deltakd.data import load_task
    from deltakd.runs import load_run_recipe

    test = load_task(load_run_recipe(run).task, 3).splits["test"]
    with torch.no_grad():
        enc = tok([e["text_a"] for e in test], padding=True, return_tensors="pt")
        pred = model.eval()(**enc).logits.argmax(-1)
    acc = (pred == torch.tensor([e["label"] for e in test])).float().mean().item()
    assert acc == pytest.approx(results["metrics"]["test"]["accuracy"])


PEFTS = {
    "lora": "{method: lora, r: 4, alpha: 8, target: [query, value], merge: true}",
    "lora_full": "{method: lora, r: 4, target: [query, value], full: true}",
    "prefix": "{method: prefix, num_virtual_tokens: 4}",
    "prompt": "{method: prompt, num_virtual_tokens: 4, init_text: the movie was}",
    "ptuning": "{method: ptuning, num_virtual_tokens: 4, hidden: 16}",
    "ia3": "{method: ia3}",
    "bottleneck_houlsby": "{method: bottleneck, placement: houlsby, reduction_factor: 4}",
    "bottleneck_pfeiffer": "{method: bottleneck, placement: pfeiffer, reduction_factor: 4}",
}


@pytest.mark.parametrize("method", list(PEFTS))
def test_peft_methods_train_save_and_reload_identically(tmp_path, tiny_bert, toy_task, method):
    results = api.train(tiny_recipe(tmp_path, tiny_bert, toy_task, PEFTS[method],
                                    train=", max_steps: 12, lr: 2.0e-2"))
    run = RunDir(Path(results["run_dir"]))
    p = results["params"]
    if method == "lora_full":
        assert p["trainable"] == p["total"]
    else:
        assert 0 < p["trainable"] < p["total"] * 0.6
    # reloading from disk gives the very same predictions: the eval loss matches to float precision
    again = api.evaluate(run.path, "valid")
    assert again["loss"] == pytest.approx(results["metrics"]["valid"]["loss"], abs=1e-6)
    assert again["accuracy"] == results["metrics"]["valid"]["accuracy"]
    model, tok = load_trained(run.model_dir)
    enc = tok(["the movie was good", "quite dull acting"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    meta = json.loads((run.model_dir / "deltakd_model.json").read_text())
    if meta["format"] == "peft":
        # plain peft, no deltakd: base model + adapter folder
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification

        base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
        if method == "prefix":  # peft 0.21 looks for `past_key_values`, transformers 5.24 names it `cache`
            from deltakd.models.delta import accept_past_key_values

            accept_past_key_values(base)
        with torch.no_grad():
            direct = PeftModel.from_pretrained(base, run.model_dir).eval()(**enc).logits
        torch.testing.assert_close(direct, logits, atol=1e-6, rtol=0)
    if method == "lora":
        merged, _ = load_trained(run.model_dir, merged=True)
        with torch.no_grad():
            torch.testing.assert_close(merged(**enc).logits, logits, atol=1e-5, rtol=0)


def test_regression_task_trains(tmp_path, tiny_bert):
    rows = [f"{'good ' * (i % 5)}movie\t{float(i % 5)}" for i in range(200)]
    (tmp_path / "d").mkdir()
    for name in ("train.tsv", "dev.tsv"):
        (tmp_path / "d" / name).write_text("sentence1\tsentence2\tscore\n" +
                                            "\n".join(r.replace("\t", "\tfilm\t", 1) for r in rows) + "\n")
    recipe = write_recipe(tmp_path / "r.yaml", f"""
name: reg
description: regression
task: {{name: stsb, data_dir: {tmp_path / 'd'}, max_length: 16}}
model: {{name: {tiny_bert}}}
train: {{epochs: 6, lr: 3.0e-3, batch_size: 16, seed: 1}}
track: []
output_dir: {tmp_path / 'runs'}
""")
    results = api.train(recipe)
    assert results["main_metric"] == "pearson"
    assert results["metrics"]["valid"]["pearson"] > 0.8


def test_prefix_tuning_a_classifier_under_the_renamed_cache_argument(tiny_bert):
    """transformers 5.24 renamed the classifier's `past_key_values` to `cache`; peft 0.21 refuses
    such a model for prefix tuning. After accept_past_key_values the prefix reaches the encoder (the
    logits move with it), a forward without one is unchanged, and a deepcopy runs its own weights."""
    import copy

    import peft
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from deltakd.models.delta import accept_past_key_values

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    enc = tok(["the movie was good"], return_tensors="pt")
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).eval()
    with torch.no_grad():
        plain = base(**enc).logits
    accept_past_key_values(base)
    with torch.no_grad():
        torch.testing.assert_close(base(**enc).logits, plain)  # no prefix: unchanged
    model = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)).eval()
    with torch.no_grad():
        zero = model(**enc).logits
        for p in model.prompt_encoder.parameters():
            p.add_(1.0)
        moved = model(**enc).logits
    assert (moved - zero).abs().max() > 1e-5  # an ignored prefix leaves them bit-identical
    dup = copy.deepcopy(base)
    with torch.no_grad():
        dup.classifier.weight.zero_()
        dup.classifier.bias.zero_()
        torch.testing.assert_close(dup(**enc).logits, torch.zeros_like(plain))
