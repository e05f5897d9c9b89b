"""Relational distillation: the student keeps how the teacher relates the examples of a batch to one another,
so teacher and student widths need not match (no projection). Each term reads one feature of each model
(`layer`, default the last), pooled to one embedding per example (feature maps and token sequences
averaged) or, for SP, flattened as the paper does.

- RKD (Park et al., CVPR 2019): distances between embeddings (each divided by their mean) and angles of
  triplets, matched by smooth L1;
- SP, similarity-preserving (Tung & Mori, ICCV 2019): the row-normalised Gram matrices of the flattened
  activations, squared Frobenius distance / b^2;
- PKT, probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018): cosine similarities mapped to [0, 1]
  and normalised per row into distributions, KL(teacher || student).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pruning_lab.train.terms import register_term


def embedding(feature: torch.Tensor) -> torch.Tensor:
    """One vector per example: maps [B, C, H, W] and tokens [B, N, D] averaged, vectors as they are."""
    if feature.ndim == 4:
        return feature.float().mean((2, 3))
    if feature.ndim == 3:
        return feature.float().mean(1)
    return feature.float().flatten(1)


def pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of e, divided by their mean over distinct pairs."""
    d = torch.cdist(e, e)
    off = ~torch.eye(len(e), dtype=torch.bool, device=e.device)
    return d / d[off].mean().clamp_min(1e-12)


def triplet_angles(e: torch.Tensor) -> torch.Tensor:
    """cos of the angle at j between i and k, for every (i, j, k): [B, B, B]."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # [j, i, D]: unit vector from j to i
    return torch.bmm(diff, diff.transpose(1, 2))


def rkd_loss(s: torch.Tensor, t: torch.Tensor, distance: float = 1.0, angle: float = 2.0) -> torch.Tensor:
    """distance * smoothL1(relative distances) + angle * smoothL1(triplet angles), teacher's side fixed."""
    s, t = embedding(s), embedding(t).detach()
    return (distance * F.smooth_l1_loss(pairwise_distances(s), pairwise_distances(t))
            + angle * F.smooth_l1_loss(triplet_angles(s), triplet_angles(t)))


def sp_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """||normalise(A_s A_s^T) - normalise(A_t A_t^T)||_F^2 / b^2, A the flattened activations [b, -1]."""
    a_s, a_t = s.float().flatten(1), t.float().detach().flatten(1)
    g_s, g_t = F.normalize(a_s @ a_s.t(), p=2, dim=1), F.normalize(a_t @ a_t.t(), p=2, dim=1)
    return (g_s - g_t).pow(2).sum() / len(a_s) ** 2


def pkt_loss(s: torch.Tensor, t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """KL(P_t || P_s) of the row-normalised similarities (cos + 1) / 2 of the embeddings, mean over the batch."""
    def distributions(e: torch.Tensor) -> torch.Tensor:
        e = F.normalize(e, p=2, dim=1)
        similarity = (e @ e.t() + 1) / 2
        return similarity / similarity.sum(1, keepdim=True)

    p_s, p_t = distributions(embedding(s)), distributions(embedding(t).detach())
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).sum(1).mean()


class RelationalTerm(nn.Module):
    """A relational term on feature `layer` of each model (negative: from the end)."""

    def __init__(self, student_widths: Sequence[int], teacher_widths: Sequence[int], layer: int = -1) -> None:
        super().__init__()
        for who, widths in (("student", student_widths), ("teacher", teacher_widths)):
            if not (isinstance(layer, int) and -len(widths) <= layer < len(widths)):
                raise ValueError(f"layer {layer!r}: the {who} gives {len(widths)} features (layers -{len(widths)} "
                                 f"to {len(widths) - 1})")
        self.layer = layer

    def features(self, s_feats, t_feats) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's and the teacher's feature at `layer`."""
        return s_feats[self.layer], t_feats[self.layer]


@register_term("rkd", needs_teacher=True,
               ranges={"distance": (">= 0", lambda v: v >= 0), "angle": (">= 0", lambda v: v >= 0)})
class RKDTerm(RelationalTerm):
    """RKD distance and angle (the paper's weights 1 and 2)."""

    def __init__(self, student_widths: Sequence[int], teacher_widths: Sequence[int], distance: float = 1.0,
                 angle: float = 2.0, layer: int = -1) -> None:
        super().__init__(student_widths, teacher_widths, layer)
        self.distance, self.angle = distance, angle

    def forward(self, s_logits, s_feats, t_logits, t_feats, labels):
        return rkd_loss(*self.features(s_feats, t_feats), self.distance, self.angle)


@register_term("sp", needs_teacher=True)
class SPTerm(RelationalTerm):
    """Similarity-preserving KD."""

    def forward(self, s_logits, s_feats, t_logits, t_feats, labels):
        return sp_loss(*self.features(s_feats, t_feats))


@register_term("pkt", needs_teacher=True)
class PKTTerm(RelationalTerm):
    """Probabilistic knowledge transfer."""

    def forward(self, s_logits, s_feats, t_logits, t_feats, labels):
        return pkt_loss(*self.features(s_feats, t_feats))
