"""The lab chain from Python through submitit: the training jobs, their dependencies and the report of
slurm/submit_chain.sh (the Clos conversions run as batch scripts only: slurm/clos_convert_*.slurm).

submitit runs each job's Python function on the cluster in the submitting directory (no scratch
staging: use the batch scripts for that), with afterok dependencies and kill_on_invalid_dep.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import submitit

from pruning_lab.config import Config, make_config
from pruning_lab.errors import UserError

from .recipes import recipe_config
from .report import write_report
from .runs import run_training

# name -> (config, distilling, the job it waits for)
CHAIN = {
    "cnn_teacher": ("cnn_teacher", False, None),
    "vit_teacher": ("vit_teacher", False, None),
    "cnn_student": ("cnn_student", False, "cnn_teacher"),
    "cnn_student_kd": ("distill_cnn", True, "cnn_teacher"),
    "vit_student": ("vit_student", False, "vit_teacher"),
    "vit_student_kd": ("distill_vit", True, "vit_teacher"),
}
SMOKE = {"dataset": "mnist_embedded", "epochs": 1, "max_steps_per_epoch": 2, "batch_size": 32, "val_size": 100,
         "device": "cpu", "progress": False}
SMOKE_MODEL_ARGS = {"cnn": {"width": 4}, "vit": {"depth": 1, "embed_dim": 16, "num_heads": 2}}


def chain_configs(smoke: bool, overrides: dict) -> dict[str, Config]:
    """The resolved config of every training job of the chain."""
    configs = {}
    for name, (config, _, _) in CHAIN.items():
        cfg = recipe_config(config, {**SMOKE, "model_args": SMOKE_MODEL_ARGS[name[:3]]}, "smoke preset") \
            if smoke else recipe_config(config)
        configs[name] = make_config(overrides, "command line", base=cfg)
    return configs


def train_job(cfg_dict: dict, distilling: bool) -> dict:
    """What one cluster job runs (a plain function: submitit pickles it with its arguments)."""
    env = submitit.JobEnvironment()
    if env.num_tasks > 1:  # one task per GPU: export RANK, WORLD_SIZE, MASTER_ADDR... for DDP
        submitit.helpers.TorchDistributedEnvironment().export()
    return run_training(make_config(cfg_dict, "submitit job"), distilling)


def report_job(models_dir: str, output: str) -> dict:
    """The report job."""
    return write_report(models_dir, output)


def submit_chain(folder: str, smoke: bool = False, partition: str = "markov_gpu", gpus: int = 1,
                 timeout_min: int = 24 * 60, overrides: Optional[dict] = None, cluster: Optional[str] = None) -> dict:
    """Submit the chain; returns {name: submitit.Job}. `cluster="local"` runs it without SLURM."""
    configs = chain_configs(smoke, overrides or {})
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    if executor.cluster == "debug":
        raise UserError("submitit found no cluster; use --cluster local to run the chain here")
    jobs: dict[str, submitit.Job] = {}

    def submit(name: str, fn, *args, after: list[str] = ()) -> None:
        params = {"name": name, "timeout_min": timeout_min, "cpus_per_task": 8, "mem_gb": 32}
        if executor.cluster == "slurm":
            params.update(slurm_partition=partition, gpus_per_node=0 if smoke else gpus, mem_gb=4 if smoke else 32,
                          cpus_per_task=1 if smoke else 8, tasks_per_node=1 if smoke or name == "report" else gpus)
            if after:
                deps = ":".join(jobs[a].job_id for a in after)
                params["slurm_additional_parameters"] = {"dependency": f"afterok:{deps}", "kill_on_invalid_dep": "yes"}
        executor.update_parameters(**params)
        jobs[name] = executor.submit(fn, *args)

    for name, (_, distilling, teacher) in CHAIN.items():
        submit(name, train_job, dataclasses.asdict(configs[name]), distilling, after=[teacher] if teacher else [])
    out_dir = configs["cnn_teacher"].out_dir
    submit("report", report_job, out_dir, "report.json", after=list(CHAIN))
    return jobs
