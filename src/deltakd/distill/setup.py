"""Everything a distillation run needs beyond student and teacher, checked before any work.

Builds the loss schedule, the layer map (validated against the real layer counts), the learned
projections and the teacher-output cache, and rejects recipes that cannot work (a LoRA-feature
loss with a merged teacher, KD on a regression head, RAIL-KD on a causal LM, ...) with one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import DeltakdError
from ..models.student import every_other, layer_count
from ..recipe.schema import DistillConfig
from .cache import INDEX, TeacherCache, load_or_build
from .heads import DistillHeads
from .layer_map import LayerMap
from .schedule import LossSchedule
from .trainer import LAYER_LOSSES, LIVE_ONLY


@dataclass
class DistillSetup:
    schedule: LossSchedule
    layer_map: LayerMap | None
    heads: DistillHeads | None
    cache: TeacherCache | None
    teacher: nn.Module  # what the trainer runs: a LoRA teacher merged unless its adapter is needed


def make_schedule(d: DistillConfig) -> LossSchedule:
    cur = d.curriculum
    try:
        return LossSchedule(dict(d.losses), cur.at_epoch if cur else None,
                            dict(cur.losses) if cur and cur.losses else None, cur.ramp_epochs if cur else 0,
                            cur.lr if cur else None)
    except ValueError as e:
        raise DeltakdError(str(e)) from None


def build_layer_map(d: DistillConfig, n_student: int, n_teacher: int, copied: list[int] | None, seed: int) -> LayerMap:
    """The recipe's map, or by default student layer i <- the teacher layer it was copied from
    (or an evenly spread teacher layer when the student was not copied from the teacher)."""
    spec = d.layer_map
    if spec is None:
        source = copied if copied is not None else every_other(n_teacher, n_student)
        return LayerMap.build("fixed", n_student, n_teacher, list(source), seed=seed)
    if spec.mode in ("fixed", "average"):
        return LayerMap.build(spec.mode, n_student, n_teacher, spec.pairs, seed=seed)
    return LayerMap.build(spec.mode, n_student, n_teacher, spec.student_layers, k=spec.k, seed=seed)


def _lora_ranks(model: nn.Module, names: list[str]) -> set[int]:
    ranks = set()
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and name.rsplit(".", 1)[-1] in names:
            ranks.update(int(lin.out_features) for lin in lora_a.values())
    return ranks


def _set_eager_attention(model: nn.Module) -> None:
    """Attention maps need the eager kernel (SDPA does not return them)."""
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            if hasattr(m, "set_attn_implementation"):
                m.set_attn_implementation("eager")
            else:
                cfg._attn_implementation = "eager"


def prepare_distill(d: DistillConfig, student: nn.Module, teacher: nn.Module, kind: str, num_labels: int,
                    copied: list[int] | None, seed: int, datasets: dict[str, Any] | None = None,
                    collator: Any = None, batch_size: int = 64, device: Any = "cpu") -> DistillSetup:
    """Validate the distillation recipe against the models and build its pieces.

    With ``datasets`` and a cacheable loss, the teacher's outputs on ``datasets['train']`` are
    computed (or loaded) and the train split gets an ``idx`` column for the lookups.
    """
    schedule = make_schedule(d)
    names = set(schedule.loss_names)
    if kind == "lm":
        bad = names & {"rail_c", "rail_l", "logits_mse"}
        if bad:
            raise DeltakdError(f"distill.losses: {', '.join(sorted(bad))} apply to classification tasks, "
                               f"not causal LMs (use kd, reverse_kl, jsd, hidden_cos)")
    else:
        bad = names & {"reverse_kl", "jsd"}
        if bad:
            raise DeltakdError(f"distill.losses: {', '.join(sorted(bad))} are causal-LM losses; "
                               f"for classification use kd or logits_mse")
        if num_labels == 1 and "kd" in names:
            raise DeltakdError("distill.losses.kd: a regression head has one output, no distribution; use logits_mse")
    if "lora_ild" not in names and hasattr(teacher, "merge_and_unload"):
        from ..models.delta import plain_copy

        teacher = plain_copy(teacher).eval()  # same logits (1e-5), no adapter overhead per forward
    n_s, n_t = layer_count(student), layer_count(teacher)
    layer_map = None
    if names & set(LAYER_LOSSES):
        layer_map = build_layer_map(d, n_s, n_t, copied, seed)
    h_s, h_t = student.config.hidden_size, teacher.config.hidden_size
    if "attention_kl" in names:
        a_s, a_t = student.config.num_attention_heads, teacher.config.num_attention_heads
        if a_s != a_t:
            raise DeltakdError(f"distill.losses.attention_kl: student has {a_s} attention heads, teacher {a_t}")
        _set_eager_attention(student)
        _set_eager_attention(teacher)
    if "lora_ild" in names:
        mods = list(d.lora_ild_modules)
        r_t, r_s = _lora_ranks(teacher, mods), _lora_ranks(student, mods)
        if not r_t:
            raise DeltakdError(f"distill.losses.lora_ild: the teacher has no LoRA on {mods} "
                               "(use a LoRA teacher run with teacher.merged: false)")
        if not r_s:
            raise DeltakdError(f"distill.losses.lora_ild: the student has no LoRA on {mods} (peft.method: lora)")
        if r_s != r_t:
            raise DeltakdError(f"distill.losses.lora_ild: LoRA ranks differ (student {sorted(r_s)}, "
                               f"teacher {sorted(r_t)}); set peft.r to the teacher's")
    n_pairs, student_layers = 0, []
    if layer_map is not None:
        n_pairs = len(layer_map.select(0, 0))
        student_layers = list(layer_map.student_layers) if layer_map.is_random else [s for s, _ in layer_map.pairs]
    heads = DistillHeads(h_s, h_t, n_pairs, rail_c="rail_c" in names, rail_l="rail_l" in names,
                         hidden_layers=student_layers if names & {"hidden_mse", "hidden_cos"} else ())
    cache = None
    cacheable = names - {"ce"} - set(LIVE_ONLY)
    if d.cache_teacher and kind == "classification" and cacheable and datasets is not None:
        from accelerate import PartialState

        with PartialState().main_process_first():  # one process builds, the others load
            cache = load_or_build(teacher.to(device), datasets["train"], collator, batch_size, device)
        if int(cache.logits.shape[1]) != num_labels:
            raise DeltakdError(f"teacher cache: {cache.logits.shape[1]} logits per example, the task has {num_labels}")
        train = datasets["train"]
        if INDEX not in train.column_names:
            datasets["train"] = train.add_column(INDEX, list(range(len(train))))
    return DistillSetup(schedule, layer_map, heads if not heads.empty else None, cache, teacher)
