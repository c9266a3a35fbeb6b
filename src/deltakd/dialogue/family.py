"""The dialogue family: ``task.kind: dialogue`` runs (act-controlled DailyDialog responses on a
causal LM, loss on the response only). Judging the saved model with an act classifier is
:mod:`deltakd.dialogue.evaluate`."""

from __future__ import annotations

from typing import Any

from transformers import set_seed

from ..data import TaskData
from ..data.dailydialog import DialogueCollator
from ..recipe import Recipe
from ..runner import Prepared
from ..runner.transformers_family import TransformersFamily
from ..runs import RunDir, RunResults
from .train import dialogue_eval_data, prepare_dialogue


class DialogueFamily(TransformersFamily):
    name = "dialogue"

    def prepare(self, recipe: Recipe) -> Prepared:
        set_seed(recipe.train.seed)
        return prepare_dialogue(recipe)

    def eval_data(self, recipe: Recipe, tokenizer: Any) -> tuple[TaskData, dict[str, Any]]:
        return dialogue_eval_data(recipe, tokenizer)

    def eval_collator(self, recipe: Recipe, tokenizer: Any) -> Any:
        return DialogueCollator(tokenizer.pad_token_id)

    def finish(self, prep: Prepared, trainer: Any, run: RunDir, results: RunResults,
               speed: dict[str, float], test: bool) -> RunResults:
        results = super().finish(prep, trainer, run, results, speed, test)
        results.extra["long_examples"] = prep.state["long_examples"]  # mode, train examples read / dropped
        return results
