"""clos-convert: replace a trained model's linear layers by Clos layers fitted to them, then
optionally fine-tune the converted model with knowledge distillation from the original."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from pruning_lab.clos import Clos
from pruning_lab.clos.fit import fit_clos, fit_to_dense
from pruning_lab.clos.surgery import matching_linears, replace_module
from pruning_lab.config import from_dict
from pruning_lab.data import BatchLoader, load_splits
from pruning_lab.inference import count_parameters, evaluate
from pruning_lab.models.bert import PAD_ID
from pruning_lab.runtime import resolve_device
from pruning_lab.train import build_model, load_checkpoint, save_checkpoint

from .runs import run_training


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once the layer's input is seen."""


@torch.no_grad()
def capture_inputs(model: nn.Module, layer: str, loader, limit: int) -> torch.Tensor:
    """The inputs that `layer` receives on up to `limit` examples, flattened to [rows, in_features].

    For text, the rows of padding tokens are left out: they are not part of any sentence."""
    rows: list[torch.Tensor] = []
    batch: dict[str, torch.Tensor] = {}

    def keep(module, inputs) -> None:
        h, x = inputs[0], batch["x"]
        if x.dtype == torch.long and h.shape[:2] == x.shape:  # token ids [B, L] -> activations [B, L, H]
            h = h[x != PAD_ID]
        rows.append(h.reshape(-1, h.shape[-1]).float())
        raise _Captured  # the rest of the forward pass is not needed

    hook = model.get_submodule(layer).register_forward_pre_hook(keep)
    seen = 0
    model.eval()
    try:
        for x, _ in loader:
            batch["x"] = x
            try:
                model(x)
            except _Captured:
                pass
            seen += len(x)
            if seen >= limit:
                break
    finally:
        hook.remove()
    return torch.cat(rows)


@torch.no_grad()
def layer_examples(model: nn.Module, original: Optional[nn.Module], layer: str, loader,
                   limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) to fit a replacement of `layer`: the inputs it receives in `model` (whose
    earlier layers may already be converted) and, as targets, the original model's outputs of that
    layer on the same examples, so that the fit also undoes the error of the layers converted before
    it. With `original=None` the targets are the layer's own outputs on those inputs."""
    x = capture_inputs(model, layer, loader, limit)
    source = x if original is None else capture_inputs(original, layer, loader, limit)
    dense = (model if original is None else original).get_submodule(layer)
    return x, dense(source)


@torch.no_grad()
def embedding_cosine(model: nn.Module, original: nn.Module, loader) -> float:
    """Mean cosine similarity of the two models' sentence embeddings over `loader` (text models)."""
    model.eval()
    original.eval()
    sims = [F.cosine_similarity(model.sentence_embedding(x), original.sentence_embedding(x), dim=1)
            for x, _ in loader]
    return float(torch.cat(sims).mean())


def convert_layer(model: nn.Module, name: str, multiplier: int, fit: str, calibration, held_out,
                  fit_steps: int, als_iterations: int) -> dict:
    """Fit a Clos layer to one linear layer (weight-space, then data-aware) and put it in its place.

    `calibration(name)` and `held_out(name)` give (inputs, targets) of the layer (`layer_examples`)."""
    dense = model.get_submodule(name)
    clos = Clos(dense.in_features, dense.out_features, multiplier).to(dense.weight.device)
    result = {"layer": name, "dense_parameters": count_parameters(dense), "clos_parameters": count_parameters(clos)}
    result["weight_space"] = fit_to_dense(clos, dense, als_iterations)
    if fit == "data":
        (x, y), (x_val, y_val) = calibration(name), held_out(name)
        result["data_aware"] = fit_clos(clos, x, y, steps=fit_steps, x_val=x_val, y_val=y_val)
    replace_module(model, name, clos)
    model.surgery = [*getattr(model, "surgery", []), {"kind": "clos", "layer": name, "config": clos.config()}]
    return result


def clos_convert(checkpoint: str, layers: str, multiplier: int = 4, fit: str = "data", fit_steps: int = 1000,
                 als_iterations: int = 50, calibration_images: int = 4096, finetune_epochs: int = 0,
                 output: Optional[str] = None, device: str = "auto", finetune_lr: float = 1e-3) -> dict:
    """Convert, evaluate, save (recording the surgery); optionally KD fine-tune; return the summary."""
    device = str(resolve_device(device))
    ckpt = load_checkpoint(checkpoint)
    cfg = from_dict(ckpt["config"], checkpoint)
    model = build_model(ckpt, source=checkpoint).to(device)
    spec, train, val, test = load_splits(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.train_subset, cfg.image_size)
    size = model.arch["image_size"]
    loader = lambda split: BatchLoader(split, spec, 256, device, image_size=size)  # noqa: E731
    test_acc = lambda: evaluate(model, loader(test))["acc"]  # noqa: E731
    summary = {"checkpoint": checkpoint, "multiplier": multiplier, "fit": fit,
               "parameters_before": count_parameters(model), "test_accuracy_before": test_acc(), "layers": []}
    original = build_model(ckpt, source=checkpoint).to(device).eval()
    for name in matching_linears(model, layers):  # layer by layer: later layers see converted inputs
        summary["layers"].append(convert_layer(
            model, name, multiplier, fit, lambda n: layer_examples(model, original, n, loader(train), calibration_images),
            lambda n: layer_examples(model, original, n, loader(val), calibration_images), fit_steps, als_iterations))
    summary.update(parameters_after=count_parameters(model), test_accuracy_after=test_acc())
    summary["compression"] = summary["parameters_before"] / summary["parameters_after"]
    if hasattr(model, "sentence_embedding"):  # text: how close the converted encoder stays to the original
        summary["embedding_cosine_after"] = embedding_cosine(model, original, loader(test))
    out = Path(output or Path(checkpoint).with_name(Path(checkpoint).stem + f"_clos_m{multiplier}.pth"))
    save_checkpoint({**{k: v for k, v in ckpt.items() if k not in ("format", "version", "test", "alignment")},
                     "state_dict": model.state_dict(), "surgery": model.surgery, "clos": summary}, out)
    summary["output"] = str(out)
    if finetune_epochs:
        tuned = dataclasses.replace(cfg, init_checkpoint=str(out), teacher_checkpoint=checkpoint, teacher=cfg.model,
                                    name=out.stem + "_kd", out_dir=str(out.parent), epochs=finetune_epochs,
                                    optimizer="adam", lr=finetune_lr, scheduler="cosine", warmup_epochs=0.0,
                                    loss={}, alpha=0.5, temperature=4.0, resume=False, device=device)
        result = run_training(tuned, distilling=True)
        summary.update(finetuned_output=result["checkpoint"], test_accuracy_finetuned=result["test_acc"])
        if "embedding_cosine_after" in summary:
            tuned_model = build_model(load_checkpoint(result["checkpoint"]), source=result["checkpoint"]).to(device)
            summary["embedding_cosine_finetuned"] = embedding_cosine(tuned_model, original, loader(test))
    return summary
