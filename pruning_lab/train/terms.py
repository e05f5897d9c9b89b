"""The loss-term registry: each term class registers itself under the name a config's `loss` uses.

As timm registers models, a decorator beside each implementation fills a plain dict:

    @register_term("kd", needs_teacher=True)
    class KDTerm(nn.Module):
        def __init__(self, temperature: float = 4.0) -> None: ...
        def forward(self, s_logits, s_feats, t_logits, t_feats, labels): ...

A term's parameters are its constructor's keyword arguments (besides `student_widths` and
`teacher_widths`, which a feature term receives from the models); `weight` is every term's. The
cross-entropy is registered in criterion.py; the distillation terms in distillation_lab/methods/.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch.nn as nn

from ..errors import UserError

WIDTH_ARGUMENTS = ("student_widths", "teacher_widths")  # given by the models, never by a config

# What the numbers of a loss term may be, by parameter name (a term may add its own when registering).
PARAMETER_RANGES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "weight": (">= 0", lambda v: v >= 0), "temperature": ("> 0", lambda v: v > 0),
    "label_smoothing": ("in [0, 1)", lambda v: 0 <= v < 1),
}


@dataclass(frozen=True)
class TermSpec:
    """A registered loss term: its module class, the parameters a config may give it, whether it sees a teacher."""

    name: str
    cls: type
    parameters: tuple[str, ...]
    needs_teacher: bool
    ranges: dict

    def summary(self) -> str:
        """One line for --help: name (parameters; teacher)."""
        what = [", ".join(self.parameters)] if self.parameters else []
        return f"{self.name} ({'; '.join(what + (['teacher'] if self.needs_teacher else []))})" \
            if what or self.needs_teacher else self.name


TERMS: dict[str, TermSpec] = {}


def register_term(name: str, needs_teacher: bool = False,
                  ranges: Optional[dict[str, tuple[str, Callable[[Any], bool]]]] = None) -> Callable[[type], type]:
    """Decorator: register an nn.Module class as loss term `name` (called as term(s_logits, s_feats,
    t_logits, t_feats, labels)); `ranges` adds allowed values of its own parameters."""
    def register(cls: type) -> type:
        if name in TERMS and TERMS[name].cls is not cls:
            raise ValueError(f"loss term '{name}' is registered twice ({TERMS[name].cls.__name__}, {cls.__name__})")
        signature = inspect.signature(cls.__init__)
        parameters = tuple(p for p in list(signature.parameters)[1:] if p not in WIDTH_ARGUMENTS)
        TERMS[name] = TermSpec(name, cls, parameters, needs_teacher, dict(ranges or {}))
        return cls
    return register


def term_list() -> str:
    """The registered terms with their parameters, for --help and errors."""
    return ", ".join(spec.summary() for spec in TERMS.values())


def check_term_value(spec: TermSpec, key: str, value: Any) -> None:
    """A number outside the parameter's range, or a switch that is not true/false, is an error naming the term and
    what is allowed."""
    default = inspect.signature(spec.cls.__init__).parameters.get(key)
    if default is not None and isinstance(default.default, bool) and not isinstance(value, bool):
        raise UserError(f"loss term '{spec.name}': {key} must be true or false, got {value!r}")
    allowed = spec.ranges.get(key) or PARAMETER_RANGES.get(key)
    if allowed is None:
        return
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and allowed[1](value)):
        raise UserError(f"loss term '{spec.name}': {key} must be {allowed[0]}, got {value!r}")


def check_loss_spec(spec: dict, distilling: bool) -> None:
    """Unknown terms or parameters, missing weights, bad values and teacher terms without a teacher are errors."""
    for name, params in spec.items():
        if name not in TERMS:
            raise UserError(f"unknown loss term '{name}' in config key 'loss'; registered terms: {term_list()}")
        term = TERMS[name]
        if not isinstance(params, dict) or not isinstance(params.get("weight"), (int, float)):
            raise UserError(f"loss term '{name}' needs a numeric weight, e.g. {{{name}: {{weight: 0.5}}}}")
        extra = set(params) - {"weight", *term.parameters}
        if extra:
            raise UserError(f"loss term '{name}' has unknown parameter(s) {', '.join(sorted(extra))}; "
                            f"allowed: weight{''.join(', ' + a for a in term.parameters)}")
        for key, value in params.items():
            check_term_value(term, key, value)
        if term.needs_teacher and not distilling:
            raise UserError(f"loss term '{name}' needs a teacher: use the distill command with --teacher-checkpoint")
    if spec and not any(params["weight"] > 0 for params in spec.values()):
        raise UserError(f"every loss term in config key 'loss' has weight 0: nothing would be learned; give one a "
                        f"weight > 0 (terms: {', '.join(spec)})")


def build_term(name: str, params: dict, student_widths: Sequence[int] = (),
               teacher_widths: Sequence[int] = ()) -> nn.Module:
    """The module of one `loss` entry (its weight left out); feature terms get the models' widths."""
    spec = TERMS[name]
    kwargs = {k: v for k, v in params.items() if k != "weight"}
    wants = inspect.signature(spec.cls.__init__).parameters
    widths = {"student_widths": list(student_widths), "teacher_widths": list(teacher_widths)}
    kwargs.update({k: v for k, v in widths.items() if k in wants})
    return spec.cls(**kwargs)
