"""``task.kind: lm`` runs: text cut into token blocks, a causal LM (from scratch, a folder or hub id,
or a student with the teacher's layers), next-token loss or distillation (across tokenizers too:
``distill.cross_tokenizer``, ``distill/cross_tokenizer.py``), perplexity and bits per byte.

Bits per byte (``bits_per_byte`` in every split's metrics, the teacher comparison's and ``deltakd
eval``'s) is the tokenizer-free figure: the total next-token NLL over the split's blocks, in nats,
/ ln 2 / the UTF-8 bytes of the text the predicted tokens cover. Each block predicts its tokens 1 ..
block_size - 1, so its bytes run from the end of its first token to the end of its last; an EOS
(document boundary) counts as one byte; the tail shorter than a block is in neither count
(``data.lm_offsets``). Perplexities of two tokenizers are per different units; bits per byte are not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, Trainer, set_seed

from ..data import TaskData, TaskSpec
from ..data.dailydialog_tasks import lm_texts
from ..data.lm import get_or_train_tokenizer, lm_blocks_cached, read_texts
from ..data.lm_offsets import bits_per_byte, block_bytes_cached, with_teacher_tokens
from ..distill.cross_tokenizer import TeacherTokensCollator, first_token_map
from ..distill.setup import check_kind, make_schedule
from ..distill.tokenizers import tokenizer_difference
from ..errors import DeltakdError
from ..models.causal_lm import lm_config
from ..models.delta import Head, load_teacher
from ..models.hub import load_pretrained, resolve_model_path
from ..recipe import Recipe
from ..runner import Prepared
from ..runner.transformers_family import TransformersFamily
from ..runs import RunDir, RunResults


def _texts(recipe: Recipe) -> tuple[dict[str, list[str]], dict[str, str | None]]:
    """Documents per split and the files they came from (DailyDialog turns: no files)."""
    cfg = recipe.task
    base = cfg.data_dir or Path(".")
    files = {"train": cfg.train_file, "valid": cfg.valid_file, "test": cfg.test_file}
    if cfg.dialogue is not None:  # DailyDialog turns as documents: turn <eos> turn <eos> ...
        return lm_texts(cfg), {}
    return {split: read_texts([base / f]) for split, f in files.items() if f}, files


def scored_tokens(model: Any, n_blocks: int, block_size: int) -> int:
    """The number of tokens the Trainer's evaluation divides the summed next-token NLL by.

    The loss sums over the ``block_size - 1`` predicted tokens of each block; transformers' Trainer
    passes ``num_items_in_batch`` counting ``labels[..., 1:]`` only for a model whose ``loss_type``
    is the causal-LM loss (``Trainer._loss_shifts_labels``, e.g. ``LlamaForCausalLM``) and every label
    otherwise (``GPT2LMHeadModel`` has no ``loss_type``), so its mean is over ``block_size`` tokens
    per block there. The same rule here, so that the total NLL is exact for either.
    """
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    shifted = LOSS_MAPPING.get(getattr(base, "loss_type", None)) is ForCausalLMLoss
    return n_blocks * (block_size - 1 if shifted else block_size)


def _own_tokenizer(recipe: Recipe) -> tuple[str | None, str | None]:
    """Where the model's own tokenizer loads from, and at which revision: ``model.tokenizer``, else a
    pretrained ``model.name``'s (alias, folder or hub id at ``model.revision``); None for a model built
    from ``model.config`` alone (a BPE trained on the data, or with a teacher the teacher's)."""
    m = recipe.model
    if m.tokenizer:
        return m.tokenizer, None
    if m.config is None:
        path = resolve_model_path(m.name)
        return path, m.revision if path == m.name else None
    return None, None


def _task(recipe: Recipe, datasets: dict[str, Any], files: dict[str, str | None]) -> TaskData:
    base = recipe.task.data_dir or Path(".")
    spec = TaskSpec(recipe.task.name, "lm", None, ("perplexity",), (), "",
                    {k: base / v for k, v in files.items() if v})
    return TaskData(spec, None, {k: [None] * len(ds) for k, ds in datasets.items()})


class CausalLMFamily(TransformersFamily):
    name = "lm"
    cross_tokenizer = True

    def prepare(self, recipe: Recipe) -> Prepared:
        """Token blocks, tokenizer (given, the model's, the teacher's, or BPE trained on the data), model."""
        set_seed(recipe.train.seed)
        cfg = recipe.task
        if cfg.dialogue is None and (not cfg.train_file or not cfg.valid_file):
            raise DeltakdError("task: an lm task needs task.train_file and task.valid_file (plain text)")
        if recipe.distill is not None:  # losses of another task kind: refused before any data is read
            check_kind(set(make_schedule(recipe.distill).loss_names), "lm", 0)
        texts, files = _texts(recipe)
        teacher = None
        if recipe.teacher is not None:
            teacher, teacher_tokenizer = load_teacher(recipe.teacher, causal_lm=True)
            if teacher_tokenizer.pad_token is None:  # as the student's own gets it (data.lm)
                teacher_tokenizer.pad_token = teacher_tokenizer.eos_token
            own, revision = _own_tokenizer(recipe)  # a student from a config alone: the teacher's
            load_own = (lambda: get_or_train_tokenizer(own, (), recipe.model.vocab_size, revision=revision)) \
                if own else None
            if own is None and recipe.distill is not None and recipe.distill.cross_tokenizer:
                load_own = lambda: get_or_train_tokenizer(None, texts["train"], recipe.model.vocab_size)
            tokenizer = self.student_tokenizer(recipe, teacher_tokenizer, load_own)
        else:
            own, revision = _own_tokenizer(recipe)
            tokenizer = get_or_train_tokenizer(own, texts["train"], recipe.model.vocab_size, revision=revision)
        datasets = {split: lm_blocks_cached(t, tokenizer, cfg.block_size) for split, t in texts.items()}
        collator, own_teacher = None, None
        if teacher is not None and tokenizer_difference(teacher_tokenizer, tokenizer) is not None:
            own_teacher = teacher_tokenizer  # cross-tokenizer (the preflight let it through)
            limit = getattr(teacher.config, "n_positions", None) or getattr(teacher.config, "max_position_embeddings",
                                                                             None) or 2 * cfg.block_size
            if limit < cfg.block_size:
                raise DeltakdError(f"task.block_size: {cfg.block_size} exceeds the teacher's {limit} positions "
                                   "(across tokenizers the teacher is compared on its own blocks of that size)")
            datasets["train"] = with_teacher_tokens(datasets["train"], texts["train"], tokenizer, teacher_tokenizer,
                                                    cfg.block_size, limit)
            collator = TeacherTokensCollator(teacher_tokenizer.pad_token_id)
        model, copied = self.student_base(recipe, teacher) if teacher is not None else (None, None)
        if model is None and recipe.model.config is not None:
            config = lm_config(recipe.model.config, tokenizer, pad_token_id=tokenizer.eos_token_id)
            limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
            if limit is not None and limit < cfg.block_size:
                raise DeltakdError(f"task.block_size: {cfg.block_size} exceeds the model's {limit} positions")
            model = AutoModelForCausalLM.from_config(config)
        elif model is None:
            model = load_pretrained(AutoModelForCausalLM.from_pretrained, recipe.model.name, "model",
                                    revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code)
        prep = Prepared(recipe, _task(recipe, datasets, files), tokenizer, datasets, model,
                        Head(0, None, causal_lm=True), teacher, collator=collator, state=(texts, own_teacher))
        if teacher is not None:
            prep.distill = self.distill_setup(prep, copied)
        return prep

    def evaluate(self, prep: Prepared, trainer: Trainer) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
        metrics, speed = super().evaluate(prep, trainer)
        return {k: self.more_metrics(prep.recipe, prep.tokenizer, k, m, trainer.model, prep.state[0])
                for k, m in metrics.items()}, speed

    def more_metrics(self, recipe: Recipe, tokenizer: Any, split: str, metrics: dict[str, float], model: Any,
                     texts: dict[str, list[str]] | None = None) -> dict[str, float]:
        """``bits_per_byte`` of the split (module docstring), from the Trainer's mean loss: the total
        NLL is that mean times the tokens the Trainer divided by (:func:`scored_tokens`)."""
        if "loss" not in metrics or not getattr(tokenizer, "is_fast", False):
            return metrics
        texts = texts if texts is not None else _texts(recipe)[0]
        L = recipe.task.block_size
        counts = block_bytes_cached(texts[split], tokenizer, L)
        total_nll_tokens = scored_tokens(model, len(counts), L)
        return {**metrics, "bits_per_byte": bits_per_byte(metrics["loss"], total_nll_tokens, int(counts.sum()))}

    def teacher_split(self, prep: Prepared, split: str) -> tuple[Any, Any]:
        """Across tokenizers the teacher is compared on its own blocks of the split's text."""
        texts, own_teacher = prep.state
        if own_teacher is None:
            return super().teacher_split(prep, split)
        return own_teacher, lm_blocks_cached(texts[split], own_teacher, prep.recipe.task.block_size)

    def make_trainer(self, prep: Prepared, args: Any, callbacks: list) -> Trainer:
        trainer = super().make_trainer(prep, args, callbacks)
        own_teacher = prep.state[1]
        if own_teacher is not None and hasattr(trainer, "vocab_map"):  # kd_mapped across tokenizers
            trainer.vocab_map = first_token_map(own_teacher, prep.tokenizer)
        return trainer

    def finish(self, prep: Prepared, trainer: Trainer, run: RunDir, results: RunResults,
               speed: dict[str, float], test: bool) -> RunResults:
        results = super().finish(prep, trainer, run, results, speed, test)
        results.extra["train_tokens_per_second"] = results.train_samples_per_second * prep.recipe.task.block_size
        return results

    def eval_data(self, recipe: Recipe, tokenizer: Any) -> tuple[TaskData, dict[str, Any]]:
        texts, files = _texts(recipe)
        datasets = {k: lm_blocks_cached(t, tokenizer, recipe.task.block_size) for k, t in texts.items()}
        return _task(recipe, datasets, files), datasets
