"""The divergence guard of every run: a non-finite training loss (or gradient norm) stops the run.

:class:`DivergenceGuard` is a Trainer callback that also wraps the trainer's ``training_step``
(and ``_get_grad_norm`` where the Trainer has it), so it works for the plain ``Trainer`` and for
every subclass (``DistillTrainer``, ``MultistageTrainer``). Each micro-batch's loss is checked on
the device (``isfinite``, no host sync); the one sync is at the end of each optimizer step, where
the step's flag (loss of every micro-batch, and the gradient norm) is read. It replaces the
Trainer's own per-micro-batch NaN filter, which ``runner.arguments`` turns off so a NaN loss is
logged as NaN, not as the previous mean. A run stops when ``train.nan_patience`` + 1 optimizer
steps in a row are non-finite; the divergence names the first of them and, for a trainer that
records its loss terms (``last_terms``, kept on the device), the first non-finite term.

:func:`finish_diverged` ends such a run: ``model/`` from the newest checkpoint whose weights are
all finite (none: no ``model/``), and ``results.json`` with ``"diverged": {"step", "term",
"value", "message"}``. :func:`nonfinite_metric_warnings` names the evaluation metrics that are
non-finite or a perplexity above 1e6.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import Trainer, TrainerCallback

from ..runs import RunDir, RunResults
from ..utils import warning
from .checkpoints import checkpoint_step
from .family import Family, Prepared

HUGE_PERPLEXITY = 1e6


@dataclass
class Divergence:
    step: int  # the first optimizer step (1-based, as logged) of the non-finite streak
    term: str  # the non-finite loss term ("loss" when the trainer records no terms), or "grad_norm"
    value: str  # "nan", "inf" or "-inf"
    patience: int
    stopped_at: int

    def line(self) -> str:
        what = "the gradient norm" if self.term == "grad_norm" else \
            "the training loss" if self.term == "loss" else f"the training loss term '{self.term}'"
        late = f"; stopped at step {self.stopped_at} (train.nan_patience={self.patience})" if self.patience else ""
        return f"training diverged at step {self.step}: {what} is {self.value}{late}"


def _text(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _first_nonfinite(steps: list[dict[str, Any]]) -> tuple[str, str] | None:
    """(name, value) of the first non-finite term, micro-batch by micro-batch (host reads: a bad step only)."""
    for terms in steps:
        for name, value in terms.items():
            v = float(value)
            if not math.isfinite(v):
                return name, _text(v)
    return None


class DivergenceGuard(TrainerCallback):
    """Stops training after ``patience`` + 1 consecutive non-finite optimizer steps (see the module)."""

    def __init__(self, patience: int = 0) -> None:
        self.patience = patience
        self.diverged: Divergence | None = None
        self._trainer: Trainer | None = None
        self._bad: torch.Tensor | None = None  # this optimizer step's loss flag, on the device
        self._losses: list[torch.Tensor] = []  # this optimizer step's micro-batch losses (read only if bad)
        self._grad_norm: torch.Tensor | float | None = None  # this optimizer step's gradient norm
        self._terms: list[dict[str, Any]] = []  # this optimizer step's recorded terms per micro-batch (read only if bad)
        self._streak: list[tuple[int, str, str]] = []

    def attach(self, trainer: Trainer) -> Trainer:
        """Wrap ``trainer``'s per-step methods (instance attributes: any Trainer subclass)."""
        self._trainer = trainer
        step, grad_norm = trainer.training_step, getattr(trainer, "_get_grad_norm", None)

        def training_step(*args: Any, **kwargs: Any) -> torch.Tensor:
            before = getattr(trainer, "last_terms", None)
            loss = step(*args, **kwargs)
            bad = ~torch.isfinite(loss.detach()).all()
            self._bad = bad if self._bad is None else self._bad | bad
            self._losses.append(loss.detach())
            terms = getattr(trainer, "last_terms", None)
            if terms is not None and terms is not before:  # device tensors (or floats): read only if the step is bad
                self._terms.append(terms)
            return loss

        trainer.training_step = training_step
        if grad_norm is not None and not trainer.args.fp16:  # fp16: the grad scaler skips inf steps by design

            def get_grad_norm(*args: Any, **kwargs: Any):
                norm = grad_norm(*args, **kwargs)
                self._grad_norm = norm.detach() if isinstance(norm, torch.Tensor) else norm
                return norm

            trainer._get_grad_norm = get_grad_norm
        return trainer

    def _step_flags(self) -> tuple[bool, bool]:
        """(loss non-finite, gradient norm non-finite) of this optimizer step: the one host sync."""
        norm = self._grad_norm
        grad_bad = ~torch.isfinite(torch.as_tensor(norm)) if isinstance(norm, (torch.Tensor, float)) else None
        parts = [self._bad, grad_bad]
        device = next((p.device for p in parts if p is not None), torch.device("cpu"))
        flags = torch.stack([torch.zeros((), dtype=torch.bool, device=device) if p is None else p.to(device)
                             for p in parts]).float()  # (2,), on the device: no sync yet
        trainer = self._trainer
        if trainer is not None and trainer.accelerator.num_processes > 1:  # every process stops together
            flags = trainer.accelerator.reduce(flags.to(trainer.args.device), reduction="sum")
        flags = flags.cpu()  # the one host sync of the step
        self._bad = None
        return bool(flags[0] > 0), bool(flags[1] > 0)

    def on_step_end(self, args, state, control, **kwargs):
        loss_bad, grad_bad = self._step_flags()
        terms, self._terms = self._terms, []
        losses, self._losses = self._losses, []
        norm, self._grad_norm = self._grad_norm, None
        if not (loss_bad or grad_bad):
            self._streak.clear()
            return control
        if loss_bad:
            name, value = _first_nonfinite(terms) or ("loss", next((_text(float(x.sum())) for x in losses
                                                  if not torch.isfinite(x).all()), "nan"))
        else:
            name, value = "grad_norm", _text(float(norm)) if isinstance(norm, (torch.Tensor, float)) else "nan"
        self._streak.append((state.global_step, name, value))
        if len(self._streak) > self.patience:
            step, name, value = self._streak[0]
            self.diverged = Divergence(step, name, value, self.patience, state.global_step)
            self._stop(control)
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.diverged is not None:
            self._stop(control)
        return control

    @staticmethod
    def _stop(control) -> None:
        control.should_training_stop = True
        control.should_save = False  # no checkpoint of non-finite weights, no evaluation of them
        control.should_evaluate = False


def finite_weights(folder: Path) -> bool:
    """Whether every floating tensor of the checkpoint's ``*.safetensors`` files is finite (False if none)."""
    files = sorted(folder.glob("*.safetensors"))
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    return False
    return bool(files)


def newest_finite_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint (``trainer_state.json`` written last) whose weights are finite."""
    for ckpt in sorted(folder.glob("checkpoint-*"), key=checkpoint_step, reverse=True):
        if (ckpt / "trainer_state.json").is_file() and finite_weights(ckpt):
            return ckpt
    return None


def finish_diverged(prep: Prepared, family: Family, trainer: Trainer, run: RunDir, divergence: Divergence,
                    started: float, resumed_from: str | None, is_main: bool = True) -> RunResults | None:
    """``model/`` from the newest finite checkpoint (if any) and ``results.json`` naming the divergence."""
    if not is_main:
        return None
    ckpt = newest_finite_checkpoint(run.checkpoints)
    line = divergence.line()
    if ckpt is not None:
        trainer._load_from_checkpoint(str(ckpt))  # the trainer (and subclass) knows its checkpoint layout
        family.save_model(prep, trainer, run)
        line += f"; model/ is {ckpt.name}, the newest checkpoint with finite weights"
    else:
        line += "; no checkpoint has finite weights, so no model/ was saved"
    diverged = {**asdict(divergence), "model_step": checkpoint_step(ckpt) if ckpt else None, "message": line}
    results = RunResults(
        name=prep.recipe.name, run_dir=str(run.path), family=family.name,
        train_steps=int(trainer.state.global_step), train_wall_time_s=time.time() - started,
        resumed_from=Path(resumed_from).name if resumed_from else None,
        last_step=str(checkpoint_step(ckpt)) if ckpt else None, extra={"diverged": diverged})
    results.wall_time_s = time.time() - started
    run.write_results(results)
    return results


def nonfinite_metric_warnings(metrics: dict[str, dict[str, Any]]) -> list[str]:
    """One line per evaluation metric that is non-finite, or a perplexity above 1e6; each also logged."""
    lines = []
    for split, values in metrics.items():
        for name, value in values.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if not math.isfinite(value):
                lines.append(f"{split} {name} is {_text(value)}: the model diverged or the metric overflowed")
            elif name == "perplexity" and value > HUGE_PERPLEXITY:
                lines.append(f"{split} perplexity is {value:.3g} (> {HUGE_PERPLEXITY:.0e}): "
                             "the model is no better than a near-random one, or diverged")
    for line in lines:
        warning(__name__, line)
    return lines
