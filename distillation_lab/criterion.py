"""The run's loss: a weighted sum of named terms from the config, seeing the teacher when there is one."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional


from pruning_lab.config import LOSS_SHORTHANDS, Config
from pruning_lab.errors import UserError, given_twice
from pruning_lab.train.criterion import Criterion
from pruning_lab.train.terms import TERMS, build_term, check_loss_spec

from .teacher import FrozenTeacher


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
    check_loss_spec(spec, distilling)
    check_extra_teachers(cfg, spec)
    return dataclasses.replace(cfg, loss=spec, **{k: None for k in LOSS_SHORTHANDS})


def check_extra_teachers(cfg: Config, spec: dict) -> None:
    """Several teachers: each checkpoint once, and a loss term that sees them (else they would be loaded for nothing)."""
    if not cfg.extra_teachers:
        return
    if not any(TERMS[name].needs_teacher for name in spec if name in TERMS):
        raise UserError(f"--extra-teachers {' '.join(cfg.extra_teachers)}: no term of the loss ({', '.join(spec)}) sees "
                        "a teacher; add one (e.g. kd) or leave the teachers out")
    paths = [cfg.teacher_checkpoint, *cfg.extra_teachers]
    twice = given_twice((p for p in paths if p), key=lambda p: Path(p).resolve())
    if twice is not None:
        where = "in --extra-teachers" if cfg.extra_teachers.count(twice) > 1 else "(--teacher-checkpoint, --extra-teachers)"
        raise UserError(f"teacher checkpoint {twice} is given twice {where}: each teacher once")


CLASS_TERMS = ("dkd", "dist")  # terms defined over the classes: nothing to compare with one output


def check_regression_loss(spec: dict) -> None:
    """Refuse, in one line, a loss that needs classes on a regression (one output, e.g. glue-stsb)."""
    for name, params in spec.items():
        if name in CLASS_TERMS or (name == "kd" and params.get("standardize")) or params.get("label_smoothing"):
            what = f"term '{name}'" + (" with standardize" if params.get("standardize") else "") + \
                (" with label_smoothing" if params.get("label_smoothing") else "")
            raise UserError(f"loss {what} needs classes, but the dataset is a regression (one score per example): "
                            "use ce (the squared error), kd (the squared error to the teacher's score) and the "
                            "feature terms")


class DistillationCriterion(Criterion):
    """The loop's criterion built from a `loss` mapping: named terms, some of which see the frozen teacher."""

    def __init__(self, spec: dict, student_widths: list, teacher: Optional[FrozenTeacher] = None,
                 extra_teachers: tuple = ()) -> None:
        check_loss_spec(spec, teacher is not None)
        teachers = [teacher, *extra_teachers] if teacher is not None else []
        terms, weights, which = {}, {}, {}
        for name, params in spec.items():
            # With several teachers a term that sees one is made once per teacher (its own projections for
            # that teacher's widths), named kd, kd@1, ..., each at weight / the number of teachers.
            copies = range(len(teachers)) if TERMS[name].needs_teacher and len(teachers) > 1 else [0]
            for i in copies:
                key = name if i == 0 else f"{name}@{i}"
                try:
                    terms[key] = build_term(name, params, student_widths, teachers[i].feature_widths if teachers else ())
                except (TypeError, ValueError) as e:
                    raise UserError(f"loss term '{name}': {e}") from None
                weights[key], which[key] = params["weight"] / len(copies), i
        super().__init__(terms, weights, teacher, tuple(extra_teachers), which)
