"""The dialogue family end to end on tiny models: pre-train a GPT-2 on DailyDialog turns, tune it
with prefix / prompt / LoRA / full, train an act classifier (tiny BERT), generate and score."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from deltakd import api, families
from deltakd.runner import evaluate_model
from deltakd.data.dailydialog import IGNORE_INDEX, DialogueCollator
from deltakd.dialogue.evaluate import ActClassifier, GenerationSettings, generate_responses
from deltakd.errors import DeltakdError
from deltakd.models.delta import load_trained
from deltakd.recipe import load_recipe

from ..conftest import write_recipe
from .conftest import SAMPLE

GPT = "{model_type: gpt2, n_layer: 2, n_embd: 32, n_head: 2, n_positions: 64, resid_pdrop: 0.0, embd_pdrop: 0.0, attn_pdrop: 0.0}"


def _common(tmp: Path) -> str:
    return f"""
track: []
output_dir: {tmp / 'runs'}
"""


def _task(kind: str, extra: str = "") -> str:
    return f"""
task:
  name: dd
  kind: {kind}
  data_dir: {SAMPLE}
  max_length: 48
  block_size: 32
  dialogue: {{context_turns: 2, max_response_tokens: 16, max_dialogues: 60, max_eval_dialogues: 10{extra}}}
"""


def _tuned(tmp: Path, name: str, peft: str, epochs: int = 3, lr: float = 1e-2) -> Path:
    return write_recipe(tmp / f"{name}.yaml", f"""
name: {name}
{_task('dialogue')}
model: {{name: {tmp / 'runs' / 'pre'}}}
peft: {peft}
train: {{epochs: {epochs}, lr: {lr}, batch_size: 16, eval_batch_size: 32, seed: 1, logging_steps: 5}}
{_common(tmp)}""")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert):
    """Pre-trained LM, two tuned methods, act classifier: trained once for this module."""
    tmp = tmp_path_factory.mktemp("dialogue-e2e")
    pre = api.train(write_recipe(tmp / "pre.yaml", f"""
name: pre
{_task('lm')}
model: {{config: {GPT}, vocab_size: 400}}
train: {{epochs: 4, lr: 1.0e-2, batch_size: 16, eval_batch_size: 32, seed: 1, logging_steps: 5}}
{_common(tmp)}"""))
    prefix = api.train(_tuned(tmp, "prefix", "{method: prefix, num_virtual_tokens: 4}", epochs=4, lr=3e-2))
    lora = api.train(_tuned(tmp, "lora", "{method: lora, r: 4, alpha: 8, dropout: 0.0, target: [c_attn]}",
                          lr=2e-2))
    cls = api.train(write_recipe(tmp / "acts.yaml", f"""
name: acts
{_task('classification')}
model: {{name: {tiny_bert}}}
train: {{epochs: 1, lr: 1.0e-3, batch_size: 32, eval_batch_size: 64, seed: 1, logging_steps: 5}}
{_common(tmp)}"""))
    return {"tmp": tmp, "pre": pre, "prefix": prefix, "lora": lora, "acts": cls}


def test_loss_covers_only_response_tokens(runs):
    tmp = runs["tmp"]
    recipe = load_recipe(_tuned(tmp, "check", "{method: full}"))
    prep = families.prepare(recipe)
    tok = prep.tokenizer
    eos = tok.eos_token_id
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    fitting = truncated = 0
    for ex, row in zip(prep.task.splits["train"], prep.datasets["train"]):
        ids, labels = row["input_ids"], row["labels"]
        # act <eos> context turns <eos> ... response <eos>: hand-built from the example's strings
        act = enc(ex.act) + [eos]
        context = [t for turn in ex.context for t in enc(turn) + [eos]]
        response = enc(ex.response)[:16] + [eos]
        if len(act) + len(context) + len(response) <= 48:
            fitting += 1
            assert ids == act + context + response
        else:  # the context is cut from the left; act and response stay whole
            truncated += 1
            kept = ids[len(act):len(ids) - len(response)]
            assert ids[:len(act)] == act and len(ids) <= 48 and len(kept) < len(context)
            assert kept == context[len(context) - len(kept):]
        assert labels == [IGNORE_INDEX] * (len(ids) - len(response)) + response
    assert fitting > 50 and truncated > 50
    assert len(ex.context) <= 2 and all(len(r["input_ids"]) <= 48 for r in prep.datasets["train"])
    # the collator pads labels with -100 and the attention mask with 0
    batch = prep.collator([prep.datasets["train"][i] for i in range(4)])
    longest = max(len(prep.datasets["train"][i]["input_ids"]) for i in range(4))
    assert batch["labels"].shape == (4, longest)
    for i in range(4):
        n = len(prep.datasets["train"][i]["input_ids"])
        assert batch["labels"][i, n:].eq(IGNORE_INDEX).all() and batch["attention_mask"][i, n:].eq(0).all()
    # the pre-training text uses the same eos layout: turn <eos> turn <eos>
    from deltakd.data.dailydialog_tasks import lm_texts

    texts = lm_texts(recipe.task)
    first = [t for d in [texts["train"][:3]] for t in d]
    stream = [t for s in first for t in enc(s) + [eos]]
    pre = families.prepare(load_recipe(tmp / "pre.yaml"))
    assert pre.datasets["train"][0]["input_ids"] == stream[:32]


def test_tuned_methods_train_save_reload_and_beat_the_untuned_model(runs):
    pre, prefix, lora = runs["pre"], runs["prefix"], runs["lora"]
    assert pre["metrics"]["test"]["perplexity"] < 400 / 2
    for r in (prefix, lora):
        assert 0 < r["params"]["trainable"] < r["params"]["total"] / 10
        assert r["metrics"]["test"]["perplexity"] == pytest.approx(math.exp(r["metrics"]["test"]["loss"]))
        meta = json.loads((Path(r["run_dir"]) / "model" / "deltakd_model.json").read_text())
        assert meta["format"] == "peft" and meta["base_model"] == str(Path(pre["run_dir"], "model").resolve())
        # deltakd eval reloads the adapter on its base: the same response loss as at the end of training
        again = api.evaluate(r["run_dir"], "test")
        assert again["loss"] == pytest.approx(r["metrics"]["test"]["loss"], rel=1e-4)
    # the untuned pre-trained model on the same response tokens
    model, tok = load_trained(Path(pre["run_dir"]) / "model")
    recipe = load_recipe(runs["tmp"] / "lora.yaml")
    task, data = families.FAMILIES["dialogue"].eval_data(recipe, tok)
    untuned = evaluate_model(model, tok, data["test"], task, 32, runs["tmp"] / "scratch",
                             collator=DialogueCollator(tok.pad_token_id))
    assert prefix["metrics"]["test"]["loss"] < untuned["loss"]
    assert lora["metrics"]["test"]["loss"] < untuned["loss"]


def test_dialogue_eval_metrics_match_hand_computation(runs):
    cls_run = runs["acts"]["run_dir"]
    assert set(runs["acts"]["metrics"]["test"]) >= {"accuracy", "f1", "loss"}
    res = api.dialogue_eval(runs["lora"]["run_dir"], cls_run, max_contexts=12, batch_size=4)
    rows = [json.loads(x) for x in (Path(runs["lora"]["run_dir"]) / "dialogue_generations_test.jsonl")
            .read_text().splitlines()]
    assert len(rows) == res["generations"] == res["contexts"] == 12
    m = res["metrics"]
    assert m["control_accuracy"] == pytest.approx(sum(r["act"] == r["predicted"] for r in rows) / 12)
    assert m["empty_rate"] == pytest.approx(sum(not r["response"] for r in rows) / 12)
    assert all((r["predicted"] == "none") == (not r["response"]) for r in rows)
    cls = ActClassifier(cls_run)
    refs = cls.predict([r["reference"] for r in rows])
    assert m["classifier_accuracy_on_references"] == pytest.approx(
        sum(p == r["act"] for p, r in zip(refs, rows)) / 12)
    saved = json.loads((Path(runs["lora"]["run_dir"]) / "dialogue_eval_test.json").read_text())
    assert saved["metrics"]["bleu"] == pytest.approx(m["bleu"]) and 0 <= m["bleu"] <= 100
    # every act asked of every context: 4 generations per context
    all_acts = api.dialogue_eval(runs["prefix"]["run_dir"], cls_run, max_contexts=3, acts="all")
    # act sensitivity runs through peft prompt learning too (virtual tokens prepended to the labels)
    assert 0.0 <= all_acts["metrics"]["act_recovered"] <= 1.0 and math.isfinite(all_acts["metrics"]["act_nll_gap"])
    assert 0.0 <= m["act_recovered"] <= 1.0 and math.isfinite(m["act_nll_gap"])
    assert all_acts["generations"] == 12 and set(all_acts["metrics"]["control_accuracy_by_act"]) == {
        "inform", "question", "directive", "commissive"}
    # the untuned model (an lm run with the dialogue section) goes through the same evaluator
    base = api.dialogue_eval(runs["pre"]["run_dir"], cls_run, max_contexts=4, greedy=False, seed=3,
                             sensitivity_contexts=0)
    assert "act_nll_gap" not in base["metrics"]
    assert base["generations"] == 4 and base["settings"]["greedy"] is False


def test_generation_does_not_depend_on_batching(runs):
    from deltakd.data.dailydialog import encode_generation_prompts
    from deltakd.data.dailydialog_tasks import dialogue_format, response_split

    model, tok = load_trained(Path(runs["prefix"]["run_dir"]) / "model")
    recipe = load_recipe(runs["tmp"] / "prefix.yaml")
    fmt = dialogue_format(recipe.task)
    prompts = encode_generation_prompts(response_split(recipe.task, "test")[:10], tok, fmt)
    one = generate_responses(model, tok, prompts, GenerationSettings(batch_size=1), 8)
    many = generate_responses(model, tok, prompts, GenerationSettings(batch_size=10), 8)
    assert one == many


def test_prompt_tuning_with_text_init_and_full_finetuning(runs):
    tmp = runs["tmp"]
    prompt = api.train(_tuned(tmp, "prompt", "{method: prompt, num_virtual_tokens: 4, init_text: 'reply with the act'}",
                              epochs=1))
    model, tok = load_trained(Path(prompt["run_dir"]) / "model")
    assert type(model).__name__ == "PeftModelForCausalLM" and prompt["params"]["trainable"] == 4 * 32
    full = api.train(_tuned(tmp, "full", "{method: full}", epochs=1, lr=1e-3))
    assert full["params"]["trainable"] == full["params"]["total"]
    model, _ = load_trained(Path(full["run_dir"]) / "model")
    assert type(model).__name__ == "GPT2LMHeadModel"


@pytest.mark.parametrize("override, expected", [
    ("task.data_dir=/no/such/dd", "task.data_dir: folder '/no/such/dd' does not exist"),
    ("task.max_length=62", "task.max_length: 62 + 4 virtual tokens exceeds the model's 64 positions"),
    ("task.dialogue.act_position=middle", "task.dialogue.act_position: 'middle' is not allowed"),
    ("model.name=microsoft/DialoGPT-small", "not found locally and the hub is offline"),
    ("model.name=./no/model", "model './no/model': path does not exist"),
])
def test_bad_input_exits_2_with_one_line(runs, override, expected, capsys, monkeypatch):
    from deltakd import cli as cli_module

    recipe = runs["tmp"] / "prefix.yaml"
    monkeypatch.setattr(sys, "argv", ["deltakd", "train", str(recipe), override])
    with pytest.raises(SystemExit) as e:
        cli_module.main()
    assert e.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and expected in lines[0], lines


def test_peft_needs_a_pretrained_base(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", f"""
name: scratch-lora
{_task('dialogue')}
model: {{config: {GPT}, vocab_size: 400}}
peft: {{method: lora, target: [c_attn]}}
track: []
"""))
    with pytest.raises(DeltakdError, match="lora needs a pretrained causal LM"):
        families.prepare(recipe)


def test_dialogue_eval_rejects_a_classifier_that_is_not_an_act_classifier(runs):
    with pytest.raises(DeltakdError, match="--classifier: .* holds no finished deltakd run"):
        api.dialogue_eval(runs["lora"]["run_dir"], runs["tmp"] / "nothing")
    with pytest.raises(DeltakdError, match="is not an act classifier"):
        api.dialogue_eval(runs["lora"]["run_dir"], runs["lora"]["run_dir"])


def test_cli_dialogue_eval_writes_results_and_rejects_bad_options(runs, capsys, monkeypatch):
    from deltakd import cli as cli_module

    run, cls = runs["prefix"]["run_dir"], runs["acts"]["run_dir"]
    monkeypatch.setattr(sys, "argv", ["deltakd", "dialogue-eval", run, "--classifier", cls, "--max-contexts", "5",
                                      "--sample", "--seed", "2", "--max-new-tokens", "6", "--split", "valid"])
    with pytest.raises(SystemExit) as ok:
        cli_module.main()
    assert ok.value.code == 0
    saved = json.loads((Path(run) / "dialogue_eval_valid.json").read_text())
    assert saved["contexts"] == 5 and saved["settings"]["max_new_tokens"] == 6 and saved["settings"]["greedy"] is False
    out = capsys.readouterr().out
    assert "control acc" in out and "wrote" in out
    for bad, expected in ((["--acts", "some"], "acts 'some' is unknown; valid: reference, all"),
                          (["--split", "dev2"], "split 'dev2' is unknown"),
                          (["--template-from", "/no/run"], "template_from: '/no/run' holds no finished deltakd run")):
        monkeypatch.setattr(sys, "argv", ["deltakd", "dialogue-eval", run, "--classifier", cls, *bad])
        with pytest.raises(SystemExit) as e:
            cli_module.main()
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert e.value.code == 2 and lines[-1].startswith("error: ") and expected in lines[-1], lines


def test_a_plain_model_folder_loads_like_a_hub_id(runs, tmp_path):
    """A transformers folder (what a hub id such as microsoft/DialoGPT-small downloads to): the
    tokenizer has no pad token, the adapter's base is the folder, and it reloads from there."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(Path(runs["pre"]["run_dir"]) / "model")
    tok.pad_token = None
    folder = tmp_path / "hub-like"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, vocab_size=len(tok),
                               eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)).save_pretrained(folder)
    tok.save_pretrained(folder)
    recipe = _tuned(runs["tmp"], "hublike", "{method: lora, r: 2, target: [c_attn]}", epochs=1)
    r = api.train(recipe, [f"model.name={folder}"])
    meta = json.loads((Path(r["run_dir"]) / "model" / "deltakd_model.json").read_text())
    assert meta["base_model"] == str(folder.resolve())
    again = api.evaluate(r["run_dir"], "valid")
    assert again["loss"] == pytest.approx(r["metrics"]["valid"]["loss"], rel=1e-4)


def test_eval_of_the_pretrained_dialogue_lm_reads_the_same_text(runs):
    again = api.evaluate(runs["pre"]["run_dir"], "test")
    assert again["loss"] == pytest.approx(runs["pre"]["metrics"]["test"]["loss"], rel=1e-4)


def test_a_prefix_per_act_trains_on_its_act_and_answers_for_it(runs):
    """only_acts keeps one act's response turns (every split); dialogue_eval with a run per act
    asks each act's run for that act's responses, over the whole split."""
    tmp = runs["tmp"]
    from deltakd.data.dailydialog import ACTS

    per_act = {}
    for act in ACTS:
        path = write_recipe(tmp / f"pa-{act}.yaml", (tmp / "prefix.yaml").read_text()
                            .replace("name: prefix", f"name: prefix-{act}")
                            .replace("max_eval_dialogues: 10", f"max_eval_dialogues: 10, only_acts: [{act}]")
                            .replace("epochs: 4", "epochs: 1"))
        per_act[act] = api.train(path)
        n_train = per_act[act]["examples"]["train"]
        assert 0 < n_train < runs["prefix"]["examples"]["train"]
    assert sum(r["examples"]["train"] for r in per_act.values()) == runs["prefix"]["examples"]["train"]
    cls = runs["acts"]["run_dir"]
    out = tmp / "per-act-eval"
    routed = api.dialogue_eval({a: r["run_dir"] for a, r in per_act.items()}, cls, out_dir=out,
                               sensitivity_contexts=3)
    rows = [json.loads(x) for x in (out / "dialogue_generations_test.jsonl").read_text().splitlines()]
    assert routed["contexts"] == len(rows) == runs_contexts(runs)  # the whole split, every act
    assert {r["act"] for r in rows} == set(ACTS)
    assert routed["method"] == "prefix (a run per act)" and set(routed["run_dir"]) == set(ACTS)
    assert math.isfinite(routed["metrics"]["act_nll_gap"])
    # a response asked for act a is what a's run alone generates for that context
    for act in ACTS:
        alone = api.dialogue_eval(per_act[act]["run_dir"], cls, sensitivity_contexts=0)
        own = [json.loads(x) for x in (Path(per_act[act]["run_dir"]) / "dialogue_generations_test.jsonl")
               .read_text().splitlines()]
        assert alone["contexts"] == len(own) and all(r["act"] == act for r in own)
        mine = {(r["dialogue"], r["turn"]): r["response"] for r in rows if r["act"] == act}
        assert mine == {(r["dialogue"], r["turn"]): r["response"] for r in own}
    with pytest.raises(DeltakdError, match="needs an output folder"):
        api.dialogue_eval({a: r["run_dir"] for a, r in per_act.items()}, cls)
    with pytest.raises(DeltakdError, match="exactly the acts"):
        api.dialogue_eval({"question": per_act["question"]["run_dir"]}, cls, out_dir=out)
    with pytest.raises(DeltakdError, match="trained on acts"):
        api.dialogue_eval({**{a: r["run_dir"] for a, r in per_act.items()},
                           "inform": per_act["question"]["run_dir"]}, cls, out_dir=out)


def runs_contexts(runs) -> int:
    from deltakd.data.dailydialog_tasks import response_split
    from deltakd.runs import RunDir, load_run_recipe

    return len(response_split(load_run_recipe(RunDir(Path(runs["prefix"]["run_dir"]))).task, "test"))


@pytest.mark.parametrize("method", ["prefix", "lora", "prompt"])
def test_act_tokens_train_only_their_rows_and_reload_with_plain_peft(runs, method):
    """act_tokens: each act one added token whose embedding row trains with the delta module; every
    other row stays the base's, the count is delta + 4 rows, and the run reloads (with its act rows)
    through deltakd and through plain transformers + peft (resize, then PeftModel.from_pretrained)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltakd.data.dailydialog import ACTS, act_token
    from deltakd.dialogue.train import add_act_tokens

    tmp = runs["tmp"]
    sections = {"prefix": "{method: prefix, num_virtual_tokens: 4}", "prompt": "{method: prompt, num_virtual_tokens: 4}",
                "lora": "{method: lora, r: 4, alpha: 8, dropout: 0.0, target: [c_attn]}"}
    recipe = _tuned(tmp, f"at-{method}", sections[method], epochs=2, lr=3e-2)
    r = api.train(recipe, ["task.dialogue.act_tokens=true", "task.dialogue.act_position=opens_response"])
    plain = {"prefix": runs["prefix"]["params"]["trainable"], "lora": runs["lora"]["params"]["trainable"],
             "prompt": 4 * 32}[method]
    assert r["params"]["trainable"] == plain + 4 * 32

    base, base_tok = load_trained(Path(runs["pre"]["run_dir"]) / "model")
    v = base.get_input_embeddings().num_embeddings
    start = base.get_input_embeddings().weight.detach().clone()  # (V, H)
    ids = add_act_tokens(base, base_tok)  # the untrained act rows: the act words' mean embedding
    assert ids == list(range(v, v + 4)) and add_act_tokens(base, base_tok) == ids  # a second call adds nothing
    init = base.get_input_embeddings().weight.detach()
    for a, i in zip(ACTS, ids):
        pieces = base_tok(a, add_special_tokens=False)["input_ids"]
        assert torch.allclose(init[i], start[pieces].mean(0))

    model_dir = Path(r["run_dir"]) / "model"
    model, tok = load_trained(model_dir)
    assert tok.convert_tokens_to_ids([act_token(a) for a in ACTS]) == ids
    trained = model.get_input_embeddings().weight.detach()
    assert trained.shape[0] == v + 4 and torch.equal(trained[:v], start)  # the base rows never moved
    assert all((trained[i] - init[i]).abs().max() > 1e-3 for i in ids)  # every act row trained
    again = api.evaluate(r["run_dir"], "test")  # deltakd eval: the act rows came back with the adapter
    assert again["loss"] == pytest.approx(r["metrics"]["test"]["loss"], rel=1e-4)

    peft_tok = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(Path(runs["pre"]["run_dir"]) / "model")
    lm.resize_token_embeddings(len(peft_tok))
    lm = PeftModel.from_pretrained(lm, model_dir).eval()
    x = torch.tensor([[5, 17, ids[1], 42, 9]])
    with torch.no_grad():
        assert torch.allclose(lm(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5)

    # the training examples: one act token, right before the response
    prep = families.prepare(load_recipe(recipe, ["task.dialogue.act_tokens=true",
                                               "task.dialogue.act_position=opens_response"]))
    for ex, row in list(zip(prep.task.splits["train"], prep.datasets["train"]))[:50]:
        n_prompt = row["labels"].count(IGNORE_INDEX)
        assert [t for t in row["input_ids"] if t in ids] == [ids[ACTS.index(ex.act)]]
        assert row["input_ids"][n_prompt - 1] == ids[ACTS.index(ex.act)]


def test_the_untuned_lm_is_asked_in_the_tuned_runs_format(runs):
    """template_from: the untuned LM gets the act tokens (as its act words) and the act position
    of the tuned run, on the same contexts."""
    tmp = runs["tmp"]
    r = api.train(_tuned(tmp, "at-prompt-t", "{method: prompt, num_virtual_tokens: 4}", epochs=1),
                  ["task.dialogue.act_tokens=true", "task.dialogue.act_position=opens_response"])
    cls = runs["acts"]["run_dir"]
    own = api.dialogue_eval(runs["pre"]["run_dir"], cls, max_contexts=6, sensitivity_contexts=2)
    asked = api.dialogue_eval(runs["pre"]["run_dir"], cls, max_contexts=6, sensitivity_contexts=2,
                              template_from=r["run_dir"])
    assert own["format"]["act_position"] == "first"
    assert asked["format"]["act_position"] == "opens_response" and asked["contexts"] == own["contexts"] == 6
    tuned = api.dialogue_eval(r["run_dir"], cls, max_contexts=6, sensitivity_contexts=0)
    assert [s["reference"] for s in tuned["samples"]] == [s["reference"] for s in asked["samples"]]
    with pytest.raises(DeltakdError, match="template_from: .* holds no finished deltakd run"):
        api.dialogue_eval(runs["pre"]["run_dir"], cls, template_from=tmp / "nothing")


def test_act_tokens_with_weight_decay_on_a_delta_module_is_a_bad_recipe(runs, capsys, monkeypatch):
    from deltakd import cli as cli_module

    monkeypatch.setattr(sys, "argv", ["deltakd", "train", str(runs["tmp"] / "prefix.yaml"),
                                      "task.dialogue.act_tokens=true", "train.weight_decay=0.1"])
    with pytest.raises(SystemExit) as e:
        cli_module.main()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(lines) == 1 and "train.weight_decay: 0.1 with task.dialogue.act_tokens" in lines[0]


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prompt_learning_generation_is_the_greedy_continuation_of_its_forward(runs, method):
    """Greedy generation of prefix / prompt tuning equals argmax decoding with the peft forward
    (the training computation), token for token, also past the model's position count minus the
    virtual tokens (peft's own generate re-inserts them at every step under transformers 5.24)."""
    from deltakd.models.delta import generate_new_tokens

    if method == "prefix":
        run = runs["prefix"]
    else:
        run = api.train(_tuned(runs["tmp"], "gen-prompt", "{method: prompt, num_virtual_tokens: 4}", epochs=1))
    model, tok = load_trained(Path(run["run_dir"]) / "model")
    ids = torch.tensor([[5, 17, 42, 9, 3, 11], [8, 8, 30, 2, 19, 7]])  # (2, 6); 6 + 4 virtual + 50 new < 64
    new = generate_new_tokens(model, ids, torch.ones_like(ids), max_new_tokens=50, do_sample=False,
                              eos_token_id=None, pad_token_id=tok.pad_token_id)
    x = ids
    with torch.no_grad():
        for _ in range(50):
            x = torch.cat([x, model(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert new.shape == (2, 50) and new.tolist() == x[:, 6:].tolist()
    # and that forward does use the virtual tokens: without them the next-token scores differ
    with torch.no_grad(), model.disable_adapter():
        plain = model.get_base_model()(input_ids=ids).logits[:, -1]
    with torch.no_grad():
        tuned = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1]
    assert (tuned - plain).abs().max() > 1e-2


def test_act_tokens_are_never_generated(runs, monkeypatch):
    """An act token is prompt only: generation suppresses every act token the tokenizer has."""
    import deltakd.dialogue.evaluate as ev
    from deltakd.dialogue.train import add_act_tokens

    model, tok = load_trained(Path(runs["pre"]["run_dir"]) / "model")
    ids = add_act_tokens(model, tok)
    with torch.no_grad():  # make the act tokens the most likely next tokens everywhere
        model.get_input_embeddings().weight[ids] = 50 * model.transformer.ln_f.weight
    seen = {}
    real = ev.generate_new_tokens

    def spy(model, input_ids, attention_mask, **kw):
        seen.update(kw)
        return real(model, input_ids, attention_mask, **kw)

    monkeypatch.setattr(ev, "generate_new_tokens", spy)
    prompts = [[5, 17, 42, 9], [8, 8, 30, 2]]
    out = ev.generate_responses(model, tok, prompts, GenerationSettings(), 6)
    assert sorted(seen["suppress_tokens"]) == sorted(ids)
    raw = real(model, torch.tensor(prompts), torch.ones(2, 4, dtype=torch.long), max_new_tokens=6, do_sample=False,
               pad_token_id=tok.pad_token_id, suppress_tokens=ids)
    assert not set(raw.flatten().tolist()) & set(ids) and len(out) == 2
    unsuppressed = real(model, torch.tensor(prompts), torch.ones(2, 4, dtype=torch.long), max_new_tokens=6,
                        do_sample=False, pad_token_id=tok.pad_token_id)
    assert set(unsuppressed.flatten().tolist()) & set(ids)  # without it they would be generated


def _whole_length(tok, ex, label: str) -> int:
    """Tokens of an example with nothing cut, counted by hand: label + eos, each turn + eos, response + eos."""
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return len(enc(label)) + 1 + sum(len(enc(t)) + 1 for t in ex.context) + len(enc(ex.response)) + 1


def test_long_examples_drop_leaves_out_exactly_the_long_train_examples(runs):
    """long_examples: drop (the original's large-model setting) leaves out every train example
    longer than max_length with nothing cut, and only those; valid and test stay truncated, and
    truncate (the default) keeps every example. The run's results say how many were dropped."""
    from deltakd.data.dailydialog_tasks import response_split

    tmp = runs["tmp"]
    path = _tuned(tmp, "long", "{method: lora, r: 2, alpha: 4, dropout: 0.0, target: [c_attn]}", epochs=1)
    truncate = families.prepare(load_recipe(path))
    drop = families.prepare(load_recipe(path, ["task.dialogue.long_examples=drop"]))
    read = response_split(load_recipe(path).task, "train")
    tok = drop.tokenizer
    lengths = [_whole_length(tok, ex, ex.act) for ex in read]
    want = [ex for ex, n in zip(read, lengths) if n <= 48]
    assert truncate.task.splits["train"] == read
    assert drop.task.splits["train"] == want and 50 < len(want) < len(read) - 50
    for split in ("valid", "test"):
        assert drop.task.splits[split] == truncate.task.splits[split]
        assert drop.datasets[split]["input_ids"] == truncate.datasets[split]["input_ids"]
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tok.eos_token_id
    for ex, row in zip(drop.task.splits["train"], drop.datasets["train"]):  # nothing of a kept example is cut
        if len(enc(ex.response)) <= 16:
            assert row["input_ids"] == enc(ex.act) + [eos] + [t for c in ex.context for t in enc(c) + [eos]] + \
                enc(ex.response) + [eos]
    r = api.train(path, ["task.dialogue.long_examples=drop"])
    assert r["examples"]["train"] == len(want)
    assert r["long_examples"] == {"mode": "drop", "max_length": 48, "train_read": len(read),
                                  "train_dropped": len(read) - len(want)}
    with pytest.raises(DeltakdError, match="drop leaves none of the"):
        families.prepare(load_recipe(path, ["task.dialogue.long_examples=drop", "task.max_length=20",
                                            "task.dialogue.max_response_tokens=4"]))


@pytest.mark.slow  # two trainings and three evaluations: 45-86 s on the shared 2-core machine
def test_emotion_controlled_run_judged_by_an_emotion_classifier(runs):
    """control: emotion: the response turn's emotion is the control token (seven emotion tokens train
    with the delta module), an emotion classifier (the act classifier's recipe with control: emotion)
    judges the generations, and an act classifier is refused for such a run (and vice versa)."""
    from deltakd.data.dailydialog import EMOTIONS, act_token
    from deltakd.data.dailydialog_tasks import response_split

    tmp = runs["tmp"]
    emo_over = ["task.dialogue.control=emotion", "task.dialogue.act_tokens=true",
                "task.dialogue.act_position=opens_response"]
    path = _tuned(tmp, "emo-lora", "{method: lora, r: 4, alpha: 8, dropout: 0.0, target: [c_attn]}", epochs=1)
    run = api.train(path, emo_over)
    assert run["params"]["trainable"] == runs["lora"]["params"]["trainable"] + 7 * 32  # 7 emotion rows
    model, tok = load_trained(Path(run["run_dir"]) / "model")
    ids = tok.convert_tokens_to_ids([act_token(e) for e in EMOTIONS])
    prep = families.prepare(load_recipe(path, emo_over))
    for ex, row in list(zip(prep.task.splits["train"], prep.datasets["train"]))[:40]:
        n_prompt = row["labels"].count(IGNORE_INDEX)
        assert [t for t in row["input_ids"] if t in ids] == [ids[EMOTIONS.index(ex.emotion)]]
        assert row["input_ids"][n_prompt - 1] == ids[EMOTIONS.index(ex.emotion)]
    cls = api.train(tmp / "acts.yaml", ["name=emotions", "task.dialogue.control=emotion"])
    assert cls["metrics"]["test"]["accuracy"] >= 0.0
    meta = json.loads((Path(cls["run_dir"]) / "model" / "deltakd_model.json").read_text())
    assert tuple(meta["labels"]) == EMOTIONS

    res = api.dialogue_eval(run["run_dir"], cls["run_dir"], max_contexts=8, sensitivity_contexts=2)
    rows = [json.loads(x) for x in (Path(run["run_dir"]) / "dialogue_generations_test.jsonl").read_text().splitlines()]
    contexts = {(ex.dialogue, ex.turn): ex for ex in response_split(load_recipe(path, emo_over).task, "test")}
    assert res["control"] == "emotion" and len(rows) == 8
    assert all("act" not in r and r["emotion"] == contexts[(r["dialogue"], r["turn"])].emotion for r in rows)
    m = res["metrics"]
    assert m["control_accuracy"] == pytest.approx(sum(r["emotion"] == r["predicted"] for r in rows) / 8)
    assert set(m["control_accuracy_by_emotion"]) == {r["emotion"] for r in rows} and "control_accuracy_by_act" not in m
    assert set(r["predicted"] for r in rows) <= set(EMOTIONS) | {"none"}
    assert math.isfinite(m["act_nll_gap"])  # the reference's emotion against the six others
    every = api.dialogue_eval(run["run_dir"], cls["run_dir"], max_contexts=2, acts="all", sensitivity_contexts=0)
    assert every["generations"] == 14 and set(every["metrics"]["control_accuracy_by_emotion"]) == set(EMOTIONS)
    with pytest.raises(DeltakdError, match="is not an emotion classifier"):
        api.dialogue_eval(run["run_dir"], runs["acts"]["run_dir"], max_contexts=2)
    with pytest.raises(DeltakdError, match="is not an act classifier"):
        api.dialogue_eval(runs["lora"]["run_dir"], cls["run_dir"], max_contexts=2)
