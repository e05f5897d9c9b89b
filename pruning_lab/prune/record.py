"""What pruning changed, as plain data a checkpoint can hold, and how to replay it.

Structured pruning changes the shapes of some modules: the record names each changed module with its
shape attributes (in/out channels or features, norm widths, attention heads) and the shapes of its
tensors, so that loading builds the original architecture, resizes those modules, then loads the
weights. Unstructured pruning keeps the shapes: the zeros are stored packed (a bit mask and the
non-zero values), and a gradient hook keeps them zero while the model is fine-tuned.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn as nn

from ..errors import UserError
from ..surgery import register_surgery

# Attributes that define a module's width, as torch, timm and our models name them.
SHAPE_ATTRS = ("in_channels", "out_channels", "in_features", "out_features", "num_features", "normalized_shape",
               "num_heads", "head_dim", "attn_dim", "num_attention_heads", "attention_head_size", "all_head_size",
               "feature_widths")


def module_shapes(module: nn.Module) -> dict:
    """The module's own shape attributes and the shapes of its own tensors (not its children's)."""
    attrs = {}
    for attr in SHAPE_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, (int, tuple, list)) and not isinstance(value, bool):
            attrs[attr] = list(value) if isinstance(value, (tuple, list)) else value
    tensors = itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))
    return {"attrs": attrs, "shapes": {name: list(t.shape) for name, t in tensors if t is not None}}


def shape_changes(model: nn.Module, original: nn.Module) -> dict[str, dict]:
    """Every module of `model` whose shapes differ from the same module of `original`, with its new shapes."""
    before = dict(original.named_modules())
    return {name: now for name, module in model.named_modules()
            if (now := module_shapes(module)) != module_shapes(before[name])}


@register_surgery("prune")
def replay_prune(model: nn.Module, step: dict) -> None:
    """Give a freshly built model the widths structured pruning left (the weights are loaded after)."""
    resize_modules(model, step["modules"])


@register_surgery("sparse")
def replay_sparse(model: nn.Module, step: dict) -> None:
    """Keep the zeros of the weights unstructured pruning made sparse."""
    keep_zeros(model, step["weights"])


def resize_modules(model: nn.Module, changes: dict[str, dict]) -> None:
    """Give the named modules their recorded attributes and empty tensors of the recorded shapes
    (load_state_dict fills them)."""
    for name, record in changes.items():
        try:
            module = model.get_submodule(name) if name else model
        except AttributeError:
            raise UserError(f"the checkpoint's pruning record names a layer '{name}' that the model does not have") from None
        for attr, value in record["attrs"].items():
            setattr(module, attr, tuple(value) if attr == "normalized_shape" else value)
        for tensor_name, shape in record["shapes"].items():
            old = getattr(module, tensor_name)
            new = torch.empty(shape, dtype=old.dtype, device=old.device)
            if isinstance(old, nn.Parameter):
                module._parameters[tensor_name] = nn.Parameter(new, requires_grad=old.requires_grad)
            else:
                module._buffers[tensor_name] = new


def keep_zeros(model: nn.Module, names: list[str]) -> None:
    """Make the named weights keep their zeros through training: their gradient is zero where they are.

    With SGD (momentum, weight decay), Adam and AdamW a weight that is zero and gets no gradient stays
    exactly zero, so the sparsity pattern is the weights themselves: nothing else to store."""
    params = dict(model.named_parameters())
    for name in names:
        if name not in params:
            raise UserError(f"the checkpoint's sparsity record names a weight '{name}' that the model does not have")
        p = params[name]
        p.register_hook(lambda grad, p=p: grad * (p != 0))


def pack_sparse(state: dict[str, torch.Tensor], names: list[str]) -> tuple[dict, dict]:
    """(dense state without `names`, {name: bit mask + non-zero values}) -- a smaller file for sparse weights."""
    packed = {}
    for name in (n for n in names if n in state):  # a later surgery (Clos) may have replaced the layer
        t = state[name].detach().cpu()
        mask = t != 0
        packed[name] = {"shape": list(t.shape), "mask": torch.from_numpy(np.packbits(mask.flatten().numpy())),
                        "values": t[mask].clone()}
    return {k: v for k, v in state.items() if k not in packed}, packed


def unpack_sparse(packed: dict[str, dict]) -> dict[str, torch.Tensor]:
    """The dense tensors of `pack_sparse`'s second result."""
    state = {}
    for name, p in packed.items():
        n = int(np.prod(p["shape"]))
        mask = torch.from_numpy(np.unpackbits(p["mask"].numpy(), count=n).astype(bool)).reshape(p["shape"])
        t = torch.zeros(p["shape"], dtype=p["values"].dtype)
        t[mask] = p["values"]
        state[name] = t
    return state
