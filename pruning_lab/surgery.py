"""Layer surgery recorded in checkpoints, and its replay on a freshly built model.

Each step of a checkpoint's `surgery` list is plain data: `clos` (a linear layer replaced by a Clos
layer), `prune` (modules made narrower by structured pruning) or `sparse` (weights with zeros that
stay zero). Replaying the list before loading the weights rebuilds the model that was saved.
"""
from __future__ import annotations

import torch.nn as nn

from .errors import UserError


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_surgery(model: nn.Module, surgery: list[dict]) -> nn.Module:
    """Replay recorded surgery on a freshly built model (before its weights are loaded)."""
    from .clos.layer import Clos
    from .prune.record import keep_zeros, resize_modules

    for step in surgery:
        kind = step.get("kind")
        if kind == "clos":
            replace_module(model, step["layer"], Clos(**step["config"]))
        elif kind == "prune":
            resize_modules(model, step["modules"])
        elif kind == "sparse":
            keep_zeros(model, step["weights"])
        else:
            raise UserError(f"unknown layer surgery {kind!r} recorded in the checkpoint")
    model.surgery = list(surgery)
    return model


def sparse_weights(model: nn.Module) -> list[str]:
    """Names of the weights that unstructured pruning made sparse (stored packed in checkpoints)."""
    return [name for step in getattr(model, "surgery", []) if step.get("kind") == "sparse" for name in step["weights"]]
