"""Loss-weight curriculum and the learning-rate switch on a real optimizer / HF scheduler."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import TrainerControl, TrainerState, get_constant_schedule, get_linear_schedule_with_warmup

from deltakd.distill.schedule import CurriculumCallback, LossSchedule

BASE = {"ce": 1.0, "kd": 0.0}
CURR = {"ce": 0.5, "kd": 0.5, "rail_c": 1.0}


def test_weights_without_curriculum_are_base():
    sched = LossSchedule(base={"ce": 0.5, "kd": 0.5})
    assert sched.weights(0.0) == {"ce": 0.5, "kd": 0.5}
    assert sched.weights(100.0) == {"ce": 0.5, "kd": 0.5}
    assert sched.lr_at(100.0, 3e-5) == 3e-5


def test_weights_switch_at_once():
    sched = LossSchedule(base=BASE, curriculum_at_epoch=2, curriculum_losses=CURR, curriculum_lr=1e-5)
    assert sched.weights(0.0) == {"ce": 1.0, "kd": 0.0, "rail_c": 0.0}
    assert sched.weights(1.99) == {"ce": 1.0, "kd": 0.0, "rail_c": 0.0}
    assert sched.weights(2.0) == {"ce": 0.5, "kd": 0.5, "rail_c": 1.0}
    assert sched.weights(7.5) == {"ce": 0.5, "kd": 0.5, "rail_c": 1.0}
    assert sched.lr_at(1.5, 2e-5) == 2e-5
    assert sched.lr_at(2.0, 2e-5) == 1e-5
    assert sched.loss_names == ("ce", "kd", "rail_c")


def test_weights_linear_ramp_exact_numbers():
    sched = LossSchedule(base=BASE, curriculum_at_epoch=2, curriculum_losses=CURR, ramp_epochs=4)
    assert sched.weights(2.0) == {"ce": 1.0, "kd": 0.0, "rail_c": 0.0}
    w = sched.weights(3.0)  # alpha = 0.25
    assert w["ce"] == pytest.approx(0.875) and w["kd"] == pytest.approx(0.125) and w["rail_c"] == pytest.approx(0.25)
    w = sched.weights(5.0)  # alpha = 0.75
    assert w["ce"] == pytest.approx(0.625) and w["kd"] == pytest.approx(0.375) and w["rail_c"] == pytest.approx(0.75)
    assert sched.weights(6.0) == {"ce": 0.5, "kd": 0.5, "rail_c": 1.0}
    assert sched.weights(60.0) == {"ce": 0.5, "kd": 0.5, "rail_c": 1.0}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(base={"ce": -1.0}), r"distill\.losses\.ce: weight must be a number >= 0"),
        (dict(base=BASE, curriculum_losses=CURR), r"at_epoch: required"),
        (dict(base=BASE, curriculum_at_epoch=1, curriculum_lr=0.0), r"curriculum\.lr: must be > 0"),
        (dict(base=BASE, curriculum_at_epoch=1, ramp_epochs=-1), r"ramp_epochs"),
    ],
)
def test_schedule_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossSchedule(**kwargs)


def _setup(two_groups: bool = False, linear: bool = True):
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    if two_groups:
        groups = [{"params": [model.weight], "lr": 1e-3}, {"params": [model.bias], "lr": 1e-2}]
    else:
        groups = [{"params": model.parameters(), "lr": 1e-3}]
    opt = torch.optim.AdamW(groups, lr=1e-3)
    if linear:
        sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=20)
    else:
        sched = get_constant_schedule(opt)
    return model, opt, sched


def _train_step(model, opt, sched):
    model(torch.randn(3, 2)).pow(2).mean().backward()
    opt.step()
    sched.step()
    opt.zero_grad()


ARGS = SimpleNamespace(learning_rate=1e-3)


def _call(cb, event, epoch, opt, sched):
    getattr(cb, event)(ARGS, TrainerState(epoch=epoch), TrainerControl(), optimizer=opt, lr_scheduler=sched)


@pytest.mark.parametrize("linear", [True, False])
def test_callback_switches_lr_and_it_survives_scheduler_steps(linear):
    model, opt, sched = _setup(linear=linear)
    schedule = LossSchedule(base=BASE, curriculum_at_epoch=2, curriculum_losses=CURR, curriculum_lr=1e-5)
    cb = CurriculumCallback(schedule)
    for _ in range(5):
        _train_step(model, opt, sched)
    before = opt.param_groups[0]["lr"]
    _call(cb, "on_epoch_begin", 1.0, opt, sched)
    _call(cb, "on_step_begin", 1.5, opt, sched)
    assert opt.param_groups[0]["lr"] == before  # not yet
    assert before == pytest.approx(1e-3 * (15 / 18) if linear else 1e-3)
    _call(cb, "on_epoch_begin", 2.0, opt, sched)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5)
    assert sched.get_last_lr() == [pytest.approx(1e-5)]
    for i in range(6):
        _train_step(model, opt, sched)
        if i % 2:
            _call(cb, "on_step_begin", 2.0 + i / 10, opt, sched)
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-5)
        assert sched.get_last_lr() == [pytest.approx(1e-5)]


def test_callback_keeps_schedule_shape_when_not_holding_constant():
    model, opt, sched = _setup(linear=True)
    schedule = LossSchedule(base=BASE, curriculum_at_epoch=1, curriculum_lr=1e-5)
    cb = CurriculumCallback(schedule, hold_constant=False)
    for _ in range(10):
        _train_step(model, opt, sched)  # last_epoch = 10 -> factor (20 - 10) / 18
    _call(cb, "on_epoch_begin", 1.0, opt, sched)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5 * 10 / 18)
    _train_step(model, opt, sched)  # factor 9 / 18
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5 * 9 / 18)


def test_callback_preserves_group_ratio_and_survives_resume():
    model, opt, sched = _setup(two_groups=True, linear=True)
    schedule = LossSchedule(base=BASE, curriculum_at_epoch=1, curriculum_lr=1e-5)
    cb = CurriculumCallback(schedule)
    for _ in range(3):
        _train_step(model, opt, sched)
    _call(cb, "on_epoch_begin", 1.0, opt, sched)
    _call(cb, "on_epoch_begin", 1.0, opt, sched)  # idempotent
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(1e-5), pytest.approx(1e-4)]
    _train_step(model, opt, sched)
    opt_state, sched_state = opt.state_dict(), sched.state_dict()

    # resume: fresh optimizer + fresh HF scheduler (original lambdas), load states, on_train_begin
    model2, opt2, sched2 = _setup(two_groups=True, linear=True)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    _call(CurriculumCallback(schedule), "on_train_begin", 1.2, opt2, sched2)
    for _ in range(3):
        _train_step(model2, opt2, sched2)
        assert [g["lr"] for g in opt2.param_groups] == [pytest.approx(1e-5), pytest.approx(1e-4)]


def test_callback_inside_a_real_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 1)

        def forward(self, x, labels):
            return {"loss": (self.lin(x).squeeze(-1) - labels).pow(2).mean()}

    data = [{"x": torch.randn(2), "labels": torch.tensor(1.0)} for _ in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    schedule = LossSchedule(base=BASE, curriculum_at_epoch=1, curriculum_lr=1e-5)
    trainer = Trainer(model=Tiny(), args=args, train_dataset=data, callbacks=[CurriculumCallback(schedule)])
    trainer.train()
    lrs = [(log["epoch"], log["learning_rate"]) for log in trainer.state.log_history if "learning_rate" in log]
    assert len(lrs) == 6  # 2 steps per epoch
    assert lrs[0][1] == pytest.approx(1e-3) and lrs[1][1] == pytest.approx(1e-3 * 5 / 6)  # linear decay
    assert [lr for _, lr in lrs[2:]] == [pytest.approx(1e-5)] * 4  # epochs 1 and 2: curriculum lr held
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)
