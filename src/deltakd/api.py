"""The facade for users and the CLI: ``train``, ``evaluate``, ``predict``, ``load_trained``,
``generate``, ``dialogue_eval``, ``pipeline``, ``sweep``, ``transfer``, ``report``, ``push``,
``list_recipes``. Each is a thin call into the module that owns the work; the CLI only calls these.
A recipe is a YAML path, a dict (the YAML's content) or a recipe object, validated either way."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml
from transformers import set_seed

from . import families
from .dialogue.evaluate import GenerationSettings, evaluate_dialogue
from .errors import DeltakdError, DivergedError
from .models import delta
from .models.delta import find_model_dir, generate_new_tokens, read_meta, virtual_token_count
from .models.predict import Text, predict_run
from .pipeline import StageOutcome, run_pipeline
from .publish import push_run
from .publish.push import Pushed
from .recipe import apply_overrides
from .report.compare import build_report
from .runner import Prepared, lifecycle
from .runs import RunDir, RunResults
from .sweep import SweepResult, run_sweep
from .transfer.run import TransferResult, run_transfer


def resolve_recipe(recipe: str | Path | Mapping[str, Any] | Any, overrides: Iterable[str] = ()
                   ) -> tuple[Any, families.Family]:
    """A recipe given as a YAML path, a dict or a recipe object, with ``overrides`` applied, validated
    by its family (one-line :class:`DeltakdError` on bad input), and that family."""
    if isinstance(recipe, (str, Path)):
        return families.load(recipe, overrides)
    if isinstance(recipe, Mapping):
        data, source = apply_overrides(dict(recipe), overrides), "recipe (dict)"
    else:
        fam = families.family_of(recipe)
        data, source = apply_overrides(fam.dump(recipe), overrides), f"recipe '{recipe.name}'"
    fam = families.family_of(data)
    return fam.validate(data, source=source), fam


def train(recipe: str | Path | Mapping[str, Any] | Any, overrides: Iterable[str] = (), resume: bool = False,
          init: Callable[[Prepared], None] | None = None) -> RunResults | None:
    """Run a recipe of any family and return its results (also ``results.json`` of the run directory;
    None on the other processes under torchrun).

    ``init(prepared)`` runs after the model is built and before anything is written, e.g. to load a
    fused delta module as the starting point (:mod:`deltakd.transfer`); it is skipped on resume
    (the checkpoint holds the weights). See :mod:`deltakd.runner.lifecycle` for the steps.

    A run whose training diverged (:mod:`deltakd.runner.divergence`) raises :class:`DivergedError`
    after its ``results.json`` (with ``diverged``) is written. A recipe with a ``hub:`` section
    pushes the finished run's ``model/`` there (:func:`push`)."""
    recipe, fam = resolve_recipe(recipe, overrides)
    results = lifecycle.run(recipe, fam, resume=resume, init=init)
    if results is not None and results.get("diverged"):
        raise DivergedError(results["diverged"]["message"])
    hub = getattr(recipe, "hub", None)
    if results is not None and hub is not None:
        try:
            push_run(results.run_dir, hub.repo, private=hub.private)
        except DeltakdError as e:
            raise DeltakdError(f"{e}; the run finished in {results.run_dir}: push it again with "
                               f"deltakd push {results.run_dir} --repo {hub.repo}") from None
    return results


def predict(run_dir: str | Path, texts: Text | Iterable[Text], batch_size: int = 32) -> list[dict[str, Any]]:
    """A classifier run's predictions on ``texts`` (a string, a list, or (a, b) pairs for a pair task):
    per text ``label`` (the task's label name), ``score`` (its probability) and ``scores`` (every
    label's); a regression run gives ``score`` alone. See :mod:`deltakd.models.predict`."""
    return predict_run(run_dir, texts, batch_size)


def load_trained(path: str | Path, merged: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) of a finished run, a run-name folder (its newest finished run) or a saved
    ``model/`` folder, in eval mode; ``merged``: a LoRA run's merged copy where it saved one."""
    return delta.load_trained(find_model_dir(path, "run"), merged=merged)


def push(run_dir: str | Path, repo: str, private: bool = False, token: str | None = None) -> Pushed:
    """Upload a finished run's ``model/`` (its card rendered for ``repo``) to the Hugging Face Hub."""
    return push_run(run_dir, repo, private=private, token=token)


def load_recipe(path: str | Path, overrides: Iterable[str] = (), check_files: bool = True) -> Any:
    """A recipe file of any family (``extends:`` merged, overrides applied), validated by its family."""
    return families.load(path, overrides, check_files=check_files)[0]


def evaluate(run_dir: str | Path, split: str = "test", batch_size: int | None = None) -> dict[str, float]:
    """Reload a finished run's model and evaluate it on ``split`` of its task (a multistage stage:
    on every eval set of its recipe); written to the run directory as ``eval_<split>.json`` / ``eval.json``."""
    run = RunDir(Path(run_dir))
    return families.run_family(run).evaluate_saved(run, split, batch_size)


def generate(run_dir: str | Path, prompt: str, max_new_tokens: int = 50, greedy: bool = False,
             temperature: float = 1.0, top_k: int | None = 50, top_p: float | None = None, seed: int = 0,
             num_return_sequences: int = 1) -> list[str]:
    """Continue ``prompt`` with a run's causal LM (sampling unless ``greedy``)."""
    model_dir = find_model_dir(run_dir, "run")
    if read_meta(model_dir)["problem_type"] != "causal_lm":
        raise DeltakdError(f"'{run_dir}' is not a causal-LM run; generate needs one")
    model, tokenizer = delta.load_trained(model_dir)
    set_seed(seed)
    enc = tokenizer(prompt or tokenizer.eos_token, return_tensors="pt")
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id,
                  num_return_sequences=num_return_sequences)
    if greedy:
        kwargs["do_sample"] = False
    else:
        kwargs.update(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if limit is not None:  # keep the prompt's end; virtual tokens (prefix / prompt tuning) take positions too
        keep = max(1, limit - max_new_tokens - virtual_token_count(model))
        enc = {k: v[:, -keep:] for k, v in enc.items()}
    out = generate_new_tokens(model, enc["input_ids"], enc["attention_mask"], **kwargs)  # (N, T)
    return [tokenizer.decode(seq, skip_special_tokens=True) for seq in out]


def dialogue_eval(run_dir: str | Path | Mapping[str, str | Path], classifier: str | Path, split: str = "test",
                  max_contexts: int | None = None, acts: str = "reference", greedy: bool = True,
                  max_new_tokens: int | None = None, temperature: float = 1.0, top_k: int | None = 50,
                  top_p: float | None = 1.0, seed: int = 0, batch_size: int = 32, sensitivity_contexts: int = 100,
                  out_dir: str | Path | None = None, template_from: str | Path | None = None) -> dict[str, Any]:
    """Act-controlled generation of a DailyDialog run judged by an act-classifier run.

    Control accuracy, BLEU, distinct-1/2, empty share, the classifier's accuracy on the
    references, and the act sensitivity of the first ``sensitivity_contexts`` contexts (0: skip);
    written to ``<run>/dialogue_eval_<split>.json`` (or ``out_dir``). ``run_dir`` may map each act
    to a run trained with ``task.dialogue.only_acts`` (per-act prompts / prefixes; needs ``out_dir``).
    ``template_from``: ask in that dialogue run's example format (the untuned LM as the tuned runs).
    See :mod:`deltakd.dialogue.evaluate`.
    """
    settings = GenerationSettings(greedy, max_new_tokens, temperature, top_k, top_p, seed, batch_size)
    return evaluate_dialogue(run_dir, classifier, split, max_contexts, acts, settings,  # type: ignore[arg-type]
                             sensitivity_contexts=sensitivity_contexts, out_dir=out_dir, template_from=template_from)


def pipeline(recipes: Iterable[str | Path], overrides: Iterable[str] = (), init_from: str | None = None,
             test: bool = True, log_dir: str | Path | None = None, force: bool = False) -> list[StageOutcome]:
    """Run multistage stage recipes in order, skipping finished stages (see :mod:`deltakd.pipeline`)."""
    return run_pipeline(recipes, overrides, init_from=init_from, test=test, output_dir=log_dir, force=force)


def list_recipes(root: str | Path = "recipes") -> list[tuple[str, str]]:
    """(path, one-line description) of every recipe under ``root`` (partials named ``_*.yaml`` left out)."""
    out = []
    for path in sorted(Path(root).rglob("*.yaml")):
        if path.name.startswith("_"):
            continue
        try:
            data = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError, OSError):  # listed without a description
            data = {}
        if not isinstance(data, dict):
            data = {}
        desc = str(data.get("description", "")).strip().splitlines()
        out.append((str(path), desc[0] if desc else ""))
    return out


def sweep(recipe: str | Path | Mapping[str, Any] | Any, overrides: Iterable[str] = (), backend: str = "local",
          ray_address: str | None = None, cpus_per_trial: float = 1.0, gpus_per_trial: float = 0.0,
          progress: bool = True) -> SweepResult:
    """Run the recipe's ``sweep:`` grid (one ``train`` per trial, resumable) and summarise it over seeds.

    Returns a :class:`deltakd.sweep.SweepResult`; see :mod:`deltakd.sweep` for the layout on disk.
    """
    if isinstance(recipe, Mapping):  # the grid may need the overrides to validate: they stay with the sweep
        recipe = families.family_of(dict(recipe)).validate(dict(recipe), source="recipe (dict)")
    return run_sweep(recipe, overrides, backend=backend, ray_address=ray_address, cpus_per_trial=cpus_per_trial,
                     gpus_per_trial=gpus_per_trial, progress=progress)


def transfer(recipe: str | Path, overrides: Iterable[str] = (), progress: bool = True) -> TransferResult:
    """Run a transfer recipe (source library, estimators, fusion, k-shot targets; resumable).

    Returns a :class:`deltakd.transfer.run.TransferResult`; see :mod:`deltakd.transfer.run` for the files.
    """
    return run_transfer(recipe, overrides, progress=progress)


def report(paths: Iterable[str | Path], out_dir: str | Path = "report") -> dict[str, Path]:
    """Compare runs / run-name folders / sweep dirs in ``out_dir``/report.md and a self-contained report.html."""
    return build_report(paths, out_dir)
