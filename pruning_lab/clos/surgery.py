"""Layer surgery recorded in checkpoints: replace named nn.Linear layers by Clos layers, and replay it."""
from __future__ import annotations

import fnmatch

import torch.nn as nn

from ..errors import UserError
from .layer import Clos


def matching_linears(model: nn.Module, pattern: str) -> list[str]:
    """Names of the nn.Linear layers matching a glob pattern (comma-separated alternatives allowed)."""
    patterns = [p.strip() for p in pattern.split(",") if p.strip()]
    names = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    if not names:
        linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise UserError(f"no linear layer matches '{pattern}'; the model's linear layers: {', '.join(linears)}")
    return names


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_surgery(model: nn.Module, surgery: list[dict]) -> nn.Module:
    """Replay recorded surgery on a freshly built model (before its weights are loaded)."""
    for step in surgery:
        if step.get("kind") != "clos":
            raise UserError(f"unknown layer surgery {step.get('kind')!r} recorded in the checkpoint")
        replace_module(model, step["layer"], Clos(**step["config"]))
    model.surgery = list(surgery)
    return model
