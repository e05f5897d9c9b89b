"""The one training loop: teachers, students and distillation differ only in the criterion.

A criterion maps (logits, features, labels, images) to a dict of named, already weighted loss
terms; the loop sums them, logs each one per epoch, and trains the criterion's own parameters
(e.g. feature regressors) with the model. Checkpoints: NAME.pth is the best epoch by validation
accuracy (the test split is evaluated once, on it, at the end), NAME_last.pth holds everything
needed to resume. SIGTERM/SIGUSR1 (a SLURM time limit or preemption) save and stop cleanly.
"""
from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import Config, to_dict
from ..data import BatchLoader, load_splits
from ..errors import UserError
from ..inference.evaluate import count_parameters, evaluate
from ..models import create_model
from .checkpoint import code_revision, load_checkpoint, save_checkpoint
from .optim import build_optimizer, build_scheduler
from ..runtime import autocast, resolve_device, resolve_precision

INTERRUPTED_EXIT_CODE = 3


class CrossEntropyCriterion(nn.Module):
    """The supervised loss: {'ce': cross-entropy with optional label smoothing}."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, features: list, labels: torch.Tensor, images: torch.Tensor) -> dict:
        return {"ce": F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)}


class TrainingInterrupted(Exception):
    """Raised after a stop signal once the last checkpoint is saved; `--resume` continues."""


@dataclass
class TrainState:
    """Where a run stands: saved in the last checkpoint, restored on resume."""

    epoch: int = 0  # epochs completed
    step: int = 0  # steps completed within the current epoch
    best_val_acc: float = -1.0
    best_epoch: int = 0
    history: list = field(default_factory=list)
    sums: dict = field(default_factory=dict)  # running sums of the current epoch (device tensors)


class StopSignals:
    """Turns SIGTERM and SIGUSR1 into a flag that the loop checks between steps."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.requested: Optional[str] = None
        self._previous: dict = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


@dataclass
class RunPaths:
    """Files of one run under out_dir."""

    best: Path
    last: Path
    log: Path

    @classmethod
    def of(cls, cfg: Config) -> "RunPaths":
        out, name = Path(cfg.out_dir), cfg.run_name()
        return cls(out / f"{name}.pth", out / f"{name}_last.pth", out / f"{name}_log.csv")


class Trainer:
    """Holds the pieces of one run; `fit()` runs it."""

    def __init__(self, cfg: Config, criterion: Optional[nn.Module] = None) -> None:
        self.cfg, self.paths = cfg, RunPaths.of(cfg)
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.spec, train_split, val_split, self.test_split = load_splits(
            cfg.dataset, cfg.data_dir, cfg.val_size, cfg.train_subset, cfg.image_size)
        torch.manual_seed(cfg.seed)
        self.model = create_model(cfg.model, self.spec.num_classes, self.spec.channels, self.spec.image_size,
                                  **cfg.model_args).to(self.device)
        self.criterion = (criterion or CrossEntropyCriterion(cfg.label_smoothing)).to(self.device)
        self.channels_last = self.device.type == "cuda"
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.train_loader = self.loader(train_split, train=True)
        self.val_loader = self.loader(val_split) if len(val_split) else None
        self.optimizer = build_optimizer(cfg, [*self.model.parameters(), *self.criterion.parameters()])
        self.scheduler = build_scheduler(cfg, self.optimizer, len(self.train_loader))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.state = TrainState()

    def loader(self, split, train: bool = False) -> BatchLoader:
        """A loader over `split` on the run's device, at the model's input size."""
        return BatchLoader(split, self.spec, self.cfg.batch_size, self.device, train=train, augment=self.cfg.augment,
                           seed=self.cfg.seed, image_size=self.model.arch["image_size"],
                           channels_last=self.channels_last,
                           max_steps=self.cfg.max_steps_per_epoch if train else None)

    # ------------------------------------------------------------ checkpoints
    def payload(self, with_resume_state: bool) -> dict:
        """The checkpoint dict: weights, architecture, config, metrics (+ everything to resume)."""
        data = {"arch": self.model.arch, "state_dict": self.model.state_dict(), "role": self.cfg.role,
                "config": to_dict(self.cfg), "data": {"dataset": self.cfg.dataset, **vars(self.spec)},
                "history": self.state.history, "best_epoch": self.state.best_epoch,
                "best_val_acc": self.state.best_val_acc, "code_revision": code_revision()}
        data["data"]["mean"], data["data"]["std"] = list(self.spec.mean), list(self.spec.std)
        if with_resume_state:
            data.update(criterion=self.criterion.state_dict(), optimizer=self.optimizer.state_dict(),
                        scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(),
                        progress={"epoch": self.state.epoch, "step": self.state.step,
                                  "sums": {k: v.item() for k, v in self.state.sums.items()}},
                        rng={"torch": torch.get_rng_state(),
                             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []})
        return data

    def restore(self, ckpt: dict) -> None:
        """Continue from a last checkpoint of the same model."""
        if ckpt["arch"] != self.model.arch:
            raise UserError(f"cannot resume from {self.paths.last}: it holds {ckpt['arch']['name']} "
                            f"{ckpt['arch']['kwargs']}, this run builds {self.model.arch['name']} "
                            f"{self.model.arch['kwargs']}; use another --name or --out-dir")
        self.model.load_state_dict(ckpt["state_dict"])
        self.criterion.load_state_dict(ckpt["criterion"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if ckpt["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        p = ckpt["progress"]
        sums = {k: torch.tensor(v, device=self.device) for k, v in p["sums"].items()}
        self.state = TrainState(p["epoch"], p["step"], ckpt["best_val_acc"], ckpt["best_epoch"], ckpt["history"], sums)

    # ------------------------------------------------------------ training
    def train_steps(self, epoch: int, stop: StopSignals) -> bool:
        """Run the rest of epoch `epoch`; False if a stop signal arrived first."""
        self.model.train()
        self.criterion.train()
        sums = self.state.sums
        bar = tqdm(total=len(self.train_loader), initial=self.state.step, disable=None if self.cfg.progress else True,
                   desc=f"{self.cfg.run_name()} epoch {epoch + 1}/{self.cfg.epochs}", leave=False, dynamic_ncols=True)
        for x, y in self.train_loader.epoch(epoch, self.state.step):
            with autocast(self.precision, self.device):
                logits, features = self.model(x)
                terms = self.criterion(logits, features, y, x)
                loss = sum(terms.values())
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            # Sums stay on the device: no host synchronisation per step.
            n = torch.tensor(float(len(y)), device=self.device)
            for key, value in {"loss": loss, **{f"loss_{k}": v for k, v in terms.items()}}.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float() * n
            sums["correct"] = sums.get("correct", 0.0) + (logits.argmax(1) == y).sum().float()
            sums["n"] = sums.get("n", 0.0) + n
            self.state.step += 1
            bar.update()
            if stop.requested and self.state.step < len(self.train_loader):  # at the last step, finish the epoch
                bar.close()
                return False
        bar.close()
        return True

    def end_epoch(self, epoch: int, seconds: float) -> dict:
        """Validate, log the epoch, and write the last (and maybe best) checkpoint."""
        sums = {k: v.item() for k, v in self.state.sums.items()}
        row = {"epoch": epoch + 1, **{f"train_{k}": v / sums["n"] for k, v in sums.items() if k.startswith("loss")},
               "train_acc": sums["correct"] / sums["n"], "lr": self.optimizer.param_groups[0]["lr"]}
        if self.val_loader is not None:
            val = evaluate(self.model, self.val_loader, self.precision)
            row.update(val_loss=val["loss"], val_acc=val["acc"])
        row.update(images_per_s=sums["n"] / max(seconds, 1e-9), seconds=seconds)
        self.state.history.append(row)
        self.state.epoch, self.state.step, self.state.sums = epoch + 1, 0, {}
        score = row.get("val_acc", 0.0)  # without a validation split, every epoch ties: the last is kept
        if score >= self.state.best_val_acc:
            self.state.best_val_acc, self.state.best_epoch = score, epoch + 1
            save_checkpoint(self.payload(with_resume_state=False), self.paths.best)
        save_checkpoint(self.payload(with_resume_state=True), self.paths.last)
        write_log(self.history_frame(), self.paths.log)
        return row

    def history_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.state.history)

    def fit(self) -> dict:
        """Train all remaining epochs, then evaluate the best checkpoint on the test split."""
        if self.cfg.resume and self.paths.last.exists():
            self.restore(load_checkpoint(self.paths.last))
            print(f"resuming {self.paths.last} at epoch {self.state.epoch + 1}, step {self.state.step}")
        with StopSignals() as stop:
            for epoch in range(self.state.epoch, self.cfg.epochs):
                start = time.perf_counter()
                if not self.train_steps(epoch, stop):
                    save_checkpoint(self.payload(with_resume_state=True), self.paths.last)
                    raise TrainingInterrupted(f"{stop.requested} received: saved {self.paths.last} at epoch "
                                              f"{epoch + 1} step {self.state.step}; rerun with --resume to continue")
                row = self.end_epoch(epoch, time.perf_counter() - start)
                print(format_row(self.cfg.run_name(), row, self.cfg.epochs), flush=True)
                if stop.requested:
                    raise TrainingInterrupted(f"{stop.requested} received: saved {self.paths.last} after epoch "
                                              f"{epoch + 1}; rerun with --resume to continue")
        return self.finish()

    def finish(self) -> dict:
        """Evaluate the best checkpoint on the test split and record the result in it."""
        best = load_checkpoint(self.paths.best)
        self.model.load_state_dict(best["state_dict"])
        test = evaluate(self.model, self.loader(self.test_split), self.precision)
        best["test"] = test
        save_checkpoint({k: v for k, v in best.items() if k not in ("format", "version")}, self.paths.best)
        return {"name": self.cfg.run_name(), "model": self.cfg.model, "role": self.cfg.role,
                "best_epoch": self.state.best_epoch, "val_acc": self.state.best_val_acc,
                "test_acc": test["acc"], "test_loss": test["loss"], "params": count_parameters(self.model),
                "checkpoint": str(self.paths.best)}


def write_log(frame: pd.DataFrame, path: Path) -> None:
    """Rewrite the per-epoch CSV log atomically (it always matches the last checkpoint)."""
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_csv(tmp, index=False)
    tmp.replace(path)


def format_row(name: str, row: dict, epochs: int) -> str:
    """One line per epoch for the terminal and the SLURM log."""
    val = f" val_acc {row['val_acc']:.4f}" if "val_acc" in row else ""
    return (f"{name} epoch {row['epoch']}/{epochs}: train_loss {row['train_loss']:.4f} "
            f"train_acc {row['train_acc']:.4f}{val} lr {row['lr']:.4g} "
            f"{row['images_per_s']:.0f} img/s {row['seconds']:.1f}s")


def train(cfg: Config, criterion: Optional[nn.Module] = None) -> dict:
    """Train `cfg.model` as `cfg` says (with `criterion`, default cross-entropy); return final metrics."""
    return Trainer(cfg, criterion).fit()
