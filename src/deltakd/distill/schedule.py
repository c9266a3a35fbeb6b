"""Curriculum of loss weights and learning rate (the LoRAILD curriculum recipes).

``epoch`` everywhere is the HF ``TrainerState.epoch``: a float counting completed epochs
(0.0 at the start, 2.5 halfway through the third epoch). A curriculum ``at_epoch=10`` is active
from the first step after 10 full epochs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch.optim.lr_scheduler import LambdaLR
from transformers import TrainerCallback

from ..utils import warning

__all__ = ["LossSchedule", "CurriculumCallback"]


# Tolerance on float epochs: HF computes epoch + (step + 1) / steps_in_epoch.
_EPS = 1e-6


@dataclass(frozen=True)
class LossSchedule:
    """Loss weights (and learning rate) as a function of the epoch.

    Before ``curriculum_at_epoch`` the weights are ``base``; from it on ``curriculum_losses``,
    at once (``ramp_epochs=0``) or interpolated linearly over ``ramp_epochs`` epochs starting at
    ``curriculum_at_epoch``. A loss missing from one of the two dicts has weight 0 there.
    The learning rate switches at once to ``curriculum_lr`` at ``curriculum_at_epoch``.
    """

    base: Mapping[str, float]
    curriculum_at_epoch: float | None = None
    curriculum_losses: Mapping[str, float] | None = None
    ramp_epochs: float = 0
    curriculum_lr: float | None = None
    _keys: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, weights in (("losses", self.base), ("curriculum.losses", self.curriculum_losses or {})):
            for key, value in weights.items():
                if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"distill.{name}.{key}: weight must be a number >= 0, got {value!r}")
        if self.curriculum_at_epoch is not None and self.curriculum_at_epoch < 0:
            raise ValueError(f"distill.curriculum.at_epoch: must be >= 0, got {self.curriculum_at_epoch}")
        if self.ramp_epochs < 0:
            raise ValueError(f"distill.curriculum.ramp_epochs: must be >= 0, got {self.ramp_epochs}")
        if self.curriculum_lr is not None and not self.curriculum_lr > 0:
            raise ValueError(f"distill.curriculum.lr: must be > 0, got {self.curriculum_lr}")
        has_change = self.curriculum_losses is not None or self.curriculum_lr is not None
        if has_change and self.curriculum_at_epoch is None:
            raise ValueError("distill.curriculum.at_epoch: required when curriculum losses or lr are given")
        keys = list(self.base)
        keys += [k for k in (self.curriculum_losses or {}) if k not in keys]
        object.__setattr__(self, "_keys", tuple(keys))

    @property
    def loss_names(self) -> tuple[str, ...]:
        """Every loss that has a non-zero weight at some point (base order first)."""
        return tuple(k for k in self._keys if self.base.get(k, 0.0) or (self.curriculum_losses or {}).get(k, 0.0))

    def progress(self, epoch: float) -> float:
        """0.0 before the curriculum, 1.0 once fully switched, linear in between."""
        if self.curriculum_at_epoch is None or self.curriculum_losses is None:
            return 0.0
        delta = float(epoch) - self.curriculum_at_epoch
        if delta < -_EPS:
            return 0.0
        if self.ramp_epochs == 0:
            return 1.0
        return min(1.0, max(0.0, delta / self.ramp_epochs))

    def weights(self, epoch: float) -> dict[str, float]:
        """Weight of every loss at ``epoch`` (keys: union of base and curriculum losses)."""
        alpha = self.progress(epoch)
        new = self.curriculum_losses or {}
        return {
            k: (1.0 - alpha) * float(self.base.get(k, 0.0)) + alpha * float(new.get(k, 0.0)) for k in self._keys
        }

    def lr_active(self, epoch: float) -> bool:
        """Whether the curriculum learning rate applies at ``epoch``."""
        return (
            self.curriculum_lr is not None
            and self.curriculum_at_epoch is not None
            and float(epoch) >= self.curriculum_at_epoch - _EPS
        )

    def lr_at(self, epoch: float, base_lr: float) -> float:
        """Peak learning rate at ``epoch``: ``curriculum_lr`` once active, else ``base_lr``."""
        return float(self.curriculum_lr) if self.lr_active(epoch) else base_lr  # type: ignore[arg-type]


def _constant_one(_step: int) -> float:
    return 1.0


_PRE_KEY = "deltakd_pre_curriculum_lr"


class CurriculumCallback(TrainerCallback):
    """Switches the optimizer's learning rate to ``schedule.curriculum_lr`` at the curriculum epoch.

    Runs at ``on_train_begin`` (covers resume), ``on_epoch_begin`` and ``on_step_begin`` and is
    idempotent. Once active, for every param group: ``lr``, ``initial_lr`` and the scheduler's
    ``base_lrs`` become ``curriculum_lr * (group's pre-curriculum lr / args.learning_rate)``
    (exactly ``curriculum_lr`` for groups at the Trainer's lr; other groups keep their ratio).
    With ``hold_constant=True`` (default) a ``LambdaLR`` (every HF ``get_scheduler`` schedule)
    gets a constant multiplier, so the lr stays at that value through later
    ``scheduler.step()`` calls; with ``False`` warmup/decay continue from the new peak.
    Loss weights are not touched here: the trainer reads ``schedule.weights(state.epoch)``.
    """

    def __init__(self, schedule: LossSchedule, hold_constant: bool = True) -> None:
        self.schedule = schedule
        self.hold_constant = hold_constant
        self._warned = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._apply(args, state, kwargs.get("optimizer"), kwargs.get("lr_scheduler"))

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._apply(args, state, kwargs.get("optimizer"), kwargs.get("lr_scheduler"))

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._apply(args, state, kwargs.get("optimizer"), kwargs.get("lr_scheduler"))

    def _apply(self, args: Any, state: Any, optimizer: Any, lr_scheduler: Any) -> None:
        epoch = getattr(state, "epoch", None) or 0.0
        if optimizer is None or not self.schedule.lr_active(epoch):
            return
        target = float(self.schedule.curriculum_lr)  # type: ignore[arg-type]
        ref_lr = float(getattr(args, "learning_rate", 0.0) or 0.0)
        groups = optimizer.param_groups
        new_bases = []
        for group in groups:
            if _PRE_KEY not in group:  # saved with the optimizer state, so it survives resume
                group[_PRE_KEY] = float(group.get("initial_lr", group["lr"]))
            ratio = group[_PRE_KEY] / ref_lr if ref_lr > 0 else 1.0
            new_bases.append(target * ratio)

        # Accelerate wraps the scheduler (AcceleratedScheduler.scheduler); unwrap it.
        sched = getattr(lr_scheduler, "scheduler", lr_scheduler)
        factors = [1.0] * len(groups)
        if sched is not None and hasattr(sched, "base_lrs"):
            sched.base_lrs = list(new_bases)
            if isinstance(sched, LambdaLR):
                if self.hold_constant:
                    sched.lr_lambdas = [_constant_one] * len(groups)
                factors = [fn(sched.last_epoch) for fn in sched.lr_lambdas]
            elif self.hold_constant and not self._warned:
                warning(__name__, 
                    "curriculum lr: %s is not a LambdaLR; set its base_lrs only, later steps follow its shape",
                    type(sched).__name__,
                )
                self._warned = True
        for group, base, factor in zip(groups, new_bases, factors):
            group["initial_lr"] = base
            group["lr"] = base * factor
        if sched is not None and hasattr(sched, "_last_lr"):
            sched._last_lr = [group["lr"] for group in groups]
