"""Soft-target alignment of a student with its teacher: top-1 agreement and mean KL."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from pruning_lab.runtime import autocast

from .teacher import FrozenTeacher


@torch.no_grad()
def soft_target_alignment(student: nn.Module, teacher: FrozenTeacher, loader: Iterable,
                          precision: str = "fp32") -> dict:
    """Fraction of images where student and teacher agree on the top class, and mean KL(p_t || p_s) at T=1."""
    was_training = student.training
    student.eval()
    agree, kl, n = 0.0, 0.0, 0
    for x, _ in loader:
        with autocast(precision, x.device):
            s_logits = student(x)[0].float()
        t_logits = teacher(x)[0]
        agree = agree + (s_logits.argmax(1) == t_logits.argmax(1)).sum()
        kl = kl + F.kl_div(F.log_softmax(s_logits, 1), F.log_softmax(t_logits, 1), log_target=True, reduction="sum")
        n += len(x)
    student.train(was_training)
    return {"agreement": float(agree) / max(n, 1), "kl": float(kl) / max(n, 1)}
