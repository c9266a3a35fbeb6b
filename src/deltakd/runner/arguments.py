"""The Trainer arguments of a recipe's ``train:`` section, shared by every family.

Mixed precision and the scale switches (``train.bf16 / fp16 / gradient_checkpointing / optim /
torch_compile / fsdp / fsdp_config / deepspeed``) go to the Trainer as they are, except:
``bf16: true`` on a device without native bf16 (a CPU without AVX512-BF16 or AMX: emulated, several
times slower than fp32) runs fp32 and says so in one line (``bf16: force`` keeps it); what the
machine cannot do at all (fp16 without CUDA, a missing bitsandbytes or deepspeed) is refused in
one line by :func:`check_scale` before anything is written. The frozen teacher is never handed to
the Trainer: ``DistillTrainer`` moves it to each process's device in the run's half dtype, so under
DDP, FSDP and DeepSpeed alike it is replicated (not sharded, not wrapped) on every process.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from transformers import TrainingArguments

from ..errors import DeltakdError, optional_import
from ..recipe.schema import TrainConfig
from ..runs import RunDir
from ..utils import cpu_only, native_bf16, warning


def mixed_precision(t: TrainConfig) -> tuple[bool, bool, str | None]:
    """(bf16, fp16) as the Trainer gets them, and the line saying why a requested bf16 runs fp32."""
    if t.bf16 is True:
        native, device = native_bf16()
        if not native:
            return False, False, (f"train.bf16: {device} has no native bf16 (AVX512-BF16 / AMX), where bf16 autocast "
                                  "runs several times slower than fp32: running fp32 (train.bf16: force to use bf16)")
    return bool(t.bf16), t.fp16, None


def check_scale(t: TrainConfig, is_main: bool = True) -> None:
    """Refuse in one line what this machine cannot run (before anything is written); say (main process)
    when a requested bf16 runs fp32."""
    if t.fp16 and not torch.cuda.is_available():
        raise DeltakdError("train.fp16: fp16 mixed precision needs a CUDA GPU; on this machine use train.bf16")
    if t.optim == "adamw_bnb_8bit":
        optional_import("bitsandbytes", "train.optim: adamw_bnb_8bit")
    if t.deepspeed is not None:
        optional_import("deepspeed", "train.deepspeed")
    note = mixed_precision(t)[2]
    if note and is_main:
        warning(__name__, note)


def scale_arguments(t: TrainConfig) -> dict[str, Any]:
    """The Trainer arguments of mixed precision and the scale switches (only those the recipe sets)."""
    bf16, fp16, _ = mixed_precision(t)
    out: dict[str, Any] = dict(bf16=bf16, fp16=fp16)
    if t.gradient_checkpointing:  # non-reentrant: works with frozen inputs (peft adapters, a frozen embedding)
        out.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    if t.optim is not None:
        out["optim"] = t.optim
    if t.torch_compile:
        out["torch_compile"] = True
    if t.fsdp:
        out["fsdp"] = True
        if t.fsdp_config is not None:
            out["fsdp_config"] = str(t.fsdp_config)
    if t.deepspeed is not None:
        out["deepspeed"] = str(t.deepspeed)
    return out


def trainer_save_limit(t: TrainConfig) -> int | None:
    """How many checkpoints the Trainer keeps while training (it always keeps the newest and the best)."""
    if t.keep_checkpoints == "all":
        return None
    return t.save_total_limit if t.keep_checkpoints == "best_last" else t.keep_checkpoints


@lru_cache(maxsize=1)
def fused_adamw() -> str:
    """``adamw_torch_fused`` where this torch runs the fused AdamW kernel on CPU (measured on the KD
    benchmark's 17M-parameter student: 7x faster optimizer steps than the foreach kernel the plain
    ``torch.optim.AdamW`` uses), else ``adamw_torch``. Pinned rather than left to transformers' default."""
    p = torch.zeros(2, requires_grad=True)
    p.grad = torch.ones(2)
    try:
        torch.optim.AdamW([p], lr=1e-3, fused=True).step()
    except (RuntimeError, TypeError, ValueError):
        return "adamw_torch"
    return "adamw_torch_fused"


def training_arguments(t: TrainConfig, run: RunDir, report_to: list[str], metric: str, has_eval: bool = True,
                       **overrides: Any) -> TrainingArguments:
    """``metric`` picks the best checkpoint; ``overrides`` replace single arguments (a family's label names, say)."""
    steps = isinstance(t.eval_every, int)
    kwargs: dict[str, Any] = dict(
        output_dir=str(run.checkpoints),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.lr,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,
        lr_scheduler_type=t.scheduler,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        eval_strategy=("steps" if steps else "epoch") if has_eval else "no",
        eval_steps=t.eval_every if steps else None,
        save_strategy="steps" if steps else "epoch",
        save_steps=(t.eval_every if t.save_every == "eval" else t.save_every) if steps else None,
        save_total_limit=trainer_save_limit(t),
        load_best_model_at_end=has_eval,
        metric_for_best_model=metric if has_eval else None,
        greater_is_better=not metric.endswith(("loss", "mse")),
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # log a NaN loss as NaN; runner.divergence stops the run
        report_to=report_to or "none",
        **scale_arguments(t),
        dataloader_num_workers=t.num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=cpu_only(),
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        label_names=["labels"],
        remove_unused_columns=False,
        disable_tqdm=False,
        save_only_model=not t.save_optimizer,
    )
    kwargs.setdefault("optim", fused_adamw())  # train.optim when the recipe sets it
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)
