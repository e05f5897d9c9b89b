"""The report: re-evaluate every checkpoint in a folder on its test split, found by what it records.

Each best checkpoint says what it is: its run name and seed (config), role (teacher, student),
family (cnn, vit, text, ...), teacher, and any layer surgery (Clos). Per lab family (those of the job
table's report entries) the teacher, the student without KD and the student with KD fill report.json,
exactly the lab plan's keys (test accuracies as fractions, mean over seeds, null where missing); the
run the job table names is taken when several could fill a key. Every other run appears in
report_details.json and report.md under its family, converted models in their own list.
Pruned models (structured or unstructured, fine-tuned or not) are rows of their family beside the
students. report.png plots, per family, accuracy against parameters and against latency for every
method. Each checkpoint is read once.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import statistics
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd

from pruning_lab.errors import UserError
from pruning_lab.files import write_atomically, write_text_atomically
from pruning_lab.inference import OpenedCheckpoint, model_card, open_checkpoint, soft_target_alignment
from pruning_lab.models import model_family
from pruning_lab.runtime import resolve_precision
from pruning_lab.train.run_folder import check_writable_folder

from .chain import CHAIN, DEMO, report_runs
from .report_page import write_page
from .teacher import FrozenTeacher

KEYS = ("teacher_accuracy", "student_accuracy_without_kd", "student_accuracy_with_kd")
TABLE_RUNS = {**report_runs(DEMO), **report_runs(CHAIN)}  # (family, key) -> run name the job table writes
FAMILIES = tuple(dict.fromkeys(family for family, _ in TABLE_RUNS))  # families with teacher and students
LAB_FAMILIES = ("cnn", "vit")  # report.json: exactly the lab plan's families (text: in the details and report.md)
SEED_FILE = re.compile(r"^(?P<name>.+?)(?:_seed(?P<seed>\d+))?$")


@dataclass
class Found:
    """One best checkpoint of the folder: opened (or why not) and what it says it is."""

    path: Path
    run: str
    seed: Optional[int]
    opened: Optional[OpenedCheckpoint] = None
    error: str = ""

    @property
    def ckpt(self) -> dict:
        return self.opened.ckpt if self.opened else {}

    @property
    def family(self) -> str:
        return self.ckpt.get("family") or model_family(self.ckpt.get("arch", {}).get("name", ""))

    @property
    def kind(self) -> str:
        """converted (Clos layers), pruned, teacher, student_with_kd, student_without_kd or model."""
        kinds = {step.get("kind") for step in self.ckpt.get("surgery", [])}
        if kinds & set(STRUCTURE_NAMES):
            return "converted"
        if kinds & {"prune", "sparse"}:
            return "pruned"
        role = self.ckpt.get("role", "model")
        if role == "student":
            distilled = self.ckpt.get("teacher") or self.ckpt["config"].get("teacher_checkpoint")
            return "student_with_kd" if distilled else "student_without_kd"
        return role


def method_of(ckpt: dict, kind: str) -> str:
    """How a model was made, in a few words (for the report's rows and picture)."""
    bottleneck = any(s.get("kind") == "bottleneck" for s in ckpt.get("surgery", []))
    return made_by(ckpt, kind) + (" + key-value bottleneck" if bottleneck else "")


def made_by(ckpt: dict, kind: str) -> str:
    """How a model was made, without its bottleneck."""
    if kind == "converted":
        structures = dict.fromkeys(STRUCTURE_NAMES[s["kind"]] for s in ckpt["surgery"] if s["kind"] in STRUCTURE_NAMES)
        return " + ".join(structures) + (" + KD fine-tuning" if ckpt.get("teacher") else "")
    if kind == "student_with_kd":  # a method other than plain KD (a sweep's points) is its own method
        terms = [t for t in (ckpt.get("config", {}).get("loss") or {}) if t not in ("ce", "kd")]
        return "student with kd" + (f" ({' + '.join(terms)})" if terms else "")
    if kind != "pruned":
        return kind.replace("_", " ")
    steps = {s["kind"]: s for s in ckpt["surgery"]}
    what = (f"pruned, structured ({steps['prune'].get('importance', '?')})" if "prune" in steps
            else f"pruned, {steps['sparse'].get('sparsity', 0):.0%} sparse")
    if "prune" in ckpt:  # the pruning step's own output: not trained since
        return what
    return what + (" + KD fine-tuning" if ckpt.get("teacher") else " + fine-tuning")


STRUCTURE_NAMES = {"clos": "Clos", "lowrank": "low-rank", "monarch": "Monarch"}  # converted layers' surgery kinds
KIND_OF_KEY = {"teacher_accuracy": "teacher", "student_accuracy_without_kd": "student_without_kd",
               "student_accuracy_with_kd": "student_with_kd"}


def find_checkpoints(models_dir: Path, device: str, data_dir: Optional[str]) -> list[Found]:
    """Open every best checkpoint (not the *_last.pth resume states) once; unreadable ones keep their error."""
    found = []
    for path in sorted(models_dir.glob("*.pth")):
        if path.stem.endswith("_last"):
            continue
        try:
            opened = open_checkpoint(str(path), data_dir=data_dir, device=device)
        except Exception as e:  # noqa: BLE001  reported, never a crash and never a number, whatever the error
            match = SEED_FILE.match(path.stem)
            error = str(e) if isinstance(e, UserError) else f"{path}: cannot be opened ({type(e).__name__}: {e})"
            found.append(Found(path, match["name"], int(match["seed"]) if match["seed"] else None, error=error))
            continue
        cfg = opened.config
        name, seed = cfg.get("name") or path.stem, cfg.get("seed")
        run = name[: -len(f"_seed{seed}")] if name.endswith(f"_seed{seed}") else name
        found.append(Found(path, run, seed if run != name else None, opened))
    return found


def group_runs(found: list[Found]) -> dict[str, list[Found]]:
    """Checkpoints by run name (a run's seeds together); a second file with the same run and seed is its own run."""
    runs: dict[str, list[Found]] = {}
    for f in found:
        name = f.run if all(g.seed != f.seed for g in runs.get(f.run, [])) else f.path.stem
        runs.setdefault(name, []).append(f)
    return runs


def evaluate_found(f: Found, teacher: Optional[FrozenTeacher]) -> dict:
    """Everything the report says about one checkpoint (agreement with `teacher` for students)."""
    card = model_card(f.opened)
    cfg, ckpt = f.opened.config, f.ckpt
    card.update(seed=cfg["seed"], epochs_run=len(ckpt.get("history", [])), epochs_planned=cfg["epochs"],
                best_val_acc=ckpt.get("best_val_acc"), family=f.family, kind=f.kind, method=method_of(ckpt, f.kind),
                teacher=(ckpt.get("teacher") or {}).get("name"))
    if teacher is not None and (f.kind.startswith("student") or f.kind == "pruned"):
        try:
            alignment = soft_target_alignment(f.opened.model, teacher, f.opened.loader("test"),
                                              resolve_precision("auto", f.opened.device))
            card.update({f"teacher_{k}": v for k, v in alignment.items()})
        except RuntimeError:  # a teacher of other inputs or classes than this student: no agreement
            pass
    return card


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(name: str, checkpoints: list[Found], teacher: Optional[FrozenTeacher]) -> dict:
    """Per-seed evaluations of one run, with mean and std of the test accuracy."""
    ordered = sorted(checkpoints, key=lambda f: (f.seed is not None, f.seed or 0))
    per_seed = [evaluate_found(f, teacher) for f in ordered if f.opened]
    errors = [f.error for f in ordered if not f.opened]
    if not per_seed:
        return {"run": name, "status": "unreadable", "errors": errors}
    mean, std = mean_std([r["test_accuracy"] for r in per_seed])
    return {"run": name, "status": "ok", "test_accuracy_mean": mean, "test_accuracy_std": std,
            "seeds": [r["seed"] for r in per_seed], "runs": per_seed, "errors": errors}


def paired_difference(with_kd: dict, without_kd: dict) -> Optional[dict]:
    """KD minus baseline test accuracy over the seeds both have (same seed = same initialisation)."""
    if with_kd.get("status") != "ok" or without_kd.get("status") != "ok":
        return None
    a = {r["seed"]: r["test_accuracy"] for r in with_kd["runs"]}
    b = {r["seed"]: r["test_accuracy"] for r in without_kd["runs"]}
    diffs = [a[s] - b[s] for s in sorted(set(a) & set(b))]
    if not diffs:
        return None
    mean, std = mean_std(diffs)
    return {"mean": mean, "std": std, "seeds": len(diffs), "kd_better": sum(d > 0 for d in diffs)}


def choose(family: str, key: str, runs: dict[str, list[Found]]) -> tuple[Optional[str], list[str]]:
    """The run that fills a report key: the job table's run if present, else the only candidate; and the candidates."""
    kind = KIND_OF_KEY[key]
    candidates = [name for name, fs in runs.items()
                  if any(f.opened and f.family == family and f.kind == kind for f in fs)]
    table_run = TABLE_RUNS.get((family, key))
    if table_run in runs:  # also when unreadable: it is the run the table wrote for this key
        return table_run, candidates
    return (candidates[0] if len(candidates) == 1 else None), candidates


def family_teacher(runs: dict[str, list[Found]], name: Optional[str]) -> Optional[FrozenTeacher]:
    """The family's teacher (the run filling teacher_accuracy; seed-less or first seed) as a frozen teacher."""
    opened = [f.opened for f in sorted(runs.get(name, []), key=lambda f: f.seed is not None) if f.opened]
    # A copy: a frozen teacher is cast to bf16 on a GPU, and the teacher's own row is evaluated as trained.
    return FrozenTeacher(copy.deepcopy(opened[0].model), opened[0].device) if opened else None


def build_details(models_dir: Path, device: str, data_dir: Optional[str]) -> dict:
    """Evaluate every run, each in its family; the lab keys of the lab families; converted models."""
    runs = group_runs(find_checkpoints(models_dir, device, data_dir))
    families = list(dict.fromkeys([*LAB_FAMILIES, *(f.family for fs in runs.values() for f in fs if f.opened)]))
    details: dict = {}
    placed: set = set()
    for family in families:
        entry: dict = {}
        teacher_run, _ = choose(family, KEYS[0], runs) if family in FAMILIES else (None, [])
        teacher = family_teacher(runs, teacher_run)
        for key in KEYS if family in FAMILIES else ():
            name, candidates = choose(family, key, runs)
            if name is None:
                expected = TABLE_RUNS.get((family, key), "")
                entry[key] = {"run": expected, "status": "ambiguous" if candidates else "missing",
                              "candidates": candidates, "expected": str(models_dir / f"{expected}.pth")}
                continue
            placed.add(name)
            entry[key] = summarise(name, runs[name], teacher if key != "teacher_accuracy" else None)
        if family in FAMILIES:
            entry["kd_minus_baseline"] = paired_difference(entry[KEYS[2]], entry[KEYS[1]])
        others = [name for name, fs in runs.items() if name not in placed and fs[0].opened
                  and fs[0].family == family and fs[0].kind != "converted"]
        entry["other_runs"] = [summarise(name, runs[name], teacher) for name in others]
        placed.update(others)
        details[family] = entry
    details["converted"] = converted_models(runs)
    details["unreadable"] = [{"run": name, "errors": [f.error for f in fs]} for name, fs in runs.items()
                             if name not in placed and not any(f.opened for f in fs)]
    return details


def converted_models(runs: dict[str, list[Found]]) -> list[dict]:
    """Models with layer surgery (clos-convert outputs and their KD fine-tuned versions), re-evaluated."""
    rows = []
    for name, fs in sorted(runs.items()):
        for f in fs:
            if not f.opened or f.kind != "converted":
                continue
            card = model_card(f.opened)
            rows.append({"run": name, "status": "ok", "family": f.family, "model": card["model"],
                         "checkpoint": card["checkpoint"], "seed": f.seed, "test_loss": card["test_loss"],
                         "dataset": card["dataset"], "test_accuracy": card["test_accuracy"],
                         "parameters": card["parameters"], "macs": card["macs"], "method": method_of(f.ckpt, f.kind),
                         **{k: card[k] for k in ("file_megabytes", "latency_ms_batch1", "latency_ms_batch256")},
                         "clos_layers": [s["layer"] for s in f.ckpt["surgery"] if s.get("kind") == "clos"],
                         "converted_layers": [s["layer"] for s in f.ckpt["surgery"] if s.get("kind") in STRUCTURE_NAMES],
                         "structures": {s["layer"]: s["kind"] for s in f.ckpt["surgery"]
                                        if s.get("kind") in STRUCTURE_NAMES}})
    return rows


def evaluated_any(details: dict) -> bool:
    """Whether at least one checkpoint was evaluated."""
    entries = [e for family, entry in details.items() if family not in ("converted", "unreadable")
               for e in [*(entry[k] for k in KEYS if k in entry), *entry["other_runs"]]]
    return bool(details["converted"]) or any(e.get("status") == "ok" for e in entries)


def lab_report(details: dict) -> dict:
    """report.json: exactly the lab plan's keys; the mean test accuracy over seeds, or null."""
    return {family: {key: (details[family][key]["test_accuracy_mean"] if details[family][key]["status"] == "ok"
                           else None) for key in KEYS} for family in LAB_FAMILIES}


def table_row(family: str, what: str, e: dict) -> dict:
    """One row of report.md for an evaluated run (or its status)."""
    row = {"family": family, "what": what, "run": e["run"]}
    if e["status"] != "ok":
        return {**row, "test accuracy": e["status"]}
    first = e["runs"][0]
    agreement = [r.get("teacher_agreement") for r in e["runs"] if r.get("teacher_agreement") is not None]
    accuracy = f"{e['test_accuracy_mean']:.4f}" + (f" ± {e['test_accuracy_std']:.4f}" if len(e["runs"]) > 1 else "")
    scores = {label: f"{statistics.fmean(r[key] for r in e['runs']):.4f}" if all(key in r for r in e["runs"]) else ""
              for label, key in (("macro F1", "test_f1_macro"), ("MCC", "test_mcc"))}
    scores.update({label: f"{statistics.fmean(r[key] for r in e['runs']):.4f}"  # a regression's (glue-stsb)
                   for label, key in (("Pearson", "test_pearson"), ("Spearman", "test_spearman"))
                   if all(key in r for r in e["runs"])})
    return {**row, "seeds": str(len(e["runs"])), "test accuracy": accuracy, **scores,
            "params": f"{first['parameters']:,}", "MACs": f"{first['macs']:,}", "file MB": first["file_megabytes"],
            "latency ms (batch 1)": first["latency_ms_batch1"], "latency ms (batch 256)": first["latency_ms_batch256"],
            "agreement with teacher": f"{statistics.fmean(agreement):.4f}" if agreement else "",
            "best epoch": ", ".join(str(r["best_epoch"]) for r in e["runs"]),
            "model": first["model"], "dataset": first["dataset"],
            "acc": e["test_accuracy_mean"], "std": e["test_accuracy_std"], "n_params": first["parameters"],
            "n_macs": first["macs"],
            "latency": first["latency_ms_batch1"]}


def bottleneck_mark(e: dict) -> str:
    """' + key-value bottleneck' for a lab row whose runs have one, so it never reads as a plain model."""
    return " + key-value bottleneck" if e.get("status") == "ok" and "bottleneck" in e["runs"][0]["method"] else ""


def table(details: dict) -> pd.DataFrame:
    """One row per evaluated run, lab keys first, for report.md and report.png."""
    rows = []
    for family, entry in details.items():
        if family in ("converted", "unreadable"):
            continue
        rows += [table_row(family, key.replace("_accuracy", "").replace("_", " ") + bottleneck_mark(entry[key]), entry[key])
                 for key in KEYS if key in entry]
        rows += [table_row(family, e["runs"][0]["method"], e) for e in entry["other_runs"]]
    return pd.DataFrame(rows)


def markdown(details: dict, frame: pd.DataFrame) -> str:
    """report.md: the table, converted models and the paired KD differences."""
    shown = frame.drop(columns=[c for c in ("acc", "std", "n_params", "latency") if c in frame.columns])
    shown = shown.astype(object).fillna("")
    lines = ["# distill-lab report", "", "Test accuracy on each checkpoint's test split (mean ± sample std over seeds "
             "where a run has several).",
             "", shown.to_markdown(index=False), ""]
    if details["converted"]:
        converted = pd.DataFrame([{"run": r["run"], "model": r["model"], "method": r["method"],
                                   "converted layers": len(r["converted_layers"]),
                                   "structures": ", ".join(f"{k} {n}" for k, n in Counter(
                                       r.get("structures", {}).values()).items()),
                                   "params": f"{r['parameters']:,}", "MACs": f"{r['macs']:,}",
                                   "test accuracy": f"{r['test_accuracy']:.4f}",
                                   "latency ms (batch 1)": r["latency_ms_batch1"],
                                   "latency ms (batch 256)": r["latency_ms_batch256"]} for r in details["converted"]])
        lines += ["Converted models (Clos, low-rank or Monarch layers):", "", converted.to_markdown(index=False), ""]
    if "what" in frame.columns and frame["what"].astype(str).str.contains("sparse").any():
        lines.append("- Unstructured pruning sets weights to zero but keeps every shape: dense kernels do the same "
                     "work on zeros, so those models are no faster (compare their latency with the unpruned model's); "
                     "only their files are smaller (the zeros are stored as a bit mask). Structured pruning removes "
                     "channels, units and heads for real.")
    for r in details["unreadable"]:
        lines.append(f"- unreadable: {r['run']}: {'; '.join(r['errors'])}")
    for family, entry in details.items():
        d = entry.get("kd_minus_baseline") if isinstance(entry, dict) else None
        if d:
            spread = f" ± {d['std'] * 100:.2f}" if d["seeds"] > 1 else ""
            lines.append(f"- {family}: distilled minus baseline student, paired by seed: {d['mean'] * 100:+.2f}{spread} "
                         f"points; distillation better in {d['kd_better']} of {d['seeds']} seed{'s' * (d['seeds'] > 1)}.")
    return "\n".join(lines) + "\n"


def plot_points(frame: pd.DataFrame, details: dict) -> pd.DataFrame:
    """Every evaluated model of the report as (family, method, run, parameters, latency, accuracy, std)."""
    points = [{"family": r["family"], "method": r["what"], "run": r["run"], "parameters": r["n_params"],
               "macs": r["n_macs"], "latency": r["latency"], "acc": r["acc"], "std": r["std"]}
              for _, r in frame.iterrows() if "acc" in frame.columns and pd.notna(r["acc"])]
    points += [{"family": r["family"], "method": r["method"], "run": r["run"], "parameters": r["parameters"],
                "macs": r["macs"], "latency": r["latency_ms_batch1"], "acc": r["test_accuracy"], "std": 0.0}
               for r in details["converted"]]
    # A pruned model before its fine-tuning is near chance and would squash every other point: table only.
    points = [p for p in points if not (p["method"].startswith("pruned") and "fine-tuning" not in p["method"])]
    return pd.DataFrame(points, columns=["family", "method", "run", "parameters", "macs", "latency", "acc", "std"])


def plot(points: pd.DataFrame, path: Path) -> None:
    """report.png: per family, test accuracy against parameters and against batch-1 latency, one colour
    and marker per compression method, so that which method wins at which size shows at a glance
    (pruned models before fine-tuning are left to the table)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(points["family"])) or ["(none)"]
    fig, axes = plt.subplots(len(families), 2, figsize=(11, 4 * len(families)), squeeze=False)
    methods = list(dict.fromkeys(points["method"]))
    style = {m: (f"C{i % 10}", "osD^v<>ph*"[i % 10]) for i, m in enumerate(methods)}
    for row, family in zip(axes, families):
        mine = points[points["family"] == family]
        for ax, x, label in ((row[0], "parameters", "parameters"), (row[1], "latency", "latency, batch 1 (ms)")):
            for method, group in mine.groupby("method", sort=False):
                colour, marker = style[method]
                ax.errorbar(group[x], group["acc"], yerr=group["std"], fmt=marker, color=colour, capsize=3,
                            label=method)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel(label)
            ax.set_ylabel("test accuracy")
            ax.set_title(f"{family}: accuracy against {x}")
            ax.grid(alpha=0.3)
        if len(mine):
            row[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    try:
        write_atomically(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    finally:
        plt.close(fig)


def default_report_path(models_dir: Path) -> Path:
    """Where a report of `models_dir` goes: report.json at the top for the chain's models_saved/ (where the lab plan
    puts it), MODELS_DIR/report.json otherwise (beside the models it describes)."""
    return Path("report.json") if models_dir.resolve() == Path("models_saved").resolve() else models_dir / "report.json"


def described_folder(models: Path, out: Path) -> str:
    """The models folder as a report at `out` records it: relative to the report's folder, so that a report written
    in a job's scratch copy and copied back still names the same folder."""
    return os.path.relpath(models.resolve(), out.parent.resolve())


def check_replaces_own_report(out: Path, models: Path, overwrite: bool) -> None:
    """An existing report is replaced only by a report of the same models folder, or with --overwrite."""
    if overwrite or not out.exists():
        return
    try:
        described = json.loads(out.with_name(out.stem + "_details.json").read_text()).get("models_dir")
    except (OSError, ValueError, AttributeError):
        described = None
    if described != described_folder(models, out):
        of = f"a report of {described}" if described else "not a report this version wrote (it names no models folder)"
        raise UserError(f"{out} exists and is {of}, not of {models}: add --overwrite to replace it, or give another "
                        "--output")


def finite(value):
    """`value` (nested dicts and lists) with NaN and infinite numbers as None: JSON has no NaN, and a report
    never shows one."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write_report(models_dir: str, output: Optional[str] = None, device: str = "auto",
                 data_dir: Optional[str] = None, overwrite: bool = False) -> dict:
    """Evaluate, then write report.json, report_details.json, report.md, report.png and report.html (at `output`, by default
    where default_report_path puts them); return report.json."""
    models = Path(models_dir)
    if not models.is_dir():
        raise UserError(f"--models-dir {models} is a file: give the folder of the checkpoints" if models.exists()
                        else f"models directory not found: {models}")
    out = Path(output) if output else default_report_path(models)
    if out.is_dir() or str(output or "").endswith(("/", os.sep)):
        raise UserError(f"--output {output} is a folder: give the path of report.json (the other files go beside it)")
    check_writable_folder(out.parent, "--output's folder")  # before minutes of evaluation, not after
    check_replaces_own_report(out, models, overwrite)
    details = build_details(models, device, data_dir)
    for r in details["unreadable"]:  # marked in the files too; said here so that nobody misses it
        print(f"warning: {r['run']} not evaluated: {'; '.join(r['errors'])}", file=sys.stderr)
    if not evaluated_any(details):
        problems = [e for r in details["unreadable"] for e in r["errors"]] + [
            e for family in FAMILIES if family in details for key in KEYS for e in details[family][key].get("errors", [])]
        raise UserError(f"no model in {models} could be evaluated" + (f": {problems[0]}" if problems else
                                                                       " (no checkpoints found)"))
    details = finite(details)
    report = lab_report(details)
    frame = table(details)
    write_text_atomically(out, json.dumps(report, indent=2, allow_nan=False) + "\n")
    write_text_atomically(out.with_name(out.stem + "_details.json"),
                          json.dumps({**details, "models_dir": described_folder(models, out)}, indent=2,
                                     allow_nan=False) + "\n")
    write_text_atomically(out.with_suffix(".md"), markdown(details, frame))
    points = plot_points(frame, details)
    plot(points, out.with_suffix(".png"))
    write_text_atomically(out.with_suffix(".html"), write_page(details, frame, points, report, out))
    return report
