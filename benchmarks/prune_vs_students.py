"""Structured pruning of the demo teacher against the demo students, at the same size and training.

    python -m benchmarks.prune_vs_students [--seeds 0 1 2] [--out-dir models_saved/demo]

Runs the demo pipeline first (its finished runs are only evaluated), then prunes the ResNet-18
teacher structurally (l2 importance, --round-to 1: the demo's widths 16-128 are too small for
multiples of 8) to the ResNet-8 student's parameter count and to 2x and 4x fewer MACs. Each pruned
model is fine-tuned per seed exactly as the students are trained: the student baseline's recipe
(500 labels, 40 epochs) and the distilled student's recipe (500 labels + the teacher's soft targets
on all training images, 5 epochs), starting from the pruned weights. Prints test accuracy (mean ±
std over seeds) and the paired differences against the students (same seed: same data order), then
writes the report (every model, pruned ones included) beside the checkpoints.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.results import Results, add_results_flag
from distillation_lab.main import main
from pruning_lab.checkpoint import build_model, load_checkpoint
from pruning_lab.inference import count_flops, count_parameters


def run(argv: list[str]) -> None:
    """One CLI command; stop on failure."""
    print("\n$ python main.py " + " ".join(argv), flush=True)
    if main(argv) != 0:
        raise SystemExit(f"failed: {' '.join(argv)}")


def accuracy(path: Path) -> float:
    """The test accuracy a training run recorded in its best checkpoint."""
    return load_checkpoint(path)["test"]["acc"]


def mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0:.4f}"


def paired(a: list[float], b: list[float]) -> str:
    diffs = [x - y for x, y in zip(a, b)]
    wins = sum(d > 0 for d in diffs)
    return f"{statistics.fmean(diffs) * 100:+.2f} ± {statistics.stdev(diffs) * 100 if len(diffs) > 1 else 0:.2f} ({wins}/{len(diffs)})"


def main_(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out-dir", default="models_saved/demo")
    add_results_flag(parser)
    args = parser.parse_args(argv)
    result = Results("prune_vs_students", argv)
    out, seeds = Path(args.out_dir), args.seeds
    run(["pipeline", "--out-dir", str(out), "--seeds", *map(str, seeds), "--no-progress"])
    teacher = out / "cnn_teacher.pth"
    suffix = (lambda s: f"_seed{s}") if len(seeds) > 1 else (lambda s: "")
    student = build_model(load_checkpoint(out / f"cnn_student{suffix(seeds[0])}.pth"))
    teacher_model = build_model(load_checkpoint(teacher))
    shape = (1, 28, 28)
    students = {"alone": [accuracy(out / f"cnn_student{suffix(s)}.pth") for s in seeds],
                "kd": [accuracy(out / f"cnn_student_kd{suffix(s)}.pth") for s in seeds]}
    targets = [("parameters", str(count_parameters(student)), "the student's parameters"),
               ("macs", "2x", "2x fewer MACs"), ("macs", "4x", "4x fewer MACs")]
    width = json.dumps(load_checkpoint(teacher)["arch"]["kwargs"])
    rows = []
    for what, value, label in targets:
        pruned = out / f"cnn_teacher_pruned_{'p' if what == 'parameters' else 'macs'}{value}.pth"
        run(["prune", "--checkpoint", str(teacher), f"--target-{what}", value, "--round-to", "1", "--output",
             str(pruned), "--overwrite"])
        model = build_model(load_checkpoint(pruned))
        results = {"ft": [], "kd": []}
        for seed in seeds:
            common = ["--init-checkpoint", str(pruned), "--model", "resnet18", "--model-args", width, "--seed", str(seed),
                      "--out-dir", str(out), "--resume", "--no-progress"]
            ft, kd = f"{pruned.stem}_ft{suffix(seed)}", f"{pruned.stem}_kd{suffix(seed)}"
            run(["train-student", "--config", "distillation_lab/configs/demo_student.yaml", "--name", ft, *common])
            run(["distill", "--config", "distillation_lab/configs/demo_distill.yaml", "--name", kd, *common])
            results["ft"].append(accuracy(out / f"{ft}.pth"))
            results["kd"].append(accuracy(out / f"{kd}.pth"))
        rows.append((label, count_parameters(model), count_flops(model, shape) // 2, results))
    result(f"\nteacher: {count_parameters(teacher_model):,} parameters, {count_flops(teacher_model, shape) // 2:,} MACs, "
           f"test accuracy {accuracy(teacher):.4f}")
    result(f"ResNet-8 student: {count_parameters(student):,} parameters, {count_flops(student, shape) // 2:,} MACs; "
           f"alone {mean_std(students['alone'])}, with KD {mean_std(students['kd'])} ({len(seeds)} seeds)\n")
    result("| pruned to | parameters | MACs | pruned + fine-tuning | pruned + KD fine-tuning | "
           "pruned+FT - student alone | pruned+KD - student KD | pruned+KD - pruned+FT |")
    result("|---|---|---|---|---|---|---|---|")
    for label, params, macs, r in rows:
        result(f"| {label} | {params:,} | {macs:,} | {mean_std(r['ft'])} | {mean_std(r['kd'])} | "
               f"{paired(r['ft'], students['alone'])} | {paired(r['kd'], students['kd'])} | {paired(r['kd'], r['ft'])} |")
    result("\nDifferences in points, paired by seed (mean ± std, seeds where the first is better).")
    run(["report", "--models-dir", str(out), "--output", str(out / "report.json"), "--device", "cpu"])
    result.finish(args.write_results)


if __name__ == "__main__":
    main_()
