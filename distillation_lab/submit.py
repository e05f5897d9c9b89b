"""The lab chain from Python through submitit: every job of the job table (chain.py), each after the
jobs it needs (afterok, kill_on_invalid_dep), as the batch scripts of slurm/submit_chain.sh run them.

submitit runs each job's command line (`python main.py ...` in-process) on the cluster in the
submitting directory: no scratch staging (use the batch scripts for that).
"""
from __future__ import annotations

import json
from typing import Optional

import submitit

from pruning_lab.errors import UserError

from .chain import CHAIN, MODELS_DIR, Job


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
    """What one cluster job runs: `python main.py ARGV`, in-process (submitit pickles it with ARGV).

    Checkpointable: on submitit's time-limit or preemption signal (USR2) the job is requeued with
    the same arguments, as the batch scripts requeue themselves; training jobs carry --resume, so
    the new start continues from the last checkpoint (the epoch in progress is trained again).
    """

    def __call__(self, argv: list[str]) -> int:
        from .main import main

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # one task per GPU: export RANK, WORLD_SIZE, MASTER_ADDR... for DDP
            submitit.helpers.TorchDistributedEnvironment().export()
        status = main(argv)
        if status != 0:
            raise RuntimeError(f"python main.py {' '.join(argv)} exited with status {status}")
        return status


def minutes(time: str) -> int:
    """SLURM's HH:MM:SS in minutes."""
    hours, mins, _ = (int(part) for part in time.split(":"))
    return hours * 60 + mins


def submit_chain(folder: str, smoke: bool = False, partition: str = "markov_gpu", gpus: Optional[int] = None,
                 timeout_min: Optional[int] = None, overrides: Optional[dict] = None,
                 cluster: Optional[str] = None) -> dict:
    """Submit the chain; returns {name: submitit.Job}. `cluster="local"` runs it without SLURM."""
    overrides = overrides or {}
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    if executor.cluster == "debug":
        raise UserError("submitit found no cluster; use --cluster local to run the chain here")
    jobs: dict[str, submitit.Job] = {}
    for job in CHAIN:
        n_gpus = 0 if smoke else (gpus if gpus is not None else job.gpus)
        params = {"name": job.name, "timeout_min": timeout_min or minutes(job.time),
                  "cpus_per_task": 1 if smoke else job.cpus, "mem_gb": 4 if smoke else job.mem_gb}
        if executor.cluster == "slurm":
            params.update(slurm_partition=partition, gpus_per_node=n_gpus,
                          tasks_per_node=max(n_gpus, 1) if job.trains else 1)
            if job.after:
                deps = ":".join(jobs[dep].job_id for dep in job.after)
                params["slurm_additional_parameters"] = {"dependency": f"afterok:{deps}", "kill_on_invalid_dep": "yes"}
        executor.update_parameters(**params)
        jobs[job.name] = executor.submit(CliJob(), job_argv(job, smoke, overrides))
    return jobs
