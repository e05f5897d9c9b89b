"""The lab chain from Python through submitit: every job of the job table (chain.py), each after the
jobs it needs (afterok, kill_on_invalid_dep), as the batch scripts of slurm/submit_chain.sh run them.

submitit runs each job's command line (`python -m distillation_lab.main ...`, a child process) on the
cluster in the submitting directory: no scratch staging (use the batch scripts for that). `only` (the
`--jobs` of `submit`) submits some jobs of the table; those they wait for outside it count as done.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

import submitit

from pruning_lab.errors import UserError

from .chain import CHAIN, DEFAULT_PARTITION, MODELS_DIR, Job
from .clos_convert import ClosConvertOptions


def config_flags(overrides: dict) -> list[str]:
    """Command-line flags that set these config values (JSON is YAML, which the flags read)."""
    flags = []
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            flags += [flag, *map(str, value)]
        elif isinstance(value, dict) or value is None:
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


def job_argv(job: Job, smoke: bool, overrides: dict) -> list[str]:
    """A job's command line: the table's, the smoke flags, and config overrides for training jobs."""
    models = overrides.get("out_dir", MODELS_DIR)
    argv = job.argv(models) + (job.smoke_argv() if smoke else [])
    return argv + (config_flags(overrides) if job.trains else [])


class CliJob(submitit.helpers.Checkpointable):
    """What one cluster job runs: `python -m distillation_lab.main ARGV` as a child process (submitit
    pickles this object with ARGV; the command line is the whole interface, as in the batch scripts).

    Checkpointable: on submitit's time-limit or preemption signal (USR2) the job is requeued with
    the same arguments, as the batch scripts requeue themselves; training jobs carry --resume, so
    the new start continues from the last checkpoint (the epoch in progress is trained again).
    """

    def __call__(self, argv: list[str]) -> int:
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # one task per GPU: export RANK, WORLD_SIZE, MASTER_ADDR... for DDP
            submitit.helpers.TorchDistributedEnvironment().export()
        # SLURM signals every process of the job: USR2 is for submitit's handler here, which requeues;
        # the child inherits it blocked (it would kill it), and is killed when this process exits.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
        try:
            child = subprocess.Popen([sys.executable, "-m", "distillation_lab.main", *argv])
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        with child:
            try:
                status = child.wait()
            except BaseException:  # submitit's requeue exits from here (SystemExit)
                child.kill()
                raise
        if status != 0:
            raise RuntimeError(f"python main.py {' '.join(argv)} exited with status {status}")
        return status


def minutes(time: str) -> int:
    """SLURM's HH:MM:SS in whole minutes, rounded up (submitit's timeout_min)."""
    hours, mins, secs = (int(part) for part in time.split(":"))
    return hours * 60 + mins + (secs > 0)


def flag_value(args: list[str], flag: str) -> Optional[str]:
    """The value after `flag` in a command line, if the flag is there."""
    return args[args.index(flag) + 1] if flag in args else None


def made_checkpoint(job: Job, models: str = MODELS_DIR) -> str:
    """The checkpoint a job writes, which the jobs after it read (a conversion's default name as clos-convert
    chooses it; prune: its --output)."""
    args = job.argv(models)
    if job.command == "clos-convert":
        given = {"multiplier": flag_value(args, "--multiplier"), "structure": flag_value(args, "--structure"),
                 "output": flag_value(args, "--output")}
        options = ClosConvertOptions(flag_value(args, "--checkpoint"), flag_value(args, "--layers"),
                                     **{k: int(v) if k == "multiplier" else v for k, v in given.items() if v})
        return str(options.output_path())
    return flag_value(args, "--output") or f"{models}/{job.name}.pth"


def select_jobs(only: Optional[list[str]] = None, models: str = MODELS_DIR) -> list[Job]:
    """The jobs to submit, in table order: all, or those named in `only`, whose dependencies outside `only`
    count as done: their checkpoints must exist (relative to this directory, where the jobs run)."""
    if not only:
        return list(CHAIN)
    names = [job.name for job in CHAIN]
    unknown = [name for name in only if name not in names]
    if unknown:
        raise UserError(f"unknown job{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in --jobs; "
                        f"the jobs are: {', '.join(names)}")
    jobs = [job for job in CHAIN if job.name in only]
    outside = dict.fromkeys(dep for job in jobs for dep in job.after if dep not in only)
    missing = [(made_checkpoint(job, models), job.name) for job in CHAIN if job.name in outside]
    missing = [(path, name) for path, name in missing if not Path(path).exists()]
    if missing:
        raise UserError("; ".join(f"{path} not found (job {name} makes it)" for path, name in missing)
                        + ": add " + ("that job" if len(missing) == 1 else "those jobs") + " to --jobs or run "
                        + ("it" if len(missing) == 1 else "them") + " first; nothing was submitted")
    return jobs


def submit_chain(folder: str, smoke: bool = False, partition: str = DEFAULT_PARTITION, gpus: Optional[int] = None,
                 timeout_min: Optional[int] = None, overrides: Optional[dict] = None,
                 cluster: Optional[str] = None, only: Optional[list[str]] = None) -> dict:
    """Submit the chain, or the jobs named in `only`; returns {name: submitit.Job}. `cluster="local"` runs it
    without SLURM."""
    overrides = overrides or {}
    selected = select_jobs(only, overrides.get("out_dir", MODELS_DIR))  # refused before anything is submitted
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    if executor.cluster == "debug":
        raise UserError("submitit found no cluster; use --cluster local to run the chain here")
    jobs: dict[str, submitit.Job] = {}
    for job in selected:
        n_gpus = 0 if smoke else (gpus if gpus is not None else job.gpus)
        params = {"name": job.name, "timeout_min": timeout_min or minutes(job.time),
                  "cpus_per_task": 1 if smoke else job.cpus, "mem_gb": 4 if smoke else job.mem_gb}
        if executor.cluster == "slurm":
            params.update(slurm_partition=partition, gpus_per_node=n_gpus,
                          tasks_per_node=max(n_gpus, 1) if job.trains else 1)
            deps = [jobs[dep].job_id for dep in job.after if dep in jobs]  # the others are done
            params["slurm_additional_parameters"] = (
                {"dependency": f"afterok:{':'.join(deps)}", "kill_on_invalid_dep": "yes"} if deps else {})
        executor.update_parameters(**params)
        jobs[job.name] = executor.submit(CliJob(), job_argv(job, smoke, overrides))
    return jobs
