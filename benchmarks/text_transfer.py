"""Distillation where it can pay on text: the teacher labels tweets the student has no labels for.

    python -m benchmarks.text_transfer [--seeds 0 1 2] [--out-dir models_saved/text] [--write-results]

The teacher is `tweet_bert.yaml` (the pretrained MiniLM-L6 BERT fine-tuned on 4,000 labelled tweets,
2 epochs). Every student keeps the teacher's layers 0, 2 and 4 (`--keep-layers 0 2 4`, initialised
from its weights) and the teacher's recipe, and knows the labels of the same 4,000 tweets only:

- alone: cross-entropy on the 4,000 labelled tweets, 2 epochs (250 steps);
- alone, as many steps: the same for 5 epochs (625 steps), the control for the transfer run's steps;
- KD: 0.5 CE + 0.5 T^2 KL (T = 4) on the 4,000 labelled tweets, 2 epochs;
- KD + transfer set: the same loss over 10,000 training tweets of which only those 4,000 keep their
  labels (`--train-subset 10000 --labelled-subset 4000`): on the other 6,000 the student sees only
  the teacher's soft targets; 2 epochs (625 steps).

These settings were fixed before any of these runs was looked at. Prints, per seed and as mean ± sample
std, test accuracy, macro F1 and MCC on the 2,000 test tweets (as each run recorded them: its best
epoch by validation accuracy, evaluated on the test split at the end of the run), then KD + transfer set against each
other student paired by seed (mean difference ± std, seeds better, paired t-test p-value).
Runs are named as `benchmarks.text_students` names them, so the two share the teacher and students.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchmarks.results import Results, add_results_flag
from benchmarks.text_students import KD, RECIPE, run
from distillation_lab.sweep import paired
from pruning_lab.checkpoint import load_checkpoint

LABELLED = 4000  # tweet_bert.yaml's train_subset: the tweets the teacher was fine-tuned on
TRANSFER = 10000
METRICS = (("acc", "accuracy"), ("f1_macro", "macro F1"), ("mcc", "MCC"))  # as each run recorded its test result


def student_runs(common: list[str], teacher: str, seed: int) -> dict[str, str]:
    """Train (or, with --resume, find) the four students of one seed; their names by label."""
    names = {"alone": f"student3_seed{seed}", "alone, as many steps": f"student3_long_seed{seed}",
             "KD": f"student3_kd_seed{seed}", "KD + transfer set": f"student3_kd_transfer_seed{seed}"}
    run(["train-student", *common, "--name", names["alone"]])
    run(["train-student", *common, "--epochs", "5", "--name", names["alone, as many steps"]])
    kd = ["distill", *common, "--teacher-checkpoint", teacher, "--loss", KD]
    run([*kd, "--name", names["KD"]])
    run([*kd, "--train-subset", str(TRANSFER), "--labelled-subset", str(LABELLED),
         "--name", names["KD + transfer set"]])
    return names


def main_(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out-dir", default="models_saved/text")
    add_results_flag(parser)
    args = parser.parse_args(argv)
    result = Results("text_transfer", argv)
    out = Path(args.out_dir)
    base = ["--config", RECIPE, "--out-dir", str(out), "--resume", "--no-progress"]
    run(["train-teacher", *base, "--name", "tweet_bert"])
    teacher = str(out / "tweet_bert.pth")
    cards: dict[str, dict[int, dict]] = {}
    for seed in args.seeds:
        common = [*base, "--init-checkpoint", teacher, "--keep-layers", "0", "2", "4", "--seed", str(seed)]
        for label, name in student_runs(common, teacher, seed).items():
            cards.setdefault(label, {})[seed] = load_checkpoint(out / f"{name}.pth")["test"]
    teacher_card = load_checkpoint(teacher)["test"]
    result(f"\nTeacher (6 layers, 4,000 labels): accuracy {teacher_card['acc']:.4f}, macro F1 "
           f"{teacher_card['f1_macro']:.4f}, MCC {teacher_card['mcc']:.4f}\n")
    result("| student (3 layers, 4,000 labels) | " + " | ".join(f"seed {s} accuracy" for s in args.seeds)
           + " | " + " | ".join(name for _, name in METRICS) + " |")
    result("|---" * (1 + len(args.seeds) + len(METRICS)) + "|")
    for label, by_seed in cards.items():
        per_seed = " | ".join(f"{by_seed[s]['acc']:.4f}" for s in args.seeds)
        result(f"| {label} | {per_seed} | " + " | ".join(spread([by_seed[s][key] for s in args.seeds])
                                                        for key, _ in METRICS) + " |")
    result("\n| KD + transfer set against | " + " | ".join(f"{name}, points" for _, name in METRICS)
           + " | seeds better (accuracy) | p (accuracy) |")
    result("|---" * (3 + len(METRICS)) + "|")
    best = cards["KD + transfer set"]
    for label, by_seed in cards.items():
        if label == "KD + transfer set":
            continue
        tests = {key: paired([100 * (best[s][key] - by_seed[s][key]) for s in args.seeds]) for key, _ in METRICS}
        acc = tests["acc"]
        p = "–" if acc["p_value"] is None else f"{acc['p_value']:.3f}"
        result(f"| {label} | " + " | ".join(difference(tests[key]) for key, _ in METRICS)
               + f" | {acc['wins']} of {acc['seeds']} | {p} |")
    result.finish(args.write_results)


def spread(values: list[float]) -> str:
    """Mean ± sample std (the mean alone for one value)."""
    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def difference(test: dict) -> str:
    """A paired difference in points: mean ± std."""
    return f"{test['mean']:+.2f}" + (f" ± {test['std']:.2f}" if test["std"] is not None else "")


if __name__ == "__main__":
    main_()
