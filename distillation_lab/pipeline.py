"""The local chain of a preset: the training jobs of the job table in order (the students once per
seed), then the report."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from pruning_lab.config import LOSS_SHORTHANDS, Config
from pruning_lab.errors import UserError, given_twice

from .chain import CHAIN, DEMO, Job
from .recipes import recipe_config
from .report import default_report_path, write_report
from .runs import check_run, run_training

PRESETS = {"demo": [0, 1, 2], "cifar10": [0]}  # preset -> default seeds


def preset_jobs(preset: str) -> tuple[Job, ...]:
    """The jobs of a preset: the demo table (embedded MNIST, CPU, minutes), or the chain's training jobs
    on CIFAR-10 (one GPU)."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    if preset == "demo":
        return DEMO
    return tuple(job for job in CHAIN if job.trains and recipe_config(job.recipe).dataset == "cifar10")


def job_config(job: Job, overrides: dict, seed: int | None = None, seed_in_name: bool = False) -> Config:
    """A training job's config: its recipe, the overrides, its seed and name (NAME_seedS for one of
    several seeds), and a distill job's teacher read from the same output folder."""
    if job.command != "distill":  # the loss options are the distillation jobs'
        overrides = {k: v for k, v in overrides.items() if k not in ("loss", *LOSS_SHORTHANDS)}
    cfg = recipe_config(job.recipe, overrides)
    # Running a preset again continues its runs (finished ones are only evaluated); --overwrite starts afresh.
    cfg = dataclasses.replace(cfg, name=job.name, resume=not cfg.overwrite)
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=seed, name=f"{job.name}_seed{seed}" if seed_in_name else job.name)
    teacher = str(Path(cfg.out_dir) / f"{job.teacher}.pth") if job.teacher else ""
    return dataclasses.replace(cfg, teacher_checkpoint=teacher)


def preset_configs(preset: str, overrides: dict, seeds: Sequence[int] | None = None) -> list[Config]:
    """The configs a preset runs, in order: jobs that wait for none once, the others once per seed."""
    jobs = preset_jobs(preset)
    seeds = list(seeds or PRESETS[preset])
    twice = given_twice(seeds)
    if twice is not None:
        raise UserError(f"--seeds {twice} is given twice")
    first = [job_config(job, overrides) for job in jobs if not job.after]
    per_seed = [job_config(job, overrides, seed, seed_in_name=len(seeds) > 1)
                for seed in seeds for job in jobs if job.after]
    return first + per_seed


def run_pipeline(preset: str, overrides: dict, seeds: Sequence[int] | None = None) -> tuple[list[dict], Path]:
    """Train a preset's jobs, then write the report; return the runs' summaries and the report path."""
    configs = preset_configs(preset, overrides, seeds)
    for cfg in configs:  # every job's settings before the first trains (a student's must not fail after the teacher)
        check_run(cfg, bool(cfg.teacher_checkpoint))
    rows = []
    for cfg in configs:
        print(f"\n=== {cfg.run_name()}: {cfg.model} on {cfg.dataset}, {cfg.epochs} epochs, seed {cfg.seed}", flush=True)
        rows.append(run_training(cfg))
    out_dir = Path(configs[0].out_dir)
    report_path = default_report_path(out_dir)
    write_report(str(out_dir), str(report_path), device=configs[0].device)
    return rows, report_path
