"""Thinning a transformer to some of its layers, with their weights: a DistilBERT-style student."""
from __future__ import annotations

import torch.nn as nn

from ..errors import UserError
from ..surgery import record_surgery, register_surgery
from .bert import BertClassifier, DistilBertClassifier
from .vit import ViT, feature_blocks


def layer_stack(model: nn.Module) -> tuple[nn.Module, str]:
    """(parent, attribute) of a transformer's stack of layers: a BERT's encoder layers, a ViT's blocks."""
    if isinstance(model, BertClassifier):
        return model.hf.bert.encoder, "layer"
    if isinstance(model, DistilBertClassifier):
        return model.hf.distilbert.transformer, "layer"
    if isinstance(model, ViT):
        return model.vit, "blocks"
    raise UserError(f"keep_layers thins the layers of a BERT, a DistilBERT or a ViT; a {type(model).__name__} has no such stack")


def keep_layers(model: nn.Module, layers: list[int]) -> nn.Module:
    """Keep only the listed layers (0-based, increasing) of a transformer, with their weights, in place."""
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
    elif isinstance(model, DistilBertClassifier):
        model.hf.config.n_layers = len(layers)
    else:
        model.hf.config.num_hidden_layers = len(layers)
    record_surgery(model, {"kind": "keep_layers", "layers": list(layers)})
    return model


@register_surgery("keep_layers")
def replay_keep_layers(model: nn.Module, step: dict) -> None:
    """Thin a freshly built transformer as the recorded run did."""
    keep_layers(model, step["layers"])
