"""The local chain of a preset: teachers, student baselines, distillation (per seed), then the report."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from pruning_lab.config import Config
from pruning_lab.errors import UserError

from .runs import run_training
from .recipes import recipe_config
from .report import write_report

# Each preset: the teacher jobs, then the student jobs (run once per seed).
PRESETS = {
    "demo": (["demo_teacher"], ["demo_student", "demo_distill"], [0, 1, 2]),  # embedded MNIST, CPU, minutes
    "cifar10": (["cnn_teacher", "vit_teacher"], ["cnn_student", "distill_cnn", "vit_student", "distill_vit"], [0]),
}


def student_config(cfg: Config, seed: int, several_seeds: bool) -> Config:
    """A student job for one seed: NAME_seedS when there are several, teacher read from the same out_dir."""
    name = f"{cfg.run_name()}_seed{seed}" if several_seeds else cfg.run_name()
    teacher = str(Path(cfg.out_dir) / Path(cfg.teacher_checkpoint).name) if cfg.teacher_checkpoint else ""
    return dataclasses.replace(cfg, seed=seed, name=name, teacher_checkpoint=teacher)


def run_pipeline(preset: str, overrides: dict, seeds: Sequence[int] | None = None) -> tuple[list[dict], Path]:
    """Train a preset's teachers, then each student job per seed, then write the report; return rows and report path."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    teachers, students, default_seeds = PRESETS[preset]
    seeds = list(seeds or default_seeds)
    configs = [recipe_config(job, overrides) for job in teachers]
    configs += [student_config(recipe_config(job, overrides), seed, len(seeds) > 1)
                for seed in seeds for job in students]
    rows = []
    for cfg in configs:
        print(f"\n=== {cfg.run_name()}: {cfg.model} on {cfg.dataset}, {cfg.epochs} epochs, seed {cfg.seed}", flush=True)
        rows.append(run_training(cfg, distilling=bool(cfg.teacher_checkpoint)))
    out_dir = Path(configs[0].out_dir)
    report_path = out_dir / "report.json" if out_dir != Path("models_saved") else Path("report.json")
    write_report(str(out_dir), str(report_path), device=configs[0].device)
    return rows, report_path
