"""Everything a distillation run needs beyond student and teacher, checked before any work.

Builds the loss schedule, the layer map (validated against the real layer counts), the learned
projections and the teacher-output cache, and rejects recipes that cannot work (a LoRA-feature
loss with a merged teacher, KD on a regression head, RAIL-KD on a causal LM, ...) with one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from accelerate import PartialState
from torch import nn

from ..errors import DeltakdError
from ..losses import table
from ..models.delta import plain_copy
from ..models.student import every_other, layer_count
from ..recipe.schema import DistillConfig
from . import lm_cache, token_cache
from .cache import INDEX, TeacherCache, load_or_build
from .fused_head import use_chunked
from .heads import DistillHeads
from .layer_map import LayerMap
from .schedule import LossSchedule


@dataclass
class DistillSetup:
    schedule: LossSchedule
    layer_map: LayerMap | None
    heads: DistillHeads | None
    cache: TeacherCache | token_cache.TokenTeacherCache | lm_cache.LMTeacherCache | None
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


def check_kind(names: set[str], kind: str, num_labels: int) -> None:
    """Every loss applies to the task kind (the table's ``kinds``); none compares distributions on a
    one-output regression head. The suggestions are the table's losses that read the same outputs."""
    if bad := table.unsupported(names, kind):
        alts = table.alternatives(bad, kind)
        if kind == table.LM:
            raise DeltakdError(f"distill.losses: {', '.join(sorted(bad))} apply to classification tasks, "
                               f"not causal LMs (use {', '.join(alts)})")
        raise DeltakdError(f"distill.losses: {', '.join(sorted(bad))} are causal-LM losses; "
                           f"for classification use {' or '.join(alts)}")
    if kind == table.CLASSIFICATION and num_labels == 1:
        if bad := tuple(spec.name for spec in table.specs(names) if spec.distribution):
            alts = [n for n in table.alternatives(bad, kind) if not table.LOSSES[n].distribution]
            raise DeltakdError(f"distill.losses.{'/'.join(bad)}: a regression head has one output, no distribution; "
                               f"use {' or '.join(alts)}")


def check_distill(d: DistillConfig, student: nn.Module, teacher: nn.Module, kind: str, num_labels: int,
                  copied: list[int] | None, seed: int) -> tuple[LossSchedule, LayerMap | None, nn.Module]:
    """Validate the distillation recipe against the models (no data needed, nothing written):
    the schedule, the layer map (None when no loss needs one) and the teacher to run."""
    schedule = make_schedule(d)
    names = set(schedule.loss_names)
    check_kind(names, kind, num_labels)
    if not table.needing(table.LORA_A, names) and hasattr(teacher, "merge_and_unload"):
        teacher = plain_copy(teacher).eval()  # same logits (1e-5), no adapter overhead per forward
    n_s, n_t = layer_count(student), layer_count(teacher)
    layer_map = None
    if table.needing(table.LAYER_MAP, names):
        layer_map = build_layer_map(d, n_s, n_t, copied, seed)
    if attention := table.needing(table.ATTENTIONS, names):
        a_s, a_t = student.config.num_attention_heads, teacher.config.num_attention_heads
        if a_s != a_t:
            raise DeltakdError(f"distill.losses.{'/'.join(attention)}: student has {a_s} attention heads, "
                               f"teacher {a_t}")
        _set_eager_attention(student)
        _set_eager_attention(teacher)
    if lora := table.needing(table.LORA_A, names):
        mods, where = list(d.lora_ild_modules), f"distill.losses.{'/'.join(lora)}"
        r_t, r_s = _lora_ranks(teacher, mods), _lora_ranks(student, mods)
        if not r_t:
            raise DeltakdError(f"{where}: the teacher has no LoRA on {mods} "
                               "(use a LoRA teacher run with teacher.merged: false)")
        if not r_s:
            raise DeltakdError(f"{where}: the student has no LoRA on {mods} (peft.method: lora)")
        if r_s != r_t:
            raise DeltakdError(f"{where}: LoRA ranks differ (student {sorted(r_s)}, "
                               f"teacher {sorted(r_t)}); set peft.r to the teacher's")
    if kind == table.LM and d.chunked is True:
        try:
            use_chunked(True, student, teacher, None)
        except ValueError as e:
            raise DeltakdError(str(e)) from None
    return schedule, layer_map, teacher


def compared_width(student: nn.Module, teacher: nn.Module, tokenizer: Any) -> int:
    """The logit width causal-LM KD compares (``losses.terms.LossInputs.token_logits``): the common
    width, or for widths that differ the tokenizer's length, at most the narrower one."""
    s, t = (m.get_output_embeddings().weight.shape[0] for m in (student, teacher))
    return int(s) if s == t else min(int(s), int(t), len(tokenizer) if tokenizer is not None else int(s))


def prepare_distill(d: DistillConfig, student: nn.Module, teacher: nn.Module, kind: str, num_labels: int,
                    copied: list[int] | None, seed: int, datasets: dict[str, Any] | None = None,
                    collator: Any = None, batch_size: int = 64, device: Any = "cpu",
                    checked: tuple[LossSchedule, LayerMap | None, nn.Module] | None = None,
                    tokenizer: Any = None) -> DistillSetup:
    """Validate the distillation recipe against the models and build its pieces.

    With ``datasets`` and a cacheable loss, the teacher's outputs on ``datasets['train']`` are
    computed (or loaded) and the train split gets an ``idx`` column for the lookups. ``checked``:
    what :func:`check_distill` returned for the same arguments, when it already ran (its merged
    teacher copy is not made twice). A causal LM gets the sparse top-k cache (``lm_cache``) only
    when the recipe sets ``cache_teacher: true`` (an approximation, so opt in); it needs ``tokenizer``.
    """
    schedule, layer_map, teacher = checked or check_distill(d, student, teacher, kind, num_labels, copied, seed)
    names = set(schedule.loss_names)
    h_s, h_t = student.config.hidden_size, teacher.config.hidden_size
    n_pairs, student_layers = 0, []
    if layer_map is not None:
        n_pairs = len(layer_map.select(0, 0))
        student_layers = list(layer_map.student_layers) if layer_map.is_random else [s for s, _ in layer_map.pairs]
    heads = DistillHeads(h_s, h_t, n_pairs, rail_c="rail_c" in names, rail_l="rail_l" in names,
                         hidden_layers=student_layers if table.needing(table.HIDDEN_PROJ, names) else (),
                         rail_dim=d.rail_dim, seed=seed)
    cache = None
    served = table.cache_served(names) and datasets is not None
    if d.cache_teacher is not False and kind == table.CLASSIFICATION and datasets is not None:
        with PartialState().main_process_first():  # one process builds, the others load
            if table.live_only(names) and not table.token_live_only(names):  # token-level losses
                cache = token_cache.load_or_build(  # None: over the budget (one warning line)
                    teacher.to(device), datasets["train"], collator, batch_size, layer_map, num_labels,
                    d.cache_max_gb, device, hidden=bool(table.needing(table.HIDDEN, names)),
                    attentions=bool(table.needing(table.ATTENTIONS, names)))
            if cache is None and table.cache_served(names):
                cache = load_or_build(teacher.to(device), datasets["train"], collator, batch_size, device)
    if cache is not None:
        if int(cache.logits.shape[1]) != num_labels:
            raise DeltakdError(f"teacher cache: {cache.logits.shape[1]} logits per example, the task has {num_labels}")
    elif d.cache_teacher and kind == table.LM and served and not d.cross_tokenizer:  # its top-k: the student's ids
        with PartialState().main_process_first():
            cache = lm_cache.load_or_build(teacher.to(device), datasets["train"], tokenizer, d.top_k, d.temperature,
                                           compared_width(student, teacher, tokenizer), batch_size, device)
    if cache is not None:
        train = datasets["train"]
        if INDEX not in train.column_names:
            datasets["train"] = train.add_column(INDEX, list(range(len(train))))
    return DistillSetup(schedule, layer_map, heads if not heads.empty else None, cache, teacher)
