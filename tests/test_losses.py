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


# ---------------------------------------------------------------- methods added for the sweeps (issue 27)
def manual_softmax(row, temp=1.0):
    z = [math.exp(v / temp) for v in row]
    return [v / sum(z) for v in z]


def manual_pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    den = math.sqrt(sum((x - ma) ** 2 for x in a)) * math.sqrt(sum((y - mb) ** 2 for y in b))
    return num / den


def test_logit_standardization_is_kd_of_z_scored_logits_and_ignores_the_teachers_scale():
    from distillation_lab.methods.kd import KDTerm

    def z(row):
        mean = sum(row) / len(row)
        std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))  # sample std, as the paper's code
        return [(v - mean) / std for v in row]

    s, t = S.tolist(), T.tolist()
    s[1] = [0.5, 0.2, 0.0]  # rows with spread (a constant row has no standard score)
    s_, t_ = torch.tensor(s), torch.tensor(t)
    expected = manual_kl(torch.tensor([z(r) for r in s]), torch.tensor([z(r) for r in t]), 2.0) * 4.0
    term = KDTerm(temperature=2.0, standardize=True)
    assert term(s_, [], t_, [], Y).item() == pytest.approx(expected, rel=1e-5)
    assert term(s_, [], 10 * t_ + 3, [], Y).item() == pytest.approx(expected, rel=1e-5)  # scale and shift of logits
    assert KDTerm(temperature=2.0)(s_, [], 10 * t_ + 3, [], Y).item() != pytest.approx(expected, rel=1e-3)


def test_dkd_with_standardization_is_dkd_of_z_scored_logits():
    from distillation_lab.losses import standardize
    from distillation_lab.methods.dkd import DKDTerm

    s, t = torch.randn(4, 5), torch.randn(4, 5)
    y = torch.tensor([0, 3, 1, 4])
    expected = dkd_loss(standardize(s), standardize(t), y, 1.0, 8.0, 2.0)
    assert DKDTerm(temperature=2.0, standardize=True)(s, [], t, [], y).item() == pytest.approx(expected.item())


def test_dist_against_a_hand_computation():
    from distillation_lab.methods.dist import DISTTerm

    torch.manual_seed(0)
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    temp, beta, gamma = 2.0, 1.0, 2.0
    ps = [manual_softmax(r, temp) for r in s.tolist()]
    pt = [manual_softmax(r, temp) for r in t.tolist()]
    inter = 1 - sum(manual_pearson(a, b) for a, b in zip(ps, pt)) / 4
    columns = lambda p: [[row[c] for row in p] for c in range(3)]  # noqa: E731
    intra = 1 - sum(manual_pearson(a, b) for a, b in zip(columns(ps), columns(pt))) / 3
    expected = temp ** 2 * (beta * inter + gamma * intra)
    assert DISTTerm(beta, gamma, temp)(s, [], t, [], Y).item() == pytest.approx(expected, rel=1e-5)
    assert DISTTerm()(t, [], t, [], Y).item() == pytest.approx(0.0, abs=1e-6)  # perfect correlation


def smooth_l1(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def test_rkd_against_a_hand_computation_with_other_widths():
    from distillation_lab.methods.relational import RKDTerm

    torch.manual_seed(0)
    s, t = torch.randn(4, 3), torch.randn(4, 5)  # widths need not match
    n = 4

    def distances(e):
        d = [[math.dist(e[i], e[j]) for j in range(n)] for i in range(n)]
        mean = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[v / mean for v in row] for row in d]

    def angles(e):
        def unit(i, j):  # from j to i
            v = [a - b for a, b in zip(e[i], e[j])]
            norm = math.sqrt(sum(x * x for x in v))
            return [x / norm for x in v] if norm > 0 else [0.0] * len(v)
        return [[[sum(a * b for a, b in zip(unit(i, j), unit(k, j))) for k in range(n)] for i in range(n)]
                for j in range(n)]

    ds, dt = distances(s.tolist()), distances(t.tolist())
    distance = sum(smooth_l1(ds[i][j], dt[i][j]) for i in range(n) for j in range(n)) / n ** 2
    as_, at = angles(s.tolist()), angles(t.tolist())
    angle = sum(smooth_l1(as_[j][i][k], at[j][i][k]) for i in range(n) for j in range(n) for k in range(n)) / n ** 3
    term = RKDTerm([3], [5], distance=1.0, angle=2.0)
    assert term(None, [s], None, [t], Y).item() == pytest.approx(distance + 2 * angle, rel=1e-5)


def test_sp_against_a_hand_computation_on_feature_maps():
    from distillation_lab.methods.relational import SPTerm

    torch.manual_seed(0)
    s, t = torch.randn(3, 2, 2, 2), torch.randn(3, 4, 1, 1)
    b = 3

    def gram(a):
        flat = [x.flatten().tolist() for x in a]
        g = [[sum(p * q for p, q in zip(flat[i], flat[j])) for j in range(b)] for i in range(b)]
        return [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in g]

    gs, gt = gram(s), gram(t)
    expected = sum((gs[i][j] - gt[i][j]) ** 2 for i in range(b) for j in range(b)) / b ** 2
    assert SPTerm([2], [4])(None, [s], None, [t], Y).item() == pytest.approx(expected, rel=1e-5)


def test_pkt_against_a_hand_computation_on_token_features():
    from distillation_lab.methods.relational import PKTTerm

    torch.manual_seed(0)
    s, t = torch.randn(3, 5, 4), torch.randn(3, 7, 6)  # tokens [B, N, D]: averaged over tokens

    def distributions(e):
        pooled = [[sum(tok[d] for tok in ex) / len(ex) for d in range(len(ex[0]))] for ex in e.tolist()]
        unit = [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in pooled]
        sim = [[(sum(a * b for a, b in zip(u, v)) + 1) / 2 for v in unit] for u in unit]
        return [[v / sum(row) for v in row] for row in sim]

    ps, pt = distributions(s), distributions(t)
    expected = sum(pt[i][j] * math.log((pt[i][j] + 1e-7) / (ps[i][j] + 1e-7)) for i in range(3) for j in range(3)) / 3
    assert PKTTerm([4], [6])(None, [s], None, [t], Y).item() == pytest.approx(expected, rel=1e-5)
    assert PKTTerm([4], [4])(None, [s], None, [s], Y).item() == pytest.approx(0.0, abs=1e-6)


def test_crd_against_a_hand_computation_and_its_memory_of_negatives():
    """InfoNCE in both directions by hand on 2 examples and a memory of 3; the batch then replaces the oldest
    rows of each memory (a queue), and evaluation leaves them alone."""
    from distillation_lab.methods.crd import CRDTerm

    torch.manual_seed(0)
    term = CRDTerm([6], [4], dim=3, negatives=3, temperature=0.5)
    s_feat, t_feat = torch.randn(2, 6), torch.randn(2, 4)
    s = F.normalize(term.embed_student(s_feat), dim=1)
    t = F.normalize(term.embed_teacher(t_feat), dim=1)
    mem_s, mem_t = term.memory_student.clone(), term.memory_teacher.clone()

    def nce(a, p, memory):
        total = 0.0
        for i in range(len(a)):
            pos = math.exp(float(a[i] @ p[i]) / 0.5)
            neg = sum(math.exp(float(a[i] @ m) / 0.5) for m in memory)
            total += -math.log(pos / (pos + neg))
        return total / len(a)

    expected = 0.5 * (nce(s, t, mem_t) + nce(t, s, mem_s))
    term.train()
    loss = term(None, [s_feat], None, [t_feat], None)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(term.memory_student[:2], s.detach()) and torch.equal(term.memory_student[2], mem_s[2])
    assert torch.allclose(term.memory_teacher[:2], t.detach()) and int(term.position) == 2
    term(None, [s_feat], None, [t_feat], None)  # wraps around: rows 2 and 0
    assert torch.allclose(term.memory_student[2], s[0].detach()) and torch.allclose(term.memory_student[0], s[1].detach())
    term.eval()
    before = term.memory_student.clone()
    term(None, [s_feat], None, [t_feat], None)
    assert torch.equal(term.memory_student, before)
    loss.backward()  # the teacher's features get no gradient; the heads do
    assert term.embed_student.weight.grad is not None


def test_crd_learns_to_pair_each_students_embedding_with_its_teachers():
    """Paired features of 64 examples seen as batches of 16 with a memory of 48: after Adam steps on the
    heads (and the student's features), each student embedding is closest to its own example's teacher
    embedding, and the loss falls well below chance (log(1 + 48))."""
    from distillation_lab.methods.crd import CRDTerm

    torch.manual_seed(0)
    teacher_features = torch.randn(64, 12)
    student_features = (teacher_features @ torch.randn(12, 8) + 0.1 * torch.randn(64, 8)).requires_grad_()
    term = CRDTerm([8], [12], dim=16, negatives=48, temperature=0.1).train()
    optimizer = torch.optim.Adam([*term.parameters(), student_features], lr=1e-2)
    for step in range(300):
        batch = torch.arange(16) + 16 * (step % 4)
        loss = term(None, [student_features[batch]], None, [teacher_features[batch]], None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss) < 0.5 * math.log(49)
    with torch.no_grad():
        s = F.normalize(term.embed_student(student_features), dim=1)
        t = F.normalize(term.embed_teacher(teacher_features), dim=1)
    assert ((s @ t.T).argmax(1) == torch.arange(64)).float().mean() > 0.9
