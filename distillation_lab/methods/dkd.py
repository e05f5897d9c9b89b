"""DKD (Zhao et al. 2022): target-class and non-target-class KD weighted apart; with `standardize`, of the
z-scored logits (logit standardization, Sun et al. CVPR 2024)."""
from __future__ import annotations

import torch.nn as nn

from pruning_lab.train.terms import register_term

from ..losses import dkd_loss, standardize


@register_term("dkd", needs_teacher=True,
               ranges={"alpha": (">= 0", lambda v: v >= 0), "beta": (">= 0", lambda v: v >= 0)})
class DKDTerm(nn.Module):
    """Decoupled KD on the labelled examples of the batch."""

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 standardize: bool = False) -> None:
        super().__init__()
        self.alpha, self.beta, self.temperature, self.standardize = alpha, beta, temperature, standardize

    def forward(self, s_logits, s_feats, t_logits, t_feats, labels):
        keep = labels >= 0
        if not bool(keep.all()):
            s_logits, t_logits, labels = s_logits[keep], t_logits[keep], labels[keep]
        if len(labels) == 0:
            return s_logits.sum() * 0.0
        if self.standardize:
            s_logits, t_logits = standardize(s_logits), standardize(t_logits)
        return dkd_loss(s_logits, t_logits, labels, self.alpha, self.beta, self.temperature)
