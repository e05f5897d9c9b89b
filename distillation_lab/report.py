"""The report: re-evaluate every teacher and student checkpoint on the test split.

Writes report.json with exactly the lab plan's keys (test accuracies as fractions, mean over seeds,
null where a checkpoint is missing), report_details.json (parameters, MACs, latency, agreement with
the teacher, epochs, seeds, mean and std), report.md (a table) and report.png (accuracy against
parameters), all from the same evaluations.
"""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Optional

import pandas as pd

from pruning_lab.data import BatchLoader, load_splits
from pruning_lab.errors import UserError
from pruning_lab.inference.checkpoint_eval import evaluate_checkpoint
from pruning_lab.runtime import resolve_device, resolve_precision
from pruning_lab.train import build_model, load_checkpoint

from .metrics import soft_target_alignment
from .teacher import load_teacher

FAMILIES = {"cnn": ("cnn_teacher", "cnn_student", "cnn_student_kd"),
            "vit": ("vit_teacher", "vit_student", "vit_student_kd")}
KEYS = ("teacher_accuracy", "student_accuracy_without_kd", "student_accuracy_with_kd")
RUN_FILE = re.compile(r"^(?P<name>.+?)(?:_seed(?P<seed>\d+))?\.pth$")


def find_runs(models_dir: Path) -> dict[str, dict[int, Path]]:
    """Best checkpoints by run name and seed (NAME.pth is seed None, NAME_seedN.pth seed N)."""
    runs: dict[str, dict] = {}
    for path in sorted(models_dir.glob("*.pth")):
        match = RUN_FILE.match(path.name)
        if match and not path.stem.endswith("_last"):
            seed = int(match["seed"]) if match["seed"] is not None else None
            runs.setdefault(match["name"], {})[seed] = path
    return runs


def alignment(student_path: Path, teacher_path: Path, device: str, data_dir: Optional[str]) -> dict:
    """Agreement and KL of a student with a teacher on the student's test split."""
    ckpt = load_checkpoint(student_path)
    dev = resolve_device(device)
    student = build_model(ckpt, source=str(student_path)).to(dev)
    teacher = load_teacher(str(teacher_path), "", ckpt["data"], dev)
    cfg = ckpt["config"]
    spec, _, _, test = load_splits(cfg["dataset"], data_dir or cfg["data_dir"], cfg["val_size"],
                                   image_size=cfg["image_size"])
    loader = BatchLoader(test, spec, 256, dev, image_size=ckpt["arch"]["image_size"])
    return soft_target_alignment(student, teacher, loader, resolve_precision("auto", dev))


def evaluate_run(path: Path, teacher_path: Optional[Path], device: str, data_dir: Optional[str]) -> dict:
    """Everything the report says about one checkpoint."""
    card = evaluate_checkpoint(str(path), data_dir=data_dir, device=device)
    ckpt = load_checkpoint(path)
    card.update(seed=ckpt["config"]["seed"], epochs_run=len(ckpt.get("history", [])),
                epochs_planned=ckpt["config"]["epochs"], best_val_acc=ckpt.get("best_val_acc"))
    if teacher_path is not None:
        card.update({f"teacher_{k}": v for k, v in alignment(path, teacher_path, device, data_dir).items()})
    return card


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(name: str, runs: dict[int, Path], teacher_path: Optional[Path], device: str,
              data_dir: Optional[str]) -> dict:
    """Per-seed evaluations of one run name, with mean and std of the test accuracy."""
    per_seed, errors = [], []
    for seed, path in sorted(runs.items(), key=lambda kv: (kv[0] is not None, kv[0])):
        try:
            per_seed.append(evaluate_run(path, teacher_path, device, data_dir))
        except UserError as e:  # an unreadable file is reported, never a crash and never a number
            errors.append(str(e))
    if not per_seed:
        return {"run": name, "status": "missing" if not errors else "unreadable", "errors": errors}
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


def build_details(models_dir: Path, device: str, data_dir: Optional[str]) -> dict:
    """Evaluate the teacher, baseline student and distilled student of every family."""
    found = find_runs(models_dir)
    details = {}
    for family, names in FAMILIES.items():
        teacher_runs = found.get(names[0], {})
        teacher_path = teacher_runs.get(None) or next(iter(teacher_runs.values()), None)
        entry = {}
        for key, name in zip(KEYS, names):
            if name not in found:
                entry[key] = {"run": name, "status": "missing", "expected": str(models_dir / f"{name}.pth")}
                continue
            student_teacher = teacher_path if key != "teacher_accuracy" else None
            entry[key] = summarise(name, found[name], student_teacher, device, data_dir)
        entry["kd_minus_baseline"] = paired_difference(entry[KEYS[2]], entry[KEYS[1]])
        details[family] = entry
    details["converted"] = converted_models(found, device, data_dir)
    return details


def converted_models(found: dict, device: str, data_dir: Optional[str]) -> list[dict]:
    """Models with Clos layers (clos-convert outputs and their KD fine-tuned versions), re-evaluated."""
    rows = []
    for name, runs in sorted(found.items()):
        if "_clos_m" not in name:
            continue
        for path in runs.values():
            try:
                card = evaluate_checkpoint(str(path), data_dir=data_dir, device=device)
            except UserError as e:
                rows.append({"run": name, "status": "unreadable", "errors": [str(e)]})
                continue
            surgery = load_checkpoint(path).get("surgery", [])
            rows.append({"run": name, "status": "ok", "model": card["model"], "dataset": card["dataset"],
                         "test_accuracy": card["test_accuracy"], "parameters": card["parameters"],
                         "macs": card["macs"], "clos_layers": [s["layer"] for s in surgery]})
    return rows


def lab_report(details: dict) -> dict:
    """report.json: exactly the lab plan's keys; the mean test accuracy over seeds, or null."""
    return {family: {key: (details[family][key]["test_accuracy_mean"] if details[family][key]["status"] == "ok"
                           else None) for key in KEYS} for family in FAMILIES}


def table(details: dict) -> pd.DataFrame:
    """One row per evaluated run name, for report.md and report.png."""
    rows = []
    for family in FAMILIES:
        entry = details[family]
        for key in KEYS:
            e = entry[key]
            row = {"family": family, "what": key.replace("_accuracy", "").replace("_", " "), "run": e["run"]}
            if e["status"] != "ok":
                rows.append({**row, "test accuracy": e["status"]})
                continue
            first = e["runs"][0]
            agreement = [r.get("teacher_agreement") for r in e["runs"] if r.get("teacher_agreement") is not None]
            rows.append({**row, "seeds": str(len(e["runs"])),
                         "test accuracy": f"{e['test_accuracy_mean']:.4f} ± {e['test_accuracy_std']:.4f}",
                         "params": f"{first['parameters']:,}", "MACs": f"{first['macs']:,}",
                         "latency ms (batch 1)": first["latency_ms_batch1"],
                         "agreement with teacher": f"{statistics.fmean(agreement):.4f}" if agreement else "",
                         "best epoch": ", ".join(str(r["best_epoch"]) for r in e["runs"]),
                         "model": first["model"], "dataset": first["dataset"],
                         "acc": e["test_accuracy_mean"], "std": e["test_accuracy_std"],
                         "n_params": first["parameters"]})
    return pd.DataFrame(rows)


def markdown(details: dict, frame: pd.DataFrame) -> str:
    """report.md: the table plus the paired KD differences."""
    shown = frame.drop(columns=[c for c in ("acc", "std", "n_params") if c in frame.columns]).astype(object).fillna("")
    lines = ["# distill-lab report", "", "Test accuracy on each checkpoint's test split (mean ± sample std over seeds).",
             "", shown.to_markdown(index=False), ""]
    if details["converted"]:
        converted = pd.DataFrame([{"run": r["run"], "model": r.get("model", ""), "Clos layers": len(r.get("clos_layers", [])),
                                   "params": f"{r['parameters']:,}" if "parameters" in r else "",
                                   "test accuracy": f"{r['test_accuracy']:.4f}" if "test_accuracy" in r else r["status"]}
                                  for r in details["converted"]])
        lines += ["Converted models (Clos layers):", "", converted.to_markdown(index=False), ""]
    for family in FAMILIES:
        d = details[family]["kd_minus_baseline"]
        if d:
            lines.append(f"- {family}: distilled minus baseline student, paired by seed: {d['mean'] * 100:+.2f} ± "
                         f"{d['std'] * 100:.2f} points; distillation better in {d['kd_better']} of {d['seeds']} seeds.")
    return "\n".join(lines) + "\n"


def plot(frame: pd.DataFrame, path: Path) -> None:
    """report.png: test accuracy against parameters, one marker per run."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ok = frame[frame["test accuracy"].astype(str).str.contains("±")] if len(frame) else frame
    for _, row in ok.iterrows():
        ax.errorbar(row["n_params"], row["acc"], yerr=row["std"], fmt="o", capsize=3)
        ax.annotate(f"{row['family']} {row['what']}", (row["n_params"], row["acc"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("parameters")
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy against size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(models_dir: str, output: str = "report.json", device: str = "auto",
                 data_dir: Optional[str] = None) -> dict:
    """Evaluate, then write report.json, report_details.json, report.md and report.png; return report.json."""
    models = Path(models_dir)
    if not models.is_dir():
        raise UserError(f"models directory not found: {models}")
    details = build_details(models, device, data_dir)
    report = lab_report(details)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame = table(details)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_name(out.stem + "_details.json").write_text(json.dumps(details, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(details, frame))
    plot(frame, out.with_suffix(".png"))
    return report
