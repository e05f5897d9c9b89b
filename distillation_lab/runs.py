"""The distill command: ordinary training whose loss also sees a frozen teacher."""
from __future__ import annotations

from pruning_lab.config import Config
from pruning_lab.runtime import resolve_precision
from pruning_lab.train import update_checkpoint
from pruning_lab.train.loop import Trainer, build_parts

from .criterion import DistillationCriterion, loss_spec
from .metrics import soft_target_alignment
from .teacher import load_teacher


def run_training(cfg: Config, distilling: bool) -> dict:
    """Train (or distill) as `cfg` says; a distilled student also gets its alignment with the teacher."""
    parts = build_parts(cfg)
    teacher = (load_teacher(cfg.teacher_checkpoint, cfg.teacher, parts.data, parts.device)
               if distilling else None)
    criterion = DistillationCriterion(loss_spec(cfg, distilling), parts.model.feature_widths, teacher)
    trainer = Trainer(cfg, parts, criterion)
    summary = trainer.fit()
    if teacher is None or parts.test_loader is None:
        return summary
    precision = resolve_precision(cfg.precision, parts.device)
    alignment = soft_target_alignment(trainer.model, teacher, parts.test_loader, precision)
    if trainer.dist.is_main:
        update_checkpoint(trainer.paths.best, alignment=alignment)
    return {**summary, "teacher_agreement": alignment["agreement"], "teacher_kl": alignment["kl"]}
