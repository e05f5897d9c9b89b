"""The one way into training: the CLI, the pipeline, the SLURM jobs and the Python API all call
`run_training`. It distills exactly when there is a teacher (a teacher checkpoint in the config, or a
frozen teacher given by the API); distillation is then the same loop with a loss that sees the teacher."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

import torch.nn as nn

from pruning_lab.checkpoint import build_model, load_checkpoint, update_checkpoint
from pruning_lab.config import LOSS_SHORTHANDS, Config, check_config, make_config
from pruning_lab.inference import soft_target_alignment
from pruning_lab.models import model_family
from pruning_lab.errors import UserError
from pruning_lab.runtime import resolve_precision
from pruning_lab.train.loop import RunParts, Trainer, build_parts
from pruning_lab.train.run_folder import check_run_folder

from .criterion import DistillationCriterion, check_regression_loss, resolve_loss
from .teacher import FrozenTeacher, check_teacher_data, load_teacher


def run_training(cfg: Config, parts: Optional[RunParts] = None, teacher: Optional[FrozenTeacher] = None,
                 eval_fn: Optional[Callable[[nn.Module], dict]] = None) -> dict:
    """Train as `cfg` says (parts: data and model built from it unless given); a distilled student
    also gets its agreement with the teacher on the test split. Returns the run's summary."""
    cfg = check_run(cfg, teacher is not None or bool(cfg.teacher_checkpoint))
    parts = parts or build_parts(cfg)
    if teacher is None and cfg.teacher_checkpoint:
        teacher = load_teacher(cfg.teacher_checkpoint, cfg.teacher, parts.data, parts.device)
    extra = [load_teacher(path, "", parts.data, parts.device) for path in cfg.extra_teachers]
    family = cfg.family or (teacher.record.get("family") if teacher else None) or model_family(cfg.model)
    cfg = dataclasses.replace(cfg, family=family)
    regression = parts.data.get("num_classes") == 1
    if regression:
        check_regression_loss(cfg.loss)
    criterion = DistillationCriterion(cfg.loss, parts.model.feature_widths, teacher, tuple(extra))
    record = {"teacher": teacher.record if teacher else None, **({"extra_teachers": [t.record for t in extra]}
                                                                  if extra else {})}
    trainer = Trainer(cfg, parts, criterion, eval_fn, record=record)
    summary = trainer.fit()
    if teacher is None or parts.test_loader is None or regression:  # agreement counts classes
        return summary
    precision = resolve_precision(cfg.precision, parts.device)
    alignment = soft_target_alignment(trainer.model, teacher, parts.test_loader, precision)
    if trainer.dist.is_main:
        update_checkpoint(trainer.paths.best, alignment=alignment)
    return {**summary, "teacher_agreement": alignment["agreement"], "teacher_kl": alignment["kl"]}


def check_run(cfg: Config, distilling: bool) -> Config:
    """The checks of a run that need no data (settings, loss, run folder); `cfg` with its loss resolved."""
    check_config(cfg)
    cfg = resolve_loss(cfg, distilling)
    check_run_folder(cfg)
    return cfg


def check_finetuning(cfg: Config, data: dict) -> None:
    """Everything a later fine-tuning run (`cfg`, on the data recorded as `data`) would refuse, checked now, before
    the command that starts it (prune, clos-convert) writes its first file."""
    check_run(cfg, bool(cfg.teacher_checkpoint))
    for path, expect in [(cfg.teacher_checkpoint, cfg.teacher), *((p, "") for p in cfg.extra_teachers)]:
        if not path:
            continue
        teacher = load_checkpoint(path)
        build_model(teacher, expect or None, source=path)  # a damaged or foreign teacher
        check_teacher_data(path, teacher.get("data", {}), data)


def check_finetuning_options(finetune_epochs: int, given: dict) -> None:
    """Options of the fine-tuning given without any fine-tuning (--finetune-epochs 0) are errors, not ignored."""
    unused = [name for name, value in given.items() if value]
    if unused and finetune_epochs == 0:
        raise UserError(f"{unused[0]} set{'s' if unused[0].startswith('--') else ''} up the fine-tuning, but "
                        "--finetune-epochs is 0: add --finetune-epochs N, or leave it out")


def finetune_config(original: Config, start: Path, name: str, epochs: int, lr: float, loss: dict,
                    teacher_checkpoint: str, teacher_model: str, overwrite: bool, device: str) -> Config:
    """The fine-tuning run of a model changed by surgery (Clos layers, pruning), saved as NAME beside
    `start`: the original run's data, Adam at `lr` with a cosine schedule, from the changed checkpoint;
    it distills from `teacher_checkpoint` (whose architecture must be `teacher_model` unless "") with the
    loss options, or trains on the labels alone when there is none."""
    default = Config()  # not the original's loss, nor the settings of its optimizer and schedule (unused by Adam, cosine)
    base = dataclasses.replace(original, loss={}, **{k: None for k in LOSS_SHORTHANDS}, momentum=default.momentum,
                               milestones=default.milestones, gamma=default.gamma)
    base = make_config(loss, "fine-tuning loss options", base=base)
    return dataclasses.replace(base, init_checkpoint=str(start), teacher_checkpoint=teacher_checkpoint,
                               teacher=teacher_model, name=name, out_dir=str(start.parent), epochs=epochs,
                               optimizer="adam", lr=lr, scheduler="cosine", warmup_epochs=0.0, resume=False,
                               overwrite=overwrite, device=device)
