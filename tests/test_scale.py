"""Mixed precision and the Trainer's scale switches from the recipe (``train.bf16 / fp16 /
gradient_checkpointing / optim / torch_compile / fsdp / fsdp_config / deepspeed``).

Run on this CPU: bf16 (forced, and native where the CPU has AVX512-BF16 / AMX) with a live and a
cached teacher, gradient checkpointing, both AdamW implementations, torch.compile (slow). Only
validated here (no GPU, no deepspeed, no bitsandbytes): fp16, FSDP, DeepSpeed, 8-bit AdamW: their
values reach ``TrainingArguments`` and a machine that cannot run them refuses in one line.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from deltakd.recipe.schema import TrainConfig
from deltakd.runner import arguments as arguments_mod
from deltakd.runner.arguments import check_scale, mixed_precision, scale_arguments, training_arguments
from deltakd.runs import RunDir

from .conftest import write_recipe


class TeacherDtype(TrainerCallback):
    """The teacher's and the student's parameter dtypes at every training step."""

    def __init__(self) -> None:
        self.seen: list[tuple[torch.dtype, torch.dtype]] = []
        self.trainer = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.seen.append((next(self.trainer.teacher.parameters()).dtype, next(model.parameters()).dtype))


def kd_trainer(tmp_path: Path, tiny_bert: Path, toy_task: Path, cache: bool = False, name: str = "s",
               losses: dict | None = None, **train):
    """A prepared classification KD job (tiny BERT teacher, 1-layer student) and its Trainer."""
    from deltakd import families
    from deltakd.recipe import validate
    from deltakd.runs import new_run_dir

    recipe = validate({
        "name": name, "output_dir": str(tmp_path / "runs"), "track": [],
        "task": {"name": "sst2", "data_dir": str(toy_task), "resplit_valid": 0.2, "max_length": 16},
        "teacher": {"model": str(tiny_bert)}, "student": {"from_teacher": {"layers": [1]}},
        "distill": {"losses": losses or {"ce": 0.4, "kd": 0.4, "hidden_mse": 0.2}, "cache_teacher": cache},
        "train": {"max_steps": 4, "batch_size": 16, "lr": 5e-3, "seed": 5, "logging_steps": 1,
                  "eval_every": 100, **train}})
    fam = families.family_of(recipe)
    prep = fam.prepare(recipe)
    args = training_arguments(recipe.train, new_run_dir(recipe.output_dir, recipe.name), [], "accuracy")
    probe = TeacherDtype()
    trainer = fam.make_trainer(prep, args, [probe])
    probe.trainer = trainer
    return trainer, probe


def step_losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# --- mixed precision ------------------------------------------------------------------------


def test_forced_bf16_kd_runs_the_teacher_in_bf16_with_a_loss_close_to_fp32(tmp_path, tiny_bert, toy_task):
    fp32, _ = kd_trainer(tmp_path, tiny_bert, toy_task, name="fp32")
    fp32.train()
    bf16, probe = kd_trainer(tmp_path, tiny_bert, toy_task, name="bf16", bf16="force")
    assert bf16.args.bf16 and not fp32.args.bf16
    autocast = []  # (autocast on, the classifier's output dtype) at each student forward
    bf16.model.classifier.register_forward_hook(
        lambda m, i, o: autocast.append((torch.is_autocast_enabled("cpu"), o.dtype)))
    bf16.train()
    assert autocast and set(autocast) == {(True, torch.bfloat16)}  # the student trains under bf16 autocast
    # the frozen teacher infers in bf16; the student keeps fp32 weights (trained under autocast)
    assert probe.seen == [(torch.bfloat16, torch.float32)] * 4
    assert next(fp32.teacher.parameters()).dtype == torch.float32
    a, b = step_losses(fp32), step_losses(bf16)
    assert len(a) == len(b) == 4 and all(math.isfinite(x) for x in b)
    assert b == pytest.approx(a, rel=3e-2)  # bf16 has 8 bits of mantissa: close, not equal
    assert b != a  # bf16 really ran
    assert bf16.teacher_forwards == 4


def test_the_teacher_cache_stores_fp16_and_a_bf16_run_reads_it(tmp_path, tiny_bert, toy_task):
    trainer, probe = kd_trainer(tmp_path, tiny_bert, toy_task, cache=True, bf16="force", losses={"ce": 0.5, "kd": 0.5})
    cache = trainer.cache
    assert cache is not None and cache.logits.dtype == torch.float16 and cache.pooled.dtype == torch.float16
    meta = json.loads((cache.path / "meta.json").read_text())
    assert meta["dtype"] == "float16" and meta["examples"] == 320
    logits, pooled = cache.lookup(torch.tensor([0, 3]))
    assert logits.dtype == torch.float32 and pooled.dtype == torch.float32  # fp32 for the loss
    trainer.train()
    assert trainer.teacher_forwards == 0 and probe.seen[0][0] == torch.bfloat16
    assert all(math.isfinite(x) for x in step_losses(trainer))


def test_bf16_true_without_native_bf16_runs_fp32_and_says_so_once(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(arguments_mod, "native_bf16", lambda: (False, "CPU Test-EPYC"))
    run = RunDir(tmp_path / "run")
    asked = TrainConfig(bf16=True)
    assert mixed_precision(asked)[:2] == (False, False)
    with caplog.at_level(logging.WARNING):
        check_scale(asked)
        check_scale(asked, is_main=False)  # other processes stay quiet
    lines = [r.getMessage() for r in caplog.records if "bf16" in r.getMessage()]
    assert lines == ["train.bf16: CPU Test-EPYC has no native bf16 (AVX512-BF16 / AMX), where bf16 autocast runs "
                     "several times slower than fp32: running fp32 (train.bf16: force to use bf16)"]
    assert training_arguments(asked, run, [], "accuracy").bf16 is False
    assert training_arguments(TrainConfig(bf16="force"), run, [], "accuracy").bf16 is True
    monkeypatch.setattr(arguments_mod, "native_bf16", lambda: (True, "CPU AMX"))
    caplog.clear()
    check_scale(asked)
    assert not caplog.records and training_arguments(asked, run, [], "accuracy").bf16 is True


def test_native_bf16_reads_the_cpu_flags(monkeypatch):
    from deltakd import utils

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(utils, "cpu_only", lambda: True)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"cpu_name": "Old", "avx2": True, "avx512_bf16": False})
    assert utils.native_bf16() == (False, "CPU Old")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"cpu_name": "New", "amx_bf16": True})
    assert utils.native_bf16() == (True, "CPU New")
    monkeypatch.undo()
    if not torch.cuda.is_available() and Path("/proc/cpuinfo").is_file():  # this machine, as Linux reports it
        flags = Path("/proc/cpuinfo").read_text().split()
        assert utils.native_bf16()[0] == ("avx512_bf16" in flags or "amx_bf16" in flags)


# --- the scale switches reach the Trainer --------------------------------------------------


def test_every_scale_key_reaches_training_arguments(tmp_path):
    fsdp = tmp_path / "fsdp.json"
    fsdp.write_text(json.dumps({"min_num_params": 1000}))
    t = TrainConfig(gradient_checkpointing=True, optim="adamw_torch_fused", torch_compile=True, fsdp=True,
                    fsdp_config=fsdp, bf16="force")
    args = training_arguments(t, RunDir(tmp_path / "run"), [], "accuracy")
    assert args.gradient_checkpointing is True and args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert args.optim == "adamw_torch_fused" and args.torch_compile is True and args.bf16 is True
    assert args.fsdp and args.fsdp_config["min_num_params"] == 1000
    plain = training_arguments(TrainConfig(), RunDir(tmp_path / "run"), [], "accuracy")
    assert not plain.gradient_checkpointing and not plain.torch_compile and not plain.fsdp and not plain.bf16
    assert plain.optim == type(plain)("x").optim  # unset: the Trainer's own default
    # TrainingArguments itself needs deepspeed (and bitsandbytes to build the optimizer): the values handed over
    ds = tmp_path / "ds.json"
    ds.write_text("{}")
    assert scale_arguments(TrainConfig(deepspeed=ds, optim="adamw_bnb_8bit")) == {
        "bf16": False, "fp16": False, "optim": "adamw_bnb_8bit", "deepspeed": str(ds)}
    assert scale_arguments(TrainConfig(fp16=True)) == {"bf16": False, "fp16": True}


@pytest.mark.slow
def test_gradient_checkpointing_and_the_fused_optimizer_train_to_the_same_loss(tmp_path, tiny_bert, toy_task):
    base, _ = kd_trainer(tmp_path, tiny_bert, toy_task, name="base", optim="adamw_torch")
    base.train()
    ckpt, _ = kd_trainer(tmp_path, tiny_bert, toy_task, name="ckpt", optim="adamw_torch", gradient_checkpointing=True)
    ckpt.train()
    assert ckpt.model.is_gradient_checkpointing and not base.model.is_gradient_checkpointing
    assert step_losses(ckpt) == pytest.approx(step_losses(base), rel=1e-5)
    fused, _ = kd_trainer(tmp_path, tiny_bert, toy_task, name="fused", optim="adamw_torch_fused")
    fused.train()
    assert type(fused.optimizer.optimizer).__name__ == "AdamW" and fused.optimizer.optimizer.defaults["fused"]
    assert step_losses(fused) == pytest.approx(step_losses(base), rel=1e-4)


@pytest.mark.slow
def test_torch_compile_trains_to_the_same_loss(tmp_path, tiny_bert, toy_task, monkeypatch):
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor, "fallback_random", True)  # dropout draws the eager random numbers
    base, _ = kd_trainer(tmp_path, tiny_bert, toy_task, name="base")
    base.train()
    compiled, _ = kd_trainer(tmp_path, tiny_bert, toy_task, name="compiled", torch_compile=True)
    compiled.train()
    assert compiled.args.torch_compile
    assert step_losses(compiled) == pytest.approx(step_losses(base), rel=1e-4)


# --- what cannot run here: one line, exit 2, nothing written --------------------------------


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    from deltakd import cli

    monkeypatch.setattr(sys, "argv", ["deltakd", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    return e.value.code or 0, capsys.readouterr().err


@pytest.mark.parametrize("train, line", [
    ("optim: sgd", "train.optim"),
    ("bf16: maybe", "train.bf16"),
    ("bf16: true, fp16: true", "train.bf16 and train.fp16: set one"),
    ("fsdp_config: {tmp}/none.json, fsdp: true", "train.fsdp_config: file '{tmp}/none.json' does not exist"),
    ("fsdp_config: {tmp}/ds.json", "train.fsdp_config: given without train.fsdp: true"),
    ("deepspeed: {tmp}/none.json", "train.deepspeed: file '{tmp}/none.json' does not exist"),
    ("deepspeed: {tmp}/ds.json, fsdp: true", "train.deepspeed and train.fsdp: set one"),
    ("deepspeed: {tmp}/ds.json", "error: train.deepspeed needs deepspeed: pip install 'deltakd[deepspeed]'"),
    ("optim: adamw_bnb_8bit", "error: train.optim: adamw_bnb_8bit needs bitsandbytes: pip install 'deltakd[bnb]'"),
    ("fp16: true", "error: train.fp16: fp16 mixed precision needs a CUDA GPU; on this machine use train.bf16"),
])
def test_what_this_machine_cannot_run_is_one_line_exit_2(tmp_path, monkeypatch, capsys, tiny_bert, toy_task,
                                                         train, line):
    if "fp16: true" == train and torch.cuda.is_available():
        pytest.skip("fp16 runs on CUDA")
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # missing, installed or not
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    (tmp_path / "ds.json").write_text("{}")
    train = train.replace("{tmp}", str(tmp_path))
    recipe = write_recipe(tmp_path / "r.yaml", f"""
name: r
task: {{name: sst2, data_dir: {toy_task}, resplit_valid: 0.2, max_length: 16}}
model: {{name: {tiny_bert}}}
train: {{max_steps: 2, {train}}}
track: []
output_dir: {tmp_path / 'runs'}
""")
    code, err = run_cli(monkeypatch, capsys, "train", str(recipe))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, err
    assert line.replace("{tmp}", str(tmp_path)) in lines[0]
    assert not (tmp_path / "runs").exists()
