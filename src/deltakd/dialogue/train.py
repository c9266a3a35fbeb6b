"""``task.kind: dialogue``: DailyDialog response examples on a causal LM, for the run lifecycle (:mod:`deltakd.runner`).

The causal LM is one of
- a deltakd run or its ``model/`` folder (e.g. the LM pre-trained from scratch on DailyDialog by
  ``recipes/dialogue/pretrain.yaml``; a run-name folder means its newest finished run),
- any local transformers folder or hub id (``microsoft/DialoGPT-small``), through the same code,
- ``model.config``: a fresh model trained from scratch (full fine-tuning only).
The delta module (full, LoRA, prefix, prompt, p-tuning, IA3) comes from :func:`attach_delta`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import datasets as hf_datasets
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..data import TaskData, TaskSpec
from ..data.dailydialog import (
    ACTS,
    DialogueCollator,
    DialogueFormat,
    ResponseExample,
    act_token,
    control_labels,
    drop_long_examples,
    encode_response_examples,
    model_max_positions,
)
from ..data.dailydialog_tasks import RECIPE_SPLITS, dialogue_format, lm_texts, response_split
from ..data.lm import get_or_train_tokenizer
from ..data.splits import subset
from ..errors import DeltakdError
from ..models.causal_lm import lm_config
from ..models.delta import META_FILE, Head, attach_delta, read_meta
from ..models.hub import load_pretrained, resolve_model_path
from ..recipe import Recipe
from ..recipe.schema import FullFT, PrefixPeft, PromptPeft, PTuningPeft
from ..runner import Prepared
from ..runs import finished_runs


def _model_folder(name: str) -> Path | None:
    """A local folder holding a loadable causal LM for ``name``, or None for a hub id."""
    path = Path(name).expanduser()
    if not path.exists():
        try:
            resolve_model_path(name)  # a path-looking name that does not exist fails here
        except DeltakdError as e:
            raise DeltakdError(f"{e} (a dialogue base: a finished kind: lm run such as "
                               "recipes/dialogue/pretrain.yaml, a model folder or a hub id)") from None
        return None
    if (path / META_FILE).is_file():
        model_dir = path
    elif (path / "model" / META_FILE).is_file():
        model_dir = path / "model"
    else:
        finished = [r for r in finished_runs(path) if (r.model_dir / META_FILE).is_file()]
        model_dir = finished[-1].model_dir if finished else path
    if (model_dir / META_FILE).is_file():
        meta = read_meta(model_dir)
        if meta["problem_type"] != "causal_lm" or meta["format"] != "transformers":
            raise DeltakdError(f"model.name: '{name}' is a deltakd {meta['problem_type']} model in format "
                               f"{meta['format']}; a dialogue base must be a plain causal LM")
    elif not (model_dir / "config.json").is_file():
        raise DeltakdError(f"model.name: '{name}' holds no causal LM (no config.json, no finished deltakd run)")
    return model_dir.resolve()


def load_causal_lm(recipe: Recipe, check: Callable[[Any], None] | None = None) -> tuple[Any, Any, str | None]:
    """(model, tokenizer, base path or hub id) of a dialogue recipe; the tokenizer has a pad token.

    ``check(config)`` runs on the model's config before any weights load (position limits).
    """
    mc = recipe.model
    if mc.config is not None:
        if not isinstance(recipe.peft, FullFT):
            raise DeltakdError(f"peft: {recipe.peft.method} needs a pretrained causal LM (model.name), "
                               "not a fresh model.config; train one with kind: lm first")
        tokenizer = get_or_train_tokenizer(mc.tokenizer, lm_texts(recipe.task)["train"], mc.vocab_size)
        config = lm_config(mc.config, tokenizer, pad_token_id=tokenizer.pad_token_id)
        if check is not None:
            check(config)
        return AutoModelForCausalLM.from_config(config), tokenizer, None
    folder = _model_folder(mc.name)
    where = str(folder) if folder is not None else mc.name
    kw = dict(revision=mc.revision, trust_remote_code=mc.trust_remote_code) if folder is None else {}
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, mc.tokenizer or where, "tokenizer",
                                **({} if mc.tokenizer else kw))  # model.revision is the model's, not model.tokenizer's
    if check is not None:
        check(load_pretrained(AutoConfig.from_pretrained, where, "model", **kw))
    model = load_pretrained(AutoModelForCausalLM.from_pretrained, where, "model", **kw)
    if tokenizer.eos_token_id is None:
        raise DeltakdError(f"tokenizer of '{mc.name}' has no eos token; dialogue examples need one")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 / DialoGPT have none
    return model, tokenizer, where


def add_act_tokens(model: Any, tokenizer: Any, labels: tuple[str, ...] = ACTS) -> list[int]:
    """Ids of the control tokens (:func:`act_token`, in ``labels`` order: the four acts by default,
    the seven emotions for emotion control), added where missing.

    A newly added token's embedding row starts at the mean embedding of the label word's pieces
    (the row the word template gave it), so an untrained act token means what the word meant.
    The model's embeddings grow when the tokenizer outgrows them; a tied output layer follows.
    """
    tokens = [act_token(a) for a in labels]
    vocab = tokenizer.get_vocab()
    new = [a for a, t in zip(labels, tokens) if t not in vocab]
    pieces = {a: tokenizer(a, add_special_tokens=False)["input_ids"] for a in new}  # before the tokens exist
    if new:
        tokenizer.add_tokens([t for t in tokens if t not in vocab], special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = model.get_input_embeddings().weight  # (V, H)
    with torch.no_grad():
        for a in new:
            weight[ids[labels.index(a)]] = weight[pieces[a]].mean(0)
    return ids


def virtual_tokens(recipe: Recipe) -> int:
    """Positions the delta module takes before the sequence (prefix / prompt / p-tuning)."""
    p = recipe.peft
    return p.num_virtual_tokens if isinstance(p, (PrefixPeft, PromptPeft, PTuningPeft)) else 0


def encode_split(examples: list[ResponseExample], tokenizer: Any, fmt: DialogueFormat) -> hf_datasets.Dataset:
    rows = encode_response_examples(examples, tokenizer, fmt)
    ids = hf_datasets.Sequence(hf_datasets.Value("int64"))
    features = hf_datasets.Features({"input_ids": ids, "attention_mask": ids, "labels": ids})
    return hf_datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in ("input_ids", "attention_mask", "labels")},
                                         features=features)


def _read_splits(recipe: Recipe) -> dict[str, list[ResponseExample]]:
    out = {split: response_split(recipe.task, split) for split in RECIPE_SPLITS}
    for split, exs in out.items():
        if not exs:
            raise DeltakdError(f"task: the DailyDialog {split} split has no response turns")
    return out


def _select(recipe: Recipe, read: dict[str, list[ResponseExample]], tokenizer: Any, fmt: DialogueFormat
            ) -> tuple[dict[str, list[ResponseExample]], dict[str, Any]]:
    """``long_examples: drop`` leaves out the train examples longer than ``max_length``; then
    ``max_train_samples`` / ``max_eval_samples`` draw their subsets. Also returns what was dropped."""
    cfg = recipe.task
    seed = recipe.train.seed if cfg.split_seed is None else cfg.split_seed
    mode = cfg.dialogue.long_examples
    out = {}
    dropped = 0
    for split, exs in read.items():
        if split == "train" and mode == "drop":
            kept = drop_long_examples(exs, tokenizer, fmt)
            dropped = len(exs) - len(kept)
            if not kept:
                raise DeltakdError(f"task.dialogue.long_examples: drop leaves none of the {len(exs)} train examples "
                                   f"(all longer than task.max_length {cfg.max_length} tokens)")
            exs = kept
        limit = cfg.max_train_samples if split == "train" else cfg.max_eval_samples
        out[split] = subset(exs, limit, seed) if limit else exs
    return out, {"mode": mode, "max_length": fmt.max_length, "train_read": len(read["train"]),
                 "train_dropped": dropped}


def _spec(recipe: Recipe) -> TaskSpec:
    return TaskSpec(recipe.task.name, "lm", None, ("perplexity",), (), "", {})


def prepare_dialogue(recipe: Recipe):
    """Examples, model with its delta module, collator: a :class:`deltakd.runner.Prepared`."""
    if recipe.teacher is not None:
        raise DeltakdError("teacher: distillation is not part of the dialogue task; leave teacher out")
    read = _read_splits(recipe)  # bad data fails before any model loads
    model, tokenizer, base = load_causal_lm(recipe, lambda config: dialogue_format(
        recipe.task, virtual_tokens(recipe), model_max_positions(config)))
    fmt = dialogue_format(recipe.task, virtual_tokens(recipe), model_max_positions(model.config))
    act_ids = add_act_tokens(model, tokenizer, control_labels(fmt.control)) if fmt.act_tokens else []
    splits, long_examples = _select(recipe, read, tokenizer, fmt)
    data = {split: encode_split(exs, tokenizer, fmt) for split, exs in splits.items()}
    hub_rev = recipe.model.revision if base == recipe.model.name and not recipe.model.tokenizer else None
    model = attach_delta(model, recipe.peft, tokenizer.name_or_path, causal_lm=True, trainable_tokens=act_ids,
                         revision=hub_rev)
    task = TaskData(_spec(recipe), None, {k: list(v) for k, v in splits.items()})
    return Prepared(recipe, task, tokenizer, data, model, Head(0, None, causal_lm=True),
                    collator=DialogueCollator(tokenizer.pad_token_id), base_path=base,
                    state={"long_examples": long_examples})


def dialogue_eval_data(recipe: Recipe, tokenizer: Any) -> tuple[TaskData, dict[str, Any]]:
    """The task and its encoded splits, for ``deltakd eval`` of a saved dialogue model."""
    fmt = dialogue_format(recipe.task)
    splits, _ = _select(recipe, _read_splits(recipe), tokenizer, fmt)
    task = TaskData(_spec(recipe), None, {k: list(v) for k, v in splits.items()})
    return task, {k: encode_split(v, tokenizer, fmt) for k, v in splits.items()}
