"""A run's files under --out-dir, and the checks that keep runs from damaging each other's work.

Before any work: the folder can be written, and the run would not replace a finished or
interrupted run's checkpoints unless --resume (continue it) or --overwrite (start afresh) says so.
While it trains, a lock keeps a second process from writing the same run.
"""
from __future__ import annotations

import fcntl
import os
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..checkpoint import load_checkpoint
from ..config import Config, to_dict
from ..errors import UserError

# Config keys that define a run besides its model: resuming with other values would train another run.
RESUME_KEYS = ("init_checkpoint", "keep_layers", "bottleneck", "dataset", "train_subset", "labelled_subset", "val_size", "image_size", "channels", "augment", "flip",
               "max_steps_per_epoch",
               "batch_size", "optimizer", "lr", "momentum", "weight_decay", "scheduler", "milestones", "gamma",
               "warmup_epochs", "label_smoothing", "loss", "teacher_checkpoint", "seed")


@dataclass
class RunPaths:
    """Files of one run under out_dir."""

    best: Path
    last: Path
    log: Path
    lock: Path

    @classmethod
    def of(cls, cfg: Config) -> "RunPaths":
        out, name = Path(cfg.out_dir), cfg.run_name()
        return cls(out / f"{name}.pth", out / f"{name}_last.pth", out / f"{name}_log.csv", out / f".{name}.lock")


def check_writable_folder(folder: Path, flag: str = "--out-dir") -> None:
    """The folder exists and can be written, or can be made (its nearest existing parent is writable)."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} is a file, not a folder")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    writable = existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)
    if writable and existing == folder:  # try it: root passes os.access on read-only mounts and /proc
        try:
            tempfile.TemporaryFile(dir=folder).close()
        except OSError:
            writable = False
    if not writable:
        what = "cannot be written" if existing == folder else f"cannot be made: {existing} is not writable"
        raise UserError(f"{flag} {folder} {what}")


def check_outputs(source: str, given: str | None, outputs: list[Path], overwrite: bool, what: str) -> None:
    """Refuse before any work where a command that reads `source` would write `outputs` (the first is
    --output, `given` as typed): over its own input, whatever --overwrite says; into a folder; over
    existing files without --overwrite; into a folder that cannot be written."""
    out = outputs[0]
    if given is not None and (given.endswith(("/", os.sep)) or out.is_dir()):
        raise UserError(f"--output {given} is a folder: give the path of the {what} checkpoint, e.g. "
                        f"{given.rstrip('/' + os.sep)}/{Path(source).stem}_{what}.pth")
    if out.name.startswith("."):
        raise UserError(f"--output {given or out} names a hidden file: give a plain file name (the fine-tuning run is "
                        "named after it, and run names cannot start with a dot)")
    mine = next((p for p in outputs if Path(source).resolve() == p.resolve() or same_file(source, str(p))), None)
    if mine is not None:
        raise UserError(f"--output {out} would replace the checkpoint it reads ({source}): give another --output "
                        "(an input is never overwritten, --overwrite or not)")
    taken = [p for p in outputs if p.exists()]
    if taken and not overwrite:
        raise UserError(f"{taken[0]} exists: add --overwrite to replace it, or give another --output")
    check_writable_folder(out.parent, "--output's folder")


@contextmanager
def writing_outputs(source: str, given: str | None, outputs: list[Path], overwrite: bool, what: str) -> Iterator[None]:
    """For a command that reads `source` and writes `outputs` (prune, clos-convert): check the outputs, hold the
    lock beside the first while the work runs, and check again once it is held (an identical command may have
    ended meanwhile)."""
    check_outputs(source, given, outputs, overwrite, what)
    folder = outputs[0].parent
    made = not folder.exists()  # the lock makes it; a refusal inside must not leave it behind, empty
    try:
        with RunLock.for_output(outputs[0]):
            check_outputs(source, given, outputs, overwrite, what)
            yield
    except BaseException:
        if made and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise


def check_run_folder(cfg: Config) -> RunPaths:
    """Refuse before any work: an unwritable folder, or replacing another run's checkpoints by accident."""
    paths = RunPaths.of(cfg)
    check_writable_folder(Path(cfg.out_dir))
    if cfg.resume and not cfg.overwrite and paths.last.exists():
        check_resume(cfg, paths)
    if cfg.overwrite or (cfg.resume and paths.last.exists()):
        return paths
    existing = [p for p in (paths.best, paths.last) if p.exists()]
    if existing:
        raise UserError(f"{existing[0]} exists (run '{cfg.run_name()}'): add --resume to continue it (a finished run "
                        f"is only evaluated), --overwrite to start afresh, or give another --name or --out-dir")
    return paths


PATH_KEYS = ("init_checkpoint", "teacher_checkpoint")  # written differently (relative, absolute) for one file


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one existing file."""
    try:
        return bool(a) and bool(b) and os.path.samefile(a, b)
    except OSError:
        return False


def check_resume(cfg: Config, paths: RunPaths) -> None:
    """Resuming with another model, or with options that change the run, is an error naming them
    (unless --resume-changes): it would silently train another run than the one recorded."""
    recorded = load_checkpoint(paths.last).get("config", {})
    if (recorded.get("model"), recorded.get("model_args")) != (cfg.model, cfg.model_args):
        raise UserError(f"cannot resume from {paths.last}: it holds {recorded.get('model')} {recorded.get('model_args')}, "
                        f"this run builds {cfg.model} {cfg.model_args}; use another --name or --out-dir")
    now = to_dict(cfg)
    changed = [k for k in RESUME_KEYS if k in recorded and recorded[k] != now[k]
               and not (k in PATH_KEYS and same_file(recorded[k], now[k]))]
    if changed and not cfg.resume_changes:
        was = ", ".join(f"{k}={recorded[k]!r}" for k in changed)
        new = ", ".join(f"{k}={now[k]!r}" for k in changed)
        raise UserError(f"cannot resume {paths.last}: it was started with {was}, this command gives {new}; "
                        "rerun with the same options, add --resume-changes to continue with the new ones, "
                        "or --overwrite to start afresh")


class RunLock:
    """Holds OUT_DIR/.NAME.lock while a run trains; a second process on the same run stops at once.

    An flock, so a killed process never leaves a stale lock behind; a run that ends removes the file."""

    def __init__(self, paths: RunPaths, enabled: bool = True, other: str = "use another --name") -> None:
        self.paths, self.enabled, self.other, self._file = paths, enabled, other, None

    @classmethod
    def for_output(cls, output: Path) -> "RunLock":
        """The lock of a command that writes one checkpoint (prune, clos-convert): .STEM.lock beside it."""
        return cls(RunPaths(output, output, output, output.with_name(f".{output.stem}.lock")),
                   other="give another --output")

    def __enter__(self) -> "RunLock":
        if not self.enabled:
            return self
        while True:
            self._file = self._lock_file()
            if self._holds_the_current_file():
                break
            self._file.close()  # the run before ours removed the file after we opened it: lock the new one
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        self._file.flush()
        return self

    def _lock_file(self):
        """The lock file, opened and flocked; a UserError naming the holder when another process has it."""
        try:
            self.paths.lock.parent.mkdir(parents=True, exist_ok=True)
            file = open(self.paths.lock, "a+")
        except OSError as e:
            raise UserError(f"cannot write in {self.paths.lock.parent}: {e.strerror or e}") from None
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise UserError(f"run {self.paths.best.stem} in {self.paths.best.parent} is being written by {holder}; "
                            f"wait for it to finish or {self.other}") from None
        return file

    def _holds_the_current_file(self) -> bool:
        """Whether the locked file is still the one at the lock's path (not one a finished run removed)."""
        try:
            return os.stat(self.paths.lock).st_ino == os.fstat(self._file.fileno()).st_ino
        except FileNotFoundError:
            return False

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self.paths.lock.unlink(missing_ok=True)  # while still holding it (see _holds_the_current_file)
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
