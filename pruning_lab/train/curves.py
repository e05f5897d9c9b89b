"""Training curves as TensorBoard event files: OUT_DIR/tensorboard/NAME/, one folder per run.

Every CHECK_EVERY steps (where the loop already synchronises with the device to look for a
non-finite loss) the running mean of each loss term since the epoch began, the learning rate and the
throughput; every epoch the epoch's row (train and validation metrics, the teacher's agreement for a
distillation run). Steps count optimizer steps from the run's start, so a resumed or requeued run
continues the same curves: its writer purges anything logged after the step it resumes from (an
interrupted epoch logged again is not logged twice). `tensorboard --logdir OUT_DIR/tensorboard`
shows every run of a folder side by side. `--log wandb` or `--log trackio` sends the same scalars to
that tracker too (`Tracker`).
"""
from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path
from typing import Callable, Optional

import torch


def curves_folder(out_dir: str | Path, name: str) -> Path:
    """Where a run's event files go."""
    return Path(out_dir) / "tensorboard" / name


TRACKERS = ("tensorboard", "wandb", "trackio")  # --log: TensorBoard always; wandb or trackio beside it


def tracker_run_id(out_dir: str | Path, name: str) -> str:
    """A tracker's id for a run: the same for every attempt of it (a requeued job continues its run)."""
    digest = hashlib.sha1(str((Path(out_dir) / name).resolve()).encode()).hexdigest()[:10]
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)[:48] + "-" + digest


class Tracker:
    """The curves mirrored to Weights & Biases or trackio (optional packages), both kept inside the run's folder:
    wandb offline unless WANDB_MODE says otherwise (a compute node has no internet; `wandb sync` uploads
    later), trackio in its local database (TRACKIO_DIR, default OUT_DIR/trackio; `trackio show` opens it)."""

    def __init__(self, kind: str, out_dir: str | Path, name: str, config: dict) -> None:
        self.kind, project = kind, os.environ.get("WANDB_PROJECT" if kind == "wandb" else "TRACKIO_PROJECT",
                                                  "distill-lab")
        if kind == "wandb":
            import wandb

            mode = os.environ.get("WANDB_MODE", "offline")
            self.run = wandb.init(project=project, name=name, id=tracker_run_id(out_dir, name), resume="allow",
                                  dir=str(out_dir), config=config, mode=mode, reinit="create_new")
            if mode == "offline":
                print(f"curves also in wandb, offline: upload with `wandb sync {Path(self.run.dir).parent}` "
                      "where the internet is reachable")
        else:
            os.environ.setdefault("TRACKIO_DIR", str(Path(out_dir).resolve() / "trackio"))
            import trackio

            self.run = trackio.init(project=project, name=name, config=config, resume="allow")
            print(f"curves also in trackio: `TRACKIO_DIR={os.environ['TRACKIO_DIR']} trackio show --project {project}`")

    def log(self, scalars: dict, step: int) -> None:
        """One step's scalars."""
        self.run.log(scalars, step=step)

    def finish(self) -> None:
        """Close the run (wandb writes its summary)."""
        self.run.finish()


class Curves:
    """A run's TensorBoard writer, and its tracker where --log names one (only the main process writes;
    `enabled` False: every call does nothing)."""

    def __init__(self, folder: Path, resume_step: int = 0, enabled: bool = True,
                 tracker: Optional[Callable[[], Tracker]] = None) -> None:
        self.writer, self.tracker = None, None
        self.last_time, self.last_images = time.perf_counter(), 0.0
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        folder.mkdir(parents=True, exist_ok=True)
        # purge_step: events after the step the run resumes from (logged before an interruption, about steps
        # the saved state never saw) are dropped; the resumed run logs them again.
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=resume_step + 1 if resume_step else None)
        self.tracker = tracker() if tracker else None

    def write(self, scalars: dict, step: int) -> None:
        """Scalars of one step to TensorBoard and the tracker."""
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        if self.tracker is not None:
            self.tracker.log(scalars, step)

    def steps(self, step: int, sums: dict, lr: float) -> None:
        """The running means of the loss terms since the epoch began, the learning rate, images per second."""
        if self.writer is None or not sums:
            return
        values = {k: float(v) for k, v in sums.items()}  # one synchronisation, at a step that already has one
        n = max(values.get("n", 0.0), 1.0)
        scalars = {f"train_step/{key}": value / n for key, value in values.items() if key.startswith("loss")}
        scalars["train_step/lr"] = lr
        now, images = time.perf_counter(), values.get("n", 0.0)
        if images > self.last_images and now > self.last_time:
            scalars["train_step/images_per_s"] = (images - self.last_images) / (now - self.last_time)
        self.write(scalars, step)
        self.last_time, self.last_images = now, images

    def epoch(self, step: int, row: dict) -> None:
        """An epoch's row: train and validation metrics, lr, throughput, teacher agreement."""
        if self.writer is None:
            return
        self.write({f"epoch/{key}": float(value) for key, value in row.items()
                    if key != "epoch" and isinstance(value, (int, float))}, step)
        self.writer.flush()
        self.last_time, self.last_images = time.perf_counter(), 0.0  # a new epoch's sums start at zero

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None


def read_curves(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run's event files: {tag: [(step, value), ...]} (what TensorBoard would draw)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # every event file, purges applied
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def teacher_agreement(model: torch.nn.Module, teacher, loader) -> Optional[float]:
    """The fraction of validation examples where student and teacher predict the same class (None for a
    regression: there are no classes)."""
    agree, total = 0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            if y.is_floating_point():
                break
            agree += int((model(x)[0].argmax(1) == teacher(x)[0].argmax(1)).sum())
            total += len(x)
    model.train(was_training)
    return agree / total if total else None
