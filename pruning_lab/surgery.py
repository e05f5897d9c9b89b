"""Layer surgery recorded in checkpoints, and its replay on a freshly built model.

Each step of a checkpoint's `surgery` list is plain data with a `kind`. Each kind is registered by a
replay function beside the code that does the surgery, as timm registers models:

    @register_surgery("sparse")
    def replay_sparse(model, step): keep_zeros(model, step["weights"])

The kinds: `clos`, `lowrank`, `monarch` (a linear layer replaced by a structured one: clos/structures.py),
`prune` and `sparse` (structured and unstructured pruning: prune/record.py), `keep_layers` (a
transformer thinned to some of its layers, a DistilBERT-style student: models/thin.py) and `bottleneck`
(the classifier replaced by a key-value bottleneck: models/bottleneck.py). checkpoint.py imports those
modules, so every kind is registered wherever a checkpoint is read. Replaying the list before loading
the weights rebuilds the model that was saved.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from .errors import UserError

Replay = Callable[[nn.Module, dict], None]
SURGERIES: dict[str, Replay] = {}


def register_surgery(kind: str) -> Callable[[Replay], Replay]:
    """Decorator: `fn(model, step)` replays a recorded step of this kind on a freshly built model."""
    def register(fn: Replay) -> Replay:
        if kind in SURGERIES and SURGERIES[kind] is not fn:
            raise ValueError(f"layer surgery '{kind}' is registered twice")
        SURGERIES[kind] = fn
        return fn
    return register


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_surgery(model: nn.Module, surgery: list[dict]) -> nn.Module:
    """Replay recorded surgery on a freshly built model (before its weights are loaded)."""
    for number, step in enumerate(surgery, 1):
        kind = step.get("kind")
        if kind not in SURGERIES:
            raise UserError(f"unknown layer surgery {kind!r} recorded in the checkpoint; this version knows "
                            f"{', '.join(sorted(SURGERIES))}")
        try:
            SURGERIES[kind](model, step)
        except UserError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
            what = f"lacks the field {e}" if isinstance(e, KeyError) else f"is malformed ({type(e).__name__}: {e})"
            raise UserError(f"the checkpoint's layer surgery step {number} ({kind}) {what}: the file was damaged or "
                            "edited; use the checkpoint the command wrote") from None
    model.surgery = list(surgery)
    return model


def record_surgery(model: nn.Module, step: dict) -> None:
    """Append a step to the surgery the model's checkpoints will record."""
    model.surgery = [*getattr(model, "surgery", []), step]


def sparse_weights(model: nn.Module) -> list[str]:
    """Names of the weights that unstructured pruning made sparse (stored packed in checkpoints)."""
    return [name for step in getattr(model, "surgery", []) if step.get("kind") == "sparse" for name in step["weights"]]
