"""Python API: distill your own nn.Modules with your own data loaders, through the same training loop.

    result = distill(teacher, student, train_loader, {"val": val_loader},
                     loss_weights={"ce": 0.5, "kd": 0.5}, epochs=10, checkpoint_dir="runs/kd")

Models may return plain logits (or a Hugging Face output with `.logits`, or `(logits, features)`);
intermediate features for feature losses then come from forward hooks on the named modules.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn as nn

from pruning_lab.config import make_config
from pruning_lab.models.registry import MODELS
from pruning_lab.runtime import resolve_device
from pruning_lab.train.loop import RunParts
from pruning_lab.train.terms import TERMS

from .runs import run_training
from .teacher import FrozenTeacher


def registered_arch(module: nn.Module) -> Optional[dict]:
    """The record of a model made by the project's registry (create_model), so that its checkpoints rebuild it as
    itself; None for the user's own modules."""
    arch = getattr(module, "arch", None)
    return dict(arch) if isinstance(arch, dict) and arch.get("name") in MODELS else None


class HookedModel(nn.Module):
    """Makes any module return (logits, features), the features captured by hooks on named submodules."""

    def __init__(self, module: nn.Module, feature_layers: Sequence[str] = ()) -> None:
        super().__init__()
        self.module = module
        self.feature_layers = list(feature_layers)
        self.feature_widths: list[int] = []
        self._captured: dict[str, torch.Tensor] = {}
        for name in self.feature_layers:
            module.get_submodule(name).register_forward_hook(self._capture(name))
        self.arch = registered_arch(module) or {"name": f"custom:{type(module).__name__}", "num_classes": None,
                                                "in_chans": None, "image_size": None, "kwargs": {}}

    def _capture(self, name: str) -> Callable:
        def hook(mod: nn.Module, inputs: tuple, output) -> None:
            self._captured[name] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self._captured = {}
        out = self.module(x)
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], (list, tuple)):
            return out[0], list(out[1])
        logits = getattr(out, "logits", out)
        return logits, [self._captured[name] for name in self.feature_layers]

    # Checkpoints hold the user's module's own weights (no "module." prefix), as a CLI checkpoint does.
    def state_dict(self, *args, **kwargs) -> dict:
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False):
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    @torch.no_grad()
    def infer_feature_widths(self, x: torch.Tensor) -> list[int]:
        """Channel widths of the features, from one forward pass (channels: dim 1 of maps, last dim of tokens)."""
        was_training = self.training
        self.eval()
        _, features = self(x)
        self.train(was_training)
        self.feature_widths = [f.shape[-1] if f.ndim == 3 else f.shape[1] for f in features]
        return self.feature_widths


class DeviceLoader:
    """Adapts any iterable of (inputs, labels) batches to the loop: moves them to the device, restarts mid-epoch."""

    def __init__(self, loader: Iterable, device: torch.device) -> None:
        self.loader, self.device = loader, device
        # A DataLoader shuffled with its own generator: each epoch's order is drawn from (its seed, epoch),
        # so that a resumed epoch sees the same order as the interrupted one did.
        self.generator = getattr(loader, "generator", None)
        self.base_seed = self.generator.initial_seed() if self.generator is not None else None

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int = 0, start_step: int = 0):
        """One pass; a resumed epoch skips the batches already trained on. Exact for unshuffled loaders, loaders
        shuffled with a seeded generator, and samplers with set_epoch (e.g. DistributedSampler)."""
        if self.generator is not None:
            self.generator.manual_seed(self.base_seed + epoch)
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        for step, (x, y) in enumerate(self.loader):
            if step >= start_step:
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def __iter__(self):
        return self.epoch(0)


def loss_spec(weights: dict, shared: dict) -> dict:
    """The config's `loss` from the API's weights: each term gets the shared parameters it takes."""
    spec = {}
    for term, value in weights.items():
        params = dict(value) if isinstance(value, dict) else {"weight": float(value)}
        takes = TERMS[term].parameters if term in TERMS else ()  # an unknown term is refused by the config check
        spec[term] = {**{k: v for k, v in shared.items() if k in takes}, **params}
    return spec


def distill(teacher: Optional[nn.Module], student: nn.Module, train_loader: Iterable, val_loaders: dict[str, Iterable], *,
            eval_fn: Optional[Callable[[nn.Module], dict]] = None, loss_weights: Optional[dict] = None,
            temperature: float = 4.0, feature_kind: str = "mse",
            student_layers: Sequence[str] = (), teacher_layers: Sequence[str] = (),
            optimizer: str = "sgd", lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 5e-4,
            scheduler: str = "cosine", warmup_epochs: float = 0.0, epochs: int = 10, precision: str = "auto",
            device: str = "auto", checkpoint_dir: str = "models_saved", name: str = "student",
            resume: bool = False, overwrite: bool = False, progress: bool = True, seed: int = 0) -> dict:
    """Distill `teacher` into `student` (teacher None: plain training); returns the summary and history.

    loss_weights: weights by registered term name (ce, kd, dkd, feature, at, ...: `term_list()`), each a
    number or a mapping of the term's parameters with its weight, e.g. {"dkd": {"weight": 1, "beta": 8}};
    `temperature` and `feature_kind` go to the terms that take them; feature terms need
    student_layers/teacher_layers. Default {"ce": 0.5, "kd": 0.5}. val_loaders: named loaders
    evaluated every epoch; the first one's accuracy picks the best checkpoint. eval_fn(student) may
    return more named metrics per epoch. Checkpoints: checkpoint_dir/NAME.pth (best) and NAME_last.pth;
    existing ones are continued with resume=True, replaced with overwrite=True, else refused.
    """
    torch.manual_seed(seed)
    dev = resolve_device(device)
    weights = loss_weights or {"ce": 0.5, "kd": 0.5}
    spec = loss_spec(weights, {"temperature": temperature, "kind": feature_kind})
    cfg = make_config({"name": name, "out_dir": checkpoint_dir, "epochs": epochs, "optimizer": optimizer, "lr": lr,
                       "momentum": momentum, "weight_decay": weight_decay, "scheduler": scheduler,
                       "warmup_epochs": float(warmup_epochs), "precision": precision, "device": str(dev.type),
                       "resume": resume, "overwrite": overwrite, "progress": progress, "seed": seed, "dataset": "custom",
                       "model": (registered_arch(student) or {}).get("name", f"custom:{type(student).__name__}"),
                       "model_args": (registered_arch(student) or {}).get("kwargs", {}), "role": "student",
                       "loss": spec}, "distill()")
    sample = next(iter(DeviceLoader(train_loader, dev)))[0]
    s_model = HookedModel(student, student_layers).to(dev)
    s_model.infer_feature_widths(sample)
    frozen = None
    if teacher is not None:
        # A copy: freezing it, its precision, its device and the hooks must not change the caller's module.
        t_model = HookedModel(copy.deepcopy(teacher), teacher_layers).to(dev)
        t_model.infer_feature_widths(sample)
        frozen = FrozenTeacher(t_model, dev)
    parts = RunParts(s_model, DeviceLoader(train_loader, dev),
                     {k: DeviceLoader(v, dev) for k, v in val_loaders.items()}, None, {"dataset": "custom"}, dev)
    return run_training(cfg, parts, frozen, (lambda model: eval_fn(student)) if eval_fn else None)
