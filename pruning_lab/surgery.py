"""Layer surgery recorded in checkpoints, and its replay on a freshly built model.

Each step of a checkpoint's `surgery` list is plain data: `clos`, `lowrank` or `monarch` (a linear
layer replaced by a Clos, low-rank or Monarch layer), `prune` (modules made narrower by structured pruning) or `sparse` (weights with zeros that
stay zero) or `keep_layers` (a transformer's layers thinned to some of them: a DistilBERT-style
student) or `bottleneck` (the classifier replaced by a discrete key-value bottleneck). Replaying the list before loading the weights rebuilds the model that was saved.
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
    from .clos.peers import LowRank, Monarch
    from .models.bottleneck import KeyValueBottleneck, freeze_encoder
    from .prune.record import keep_zeros, resize_modules

    STRUCTURED_LAYERS = {"clos": Clos, "lowrank": LowRank, "monarch": Monarch}
    for step in surgery:
        kind = step.get("kind")
        if kind in STRUCTURED_LAYERS:
            replace_module(model, step["layer"], STRUCTURED_LAYERS[kind](**step["config"]))
        elif kind == "prune":
            resize_modules(model, step["modules"])
        elif kind == "sparse":
            keep_zeros(model, step["weights"])
        elif kind == "keep_layers":
            keep_layers(model, step["layers"])
        elif kind == "bottleneck":
            replace_module(model, step["layer"], KeyValueBottleneck(**step["config"]))
            freeze_encoder(model)
        else:
            raise UserError(f"unknown layer surgery {kind!r} recorded in the checkpoint")
    model.surgery = list(surgery)
    return model


def layer_stack(model: nn.Module) -> tuple[nn.Module, str]:
    """(parent, attribute) of a transformer's stack of layers: a BERT's encoder layers, a ViT's blocks."""
    from .models.bert import BertClassifier
    from .models.vit import ViT

    if isinstance(model, BertClassifier):
        return model.hf.bert.encoder, "layer"
    if isinstance(model, ViT):
        return model.vit, "blocks"
    raise UserError(f"keep_layers thins the layers of a BERT or a ViT; a {type(model).__name__} has no such stack")


def keep_layers(model: nn.Module, layers: list[int]) -> nn.Module:
    """Keep only the listed layers (0-based, increasing) of a transformer, with their weights, in place."""
    from .models.vit import ViT, feature_blocks

    parent, attribute = layer_stack(model)
    stack = getattr(parent, attribute)
    if not layers or layers != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= len(stack):
        raise UserError(f"keep_layers must be increasing indices of the model's {len(stack)} layers "
                        f"(0 to {len(stack) - 1}); got {layers}")
    kept = [stack[i] for i in layers]
    setattr(parent, attribute, nn.ModuleList(kept) if isinstance(stack, nn.ModuleList) else nn.Sequential(*kept))
    if isinstance(model, ViT):
        model.feature_blocks = feature_blocks(len(layers))
        model.feature_widths = [model.vit.embed_dim] * len(model.feature_blocks)
    else:
        model.hf.config.num_hidden_layers = len(layers)
    model.surgery = [*getattr(model, "surgery", []), {"kind": "keep_layers", "layers": list(layers)}]
    return model


def sparse_weights(model: nn.Module) -> list[str]:
    """Names of the weights that unstructured pruning made sparse (stored packed in checkpoints)."""
    return [name for step in getattr(model, "surgery", []) if step.get("kind") == "sparse" for name in step["weights"]]
