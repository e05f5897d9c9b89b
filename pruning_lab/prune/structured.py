"""Structured pruning: channels of the ResNets, hidden units and attention heads of the ViTs and the
BERT, hidden units of the MLP, removed for real so that the model has fewer parameters and MACs.

Torch-Pruning's dependency graph does the bookkeeping for the ResNets, ViTs and the MLP (a channel
removed from a convolution is removed from its batch norm, from the residual additions it feeds and
from every layer that reads it); for the BERT, transformers' own `prune_heads` and
`prune_linear_layer` do it. Each layer keeps the same fraction of its channels (local pruning),
rounded down to a multiple of `round_to`: unaligned channel counts are the usual reason a pruned
model is no faster on a GPU.
"""
from __future__ import annotations

import copy
import warnings
from typing import Callable, Iterable

import torch
import torch.nn as nn

from ..errors import UserError
from ..models.bert import BertClassifier
from ..models.mlp import MLP
from ..models.resnet import CifarResNet
from ..models.vit import ViT

IMPORTANCES = ("l1", "l2", "taylor", "bn-scale")
STRUCTURED_MODELS = ("the ResNets (channels), the ViTs and the BERT (MLP hidden units and attention heads) and the "
                     "MLP (hidden units)")


def prunable(model: nn.Module) -> bool:
    """Whether structured pruning knows this model's structure."""
    return isinstance(model, (CifarResNet, ViT, MLP, BertClassifier))


def check_structured(model: nn.Module, criterion: str) -> None:
    """Refuse a model structured pruning does not know, or a criterion that does not apply to it."""
    if not prunable(model):
        raise UserError(f"structured pruning knows {STRUCTURED_MODELS}; a {type(model).__name__} is none of them "
                        "(--method unstructured works on any model)")
    importance(criterion, model)


def pruner_options(model: nn.Module, ratio: float) -> dict:
    """What Torch-Pruning prunes in `model` at `ratio`: never the classifier; for a ViT only the MLP hidden
    units and whole heads (the residual width stays), for the others every channel or hidden unit."""
    if isinstance(model, CifarResNet):
        return {"pruning_ratio": ratio, "ignored_layers": [model.fc]}
    if isinstance(model, MLP):
        return {"pruning_ratio": ratio, "ignored_layers": [model.fc3]}
    if isinstance(model, ViT):
        vit = model.vit
        ratios = {block.mlp.fc1: ratio for block in vit.blocks}
        heads = vit.blocks[0].attn.num_heads
        removed = heads_removed(ratio, heads)
        # Torch-Pruning removes ceil(ratio * heads) heads: just under removed / heads gives exactly `removed`.
        head_ratio = (removed - 0.5) / heads if removed else 0.0
        if removed:
            ratios.update({block.attn.qkv: head_ratio for block in vit.blocks})
        unwrapped = [(p, 2) for p in (vit.pos_embed, vit.cls_token) if isinstance(p, nn.Parameter)]
        return {"pruning_ratio": 0.0, "pruning_ratio_dict": ratios, "ignored_layers": [vit.head],
                "num_heads": {block.attn.qkv: block.attn.num_heads for block in vit.blocks},
                "prune_num_heads": True, "prune_head_dims": False, "head_pruning_ratio": head_ratio,
                "unwrapped_parameters": unwrapped}
    check_structured(model, "l2")
    raise AssertionError("unreachable: every prunable model has options above")


def importance(name: str, model: nn.Module):
    """Torch-Pruning's importance criterion: weight magnitude (l1, l2), first-order Taylor (needs
    gradients) or the batch-norm scales of the channels (ResNets)."""
    import torch_pruning as tp

    if name == "bn-scale" and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        raise UserError(f"importance 'bn-scale' ranks channels by their batch-norm scales, and "
                        f"{type(model).__name__} has no batch norm: use l1, l2 or taylor")
    choices = {"l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
               "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
               "taylor": lambda: tp.importance.GroupTaylorImportance(),
               "bn-scale": lambda: tp.importance.BNScaleImportance()}
    if name not in choices:
        raise UserError(f"unknown importance '{name}'; choose one of {', '.join(IMPORTANCES)}")
    return choices[name]()


def heads_removed(ratio: float, heads: int) -> int:
    """Whole heads a ratio removes from a layer of `heads` heads; at least one stays."""
    return min(heads - 1, round(ratio * heads))


def kept_units(units: int, ratio: float, round_to: int) -> int:
    """Hidden units kept of `units` at `ratio`: rounded down to a multiple of round_to, at least round_to."""
    kept = int(units * (1 - ratio))
    return max(min(units, round_to), kept - kept % round_to)


def score(tensors: list[tuple[torch.Tensor, int]], criterion: str) -> torch.Tensor:
    """Importance of the slices of several weights along the given dims (magnitude, or |w * grad| for taylor)."""
    total = 0
    for w, dim in tensors:
        w2 = w.movedim(dim, 0).reshape(w.shape[dim], -1)
        if criterion == "taylor":
            g = w.grad.movedim(dim, 0).reshape(w.shape[dim], -1) if w.grad is not None else torch.zeros_like(w2)
            total = total + (w2 * g).sum(1).abs()
        else:
            total = total + w2.abs().pow(1 if criterion == "l1" else 2).sum(1)
    return total


@torch.no_grad()
def prune_bert(model: BertClassifier, ratio: float, criterion: str, round_to: int) -> None:
    """Remove whole attention heads and MLP hidden units from every layer of a BERT, with transformers'
    own tools (`prune_heads` keeps the attention's head count and sizes consistent)."""
    from transformers.pytorch_utils import prune_linear_layer

    for layer in model.hf.bert.encoder.layer:
        attention, self_attention = layer.attention, layer.attention.self
        heads, size = self_attention.num_attention_heads, self_attention.attention_head_size
        n_removed = heads_removed(ratio, heads)
        if n_removed:
            per_head = score([(self_attention.query.weight, 0), (self_attention.key.weight, 0),
                              (self_attention.value.weight, 0), (attention.output.dense.weight, 1)], criterion)
            per_head = per_head.reshape(heads, size).sum(1)
            attention.prune_heads(per_head.argsort()[:n_removed].tolist())
        up, down = layer.intermediate.dense, layer.output.dense
        keep = score([(up.weight, 0), (down.weight, 1)], criterion).argsort(descending=True)
        keep = keep[: kept_units(up.out_features, ratio, round_to)].sort().values
        layer.intermediate.dense, layer.output.dense = prune_linear_layer(up, keep, 0), prune_linear_layer(down, keep, 1)


def accumulate_gradients(model: nn.Module, batches: Iterable) -> None:
    """Gradients of the labels' loss over `batches` (for the Taylor importance): cross-entropy, or a
    regression's squared error."""
    from ..train.criterion import supervised_loss  # here: pruning_lab.train imports the checkpoint code, which imports this

    model.zero_grad()
    model.train()
    for x, y in batches:
        logits, _ = model(x)
        (supervised_loss(logits.float(), y) * len(y)).backward()  # summed over the batch, unlabelled left out
    model.eval()


def fix_attention(model: nn.Module) -> None:
    """After whole heads are removed, tell each timm attention its head count (its forward reshapes by it)."""
    for module in model.modules():
        if hasattr(module, "qkv") and hasattr(module, "num_heads") and hasattr(module, "head_dim"):
            module.num_heads = module.qkv.out_features // (3 * module.head_dim)
            if hasattr(module, "attn_dim"):  # timm >= 1.0.20
                module.attn_dim = module.num_heads * module.head_dim


@torch.no_grad()
def feature_widths(model: nn.Module, example: torch.Tensor) -> list[int]:
    """The widths of the model's feature outputs (channels of [B, C, H, W], last dim otherwise)."""
    model.eval()
    _, features = model(example)
    return [f.shape[1] if f.dim() == 4 else f.shape[-1] for f in features]


def prune_structured(model: nn.Module, ratio: float, example: torch.Tensor, criterion: str = "l2",
                     round_to: int = 8, gradients: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Remove `ratio` of every prunable layer's channels (rounded to `round_to`) in place, the least
    important by `criterion`; `gradients(model)` fills .grad first where the criterion needs them."""
    import torch_pruning as tp

    if isinstance(model, BertClassifier):
        check_structured(model, criterion)
        if criterion == "taylor":
            gradients(model)
        prune_bert(model, ratio, criterion, round_to)
        model.zero_grad(set_to_none=True)
        return model
    options = pruner_options(model, ratio)
    imp = importance(criterion, model)
    with warnings.catch_warnings():  # Torch-Pruning's notes on parameters it was told about
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(model, example, imp, round_to=round_to if round_to > 1 else None,
                                      output_transform=lambda out: out[0], **options)
        if criterion == "taylor":
            if gradients is None:
                raise UserError("importance 'taylor' needs training batches for its gradients")
            gradients(model)
        pruner.step()
    model.zero_grad(set_to_none=True)
    fix_attention(model)
    empty = [name for name, m in model.named_modules()
             if getattr(m, "out_channels", 1) == 0 or getattr(m, "out_features", 1) == 0]
    if empty:
        raise UserError(f"pruning {ratio:.0%} with channels rounded to multiples of {round_to} leaves {empty[0]} "
                        "with no channels: prune less, or round to fewer (--round-to 1)")
    model.feature_widths = feature_widths(model, example)
    return model


def ratio_for_target(model: nn.Module, size: Callable[[nn.Module], int], target: int, example: torch.Tensor,
                     round_to: int = 8, max_ratio: float = 0.97) -> float:
    """The smallest pruning ratio whose pruned model has size(model) <= target (bisection on copies;
    the widths depend on the ratio only, not on the importance criterion)."""
    sizes: dict[float, int] = {}

    def fits(ratio: float) -> bool:
        """Small enough, or too far (a layer would lose every channel): look at smaller ratios."""
        try:
            sizes[ratio] = size(prune_structured(copy.deepcopy(model), ratio, example, "l2", round_to))
        except UserError:
            return True
        return sizes[ratio] <= target

    if size(model) <= target:
        return 0.0
    low, high = 0.0, max_ratio
    fits(high)
    for _ in range(16):
        mid = (low + high) / 2
        low, high = (low, mid) if fits(mid) else (mid, high)
    if sizes.get(high, target + 1) > target:  # even the ratio found empties a layer, or is still too big
        raise UserError(f"structured pruning cannot bring this model to {target:,}: the smallest it reaches with "
                        f"channels rounded to multiples of {round_to} is {min(sizes.values(), default=size(model)):,}"
                        + (" (try --round-to 1)" if round_to > 1 else ""))
    return high
