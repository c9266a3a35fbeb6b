"""Sparse (top-k + tail) causal-LM KD losses: equal to the dense ones at k = V, close below, by hand."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from deltakd.losses import lm as L
from deltakd.losses import lm_sparse as S


def _teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float):
    """What the cache stores: top-k ids and log-probs at T, log of the remaining mass."""
    logp = torch.log_softmax(teacher_logits / temperature, dim=-1)
    top_logp, ids = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return ids, top_logp, rest


def _dense(kind: str, s, t, temperature, mask, beta=0.3, normalizer=None):
    if kind == "jsd":
        return L.generalized_jsd(s, t, beta, temperature, mask, normalizer=normalizer)
    return L.token_kl(s, t, temperature, mask, reverse=kind == "reverse", normalizer=normalizer)


def _sparse(kind: str, s, ids, lp, tail, temperature, mask, beta=0.3, normalizer=None):
    if kind == "jsd":
        return S.sparse_generalized_jsd(s, ids, lp, tail, beta, temperature, mask, normalizer=normalizer)
    return S.sparse_token_kl(s, ids, lp, tail, temperature, mask, reverse=kind == "reverse", normalizer=normalizer)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_vocabulary_equals_dense_values_and_gradients(kind, temperature):
    torch.manual_seed(0)
    V = 11
    s = (3 * torch.randn(2, 5, V)).requires_grad_(True)
    t = 3 * torch.randn(2, 5, V)
    mask = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    dense = _dense(kind, s, t, temperature, mask, normalizer=torch.tensor(6.0))
    (g_dense,) = torch.autograd.grad(dense, s)
    ids, lp, tail = _teacher_topk(t, V, temperature)
    assert torch.isneginf(tail).all()  # nothing outside the top-V
    sparse = _sparse(kind, s, ids, lp, tail, temperature, mask, normalizer=torch.tensor(6.0))
    (g_sparse,) = torch.autograd.grad(sparse, s)
    assert sparse.item() == pytest.approx(dense.item(), abs=1e-5)
    assert torch.isfinite(g_sparse).all()
    torch.testing.assert_close(g_sparse, g_dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_smaller_k_is_below_dense_and_approaches_it(kind):
    """Merging the tail is a coarser partition, so every divergence can only drop (data processing);
    each larger k refines it: the values grow to the dense one, reached at k = V."""
    torch.manual_seed(1)
    V = 64
    t = 4 * torch.randn(3, 6, V)  # a peaked teacher
    s = t + torch.randn(3, 6, V)  # a student partly trained towards it
    dense = _dense(kind, s, t, 1.0, None).item()
    values = [_sparse(kind, s, *_teacher_topk(t, k, 1.0), 1.0, None).item() for k in (1, 4, 16, 32, V)]
    assert all(a <= b + 1e-6 for a, b in itertools.pairwise(values))
    assert values[-1] == pytest.approx(dense, abs=1e-5)
    assert abs(values[2] - dense) < 0.25 * abs(values[0] - dense)  # k = 16 of 64: much closer than k = 1


def test_hand_computed_example():
    """One position, V = 4: teacher (0.5, 0.3, 0.15, 0.05), k = 2 -> buckets (0.5, 0.3 | 0.2);
    a uniform student -> (0.25, 0.25 | 0.5)."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    ids = torch.tensor([[[0, 1]]])
    lp = p[:2].log().view(1, 1, 2)
    tail = torch.tensor([[math.log(0.2)]])
    s = torch.zeros(1, 1, 4)  # uniform
    fwd = 0.5 * math.log(0.5 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.5)
    rev = 0.25 * math.log(0.25 / 0.5) + 0.25 * math.log(0.25 / 0.3) + 0.5 * math.log(0.5 / 0.2)
    assert S.sparse_token_kl(s, ids, lp, tail).item() == pytest.approx(fwd, rel=1e-5)
    assert S.sparse_token_kl(s, ids, lp, tail, reverse=True).item() == pytest.approx(rev, rel=1e-5)
    m = [0.5 * a + 0.5 * b for a, b in zip((0.5, 0.3, 0.2), (0.25, 0.25, 0.5))]
    jsd = 0.5 * sum(a * math.log(a / c) for a, c in zip((0.5, 0.3, 0.2), m)) \
        + 0.5 * sum(b * math.log(b / c) for b, c in zip((0.25, 0.25, 0.5), m))
    assert S.sparse_generalized_jsd(s, ids, lp, tail, beta=0.5).item() == pytest.approx(jsd, rel=1e-5)
    # at T = 2 the student is scaled (uniform stays uniform) and the forward KL gets T^2
    assert S.sparse_token_kl(s, ids, lp, tail, temperature=2.0).item() == pytest.approx(4 * fwd, rel=1e-5)
    # the student's tail gets gradient: raising logit 3 (off the top-k) raises q_tail and lowers the KL here
    s = s.clone().requires_grad_(True)
    S.sparse_token_kl(s, ids, lp, tail).backward()
    assert s.grad[0, 0, 2] == pytest.approx(s.grad[0, 0, 3].item()) and s.grad[0, 0, 0] < 0


def test_temperature_needs_the_teacher_values_at_that_temperature():
    """Storing T = 1 values and rescaling them by 1/T is wrong for k < V (the tail at T is unknown);
    the values computed at T give the dense T-loss exactly at k = V and closely below."""
    torch.manual_seed(2)
    V, T = 32, 2.0
    s, t = torch.randn(2, 4, V), 3 * torch.randn(2, 4, V)
    dense = L.token_kl(s, t, T).item()
    at_t = S.sparse_token_kl(s, *_teacher_topk(t, 8, T), T).item()
    ids, lp1, tail1 = _teacher_topk(t, 8, 1.0)
    lp = torch.log_softmax(lp1 / T, dim=-1)  # a renormalised top-k at T, tail rescaled: not the teacher at T
    rescaled = S.sparse_token_kl(s, ids, lp + math.log(1 - 1e-6), tail1 / T, T).item()
    assert abs(at_t - dense) < abs(rescaled - dense)
    assert S.sparse_token_kl(s, *_teacher_topk(t, V, T), T).item() == pytest.approx(dense, abs=1e-5)


def test_half_precision_values_and_masked_positions():
    torch.manual_seed(3)
    V = 50
    s, t = torch.randn(2, 5, V), 2 * torch.randn(2, 5, V)
    ids, lp, tail = _teacher_topk(t, 16, 1.0)
    full = S.sparse_token_kl(s, ids, lp, tail).item()
    half = S.sparse_token_kl(s, ids.to(torch.int32), lp.half(), tail.half()).item()
    assert half == pytest.approx(full, rel=2e-3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    other = s.clone()
    other[0, 4] = 100.0  # a masked position does not count
    assert S.sparse_token_kl(other, ids, lp, tail, mask=mask).item() == pytest.approx(
        S.sparse_token_kl(s, ids, lp, tail, mask=mask).item())
    with pytest.raises(ValueError, match="sparse KD"):
        S.sparse_token_kl(s, ids[..., :3], lp, tail)


def test_student_tail_from_the_top_k_equals_the_masked_logsumexp():
    """The tail as 1 - sum(top-k) (mass >= 1e-3) or a logsumexp over the rest (below): both agree with
    the masked logsumexp over V - k, values and gradients, for flat and very confident students."""
    torch.manual_seed(4)
    V, k = 40, 6
    z = torch.randn(2, 6, V) * torch.tensor([0.5, 1, 2, 4, 8, 30]).view(1, 6, 1)  # tails from ~0.8 to ~0
    z.requires_grad_(True)
    ids = torch.randn(2, 6, V).topk(k, -1).indices
    ids[:, 5] = z.detach()[:, 5].topk(k, -1).indices  # the confident rows: their top-k is the teacher's
    s, _ = S.bucket_logprobs(z, ids, torch.full((2, 6, k), -3.0), torch.full((2, 6), -0.5))
    want = torch.log_softmax(z, -1).scatter(-1, ids, float("-inf")).logsumexp(-1)
    assert (want.exp() < 1e-3).any() and (want.exp() > 1e-3).any()  # both paths taken
    torch.testing.assert_close(s[..., -1], want.clamp_min(-1e4), atol=1e-5, rtol=1e-4)
    g, = torch.autograd.grad(s[..., -1].sum(), z)
    g_want, = torch.autograd.grad(want.sum(), z)
    torch.testing.assert_close(g, g_want, atol=1e-5, rtol=1e-4)
