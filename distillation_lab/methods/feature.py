"""FitNets hints (Romero et al. 2015): intermediate features matched through 1x1 regressors, or by cosine."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from pruning_lab.train.terms import register_term

from ..losses import feature_distillation_loss, feature_pairs


@register_term("feature", needs_teacher=True)
class FeatureTerm(nn.Module):
    """FitNets hints (kind mse, with 1x1-conv regressors trained with the student) or cosine matching."""

    def __init__(self, student_widths: Sequence[int], teacher_widths: Sequence[int], kind: str = "mse",
                 layers: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        if kind not in ("mse", "cosine"):
            raise ValueError(f"feature loss kind must be 'mse' or 'cosine', got '{kind}'")
        self.kind = kind
        self.pairs = feature_pairs(len(student_widths), len(teacher_widths), layers)
        self.regressors = nn.ModuleList(
            nn.Conv2d(student_widths[i], teacher_widths[j], 1, bias=False) if student_widths[i] != teacher_widths[j]
            else nn.Identity() for i, j in self.pairs)

    def forward(self, s_logits, s_feats, t_logits, t_feats, labels):
        losses = [feature_distillation_loss(s_feats[i], t_feats[j], self.kind, reg)
                  for (i, j), reg in zip(self.pairs, self.regressors)]
        return torch.stack(losses).mean()
