"""Task-similarity estimators against hand-computed values; softmax weights; registry; leave-one-out."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from deltakd.errors import DeltakdError
from deltakd.transfer.estimators import (
    ESTIMATORS,
    UnknownEstimatorError,
    cosine,
    dev_change,
    el2n,
    euclidean,
    get_estimator,
    grand,
    kl,
    kl_original,
    kl_shift,
    leave_one_out,
    logits_labels_cosine,
    per_example_grad_norms,
    softmax_weights,
    target_loss,
    task_groups,
    uniform,
)
from deltakd.transfer.state_dicts import TransferError

D = torch.float64


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=D)


# Two sources, two target examples, two classes. Source 0 predicts p = [.8, .2] everywhere,
# source 1 p = [.5, .5]; labels [0, 1].
P0, P1 = np.array([0.8, 0.2]), np.array([0.5, 0.5])
LOGITS = t(np.log([[P0, P0], [P1, P1]]))  # (S=2, E=2, C=2)
LABELS = torch.tensor([0, 1])


def expect(values) -> torch.Tensor:
    return t(values)


# ------------------------------------------------------------------------------------ simple ones


def test_uniform_and_task_groups():
    torch.testing.assert_close(uniform(3), t([0.0, 0.0, 0.0]))
    sources = ["sst2", "imdb", "mnli", "unlisted"]
    by_task = {"sst2": "sentiment", "imdb": "sentiment", "mnli": "nli", "yelp": "sentiment"}
    torch.testing.assert_close(task_groups(sources, "yelp", by_task), t([1.0, 1.0, 0.0, 0.0]))
    by_group = {"sentiment": ["sst2", "imdb", "yelp"], "nli": ["mnli", "rte"], "pairs": ["mnli", "yelp"]}
    torch.testing.assert_close(task_groups(sources, "yelp", by_group), t([1.0, 1.0, 1.0, 0.0]))
    with pytest.raises(TransferError, match="'qqp' is in no task group"):
        task_groups(sources, "qqp", by_task)


def test_cosine_on_vectors_and_lora_state_dicts():
    target = t([1.0, 0.0, 0.0])
    got = cosine([t([2.0, 0.0, 0.0]), t([0.0, 1.0, 0.0]), t([-1.0, 1.0, 0.0])], target)
    torch.testing.assert_close(got, t([1.0, 0.0, -1 / math.sqrt(2)]))
    # state dicts: LoRA compared as B @ A (ranks may differ), heads ignored
    a1, b1 = t([[1.0, 0.0]]), t([[1.0], [0.0]])  # B A = [[1, 0], [0, 0]]
    src = {"q.lora_A.weight": a1, "q.lora_B.weight": b1, "classifier.weight": t([5.0])}
    tgt = {"q.lora_A.weight": t([[1.0, 0.0], [0.0, 1.0]]), "q.lora_B.weight": t([[1.0, 0.0], [0.0, 1.0]])}  # I
    torch.testing.assert_close(cosine([src], tgt), t([1 / math.sqrt(2)]))
    with pytest.raises(TransferError, match="flattens to"):
        cosine([t([1.0, 2.0])], target)


def test_euclidean_distance_moved():
    got = euclidean([t([0.0, 0.0]), t([1.0, 1.0])], [t([3.0, 4.0]), t([1.0, 2.0])])
    torch.testing.assert_close(got, t([-5.0, -1.0]))
    before = {"q.lora_A.weight": t([[0.0, 0.0]]), "q.lora_B.weight": t([[0.0], [0.0]]), "classifier.weight": t([0.0])}
    after = {"q.lora_A.weight": t([[1.0, 2.0]]), "q.lora_B.weight": t([[2.0], [0.0]]), "classifier.weight": t([9.0])}
    torch.testing.assert_close(euclidean([before], [after]), t([-3.0]))  # raw factors, head ignored
    with pytest.raises(TransferError, match="one 'after' per 'before'"):
        euclidean([before], [])


def test_dev_change_signs():
    torch.testing.assert_close(dev_change([0.5, 0.6], [0.7, 0.6]), t([0.2, 0.0]), atol=1e-12, rtol=0)
    torch.testing.assert_close(dev_change([1.0, 2.0], [0.5, 2.5], higher_is_better=False), t([0.5, -0.5]))


# ------------------------------------------------------------------------------------ logit-based


def test_target_loss_from_logits_and_from_losses():
    # source 0: -(ln .8 + ln .2) / 2; source 1: ln .5
    want = expect([(np.log(0.8) + np.log(0.2)) / 2, np.log(0.5)])
    torch.testing.assert_close(target_loss(LOGITS, LABELS), want)
    torch.testing.assert_close(target_loss(list(LOGITS), LABELS), want)
    torch.testing.assert_close(target_loss(losses=[t([1.0, 3.0]), t([0.5])]), t([-2.0, -0.5]))
    with pytest.raises(TransferError, match="either"):
        target_loss(LOGITS, LABELS, losses=[t([1.0])])
    with pytest.raises(TransferError, match="labels must be in"):
        target_loss(LOGITS, torch.tensor([0, 2]))


def test_kl_between_target_labels_and_mean_prediction():
    # q = [.5, .5]; p_bar0 = [.8, .2] -> KL = .5 ln(.5/.8) + .5 ln(.5/.2); p_bar1 = q -> 0
    want = -(0.5 * np.log(0.5 / 0.8) + 0.5 * np.log(0.5 / 0.2))
    torch.testing.assert_close(kl(LOGITS, LABELS), expect([want, 0.0]))
    # a class absent from the target contributes 0 (0 log 0)
    torch.testing.assert_close(kl(LOGITS, torch.tensor([0, 0])), expect([-np.log(1 / 0.8), -np.log(1 / 0.5)]))
    # p_bar is the mean of probabilities, not of logits
    mixed = t(np.log([[[0.9, 0.1], [0.1, 0.9]]]))
    torch.testing.assert_close(kl(mixed, LABELS), t([0.0]), atol=1e-12, rtol=0)


def test_kl_shift():
    after = t(np.log([[P1, P1], [P1, P1]]))
    # KL([.5, .5] || [.8, .2]) = .5 ln(.5/.8) + .5 ln(.5/.2)
    want = -(0.5 * np.log(0.5 / 0.8) + 0.5 * np.log(0.5 / 0.2))
    torch.testing.assert_close(kl_shift(LOGITS, after), expect([want, 0.0]))


def test_kl_original_target_tuned_from_random_init_vs_each_source():
    """-mean_x KL(p_target || p_source): the original's definition (P = the target checkpoint)."""
    target = t(np.log([P1, P0]))  # (E=2, C=2): the target model predicts [.5, .5], then [.8, .2]
    # source 0 ([.8, .2] twice): KL([.5,.5]||[.8,.2]) on x0, 0 on x1; source 1 ([.5,.5]): 0, KL([.8,.2]||[.5,.5])
    k1 = 0.5 * np.log(0.5 / 0.8) + 0.5 * np.log(0.5 / 0.2)
    k2 = 0.8 * np.log(0.8 / 0.5) + 0.2 * np.log(0.2 / 0.5)
    torch.testing.assert_close(kl_original(target, LOGITS), expect([-k1 / 2, -k2 / 2]))
    # the direction matters (KL is not symmetric): the swapped reading gives other values
    assert not torch.allclose(kl_original(target, LOGITS), expect([-k2 / 2, -k1 / 2]))
    # a source predicting exactly what the target model predicts scores 0, the best possible
    assert kl_original(target, target.unsqueeze(0)).item() == pytest.approx(0.0, abs=1e-12)
    # classes with probability 0 (either side) are left out instead of giving inf / nan
    hard = t([[0.0, -math.inf]])  # p = [1, 0]
    src = t([[[0.0, 0.0]], [[0.0, -math.inf]]])
    got = kl_original(hard, src)
    torch.testing.assert_close(got, expect([-math.log(2.0), 0.0]))
    with pytest.raises(TransferError, match="differ in shape"):
        kl_original(t([[0.0, 0.0, 0.0]]), LOGITS)
    # not the project's label-marginal kl: different inputs, different values
    assert not torch.allclose(kl(LOGITS, LABELS), kl_original(target, LOGITS))


def test_el2n():
    # source 0: y=0 -> ||[-.2, .2]|| = .2 sqrt2; y=1 -> ||[.8, -.8]|| = .8 sqrt2; mean .5 sqrt2
    # source 1: ||[-.5, .5]|| = .5 sqrt2 for both
    torch.testing.assert_close(el2n(LOGITS, LABELS), expect([-0.5 * math.sqrt(2), -0.5 * math.sqrt(2)]))
    # a perfect, confident source scores ~0 (the best possible)
    confident = t([[[30.0, 0.0], [0.0, 30.0]]])
    assert el2n(confident, LABELS).item() == pytest.approx(0.0, abs=1e-10)


def test_cosine_of_logits_and_labels():
    n0 = math.sqrt(0.8**2 + 0.2**2)
    want = expect([(0.8 / n0 + 0.2 / n0) / 2, 0.5 / math.sqrt(0.5)])
    torch.testing.assert_close(logits_labels_cosine(LOGITS, LABELS), want)


# ------------------------------------------------------------------------------------ GraNd


def test_grand_is_minus_the_mean_norm():
    torch.testing.assert_close(grand([t([1.0, 3.0]), t([0.5, 0.5, 0.5])]), t([-2.0, -0.5]))
    torch.testing.assert_close(grand(t([[1.0, 2.0], [3.0, 5.0]])), t([-1.5, -4.0]))


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 2, bias=False)
        self.frozen = nn.Linear(3, 3, bias=False)
        self.frozen.weight.requires_grad_(False)
        with torch.no_grad():
            self.frozen.weight.copy_(torch.eye(3))
            self.proj.weight.copy_(torch.tensor([[0.5, -1.0, 0.2], [0.1, 0.3, -0.4]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.frozen(x))


class _NotVmappable(_Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum().item() > 1e9:  # data-dependent control flow: vmap cannot trace it
            raise AssertionError
        return super().forward(x)


@pytest.mark.parametrize("model_cls,use_vmap", [(_Linear, True), (_Linear, False), (_NotVmappable, None)])
def test_per_example_grad_norms_match_the_closed_form(model_cls, use_vmap):
    # cross-entropy of W x: grad_W = (softmax(W x) - onehot(y)) x^T, norm = ||p - y|| ||x||
    model = model_cls().train()
    x = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0]])
    y = torch.tensor([0, 1, 1])
    p = torch.softmax(x @ model.proj.weight.detach().T, -1)
    want = torch.linalg.vector_norm(p - nn.functional.one_hot(y, 2), dim=1) * torch.linalg.vector_norm(x, dim=1)
    got = per_example_grad_norms(model, {"x": x}, y, use_vmap=use_vmap)
    torch.testing.assert_close(got, want.double(), rtol=1e-5, atol=1e-6)
    assert model.training  # mode restored
    assert model.proj.weight.grad is None  # nothing accumulated into .grad


def test_per_example_grad_norms_for_named_frozen_parameters():
    # logits W F x, gradient w.r.t. the frozen F (requires_grad off): W^T (p - y) x^T
    model = _NotVmappable()
    y = torch.tensor([0, 1])
    x = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]])
    p = torch.softmax(x @ model.proj.weight.detach().T, -1)
    err = p - nn.functional.one_hot(y, 2)  # (E, 2)
    want = torch.linalg.vector_norm(err @ model.proj.weight.detach(), dim=1) * torch.linalg.vector_norm(x, dim=1)
    got = per_example_grad_norms(model, {"x": x}, y, params=["frozen.weight"], use_vmap=False)
    torch.testing.assert_close(got, want.double(), rtol=1e-5, atol=1e-6)
    assert not model.frozen.weight.requires_grad  # restored


def test_per_example_grad_norms_errors():
    with pytest.raises(TransferError, match="no such parameters"):
        per_example_grad_norms(_Linear(), {"x": torch.zeros(1, 3)}, torch.tensor([0]), params=["nope"])
    with pytest.raises(TransferError, match="batch size"):
        per_example_grad_norms(_Linear(), {"x": torch.zeros(2, 3)}, torch.tensor([0]))


# ------------------------------------------------------------------------------------ weights, registry


def test_softmax_weights_with_temperature():
    s = [1.0, 2.0, 3.0]
    e = np.exp(np.array(s))
    torch.testing.assert_close(softmax_weights(s), t(e / e.sum()))
    e2 = np.exp(np.array(s) / 0.5)
    torch.testing.assert_close(softmax_weights(torch.tensor(s), 0.5), t(e2 / e2.sum()))
    torch.testing.assert_close(softmax_weights(s, 1e6), t([1 / 3] * 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(softmax_weights([1.0, 0.0, 1.0], 0), t([0.5, 0.0, 0.5]))
    torch.testing.assert_close(softmax_weights([0.0, -math.inf]), t([1.0, 0.0]))
    with pytest.raises(TransferError, match="temperature"):
        softmax_weights(s, -1.0)
    with pytest.raises(TransferError, match="all scores are -inf"):
        softmax_weights([-math.inf])
    with pytest.raises(TransferError):
        softmax_weights([float("nan"), 1.0])


def test_registry_names_and_unknown_name_error():
    assert set(ESTIMATORS) == {"uniform", "task_groups", "cosine", "euclidean", "dev_change", "loss", "kl",
                               "kl_shift", "kl_original", "el2n", "grand", "logits_labels"}
    assert get_estimator("el2n") is el2n
    with pytest.raises(UnknownEstimatorError, match="unknown similarity estimator 'l2n'; valid: cosine, ") as e:
        get_estimator("l2n")
    assert isinstance(e.value, ValueError) and isinstance(e.value, DeltakdError)


def test_leave_one_out():
    sources = {"sst2": 1, "imdb": 2, "mnli": 3}
    assert leave_one_out(sources, "imdb") == {"sst2": 1, "mnli": 3}
    assert leave_one_out(sources, "qqp") == sources
    with pytest.raises(TransferError, match="no source module left once the target 'sst2'"):
        leave_one_out({"sst2": 1}, "sst2")


def test_estimator_scores_then_weights_rank_sources():
    # a source that fits the target better gets more weight under every logit-based estimator
    for name in ("loss", "el2n", "logits_labels"):
        good_bad = t([[[3.0, 0.0], [0.0, 3.0]], [[0.0, 3.0], [3.0, 0.0]]])
        w = softmax_weights(get_estimator(name)(good_bad, LABELS), 0.1)
        assert w[0] > 0.9, name
