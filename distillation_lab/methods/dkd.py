"""DKD (Zhao et al. 2022): target-class and non-target-class KD weighted apart."""
from __future__ import annotations

import torch.nn as nn

from pruning_lab.train.terms import register_term

from ..losses import dkd_loss


@register_term("dkd", needs_teacher=True,
               ranges={"alpha": (">= 0", lambda v: v >= 0), "beta": (">= 0", lambda v: v >= 0)})
class DKDTerm(nn.Module):
    """Decoupled KD on the labelled examples of the batch."""

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> None:
        super().__init__()
        self.alpha, self.beta, self.temperature = alpha, beta, temperature

    def forward(self, s_logits, s_feats, t_logits, t_feats, labels):
        keep = labels >= 0
        if not bool(keep.all()):
            s_logits, t_logits, labels = s_logits[keep], t_logits[keep], labels[keep]
        if len(labels) == 0:
            return s_logits.sum() * 0.0
        return dkd_loss(s_logits, t_logits, labels, self.alpha, self.beta, self.temperature)
