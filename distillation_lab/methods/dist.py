"""DIST (Huang et al., NeurIPS 2022): the student's predictions keep the teacher's relations, not its values:
the Pearson correlation of each example's class probabilities (inter-class) and of each class's
probabilities over the batch (intra-class)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pruning_lab.train.terms import register_term


def pearson_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """1 - the mean Pearson correlation of the rows of a and b [N, C]."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return 1 - F.cosine_similarity(a, b, dim=1, eps=eps).mean()


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 1.0, gamma: float = 1.0,
              temperature: float = 1.0) -> torch.Tensor:
    """T^2 * (beta * inter-class + gamma * intra-class Pearson distance) of the softened predictions."""
    p_s = F.softmax(student_logits / temperature, 1)
    p_t = F.softmax(teacher_logits.detach() / temperature, 1)
    inter = pearson_distance(p_s, p_t)
    intra = pearson_distance(p_s.t(), p_t.t())
    return temperature ** 2 * (beta * inter + gamma * intra)


@register_term("dist", needs_teacher=True,
               ranges={"beta": (">= 0", lambda v: v >= 0), "gamma": (">= 0", lambda v: v >= 0)})
class DISTTerm(nn.Module):
    """DIST on every example of the batch, labelled or not (the paper's tau = 1 by default)."""

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0) -> None:
        super().__init__()
        self.beta, self.gamma, self.temperature = beta, gamma, temperature

    def forward(self, s_logits, s_feats, t_logits, t_feats, labels):
        return dist_loss(s_logits, t_logits, self.beta, self.gamma, self.temperature)
