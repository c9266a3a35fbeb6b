"""The loss table: entries are consistent with what their compute functions read, and the sets
derived from it are the losses as they were hand-listed before the table."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from deltakd.distill.heads import DistillHeads
from deltakd.losses import table
from deltakd.losses.hidden import mean_pool
from deltakd.losses.lora import LoraACapture
from deltakd.losses.table import LOSSES, LossSpec
from deltakd.losses.terms import LossInputs

B, L, C, V, HS, HT, A, R = 2, 5, 3, 7, 4, 6, 2, 3
PAIRS = [(0, [0, 1]), (1, [1])]  # student layer 0 <- mean of teacher layers 0 and 1; 1 <- 1
# the losses as hand-listed before the table (recipe Literal, trainer tuples, setup checks); a new loss adds to these
BEFORE_THE_TABLE = ("ce", "kd", "reverse_kl", "jsd", "logits_mse", "hidden_mse", "hidden_cos", "attention_kl",
                    "rail_c", "rail_l", "lora_ild")


def synthetic(spec: LossSpec, kind: str, cached: bool = False) -> tuple[LossInputs, list[torch.Tensor]]:
    """Inputs holding only what ``spec`` declares (anything else is absent, so reading it fails), and the
    student tensors a gradient should reach. Student width 4, teacher width 6: hidden losses need projections."""
    g = torch.Generator().manual_seed(0)
    leaves: list[torch.Tensor] = []

    def leaf(*shape: int) -> torch.Tensor:
        x = torch.randn(*shape, generator=g, requires_grad=True)
        leaves.append(x)
        return x

    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # (B, L)
    cls = kind == table.CLASSIFICATION
    student = SimpleNamespace(logits=leaf(B, C) if cls else leaf(B, L, V))
    teacher = SimpleNamespace()
    labels = torch.tensor([0, 2]) if cls else torch.randint(0, V, (B, L), generator=g).masked_fill(mask == 0, -100)
    x = LossInputs(kind=kind, student=student, labels=labels, mask=mask, temperature=2.0, jsd_beta=0.3)
    needs = spec.needs
    if table.TEACHER_LOGITS in needs:
        x.teacher_logits = torch.randn(student.logits.shape, generator=g)
    if table.HIDDEN in needs:
        student.hidden_states = tuple(leaf(B, L, HS) for _ in range(3))  # embeddings + 2 layers
        teacher.hidden_states = tuple(torch.randn(B, L, HT, generator=g) for _ in range(3))
        x.teacher_pooled = torch.stack([mean_pool(h, mask) for h in teacher.hidden_states], 1) if cached else None
    if table.ATTENTIONS in needs:
        student.attentions = tuple(leaf(B, A, L, L).softmax(-1) for _ in range(2))
        teacher.attentions = tuple(torch.randn(B, A, L, L, generator=g).softmax(-1) for _ in range(2))
    if table.LORA_A in needs:
        names = [f"encoder.layer.{i}.attention.self.query.lora_A.default" for i in range(2)]
        x.student_lora, x.teacher_lora = LoraACapture(names), LoraACapture(names)
        for n in names:
            x.student_lora.outputs[n] = [leaf(B, L, R)]
            x.teacher_lora.outputs[n] = [torch.randn(B, L, R, generator=g)]
    if table.LAYER_MAP in needs:
        x.pairs = PAIRS
    x.teacher = None if cached or not needs else teacher
    torch.manual_seed(0)  # the same projections on every call
    heads = DistillHeads(HS, HT, len(PAIRS), rail_c=spec.name == "rail_c", rail_l=spec.name == "rail_l",
                         hidden_layers=[0, 1] if table.HIDDEN_PROJ in needs else ())  # what setup builds
    x.heads = None if heads.empty else heads
    return x, leaves


@pytest.mark.parametrize("kind, name", [(k, n) for n, s in LOSSES.items() for k in sorted(s.kinds)])
def test_every_entry_computes_a_finite_scalar_for_each_kind_from_what_it_declares(kind, name):
    spec = LOSSES[name]
    x, leaves = synthetic(spec, kind)
    value = spec.compute(x)
    assert value.shape == () and math.isfinite(value.item()) and value.item() >= 0
    value.backward()
    assert any(t.grad is not None and t.grad.abs().sum() > 0 for t in leaves)  # the student learns from it


@pytest.mark.parametrize("name", [n for n, s in LOSSES.items() if s.cacheable and s.needs
                                  and table.CLASSIFICATION in s.kinds])
def test_a_cacheable_entry_gives_the_live_value_from_cached_outputs(name):
    spec = LOSSES[name]
    live = spec.compute(synthetic(spec, table.CLASSIFICATION)[0])
    cached = spec.compute(synthetic(spec, table.CLASSIFICATION, cached=True)[0])  # no live teacher output at all
    assert cached.item() == pytest.approx(live.item(), rel=1e-5)


def test_derived_sets_are_the_hand_written_ones_they_replace():
    assert [name for name in LOSSES if name in BEFORE_THE_TABLE] == list(BEFORE_THE_TABLE)  # all there, in order
    every = BEFORE_THE_TABLE
    assert table.needing(table.HIDDEN, every) == ("hidden_mse", "hidden_cos", "rail_c", "rail_l")
    assert table.needing(table.ATTENTIONS, every) == ("attention_kl",)
    assert table.needing(table.LORA_A, every) == ("lora_ild",)
    assert table.needing(table.HIDDEN_PROJ, every) == ("hidden_mse", "hidden_cos")
    assert table.needing(table.LAYER_MAP, every) == ("hidden_mse", "hidden_cos", "attention_kl", "rail_c", "rail_l",
                                                     "lora_ild")
    assert table.live_only(every) == ("hidden_mse", "hidden_cos", "attention_kl", "lora_ild")
    assert table.cache_served({"ce", "kd", "rail_c", "hidden_cos"}) == ("kd", "rail_c")
    # the token cache (logits, per-token states and attention maps of the mapped layers) serves all but LoRA features
    assert table.token_live_only(every) == ("lora_ild",)
    assert [s.name for s in LOSSES.values() if s.token_cache] == ["hidden_mse", "hidden_cos", "attention_kl"]
    assert not table.needs_teacher({"ce"}) and table.needs_teacher({"ce", "kd"})
    assert set(table.unsupported(every, table.LM)) == {"rail_c", "rail_l", "logits_mse"}
    assert set(table.unsupported(every, table.CLASSIFICATION)) == {"reverse_kl", "jsd"}
    assert [s.name for s in LOSSES.values() if s.distribution and s.name in BEFORE_THE_TABLE] == ["kd", "reverse_kl",
                                                                                                 "jsd"]
    before = BEFORE_THE_TABLE
    assert [n for n in table.alternatives(("jsd",), table.CLASSIFICATION) if n in before] == ["kd", "logits_mse"]
    assert [n for n in table.alternatives(("rail_c",), table.LM) if n in before] == ["hidden_mse", "hidden_cos"]
    # results come in table order, whatever order the names are given in
    assert table.needing(table.HIDDEN, ["rail_l", "hidden_cos"]) == ("hidden_cos", "rail_l")
    with pytest.raises(ValueError, match="unknown losses \\['kl'\\]"):
        table.live_only({"kd", "kl"})
    with pytest.raises(ValueError, match="unknown task kind"):
        table.names_for("regression")


@pytest.mark.parametrize("fields, message", [
    ({"kinds": frozenset({"seq2seq"})}, "non-empty subset"),
    ({"kinds": frozenset()}, "non-empty subset"),
    ({"needs": frozenset({"logits"})}, "unknown needs"),
    ({"needs": frozenset({table.ATTENTIONS, table.LAYER_MAP})}, "not in the teacher cache"),
    ({"needs": frozenset({table.HIDDEN}), "distribution": True}, "reads the teacher logits"),
    ({"needs": frozenset({table.LORA_A, table.LAYER_MAP}), "cacheable": False, "token_cache": True},
     "not in the token cache"),
    ({"name": "cos-logits"}, "identifier"),
])
def test_an_inconsistent_entry_is_rejected(fields, message):
    base = dict(name="extra", kinds=table.BOTH, needs=frozenset({table.TEACHER_LOGITS}), cacheable=True,
                compute=LOSSES["kd"].compute, doc="an extra loss")
    with pytest.raises(ValueError, match=message):
        LossSpec(**{**base, **fields})


def test_the_package_imports_nothing_from_deltakd_but_errors():
    """deltakd.losses sits below the recipe (which reads the table) and the distill package."""
    import ast

    import deltakd.losses

    for path in Path(deltakd.losses.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 1:
                assert node.module == "errors" and node.level == 2, f"{path.name}: from {'.' * node.level}{node.module}"
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert not node.module.startswith("deltakd") or node.module == "deltakd.errors", path.name
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("deltakd") for a in node.names), path.name


def test_a_name_twice_is_rejected():
    with pytest.raises(ValueError, match="names a loss twice"):
        table._table(LOSSES["kd"], LOSSES["ce"], LOSSES["kd"])
