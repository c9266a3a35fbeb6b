"""Act-controlled generation judged by an act classifier: control accuracy, BLEU, distinct-n.

For each test context and a requested act (the reference response's act, or each of the four),
the causal LM generates a response (greedy or sampling); the act classifier (a deltakd
classification run on DailyDialog utterances) labels it; control accuracy is the share whose
label equals the requested act. An empty response has no act (it never counts as controlled).
The classifier's accuracy on the reference responses of the same contexts is the ceiling.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import set_seed

from ..data.dailydialog import (
    ACTS,
    DialogueFormat,
    ResponseExample,
    act_token,
    encode_generation_prompts,
    encode_response_example,
    model_max_positions,
    response_from_generation,
)
from ..data.dailydialog_tasks import dialogue_format, response_split
from ..errors import DeltakdError
from ..models.delta import count_parameters, find_model_dir, generate_new_tokens, load_trained, read_meta
from ..runs import RunDir, load_run_recipe
from ..utils import atomic_write_json, atomic_write_text
from .metrics import control_accuracy, dialogue_metrics, require_sacrebleu
from .train import add_act_tokens, virtual_tokens

NO_ACT = "none"  # the label of an empty response


@dataclass(frozen=True)
class GenerationSettings:
    """How responses are decoded; ``max_new_tokens`` None means the recipe's ``max_response_tokens + 1``."""

    greedy: bool = True
    max_new_tokens: int | None = None
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float | None = 1.0
    seed: int = 0
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise DeltakdError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise DeltakdError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.greedy and self.temperature <= 0:
            raise DeltakdError(f"temperature must be > 0, got {self.temperature}")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ActClassifier:
    """A saved deltakd act classifier (labels: the four DailyDialog acts)."""

    def __init__(self, path: str | Path, max_length: int = 128) -> None:
        model_dir = find_model_dir(path, "--classifier")
        meta = read_meta(model_dir)
        labels = tuple(meta.get("labels") or ())
        if meta["problem_type"] != "single_label_classification" or set(labels) != set(ACTS):
            raise DeltakdError(f"--classifier: '{path}' is not an act classifier (labels {list(labels)}, "
                               f"need {list(ACTS)})")
        self.model, self.tokenizer = load_trained(model_dir)
        self.model.to(_device())
        self.labels, self.max_length, self.path = labels, max_length, model_dir

    @torch.no_grad()
    def predict(self, texts: Sequence[str], batch_size: int = 64) -> list[str]:
        """The act of each text; ``"none"`` for an empty one."""
        out = [NO_ACT] * len(texts)
        todo = [i for i, t in enumerate(texts) if t.strip()]
        for start in range(0, len(todo), batch_size):
            idx = todo[start:start + batch_size]
            enc = self.tokenizer([texts[i] for i in idx], truncation=True, max_length=self.max_length,
                                 padding=True, return_tensors="pt").to(_device())
            pred = self.model(**enc).logits.argmax(-1).tolist()  # (B,)
            for i, p in zip(idx, pred):
                out[i] = self.labels[p]
        return out


@torch.no_grad()
def act_sensitivity(model: Any, tokenizer: Any, examples: Sequence[ResponseExample], fmt: DialogueFormat,
                    acts: Sequence[str] = ACTS) -> dict[str, float]:
    """Does the model read the act at all? For each example, the reference response's mean
    per-token NLL under every act (teacher forcing, the training template):
    - ``act_nll_gap``: mean over examples of (mean NLL under the other acts) - NLL under the
      reference's act, in nats per token; 0 means the act does not change the model's belief;
    - ``act_recovered``: share of examples whose reference act gives the strictly lowest NLL.

    Unlike control accuracy it does not depend on decoding: a model can shift its distribution
    towards the act and still greedy-decode the same sentence. ``model`` may map each act to its
    own model (per-act prompts): the NLL under act ``a`` is then ``a``'s model's."""
    if not examples:
        return {"act_nll_gap": float("nan"), "act_recovered": float("nan")}
    models = model if isinstance(model, Mapping) else {act: model for act in acts}
    for lm in models.values():
        lm.eval()
    gaps, hits = [], 0
    for ex in examples:
        nll = {}
        for act in acts:
            lm = models[act]
            device = next(lm.parameters()).device
            enc = encode_response_example(replace(ex, act=act), tokenizer, fmt)
            ids = torch.tensor([enc["input_ids"]], device=device)
            labels = torch.tensor([enc["labels"]], device=device)
            nll[act] = float(lm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss)
        others = [v for a, v in nll.items() if a != ex.act]
        gaps.append(sum(others) / len(others) - nll[ex.act])
        hits += all(nll[ex.act] < v for v in others)
    return {"act_nll_gap": sum(gaps) / len(gaps), "act_recovered": hits / len(examples)}


@torch.no_grad()
def generate_responses(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]],
                       settings: GenerationSettings, max_new_tokens: int) -> list[str]:
    """One response per prompt, decoded up to the first eos.

    Prompts are batched by equal length, so no padding enters the model: left padding shifts
    position ids for prompt tuning (peft ignores position ids), and equal-length batches make the
    output of every method independent of the batch it was in.
    """
    set_seed(settings.seed)
    device = _device()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    vocab = tokenizer.get_vocab()
    act_ids = [vocab[act_token(a)] for a in ACTS if act_token(a) in vocab]
    if act_ids:  # act tokens are prompt, never response
        kw["suppress_tokens"] = act_ids
    if settings.greedy:
        kw.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    else:
        kw.update(do_sample=True, temperature=settings.temperature, top_k=settings.top_k or None,
                  top_p=settings.top_p)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    out: list[str] = [""] * len(prompts)
    for length in sorted(by_length):
        idx = by_length[length]
        for start in range(0, len(idx), settings.batch_size):
            chunk = idx[start:start + settings.batch_size]
            ids = torch.tensor([list(prompts[i]) for i in chunk], dtype=torch.long, device=device)  # (B, L)
            gen = generate_new_tokens(model, ids, torch.ones_like(ids), **kw)  # (B, T)
            for i, row in zip(chunk, gen.tolist()):
                out[i] = response_from_generation(row, tokenizer)
    return out


def pick_contexts(examples: Sequence[ResponseExample], max_contexts: int | None, seed: int = 0
                  ) -> list[ResponseExample]:
    """A seeded sample of ``max_contexts`` examples in their original order (all when None)."""
    if max_contexts is None or max_contexts >= len(examples):
        return list(examples)
    if max_contexts < 1:
        raise DeltakdError(f"max_contexts must be >= 1, got {max_contexts}")
    keep = sorted(random.Random(seed).sample(range(len(examples)), max_contexts))
    return [examples[i] for i in keep]


@dataclass
class _LM:
    run: RunDir
    recipe: Any
    meta: dict[str, Any]
    model: Any
    tokenizer: Any
    fmt: DialogueFormat


def _load_lm(run_dir: str | Path, template: Any = None) -> _LM:
    """A run's LM with its example format; ``template`` (a ``task.dialogue`` section) replaces the
    run's own, e.g. to ask an untuned LM in the tuned runs' format (act tokens are added if missing)."""
    model_dir = find_model_dir(run_dir, "run")
    meta = read_meta(model_dir)
    if meta["problem_type"] != "causal_lm":
        raise DeltakdError(f"'{run_dir}' is not a causal-LM run; dialogue-eval needs one")
    run = RunDir(model_dir.parent)
    recipe = load_run_recipe(run)
    if recipe.task.dialogue is None:
        raise DeltakdError(f"'{run.path}': its recipe has no task.dialogue section (not a DailyDialog run)")
    if template is not None:
        recipe = recipe.model_copy(update={"task": recipe.task.model_copy(update={"dialogue": template})})
    model, tokenizer = load_trained(model_dir)
    virtual = virtual_tokens(recipe) if recipe.task.kind == "dialogue" else 0
    fmt = dialogue_format(recipe.task, virtual, model_max_positions(model.config))
    if fmt.act_tokens:
        add_act_tokens(model, tokenizer)  # a tuned run has them; an untuned LM gets them as its words
    model.to(_device())
    model.eval()
    return _LM(run, recipe, meta, model, tokenizer, fmt)


def _routed(run_dir: str | Path | Mapping[str, str | Path], template: Any = None) -> dict[str | None, _LM]:
    """One LM (key None), or one per act for per-act prompts / prefixes (``only_acts`` runs)."""
    if not isinstance(run_dir, Mapping):
        return {None: _load_lm(run_dir, template)}
    if set(run_dir) != set(ACTS):
        raise DeltakdError(f"a run per act needs exactly the acts {list(ACTS)}, got {sorted(run_dir)}")
    lms: dict[str | None, _LM] = {act: _load_lm(run_dir[act], template) for act in ACTS}
    first = lms[ACTS[0]]
    for act, lm in lms.items():
        only = lm.recipe.task.dialogue.only_acts
        if only is not None and act not in only:
            raise DeltakdError(f"'{lm.run.path}' was trained on acts {only}, not '{act}'")
        if (lm.fmt.act_position, lm.fmt.max_length, lm.fmt.max_response_tokens) != \
                (first.fmt.act_position, first.fmt.max_length, first.fmt.max_response_tokens) or \
                lm.tokenizer.get_vocab() != first.tokenizer.get_vocab():
            raise DeltakdError(f"the per-act runs differ in example format or tokenizer ('{lm.run.path}' vs "
                               f"'{first.run.path}')")
    return lms


def evaluate_dialogue(run_dir: str | Path | Mapping[str, str | Path], classifier: str | Path | ActClassifier,
                      split: str = "test", max_contexts: int | None = None,
                      acts: Literal["reference", "all"] = "reference",
                      settings: GenerationSettings = GenerationSettings(), samples: int = 20,
                      sensitivity_contexts: int = 100, out_dir: str | Path | None = None,
                      template_from: str | Path | None = None) -> dict[str, Any]:
    """Generate, classify and score a run's causal LM on a DailyDialog split; write the results.

    ``run_dir`` is a dialogue run, or an ``lm`` run with a ``task.dialogue`` section (the untuned
    pre-trained model), or a run-name folder (its newest finished run); or a mapping act -> run
    (per-act prompts / prefixes, each trained with ``only_acts``): a response asked for act ``a``
    comes from ``a``'s run, and the contexts are the whole split. Writes
    ``dialogue_eval_<split>.json`` (metrics, settings, the first ``samples`` generations) and
    ``dialogue_generations_<split>.jsonl`` (every generation) into the run (or ``out_dir``, needed
    for a run per act), atomically. ``template_from`` (a dialogue run) asks in that run's example
    format (act position, act tokens, context turns) instead of the run's own: the untuned LM
    compared with tuned runs is asked exactly as they are.
    """
    if acts not in ("reference", "all"):
        raise DeltakdError(f"acts '{acts}' is unknown; valid: reference, all")
    require_sacrebleu()  # before any generation: BLEU is scored at the end
    if isinstance(run_dir, Mapping) and out_dir is None:
        raise DeltakdError("dialogue-eval with a run per act needs an output folder (out_dir)")
    template = None
    if template_from is not None:
        template = load_run_recipe(RunDir(find_model_dir(template_from, "template_from").parent)).task.dialogue
        if template is None:
            raise DeltakdError(f"template_from: '{template_from}' has no task.dialogue section")
    lms = _routed(run_dir, template)
    lm0 = next(iter(lms.values()))
    recipe, fmt = lm0.recipe, lm0.fmt
    task = recipe.task
    if None not in lms:  # per-act runs: contexts of every act
        task = task.model_copy(update={"dialogue": task.dialogue.model_copy(update={"only_acts": None})})
    cls = classifier if isinstance(classifier, ActClassifier) else ActClassifier(classifier)
    started = time.time()
    new_tokens = settings.max_new_tokens or fmt.max_response_tokens + 1
    if new_tokens + 2 > fmt.max_length:
        raise DeltakdError(f"max_new_tokens {new_tokens} leaves no room for a prompt in max_length {fmt.max_length}")
    contexts = pick_contexts(response_split(task, split), max_contexts, settings.seed)
    if not contexts:
        raise DeltakdError(f"split '{split}' has no response turns")
    asked = [(ex, ex.act) for ex in contexts] if acts == "reference" else \
        [(ex, act) for ex in contexts for act in ACTS]
    responses: list[str] = [""] * len(asked)
    for key, lm in lms.items():
        idx = [i for i, (_, a) in enumerate(asked) if key is None or a == key]
        if not idx:
            continue
        queries = [replace(asked[i][0], act=asked[i][1]) for i in idx]
        prompts = encode_generation_prompts(queries, lm.tokenizer, replace(lm.fmt, max_response_tokens=new_tokens - 1))
        for i, r in zip(idx, generate_responses(lm.model, lm.tokenizer, prompts, settings, new_tokens)):
            responses[i] = r
    gen_seconds = time.time() - started
    predicted = cls.predict(responses)
    asked_acts = [a for _, a in asked]
    is_ref = [a == ex.act for ex, a in asked]
    ref_resp = [r for r, keep in zip(responses, is_ref) if keep]
    metrics = dialogue_metrics(responses, [ex.response for ex, _ in asked], asked_acts, predicted)
    metrics["bleu"] = dialogue_metrics(ref_resp, [ex.response for ex in contexts],
                                       [ex.act for ex in contexts],
                                       [p for p, keep in zip(predicted, is_ref) if keep])["bleu"]
    metrics["control_accuracy_by_act"] = {
        act: control_accuracy([a for a in asked_acts if a == act], [p for a, p in zip(asked_acts, predicted) if a == act])
        for act in ACTS if act in asked_acts}
    if sensitivity_contexts:
        models = lm0.model if None in lms else {act: lm.model for act, lm in lms.items()}
        metrics.update(act_sensitivity(models, lm0.tokenizer, contexts[:sensitivity_contexts], fmt))
    ref_pred = cls.predict([ex.response for ex in contexts])
    metrics["classifier_accuracy_on_references"] = control_accuracy([ex.act for ex in contexts], ref_pred)
    total, _ = count_parameters(lm0.model)
    out = Path(out_dir) if out_dir is not None else lm0.run.path
    result = {
        "run_dir": str(lm0.run.path) if None in lms else {act: str(lm.run.path) for act, lm in lms.items()},
        "name": recipe.name if None in lms else "+".join(dict.fromkeys(lm.recipe.name for lm in lms.values())),
        "method": lm0.meta.get("method") if None in lms else f"{lm0.meta.get('method')} (a run per act)",
        "classifier": str(cls.path),
        "split": split,
        "acts": acts,
        "contexts": len(contexts),
        "generations": len(responses),
        "settings": {**asdict(settings), "max_new_tokens": new_tokens},
        "format": {"act_position": fmt.act_position, "max_length": fmt.max_length,
                   "context_turns": recipe.task.dialogue.context_turns},
        "metrics": metrics,
        "params_total": total,
        "generation_seconds": gen_seconds,
        "samples": [{"act": a, "context": list(ex.context), "reference": ex.response, "response": r, "predicted": p}
                    for (ex, a), r, p in list(zip(asked, responses, predicted))[:samples]],
    }

    lines = [json.dumps({"dialogue": ex.dialogue, "turn": ex.turn, "act": a, "response": r, "predicted": p,
                         "reference": ex.response}, ensure_ascii=False) for (ex, a), r, p in zip(asked, responses, predicted)]
    atomic_write_text(out / f"dialogue_generations_{split}.jsonl", "\n".join(lines) + "\n")
    atomic_write_json(out / f"dialogue_eval_{split}.json", result)
    return result
