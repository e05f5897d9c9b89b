"""distill-lab command line: train, distill, evaluate, report, run the chain, convert to Clos layers, prune.

Every training option comes from one Config (pruning_lab.config): built-in defaults, then a YAML
recipe (`--config`, or the lab recipe of `--model` when no config is given), then flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Optional

from pruning_lab.config import (FIELDS, LOSS_SHORTHANDS, Config, add_config_arguments, add_dataclass_arguments,
                                 check_field, config_from_args, make_config)
from pruning_lab.errors import UserError, given_twice
from pruning_lab.models import MODELS
from pruning_lab.train.loop import INTERRUPTED_EXIT_CODE, TrainingInterrupted
from pruning_lab.train.terms import term_list

from .chain import DEFAULT_PARTITION
from .recipes import CONFIG_DIR, DEFAULT_MODEL, RECIPES, recipe_path


def resolve_config(args: argparse.Namespace, job: str) -> Config:
    """Config for a training subcommand (job: teacher, student, distill): recipe or --config, then flags."""
    yaml_path = args.config
    if yaml_path is None:
        model = getattr(args, "model", None) or DEFAULT_MODEL[job]
        recipe = RECIPES[job].get(model)
        yaml_path = str(recipe_path(recipe)) if recipe else None
        if yaml_path:
            print(f"config: lab recipe {Path(yaml_path).relative_to(CONFIG_DIR.parent.parent)} (override with flags or --config)")
    cfg = config_from_args(args, yaml_path, defaults={"model": DEFAULT_MODEL[job]})
    return dataclasses.replace(cfg, role="student" if job == "distill" else job)  # the subcommand decides


def config_overrides(args: argparse.Namespace) -> dict:
    """The config flags given on the command line (applied to every job of a chain)."""
    return {k: v for k, v in vars(args).items() if k in Config.__dataclass_fields__}


def cmd_train(args: argparse.Namespace, job: str) -> int:
    """train-teacher / train-student / distill: one run of the training loop (it distills exactly when
    the config names a teacher checkpoint, which distill requires and the others refuse)."""
    from .runs import run_training

    cfg = resolve_config(args, job)
    if job == "distill" and not cfg.teacher_checkpoint:
        raise UserError("distill needs a teacher checkpoint: --teacher-checkpoint models_saved/cnn_teacher.pth "
                        "(written by train-teacher)")
    if job != "distill":  # a flag the command would not use is an error, not ignored
        unused = [k for k in ("teacher_checkpoint", "teacher", "extra_teachers", *LOSS_SHORTHANDS)
                  if getattr(cfg, k) not in ("", None, [])]
        if unused:
            raise UserError(f"train-{job} trains without a teacher, but {', '.join(unused)} "
                            f"{'is' if len(unused) == 1 else 'are'} set; use the distill command to train with one")
    summary = run_training(cfg)
    if os.environ.get("RANK", "0") != "0":  # data-parallel: rank 0 reports
        return 0
    print_summary([summary])
    if "teacher_agreement" in summary:
        print(f"\nagreement with the teacher on the test split: {summary['teacher_agreement']:.4f}, "
              f"mean KL(teacher || student): {summary['teacher_kl']:.4f}")
    return 0


def print_summary(rows: list[dict]) -> None:
    """A small table of finished runs."""
    width = max([24, *(len(r["name"]) + 2 for r in rows)])
    print(f"\n{'run':<{width}}{'model':<13}{'params':>12}{'best epoch':>12}{'val acc':>9}{'test acc':>10}")
    for r in rows:
        val = f"{r['val_acc']:.4f}" if r["val_acc"] >= 0 else "-"
        test = f"{r['test_acc']:.4f}" if r["test_acc"] is not None else "-"
        print(f"{r['name']:<{width}}{r['model']:<13}{r['params']:>12,}{r['best_epoch']:>12}{val:>9}{test:>10}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    """evaluate CHECKPOINT: test accuracy and loss, parameters, FLOPs/MACs, latency."""
    from pruning_lab.inference.checkpoint_eval import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, expect_model=args.model, data_dir=args.data_dir,
                                 device=args.device, batch_size=args.batch_size, precision=args.precision)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        width = max(map(len, result)) + 2
        for key, value in result.items():
            print(f"{key:<{width}}{value}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """report: re-evaluate checkpoints and write the report files."""
    from .report import write_report

    if args.sweep:
        from .sweep import write_table

        if not (Path(args.sweep) / "sweep.json").is_file():
            raise UserError(f"--sweep {args.sweep}: no sweep.json there (give the SWEEP.sweep folder a sweep wrote)")
        given = [flag for flag, value in (("--models-dir", args.models_dir), ("--output", args.output),
                                          ("--data-dir", args.data_dir), ("--overwrite", args.overwrite or None))
                 if value is not None]
        if given:
            raise UserError(f"{given[0]} does not apply with --sweep: the table is written to "
                            f"{Path(args.sweep) / 'table.md'} (and table.json) from the runs the sweep's plan names")
        print(write_table(Path(args.sweep)))
        return 0
    report = write_report(args.models_dir or "models_saved", args.output, device=args.device, data_dir=args.data_dir,
                          overwrite=args.overwrite)
    print(json.dumps(report, indent=2))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """submit: the lab chain through submitit (SLURM, or --cluster local)."""
    from .submit import submit_chain

    twice = given_twice(args.jobs or [])
    if twice is not None:
        raise UserError(f"--jobs {twice} is given twice")
    if Path(args.folder).exists() and not Path(args.folder).is_dir():
        raise UserError(f"--folder {args.folder} is a file: give a folder for submitit's job files and logs")
    if args.cluster == "local" and args.partition is not None:  # submitit's local executor has no partitions
        raise UserError(f"--partition {args.partition} is for SLURM: --cluster local runs the jobs here, leave it out")
    jobs = submit_chain(args.folder, smoke=args.smoke, partition=args.partition or DEFAULT_PARTITION, gpus=args.gpus,
                        timeout_min=args.timeout_min, overrides=config_overrides(args), cluster=args.cluster,
                        only=args.jobs)
    print("submitted: " + " ".join(f"{name}={job.job_id}" for name, job in jobs.items()), flush=True)
    if args.wait:
        for name, job in jobs.items():
            job.result()  # raises submitit's FailedJobError with the job's traceback
            print(f"{name}: done", flush=True)
    return 0


def options_from_args(cls: type, args: argparse.Namespace, **given):
    """The options dataclass of a command from its parsed flags (flags not given: the dataclass's defaults)."""
    return cls(**{k: v for k, v in vars(args).items() if k in cls.__dataclass_fields__ and k not in given}, **given)


def cmd_clos_convert(args: argparse.Namespace) -> int:
    """clos-convert: replace linear layers by fitted Clos layers; optional KD fine-tuning."""
    from .clos_convert import ClosConvertOptions, clos_convert

    loss = {k: v for k, v in vars(args).items() if k in ("loss", *LOSS_SHORTHANDS)}
    make_config(loss, "command line")  # a loss given twice is refused before any work
    like = vars(args).pop("params_like", None)
    if like is not None and args.multiplier != like:  # --multiplier after --params-like (before: ParamsLike refuses)
        raise UserError(f"--params-like clos:{like} and --multiplier {args.multiplier} both set the size: give one")
    summary = clos_convert(options_from_args(ClosConvertOptions, args, loss=loss))
    for layer in summary["layers"]:
        if layer["structure"] == "dense":  # --budget kept it
            print(f"{layer['layer']}: kept dense ({layer['dense_parameters']:,} parameters)")
            continue
        fit = layer.get("data_aware", layer["weight_space"])
        err = fit.get("relative_error_heldout", fit.get("identity_probe_relative_error"))
        m = layer.get("multiplier", summary["multiplier"])
        budget = f" as {layer['structure']} m={m}" if "budget_share" in summary else \
            "" if layer["structure"] == "clos" else f" (Clos m={m}: {layer['clos_parameters']:,})"
        print(f"{layer['layer']}: {layer['dense_parameters']:,} -> {layer['parameters']:,} parameters{budget}, "
              f"relative output error {err:.4f}")
    print(f"parameters {summary['parameters_before']:,} -> {summary['parameters_after']:,} "
          f"({summary['compression']:.2f}x); test accuracy {summary['test_accuracy_before']:.4f} -> "
          f"{summary['test_accuracy_after']:.4f}"
          + (f" -> {summary['test_accuracy_finetuned']:.4f} after KD fine-tuning" if "test_accuracy_finetuned" in summary else ""))
    if "embedding_cosine_after" in summary:
        print(f"sentence-embedding cosine to the original on the test texts: {summary['embedding_cosine_after']:.4f}"
              + (f" -> {summary['embedding_cosine_finetuned']:.4f} after KD fine-tuning"
                 if "embedding_cosine_finetuned" in summary else ""))
    print(f"saved {summary['output']}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """prune: structured or unstructured pruning, one-shot or gradual, with (KD) fine-tuning."""
    from .prune import PruneOptions, prune

    loss = {k: v for k, v in vars(args).items() if k in ("loss", *LOSS_SHORTHANDS)}
    summary = prune(options_from_args(PruneOptions, args, loss=loss))
    print(f"parameters {summary['parameters_before']:,} -> {summary['parameters_after']:,}, MACs "
          f"{summary['macs_before']:,} -> {summary['macs_after']:,}; test accuracy {summary['test_accuracy_before']:.4f} "
          f"-> {summary['test_accuracy_pruned']:.4f} pruned"
          + (f" -> {summary['test_accuracy_finetuned']:.4f} fine-tuned" if "test_accuracy_finetuned" in summary else ""))
    print(f"saved {summary['output']}" + (f" and {summary['finetuned_output']}" if "finetuned_output" in summary else ""))
    return 0


def cmd_prepare_data(args: argparse.Namespace) -> int:
    """prepare-data: download (where the internet is reachable) and check a dataset."""
    from pruning_lab.data import download, load_splits

    if args.download:
        folder = Path(args.data_dir)
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--data-dir {folder} is a file: give a folder for the dataset")
        made = not folder.exists()
        try:
            download(args.dataset, args.data_dir)
        except OSError as e:  # urllib's URLError included: no internet (a compute node), a proxy, a full disk
            if made and folder.is_dir() and not any(folder.rglob("*")):
                folder.rmdir()
            reason = getattr(e, "reason", None) or e.strerror or e
            raise UserError(f"prepare-data --download {args.dataset}: cannot fetch it ({reason}); download on a "
                            f"machine with internet access (a login node) and copy {args.data_dir} here") from None
    spec, train_split, val_split, test_split = load_splits(args.dataset, args.data_dir, args.val_size)
    shape = (f"{spec.input_size} tokens" if spec.kind == "tokens"
             else f"{spec.channels}x{spec.input_size}x{spec.input_size}")
    print(f"{spec.name} in {args.data_dir}: {len(train_split)} train, {len(val_split)} validation, "
          f"{len(test_split)} test examples; {shape}, {spec.num_classes} classes")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    """pipeline: the whole local chain of a preset (teacher, student, evaluation, summary)."""
    from .pipeline import run_pipeline

    rows, report_path = run_pipeline(args.preset, config_overrides(args), args.seeds)
    print_summary(rows)
    print(f"\n{report_path.with_suffix('.md').read_text()}")
    print(f"report: {report_path} (+ {report_path.stem}_details.json, .md, .png beside it)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """sweep: a grid of runs over seeds, trained here or on the cluster, and its table."""
    from . import sweep as sw

    launcher_flags(args)
    base = resolve_config(args, "distill")
    grid = sw.parse_grid(args.grid or [], args.grid_file)
    name = args.sweep or f"{base.run_name()}_sweep"
    check_name(name, "--sweep")
    runs = sw.plan(grid, args.seeds, name)
    out_dir = args.out_dir or str(Path(base.out_dir) / "sweeps")
    configs = [sw.run_config(base, run, out_dir) for run in runs]  # every point checked before any work
    for baseline in args.baseline or []:
        if not any(sw.matches(r.values, baseline) for r in runs):
            raise UserError(f"--baseline {baseline} matches no point; points: "
                            f"{', '.join(dict.fromkeys(r.point for r in runs))}")
    missing = sorted({c.teacher_checkpoint for c in configs if c.teacher_checkpoint
                      and not Path(c.teacher_checkpoint).is_file()})
    if missing:
        raise UserError(f"teacher checkpoint {missing[0]} not found: train it first (the demo's: python main.py "
                        "pipeline), or give --teacher-checkpoint")
    if args.launcher == "slurm":
        sw.check_slurm_layout(configs)
    folder = sw.sweep_folder(out_dir, name)
    sw.write_plan(folder, name, grid, args.seeds, args.baseline or [], runs, configs)
    print(f"sweep {name}: {len(dict.fromkeys(r.point for r in runs))} points x {len(args.seeds)} seeds = "
          f"{len(runs)} runs; plan in {folder}")
    if args.launcher == "slurm":
        array, table = sw.submit_array(folder, args.max_parallel, args.time, args.partition)
        print(f"submitted array job {array} ({len(runs)} tasks, at most {args.max_parallel} at once) and job {table}, "
              f"which writes {folder}/table.md when they have ended")
        return 0
    if args.launcher == "submitit":
        jobs = sw.submit_submitit(folder, args.max_parallel, minutes_of(args.time), args.partition, args.cluster)
        print(f"submitted {len(jobs)} runs through submitit (array {jobs[0].job_id.split('_')[0]}); when they have "
              f"ended: python main.py report --sweep {folder}")
        return 0
    failed = sw.run_local(folder, args.parallel, command=main)
    print("\n" + sw.write_table(folder) + f"\ntable: {folder}/table.md (and table.json)")
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(f['run'] for f in failed)} (the others are in the table; "
              "rerun the same command to retry them)", file=sys.stderr)
        return 1
    return 0


SWEEP_CLUSTER_DEFAULTS = {"max_parallel": 8, "time": "08:00:00", "partition": DEFAULT_PARTITION}
LAUNCHER_FLAGS = {"local": ("parallel",), "slurm": ("max_parallel", "time", "partition"),
                  "submitit": ("max_parallel", "time", "partition", "cluster")}


def launcher_flags(args: argparse.Namespace) -> None:
    """Refuse a launcher's flag given to another launcher (it would be ignored); fill in the defaults."""
    for key in dict.fromkeys(k for flags in LAUNCHER_FLAGS.values() for k in flags):
        if getattr(args, key) is not None and key not in LAUNCHER_FLAGS[args.launcher]:
            users = [launcher for launcher, flags in LAUNCHER_FLAGS.items() if key in flags]
            raise UserError(f"--{key.replace('_', '-')} applies to --launcher {' or '.join(users)}, not "
                            f"{args.launcher}")
    args.parallel = args.parallel or 1
    for key, value in SWEEP_CLUSTER_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def minutes_of(time: str) -> int:
    """SLURM's HH:MM:SS in minutes."""
    from .submit import minutes

    return minutes(time)


def check_name(name: str, flag: str) -> None:
    """A name that becomes part of file names: a plain file name."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or "__" in name:
        raise UserError(f"{flag} {name!r} must be a plain name (letters, digits, '.', '_', '-'; no '__', no path)")


# ------------------------------------------------------------------ the command line, one parser per command
def recipes_help(job: str) -> str:
    """What --help says about the recipes a training command uses: their effective defaults."""
    from .recipes import recipe_config

    lines = []
    for model, recipe in RECIPES[job].items():
        cfg = recipe_config(recipe)
        lines.append(f"--model {model}: {recipe}.yaml (run name {cfg.run_name()}, {cfg.epochs} epochs, "
                     f"{cfg.optimizer} lr {cfg.lr}, batch {cfg.batch_size}, {cfg.dataset})")
    return (f" Without --model: {DEFAULT_MODEL[job]}. Recipes: " + "; ".join(lines) + ". The [default: ...] "
            f"values below are those of {default_recipe(job)}.yaml (the recipe of {DEFAULT_MODEL[job]}); another "
            "--model's recipe or --config replaces them; flags replace both.")


def default_recipe(job: str) -> str:
    """The recipe a training command uses when given neither --model nor --config."""
    return RECIPES[job][DEFAULT_MODEL[job]]


def recipe_defaults(job: str) -> Config:
    """The effective defaults of a training command without --model or --config: its default recipe."""
    from .recipes import recipe_config

    return recipe_config(default_recipe(job))


def add_train_parser(sub, role: str) -> None:
    """train-teacher / train-student."""
    p = sub.add_parser(f"train-{role}", help=f"train a {role} model (default {DEFAULT_MODEL[role]})",
                       description=f"Train a {role}. Models: {', '.join(sorted(MODELS))}. Without --config "
                                   "the lab recipe of --model is used (configs/ in distillation_lab)."
                                   + recipes_help(role))
    p.add_argument("--config", help="YAML config file (keys as the flags below, with underscores)")
    add_config_arguments(p, skip=("role",), defaults=recipe_defaults(role))
    p.set_defaults(func=lambda a: cmd_train(a, role))


def add_distill_parser(sub) -> None:
    """distill."""
    p = sub.add_parser("distill", help="distill a student from a frozen teacher checkpoint",
                       description="Train a student with a loss that also sees a frozen teacher: "
                                   "alpha * CE + (1 - alpha) * T^2 * KL by default, or the named terms of `loss` "
                                   f"({term_list()}). Without --config the lab recipe of the "
                                   "student is used." + recipes_help("distill"))
    p.add_argument("--config", help="YAML config file (keys as the flags below, with underscores)")
    p.add_argument("--student", dest="model", default=argparse.SUPPRESS, help="the student architecture (same as --model)")
    add_config_arguments(p, skip=("role",), defaults=recipe_defaults("distill"))
    p.set_defaults(func=lambda a: cmd_train(a, "distill"))


def add_report_parser(sub) -> None:
    """report."""
    p = sub.add_parser("report", help="re-evaluate every checkpoint and write report.json, .md, .png and .html",
                       description="Re-evaluate every checkpoint in --models-dir on its test split, found by "
                                   "what it records (role, family, teacher, surgery); write report.json (the lab "
                                   "plan's keys), report_details.json, report.md, report.png and report.html (one "
                                   "self-contained page).")
    p.add_argument("--models-dir", help="where the checkpoints are (default models_saved)")
    p.add_argument("--output", help="report.json path; the other files go beside it (default: report.json here for "
                   "models_saved/, MODELS_DIR/report.json for another folder)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a report of another models folder (a report of the same folder is always replaced)")
    p.add_argument("--sweep", help="instead: write the table of the sweep in this SWEEP.sweep folder")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device")
    p.add_argument("--data-dir", help="dataset directory (default: the one recorded in each checkpoint)")
    p.set_defaults(func=cmd_report)


def add_evaluate_parser(sub) -> None:
    """evaluate CHECKPOINT."""
    p = sub.add_parser("evaluate", help="evaluate a checkpoint on the test split")
    p.add_argument("checkpoint", help="path to a .pth written by this tool")
    p.add_argument("--model", help="fail unless the checkpoint holds this architecture")
    p.add_argument("--data-dir", help="dataset directory (default: the one recorded in the checkpoint)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device")
    p.add_argument("--batch-size", type=at_least(1), default=256, help="evaluation batch size")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16", "auto"),
                   help="precision of the evaluation (fp32, as every number the tool reports, unless asked)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_evaluate)


def add_submit_parser(sub) -> None:
    """submit."""
    p = sub.add_parser("submit", help="submit the whole lab chain through submitit",
                       description="Submit every job of the job table (distillation_lab/chain.py), or those "
                                   "of --jobs, each after the jobs it needs (afterok, kill_on_invalid_dep), through "
                                   "submitit. Jobs run in this directory. The batch scripts (slurm/submit_chain.sh) do the same with scratch "
                                   "staging.")
    p.add_argument("--folder", default="slurm/submitit", help="submitit's folder for job files and logs")
    p.add_argument("--smoke", action="store_true", help="embedded data, tiny models, a few steps, CPU")
    p.add_argument("--partition", help=f"SLURM partition (default {DEFAULT_PARTITION})")
    p.add_argument("--gpus", type=at_least(0), help="GPUs per job (more than 1: data-parallel) [default: the job table's]")
    p.add_argument("--timeout-min", type=at_least(1), help="time limit of every job in minutes [default: the job table's]")
    p.add_argument("--cluster", choices=("slurm", "local"), help="force submitit's executor (default: detect)")
    p.add_argument("--wait", action="store_true", help="wait for every job and fail if one fails")
    p.add_argument("--jobs", nargs="+", metavar="NAME", help="submit only these jobs of the table (e.g. to resubmit "
                   "part of the chain); the jobs they wait for outside them count as done, so their checkpoints "
                   "must exist [default: every job]")
    add_config_arguments(p, skip=("model", "model_args", "name", "role", "family", "resume", "teacher",
                                  "teacher_checkpoint", "extra_teachers", "init_checkpoint", "keep_layers", "bottleneck"))
    p.set_defaults(func=cmd_submit)


def seed_value(text: str) -> int:
    """An argparse type: a seed, an integer in [0, 2**32 - 1]."""
    value = at_least(0)(text)
    if value > 2**32 - 1:
        raise argparse.ArgumentTypeError(f"{value} must be <= 2**32 - 1")
    return value


def slurm_time(text: str) -> str:
    """An argparse type: a SLURM time limit HH:MM:SS above zero."""
    match = re.fullmatch(r"(\d+):([0-5]\d):([0-5]\d)", text)
    if not match or not any(int(part) for part in match.groups()):
        raise argparse.ArgumentTypeError(f"'{text}' is not a time limit HH:MM:SS above zero, e.g. 08:00:00")
    return text


def at_least(low: int):
    """An argparse type: an integer >= `low`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        return value
    return parse


class ParamsLike(argparse.Action):
    """--params-like clos:M sets the multiplier, as --multiplier does: refused beside it (it would be ignored)."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        if getattr(namespace, "multiplier", None) is not None:
            raise UserError(f"--params-like clos:{value} and --multiplier {namespace.multiplier} both set the size: "
                            "give one")
        namespace.multiplier = namespace.params_like = value


def params_like(value: str) -> int:
    """--params-like clos:M -> M (checked as --multiplier is, under the name --params-like)."""
    from .clos_convert import ClosConvertOptions

    kind, _, m = value.partition(":")
    if kind != "clos" or not m.strip().lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(f"'{value}' is not clos:M with M an integer (e.g. clos:4)")
    return check_field(ClosConvertOptions, "multiplier", int(m), "M in --params-like clos:M")


def add_clos_convert_parser(sub) -> None:
    """clos-convert."""
    from .clos_convert import ClosConvertOptions

    p = sub.add_parser("clos-convert", help="replace linear layers by Clos layers fitted to them",
                       description="Replace the linear layers matching --layers (glob, comma-separated) by Clos "
                                   "layers, layer by layer: weight-space fit (ALS), then a data-aware fit on the "
                                   "layer's real inputs; evaluate; save a checkpoint recording the conversion; "
                                   "optionally fine-tune with KD from the original model.")
    add_dataclass_arguments(p, ClosConvertOptions, skip=("loss",), negatable=False)
    p.add_argument("--params-like", metavar="clos:M", type=params_like, dest="multiplier", action=ParamsLike,
                   default=argparse.SUPPRESS,
                   help="the same as --multiplier M: give each layer the parameters of the Clos layer at m = M")
    add_config_arguments(p, only=("loss", *LOSS_SHORTHANDS),
                         title="the KD fine-tuning's loss (as for distill; default alpha 0.5, temperature 4)")
    p.set_defaults(func=cmd_clos_convert)


def add_prune_parser(sub) -> None:
    """prune."""
    from pruning_lab.prune.structured import STRUCTURED_MODELS

    from .prune import PruneOptions

    p = sub.add_parser("prune", help="prune a trained model (structured or unstructured), then fine-tune it",
                       description="Structured pruning removes channels, hidden units and attention heads for real "
                                   f"({STRUCTURED_MODELS}; Torch-Pruning's dependency graph), so the model has fewer "
                                   "parameters and MACs and runs faster. Unstructured pruning zeroes the smallest "
                                   "weights of all layers (global magnitude): a smaller file, no faster on dense "
                                   "kernels. In --steps steps, each followed by its share of --finetune-epochs of "
                                   "fine-tuning that distils from the unpruned model (or --teacher-checkpoint; "
                                   "--no-kd: labels only). Writes CHECKPOINT_TAG.pth and, fine-tuned, CHECKPOINT_TAG_kd.pth "
                                   "(or _ft.pth).")
    add_dataclass_arguments(p, PruneOptions, skip=("loss",), negatable=False)
    add_config_arguments(p, only=("loss", *LOSS_SHORTHANDS),
                         title="the KD fine-tuning's loss (as for distill; default alpha 0.5, temperature 4)")
    p.set_defaults(func=cmd_prune)


def add_prepare_data_parser(sub) -> None:
    """prepare-data."""
    p = sub.add_parser("prepare-data", help="download (--download) and check a dataset")
    p.add_argument("--dataset", default="cifar10", choices=[d for d in FIELDS["dataset"].metadata["choices"] if d != "custom"],
                   help="dataset")
    p.add_argument("--data-dir", default="data", help="where to put or find it")
    p.add_argument("--val-size", type=int, default=None, help="validation images held out of train")
    p.add_argument("--download", action="store_true", help="fetch it (needs the internet: a cluster login node)")
    p.set_defaults(func=cmd_prepare_data)


def add_sweep_parser(sub) -> None:
    """sweep."""
    from .sweep import LAUNCHERS, METHOD_LOSSES

    p = sub.add_parser("sweep", help="a grid of runs over configuration keys and seeds, and its table",
                       description="Train one run per point of a grid and seed, from a recipe or --config (the "
                                   "distill recipes by default), each a normal run with its own checkpoints, named "
                                   "SWEEP__KEY-VALUE_seedS; then write a table of the points over their seeds, "
                                   "paired with --baseline. `loss` in the grid takes method names "
                                   f"({', '.join(METHOD_LOSSES)}) or whole loss mappings. A rerun continues: "
                                   "finished runs are only evaluated.")
    p.add_argument("--config", help="YAML config file of the runs (keys as the flags below, with underscores)")
    p.add_argument("--grid", action="append", help="KEY: [VALUES] (repeatable), e.g. 'loss: [kd, dist]'")
    p.add_argument("--grid-file", help="YAML file of KEY: [VALUES]")
    p.add_argument("--seeds", type=seed_value, nargs="+", default=[0, 1, 2], help="seeds of every point")
    p.add_argument("--sweep", help="the sweep's name (default: the run name + _sweep)")
    p.add_argument("--baseline", action="append", help="KEY=VALUE[,KEY=VALUE]: a point every other is paired with, "
                   "e.g. loss=kd (repeatable)")
    p.add_argument("--launcher", default="local", choices=LAUNCHERS,
                   help="local: here, one run after another (--parallel N at once); slurm: one array job; "
                        "submitit: map_array")
    # Each launcher's own flags default to None, so that one given to another launcher is refused, not ignored.
    p.add_argument("--parallel", type=at_least(1), help="local: runs at once (default 1)")
    p.add_argument("--max-parallel", type=at_least(1),
                   help=f"slurm, submitit: tasks at once (the %% throttle; default {SWEEP_CLUSTER_DEFAULTS['max_parallel']})")
    p.add_argument("--time", type=slurm_time,
                   help=f"slurm, submitit: time limit per run (HH:MM:SS; default {SWEEP_CLUSTER_DEFAULTS['time']})")
    p.add_argument("--partition", help=f"slurm, submitit: partition (default {DEFAULT_PARTITION})")
    p.add_argument("--cluster", help="submitit: 'local' runs without SLURM")
    add_config_arguments(p, skip=("role", "name", "seed", "resume"), defaults=recipe_defaults("distill"))
    p.set_defaults(func=cmd_sweep)


def add_pipeline_parser(sub) -> None:
    """pipeline."""
    p = sub.add_parser("pipeline", help="run the whole local chain of a preset and write the report",
                       description="Train the preset's jobs of the job table (teachers, then per seed the student "
                                   "baselines and the distilled students), then write the report (report.json in "
                                   "the repository for models_saved/, else beside the checkpoints). Config flags "
                                   "apply to every job (--model-args to every model; the loss options to the "
                                   "distillation jobs only).")
    p.add_argument("--preset", default="demo", help="demo (embedded MNIST, CPU, minutes) or cifar10 (a GPU)")
    p.add_argument("--seeds", type=seed_value, nargs="+", help="student seeds (default: 0 1 2 for demo, 0 for cifar10)")
    add_config_arguments(p, skip=("model", "name", "role", "family", "resume", "seed", "teacher",
                                  "teacher_checkpoint", "extra_teachers", "init_checkpoint", "keep_layers", "bottleneck",
                                  "labelled_subset"))
    p.set_defaults(func=cmd_pipeline)


class CommandLineParser(argparse.ArgumentParser):
    """argparse with one-line errors, like every other error of this program (exit status 2)."""

    def error(self, message: str) -> None:
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree: one parser per command, in the order of the README's table."""
    parser = CommandLineParser(prog="python main.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_parser(sub, "teacher")
    add_train_parser(sub, "student")
    add_distill_parser(sub)
    add_evaluate_parser(sub)
    add_report_parser(sub)
    add_prepare_data_parser(sub)
    add_pipeline_parser(sub)
    add_sweep_parser(sub)
    add_submit_parser(sub)
    add_clos_convert_parser(sub)
    add_prune_parser(sub)
    return parser


def for_the_user(message: str) -> str:
    """In a batch job's scratch copy (DL_MODELS_DIR_SHOWN set by slurm/common.sh), the paths of its
    models_saved/ become those of the real models folder, which the user can look into."""
    real = os.environ.get("DL_MODELS_DIR_SHOWN")
    if not real:
        return message
    message = message.replace(str(Path.cwd() / "models_saved"), real)
    return re.sub(r"(?<![\w/.-])models_saved(?=/|\s|$)", lambda _: real, message)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: run a subcommand; user errors are one line on stderr and exit status 2."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0), or a usage error already printed on one line (2)
        return e.code if isinstance(e.code, int) else 2
    except UserError as e:  # a flag's value refused while parsing, as the option's dataclass refuses it
        print(f"error: {for_the_user(str(e))}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {for_the_user(str(e))}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        if os.environ.get("RANK", "0") == "0":  # one message per run, not per process
            print(f"interrupted: {for_the_user(str(e))}", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except Exception as e:  # a bug: one line first, then the traceback for the report
        print(f"error: internal error, please report it: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
              file=sys.stderr)
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
