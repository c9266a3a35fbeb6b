"""The dialogue comparison: pre-trained LM -> full / prefix / prompt / LoRA -> act classifier -> evaluation.

    python benchmarks/dialogue.py [--pretrain-dialogues 0] [--dialogues 1000] [--epochs 2] [--output-dir runs/dialogue_bench]

Pre-trains recipes/dialogue/pretrain.yaml on the first ``--pretrain-dialogues`` (0: all) DailyDialog train dialogues,
tunes each method's recipe from it on the first ``--dialogues``, trains the act classifier, then for
``--max-contexts`` test contexts asks every model (and the untuned one) for a response with the
reference's act and prints a markdown table: trainable parameters, training time, response
perplexity, control accuracy, BLEU, distinct-1/2, empty share, act sensitivity (how much lower the
reference response's NLL is under its own act than under the other three, nats/token; 0: the act is
ignored); and the classifier's accuracy on the reference responses (the ceiling). Writes dialogue_bench.md / .json into --output-dir.

Size: the defaults (pre-training on all 11,118 train dialogues for 2 epochs, tuning on 1000
dialogues, ~6.4k response examples, for 2 epochs) took 34 minutes on one CPU thread beside another
job, reusing a finished act classifier (--classifier RUN); training it adds ~2.5 minutes.
With --dialogues 2000 --classifier-dialogues 3000 (everything from nothing: pre-training 689 s,
classifier 549 s) and the recipes' act tokens opening the response, it took 46 minutes on 2 threads:
control accuracy untuned 0.400, full 0.673, LoRA 0.670, prompt 0.650, prefix 0.607 (ceiling 0.780).
With the act as words placed first (--set task.dialogue.act_tokens=false task.dialogue.act_position=first,
reusing that LM and classifier: --pretrained RUN --classifier RUN; 19 minutes) prefix and prompt stay
at the untuned model's level: untuned 0.407, prefix 0.410, prompt 0.410, LoRA 0.640 (act NLL gap of
prefix / prompt -0.002: they ignore the act). The untuned LM is asked in the first tuned run's format
(template_from).
A tiny check: --dialogues 30 --eval-dialogues 5 --pretrain-epochs 1 --epochs 1 --classifier-dialogues 30
--classifier-epochs 1 --max-contexts 10
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("full", "prefix", "prompt", "lora")


def _untuned_response_ppl(pretrain_dir: str, tuned_recipe, scratch: Path) -> float:
    """Perplexity of the pre-trained LM on the tuned recipes' test response tokens (same examples)."""
    import math

    from deltakd.families import FAMILIES
    from deltakd.runner import evaluate_model
    from deltakd.data.dailydialog import DialogueCollator
    from deltakd.dialogue.train import add_act_tokens
    from deltakd.models.delta import load_trained

    model, tok = load_trained(Path(pretrain_dir) / "model")
    if tuned_recipe.task.dialogue.act_tokens:  # the untuned act tokens: the act words' mean embedding
        add_act_tokens(model, tok)
    task, data = FAMILIES["dialogue"].eval_data(tuned_recipe, tok)
    m = evaluate_model(model, tok, data["test"], task, tuned_recipe.train.eval_batch_size, scratch,
                       collator=DialogueCollator(tok.pad_token_id))
    return math.exp(min(m["loss"], 50.0))


def _pooled_ppl(runs: dict) -> float:
    """exp of the example-weighted mean test loss of per-act runs (each scored on its act's responses)."""
    import math

    total = examples = 0.0
    for r in runs.values():
        n = r["examples"]["test"]
        total += math.log(r["metrics"]["test"]["perplexity"]) * n
        examples += n
    return math.exp(total / examples)


def main() -> None:
    from deltakd import api
    from deltakd.recipe import load_recipe
    from deltakd.runs.rundir import RunDir
    from deltakd.utils import atomic_write_json, atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dialogues", type=int, default=1000, help="train dialogues of the tuning")
    ap.add_argument("--pretrain-dialogues", type=int, default=0,
                    help="train dialogues of the LM pre-training; 0: all 11,118 (more text than the tuning gets)")
    ap.add_argument("--eval-dialogues", type=int, default=200, help="valid/test dialogues")
    ap.add_argument("--pretrain-epochs", type=float, default=2)
    ap.add_argument("--epochs", type=float, default=2, help="tuning epochs of every method")
    ap.add_argument("--classifier-dialogues", type=int, default=800)
    ap.add_argument("--classifier", default=None, help="reuse this finished act-classifier run instead of training one")
    ap.add_argument("--classifier-epochs", type=float, default=2)
    ap.add_argument("--max-contexts", type=int, default=300, help="test contexts generated for")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--per-act", nargs="*", default=[], choices=METHODS,
                    help="also train these methods as a run per act (task.dialogue.only_acts; per-act prompts / "
                         "prefixes), evaluated together: row '<method> per act'")
    ap.add_argument("--pretrained", default=None,
                    help="reuse this finished pre-training run (recipes/dialogue/pretrain.yaml) instead of training one")
    ap.add_argument("--data-dir", default=None, help="DailyDialog folder (default: the recipes')")
    ap.add_argument("--output-dir", default="runs/dialogue_bench")
    ap.add_argument("--set", dest="sets", nargs="*", default=[], help="extra dotted overrides for every LM recipe")
    a = ap.parse_args()
    recipes = ROOT / "recipes" / "dialogue"
    common = [f"output_dir={a.output_dir}", f"task.dialogue.max_dialogues={a.dialogues}",
              f"task.dialogue.max_eval_dialogues={a.eval_dialogues}"] + \
        ([f"task.data_dir={a.data_dir}"] if a.data_dir else [])
    t0 = time.time()
    cls = RunDir(Path(a.classifier)).read_results() if a.classifier else None  # checked before any training
    pre = RunDir(Path(a.pretrained)).read_results() if a.pretrained else \
        api.train(recipes / "pretrain.yaml", [*common, f"task.dialogue.max_dialogues={a.pretrain_dialogues or 'null'}",
                                              f"train.epochs={a.pretrain_epochs}", *a.sets])
    if cls is None:
        cls = api.train(recipes / "act_classifier.yaml", [*common, f"task.dialogue.max_dialogues={a.classifier_dialogues}",
                                                          f"train.epochs={a.classifier_epochs}"])
    tuned = {}
    for m in a.methods:
        tuned[m] = api.train(recipes / f"{m}.yaml",
                             [*common, f"model.name={pre['run_dir']}", f"train.epochs={a.epochs}", *a.sets])
    from deltakd.data.dailydialog import ACTS

    for m in a.per_act:
        runs = {act: api.train(recipes / f"{m}.yaml", [*common, f"model.name={pre['run_dir']}",
                                                        f"train.epochs={a.epochs}", f"task.dialogue.only_acts=[{act}]",
                                                        f"name=dialogue-{m}-{act}", *a.sets]) for act in ACTS}
        tuned[f"{m} per act"] = {
            "run_dir": {act: r["run_dir"] for act, r in runs.items()},
            "params": {"trainable": sum(r["params"]["trainable"] for r in runs.values()),
                       "trainable_pct": sum(r["params"]["trainable_pct"] for r in runs.values())},
            "train_runtime_s": sum(r["train_runtime_s"] for r in runs.values()),
            # response perplexity over every act's test responses: example-weighted across the runs
            "metrics": {"test": {"perplexity": _pooled_ppl(runs)}}}
    gen = dict(max_contexts=a.max_contexts, max_new_tokens=a.max_new_tokens)
    # the untuned LM is asked exactly as the tuned runs are (their act position, act tokens, contexts)
    template = next((r["run_dir"] if isinstance(r["run_dir"], str) else next(iter(r["run_dir"].values()))
                     for r in tuned.values()), None)
    evals = {"untuned": api.dialogue_eval(pre["run_dir"], cls["run_dir"], **gen, template_from=template,
                                          out_dir=Path(a.output_dir) / "untuned")}
    for m, r in tuned.items():
        routed = isinstance(r["run_dir"], dict)
        evals[m] = api.dialogue_eval(r["run_dir"], cls["run_dir"], **gen,
                                     out_dir=Path(a.output_dir) / m.replace(" ", "-") if routed else None)
    first = load_recipe(recipes / f"{a.methods[0]}.yaml", [*common, f"model.name={pre['run_dir']}", *a.sets])
    with tempfile.TemporaryDirectory() as scratch:
        untuned_ppl = _untuned_response_ppl(pre["run_dir"], first, Path(scratch))

    head = ("| model | trainable params | trainable % | train time (s) | response ppl (test) | control acc | "
            "BLEU | distinct-1 | distinct-2 | empty | act NLL gap | act recovered |")
    lines = [head, "|---" * 12 + "|"]
    rows = {}
    for name, ev in evals.items():
        run = tuned.get(name)
        mm = ev["metrics"]
        ppl = run["metrics"]["test"]["perplexity"] if run else untuned_ppl
        params = (f"{run['params']['trainable']:,}", f"{run['params']['trainable_pct']:.2f}",
                  f"{run['train_runtime_s']:.0f}") if run else ("0", "0.00", "-")
        rows[name] = {"metrics": mm, "response_ppl": ppl, "params": run["params"] if run else None,
                      "train_runtime_s": run["train_runtime_s"] if run else None,
                      "run_dir": run["run_dir"] if run else pre["run_dir"]}
        lines.append(f"| {name} | {params[0]} | {params[1]} | {params[2]} | {ppl:.2f} | "
                     f"{mm['control_accuracy']:.3f} | {mm['bleu']:.2f} | {mm['distinct_1']:.3f} | "
                     f"{mm['distinct_2']:.3f} | {mm['empty_rate']:.3f} | {mm['act_nll_gap']:+.4f} | "
                     f"{mm['act_recovered']:.3f} |")
    ceiling = evals["untuned"]["metrics"]["classifier_accuracy_on_references"]
    acc = cls["metrics"]["test"]["accuracy"]
    n = evals["untuned"]["contexts"]
    best = max(tuned, key=lambda k: evals[k]["metrics"]["control_accuracy"]) if tuned else None
    lines += ["", f"act classifier (MiniLM-L6): test accuracy {acc:.3f} on {cls['examples']['test']} utterances; "
              f"accuracy on the {n} reference responses (the control-accuracy ceiling): {ceiling:.3f}",
              f"pre-training: {a.pretrain_dialogues or 'all'} train dialogues, {pre['train_runtime_s']:.0f} s, test perplexity "
              f"{pre['metrics']['test']['perplexity']:.2f}; tuning: {a.dialogues} train dialogues, {n} test contexts, greedy decoding; total {time.time() - t0:.0f} s"]
    if best:
        above = [k for k in tuned if evals[k]["metrics"]["control_accuracy"] > evals["untuned"]["metrics"]["control_accuracy"]]
        lines.append(f"highest control accuracy: {best}; above the untuned model: {', '.join(above) or 'none'}")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    out = Path(a.output_dir)
    atomic_write_text(out / "dialogue_bench.md", text)
    atomic_write_json(out / "dialogue_bench.json", {"args": vars(a), "rows": rows, "classifier": {
        "run_dir": cls["run_dir"], "test_accuracy": acc, "reference_accuracy": ceiling},
        "pretrain": {"run_dir": pre["run_dir"], "metrics": pre["metrics"]}})


if __name__ == "__main__":
    import sys

    from deltakd.errors import DeltakdError

    try:
        main()
    except DeltakdError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
