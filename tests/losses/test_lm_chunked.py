"""Chunked, head-fused causal-LM losses: the values and gradients of losses/lm.py on full logits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from deltakd.losses import lm
from deltakd.losses import lm_chunked as C
from deltakd.losses.terms import LossInputs

B, L, HS, HT, V = 3, 9, 8, 6, 41
METHODS = ["fused", "checkpoint"]


def _case(vs: int = V, vt: int = V, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, L, HS, generator=g).requires_grad_()
    w = (torch.randn(vs, HS, generator=g) * 0.7).requires_grad_()
    b = torch.randn(vs, generator=g).requires_grad_()
    ht, wt, bt = torch.randn(B, L, HT, generator=g), torch.randn(vt, HT, generator=g), torch.randn(vt, generator=g)
    labels = torch.randint(0, min(vs, vt), (B, L), generator=g)
    labels[0, 4:] = -100  # padding at the end
    labels[1, :2] = -100  # a prompt without loss
    return hs, w, b, ht, wt, bt, labels


def _fused(case, weights, chunk=4, method="fused", **kw):
    hs, w, b, ht, wt, bt, labels = case
    h, y = C.valid_tokens(hs, labels)
    th, y2 = C.valid_tokens(ht, labels)
    assert torch.equal(y, y2)
    return C.fused_lm_losses(h, C.LinearHead(w, b), y, weights, teacher_hidden=th, teacher_head=C.LinearHead(wt, bt),
                             chunk_tokens=chunk, method=method, **kw)


def _reference(case, name, temperature=1.0, beta=0.5, normalizer=None):
    """losses/lm.py on the full logits of both heads, the way terms.py calls it."""
    hs, w, b, ht, wt, bt, labels = case
    s, t = F.linear(hs, w, b), F.linear(ht, wt, bt)  # (B, L, V)
    mask = lm.next_token_mask(labels)
    if name == "ce":
        return lm.lm_ce(s, labels, normalizer=normalizer)
    if name == "kd":
        return lm.token_kl(s, t, temperature, mask, normalizer=normalizer)
    if name == "reverse_kl":
        return lm.token_kl(s, t, temperature, mask, reverse=True, normalizer=normalizer)
    return lm.generalized_jsd(s, t, beta, temperature, mask, normalizer=normalizer)


def _grads(value, case):
    return torch.autograd.grad(value, case[:3])  # hidden states, head weight, head bias


def _assert_same(got, want, case):
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    for a, b in zip(_grads(got, case), _grads(want, case)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name,beta", [("ce", 0.5), ("kd", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2),
                                       ("jsd", 0.0), ("jsd", 1.0)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_each_term_matches_lm_py_values_and_gradients(method, name, beta, temperature):
    case = _case()
    got, terms = _fused(case, {name: 1.0}, method=method, temperature=temperature, beta=beta)
    want = _reference(case, name, temperature, beta)
    assert terms[name].item() == pytest.approx(got.item())
    _assert_same(got, want, case)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_weighted_sum_with_num_items_in_batch_matches_for_any_chunk(method, chunk):
    case = _case(seed=1)
    weights = {"ce": 0.3, "kd": 0.5, "reverse_kl": 0.1, "jsd": 0.7}
    normalizer = torch.tensor(37)  # num_items_in_batch of a whole accumulated batch
    got, terms = _fused(case, weights, chunk=chunk, method=method, temperature=2.0, beta=0.4, normalizer=normalizer)
    refs = {n: _reference(case, n, 2.0, 0.4, normalizer) for n in weights}
    for n in weights:
        assert terms[n].item() == pytest.approx(refs[n].item(), rel=1e-5)
    _assert_same(got, sum(weights[n] * refs[n] for n in weights), case)


@pytest.mark.parametrize("method", METHODS)
def test_padded_head_widths_match_loss_inputs(method):
    """A student head padded to 48 rows, a teacher head of 44, a tokenizer of 41: the distribution terms
    compare the first 41 entries, the cross-entropy uses the student's full head (terms.LossInputs)."""
    case = _case(vs=48, vt=44, seed=2)
    hs, w, b, ht, wt, bt, labels = case
    x = LossInputs(kind="lm", student=SimpleNamespace(logits=F.linear(hs, w, b)), labels=labels,
                   teacher_logits=F.linear(ht, wt, bt), temperature=2.0, jsd_beta=0.3, vocab=V)
    from deltakd.losses import terms

    want = 0.5 * terms.ce(x) + 0.25 * terms.kd(x) + 0.25 * terms.jsd(x)
    got, _ = _fused(case, {"ce": 0.5, "kd": 0.25, "jsd": 0.25}, method=method, temperature=2.0, beta=0.3,
                    width=C.compared_width(48, 44, V))
    assert C.compared_width(48, 44, V) == V and C.compared_width(48, 48, V) == 48
    _assert_same(got, want, case)


def test_no_valid_token_gives_zero_and_zero_gradients():
    case = list(_case())
    case[-1] = torch.full((B, L), -100)
    for method in METHODS:
        got, _ = _fused(tuple(case), {"ce": 1.0, "kd": 1.0}, method=method)
        want = _reference(tuple(case), "ce") + _reference(tuple(case), "kd")
        assert got.item() == want.item() == 0.0
        assert all(float(g.abs().sum()) == 0.0 for g in _grads(got, tuple(case)))


def test_bias_free_head_and_no_teacher_for_ce_alone():
    hs, w, _, _, _, _, labels = _case()
    h, y = C.valid_tokens(hs, labels)
    got, _ = C.fused_lm_losses(h, C.LinearHead(w), y, {"ce": 1.0}, chunk_tokens=3)
    want = lm.lm_ce(F.linear(hs, w), labels)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    for a, b in zip(torch.autograd.grad(got, (hs, w)), torch.autograd.grad(want, (hs, w))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_keeps_no_tokens_by_vocab_tensor_for_backward():
    """What autograd saves for backward: naive keeps (N, V) float32 logits; fused keeps only (N, H) and (V, H)."""
    n, h, v = 64, 8, 500
    hs, w = torch.randn(n, h, requires_grad=True), torch.randn(v, h, requires_grad=True)
    ht, wt, y = torch.randn(n, h), torch.randn(v, h), torch.randint(0, v, (n,))

    def largest_saved(fn) -> int:
        sizes = [0]
        with torch.autograd.graph.saved_tensors_hooks(lambda x: sizes.append(x.numel()) or x, lambda x: x):
            fn()
        return max(sizes)

    naive = largest_saved(lambda: lm.token_kl(F.linear(hs, w)[None], F.linear(ht, wt)[None], 2.0))
    fused = largest_saved(lambda: C.fused_lm_losses(hs, C.LinearHead(w), y, {"kd": 1.0, "ce": 1.0},
                                                    teacher_hidden=ht, teacher_head=C.LinearHead(wt), chunk_tokens=16))
    assert naive >= n * v
    assert fused == max(n * h, v * h)


def test_bad_arguments_are_refused():
    hs, w, b, _, _, _, labels = _case()
    h, y = C.valid_tokens(hs, labels)
    with pytest.raises(ValueError, match="unknown terms"):
        C.fused_lm_losses(h, C.LinearHead(w, b), y, {"mse": 1.0})
    with pytest.raises(ValueError, match="need the teacher"):
        C.fused_lm_losses(h, C.LinearHead(w, b), y, {"kd": 1.0})
    with pytest.raises(ValueError, match="beta"):
        C.fused_lm_losses(h, C.LinearHead(w, b), y, {"ce": 1.0}, beta=1.5)
    with pytest.raises(ValueError, match="method"):
        C.fused_lm_losses(h, C.LinearHead(w, b), y, {"ce": 1.0}, method="magic")
    assert C.default_chunk_tokens(32768) == 1024 and C.default_chunk_tokens(10**9) == 16
