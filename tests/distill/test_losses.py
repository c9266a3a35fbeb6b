"""Loss functions against hand-computed values (numpy / explicit formulas) and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from deltakd.distill import losses as L


def np_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) over the last axis."""
    return (p * (np.log(p) - np.log(q))).sum(-1)


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


S2 = np.array([[1.0, 2.0, 0.5], [0.1, 0.2, 3.0]])
T2 = np.array([[0.3, 2.5, -1.0], [1.0, -0.5, 2.0]])


# ---------------------------------------------------------------- classification / regression


def test_ce_loss_classification_matches_formula():
    labels = np.array([1, 2])
    expected = -np.mean(np.log(np_softmax(S2))[np.arange(2), labels])
    got = L.ce_loss(t(S2), torch.tensor(labels))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_ce_loss_ignore_index():
    got = L.ce_loss(t(S2), torch.tensor([1, -100]))
    assert got.item() == pytest.approx(-np.log(np_softmax(S2[0])[1]), rel=1e-6)


def test_ce_loss_regression_is_mse():
    got = L.ce_loss(t([[0.5], [2.0]]), t([1.0, 1.0]))
    assert got.item() == pytest.approx(((0.5 - 1) ** 2 + (2 - 1) ** 2) / 2)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_kl_matches_formula(temperature):
    p_t = np_softmax(T2 / temperature)
    p_s = np_softmax(S2 / temperature)
    expected = np_kl(p_t, p_s).sum() / 2 * temperature**2  # batchmean, T^2
    got = L.kd_kl(t(S2), t(T2), temperature)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_kd_kl_identical_is_zero_and_t2_scaling():
    assert L.kd_kl(t(S2), t(S2), 3.0).item() == pytest.approx(0.0, abs=1e-7)
    # T^2 * KL at T == T^2 * (KL of logits pre-divided by T at T=1)
    at_t = L.kd_kl(t(S2), t(T2), 2.0)
    pre_divided = L.kd_kl(t(S2) / 2.0, t(T2) / 2.0, 1.0)
    assert at_t.item() == pytest.approx(4.0 * pre_divided.item(), rel=1e-6)


def test_kd_kl_gradient_is_t_times_prob_difference():
    temperature = 2.0
    s = t(S2).requires_grad_()
    L.kd_kl(s, t(T2), temperature).backward()
    expected = temperature * (np_softmax(S2 / temperature) - np_softmax(T2 / temperature)) / 2
    np.testing.assert_allclose(s.grad.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_kd_kl_rejects_regression_and_bad_temperature():
    with pytest.raises(ValueError, match="logits_mse"):
        L.kd_kl(t([[1.0]]), t([[2.0]]), 1.0)
    with pytest.raises(ValueError, match="temperature"):
        L.kd_kl(t(S2), t(T2), 0.0)


def test_logits_mse():
    assert L.logits_mse(t(S2), t(T2)).item() == pytest.approx(np.mean((S2 - T2) ** 2), rel=1e-6)


# ---------------------------------------------------------------- hidden states / attention


def test_hidden_mse_mask_excludes_padding():
    s = t([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # (1, 3, 2)
    zeros = torch.zeros_like(s)
    mask = torch.tensor([[1, 1, 0]])
    # token means: (1+4)/2 = 2.5, (9+16)/2 = 12.5 -> 7.5
    assert L.hidden_mse(s, zeros, mask=mask).item() == pytest.approx(7.5)
    assert L.hidden_mse(s, zeros).item() == pytest.approx((1 + 4 + 9 + 16 + 10000 + 10000) / 6)


def test_hidden_mse_projection_values_and_gradient():
    proj = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        proj.weight.copy_(t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    s = t([[[1.0, 2.0]]])  # (1, 1, 2) -> projected [1, 2, 3]
    target = t([[[0.0, 0.0, 0.0]]])  # (1, 1, 3)
    loss = L.hidden_mse(s, target, proj=proj)
    assert loss.item() == pytest.approx((1 + 4 + 9) / 3)
    loss.backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


def test_hidden_cosine_values_and_mask():
    s = t([[[1.0, 0.0], [1.0, 1.0], [5.0, -3.0]]])  # (1, 3, 2)
    tt = t([[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    cos2 = 1 / math.sqrt(2)
    cos3 = (5 - 3) / (math.sqrt(34) * math.sqrt(2))
    assert L.hidden_cosine(s, tt).item() == pytest.approx((0 + (1 - cos2) + (1 - cos3)) / 3, rel=1e-6)
    assert L.hidden_cosine(s, tt, mask=torch.tensor([[1, 1, 0]])).item() == pytest.approx((1 - cos2) / 2, rel=1e-6)
    assert L.hidden_cosine(s, s).item() == pytest.approx(0.0, abs=1e-6)


def test_hidden_cosine_gradient_reaches_projection():
    proj = nn.Linear(4, 6)
    L.hidden_cosine(torch.randn(2, 3, 4), torch.randn(2, 3, 6), proj=proj).backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


def test_hidden_shape_mismatch_is_clear():
    with pytest.raises(ValueError, match="hidden_mse: student shape"):
        L.hidden_mse(torch.zeros(1, 2, 4), torch.zeros(1, 2, 6))


def test_attention_kl_values_heads_and_mask():
    teacher = np.array([[0.5, 0.5], [1.0, 0.0]])
    student = np.array([[0.25, 0.75], [0.5, 0.5]])
    row1 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    row2 = math.log(1.0 / 0.5)  # 0 * log 0 = 0
    ta = t(np.stack([teacher, teacher])[None])  # (1, 2 heads, 2, 2)
    sa = t(np.stack([student, student])[None])
    assert L.attention_kl(sa, ta).item() == pytest.approx((row1 + row2) / 2, rel=1e-6)
    assert L.attention_kl(sa, ta, mask=torch.tensor([[1, 0]])).item() == pytest.approx(row1, rel=1e-6)
    assert L.attention_kl(ta, ta).item() == pytest.approx(0.0, abs=1e-7)


def test_mean_pool():
    hidden = t([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]], [[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(L.mean_pool(hidden, mask).numpy(), [[2.0, 3.0], [2.0, 0.0]])


# ---------------------------------------------------------------- RAIL-KD


def _np_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_rail_kd_concat_identity_projections_by_hand():
    eye = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        eye.weight.copy_(torch.eye(4))
    s = [t([[3.0, 4.0]]), t([[1.0, 0.0]])]  # normalised: [.6, .8], [1, 0]
    tt = [t([[0.0, 2.0]]), t([[0.0, 1.0]])]  # normalised: [0, 1], [0, 1]
    # concat: [.6, .8, 1, 0] vs [0, 1, 0, 1] -> (.36 + .04 + 1 + 1) / 4
    assert L.rail_kd_concat(s, tt, eye, eye).item() == pytest.approx(0.6, rel=1e-6)


def test_rail_kd_concat_head_matches_numpy_and_trains_both_projections():
    torch.manual_seed(0)
    head = L.RailKDConcatHead(n_layers=2, hidden_student=3, hidden_teacher=5, dim=4)
    s = [torch.randn(2, 3), torch.randn(2, 3)]
    tt = [torch.randn(2, 5), torch.randn(2, 5)]
    loss = head(s, tt)
    cat_s = np.concatenate([_np_normalize(x.numpy()) for x in s], -1)  # (2, 6)
    cat_t = np.concatenate([_np_normalize(x.numpy()) for x in tt], -1)  # (2, 10)
    ws, bs = head.proj_s.weight.detach().numpy(), head.proj_s.bias.detach().numpy()
    wt, bt = head.proj_t.weight.detach().numpy(), head.proj_t.bias.detach().numpy()
    expected = np.mean((cat_s @ ws.T + bs - (cat_t @ wt.T + bt)) ** 2)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert head.proj_s.weight.grad.abs().sum() > 0 and head.proj_t.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="built for 2 layers"):
        head(s[:1], tt[:1])


def test_rail_kd_layerwise_head_matches_numpy_and_trains():
    torch.manual_seed(1)
    head = L.RailKDLayerwiseHead(n_layers=3, hidden_student=3, hidden_teacher=5, dim=4)
    s = [torch.randn(2, 3) for _ in range(3)]
    tt = [torch.randn(2, 5) for _ in range(3)]
    loss = head(s, tt)
    per_layer = []
    for i in range(3):
        ps, pt = head.projs_s[i], head.projs_t[i]
        u = _np_normalize(s[i].numpy() @ ps.weight.detach().numpy().T + ps.bias.detach().numpy())
        v = _np_normalize(tt[i].numpy() @ pt.weight.detach().numpy().T + pt.bias.detach().numpy())
        per_layer.append(np.mean((u - v) ** 2))
    assert loss.item() == pytest.approx(np.mean(per_layer), rel=1e-5)
    loss.backward()
    assert all(p.weight.grad.abs().sum() > 0 for p in list(head.projs_s) + list(head.projs_t))


def test_rail_kd_layerwise_identity_and_zero():
    x = [torch.randn(2, 4), torch.randn(2, 4)]
    scaled = [2.0 * v for v in x]  # same direction -> 0 after normalisation
    assert L.rail_kd_layerwise(x, scaled, [None, None], [None, None]).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="same non-zero number"):
        L.rail_kd_layerwise(x, x[:1], [None], [None])


# ---------------------------------------------------------------- LoRAILD


def test_lora_feature_mse_by_hand():
    s = [torch.ones(1, 2, 3), torch.full((1, 2, 3), 2.0)]
    tt = [torch.zeros(1, 2, 3), torch.zeros(1, 2, 3)]
    assert L.lora_feature_mse(s, tt).item() == pytest.approx((1.0 + 4.0) / 2)
    s_masked = [torch.tensor([[[1.0] * 3, [9.0] * 3]])]
    masked = L.lora_feature_mse(s_masked, [torch.zeros(1, 2, 3)], mask=torch.tensor([[1, 0]]))
    assert masked.item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        L.lora_feature_mse(s, tt[:1])


@pytest.fixture(scope="module")
def tiny_lora_bert():
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100
    )
    model = get_peft_model(BertModel(config), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "key", "value"]))
    # peft initialises lora_B to zero; lora_A is random, which is what we capture.
    model.eval()
    return model


def test_capture_lora_a_outputs_order_shapes_values(tiny_lora_bert):
    model = tiny_lora_bert
    ids = torch.randint(0, 100, (2, 5))
    with L.capture_lora_a_outputs(model) as cap:
        out = model(input_ids=ids, output_hidden_states=True)
    assert len(cap.names) == 6
    suffixes = [n.split("encoder.layer.")[1] for n in cap.names]
    assert suffixes == [
        f"{i}.attention.self.{m}.lora_A.default" for i in range(2) for m in ("query", "key", "value")
    ]
    feats = cap.features()
    assert [f.shape for f in feats] == [torch.Size([2, 5, 4])] * 6
    # layer-0 query lora_A sees the embeddings output (dropout is off in eval mode)
    layer0_query = model.base_model.model.encoder.layer[0].attention.self.query
    expected = layer0_query.lora_A["default"](out.hidden_states[0])
    torch.testing.assert_close(feats[0], expected)
    assert sorted(cap.by_layer()) == [0, 1] and len(cap.by_layer()[1]) == 3
    # hooks are removed on exit
    model(input_ids=ids)
    assert len(cap.features()) == 6


def test_capture_lora_a_outputs_filter_gradients_and_errors(tiny_lora_bert):
    model = tiny_lora_bert
    ids = torch.randint(0, 100, (2, 5))
    with L.capture_lora_a_outputs(model, module_names_filter=("value",)) as cap:
        model(input_ids=ids)
    assert len(cap.names) == 2 and all(".value." in n for n in cap.names)
    feats = cap.features()
    teacher = [f.detach() + 1.0 for f in feats]
    model.zero_grad()
    L.lora_feature_mse(feats, teacher).backward()
    weight = model.base_model.model.encoder.layer[1].attention.self.value.lora_A["default"].weight
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    model.zero_grad()
    with pytest.raises(ValueError, match="no LoRA lora_A modules"):
        with L.capture_lora_a_outputs(nn.Linear(2, 2)):
            pass
    with pytest.raises(ValueError, match="no LoRA lora_A modules"):
        with L.capture_lora_a_outputs(model, adapter_name="other"):
            pass


def test_lora_features_between_two_models_zero_when_equal(tiny_lora_bert):
    ids = torch.randint(0, 100, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        with L.capture_lora_a_outputs(tiny_lora_bert) as cap_t:
            tiny_lora_bert(input_ids=ids, attention_mask=mask)
        with L.capture_lora_a_outputs(tiny_lora_bert) as cap_s:
            tiny_lora_bert(input_ids=ids, attention_mask=mask)
    assert L.lora_feature_mse(cap_s.features(), cap_t.features(), mask=mask).item() == pytest.approx(0.0, abs=1e-10)


# ---------------------------------------------------------------- causal-LM token losses

SL = np.array([[[1.0, 0.0, -1.0, 2.0], [0.5, 0.5, 0.0, 1.0], [2.0, 1.0, 0.0, -1.0]]])  # (1, 3, 4)
TL = np.array([[[0.0, 1.0, -1.0, 1.0], [1.5, -0.5, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0]]])


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_token_kl_matches_formula_with_mask(reverse, temperature):
    p_s, p_t = np_softmax(SL / temperature), np_softmax(TL / temperature)
    per_tok = np_kl(p_s, p_t) if reverse else np_kl(p_t, p_s)  # (1, 3)
    mask = np.array([[1, 0, 1]])
    expected = (per_tok * mask).sum() / mask.sum() * temperature**2
    got = L.token_kl(t(SL), t(TL), temperature, torch.tensor(mask), reverse=reverse)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_token_kl_properties():
    assert L.token_kl(t(SL), t(SL), 2.0).item() == pytest.approx(0.0, abs=1e-6)
    pre_divided = L.token_kl(t(SL) / 2, t(TL) / 2, 1.0)
    assert L.token_kl(t(SL), t(TL), 2.0).item() == pytest.approx(4.0 * pre_divided.item(), rel=1e-5)
    # changing a masked-out position does not change the loss
    mask = torch.tensor([[1, 1, 0]])
    other = t(SL).clone()
    other[0, 2] = 100.0
    assert L.token_kl(other, t(TL), 1.0, mask).item() == pytest.approx(L.token_kl(t(SL), t(TL), 1.0, mask).item())


def test_token_losses_microbatch_weighting_equals_full_batch():
    torch.manual_seed(0)
    s, tt = torch.randn(4, 5, 7), torch.randn(4, 5, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    labels = torch.randint(0, 7, (4, 5)).masked_fill(mask == 0, -100)
    lm_mask = L.next_token_mask(labels)
    for fn, m in (
        (lambda a, b, m: L.token_kl(a, b, 2.0, m), mask),
        (lambda a, b, m: L.token_kl(a, b, 1.0, m, reverse=True), mask),
        (lambda a, b, m: L.generalized_jsd(a, b, 0.3, 1.0, m), mask),
    ):
        full = fn(s, tt, m)
        parts = [(fn(s[i : i + 2], tt[i : i + 2], m[i : i + 2]), m[i : i + 2].sum()) for i in (0, 2)]
        weighted = sum(v * n for v, n in parts) / sum(n for _, n in parts)
        assert full.item() == pytest.approx(weighted.item(), rel=1e-5)
    full = L.lm_ce(s, labels)
    parts = [(L.lm_ce(s[i : i + 2], labels[i : i + 2]), lm_mask[i : i + 2].sum()) for i in (0, 2)]
    assert full.item() == pytest.approx((sum(v * n for v, n in parts) / lm_mask.sum()).item(), rel=1e-5)
    # explicit normalizer: sum / N, so micro-batch values simply add up
    n = int(mask.sum())
    summed = sum(L.token_kl(s[i : i + 2], tt[i : i + 2], 1.0, mask[i : i + 2], normalizer=n) for i in (0, 2))
    assert summed.item() == pytest.approx(L.token_kl(s, tt, 1.0, mask).item(), rel=1e-5)


@pytest.mark.parametrize("beta", [0.5, 0.3, 0.9])
def test_generalized_jsd_matches_formula(beta):
    p, q = np_softmax(TL), np_softmax(SL)  # P teacher, Q student
    m = beta * p + (1 - beta) * q
    per_tok = beta * np_kl(p, m) + (1 - beta) * np_kl(q, m)
    mask = np.array([[1, 1, 0]])
    expected = (per_tok * mask).sum() / 2
    got = L.generalized_jsd(t(SL), t(TL), beta, 1.0, torch.tensor(mask))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_generalized_jsd_properties():
    s, tt = t(SL), t(TL)
    assert L.generalized_jsd(s, s, 0.5).item() == pytest.approx(0.0, abs=1e-6)
    assert L.generalized_jsd(s, tt, 0.5).item() == pytest.approx(L.generalized_jsd(tt, s, 0.5).item(), rel=1e-5)
    assert L.generalized_jsd(s * 50, tt * 50, 0.5).item() <= math.log(2) + 1e-6
    assert L.generalized_jsd(s, tt, 0.0).item() == pytest.approx(L.token_kl(s, tt, 1.0).item(), rel=1e-6)
    reverse_kl = L.token_kl(s, tt, 1.0, reverse=True)
    assert L.generalized_jsd(s, tt, 1.0).item() == pytest.approx(reverse_kl.item(), rel=1e-6)
    with pytest.raises(ValueError, match="beta"):
        L.generalized_jsd(s, tt, 1.5)
    sg = s.clone().requires_grad_()
    L.generalized_jsd(sg, tt, 0.5).backward()
    assert sg.grad.abs().sum() > 0


def test_lm_ce_shift_and_ignore_by_hand():
    labels = torch.tensor([[3, 2, -100]])
    # position 0 predicts labels[1] = 2; position 1 predicts -100 (ignored)
    expected = -np.log(np_softmax(SL[0, 0])[2])
    assert L.lm_ce(t(SL), labels).item() == pytest.approx(expected, rel=1e-6)
    no_shift = L.lm_ce(t(SL), labels, shift=False)
    expected_ns = -(np.log(np_softmax(SL[0, 0])[3]) + np.log(np_softmax(SL[0, 1])[2])) / 2
    assert no_shift.item() == pytest.approx(expected_ns, rel=1e-6)
    assert L.next_token_mask(labels).tolist() == [[True, False, False]]
