"""Knowledge-distillation losses (batch-mean) and the loss-term modules a config names.

Cross-entropy is pruning_lab's (`masked_cross_entropy`, `CETerm`), the one every run has. The loss-term
modules a config names, built on these functions, are in distillation_lab/methods/ (one file each).

Functions follow the lab plan's names and meanings:
- kl_divergence_loss: KL(p_teacher^T || p_student^T) * T^2
- distillation_loss: alpha * CE(student, labels) + (1 - alpha) * T^2 * KL
- feature_distillation_loss: FitNets hint (MSE through a regressor) or 1 - cosine similarity
- attention_transfer_loss (Zagoruyko & Komodakis 2017), dkd_loss (Zhao et al. 2022)
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pruning_lab.train.criterion import masked_cross_entropy


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Each example's logits z-scored (Sun et al. 2024, logit standardization): (z - mean) / std over classes."""
    return (logits - logits.mean(1, keepdim=True)) / (logits.std(1, keepdim=True) + eps)


def kl_divergence_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p_t^T || p_s^T) averaged over the batch, times T^2 (keeps gradients comparable across T)."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * temperature**2


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      alpha: float = 0.5, temperature: float = 4.0) -> torch.Tensor:
    """alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(p_t^T || p_s^T)."""
    ce = masked_cross_entropy(student_logits, labels)
    return alpha * ce + (1 - alpha) * kl_divergence_loss(student_logits, teacher_logits, temperature)


def as_feature_map(f: torch.Tensor) -> torch.Tensor:
    """View any feature as [B, C, H, W]: tokens [B, N, D] on a square grid, vectors [B, D] as 1x1."""
    if f.ndim == 4:
        return f
    if f.ndim == 2:
        return f[:, :, None, None]
    b, n, d = f.shape
    side = int(round(n**0.5))
    if side * side != n:  # not a square grid (e.g. text tokens): treat tokens as a 1-D map
        return f.transpose(1, 2).reshape(b, d, 1, n)
    return f.transpose(1, 2).reshape(b, d, side, side)


def match_spatial(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two feature maps to the smaller one's height and width."""
    h, w = min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3])
    if s.shape[2:] != (h, w):
        s = F.adaptive_avg_pool2d(s, (h, w))
    if t.shape[2:] != (h, w):
        t = F.adaptive_avg_pool2d(t, (h, w))
    return s, t


def feature_distillation_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, kind: str = "mse",
                              regressor: Optional[nn.Module] = None) -> torch.Tensor:
    """FitNets-style matching of one feature pair; `regressor` maps student channels to the teacher's.

    kind="mse": mean squared error between the regressed student map and the teacher map.
    kind="cosine": 1 - cosine similarity of the flattened maps, batch-mean (sizes matched by pooling).
    """
    s = as_feature_map(student_features)
    t = as_feature_map(teacher_features).detach()
    if regressor is not None:
        s = regressor(s)
    s, t = match_spatial(s, t)
    if kind == "mse":
        return F.mse_loss(s.float(), t.float())
    if kind == "cosine":
        if s.shape != t.shape:
            raise ValueError(f"cosine feature loss needs equal shapes after pooling, got {tuple(s.shape)} and "
                             f"{tuple(t.shape)}: give a regressor to match channels")
        return (1 - F.cosine_similarity(s.flatten(1).float(), t.flatten(1).float(), dim=1)).mean()
    raise ValueError(f"feature loss kind must be 'mse' or 'cosine', got '{kind}'")


def attention_map(f: torch.Tensor) -> torch.Tensor:
    """Spatial attention of a feature map: channel-mean of squares, flattened and L2-normalised."""
    return F.normalize(as_feature_map(f).float().pow(2).mean(1).flatten(1), dim=1)


def attention_transfer_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between normalised attention maps (pooled to the same size)."""
    s, t = match_spatial(as_feature_map(student_features), as_feature_map(teacher_features).detach())
    return (attention_map(s) - attention_map(t)).pow(2).mean()


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> torch.Tensor:
    """Decoupled KD: alpha * target-class KD (binary) + beta * non-target-class KD, each times T^2."""
    t = temperature
    gt = F.one_hot(labels.clamp(min=0), student_logits.shape[1]).bool()
    p_s, p_t = F.softmax(student_logits / t, 1), F.softmax(teacher_logits.detach() / t, 1)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * ~gt).sum(1)], 1).clamp_min(1e-12)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * ~gt).sum(1)], 1).clamp_min(1e-12)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(1).mean() * t**2
    # Non-target distributions: the target logit is pushed to -inf-ish before the softmax.
    log_q_s = F.log_softmax(student_logits / t - 1000.0 * gt, 1)
    log_q_t = F.log_softmax(teacher_logits.detach() / t - 1000.0 * gt, 1)
    nckd = F.kl_div(log_q_s, log_q_t, log_target=True, reduction="batchmean") * t**2
    return alpha * tckd + beta * nckd


def feature_pairs(n_student: int, n_teacher: int, layers: Optional[Sequence[int]]) -> list[tuple[int, int]]:
    """Which (student, teacher) feature indices to match: given layers of both, or the last min(n) aligned."""
    if layers is not None:
        return [(i, i) for i in layers]
    n = min(n_student, n_teacher)
    return [(n_student - n + k, n_teacher - n + k) for k in range(n)]
