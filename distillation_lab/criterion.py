"""The run's loss: a weighted sum of named terms from the config, seeing the teacher when there is one."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch.nn as nn

from pruning_lab.config import LOSS_SHORTHANDS, Config
from pruning_lab.errors import UserError
from pruning_lab.train.criterion import CETerm, Criterion

from .losses import AttentionTerm, DKDTerm, FeatureTerm, KDTerm
from .teacher import FrozenTeacher

# name -> (parameters it accepts besides `weight`, whether it needs a teacher)
TERMS = {
    "ce": (("label_smoothing",), False),
    "kd": (("temperature",), True),
    "dkd": (("alpha", "beta", "temperature"), True),
    "feature": (("kind", "layers"), True),
    "at": (("layers",), True),
}


# What the numbers of a loss term may be.
TERM_RANGES = {"weight": (">= 0", lambda v: v >= 0), "temperature": ("> 0", lambda v: v > 0),
               "label_smoothing": ("in [0, 1)", lambda v: 0 <= v < 1), "alpha": (">= 0", lambda v: v >= 0),
               "beta": (">= 0", lambda v: v >= 0)}


def loss_from_shorthands(cfg: Config, distilling: bool) -> dict:
    """The loss the shorthands describe: CE alone (training), or alpha/temperature KD [+ feature] (distilling)."""
    ce = {"weight": 1.0, "label_smoothing": cfg.label_smoothing}
    if not distilling:
        return {"ce": ce}
    alpha = 0.5 if cfg.alpha is None else cfg.alpha
    spec = {"ce": {**ce, "weight": alpha},
            "kd": {"weight": 1.0 - alpha, "temperature": 4.0 if cfg.temperature is None else cfg.temperature}}
    if cfg.feature_distill:
        spec["feature"] = {"weight": 1.0 if cfg.feature_weight is None else cfg.feature_weight, "kind": "mse"}
    return spec


def resolve_loss(cfg: Config, distilling: bool) -> Config:
    """`cfg` with `loss` set to the terms the run uses (shorthands folded in), checked; what checkpoints record."""
    spec = cfg.loss or loss_from_shorthands(cfg, distilling)
    check_spec(spec, distilling)
    return dataclasses.replace(cfg, loss=spec, **{k: None for k in LOSS_SHORTHANDS})


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
        for key, value in params.items():
            if key in TERM_RANGES and not (isinstance(value, (int, float)) and math.isfinite(value)
                                           and TERM_RANGES[key][1](value)):
                raise UserError(f"loss term '{name}': {key} must be {TERM_RANGES[key][0]}, got {value!r}")
        if needs_teacher and not distilling:
            raise UserError(f"loss term '{name}' needs a teacher: use the distill command with --teacher-checkpoint")
    if spec and not any(params["weight"] > 0 for params in spec.values()):
        raise UserError(f"every loss term in config key 'loss' has weight 0: nothing would be learned; give one a "
                        f"weight > 0 (terms: {', '.join(spec)})")


def make_term(name: str, params: dict, student_widths: list, teacher: Optional[FrozenTeacher]) -> nn.Module:
    """One loss-term module from its config entry."""
    kwargs = {k: v for k, v in params.items() if k != "weight"}
    if name in ("feature", "at"):
        cls = FeatureTerm if name == "feature" else AttentionTerm
        return cls(student_widths, teacher.feature_widths, **kwargs)
    return {"ce": CETerm, "kd": KDTerm, "dkd": DKDTerm}[name](**kwargs)


class DistillationCriterion(Criterion):
    """The loop's criterion built from a `loss` mapping: named terms, some of which see the frozen teacher."""

    def __init__(self, spec: dict, student_widths: list, teacher: Optional[FrozenTeacher] = None) -> None:
        check_spec(spec, teacher is not None)
        terms = {}
        for name, params in spec.items():
            try:
                terms[name] = make_term(name, params, student_widths, teacher)
            except (TypeError, ValueError) as e:
                raise UserError(f"loss term '{name}': {e}") from None
        super().__init__(terms, {name: params["weight"] for name, params in spec.items()}, teacher)
