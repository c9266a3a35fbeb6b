"""Python entry points: ``train``, ``evaluate``, ``list_recipes``. The CLI only calls these."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

from .errors import DeltakdError
from .recipe import Recipe, dump_recipe, load_recipe
from .runs import RunDir, find_resumable, load_run_recipe, new_run_dir
from .trackers import check_trackers
from .utils import atomic_write_json, cpu_only


def _distributed_state():
    """accelerate's process state (initialises torch.distributed under torchrun)."""
    from accelerate import PartialState

    return PartialState(cpu=cpu_only())  # CPU-only: torchrun processes meet over gloo


def _share(value: str, state) -> str:
    """The main process's value on every process (a run directory path)."""
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _same_recipe(saved: Recipe, new: Recipe) -> list[str]:
    a, b = dump_recipe(saved), dump_recipe(new)

    def diff(x: Any, y: Any, prefix: str) -> list[str]:
        if isinstance(x, dict) and isinstance(y, dict):
            return [d for k in sorted(set(x) | set(y)) for d in diff(x.get(k), y.get(k), f"{prefix}{k}.")]
        return [] if x == y else [prefix.rstrip(".")]

    return diff(a, b, "")


def train(recipe: str | Path | Recipe, overrides: Iterable[str] = (), resume: bool = False,
          init: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Run a recipe and return its results (also in ``results.json`` of the run directory).

    ``init(prepared)`` runs after the model is built and before anything is written, e.g. to load a
    fused delta module as the starting point (:mod:`deltakd.transfer`); it is skipped on resume
    (the checkpoint holds the weights)."""
    from . import engine

    if not isinstance(recipe, Recipe) and _is_multistage(recipe):
        from .multistage.run import train_recipe

        return train_recipe(recipe, overrides, resume=resume).results
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    check_trackers(recipe.track)
    state = _distributed_state()
    run: RunDir | None = None
    if resume:
        run = find_resumable(recipe.output_dir, recipe.name)
        if run is None:
            raise DeltakdError(f"--resume: no unfinished run of '{recipe.name}' under '{recipe.output_dir}'")
        changed = _same_recipe(load_run_recipe(run), recipe)
        if changed:
            raise DeltakdError(f"--resume: the recipe differs from the one in '{run.path}' at {', '.join(changed)}")
    prep = engine.prepare(recipe)  # bad data or model fails here, before anything is written
    if init is not None and not resume:
        init(prep)
    if run is None:
        path = str(new_run_dir(recipe.output_dir, recipe.name).path) if state.is_main_process else ""
        run = RunDir(Path(_share(path, state)))
        if state.is_main_process:
            run.write_recipe(recipe)
    return engine.train(prep, run, resume=resume, is_main=state.is_main_process)


def evaluate(run_dir: str | Path, split: str = "test", batch_size: int | None = None) -> dict[str, float]:
    """Reload a finished run's model and evaluate it on ``split`` of its task."""
    from . import engine
    from .models.delta import load_trained

    if _is_multistage(Path(run_dir) / "recipe.yaml"):  # sentence embeddings: every eval set of its recipe
        from .multistage.run import evaluate_run, flat_metrics

        return flat_metrics(evaluate_run(run_dir))
    run = RunDir(Path(run_dir))
    recipe = load_run_recipe(run)
    if not run.model_dir.is_dir():
        raise DeltakdError(f"run '{run.path}' has no model/ (did it finish?)")
    model, tokenizer = load_trained(run.model_dir)
    task, datasets = engine.eval_data(recipe, tokenizer)
    if split not in datasets:
        raise DeltakdError(f"--split: '{split}' not in this task; available: {', '.join(datasets)}")
    with tempfile.TemporaryDirectory() as scratch:
        metrics = engine.evaluate_model(model, tokenizer, datasets[split], task,
                                        batch_size or recipe.train.eval_batch_size, Path(scratch),
                                        collator=engine.eval_collator(recipe, tokenizer))
    atomic_write_json(run.path / f"eval_{split}.json", {"split": split, "metrics": metrics})
    return metrics


def generate(run_dir: str | Path, prompt: str, max_new_tokens: int = 50, greedy: bool = False,
             temperature: float = 1.0, top_k: int | None = 50, top_p: float | None = None, seed: int = 0,
             num_return_sequences: int = 1) -> list[str]:
    """Continue ``prompt`` with a run's causal LM (sampling unless ``greedy``)."""
    from transformers import set_seed

    from .models.delta import find_model_dir, generate_new_tokens, load_trained, read_meta, virtual_token_count

    model_dir = find_model_dir(run_dir)
    if read_meta(model_dir)["problem_type"] != "causal_lm":
        raise DeltakdError(f"'{run_dir}' is not a causal-LM run; generate needs one")
    model, tokenizer = load_trained(model_dir)
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
    from .dialogue.evaluate import GenerationSettings, evaluate_dialogue

    settings = GenerationSettings(greedy, max_new_tokens, temperature, top_k, top_p, seed, batch_size)
    return evaluate_dialogue(run_dir, classifier, split, max_contexts, acts, settings,  # type: ignore[arg-type]
                             sensitivity_contexts=sensitivity_contexts, out_dir=out_dir, template_from=template_from)


def _is_multistage(path: str | Path) -> bool:
    from .multistage.recipe import is_multistage_file

    return Path(path).is_file() and is_multistage_file(path)


def pipeline(recipes: Iterable[str | Path], overrides: Iterable[str] = (), init_from: str | None = None,
             test: bool = True, log_dir: str | Path | None = None, force: bool = False) -> list[Any]:
    """Run multistage stage recipes in order, skipping finished stages (see :mod:`deltakd.multistage.run`)."""
    from .multistage.run import run_pipeline

    return run_pipeline(recipes, overrides, init_from=init_from, test=test, output_dir=log_dir, force=force)


def list_recipes(root: str | Path = "recipes") -> list[tuple[str, str]]:
    """(path, one-line description) of every recipe under ``root`` (partials named ``_*.yaml`` left out)."""
    out = []
    for path in sorted(Path(root).rglob("*.yaml")):
        if path.name.startswith("_"):
            continue
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            data = {}
        desc = str(data.get("description", "")).strip().splitlines()
        out.append((str(path), desc[0] if desc else ""))
    return out


def sweep(recipe: str | Path | Recipe, overrides: Iterable[str] = (), backend: str = "local",
          ray_address: str | None = None, cpus_per_trial: float = 1.0, gpus_per_trial: float = 0.0,
          progress: bool = True):
    """Run the recipe's ``sweep:`` grid (one ``train`` per trial, resumable) and summarise it over seeds.

    Returns a :class:`deltakd.sweep.SweepResult`; see :mod:`deltakd.sweep` for the layout on disk.
    """
    from .sweep import run_sweep

    return run_sweep(recipe, overrides, backend=backend, ray_address=ray_address, cpus_per_trial=cpus_per_trial,
                     gpus_per_trial=gpus_per_trial, progress=progress)


def transfer(recipe: str | Path, overrides: Iterable[str] = (), progress: bool = True):
    """Run a transfer recipe (source library, estimators, fusion, k-shot targets; resumable).

    Returns a :class:`deltakd.transfer.run.TransferResult`; see :mod:`deltakd.transfer.run` for the files.
    """
    from .transfer.run import run_transfer

    return run_transfer(recipe, overrides, progress=progress)


def report(paths: Iterable[str | Path], out_dir: str | Path = "report") -> dict[str, Path]:
    """Compare runs / run-name folders / sweep dirs in ``out_dir``/report.md and a self-contained report.html."""
    from .report.compare import build_report

    return build_report(paths, out_dir)
