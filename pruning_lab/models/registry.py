"""A plain dict of model constructors, filled by a decorator (as timm does)."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from ..errors import UserError

MODELS: dict[str, Callable[..., nn.Module]] = {}
FAMILIES: dict[str, str] = {}  # model name -> the report family its runs belong to by default


def register_model(family: str) -> Callable:
    """Decorator: register `fn(num_classes, in_chans, image_size, **kwargs)` under its name, in `family`."""
    def register(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[fn.__name__] = fn
        FAMILIES[fn.__name__] = family
        return fn
    return register


def model_family(name: str) -> str:
    """The default report family of a model (custom modules of the Python API: 'custom')."""
    return FAMILIES.get(name, "custom")


def create_model(name: str, num_classes: int = 10, in_chans: int = 3, image_size: int = 32, **kwargs) -> nn.Module:
    """Build a registered model adapted to the dataset's classes, channels and image size."""
    if name not in MODELS:
        raise UserError(f"unknown model '{name}'; registered models: {', '.join(sorted(MODELS))}")
    rates = {k: v for k, v in kwargs.items() if "drop" in k or k.endswith("_prob")}  # timm's and BERT's dropouts
    bad = next((k for k, v in rates.items() if not (isinstance(v, (int, float)) and 0 <= v < 1)), None)
    if bad is not None:
        raise UserError(f"bad model_args for '{name}': {bad} is a probability and must be in [0, 1), got {rates[bad]!r}")
    try:
        model = MODELS[name](num_classes=num_classes, in_chans=in_chans, image_size=image_size, **kwargs)
    except (TypeError, ValueError, IndexError, KeyError, ZeroDivisionError, RuntimeError, AssertionError) as e:
        raise UserError(f"bad model_args for '{name}' {kwargs}: {type(e).__name__}: {e}") from None
    empty = [n for n, p in model.named_parameters() if p.numel() == 0]
    if empty:
        raise UserError(f"bad model_args for '{name}' {kwargs}: they give {empty[0]} no weights (a width of 0)")
    # Recorded so that a checkpoint can rebuild exactly this model.
    model.arch = {"name": name, "num_classes": num_classes, "in_chans": in_chans,
                  "image_size": getattr(model, "image_size", image_size),
                  "kwargs": dict(getattr(model, "rebuild_kwargs", kwargs))}
    return model
