"""Sweeps: a grid over configuration keys, several seeds each, every point a normal run of the training loop.

    python main.py sweep --config distillation_lab/configs/demo_distill.yaml \\
        --grid 'loss: [ce, kd, ls_kd, dkd, dist]' --grid 'temperature: [2, 4]' --seeds 0 1 2 --baseline loss=kd

A point is one combination of the grid's values; it runs once per seed as the run
SWEEP__KEY-VALUE_..._seedS in the sweep's folder (its own checkpoints, log and lock, as any run).
`loss` takes a method's name (METHOD_LOSSES: the student alone, KD, KD with logit standardization,
DKD, DIST, RKD, SP, PKT, CRD, with the settings of their papers or reference code) or a whole `loss`
mapping; a shorthand such as `temperature` beside it goes into every term that has one. The sweep's
plan goes into SWEEP.sweep/ (sweep.json, one config file per run), so that a rerun continues: finished
runs are only evaluated, unfinished ones resume, a failed run fails alone. The table (per point the
test accuracy over seeds, the paired difference with the baseline point, its wins and a paired
t-test) is written to SWEEP.sweep/table.md and .json, and by `report --sweep SWEEP.sweep`.

Launchers: local (one run after another, or --parallel N at once), slurm (one array job, a task per
run, `%` throttle, the batch scripts' prologue, then a job that writes the table), submitit
(`map_array`).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import yaml

from pruning_lab.checkpoint import load_checkpoint
from pruning_lab.config import LOSS_SHORTHANDS, Config, UniqueKeyLoader, make_config, to_dict
from pruning_lab.errors import UserError, given_twice
from pruning_lab.files import write_text_atomically
from pruning_lab.inference import evaluate, open_checkpoint
from pruning_lab.train.terms import TERMS

from .chain import DEFAULT_PARTITION, MODELS_DIR

# Each method's loss, fixed before any sweep was run: the settings of its paper or of the reference code
# (mdistiller, RepDistiller, torchdistill) on CIFAR; `kd` is this project's default (the demo's).
METHOD_LOSSES: dict[str, dict] = {
    "ce": {"ce": {"weight": 1.0}},  # the student alone: no teacher
    "kd": {"ce": {"weight": 0.5}, "kd": {"weight": 0.5, "temperature": 4.0}},
    "ls_kd": {"ce": {"weight": 0.5}, "kd": {"weight": 0.5, "temperature": 4.0, "standardize": True}},
    "dkd": {"ce": {"weight": 1.0}, "dkd": {"weight": 1.0, "alpha": 1.0, "beta": 8.0, "temperature": 4.0}},
    "ls_dkd": {"ce": {"weight": 1.0}, "dkd": {"weight": 1.0, "alpha": 1.0, "beta": 8.0, "temperature": 4.0,
                                               "standardize": True}},
    "dist": {"ce": {"weight": 1.0}, "dist": {"weight": 1.0, "beta": 1.0, "gamma": 1.0, "temperature": 1.0}},
    "rkd": {"ce": {"weight": 1.0}, "rkd": {"weight": 1.0, "distance": 25.0, "angle": 50.0}},
    "sp": {"ce": {"weight": 1.0}, "sp": {"weight": 3000.0}},
    "pkt": {"ce": {"weight": 1.0}, "pkt": {"weight": 30000.0}},
    "crd": {"ce": {"weight": 1.0}, "crd": {"weight": 0.8}},  # RepDistiller's and mdistiller's CE + 0.8 CRD
}
LAUNCHERS = ("local", "slurm", "submitit")
# Keys the sweep sets itself for every run: a grid over them would be silently replaced.
SET_BY_SWEEP = {"seed": "give the seeds with --seeds", "name": "runs are named SWEEP__POINT_seedS",
                "out_dir": "give the folder with --out-dir", "resume": "a rerun continues", "role": "a student"}


@dataclass(frozen=True)
class Run:
    """One run of a sweep: a point of the grid (its values) and a seed."""

    point: str  # the point's name, KEY-VALUE_KEY-VALUE
    values: dict
    seed: int
    name: str  # the run's name: SWEEP__POINT_seedS


def parse_grid(texts: list[str], file: Optional[str] = None) -> dict[str, list]:
    """The grid from --grid 'KEY: [V1, V2]' flags and/or a YAML file of KEY: [V1, V2]; keys in order given."""
    grid: dict[str, list] = {}
    sources = [(f"--grid {t!r}", t) for t in texts]
    if file:
        try:
            sources.insert(0, (file, Path(file).read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read the grid file {file}: {e}") from None
    for source, text in sources:
        try:
            entries = yaml.load(text, Loader=UniqueKeyLoader)
        except yaml.YAMLError as e:
            raise UserError(f"{source} is not YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(entries, dict) or not entries:
            raise UserError(f"{source} must be KEY: [VALUES], e.g. --grid 'temperature: [2, 4, 8]'")
        for key, values in entries.items():
            if key in SET_BY_SWEEP:
                raise UserError(f"grid key '{key}' in {source}: the sweep sets it for every run ({SET_BY_SWEEP[key]})")
            if not isinstance(values, list):
                raise UserError(f"grid key '{key}' in {source} must list its values: '{key}: [{values}]'")
            if key in grid:
                raise UserError(f"grid key '{key}' is given twice ({source})")
            if not values:
                raise UserError(f"grid key '{key}' in {source} has no values")
            twice = given_twice(values, key=slug)
            if twice is not None:
                raise UserError(f"grid key '{key}' in {source} has the value {twice!r} twice (or two values that "
                                "name the same run)")
            grid[str(key)] = values
    if not grid:
        raise UserError("a sweep needs a grid: --grid 'KEY: [VALUES]' (repeatable) or --grid-file FILE")
    return grid


def slug(value) -> str:
    """A value as part of a run name: letters, digits, '.', '-'; a mapping by a short digest."""
    if isinstance(value, (dict, list)):
        import hashlib

        return "h" + hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9.-]+", "-", str(value)).strip("-") or "x"


def plan(grid: dict[str, list], seeds: list[int], sweep: str) -> list[Run]:
    """Every (point, seed) of the grid, points in the grid's order, seeds inside each point."""
    twice = given_twice(seeds)
    if twice is not None:
        raise UserError(f"--seeds {twice} is given twice")
    runs = []
    for combination in itertools.product(*grid.values()):
        values = dict(zip(grid, combination))
        point = "_".join(f"{key}-{slug(value)}" for key, value in values.items())
        runs += [Run(point, values, seed, f"{sweep}__{point}_seed{seed}") for seed in seeds]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise UserError("two points of the grid get the same run name (values that differ only in characters a "
                        "file name cannot hold): make the values distinct")
    return runs


def method_loss(name: str) -> dict:
    """A method's `loss` mapping (a copy), or a one-line error naming the methods."""
    if name not in METHOD_LOSSES:
        raise UserError(f"unknown method '{name}' in the grid's loss; methods: {', '.join(METHOD_LOSSES)} "
                        "(or give a whole loss mapping)")
    return json.loads(json.dumps(METHOD_LOSSES[name]))


def point_values(values: dict) -> dict:
    """A point's config values: a method name as its loss, shorthands beside `loss` folded into its terms."""
    values = dict(values)
    if "loss" not in values:
        return values
    loss = method_loss(values["loss"]) if isinstance(values["loss"], str) else values["loss"]
    if "temperature" in values:  # into every term that takes one
        temperature = values.pop("temperature")
        for term, params in loss.items():
            if term in TERMS and "temperature" in TERMS[term].parameters:
                params["temperature"] = temperature
    given = [k for k in LOSS_SHORTHANDS if k in values]
    if given:
        raise UserError(f"grid key {given[0]} beside 'loss': only temperature goes into a method's terms; give the "
                        "others inside a loss mapping")
    values["loss"] = loss
    return values


def distills(loss: dict) -> bool:
    """Whether a loss has a term that sees the teacher."""
    return any(TERMS[term].needs_teacher for term in loss if term in TERMS)


def run_config(base: Config, run: Run, out_dir: str) -> Config:
    """The config of one run: the base, the point's values, its seed and name; no teacher where no term uses one."""
    values = point_values(run.values)
    cfg = make_config(values, f"sweep point {run.point}", base=base)
    cfg = dataclasses.replace(cfg, seed=run.seed, name=run.name, out_dir=out_dir, resume=not base.overwrite)
    if cfg.loss and not distills(cfg.loss):
        cfg = dataclasses.replace(cfg, teacher_checkpoint="", teacher="")
    return cfg


def command_of(cfg: Config) -> str:
    """The main.py command that trains a run's config."""
    return "distill" if cfg.teacher_checkpoint else "train-student"


# ---------------------------------------------------------------- the sweep's folder
def sweep_folder(out_dir: str, sweep: str) -> Path:
    """OUT_DIR/SWEEP.sweep: the plan, one config file per run, the table."""
    return Path(out_dir) / f"{sweep}.sweep"


def read_plan(folder: Path) -> dict:
    """SWEEP.sweep/sweep.json, or a one-line error naming it when it is damaged."""
    path = folder / "sweep.json"
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read the sweep's plan {path}: {e}; run the sweep command again to rewrite it") from None
    if not isinstance(spec, dict) or not {"sweep", "runs", "out_dir"} <= set(spec):
        raise UserError(f"{path} is not a sweep's plan (no sweep, runs, out_dir); run the sweep command again to "
                        "rewrite it")
    return spec


def write_plan(folder: Path, sweep: str, grid: dict, seeds: list[int], baselines: list[str], runs: list[Run],
               configs: list[Config]) -> None:
    """sweep.json and runs/NAME.yaml (each run's whole config, which the launchers train)."""
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    for cfg in configs:
        write_text_atomically(folder / "runs" / f"{cfg.name}.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    spec = {"sweep": sweep, "grid": grid, "seeds": seeds, "baselines": baselines, "out_dir": configs[0].out_dir,
            "runs": [{"name": r.name, "point": r.point, "values": r.values, "seed": r.seed,
                      "command": command_of(c)} for r, c in zip(runs, configs)]}
    write_text_atomically(folder / "sweep.json", json.dumps(spec, indent=2) + "\n")


def run_argv(folder: Path, run: dict) -> list[str]:
    """The main.py arguments that train one run of the plan."""
    return [run["command"], "--config", str(folder / "runs" / f"{run['name']}.yaml"), "--no-progress"]


def run_local(folder: Path, parallel: int = 1, command: Optional[Callable[[list[str]], int]] = None) -> list[dict]:
    """Train every run of the plan here: one after another through `command` (main.py's entry point, in this
    process), or `parallel` at once as processes; a failure is recorded and the others go on. Returns the failures."""
    spec = read_plan(folder)

    def train(run: dict) -> Optional[dict]:
        print(f"=== {run['name']}: {run['command']}", flush=True)
        if parallel == 1 and command is not None:  # in this process: no interpreter start per run
            status, tail = command(run_argv(folder, run)), []
        else:
            argv = [sys.executable, "-m", "distillation_lab.main", *run_argv(folder, run)]
            done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            status, tail = done.returncode, done.stdout.strip().splitlines()[-1:]
        if status != 0:
            print(f"!!! {run['name']} failed (exit status {status}){': ' + tail[0] if tail else ''}", flush=True)
            return {"run": run["name"], "status": status}
        return None

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return [f for f in pool.map(train, spec["runs"]) if f]


# ---------------------------------------------------------------- the table
def run_result(out_dir: Path, name: str) -> Optional[dict]:
    """A finished run: the test accuracy of its checkpoint selected on validation (as the run recorded it, in
    fp32) and of its last epoch (evaluated here), its best epoch and the epochs it ran."""
    best, last = out_dir / f"{name}.pth", out_dir / f"{name}_last.pth"
    if not (best.exists() and last.exists()) or "test" not in load_checkpoint(best):
        return None
    ckpt = load_checkpoint(best)
    opened = open_checkpoint(str(last), device="cpu")
    return {"test_acc": ckpt["test"]["acc"], "best_epoch": ckpt.get("best_epoch"),
            "epochs": len(opened.ckpt.get("history") or []),
            "last_test_acc": evaluate(opened.model, opened.loader("test"))["acc"]}


def paired(diffs: list[float]) -> dict:
    """Mean ± sample std of paired differences, wins, and the paired t-test's two-sided p-value."""
    from scipy import stats

    out = {"seeds": len(diffs), "mean": statistics.fmean(diffs), "wins": sum(d > 0 for d in diffs)}
    out["std"] = statistics.stdev(diffs) if len(diffs) > 1 else None
    p = float(stats.ttest_1samp(diffs, 0.0).pvalue) if len(diffs) > 1 and (out["std"] or 0) > 0 else None
    out["p_value"] = p if p is not None and math.isfinite(p) else None
    return out


def sweep_table(folder: Path) -> dict:
    """Per point: test accuracy over its seeds, and against the baseline point paired by seed."""
    spec = read_plan(folder)
    out_dir = Path(spec["out_dir"])
    points: dict[str, dict] = {}
    for run in spec["runs"]:
        entry = points.setdefault(run["point"], {"point": run["point"], "values": run["values"], "runs": {}})
        entry["runs"][run["seed"]] = run_result(out_dir, run["name"])
    baselines = spec.get("baselines") or []
    base_points = {}
    for baseline in baselines:
        base_points[baseline] = next((p for p in points.values() if matches(p["values"], baseline)), None)
        if base_points[baseline] is None:
            raise UserError(f"--baseline {baseline} matches no point of the sweep; points: {', '.join(points)}")
    rows = []
    for p in points.values():
        done = {seed: r for seed, r in p["runs"].items() if r}
        accs = [r["test_acc"] for r in done.values()]
        row = {"point": p["point"], "values": p["values"], "seeds_done": len(done), "seeds": len(p["runs"]),
               "test_acc_mean": statistics.fmean(accs) if accs else None,
               "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else None,
               "last_test_acc_mean": statistics.fmean(r["last_test_acc"] for r in done.values()) if done else None,
               "best_epochs": [r["best_epoch"] for r in done.values()], "epochs": [r["epochs"] for r in done.values()]}
        row["vs"] = {}
        for baseline, base_point in base_points.items():
            base = {seed: r for seed, r in base_point["runs"].items() if r}
            common = sorted(set(done) & set(base))
            if common and p is not base_point:
                row["vs"][baseline] = paired([done[s]["test_acc"] - base[s]["test_acc"] for s in common])
        rows.append(row)
    return {"sweep": spec["sweep"], "baselines": baselines, "rows": rows}


def matches(values: dict, selector: str) -> bool:
    """Whether a point's values match KEY=VALUE[,KEY=VALUE] (values compared as their names in run names)."""
    wanted = dict(part.split("=", 1) for part in selector.split(",") if "=" in part)
    return bool(wanted) and all(slug(values.get(k)) == slug(v) for k, v in wanted.items())


def table_markdown(table: dict) -> str:
    """The sweep table as Markdown."""
    head = ["point", "seeds", "test accuracy (mean ± std)", "at the last epoch", "best epochs / epochs"]
    for baseline in table["baselines"]:
        head += [f"minus {baseline} (points, paired)", "better in", "paired t-test p"]
    few = table["rows"] and max(r["seeds"] for r in table["rows"]) <= 3
    lines = [f"# Sweep {table['sweep']}", "", "Test accuracy of each run's checkpoint selected on validation (and of "
             "its last epoch); differences paired by seed" + ("; with 3 seeds a p-value is weak evidence." if few
                                                               else "."), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table["rows"]:
        acc = "-" if r["test_acc_mean"] is None else f"{r['test_acc_mean']:.4f}" + (
            f" ± {r['test_acc_std']:.4f}" if r["test_acc_std"] is not None else "")
        last = "-" if r["last_test_acc_mean"] is None else f"{r['last_test_acc_mean']:.4f}"
        epochs = ", ".join(f"{b}/{e}" for b, e in zip(r["best_epochs"], r["epochs"])) or "-"
        cells = [r["point"], f"{r['seeds_done']}/{r['seeds']}", acc, last, epochs]
        for baseline in table["baselines"]:
            d = r["vs"].get(baseline)
            if d is None:
                cells += ["(baseline)" if matches(r["values"], baseline) else "-", "-", "-"]
            else:
                std = f" ± {d['std'] * 100:.2f}" if d["std"] is not None else ""
                cells += [f"{d['mean'] * 100:+.2f}{std}", f"{d['wins']}/{d['seeds']}",
                          f"{d['p_value']:.3f}" if d["p_value"] is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(folder: Path) -> str:
    """Write SWEEP.sweep/table.md and table.json; return the Markdown."""
    table = sweep_table(folder)
    text = table_markdown(table)
    write_text_atomically(folder / "table.json", json.dumps(table, indent=2) + "\n")
    write_text_atomically(folder / "table.md", text)
    return text


# ---------------------------------------------------------------- the cluster
def render_array(folder: Path, spec: dict, throttle: int, time: str, partition: str = DEFAULT_PARTITION) -> str:
    """A SLURM array job with one task per run of the plan, in the batch scripts' prologue (slurm/common.sh)."""
    names = " ".join(run["name"] for run in spec["runs"])
    commands = " ".join(run["command"] for run in spec["runs"])
    teachers = sorted({Path(load_teacher_path(folder, run)).name for run in spec["runs"]} - {""})
    return "\n".join([
        "#!/bin/bash -l",
        f"# Rendered by `python main.py sweep ... --launcher slurm` for the sweep {spec['sweep']}: one task per run.",
        f"#SBATCH --job-name={spec['sweep']}",
        *([f"#SBATCH --partition={partition}"] if partition else []),
        "#SBATCH --gres=gpu:1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32G", f"#SBATCH --time={time}",
        f"#SBATCH --array=0-{len(spec['runs']) - 1}%{throttle}",
        "#SBATCH --output=slurm/logs/%x-%A_%a.out",
        "#SBATCH --signal=B:USR1@300", "#SBATCH --requeue", "#SBATCH --open-mode=append",
        f"NAMES=({names})",
        f"COMMANDS=({commands})",
        'NAME=${NAMES[$SLURM_ARRAY_TASK_ID]}',
        'source "${DL_REPO:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/common.sh"',
        *([f"dl_require {' '.join(teachers)}"] if teachers else []),
        'dl_stage "$NAME"_last.pth',
        f'dl_run "${{COMMANDS[$SLURM_ARRAY_TASK_ID]}}" --config "$DL_REPO/{folder.as_posix()}/runs/$NAME.yaml" '
        "--no-progress",
        ""])


def load_teacher_path(folder: Path, run: dict) -> str:
    """The teacher checkpoint a run of the plan reads ('' for none)."""
    return yaml.safe_load((folder / "runs" / f"{run['name']}.yaml").read_text()).get("teacher_checkpoint") or ""


def check_slurm_layout(configs: list[Config]) -> None:
    """The batch scripts stage models_saved/ flat: the sweep's runs and teachers must be there."""
    if Path(configs[0].out_dir) != Path(MODELS_DIR):
        raise UserError(f"--launcher slurm writes the runs into {MODELS_DIR}/ (the folder the batch scripts stage and "
                        f"copy back): add --out-dir {MODELS_DIR}")
    for cfg in configs:
        if cfg.teacher_checkpoint and Path(cfg.teacher_checkpoint).parent != Path(MODELS_DIR):
            raise UserError(f"teacher {cfg.teacher_checkpoint}: on SLURM a sweep's teacher must be in {MODELS_DIR}/, "
                            "as the chain's are")


def submit_array(folder: Path, throttle: int, time: str, partition: str, sbatch: str = "sbatch") -> tuple[str, str]:
    """Write SWEEP.sweep/sweep.slurm, submit it, then a job that writes the table once every task ended."""
    spec = read_plan(folder)
    script = folder / "sweep.slurm"
    write_text_atomically(script, render_array(folder, spec, throttle, time, partition))
    Path("slurm/logs").mkdir(parents=True, exist_ok=True)
    array = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True)
    if array.returncode != 0:
        raise UserError(f"sbatch {script} failed: {array.stderr.strip() or array.stdout.strip()}")
    array_id = array.stdout.strip().split(";")[0]
    table = subprocess.run([sbatch, "--parsable", f"--dependency=afterany:{array_id}", f"--job-name={spec['sweep']}_table",
                            "--output=slurm/logs/%x-%j.out", *(["--partition", partition] if partition else []),
                            "--wrap", f"{sys.executable} -m distillation_lab.main report --sweep {folder}"],
                           capture_output=True, text=True)
    if table.returncode != 0:
        raise UserError(f"the table job was refused: {table.stderr.strip()}; write it later with "
                        f"python main.py report --sweep {folder}")
    return array_id, table.stdout.strip().split(";")[0]


def submit_submitit(folder: Path, throttle: int, timeout_min: int, partition: str, cluster: Optional[str]):
    """The plan as one submitit array (`map_array`), a task per run; returns the jobs."""
    import submitit

    from .submit import CliJob

    spec = read_plan(folder)
    executor = submitit.AutoExecutor(folder=str(folder / "submitit"), cluster=cluster)
    params = {"name": spec["sweep"], "timeout_min": timeout_min}
    if executor.cluster == "slurm":
        params.update(slurm_partition=partition, gpus_per_node=1, slurm_array_parallelism=throttle)
    executor.update_parameters(**params)
    return executor.map_array(CliJob(), [run_argv(folder, run) for run in spec["runs"]])
