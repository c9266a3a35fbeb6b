"""Build a task model with its delta module, save it so it reloads with transformers / peft."""

from __future__ import annotations

import copy
import inspect
import json
import shutil
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from ..errors import DeltakdError
from ..recipe.schema import (
    BottleneckPeft,
    FullFT,
    IA3Peft,
    LoraPeft,
    ModelConfig,
    PeftConfig,
    PrefixPeft,
    PromptPeft,
    PTuningPeft,
)
from ..runs import RunDir, finished_runs
from ..utils import atomic_write_json, replace_dir
from .bottleneck import BottleneckSpec, add_bottleneck_adapters, load_bottleneck, save_bottleneck
from .hub import load_pretrained, portable_name

META_FILE = "deltakd_model.json"


@dataclass(frozen=True)
class Head:
    """What the classification head predicts."""

    num_labels: int
    labels: tuple[str, ...] | None  # class values as the data holds them; None for regression (and causal LMs)
    causal_lm: bool = False
    names: tuple[str, ...] | None = None  # what the model calls each class (id2label); default: the values

    @property
    def problem_type(self) -> str:
        if self.causal_lm:
            return "causal_lm"
        return "regression" if self.labels is None else "single_label_classification"

    def config_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"num_labels": self.num_labels, "problem_type": self.problem_type}
        names = self.names or self.labels
        if names:
            kw["id2label"] = dict(enumerate(names))
            kw["label2id"] = {n: i for i, n in enumerate(names)}
        return kw


def load_tokenizer(cfg: ModelConfig):
    return load_pretrained(AutoTokenizer.from_pretrained, cfg.name, "tokenizer",
                           revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)


def load_base(cfg: ModelConfig, head: Head) -> PreTrainedModel:
    """The backbone with a fresh head of the right size (an existing head of another size is replaced)."""
    return load_pretrained(AutoModelForSequenceClassification.from_pretrained, cfg.name, "model",
                           revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                           ignore_mismatched_sizes=True, **head.config_kwargs())


def peft_config(cfg: PeftConfig, base_path: str, causal_lm: bool = False, revision: str | None = None):
    """The ``peft`` config object for a recipe's peft section (None for full / bottleneck); ``revision``:
    the hub revision prompt tuning's ``init_text`` tokenizer loads at (that of the model at ``base_path``)."""
    task = peft.TaskType.CAUSAL_LM if causal_lm else peft.TaskType.SEQ_CLS
    if isinstance(cfg, LoraPeft):
        return peft.LoraConfig(task_type=task, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                               target_modules=list(cfg.target))
    if isinstance(cfg, PrefixPeft):
        return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=cfg.num_virtual_tokens,
                                       prefix_projection=cfg.projection, encoder_hidden_size=cfg.hidden)
    if isinstance(cfg, PromptPeft):
        if cfg.init_text:
            return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=cfg.num_virtual_tokens,
                                           prompt_tuning_init=peft.PromptTuningInit.TEXT,
                                           prompt_tuning_init_text=cfg.init_text,
                                           tokenizer_name_or_path=base_path,
                                           tokenizer_kwargs={"revision": revision} if revision else None)
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=cfg.num_virtual_tokens)
    if isinstance(cfg, PTuningPeft):
        return peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=cfg.num_virtual_tokens,
                                        encoder_reparameterization_type=cfg.encoder,
                                        encoder_hidden_size=cfg.hidden)
    if isinstance(cfg, IA3Peft):
        return peft.IA3Config(task_type=task, target_modules=list(cfg.target),
                              feedforward_modules=list(cfg.feedforward))
    return None


def bottleneck_spec(cfg: BottleneckPeft):
    return BottleneckSpec(placement=cfg.placement, reduction_factor=cfg.reduction_factor,
                          non_linearity=cfg.non_linearity)


def attach_delta(model: PreTrainedModel, cfg: PeftConfig, base_path: str, causal_lm: bool = False,
                 trainable_tokens: Sequence[int] = (), revision: str | None = None) -> torch.nn.Module:
    """Wrap ``model`` with the recipe's delta module; only the delta (and the head) trains.

    ``base_path`` is where prompt tuning's ``init_text`` tokenizer loads from (a hub id at ``revision``); ``causal_lm`` picks
    peft's causal-LM wrapper (virtual tokens / prefixes before the sequence, loss on shifted labels).
    ``trainable_tokens``: input-embedding rows (added tokens) that train with the delta module
    (:func:`train_embedding_rows`; full fine-tuning trains them anyway).
    """
    if isinstance(cfg, FullFT):
        return model
    if isinstance(cfg, BottleneckPeft):
        if trainable_tokens:
            raise DeltakdError("trainable tokens are not available with bottleneck adapters")

        return add_bottleneck_adapters(model, bottleneck_spec(cfg))

    if isinstance(cfg, PrefixPeft) and not causal_lm:
        accept_past_key_values(model)
    try:
        wrapped = peft.get_peft_model(model, peft_config(cfg, base_path, causal_lm, revision))
    except ValueError as e:
        raise DeltakdError(f"peft ({cfg.method}): {str(e).splitlines()[0]}") from None
    if isinstance(cfg, LoraPeft) and cfg.full:
        for p in wrapped.parameters():
            p.requires_grad_(True)
    elif trainable_tokens:
        train_embedding_rows(wrapped, trainable_tokens)
    return wrapped


def _forward_taking_past_key_values(self: torch.nn.Module, *args: Any, past_key_values: Any = None,
                                    **kwargs: Any) -> Any:
    if past_key_values is not None:
        kwargs["cache"] = past_key_values
    return type(self).forward(self, *args, **kwargs)


def accept_past_key_values(model: torch.nn.Module) -> None:
    """Let peft prefix-tune a classifier whose forward names the cache ``cache``.

    peft 0.21 prefix tuning on a sequence classifier looks for ``past_key_values`` in the model's
    forward signature and otherwise refuses the model; transformers 5.24 renamed that argument
    ``cache`` (BERT-style classifiers pass it on to their encoder through ``**kwargs``). This
    instance gets a forward that takes the old name and hands it on as ``cache``; a bound method,
    so ``copy.deepcopy`` of the model binds the copy's own forward. No-op where not needed.
    """
    params = inspect.signature(type(model).forward).parameters
    if "past_key_values" in params or "cache" in params:
        return
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    model.forward = types.MethodType(_forward_taking_past_key_values, model)


def train_embedding_rows(model: torch.nn.Module, rows: Sequence[int]) -> None:
    """Let only ``rows`` of the input embedding train (e.g. added tokens), the rest frozen.

    The embedding weight gets ``requires_grad`` and a gradient hook that zeroes every other row,
    so with a zero weight decay the optimizer never moves them (tied output rows included). The
    weight carries ``trainable_rows`` for :func:`count_parameters`. peft saves a resized
    embedding with the adapter (:func:`save_trained`), and reloads it.
    """
    weight = model.get_input_embeddings().weight  # (V, H)
    mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype)
    mask[list(rows)] = 1.0
    weight.requires_grad_(True)
    weight.register_hook(lambda grad: grad * mask.to(grad.device, grad.dtype))
    weight.trainable_rows = len(set(rows))


def virtual_token_count(model: torch.nn.Module) -> int:
    """Positions a peft prompt-learning module (prefix, prompt, p-tuning) takes before the sequence."""
    cfg = getattr(model, "active_peft_config", None)
    return int(cfg.num_virtual_tokens) if cfg is not None and cfg.is_prompt_learning else 0


@torch.no_grad()
def generate_new_tokens(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        **kwargs: Any) -> torch.Tensor:
    """Only the generated ids ``(B, T)`` of a causal LM, plain or peft-wrapped.

    peft prompt learning goes through the base model's own ``generate`` with the training layout
    built here once: prompt tuning / p-tuning as virtual-token embeddings before the sequence,
    prefix tuning as a prefilled cache. peft 0.21's ``generate`` looks for the cache under
    ``past_key_values``; transformers 5.24 passes it as ``cache``, so peft re-inserts the virtual
    tokens at every step (positions run past the model's limit) and its prefix is ignored.
    """
    cfg = getattr(model, "active_peft_config", None)
    if cfg is None or not cfg.is_prompt_learning:
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[:, input_ids.shape[1]:]
    base = model.get_base_model()
    batch = input_ids.shape[0]
    mask = torch.cat([attention_mask.new_ones(batch, cfg.num_virtual_tokens), attention_mask], dim=1)
    if cfg.peft_type == peft.PeftType.PREFIX_TUNING:
        key = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        out = base.generate(input_ids=input_ids, attention_mask=mask, **{key: model.get_prompt(batch_size=batch)},
                            **kwargs)  # (B, L + T)
        return out[:, input_ids.shape[1]:]
    embeds = model.word_embeddings(input_ids)  # (B, L, H), the embedding peft's forward uses
    prompts = model.get_prompt(batch_size=batch).to(embeds.dtype)  # (B, V, H)
    return base.generate(inputs_embeds=torch.cat([prompts, embeds], dim=1), attention_mask=mask,
                         **kwargs)  # new tokens only


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; a weight with ``trainable_rows`` counts those rows only."""
    def trained(p: torch.nn.Parameter) -> int:
        rows = getattr(p, "trainable_rows", None)
        return p.numel() if rows is None else rows * (p.numel() // p.shape[0])

    total = sum(p.numel() for p in model.parameters())
    trainable = sum(trained(p) for p in model.parameters() if p.requires_grad)
    return total, trainable


def save_trained(model: torch.nn.Module, directory: Path, cfg: PeftConfig, model_cfg: ModelConfig,
                 head: Head, tokenizer, base_path: str | None = None) -> dict[str, Any]:
    """Save so that the output reloads with transformers (plain) or peft (adapter + head).

    - full fine-tuning, and LoRA with ``full: true`` (base weights trained too): a plain model;
    - other peft methods: the adapter with the trained head (peft ``modules_to_save``);
      LoRA ``merge: true`` also writes ``merged/``, a plain model;
    - bottleneck adapters: adapter weights + config (reload with :func:`load_trained`).
    ``base_path`` (default: ``model_cfg.name``) is where an adapter's base model reloads from; it is
    recorded by a name another machine resolves (:func:`deltakd.models.hub.portable_name`: an alias's
    hub id, not its packaged path here) in ``deltakd_model.json`` and peft's ``adapter_config.json``.
    Returns the metadata written to ``deltakd_model.json``.
    """
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    base_path = portable_name(base_path or model_cfg.name)
    meta: dict[str, Any] = {"base_model": base_path, "method": cfg.method, "problem_type": head.problem_type,
                            "num_labels": head.num_labels, "labels": list(head.labels) if head.labels else None,
                            "label_names": list(head.names) if head.names else None}
    if model_cfg.revision and not Path(base_path).is_absolute():  # a hub id pinned to a revision: reload that one
        meta["base_revision"] = model_cfg.revision
    if isinstance(cfg, FullFT) or (isinstance(cfg, LoraPeft) and cfg.full):
        plain = model.merge_and_unload() if isinstance(cfg, LoraPeft) else model
        plain.save_pretrained(tmp)
        meta["format"] = "transformers"
    elif isinstance(cfg, BottleneckPeft):
        save_bottleneck(model, tmp, bottleneck_spec(cfg), base_path)
        meta["format"] = "bottleneck"
    else:
        # added tokens trained with the delta (train_embedding_rows): the resized embedding goes with the adapter
        resized = getattr(model.get_input_embeddings().weight, "trainable_rows", None) is not None
        model.save_pretrained(tmp, **({"save_embedding_layers": True} if resized else {}))
        _name_base(tmp / "adapter_config.json", base_path)
        meta["format"] = "peft"
        if isinstance(cfg, LoraPeft) and cfg.merge:
            merged = copy.deepcopy(model).merge_and_unload()
            merged.save_pretrained(tmp / "merged")
            tokenizer.save_pretrained(tmp / "merged")
            meta["merged"] = "merged"
    tokenizer.save_pretrained(tmp)
    atomic_write_json(tmp / META_FILE, meta)
    replace_dir(tmp, directory)
    return meta


def _name_base(adapter_config: Path, name: str) -> None:
    """peft records the base model by the path it loaded from (an alias's packaged copy inside this
    machine's environment); name it as another machine finds it. Prompt tuning's ``init_text``
    tokenizer is the same model."""
    data = json.loads(adapter_config.read_text(encoding="utf-8"))
    data["base_model_name_or_path"] = name
    if data.get("tokenizer_name_or_path"):
        data["tokenizer_name_or_path"] = name
    atomic_write_json(adapter_config, data)


def read_meta(directory: Path) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise DeltakdError(f"'{directory}' is not a deltakd model folder (no {META_FILE})")
    return json.loads(path.read_text())


def load_trained(directory: str | Path, merged: bool = False) -> tuple[torch.nn.Module, Any]:
    """Reload a saved model (any format) with its tokenizer, in eval mode."""
    directory = Path(directory)
    meta = read_meta(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    head = Head(meta["num_labels"], tuple(meta["labels"]) if meta["labels"] else None,
                causal_lm=meta["problem_type"] == "causal_lm",
                names=tuple(meta["label_names"]) if meta.get("label_names") else None)
    fmt = meta["format"]
    if head.causal_lm:
        if fmt == "transformers":
            model = AutoModelForCausalLM.from_pretrained(directory)
        elif fmt == "peft":  # an adapter on a causal LM (dialogue): the base from its folder or hub id

            base = load_pretrained(AutoModelForCausalLM.from_pretrained, meta["base_model"], "base model",
                                   revision=meta.get("base_revision"))
            if len(tokenizer) > base.get_input_embeddings().num_embeddings:  # added tokens (act tokens)
                base.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows come with the adapter
            model = PeftModel.from_pretrained(base, directory)
        else:
            raise DeltakdError(f"'{directory}': causal-LM folders of format {fmt} do not load here")
    elif merged and meta.get("merged"):
        model = AutoModelForSequenceClassification.from_pretrained(directory / meta["merged"])
    elif fmt == "transformers":
        model = AutoModelForSequenceClassification.from_pretrained(directory)
    else:
        base = load_pretrained(AutoModelForSequenceClassification.from_pretrained, meta["base_model"], "base model",
                               revision=meta.get("base_revision"), ignore_mismatched_sizes=True,
                               **head.config_kwargs())
        if fmt == "peft":
            accept_past_key_values(base)  # prefix tuning (a no-op otherwise)
            model = PeftModel.from_pretrained(base, directory)
        else:
            model = load_bottleneck(base, directory)
    return model.eval(), tokenizer


def find_model_dir(path: str | Path, what: str = "teacher.run") -> Path:
    """``model/`` of a finished run directory, of the newest finished run under a recipe's folder,
    or itself (a saved model folder: a run's ``model/`` counts only when that run finished)."""
    path = Path(path)
    for cand in (path, path / "model"):
        if (cand / META_FILE).is_file():
            run = RunDir(cand.parent)
            if cand.name == "model" and run.recipe_file.is_file() and not run.finished:
                raise DeltakdError(f"{what}: run '{run.path}' has not finished (no results.json); "
                                   f"resume it with --resume or name a finished run")
            return cand
    finished = [r for r in finished_runs(path) if (r.model_dir / META_FILE).is_file()]
    if finished:
        return finished[-1].model_dir
    raise DeltakdError(f"{what}: '{path}' holds no finished deltakd run (no model/{META_FILE})")


def load_teacher(cfg: Any, causal_lm: bool) -> tuple[torch.nn.Module, Any]:
    """The teacher and its tokenizer: a deltakd run (adapter or merged) or a model path / hub id."""
    if cfg.run is not None:
        return load_trained(find_model_dir(cfg.run), merged=cfg.merged)

    loader = AutoModelForCausalLM if causal_lm else AutoModelForSequenceClassification
    revision = getattr(cfg, "revision", None)
    model = load_pretrained(loader.from_pretrained, cfg.model, "teacher.model", revision=revision)
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, cfg.model, "teacher tokenizer", revision=revision)
    return model.eval(), tokenizer


def plain_copy(model: torch.nn.Module) -> PreTrainedModel:
    """A plain ``transformers`` copy of a (possibly peft-wrapped) model, LoRA merged in."""
    dup = copy.deepcopy(model)
    if hasattr(dup, "merge_and_unload"):
        dup = dup.merge_and_unload()
    return dup
