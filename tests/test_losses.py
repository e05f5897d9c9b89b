"""KD losses against closed forms and hand-computed values on small tensors."""
import math

import pytest
import torch
import torch.nn.functional as F

from distillation_lab import (attention_transfer_loss, distillation_loss, dkd_loss, feature_distillation_loss,
                              kl_divergence_loss)
from distillation_lab.losses import as_feature_map
from distillation_lab.methods.feature import FeatureTerm

S = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
T = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
Y = torch.tensor([0, 1])


def manual_kl(s, t, temp):
    """sum_i p_t log(p_t / p_s), averaged over rows, computed element by element."""
    total = 0.0
    for srow, trow in zip(s.tolist(), t.tolist()):
        zs = [math.exp(v / temp) for v in srow]
        zt = [math.exp(v / temp) for v in trow]
        ps = [v / sum(zs) for v in zs]
        pt = [v / sum(zt) for v in zt]
        total += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    return total / len(s)


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_kl_is_t_squared_times_batch_mean_kl(temp):
    assert kl_divergence_loss(S, T, temp).item() == pytest.approx(temp**2 * manual_kl(S, T, temp), rel=1e-5)


def test_kl_direction_is_teacher_to_student():
    forward = kl_divergence_loss(S, T, 1.0).item()
    assert forward == pytest.approx(manual_kl(S, T, 1.0), rel=1e-5)
    assert forward != pytest.approx(manual_kl(T, S, 1.0), rel=1e-3)


def test_batch_mean_not_sum():
    doubled = kl_divergence_loss(torch.cat([S, S]), torch.cat([T, T]), 2.0)
    assert doubled.item() == pytest.approx(kl_divergence_loss(S, T, 2.0).item(), rel=1e-6)


def test_zero_when_student_equals_teacher():
    assert kl_divergence_loss(T, T, 4.0).item() == pytest.approx(0.0, abs=1e-7)
    ce = F.cross_entropy(T, Y).item()
    assert distillation_loss(T, T, Y, alpha=0.3).item() == pytest.approx(0.3 * ce, rel=1e-6)


def test_distillation_loss_combination():
    alpha, temp = 0.25, 3.0
    expected = alpha * F.cross_entropy(S, Y).item() + (1 - alpha) * temp**2 * manual_kl(S, T, temp)
    assert distillation_loss(S, T, Y, alpha, temp).item() == pytest.approx(expected, rel=1e-5)


def test_no_gradient_reaches_the_teacher():
    s, t = S.clone().requires_grad_(), T.clone().requires_grad_()
    (distillation_loss(s, t, Y) + dkd_loss(s, t, Y) + feature_distillation_loss(s, t, "cosine")).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_feature_losses_closed_forms():
    a = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    assert feature_distillation_loss(a, b, "mse").item() == pytest.approx(((a - b) ** 2).mean().item())
    cos = [1 / math.sqrt(5), 1.0]  # row 0: (1,2).(1,0) / (sqrt(5) * 1); row 1: parallel
    assert feature_distillation_loss(a, b, "cosine").item() == pytest.approx(1 - sum(cos) / 2, rel=1e-6)
    assert feature_distillation_loss(a, a, "cosine").item() == pytest.approx(0.0, abs=1e-6)


def test_feature_shapes_are_matched():
    tokens = torch.randn(2, 64, 192)  # a ViT's 8x8 patch tokens
    assert as_feature_map(tokens).shape == (2, 192, 8, 8)
    term = FeatureTerm([192], [512], kind="mse")  # ViT student, ResNet teacher stage 4 (512 x 4 x 4)
    loss = term(None, [tokens], None, [torch.randn(2, 512, 4, 4)], None)
    loss.backward()
    assert loss.item() > 0 and term.regressors[0].weight.grad is not None
    with pytest.raises(ValueError, match="'mse' or 'cosine'"):
        feature_distillation_loss(tokens, tokens, "l1")


def test_attention_transfer_closed_form():
    f = torch.zeros(1, 2, 2, 2)
    f[0, :, 0, 0] = 1.0  # all attention on one pixel
    g = torch.ones(1, 2, 2, 2)  # uniform attention
    # attention maps: [1,0,0,0] and [.5,.5,.5,.5]; mean squared difference = (0.25 + 3 * 0.25) / 4
    assert attention_transfer_loss(f, g).item() == pytest.approx(0.25, rel=1e-6)
    assert attention_transfer_loss(g, 3 * g).item() == pytest.approx(0.0, abs=1e-7)


def test_dkd_closed_form():
    temp, alpha, beta = 2.0, 1.0, 8.0
    ps, pt = F.softmax(S / temp, 1), F.softmax(T / temp, 1)
    tckd = nckd = 0.0
    for i, y in enumerate(Y.tolist()):
        bs = [ps[i, y].item(), 1 - ps[i, y].item()]
        bt = [pt[i, y].item(), 1 - pt[i, y].item()]
        tckd += sum(a * math.log(a / b) for a, b in zip(bt, bs))
        others = [j for j in range(3) if j != y]
        qs = F.softmax(S[i, others] / temp, 0).tolist()
        qt = F.softmax(T[i, others] / temp, 0).tolist()
        nckd += sum(a * math.log(a / b) for a, b in zip(qt, qs))
    expected = temp**2 * (alpha * tckd + beta * nckd) / 2
    assert dkd_loss(S, T, Y, alpha, beta, temp).item() == pytest.approx(expected, rel=1e-4)
    assert dkd_loss(T, T, Y).item() == pytest.approx(0.0, abs=1e-6)


def test_f1_and_mcc_match_a_hand_computed_case():
    """Three classes, six examples: classes 0 and 1 each 1 right, 1 wrong, 1 missed (F1 1/2), class 2 exact
    (F1 1): macro F1 2/3; MCC from its closed form."""
    from pruning_lab.inference.evaluate import classification_scores

    truth, predicted = [0, 0, 1, 1, 2, 2], [0, 1, 1, 0, 2, 2]
    scores = classification_scores(truth, predicted)
    assert scores["f1_macro"] == pytest.approx(2 / 3)
    # MCC = (c*s - sum_k p_k*t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)), c = 4 correct, s = 6, p = t = (2, 2, 2)
    assert scores["mcc"] == pytest.approx((4 * 6 - 12) / ((36 - 12) * (36 - 12)) ** 0.5)


def test_the_speed_benchmarks_reference_loop_computes_the_same_kd_loss():
    """benchmarks/train_speed.py compares loops doing the same KD: the tutorial-style loss equals ours."""
    from benchmarks.reference_loops import tutorial_kd_loss
    from distillation_lab.losses import distillation_loss

    torch.manual_seed(0)
    student, teacher, labels = torch.randn(16, 10), 3 * torch.randn(16, 10), torch.randint(0, 10, (16,))
    torch.testing.assert_close(tutorial_kd_loss(student, teacher, labels, 4.0, 0.5),
                               distillation_loss(student, teacher, labels, 0.5, 4.0))
