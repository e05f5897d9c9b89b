"""The loss the loop minimises: a weighted sum of named terms, and the cross-entropy every run has.

A term is a module called as term(student_logits, student_features, teacher_logits,
teacher_features, labels); terms that do not need a teacher get None for its outputs. The
distillation terms (KD, DKD, FitNets, attention transfer) live in distillation_lab/methods/ and plug
in here through the registry of terms.py.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .terms import register_term

Teacher = Callable[[torch.Tensor], tuple]  # inputs -> (logits, features), frozen


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the labelled examples (label -1 = unlabelled); 0 if none is labelled."""
    keep = labels >= 0
    losses = F.cross_entropy(logits, labels.clamp(min=0), reduction="none", label_smoothing=label_smoothing)
    return (losses * keep).sum() / keep.sum().clamp(min=1)  # no host sync, no NaN on unlabelled batches


def masked_squared_error(outputs: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Mean squared error of a regression's one output [B, 1] against the scores [B] that are given (NaN = none)."""
    keep = ~torch.isnan(scores)
    return ((outputs[:, 0].float() - scores.nan_to_num()) ** 2 * keep).sum() / keep.sum().clamp(min=1)


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """The labels' loss: cross-entropy for class labels, squared error for a regression's scores (float labels)."""
    if labels.is_floating_point():
        return masked_squared_error(logits, labels)
    return masked_cross_entropy(logits, labels, label_smoothing)


@register_term("ce")
class CETerm(nn.Module):
    """Cross-entropy on the labelled examples of the batch (label -1 means unlabelled); for a regression
    (float scores, one output) the squared error instead."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, s_logits, s_feats, t_logits, t_feats, labels):
        return supervised_loss(s_logits, labels, self.label_smoothing)


class Criterion(nn.Module):
    """Maps (logits, features, labels, inputs) to the dict of weighted named terms that the loop sums.

    The teacher, if any, is called on the same inputs first; it is not a submodule, so its weights
    never join the student's optimizer or checkpoints. The terms' own parameters (e.g. feature
    regressors) do, and are saved for resume.
    """

    def __init__(self, terms: dict[str, nn.Module], weights: dict[str, float],
                 teacher: Optional[Teacher] = None, extra_teachers: tuple = (),
                 term_teacher: Optional[dict[str, int]] = None) -> None:
        super().__init__()
        self.terms = nn.ModuleDict(terms)
        self.weights = {name: float(weights[name]) for name in terms}
        self.teacher = teacher  # the main one: its agreement with the student is what runs report
        self.teachers = [teacher, *extra_teachers] if teacher is not None else []
        self.term_teacher = term_teacher or {}  # a term's teacher by index (default 0); several: one term each

    def forward(self, logits, features, labels, inputs) -> dict:
        outputs = [t(inputs) for t in self.teachers] or [(None, None)]
        return {name: self.weights[name] * term(logits, features, *outputs[self.term_teacher.get(name, 0)], labels)
                for name, term in self.terms.items()}


class CrossEntropyCriterion(Criterion):
    """The supervised loss alone: {'ce': cross-entropy with optional label smoothing}."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__({"ce": CETerm(label_smoothing)}, {"ce": 1.0})
