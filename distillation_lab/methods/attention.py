"""Attention transfer (Zagoruyko & Komodakis 2017): the students' spatial attention maps match the teacher's."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from pruning_lab.train.terms import register_term

from ..losses import attention_transfer_loss, feature_pairs


@register_term("at", needs_teacher=True)
class AttentionTerm(nn.Module):
    """Attention transfer over the same feature pairs as the feature term."""

    def __init__(self, student_widths: Sequence[int], teacher_widths: Sequence[int],
                 layers: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        self.pairs = feature_pairs(len(student_widths), len(teacher_widths), layers)

    def forward(self, s_logits, s_feats, t_logits, t_feats, labels):
        return torch.stack([attention_transfer_loss(s_feats[i], t_feats[j]) for i, j in self.pairs]).mean()
