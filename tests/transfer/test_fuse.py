"""Fusion of delta modules: exact LoRA re-factoring, naive factor average, TIES, DARE, heads, peft round trip."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from deltakd.errors import DeltakdError
from deltakd.transfer.fuse import (
    fuse_average,
    fuse_heads,
    fuse_lora,
    fuse_lora_factors,
    fuse_modules,
    merged_lora_delta,
    refactor_lora,
)
from deltakd.transfer.merging import Combine, combine_task_vectors, dare, ties_merge
from deltakd.transfer.state_dicts import (
    TransferError,
    flatten_delta,
    lora_delta_weights,
    lora_pairs,
    lora_scaling,
    lora_scalings,
    split_head,
)

D = torch.float64
Q = "m.layer.0.query"


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=D)


def lora_state(a: torch.Tensor, b: torch.Tensor, module: str = Q) -> dict[str, torch.Tensor]:
    return {f"{module}.lora_A.weight": a, f"{module}.lora_B.weight": b}


def random_sources(n: int, ranks: list[int], out: int = 6, inp: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [lora_state(torch.randn(r, inp, generator=g, dtype=D), torch.randn(out, r, generator=g, dtype=D))
            for r in ranks[:n]]


# ------------------------------------------------------------------------------------ keys


def test_lora_pairs_reads_peft_adapter_and_embedding_keys():
    state = {
        "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight": torch.zeros(2, 4),
        "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight": torch.zeros(4, 2),
        "x.value.lora_A.default.weight": torch.zeros(2, 4),
        "x.value.lora_B.default.weight": torch.zeros(4, 2),
        "x.embed.lora_embedding_A": torch.zeros(2, 10),
        "x.embed.lora_embedding_B": torch.zeros(4, 2),
        "x.value.lora_magnitude_vector": torch.zeros(4),
    }
    pairs, other = lora_pairs(state)
    assert set(pairs) == {"base_model.model.bert.encoder.layer.0.attention.self.query", "x.value", "x.embed"}
    assert pairs["x.value"].b_key == "x.value.lora_B.default.weight"
    assert other == ["x.value.lora_magnitude_vector"]
    with pytest.raises(TransferError, match="no lora_B"):
        lora_pairs({"q.lora_A.weight": torch.zeros(2, 4)})


def test_split_head_and_errors_are_deltakd_value_errors():
    state = {"a.query.lora_A.weight": torch.zeros(1), "base_model.model.classifier.weight": torch.zeros(1),
             "m.score.bias": torch.zeros(1)}
    delta, head = split_head(state)
    assert list(delta) == ["a.query.lora_A.weight"]
    assert set(head) == {"base_model.model.classifier.weight", "m.score.bias"}
    with pytest.raises(TransferError, match="split_head") as e:
        fuse_average([state, state], [0.5, 0.5])
    assert isinstance(e.value, DeltakdError) and isinstance(e.value, ValueError)


# ------------------------------------------------------------------------------------ LoRA


def test_svd_refactoring_is_exact_when_rank_covers_the_sum():
    # three sources of ranks 1, 2, 1 with per-source and per-module scalings: the sum has rank <= 4
    srcs = random_sources(3, [1, 2, 1])
    w = [0.5, 0.3, 0.2]
    scal = [2.0, {Q: 0.5}, 1.5]
    exact = sum(wi * float(si[Q] if isinstance(si, dict) else si) * (s[f"{Q}.lora_B.weight"] @ s[f"{Q}.lora_A.weight"])
                for wi, si, s in zip(w, scal, srcs))
    fused = fuse_lora(srcs, w, rank=4, source_scaling=scal, target_scaling=4.0)
    a, b = fused[f"{Q}.lora_A.weight"], fused[f"{Q}.lora_B.weight"]
    assert a.shape == (4, 5) and b.shape == (6, 4) and a.dtype == D
    torch.testing.assert_close(4.0 * b @ a, exact, rtol=0, atol=1e-12)
    # the singular values are split evenly: B^T B == A A^T (both diag(S))
    torch.testing.assert_close(b.T @ b, a @ a.T, rtol=0, atol=1e-12)


def test_svd_refactoring_gives_the_best_rank_r_error():
    srcs = random_sources(3, [2, 2, 2])
    w = [0.2, 0.5, 0.3]
    delta = merged_lora_delta(srcs, w, source_scaling=1.0)[Q]  # rank 5 (6 x 5)
    sv = torch.linalg.svdvals(delta)
    for r in (1, 2, 3):
        fused = fuse_lora(srcs, w, rank=r, source_scaling=1.0, target_scaling=0.5)
        approx = 0.5 * fused[f"{Q}.lora_B.weight"] @ fused[f"{Q}.lora_A.weight"]
        err = torch.linalg.matrix_norm(delta - approx) ** 2
        assert err.item() == pytest.approx((sv[r:] ** 2).sum().item(), rel=1e-10)


def test_refactor_pads_with_zeros_beyond_the_matrix_rank():
    delta = t([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # (3, 2)
    a, b = refactor_lora(delta, rank=4, scaling=2.0)
    assert a.shape == (4, 2) and b.shape == (3, 4)
    assert (a[2:] == 0).all() and (b[:, 2:] == 0).all()
    torch.testing.assert_close(2.0 * b @ a, delta, rtol=0, atol=1e-12)
    with pytest.raises(TransferError, match="rank"):
        refactor_lora(delta, rank=0)


def test_factor_average_differs_from_exact_delta_on_a_constructed_example():
    s1 = lora_state(t([[1.0, 0.0]]), t([[1.0], [0.0]]))  # B1 A1 = [[1, 0], [0, 0]]
    s2 = lora_state(t([[0.0, 1.0]]), t([[0.0], [1.0]]))  # B2 A2 = [[0, 0], [0, 1]]
    w = [0.5, 0.5]
    exact = merged_lora_delta([s1, s2], w, source_scaling=1.0)[Q]
    torch.testing.assert_close(exact, t([[0.5, 0.0], [0.0, 0.5]]))
    naive = fuse_lora_factors([s1, s2], w)
    torch.testing.assert_close(naive[f"{Q}.lora_A.weight"], t([[0.5, 0.5]]))
    torch.testing.assert_close(naive[f"{Q}.lora_B.weight"], t([[0.5], [0.5]]))
    # cross terms: B A = 0.25 * ones, not 0.5 * I
    product = naive[f"{Q}.lora_B.weight"] @ naive[f"{Q}.lora_A.weight"]
    torch.testing.assert_close(product, t([[0.25, 0.25], [0.25, 0.25]]))
    fused = fuse_lora([s1, s2], w, rank=2, source_scaling=1.0, target_scaling=1.0)
    torch.testing.assert_close(fused[f"{Q}.lora_B.weight"] @ fused[f"{Q}.lora_A.weight"], exact)


def test_fuse_lora_rejects_mismatched_modules_and_weights():
    s1 = lora_state(t([[1.0, 0.0]]), t([[1.0], [0.0]]))
    s2 = lora_state(t([[1.0, 0.0]]), t([[1.0], [0.0]]), module="other")
    with pytest.raises(TransferError, match="different modules"):
        fuse_lora([s1, s2], [0.5, 0.5], rank=1, source_scaling=1.0, target_scaling=1.0)
    with pytest.raises(TransferError, match="2 fusion weights for 1"):
        fuse_lora([s1], [0.5, 0.5], rank=1, source_scaling=1.0, target_scaling=1.0)
    with pytest.raises(TransferError, match="no scaling for LoRA module"):
        fuse_lora([s1], [1.0], rank=1, source_scaling={"nope": 1.0}, target_scaling=1.0)


def test_flatten_delta_product_is_gauge_invariant_and_drops_heads():
    a, b = t([[1.0, 2.0], [0.0, 1.0]]), t([[1.0, 0.0], [2.0, 1.0], [0.0, 3.0]])
    m = t([[2.0, 1.0], [0.0, 0.5]])
    s1 = {**lora_state(a, b), "classifier.weight": t([9.0])}
    s2 = lora_state(torch.linalg.inv(m) @ a, b @ m)
    torch.testing.assert_close(flatten_delta(s1), flatten_delta(s2))
    torch.testing.assert_close(flatten_delta(s1), (b @ a).flatten())
    assert flatten_delta(s1, lora="factors").numel() == a.numel() + b.numel()


# ------------------------------------------------------------------------------------ TIES / DARE

TAUS = t([[1.0, -2.0, 0.1, 0.3],
          [-3.0, 0.2, 0.5, -0.1],
          [1.5, 1.0, -0.2, 0.05]])


def test_ties_on_a_hand_computed_example():
    # density 0.5 keeps 2 of 4 per row: [1, -2, 0, 0], [-3, 0, .5, 0], [1.5, 1, 0, 0]
    # sign of the sum [-0.5, -1, 0.5, 0] -> [-, -, +, 0]; disjoint means: [-3, -2, 0.5, 0]
    torch.testing.assert_close(ties_merge(TAUS, density=0.5), t([-3.0, -2.0, 0.5, 0.0]))
    # weights [.5, .25, .25]: entry 0 sum = .5 - .75 + .375 > 0 -> mean of 1 (w .5) and 1.5 (w .25) = 7/6
    torch.testing.assert_close(ties_merge(TAUS, [0.5, 0.25, 0.25], density=0.5), t([7 / 6, -2.0, 0.5, 0.0]))
    # density 1: no trimming; entry 3: .3 - .1 + .05 > 0 -> mean(.3, .05)
    torch.testing.assert_close(ties_merge(TAUS, density=1.0)[3], torch.tensor(0.175, dtype=D))


def test_ties_trims_over_the_whole_module_not_per_key():
    vectors = [{"a": row[:2], "b": row[2:]} for row in TAUS]
    merged = combine_task_vectors(vectors, [1 / 3] * 3, Combine("ties", density=0.5))
    torch.testing.assert_close(torch.cat([merged["a"], merged["b"]]), t([-3.0, -2.0, 0.5, 0.0]))


def test_dare_drops_and_rescales_with_a_fixed_seed():
    x = torch.full((20000,), 2.0, dtype=D)
    y = dare(x, 0.75, torch.Generator().manual_seed(3))
    values = set(y.unique().tolist())
    assert values == {0.0, 8.0}  # 2 / (1 - 0.75)
    assert (y != 0).double().mean().item() == pytest.approx(0.25, abs=0.015)
    assert y.mean().item() == pytest.approx(2.0, rel=0.06)  # expectation kept
    torch.testing.assert_close(y, dare(x, 0.75, torch.Generator().manual_seed(3)))
    torch.testing.assert_close(dare(x, 0.0), x)
    with pytest.raises(TransferError):
        dare(x, 1.0)


def test_dare_combination_is_seeded_and_unbiased():
    vectors = [{"w": torch.full((4000,), 1.0, dtype=D)}, {"w": torch.full((4000,), -3.0, dtype=D)}]
    c = Combine("dare", drop_rate=0.5, seed=7)
    out1 = combine_task_vectors(vectors, [0.75, 0.25], c)["w"]
    torch.testing.assert_close(out1, combine_task_vectors(vectors, [0.75, 0.25], c)["w"])
    other_seed = Combine("dare", drop_rate=0.5, seed=8)
    assert not torch.equal(out1, combine_task_vectors(vectors, [0.75, 0.25], other_seed)["w"])
    # entries are sums of 0 / 1.5 (= .75 * 1 / .5) and 0 / -1.5; mean -> .75 - .75 = 0
    assert set(out1.unique().tolist()) <= {0.0, 1.5, -1.5}
    assert out1.mean().item() == pytest.approx(0.0, abs=0.06)


def test_combine_validates_options():
    with pytest.raises(TransferError, match="average"):
        Combine("nope")  # type: ignore[arg-type]
    with pytest.raises(TransferError, match="density"):
        Combine("ties", density=0.0)


# ------------------------------------------------------------------------------------ averaging, heads


def test_fuse_average_with_and_without_base():
    s1 = {"adapter.down.weight": t([1.0, 2.0]), "prompt_embeddings": t([[0.0, 4.0]])}
    s2 = {"adapter.down.weight": t([3.0, -2.0]), "prompt_embeddings": t([[2.0, 0.0]])}
    out = fuse_average([s1, s2], [0.25, 0.75])
    torch.testing.assert_close(out["adapter.down.weight"], t([2.5, -1.0]))
    torch.testing.assert_close(out["prompt_embeddings"], t([[1.5, 1.0]]))
    base = {"adapter.down.weight": t([1.0, 1.0]), "prompt_embeddings": t([[1.0, 1.0]])}
    # base + sum w (theta - base) with sum w = 0.5: base + 0.5 * (mean - base)
    out = fuse_average([s1, s2], [0.25, 0.25], base=base)
    torch.testing.assert_close(out["adapter.down.weight"], t([1.5, 0.5]))
    with pytest.raises(TransferError, match="different keys"):
        fuse_average([s1, {"adapter.down.weight": t([1.0, 2.0])}], [0.5, 0.5])
    with pytest.raises(TransferError, match="different shapes"):
        fuse_average([s1, {**s2, "prompt_embeddings": t([1.0])}], [0.5, 0.5])


def test_heads_are_averaged_only_for_identical_label_sets():
    h1, h2 = {"classifier.weight": t([[1.0, 1.0]])}, {"classifier.weight": t([[3.0, 5.0]])}
    out = fuse_heads([h1, h2], [0.5, 0.5], [("neg", "pos"), ("neg", "pos")])
    torch.testing.assert_close(out["classifier.weight"], t([[2.0, 3.0]]))
    assert fuse_heads([h1, h2], [0.5, 0.5], [("neg", "pos"), ("pos", "neg")]) is None  # order matters
    assert fuse_heads([h1, h2], [0.5, 0.5], [("neg", "pos"), ("a", "b", "c")]) is None
    assert fuse_heads([h1, h2], [0.5, 0.5], [None, None]) is not None  # regression heads


def test_fuse_modules_separates_heads():
    s1 = {**lora_state(t([[1.0, 0.0]]), t([[1.0], [0.0]])), "classifier.bias": t([1.0, 0.0])}
    s2 = {**lora_state(t([[0.0, 1.0]]), t([[0.0], [1.0]])), "classifier.bias": t([0.0, 1.0, 2.0])}
    delta, head = fuse_modules([s1, s2], [0.5, 0.5], method="lora_svd", rank=2, source_scaling=1.0,
                               target_scaling=1.0, label_sets=[("a", "b"), ("a", "b", "c")])
    assert head is None and set(delta) == set(lora_state(t([0.0]), t([0.0])))
    with pytest.raises(TransferError, match="needs rank"):
        fuse_modules([s1, s2], [0.5, 0.5], method="lora_svd")
    with pytest.raises(TransferError, match="expected one of"):
        fuse_modules([s1, s2], [0.5, 0.5], method="bogus")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ peft round trip


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def test_round_trip_with_a_real_peft_lora_model():
    peft = pytest.importorskip("peft")
    base = _tiny_bert()
    sources, scalings = [], []
    for i, alpha in enumerate([4, 2, 8]):
        torch.manual_seed(100 + i)
        cfg = peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=2, lora_alpha=alpha, target_modules=["query", "value"],
                              alpha_pattern={"value": 2 * alpha}, init_lora_weights=False)
        model = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
        state = {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()}
        state["base_model.model.classifier.weight"] += 0.1 * (i + 1)  # distinct heads, same label set
        sources.append(state)
        scalings.append(lora_scalings(model))
    q0 = "base_model.model.bert.encoder.layer.0.attention.self.query"
    assert scalings[0][q0] == lora_scaling(2, 4) == 2.0
    assert scalings[0][q0.replace("query", "value")] == 4.0  # per-module scaling from alpha_pattern
    weights = [0.2, 0.5, 0.3]

    target = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        task_type=peft.TaskType.SEQ_CLS, r=6, lora_alpha=3, target_modules=["query", "value"])).eval()
    delta, head = fuse_modules(sources, weights, method="lora_svd", rank=6, source_scaling=scalings,
                               target_scaling=lora_scalings(target), label_sets=[("neg", "pos")] * 3)
    assert head is not None
    result = peft.set_peft_model_state_dict(target, {**delta, **head})
    assert not result.unexpected_keys

    # reference: the base model with W += sum_i w_i s_i B_i A_i and the averaged head, by hand
    ref = copy.deepcopy(base)
    ref_params = dict(ref.named_parameters())
    for module in lora_pairs(sources[0])[0]:
        name = module.removeprefix("base_model.model.") + ".weight"
        upd = sum(w * scalings[i][module] * (s[f"{module}.lora_B.weight"] @ s[f"{module}.lora_A.weight"])
                  for i, (w, s) in enumerate(zip(weights, sources)))
        ref_params[name].data += upd
    for key in ("weight", "bias"):
        ref_params[f"classifier.{key}"].data = sum(w * s[f"base_model.model.classifier.{key}"]
                                                   for w, s in zip(weights, sources))

    ids = torch.randint(1, 100, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        got = target(input_ids=ids, attention_mask=mask).logits
        want = ref(input_ids=ids, attention_mask=mask).logits
        naive = fuse_lora_factors([split_head(s)[0] for s in sources], weights)
        plain = lora_delta_weights(naive, 1.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the naive factor average has a different update (cross terms; scalings ignored)
    exact = merged_lora_delta([split_head(s)[0] for s in sources], weights, source_scaling=scalings)
    assert not torch.allclose(plain[q0], exact[q0], atol=1e-3)
    assert math.isfinite(got.abs().sum().item())

    # a rank below the fused update's rank (here 6) loses part of it: outputs differ
    low = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        task_type=peft.TaskType.SEQ_CLS, r=1, lora_alpha=1, target_modules=["query", "value"])).eval()
    delta1, _ = fuse_modules(sources, weights, method="lora_svd", rank=1, source_scaling=scalings,
                             target_scaling=lora_scalings(low))
    peft.set_peft_model_state_dict(low, {**delta1, **head})
    with torch.no_grad():
        assert not torch.allclose(low(input_ids=ids, attention_mask=mask).logits, want, atol=1e-4)
