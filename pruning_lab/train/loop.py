"""The one training loop: teachers, students and distillation differ only in the criterion.

A criterion maps (logits, features, labels, inputs) to a dict of named, already weighted loss
terms; the loop sums them, logs each one per epoch, and trains the criterion's own parameters
(e.g. feature regressors) with the model. Checkpoints: NAME.pth is the best epoch by validation
accuracy (the test split is evaluated once, on it, at the end), NAME_last.pth holds everything
needed to resume. SIGTERM/SIGUSR1 (a SLURM time limit or preemption) save and stop cleanly.
"""
from __future__ import annotations

import dataclasses
import json
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol

import pandas as pd
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..config import Config, check_config, to_dict
from ..data import BatchLoader, Split, fingerprint, load_splits
from ..errors import UserError
from ..files import write_text_atomically
from ..inference.evaluate import count_parameters, evaluate
from ..models import create_model
from ..models.bottleneck import (EXAMPLES_PER_KEY, add_bottleneck, copy_teacher_keys, encoder_outputs, find_bottleneck,
                                 init_keys, keys_ready, record_key_usage)
from ..models.bert import distilbert_from_bert
from ..models.thin import keep_layers
from . import distributed
from ..checkpoint import (build_model, checkpoint_weights, code_revision, load_checkpoint, model_weights, save_checkpoint,
                          update_checkpoint)
from .criterion import CrossEntropyCriterion
from .curves import Curves, Tracker, curves_folder, teacher_agreement
from .run_folder import RunLock, RunPaths, check_run_folder
from .optim import build_optimizer, build_scheduler
from ..runtime import autocast, channels_last_is_safe, resolve_device, resolve_precision, tune_cpu_allocator

INTERRUPTED_EXIT_CODE = 3
CHECK_EVERY = 50  # steps between looks at whether the loss stayed finite (each look waits for the device)

class Loader(Protocol):
    """What the loop iterates: batches of (inputs, labels) on the device, restartable per epoch."""

    def __len__(self) -> int: ...
    def epoch(self, epoch: int, start_step: int = 0): ...


class TrainingInterrupted(Exception):
    """Raised after a stop signal once the last checkpoint is saved; `--resume` continues."""


class TrainingDiverged(UserError):
    """Raised when the loss is no longer finite, before anything of the diverged run is saved."""


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
class RunParts:
    """What a Trainer trains and evaluates: built from a Config, or by hand (the Python API)."""

    model: nn.Module  # returns (logits, features) and has an `arch` dict
    train_loader: Loader
    val_loaders: dict  # name -> loader; the first one's accuracy selects the best checkpoint
    test_loader: Optional[Loader]
    data: dict  # what checkpoints record about the data
    device: torch.device


@torch.no_grad()
def check_model_runs(model: nn.Module, cfg: Config, spec, split, device: torch.device) -> None:
    """One forward pass on two training examples, before any work: a model that cannot read the
    dataset's inputs (an image model on text, widths that do not fit) is a one-line error."""
    sample = BatchLoader(Split(split.inputs[:2], split.labels[:2]), spec, 2, device, input_size=model.arch["image_size"])
    x, _ = next(iter(sample))
    was_training = model.training
    model.eval()
    try:
        model(x)
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as e:
        what = f"token ids [B, {spec.input_size}]" if spec.kind == "tokens" else \
            f"{spec.channels}x{spec.input_size}x{spec.input_size} images"
        raise UserError(f"model {cfg.model} {cfg.model_args} cannot run on {cfg.dataset}'s {what}: "
                        f"{(str(e) or type(e).__name__).splitlines()[0]}") from None
    finally:
        model.train(was_training)


def channels_last_for(spec, device: torch.device) -> bool:
    """Whether a dataset's batches and models go channels_last: images, where the device runs it safely
    (faster convolutions on tensor cores, and with oneDNN on AVX512 CPUs: measured 1.2-1.4x on ResNets)."""
    return spec.kind == "image" and channels_last_is_safe(device)


def run_loader(cfg: Config, spec, split, device: torch.device, input_size: int, train: bool = False,
               shard: tuple = (0, 1), max_steps: Optional[int] = None) -> BatchLoader:
    """A split's batches as a run of `cfg` reads them; training batches are augmented, this process's
    shard, and capped at `max_steps` (default: max_steps_per_epoch)."""
    return BatchLoader(split, spec, cfg.batch_size, device, train=train, augment=cfg.augment, seed=cfg.seed,
                       input_size=input_size, channels_last=channels_last_for(spec, device),
                       max_steps=(max_steps or cfg.max_steps_per_epoch) if train else None,
                       shard=shard if train else (0, 1))


def build_parts(cfg: Config) -> RunParts:
    """Data splits and the model that `cfg` describes, on the device it asks for."""
    info = distributed.setup()
    device = resolve_device(cfg.device)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    spec, train_split, val_split, test_split = load_splits(
        cfg.dataset, cfg.data_dir, cfg.val_size, cfg.train_subset, cfg.image_size, cfg.labelled_subset, cfg.channels)
    spec = dataclasses.replace(spec, flip=spec.flip and cfg.flip)
    torch.manual_seed(cfg.seed)
    start = load_checkpoint(cfg.init_checkpoint) if cfg.init_checkpoint else None
    if start is not None and cfg.model == "distilbert" and start["arch"]["name"] == "minilm_bert":
        model = distilbert_of_checkpoint(cfg, start, spec).to(device)
    elif start is not None:  # start from saved weights (and their layer surgery), e.g. a converted model
        model = build_model(start, cfg.model, source=cfg.init_checkpoint).to(device)
        if cfg.model_args != start["arch"]["kwargs"]:  # the config records the model that really trains
            raise UserError(f"model_args {cfg.model_args} differ from those of {cfg.init_checkpoint} "
                            f"({start['arch']['kwargs']}): give --model-args '{json.dumps(start['arch']['kwargs'])}'")
        if cfg.keep_layers:
            keep_layers(model, cfg.keep_layers)
    elif cfg.keep_layers:
        raise UserError("keep_layers picks layers of the model in init_checkpoint: give --init-checkpoint too")
    else:
        model = create_model(cfg.model, spec.num_classes, spec.channels, spec.input_size, **cfg.model_args).to(device)
    check_model_runs(model, cfg, spec, train_split, device)
    bottleneck = find_bottleneck(model)
    if cfg.bottleneck and bottleneck is None:
        bottleneck = add_bottleneck(model, cfg.bottleneck)
    if channels_last_for(spec, device):
        model.to(memory_format=torch.channels_last)

    def loader(split, train: bool = False) -> BatchLoader:
        return run_loader(cfg, spec, split, device, model.arch["image_size"], train, (info.rank, info.world_size))

    if bottleneck is not None and not keys_ready(bottleneck):  # a resumed run loads its keys afterwards
        if bottleneck.config["keys_from"] == "teacher":
            if not cfg.teacher_checkpoint:
                raise UserError("bottleneck keys_from teacher needs a teacher: use distill with --teacher-checkpoint")
            copy_teacher_keys(bottleneck, cfg.teacher_checkpoint, load_checkpoint(cfg.teacher_checkpoint)["state_dict"])
            outputs = encoder_outputs(model, loader(train_split), EXAMPLES_PER_KEY * bottleneck.config["keys"])
            record_key_usage(model, bottleneck.key_usage(outputs))
        else:
            if bottleneck.config["keys"] > len(train_split):  # k-means would repeat outputs: keys that never differ
                raise UserError(f"bottleneck keys {bottleneck.config['keys']}: their k-means fit sees one encoder "
                                f"output per training example, here {len(train_split)}; give keys <= "
                                f"{len(train_split)} or more training examples")
            record_key_usage(model, init_keys(model, loader(train_split)))
    data = {"dataset": cfg.dataset, **vars(spec), "mean": list(spec.mean), "std": list(spec.std),
            "fingerprint": fingerprint(train_split, val_split, test_split)}
    return RunParts(model, loader(train_split, train=True), {"val": loader(val_split)} if len(val_split) else {},
                    loader(test_split), data, device)


def distilbert_of_checkpoint(cfg: Config, start: dict, spec) -> nn.Module:
    """A DistilBERT built from the BERT in init_checkpoint (`start`): its layers keep_layers (default all), its width."""
    bert = build_model(start, source=cfg.init_checkpoint)
    layers = cfg.keep_layers or list(range(len(bert.hf.bert.encoder.layer)))
    model = distilbert_from_bert(bert, layers, spec.input_size, cfg.init_checkpoint)
    if cfg.model_args and cfg.model_args != model.arch["kwargs"]:
        raise UserError(f"model_args {cfg.model_args} differ from the DistilBERT that {cfg.init_checkpoint}'s BERT "
                        f"gives ({model.arch['kwargs']}): leave --model-args out")
    return model


class Trainer:
    """Holds the pieces of one run; `fit()` runs it."""

    def __init__(self, cfg: Config, parts: RunParts, criterion: Optional[nn.Module] = None,
                 eval_fn: Optional[Callable[[nn.Module], dict]] = None, record: Optional[dict] = None) -> None:
        self.cfg, self.paths, self.parts, self.eval_fn = cfg, RunPaths.of(cfg), parts, eval_fn
        self.record = dict(record or {})  # more top-level checkpoint entries (e.g. which teacher)
        self.model, self.device, self.train_loader = parts.model, parts.device, parts.train_loader
        self.precision = resolve_precision(cfg.precision, self.device)
        if self.device.type == "cpu":
            tune_cpu_allocator()
        self.criterion = (criterion or CrossEntropyCriterion(cfg.label_smoothing)).to(self.device)
        self.optimizer = build_optimizer(cfg, [*self.model.parameters(), *self.criterion.parameters()])
        self.scheduler = build_scheduler(cfg, self.optimizer, len(self.train_loader))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.select = f"{next(iter(parts.val_loaders))}_acc" if parts.val_loaders else None
        self.state = TrainState()
        self.first_bad_step = torch.full((), -1, device=self.device)  # the step the loss first was not finite
        self.dist = distributed.setup()
        self.curves = Curves(Path(), enabled=False)  # opened by fit, once it knows where the run resumes
        self.step_module = distributed.wrap(self.model, self.criterion, self.dist, self.device)

    # ------------------------------------------------------------ checkpoints
    def payload(self, with_resume_state: bool) -> dict:
        """The checkpoint dict: weights, architecture, config, metrics (+ everything to resume)."""
        # What the run is (role, family, teacher, surgery) is recorded for the report to find it by.
        data = {"arch": self.model.arch, **model_weights(self.model), "role": self.cfg.role,
                "family": self.cfg.family, "teacher": None, "surgery": getattr(self.model, "surgery", []),
                **self.record,
                "config": to_dict(self.cfg), "data": self.parts.data,
                "history": self.state.history, "best_epoch": self.state.best_epoch,
                "best_val_acc": self.state.best_val_acc, "code_revision": code_revision(),
                "written": {"utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "host": socket.gethostname(),
                            "device": str(self.device)}}
        if with_resume_state:
            data.update(criterion=self.criterion.state_dict(), optimizer=self.optimizer.state_dict(),
                        scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(),
                        progress={"epoch": self.state.epoch, "step": self.state.step,
                                  "sums": {k: v.item() for k, v in self.state.sums.items()}},
                        rng={"torch": torch.get_rng_state(),
                             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []})
        return data

    def save(self, path: Path, with_resume_state: bool) -> None:
        """Write a checkpoint from rank 0 only; every process waits until it is on disk."""
        if with_resume_state and self.dist.enabled and self.state.sums:
            # A mid-epoch state holds the running sums of all processes; rank 0 alone takes them back.
            summed = distributed.all_reduce_sums(self.state.sums, self.dist)
            self.state.sums = ({k: v.to(self.device) for k, v in summed.items()} if self.dist.is_main
                               else {k: torch.zeros_like(v) for k, v in self.state.sums.items()})
        if self.dist.is_main:
            save_checkpoint(self.payload(with_resume_state), path)
        distributed.barrier(self.dist)

    def check_same_data(self, recorded: dict) -> None:
        """Resuming on other examples or labels than the run was started on is an error (unless
        --resume-changes), whatever the folder is called: the data's fingerprint, not its path."""
        was, now = recorded.get("fingerprint"), self.parts.data.get("fingerprint")
        if was and now and was != now and not self.cfg.resume_changes:
            raise UserError(f"cannot resume {self.paths.last}: the data in {self.cfg.data_dir} ({self.cfg.dataset}) are "
                            "not the examples and labels the run was started on; rerun with those, add "
                            "--resume-changes to continue on these, or --overwrite to start afresh")

    def restore(self, ckpt: dict) -> None:
        """Continue from a last checkpoint of the same model; a damaged resume state is a one-line error."""
        try:
            self._restore(ckpt)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise UserError(f"cannot resume from {self.paths.last}: not a valid resume state ({type(e).__name__}: "
                            f"{(str(e) or '?').splitlines()[0]}); --overwrite starts the run afresh") from None

    def _restore(self, ckpt: dict) -> None:
        if ckpt["arch"] != self.model.arch:
            raise UserError(f"cannot resume from {self.paths.last}: it holds {ckpt['arch']['name']} "
                            f"{ckpt['arch']['kwargs']}, this run builds {self.model.arch['name']} "
                            f"{self.model.arch['kwargs']}; use another --name or --out-dir")
        self.model.load_state_dict(checkpoint_weights(ckpt))
        self.criterion.load_state_dict(ckpt["criterion"])
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        fresh_base_lrs = list(self.scheduler.base_lrs)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.cfg.resume_changes:  # the new lr, weight decay, momentum, schedule: not the ones the states restored
            self.scheduler.base_lrs = fresh_base_lrs
            for group, settings, base, factor in zip(self.optimizer.param_groups, fresh, fresh_base_lrs,
                                                     self.scheduler.lr_lambdas):
                group.update({k: v for k, v in settings.items() if k not in ("lr", "initial_lr")}, initial_lr=base,
                             lr=base * factor(self.scheduler.last_epoch))
        self.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if ckpt["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        p = ckpt["progress"]
        sums = {k: torch.tensor(v if self.dist.is_main else 0.0, device=self.device) for k, v in p["sums"].items()}
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
                logits, terms = self.step_module(x, y)
                loss = sum(terms.values())
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            # Sums stay on the device: no host synchronisation per step. The first step whose loss is not
            # finite is noted there too, and looked at every CHECK_EVERY steps and before any save.
            self.first_bad_step = torch.where((self.first_bad_step < 0) & ~torch.isfinite(loss.detach()),
                                              torch.full((), self.state.step, device=self.device), self.first_bad_step)
            n = torch.tensor(float(len(y)), device=self.device)
            for key, value in {"loss": loss, **{f"loss_{k}": v for k, v in terms.items()}}.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float() * n
            if y.is_floating_point():  # a regression's scores (NaN: withheld): no accuracy to count
                labelled, correct = ~torch.isnan(y), torch.full((), float("nan"), device=self.device)
            else:
                labelled = y >= 0
                correct = ((logits.argmax(1) == y) & labelled).sum().float()
            sums["correct"] = sums.get("correct", 0.0) + correct
            sums["labelled"] = sums.get("labelled", 0.0) + labelled.sum().float()
            sums["n"] = sums.get("n", 0.0) + n
            self.state.step += 1
            bar.update()
            if self.state.step % CHECK_EVERY == 0:
                self.check_finite(epoch)
                self.curves.steps(self.global_step(), sums, self.optimizer.param_groups[0]["lr"])
            # Processes see a signal at different steps: they agree every 10 steps (not every step, which
            # would synchronise with the host) and stop together.
            if self.dist.enabled and self.state.step % 10 != 0:
                continue
            if self.stop_agreed(stop) and self.state.step < len(self.train_loader):  # the last step ends the epoch
                bar.close()
                self.check_finite(epoch)
                return False
        bar.close()
        self.check_finite(epoch)
        return True

    def check_finite(self, epoch: int) -> None:
        """Stop the run at the first non-finite loss, before anything is saved: the checkpoints on disk
        stay those of the last finite epoch (one host synchronisation per call)."""
        bad = int(self.first_bad_step.item())
        if distributed.any_rank(bad >= 0, self.dist):  # every process stops at the same step
            where = f"step {bad + 1}" if bad >= 0 else f"a step before {self.state.step + 1}"
            raise TrainingDiverged(
                f"{self.cfg.run_name()}: the loss became non-finite (NaN or infinite) at epoch {epoch + 1}, "
                f"{where} of {len(self.train_loader)}; stopped without saving (the checkpoints in "
                f"{self.paths.best.parent} are from before). Likely cause: a learning rate too high (lr "
                f"{self.cfg.lr:g}), or a loss weight or temperature out of scale; lower them and rerun with --overwrite")

    def stop_agreed(self, stop: StopSignals) -> bool:
        """Whether any process received a stop signal (a collective call when data-parallel)."""
        if self.dist.enabled:
            stop.requested = stop.requested or ("signal" if distributed.any_rank(bool(stop.requested), self.dist)
                                                else None)
        return bool(stop.requested)

    def end_epoch(self, epoch: int, seconds: float) -> dict:
        """Validate, log the epoch, and write the last (and maybe best) checkpoint."""
        sums = {k: float(v) for k, v in distributed.all_reduce_sums(self.state.sums, self.dist).items()}
        row = {"epoch": epoch + 1, **{f"train_{k}": v / sums["n"] for k, v in sums.items() if k.startswith("loss")},
               "train_acc": sums["correct"] / max(sums["labelled"], 1.0), "lr": self.optimizer.param_groups[0]["lr"]}
        distributed.broadcast_weights(self.model, self.dist)  # every process evaluates and saves one model
        for name, loader in self.parts.val_loaders.items():
            result = evaluate(self.model, loader)  # fp32, as every reported number (training may use bf16)
            row.update({f"{name}_loss": result["loss"], f"{name}_acc": result["acc"]})
        if self.eval_fn is not None:
            row.update({k: float(v) for k, v in self.eval_fn(self.model).items()})
        teacher = getattr(self.criterion, "teacher", None)
        if teacher is not None and self.parts.val_loaders:
            name, loader = next(iter(self.parts.val_loaders.items()))
            row[f"{name}_teacher_agreement"] = teacher_agreement(self.model, teacher, loader)
        row.update(images_per_s=sums["n"] / max(seconds, 1e-9), seconds=seconds)
        self.state.history.append(row)
        self.state.epoch, self.state.step, self.state.sums = epoch + 1, 0, {}
        self.curves.epoch(self.global_step(), row)
        score = row[self.select] if self.select else 0.0  # without validation every epoch ties: the last is kept
        score = distributed.rank0_value(score, self.dist)
        if score >= self.state.best_val_acc:
            self.state.best_val_acc, self.state.best_epoch = score, epoch + 1
            self.save(self.paths.best, with_resume_state=False)
        self.save(self.paths.last, with_resume_state=True)
        if self.dist.is_main:
            write_log(pd.DataFrame(self.state.history), self.paths.log)
        return row

    def fit(self) -> dict:
        """Train all remaining epochs, then evaluate the best checkpoint on the test split (one process
        per run: a second one on the same run stops at once)."""
        with RunLock(self.paths, enabled=self.dist.is_main):
            return self._fit()

    def _fit(self) -> dict:
        if self.cfg.resume and not self.cfg.overwrite and self.paths.last.exists():
            last = load_checkpoint(self.paths.last)
            self.check_same_data(last.get("data") or {})
            self.restore(last)
            if self.dist.is_main and self.state.epoch >= self.cfg.epochs:
                print(f"resuming {self.paths.last}: the run has finished its {self.cfg.epochs} epochs, so its best "
                      "checkpoint is only evaluated (raise --epochs to train on)")
            elif self.dist.is_main:
                print(f"resuming {self.paths.last} at epoch {self.state.epoch + 1}, step {self.state.step}")
        training = self.dist.is_main and self.state.epoch < self.cfg.epochs  # a finished run is only evaluated
        tracker = None if self.cfg.log == "tensorboard" else \
            (lambda: Tracker(self.cfg.log, self.cfg.out_dir, self.cfg.run_name(), to_dict(self.cfg)))
        self.curves = Curves(curves_folder(self.cfg.out_dir, self.cfg.run_name()), self.global_step(), training, tracker)
        try:
            return self._train()
        finally:
            self.curves.close()

    def global_step(self) -> int:
        """Optimizer steps since the run began (the x axis of its curves, across resumes)."""
        return self.state.epoch * len(self.train_loader) + self.state.step

    def _train(self) -> dict:
        """The remaining epochs, then the test evaluation."""
        with StopSignals() as stop:
            for epoch in range(self.state.epoch, self.cfg.epochs):
                start = time.perf_counter()
                if not self.train_steps(epoch, stop):
                    self.save(self.paths.last, with_resume_state=True)
                    raise TrainingInterrupted(f"{stop.requested} received: saved {self.paths.last} at epoch "
                                              f"{epoch + 1} step {self.state.step}; rerun with --resume to continue")
                row = self.end_epoch(epoch, time.perf_counter() - start)
                if self.dist.is_main:
                    print(format_row(self.cfg.run_name(), row, self.cfg.epochs), flush=True)
                if self.stop_agreed(stop):
                    raise TrainingInterrupted(f"{stop.requested} received: saved {self.paths.last} after epoch "
                                              f"{epoch + 1}; rerun with --resume to continue")
        return self.finish()

    def finish(self) -> dict:
        """Evaluate the best checkpoint on the test split and record the result in it."""
        distributed.barrier(self.dist)
        if self.dist.is_main:  # the file is on rank 0's node only when nodes have their own scratch
            self.model.load_state_dict(checkpoint_weights(load_checkpoint(self.paths.best)))
        distributed.broadcast_weights(self.model, self.dist)
        test = {"acc": None, "loss": None}
        if self.parts.test_loader is not None:
            test = evaluate(self.model, self.parts.test_loader)  # fp32, as evaluate and report compute it
            if self.dist.is_main:
                update_checkpoint(self.paths.best, test=test)
        return {"name": self.cfg.run_name(), "model": self.model.arch["name"], "role": self.cfg.role,
                "seed": self.cfg.seed, "best_epoch": self.state.best_epoch, "val_acc": self.state.best_val_acc,
                "test_acc": test["acc"], "test_loss": test["loss"], "params": count_parameters(self.model),
                "checkpoint": str(self.paths.best), "history": self.state.history}


def write_log(frame: pd.DataFrame, path: Path) -> None:
    """Rewrite the per-epoch CSV log atomically (it always matches the last checkpoint)."""
    write_text_atomically(path, frame.to_csv(index=False))


def format_row(name: str, row: dict, epochs: int) -> str:
    """One line per epoch for the terminal and the SLURM log."""
    val = f" val_acc {row['val_acc']:.4f}" if "val_acc" in row else ""
    return (f"{name} epoch {row['epoch']}/{epochs}: train_loss {row['train_loss']:.4f} "
            f"train_acc {row['train_acc']:.4f}{val} lr {row['lr']:.4g} "
            f"{row['images_per_s']:.0f} img/s {row['seconds']:.1f}s")


CriterionFactory = Callable[[RunParts], nn.Module]


def train(cfg: Config, criterion: nn.Module | CriterionFactory | None = None) -> dict:
    """Train `cfg.model` as `cfg` says; `criterion` (or a factory given the run's parts) defaults to CE."""
    check_config(cfg)
    check_run_folder(cfg)
    parts = build_parts(cfg)
    if criterion is not None and not isinstance(criterion, nn.Module):
        criterion = criterion(parts)
    return Trainer(cfg, parts, criterion).fit()
