"""KD (Hinton et al. 2015): T^2 * KL between the softened predictions of teacher and student; with
`standardize`, of their z-scored logits (logit standardization, Sun et al. CVPR 2024)."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from pruning_lab.train.terms import register_term

from ..losses import kl_divergence_loss, standardize


@register_term("kd", needs_teacher=True)
class KDTerm(nn.Module):
    """T^2 * KL(p_t^T || p_s^T) on every example, labelled or not (of the z-scored logits with `standardize`);
    for a regression (one output) the squared error to the teacher's score."""

    def __init__(self, temperature: float = 4.0, standardize: bool = False) -> None:
        super().__init__()
        self.temperature, self.standardize = temperature, standardize

    def forward(self, s_logits, s_feats, t_logits, t_feats, labels):
        if s_logits.shape[1] == 1:  # a regression: the teacher's score is the target
            return F.mse_loss(s_logits.float(), t_logits.float())
        if self.standardize:
            s_logits, t_logits = standardize(s_logits), standardize(t_logits)
        return kl_divergence_loss(s_logits, t_logits, self.temperature)
