"""The run's loss: a weighted sum of named terms from the config, seeing the teacher when there is one."""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from pruning_lab.config import Config
from pruning_lab.errors import UserError

from .losses import AttentionTerm, CETerm, DKDTerm, FeatureTerm, KDTerm
from .teacher import FrozenTeacher

# name -> (parameters it accepts besides `weight`, whether it needs a teacher)
TERMS = {
    "ce": (("label_smoothing",), False),
    "kd": (("temperature",), True),
    "dkd": (("alpha", "beta", "temperature"), True),
    "feature": (("kind", "layers"), True),
    "at": (("layers",), True),
}


def loss_spec(cfg: Config, distilling: bool) -> dict:
    """The loss terms of a run: `cfg.loss` if given, else CE (training) or alpha/temperature KD (distill)."""
    if cfg.loss:
        return cfg.loss
    if not distilling:
        return {"ce": {"weight": 1.0, "label_smoothing": cfg.label_smoothing}}
    spec = {"ce": {"weight": cfg.alpha, "label_smoothing": cfg.label_smoothing},
            "kd": {"weight": 1.0 - cfg.alpha, "temperature": cfg.temperature}}
    if cfg.feature_distill:
        spec["feature"] = {"weight": cfg.feature_weight, "kind": "mse"}
    return spec


def check_spec(spec: dict, distilling: bool) -> None:
    """Unknown terms or parameters, missing weights, and teacher terms without a teacher are errors."""
    for name, params in spec.items():
        if name not in TERMS:
            raise UserError(f"unknown loss term '{name}' in config key 'loss'; allowed: {', '.join(TERMS)}")
        allowed, needs_teacher = TERMS[name]
        if not isinstance(params, dict) or not isinstance(params.get("weight"), (int, float)):
            raise UserError(f"loss term '{name}' needs a numeric weight, e.g. {{{name}: {{weight: 0.5}}}}")
        extra = set(params) - {"weight", *allowed}
        if extra:
            raise UserError(f"loss term '{name}' has unknown parameter(s) {', '.join(sorted(extra))}; "
                            f"allowed: weight{''.join(', ' + a for a in allowed)}")
        if needs_teacher and not distilling:
            raise UserError(f"loss term '{name}' needs a teacher: use the distill command with --teacher-checkpoint")


def make_term(name: str, params: dict, student_widths: list, teacher: Optional[FrozenTeacher]) -> nn.Module:
    """One loss-term module from its config entry."""
    kwargs = {k: v for k, v in params.items() if k != "weight"}
    if name in ("feature", "at"):
        cls = FeatureTerm if name == "feature" else AttentionTerm
        return cls(student_widths, teacher.feature_widths, **kwargs)
    return {"ce": CETerm, "kd": KDTerm, "dkd": DKDTerm}[name](**kwargs)


class DistillationCriterion(nn.Module):
    """Maps (logits, features, labels, images) to the dict of weighted named terms the loop sums."""

    def __init__(self, spec: dict, student_widths: list, teacher: Optional[FrozenTeacher] = None) -> None:
        super().__init__()
        check_spec(spec, teacher is not None)
        self.teacher = teacher
        self.weights = {name: float(params["weight"]) for name, params in spec.items()}
        terms = {}
        for name, params in spec.items():
            try:
                terms[name] = make_term(name, params, student_widths, teacher)
            except (TypeError, ValueError) as e:
                raise UserError(f"loss term '{name}': {e}") from None
        self.terms = nn.ModuleDict(terms)

    def forward(self, logits, features, labels, images) -> dict:
        t_logits, t_features = self.teacher(images) if self.teacher is not None else (None, None)
        return {name: self.weights[name] * term(logits, features, t_logits, t_features, labels)
                for name, term in self.terms.items()}
