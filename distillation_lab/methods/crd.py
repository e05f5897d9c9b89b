"""CRD, contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020).

The student's and the teacher's feature at `layer` (pooled to one vector per example, as the relational
terms read them) are embedded by one linear head each into `dim` dimensions and L2-normalised. For each
example the positive pair is (its student embedding, its teacher embedding); the negatives are the
embeddings of other examples kept in a memory of the last `negatives` ones seen (a queue, as MoCo keeps
its negatives, in place of the paper's bank indexed by example, so that any loader works). The loss is
the contrastive (InfoNCE) loss at `temperature` in both directions, the student's embedding against the
teacher's memory and the teacher's against the student's, averaged; the paper's NCE estimate of the same
objective draws its 16,384 negatives from such a memory too. The memories are buffers: they are saved
with the criterion and a resumed run continues with them.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pruning_lab.train.terms import register_term

from .relational import RelationalTerm, embedding


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, memory: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the batch of -log exp(a.p / t) / (exp(a.p / t) + sum_k exp(a.m_k / t)), rows L2-normalised."""
    positives = (anchor * positive).sum(1, keepdim=True)  # [B, 1]
    negatives = anchor @ memory.T  # [B, K]
    logits = torch.cat([positives, negatives], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(anchor), dtype=torch.long, device=anchor.device))


@register_term("crd", needs_teacher=True,
               ranges={"dim": (">= 1", lambda v: isinstance(v, int) and v >= 1),
                       "negatives": (">= 1", lambda v: isinstance(v, int) and v >= 1)})
class CRDTerm(RelationalTerm):
    """CRD with a memory of `negatives` past embeddings of each model (the paper's 16,384; dim 128, t 0.07)."""

    def __init__(self, student_widths: Sequence[int], teacher_widths: Sequence[int], dim: int = 128,
                 negatives: int = 16384, temperature: float = 0.07, layer: int = -1) -> None:
        super().__init__(student_widths, teacher_widths, layer)
        self.temperature = temperature
        self.embed_student = nn.Linear(student_widths[layer], dim)
        self.embed_teacher = nn.Linear(teacher_widths[layer], dim)
        # Random unit vectors until real embeddings replace them (as the paper's bank starts).
        self.register_buffer("memory_student", F.normalize(torch.randn(negatives, dim), dim=1))
        self.register_buffer("memory_teacher", F.normalize(torch.randn(negatives, dim), dim=1))
        self.register_buffer("position", torch.zeros((), dtype=torch.long))

    def forward(self, s_logits, s_feats, t_logits, t_feats, labels):
        s_feature, t_feature = self.features(s_feats, t_feats)
        s = F.normalize(self.embed_student(embedding(s_feature)), dim=1)
        t = F.normalize(self.embed_teacher(embedding(t_feature).detach()), dim=1)
        # Copies: backward needs the memories as they were, and `remember` changes them in place before it.
        loss = 0.5 * (info_nce(s, t, self.memory_teacher.clone(), self.temperature)
                      + info_nce(t, s, self.memory_student.clone(), self.temperature))
        if self.training:
            self.remember(s.detach(), t.detach())
        return loss

    @torch.no_grad()
    def remember(self, s: torch.Tensor, t: torch.Tensor) -> None:
        """Put the batch's embeddings in place of the oldest ones (no host synchronisation)."""
        size = len(self.memory_student)
        rows = (self.position + torch.arange(min(len(s), size), device=s.device)) % size
        self.memory_student[rows] = s[-size:].to(self.memory_student.dtype)
        self.memory_teacher[rows] = t[-size:].to(self.memory_teacher.dtype)
        self.position.copy_((self.position + len(rows)) % size)
