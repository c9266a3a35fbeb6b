"""Distillation end to end on tiny models: every loss family, cache vs live teacher, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deltakd import api
from deltakd.errors import DeltakdError
from deltakd.runs import RunDir

from ..conftest import write_recipe, write_toy_task


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return write_toy_task(tmp_path_factory.mktemp("toy-distill"))


def _recipe(folder: Path, name: str, body: str) -> Path:
    return write_recipe(folder / f"{name}.yaml", f"name: {name}\noutput_dir: {folder / 'runs'}\n{body}")


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, tiny_bert, toy) -> dict:
    """A 2-layer tiny BERT + LoRA (r 4) teacher, better than chance (LoRA on a random base learns slowly);
    merged copy saved too."""
    folder = tmp_path_factory.mktemp("teacher")
    results = api.train(_recipe(folder, "teacher", f"""
task: {{name: sst2, data_dir: {toy}, resplit_valid: 0.2, max_length: 16}}
model: {{name: {tiny_bert}}}
peft: {{method: lora, r: 4, alpha: 8, dropout: 0.0, target: [query, key, value], merge: true}}
train: {{epochs: 6, lr: 1.0e-2, batch_size: 16, seed: 3, logging_steps: 5}}
"""))
    assert results["metrics"]["test"]["accuracy"] >= 0.65
    return results


def _student(folder: Path, teacher: dict, toy: Path, name: str, distill: str, peft: str = "{method: full}",
             train: str = "epochs: 4", student: str = "{from_teacher: {layers: [1]}}", teacher_extra: str = "") -> Path:
    return _recipe(folder, name, f"""
task: {{name: sst2, data_dir: {toy}, resplit_valid: 0.2, max_length: 16}}
teacher: {{run: {teacher['run_dir']}{teacher_extra}}}
student: {student}
peft: {peft}
distill: {distill}
train: {{{train}, lr: 5.0e-3, batch_size: 16, seed: 5, logging_steps: 2}}
""")


def _logged_terms(run_dir: str) -> list[dict]:
    return [e for e in RunDir(Path(run_dir)).read_events() if any(k.startswith("loss_") for k in e)]


def test_rail_kd_concat_from_the_cache_never_runs_the_teacher(tmp_path, teacher_run, toy):
    res = api.train(_student(tmp_path, teacher_run, toy, "railc", """
  losses: {ce: 0.34, kd: 0.33, rail_c: 0.33}
  layer_map: {mode: random, k: 1}"""))
    d = res["distill"]
    assert d["teacher_forwards"] == 0 and d["teacher_cache"] and d["layer_map"] == "random"
    assert res["metrics"]["test"]["accuracy"] >= 0.85
    terms = _logged_terms(res["run_dir"])
    assert terms and all({"loss_ce", "loss_kd", "loss_rail_c"} <= set(e) for e in terms)
    # the projection trained with the student and is saved in the checkpoints (for resume)
    from safetensors.torch import load_file

    heads = load_file(str(Path(res["run_dir"]) / "checkpoints" / "last" / "distill_heads.safetensors"))
    assert set(heads) == {"rail_c.weight", "rail_c.bias"}
    assert not torch.allclose(heads["rail_c.weight"], torch.eye(32))  # started as the identity
    # the teacher and the speed-up are reported
    assert d["teacher_params"] > res["params"]["total"] and d["speedup"] > 0
    assert d["teacher_metrics"]["test"]["accuracy"] == pytest.approx(teacher_run["metrics"]["test"]["accuracy"])


def test_a_second_student_reuses_the_cache_entry(tmp_path, teacher_run, toy):
    a = api.train(_student(tmp_path, teacher_run, toy, "kd-a", "{losses: {ce: 0.5, kd: 0.5}}", train="max_steps: 4"))
    b = api.train(_student(tmp_path, teacher_run, toy, "kd-b", "{losses: {ce: 0.5, kd: 0.5}}",
                           train="max_steps: 4, epochs: 1"))
    assert a["distill"]["teacher_cache"] == b["distill"]["teacher_cache"]
    # different training examples are different teacher input: a new entry
    c = api.train(_student(tmp_path, teacher_run, toy, "kd-c", "{losses: {ce: 0.5, kd: 0.5}}", train="max_steps: 4"),
                  ["task.resplit_valid=0.25"])
    assert c["distill"]["teacher_cache"] != a["distill"]["teacher_cache"]


def test_rail_kd_layerwise_live_teacher(tmp_path, teacher_run, toy):
    res = api.train(_student(tmp_path, teacher_run, toy, "raill", """
  losses: {ce: 0.5, rail_l: 0.5}
  layer_map: {mode: random_epoch, k: 1}
  cache_teacher: false""", train="max_steps: 6"))
    assert res["distill"]["teacher_forwards"] == 6 and res["distill"]["teacher_cache"] is None
    assert all("loss_rail_l" in e for e in _logged_terms(res["run_dir"]))


def test_rail_kd_projects_to_rail_dim(tmp_path, teacher_run, toy):
    """distill.rail_dim 8 (hidden 32): both RAIL-KD variants compare 8-wide vectors; the student's
    projections train, the teacher's fixed ones (drawn from train.seed) are saved unchanged."""
    from safetensors.torch import load_file

    from deltakd.distill.heads import DistillHeads

    res = api.train(_student(tmp_path, teacher_run, toy, "raildim", """
  losses: {ce: 0.4, rail_c: 0.3, rail_l: 0.3}
  layer_map: {mode: random, k: 1}
  rail_dim: 8""", train="max_steps: 6"))
    assert res["train_steps"] == 6 and res["distill"]["teacher_forwards"] == 0  # served by the cache
    terms = _logged_terms(res["run_dir"])
    assert terms and all(0 < e["loss_rail_c"] < 1 and 0 < e["loss_rail_l"] < 1 for e in terms)
    heads = load_file(str(Path(res["run_dir"]) / "checkpoints" / "last" / "distill_heads.safetensors"))
    shapes = {k: tuple(v.shape) for k, v in heads.items()}
    assert shapes == {"rail_c.weight": (8, 32), "rail_c.bias": (8,), "rail_c_teacher.weight": (8, 32),
                      "rail_l.0.weight": (8, 32), "rail_l.0.bias": (8,), "rail_l_teacher.0.weight": (8, 32)}
    fresh = DistillHeads(32, 32, 1, rail_c=True, rail_l=True, rail_dim=8, seed=5).state_dict()  # train.seed 5
    for side in ("rail_c", "rail_l.0"):
        teacher_key = side.replace("rail_c", "rail_c_teacher").replace("rail_l.0", "rail_l_teacher.0") + ".weight"
        assert torch.equal(heads[teacher_key], fresh[teacher_key])  # fixed: never trained
        assert not torch.allclose(heads[f"{side}.weight"], fresh[f"{side}.weight"])  # the student's trained


def test_hidden_and_attention_losses_run_the_teacher_live(tmp_path, teacher_run, toy):
    res = api.train(_student(tmp_path, teacher_run, toy, "hidden", """
  losses: {kd: 0.4, hidden_mse: 0.2, hidden_cos: 0.2, attention_kl: 0.2}
  layer_map: {mode: average, pairs: [[0, 1]]}
  cache_teacher: false""", train="max_steps: 4"))
    assert res["distill"]["teacher_forwards"] == 4  # no cache: the teacher runs every step (token cache: test_token_cache.py)
    e = _logged_terms(res["run_dir"])[-1]
    assert e["loss_attention_kl"] > 0 and 0 < e["loss_hidden_cos"] < 2


def test_lora_feature_ild_with_curriculum_switches_losses_and_lr(tmp_path, teacher_run, toy):
    res = api.train(_student(tmp_path, teacher_run, toy, "loraild", """
  losses: {lora_ild: 1.0}
  curriculum: {at_epoch: 2, losses: {ce: 0.5, kd: 0.5}, lr: 1.0e-3}""",
                             peft="{method: lora, r: 4, alpha: 8, target: [query, key, value], full: true}"))
    events = RunDir(Path(res["run_dir"])).read_events()
    before = [e for e in events if "loss_lora_ild" in e and e["epoch"] <= 2]
    after = [e for e in events if "loss" in e and "learning_rate" in e and e["epoch"] > 2.2]
    assert before and all("loss_ce" not in e for e in before)
    assert after and all("loss_lora_ild" not in e and "loss_kd" in e for e in after)
    assert all(e["learning_rate"] == pytest.approx(1e-3) for e in after)  # the curriculum lr, held
    assert res["metrics"]["test"]["accuracy"] >= 0.85


def test_lora_ild_with_a_random_map_matches_the_drawn_teacher_layer(tmp_path, teacher_run, toy, monkeypatch):
    """Each step's lora_ild term compares the student layer with the teacher layer drawn for that step
    (seeded by train.seed and the step, as on --resume), checked against the features by hand."""
    from deltakd.distill.layer_map import LayerMap
    from deltakd.losses import terms

    seen: list[tuple[list, float, dict[int, float]]] = []
    original = terms.lora_ild

    def spy(x):
        value = original(x)
        s_feats = [f.detach() for f in x.student_lora.by_layer()[0]]
        t_by, m = x.teacher_lora.by_layer(), x.mask.float()
        by_hand = {j: sum(float((((s - t) ** 2).mean(-1) * m).sum() / m.sum()) for s, t in zip(s_feats, t_by[j]))
                   / len(s_feats) for j in t_by}  # the MSE against each teacher layer
        seen.append(([(i, list(js)) for i, js in x.pairs], float(value.detach()), by_hand))
        return value

    monkeypatch.setattr(terms, "lora_ild", spy)
    res = api.train(_student(tmp_path, teacher_run, toy, "random", "{losses: {lora_ild: 1.0}, "
                             "layer_map: {mode: random, k: 1}}", train="max_steps: 8",
                             peft="{method: lora, r: 4, alpha: 8, target: [query, key, value], full: true}"))
    assert res["train_steps"] == 8 and len(seen) == 8  # one term per optimizer step, training only
    expected = LayerMap.build("random", 1, 2, k=1, seed=5)  # the recipe's train.seed
    drawn = [pairs[0][1][0] for pairs, _, _ in seen]
    assert [pairs for pairs, _, _ in seen] == [expected.select(step=s) for s in range(8)]
    assert set(drawn) == {0, 1}  # both teacher layers are drawn over the 8 steps
    for (_, value, by_hand), j in zip(seen, drawn):
        assert value == pytest.approx(by_hand[j], rel=1e-5)
        assert abs(value - by_hand[1 - j]) > 1e-6  # the other layer gives another number


def test_lora_ild_needs_the_adapter_teacher(tmp_path, teacher_run, toy):
    with pytest.raises(DeltakdError, match="teacher has no LoRA"):
        api.train(_student(tmp_path, teacher_run, toy, "merged", "{losses: {lora_ild: 1.0}}",
                           peft="{method: lora, r: 4, target: [query, key, value]}", teacher_extra=", merged: true"))
    with pytest.raises(DeltakdError, match="LoRA ranks differ"):
        api.train(_student(tmp_path, teacher_run, toy, "rank", "{losses: {lora_ild: 1.0}}",
                           peft="{method: lora, r: 2, target: [query, key, value]}"))
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.parametrize("distill, message", [
    ("{losses: {hidden_mse: 1.0}, layer_map: {0: 5}}", "teacher layer 5 out of range 0..1"),
    ("{losses: {rail_c: 1.0}, layer_map: {mode: random, k: 3}}", "k"),
    ("{losses: {jsd: 1.0}}", "causal-LM losses"),
])
def test_bad_distillation_recipes_fail_before_work(tmp_path, teacher_run, toy, distill, message):
    with pytest.raises(DeltakdError, match=message):
        api.train(_student(tmp_path, teacher_run, toy, "bad", distill))
    assert not (tmp_path / "runs").exists()


def test_merged_teacher_gives_the_adapter_logits(teacher_run, toy):
    from deltakd.models.delta import find_model_dir, load_trained

    adapter, tok = load_trained(find_model_dir(teacher_run["run_dir"]))
    merged, _ = load_trained(find_model_dir(teacher_run["run_dir"]), merged=True)
    assert not hasattr(merged, "peft_config")
    enc = tok(["the movie was great", "a dull boring plot indeed"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a, m = adapter.eval()(**enc).logits, merged.eval()(**enc).logits
    assert torch.allclose(a, m, atol=1e-5)


def test_cached_outputs_match_the_live_teacher(teacher_run, toy, tmp_path):
    from transformers import DataCollatorWithPadding

    from deltakd.data import load_task
    from deltakd.data.tokenize import tokenize_examples
    from deltakd.distill.cache import load_or_build
    from deltakd.losses.hidden import mean_pool
    from deltakd.models.delta import find_model_dir, load_trained
    from deltakd.runs import load_run_recipe

    teacher, tok = load_trained(find_model_dir(teacher_run["run_dir"]))
    recipe = load_run_recipe(Path(teacher_run["run_dir"]))
    ds = tokenize_examples(load_task(recipe.task, 3).splits["train"], tok, 16)
    cache = load_or_build(teacher, ds, DataCollatorWithPadding(tok), 64, root=tmp_path)
    idx = torch.tensor([5, 0, 77])
    logits, pooled = cache.lookup(idx)
    batch = DataCollatorWithPadding(tok)([{k: ds[int(i)][k] for k in ("input_ids", "token_type_ids",
                                                                      "attention_mask")} for i in idx])
    with torch.no_grad():
        out = teacher.eval()(**batch, output_hidden_states=True)
    assert logits.shape == (3, 2) and pooled.shape == (3, 3, 32)
    assert torch.allclose(logits, out.logits, atol=2e-3, rtol=1e-3)  # fp16 storage
    live = torch.stack([mean_pool(h, batch["attention_mask"]) for h in out.hidden_states], 1)
    assert torch.allclose(pooled, live, atol=3e-3, rtol=1e-3)
    meta = json.loads((cache.path / "meta.json").read_text())
    assert meta["examples"] == len(ds) and meta["layers"] == 2
    # same teacher and data: the same entry, loaded, not rebuilt
    assert load_or_build(teacher, ds, DataCollatorWithPadding(tok), 64, root=tmp_path).path == cache.path
    # changed teacher weights: a new entry
    with torch.no_grad():
        next(p for n, p in teacher.named_parameters() if "lora_B" in n).add_(0.1)
    assert load_or_build(teacher, ds, DataCollatorWithPadding(tok), 64, root=tmp_path).path != cache.path
