"""``deltakd transfer RECIPE``: source library, estimators, fusion, k-shot target tuning, results.

Layout under ``<output_dir>/<name>/``::
    estimates/<target>--s<seed>.json    scores per estimator, weights per start, leave-one-out sources
    fused/<target>--<start>--s<seed>.safetensors   the initial delta module of each fused start
    targets/<target>--<start>--s<seed>/<stamp>/    an ordinary run directory per target run
    runs.json                            target run -> run directory and the digest of its start
    results.csv  results.md  weights.csv  weights.png   (written atomically at the end)

Starts: ``random`` (a fresh module), ``uniform`` (the plain average), ``best_single`` (one-hot on the
source ranked best by ``estimate.best_single_by``), one per estimator, ``uniform_factors`` (the
naive LoRA factor average) with ``fusion.factor_baseline``, and ``init_from`` (the module named by
``transfer.target.init_from``, the original's ``train_checkpoint``: a library module, a
``.safetensors`` file or a finished run, checked against the target model before any work). A
target's own source module never takes part (leave-one-out). The target's head starts fresh (the
same seeded initialisation for every start) unless ``fusion.heads: same_labels`` and every source
shares the target's label set.

Rerunning is cheap: finished source modules, estimates and target runs whose recipe and start are
unchanged are reused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import torch
from rich.console import Console
from rich.progress_bar import ProgressBar
from rich.table import Table
from torch import Tensor
from transformers import set_seed

from ..data import load_task
from ..data.tasks import resolve_task
from ..errors import DeltakdError
from ..families import FAMILIES
from ..recipe import Recipe, validate
from ..runner import lifecycle
from ..runs import RunDir, latest_run, read_recipe_data
from ..utils import atomic_save_tensors, atomic_write_json, text_digest
from . import estimators as est
from .fuse import fuse_modules
from .library import (SourceModule, _task_dict, build_module, delta_state, finished_module, given_module, load_delta,
                      source_recipe)
from .merging import Combine
from .probe import ProbeData, fresh_copy, pad_dataset, probe_module
from .recipe import TransferRecipe, load_transfer_recipe
from .report import write_results
from .results import Estimate, TargetRun, TransferResult, summarise, target_run
from .state_dicts import TransferError, flatten_delta, split_head

CLASSIFICATION = FAMILIES["classification"]  # source and target runs are classification runs

FIT = {"loss", "kl", "el2n", "logits_labels"}
GRADS = {"grand"}
TUNING = {"euclidean", "dev_change", "kl_shift"}
TARGET_PROBE = {"cosine", "kl_original"}  # need a fresh module tuned on the target
DEV = {"kl_original"}  # need logits on the target's dev subset
BASE_STARTS = ("random", "uniform", "best_single")
GIVEN = "init_from"  # the start from the module named by transfer.target.init_from


def starts_of(recipe: TransferRecipe) -> list[str]:
    """Every start a target is trained from, in table order."""
    spec = recipe.transfer
    out = list(BASE_STARTS)
    if spec.fusion.factor_baseline and spec.peft.method == "lora":
        out.append("uniform_factors")
    if spec.target.init_from is not None:
        out.append(GIVEN)
    out += [e for e in spec.estimate.estimators if e != "uniform"]
    return out


def run_name(target: str, start: str, seed: int) -> str:
    return f"{target}--{start}--s{seed}"


def out_dir(recipe: TransferRecipe) -> Path:
    return Path(recipe.output_dir) / recipe.name


# --------------------------------------------------------------------------------------------
# ordinary recipes of the target runs
# --------------------------------------------------------------------------------------------


def target_recipe(recipe: TransferRecipe, target: str, start: str, seed: int) -> Recipe:
    spec = recipe.transfer
    tc = spec.target
    train = tc.train.model_dump(mode="json")
    train["seed"] = seed
    data = {
        "name": run_name(target, start, seed),
        "description": f"transfer target {target}, {tc.k}-shot, start {start}, seed {seed}",
        "task": _task_dict(recipe, target, k_shot={"k": tc.k, "per_class": tc.per_class, "seed": seed},
                           max_eval_samples=tc.max_eval_samples),
        "model": {"name": spec.backbone, "revision": spec.backbone_revision},
        "peft": spec.peft.model_dump(mode="json"),
        "train": train,
        "track": [],
        "output_dir": str(out_dir(recipe) / "targets"),
    }
    return validate(data, source=f"{recipe.name}: target '{target}'")


# --------------------------------------------------------------------------------------------
# estimation
# --------------------------------------------------------------------------------------------


def normalise(scores: Tensor, how: str) -> Tensor:
    """z-score (equal scores -> zeros) or unchanged  # (S,)"""
    s = torch.as_tensor(scores, dtype=torch.float64)
    if how == "none" or s.numel() < 2:
        return s
    std = s.std(unbiased=False)
    return torch.zeros_like(s) if std < 1e-12 else (s - s.mean()) / std


def scores_from_probes(recipe: TransferRecipe, target: str, sources: list[str], probes: list[Any],
                       target_state: dict[str, Tensor] | None, labels: Tensor,
                       modules: dict[str, SourceModule],
                       target_dev_logits: Tensor | None = None) -> dict[str, list[float]]:
    """Every estimator's raw scores (higher = more similar), one per source  # (S,)"""
    spec = recipe.transfer
    out: dict[str, Tensor] = {}
    for name in spec.estimate.estimators:
        if name == "uniform":
            out[name] = est.uniform(len(sources))
        elif name == "task_groups":
            out[name] = est.task_groups(sources, target, spec.groups or {})
        elif name == "cosine":
            scaling = {s: modules[s].scaling for s in sources}
            flat_t = _flat(target_state, modules[sources[0]].scaling, spec.peft.method)
            out[name] = est.cosine([_flat(split_head(modules[s].state)[0], scaling[s], spec.peft.method)
                                    for s in sources], flat_t)
        elif name == "euclidean":
            out[name] = est.euclidean([p.before for p in probes], [p.after for p in probes])
        elif name == "dev_change":
            out[name] = est.dev_change([p.dev_before for p in probes], [p.dev_after for p in probes])
        elif name == "kl_shift":
            out[name] = est.kl_shift([p.logits_before for p in probes], [p.logits_after for p in probes])
        elif name == "grand":
            out[name] = est.grand([p.grad_norms for p in probes])
        elif name == "loss":
            out[name] = est.target_loss([p.cv_logits for p in probes], labels)
        elif name == "kl_original":  # the target tuned from random init vs each source, on the dev subset
            out[name] = est.kl_original(target_dev_logits, [p.dev_logits for p in probes])
        else:  # kl, el2n, logits_labels: (logits, labels)
            out[name] = est.get_estimator(name)([p.cv_logits for p in probes], labels)
    return {k: [float(x) for x in v] for k, v in out.items()}


def _flat(state: dict[str, Tensor], scaling: float, method: str) -> Tensor:
    return flatten_delta(state, lora="product", scaling=scaling) if method == "lora" else flatten_delta(state)


def weights_from_scores(recipe: TransferRecipe, scores: dict[str, list[float]],
                        dev_after: list[float] | None, n: int) -> dict[str, list[float]]:
    """Fusion weights of every start except ``random`` (softmax of normalised scores, temperature)."""
    e = recipe.transfer.estimate
    weights: dict[str, list[float]] = {"uniform": [1.0 / n] * n}
    if recipe.transfer.fusion.factor_baseline and recipe.transfer.peft.method == "lora":
        weights["uniform_factors"] = [1.0 / n] * n
    rank = dev_after if e.best_single_by == "dev_after" else scores[e.best_single_by]
    if rank is None:
        raise TransferError("best_single_by: dev_after was not measured")
    best = max(range(n), key=lambda i: (rank[i], -i))
    weights["best_single"] = [1.0 if i == best else 0.0 for i in range(n)]
    for name, s in scores.items():
        if name == "uniform":
            continue
        z = normalise(torch.tensor(s), e.normalize)
        weights[name] = [float(x) for x in est.softmax_weights(z, e.temperature_of(name))]
    return weights


def estimate_target(recipe: TransferRecipe, target: str, seed: int, modules: dict[str, SourceModule],
                    log: "Progress") -> Estimate:
    """Scores and weights for one target and seed: reused from ``estimates/`` when unchanged."""
    spec = recipe.transfer
    sources = list(est.leave_one_out({s: s for s in spec.sources}, target))
    digest = text_digest("transfer-estimate-v1", spec.estimate.model_dump(mode="json"),
                         spec.fusion.model_dump(mode="json"), target_recipe(recipe, target, "probe", seed).task
                         .model_dump(mode="json"), spec.backbone, spec.peft.model_dump(mode="json"),
                         [(s, modules[s].meta.get("run_dir")) for s in sources], spec.groups)
    path = out_dir(recipe) / "estimates" / f"{target}--s{seed}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("digest") == digest:
            return Estimate(**saved)
    log.note(f"estimating {target} seed {seed} ({len(sources)} sources)")
    e = spec.estimate
    prep = CLASSIFICATION.prepare(target_recipe(recipe, target, "probe", seed))
    data = ProbeData(pad_dataset(prep.datasets["train"], prep.tokenizer),
                     pad_dataset(prep.datasets["valid"], prep.tokenizer, e.dev_samples),
                     prep.head.num_labels, tuple(prep.task.spec.metrics))
    pristine = prep.model
    names = set(e.estimators)
    tuning = bool(names & TUNING) or e.best_single_by == "dev_after"
    probes = []
    for s in sources:
        set_seed(seed)
        model = fresh_copy(pristine)
        load_delta(model, _without_head(modules[s].state))
        probes.append(probe_module(model, data, fit=bool(names & FIT), grads=bool(names & GRADS), tuning=tuning,
                                   steps=e.steps, lr=e.lr, batch_size=e.batch_size, folds=e.folds, seed=seed,
                                   dev=bool(names & DEV)))
        del model
    target_state = target_dev_logits = None
    if names & TARGET_PROBE:  # a fresh (random-init) module with a fitted head, tuned on the k-shot data
        set_seed(seed)
        model = fresh_copy(pristine)
        tuned = probe_module(model, data, fit=False, grads=False, tuning=True, steps=e.steps, lr=e.lr,
                             batch_size=e.batch_size, folds=e.folds, seed=seed, dev=bool(names & DEV))
        target_state = _without_head(delta_state(model))
        target_dev_logits = tuned.dev_logits_after
    scores = scores_from_probes(recipe, target, sources, probes, target_state, data.labels, modules,
                                target_dev_logits)
    dev_after = [float(p.dev_after) for p in probes] if tuning else None
    weights = weights_from_scores(recipe, scores, dev_after, len(sources))
    result = Estimate(target, seed, sources, scores, weights, dev_after, digest)
    if lifecycle.distributed_state().is_main_process:  # under torchrun every process estimates, one writes
        atomic_write_json(path, result.to_json())
    return result


def _without_head(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return split_head(state)[0]


# --------------------------------------------------------------------------------------------
# fusion into a start
# --------------------------------------------------------------------------------------------


def fuse_start(recipe: TransferRecipe, modules: list[SourceModule], weights: list[float], start: str,
               target_labels: list[str] | None, seed: int = 0) -> dict[str, Tensor]:
    """The initial delta module (and head, only for identical label sets with ``heads: same_labels``).

    Heads with different label sets are never fused: the target's head starts fresh, because the rows
    of heads for other label sets mean other classes (see :func:`deltakd.transfer.fuse.fuse_heads`).
    """
    spec = recipe.transfer
    f = spec.fusion
    lora = spec.peft.method == "lora"
    method = ("lora_factors" if start == "uniform_factors" or f.lora == "factors" else "lora_svd") if lora \
        else "average"
    combine = Combine(method="average" if method == "lora_factors" else f.combine, density=f.density,
                      drop_rate=f.drop_rate, seed=seed)
    label_sets = None
    if f.heads == "same_labels" and all(m.labels == target_labels for m in modules):
        label_sets = [m.labels for m in modules]
    kw: dict[str, Any] = {}
    if method == "lora_svd":
        kw = dict(rank=spec.peft.r, source_scaling=[m.scaling for m in modules],
                  target_scaling=modules[0].scaling)
    delta, head = fuse_modules([m.state for m in modules], weights, method=method, label_sets=label_sets,
                               combine=combine, **kw)
    out = {k: v.to(torch.float32).contiguous() for k, v in delta.items()}
    if head is not None:
        out.update({k: v.to(torch.float32).contiguous() for k, v in head.items()})
    return out


# --------------------------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------------------------


class Progress:
    """A rich progress line at every boundary (no live display, so the Trainer's bars stay readable)."""

    def __init__(self, name: str, total: int, console: Console | None) -> None:
        self.name, self.total, self.done, self.console = name, total, 0, console

    def note(self, text: str) -> None:
        if self.console is None:
            return
        row = Table.grid(padding=(0, 1))
        row.add_row(f"[bold]transfer {self.name}[/bold]", ProgressBar(total=max(self.total, 1), completed=self.done,
                                                                        width=30),
                    f"{self.done}/{self.total} target runs", text)
        self.console.print(row)


# --------------------------------------------------------------------------------------------
# the whole experiment
# --------------------------------------------------------------------------------------------


def check_recipe(recipe: TransferRecipe) -> dict[str, Recipe]:
    """Every ordinary recipe the experiment will run, validated before any work (bad input: one line)."""
    spec = recipe.transfer
    checked: dict[str, Recipe] = {}
    for name in dict.fromkeys([*spec.sources, *spec.targets]):
        resolve_task(spec.tasks[name])
    for s in spec.sources:
        checked[f"source:{s}"] = source_recipe(recipe, s)
    for t in spec.targets:
        kind = resolve_task(spec.tasks[t]).kind
        if kind != "classification":
            raise DeltakdError(f"transfer.targets: '{t}' is a {kind} task; targets must be classification")
        for seed in spec.target.seeds:
            checked[f"target:{t}:{seed}"] = target_recipe(recipe, t, "random", seed)
    return checked


def given_start(recipe: TransferRecipe) -> dict[str, Tensor] | None:
    """The delta module of ``transfer.target.init_from`` (head dropped), checked against the target
    model's delta parameters (names and shapes) before any work; None without ``init_from``."""
    tc = recipe.transfer.target
    if tc.init_from is None:
        return None
    state = given_module(tc.init_from)
    prep = CLASSIFICATION.prepare(target_recipe(recipe, recipe.transfer.targets[0], GIVEN, tc.seeds[0]))
    own = _without_head(delta_state(prep.model))
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or bad:
        what = (f"lacks {missing[:2]}" if missing else f"has parameters the target model lacks: {extra[:2]}"
                if extra else f"differs in shape at {bad[:2]}")
        raise DeltakdError(f"transfer.target.init_from: the module at '{tc.init_from}' does not fit the target "
                           f"model ({recipe.transfer.backbone} + {recipe.transfer.peft.method}): it {what}")
    return {k: v.to(torch.float32).contiguous() for k, v in state.items()}


def run_transfer(recipe: str | Path | TransferRecipe, overrides: Iterable[str] = (), console: Console | None = None,
                 progress: bool = True) -> TransferResult:
    """Run (or resume) a transfer recipe; see the module docstring."""
    if not isinstance(recipe, TransferRecipe):
        recipe = load_transfer_recipe(recipe, overrides)
    check_recipe(recipe)
    given = given_start(recipe)
    spec = recipe.transfer
    console = (console or Console(stderr=True)) if progress else None
    starts = starts_of(recipe)
    total = len(spec.targets) * len(spec.target.seeds) * len(starts)
    bar = Progress(recipe.name, total, console)
    root = out_dir(recipe)

    state = lifecycle.distributed_state()
    main = state.is_main_process
    modules: dict[str, SourceModule] = {}
    for i, s in enumerate(spec.sources):
        bar.note(f"source module {i + 1}/{len(spec.sources)}: {s}")
        if state.num_processes > 1 and finished_module(recipe, s) is None:
            raise DeltakdError(f"deltakd transfer under torchrun trains the target runs only: source module '{s}' is "
                               "not in the library yet; build the library in one process first")
        modules[s] = build_module(recipe, s, progress=progress)

    manifest_path = root / "runs.json"
    manifest: dict[str, Any] = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    runs: list[TargetRun] = []
    estimates: list[Estimate] = []
    for target in spec.targets:
        for seed in spec.target.seeds:
            estimate = estimate_target(recipe, target, seed, modules, bar)
            estimates.append(estimate)
            srcs = [modules[s] for s in estimate.sources]
            target_labels = _target_labels(recipe, target, seed) if spec.fusion.heads == "same_labels" else None
            for start in starts:
                name = run_name(target, start, seed)
                rec = target_recipe(recipe, target, start, seed)
                init_digest = "random" if start == "random" else f"given:{state_digest(given)}" if start == GIVEN \
                    else fusion_key(start, srcs, estimate.weights[start], spec.fusion.model_dump(mode="json"), seed)
                prev = latest_run(rec.output_dir, name)
                if (prev is not None and prev.finished and _same_start(manifest.get(name, {}), init_digest, srcs,
                                                                     estimate.weights.get(start), prev)
                        and not CLASSIFICATION.differences(read_recipe_data(prev), rec)):
                    if manifest[name].get("init") != init_digest and main:  # an older manifest: record today's key
                        manifest[name]["init"] = init_digest
                        atomic_write_json(manifest_path, manifest)
                    results = prev.read_results()
                    runs.append(target_run(target, start, seed, results, "skipped"))
                    bar.done += 1
                    continue
                bar.note(f"training {name}")
                # fused only for a run that trains: the reuse key above names the inputs, not the result
                fused = None if start == "random" else given if start == GIVEN else \
                    fuse_start(recipe, srcs, estimate.weights[start], start, target_labels, seed)
                if fused is not None and main:
                    _save_fused(root / "fused" / f"{name}.safetensors", fused)
                results = lifecycle.run(rec, CLASSIFICATION, init=None if fused is None else _loader(fused))
                # under torchrun the main process wrote the run; the others read its results
                run_dir = lifecycle.share(results["run_dir"] if main else "", state)
                results = results if main else RunDir(Path(run_dir)).read_results()
                manifest[name] = {"run_dir": run_dir, "init": init_digest,
                                  "weights": estimate.weights.get(start),
                                  "sources": estimate.sources}
                if main:
                    atomic_write_json(manifest_path, manifest)
                runs.append(target_run(target, start, seed, results, "ran"))
                bar.done += 1
                bar.note(f"finished {name}: {runs[-1].metric} {runs[-1].value:.4f}")
    result = TransferResult(root, starts, runs, estimates, modules)
    files = write_results(result, recipe) if main else {}
    shared = lifecycle.share(json.dumps({k: str(v) for k, v in files.items()}) if main else "", state)
    result.files = files if main else {k: Path(v) for k, v in json.loads(shared).items()}
    bar.note(f"results: {result.files['markdown']}")
    return result


def _target_labels(recipe: TransferRecipe, target: str, seed: int) -> list[str] | None:
    spec = resolve_task(recipe.transfer.tasks[target])
    if spec.labels is not None:
        return list(spec.labels)

    return list(load_task(target_recipe(recipe, target, "random", seed).task, seed).labels or []) or None


def fusion_key(start: str, sources: list[SourceModule], weights: list[float], fusion: dict[str, Any],
               seed: int) -> str:
    """What a fused start is made of: the start, each source module's exact stored values, the
    weights and the fusion settings. Unlike a digest of the fused tensors it does not change with
    the floating-point rounding of the SVD / matmuls (thread count, BLAS), so a finished target run
    is reused whenever its inputs are unchanged."""
    payload = {"start": start, "sources": [[m.task, state_digest(m.state)] for m in sources],
               "weights": [round(float(w), 10) for w in weights], "fusion": fusion, "seed": seed}
    return "fusion:" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _same_start(entry: dict[str, Any], key: str, sources: list[SourceModule], weights: list[float] | None,
                prev: RunDir) -> bool:
    """Whether a finished target run started from the start ``key`` describes. Manifests written
    before ``fusion_key`` stored a digest of the fused values; for them the stored sources and
    weights must match and every source module must be older than the run."""
    if entry.get("init") == key:
        return True
    if key == "random" or str(entry.get("init", "")).startswith("fusion:") or weights is None:
        return False
    same = entry.get("sources") == [m.task for m in sources] and entry.get("weights") is not None and \
        len(entry["weights"]) == len(weights) and all(abs(a - b) < 1e-9 for a, b in zip(entry["weights"], weights))
    return same and all(m.path.stat().st_mtime < prev.path.stat().st_mtime for m in sources)


def state_digest(state: dict[str, Tensor]) -> str:
    """A digest of a state dict's keys, shapes and exact values."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach().to("cpu", torch.float32).contiguous()
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.numpy().tobytes())
    return h.hexdigest()


def _loader(fused: dict[str, Tensor]):
    def init(prep) -> None:
        load_delta(prep.model, fused)

    return init


def _save_fused(path: Path, state: dict[str, Tensor]) -> None:
    atomic_save_tensors(path, state)


__all__ = ["Estimate", "TransferResult", "check_recipe", "estimate_target", "fuse_start", "given_start", "run_transfer",
           "starts_of", "summarise", "target_recipe", "weights_from_scores"]
