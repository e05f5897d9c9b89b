"""Every distillation method against the student alone and against plain KD, on the embedded digits, 3 seeds.

    python -m benchmarks.methods_sweep [--seeds 0 1 2] [--methods ce kd ...] [--write-results]

Two sweeps of `python main.py sweep` over the methods (METHOD_LOSSES in distillation_lab/sweep.py, their
settings fixed before any run): the demo's label-scarce setting (the distillation recipe demo_distill.yaml:
the student sees 500 labels and the teacher's soft targets on all 3,500 training images, 5 epochs) and the
same recipe with all 3,500 labels. Each prints the sweep's table: per method the test accuracy over seeds
and the paired differences with the student alone (`ce`, the same recipe without the teacher) and with KD.
Runs the demo pipeline's teacher first if it is missing (models_saved/demo/cnn_teacher.pth).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.results import Results, add_results_flag
from distillation_lab.main import main
from distillation_lab.sweep import METHOD_LOSSES, sweep_folder

TEACHER = Path("models_saved/demo/cnn_teacher.pth")
RECIPE = "distillation_lab/configs/demo_distill.yaml"


def run(argv: list[str]) -> None:
    """One CLI command; stop on failure."""
    print("\n$ python main.py " + " ".join(argv), flush=True)
    if main(argv) != 0:
        raise SystemExit(f"failed: {' '.join(argv)}")


def main_(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHOD_LOSSES), choices=list(METHOD_LOSSES))
    p.add_argument("--out-dir", default="models_saved/demo/sweeps")
    add_results_flag(p)
    args = p.parse_args(argv)
    out = Results("methods_sweep", argv)
    if not TEACHER.exists():
        run(["train-teacher", "--config", "distillation_lab/configs/demo_teacher.yaml"])
    grid = f"loss: [{', '.join(args.methods)}]"
    baselines = [b for m in ("ce", "kd") if m in args.methods for b in ("--baseline", f"loss={m}")]
    for name, extra, what in (("demo_methods_500_labels", [], "500 labels + the teacher's soft targets on all 3,500 "
                                                                  "training images (the demo's setting)"),
                              ("demo_methods_all_labels", ["--labelled-subset", "none"], "all 3,500 labels")):
        run(["sweep", "--config", RECIPE, "--grid", grid, "--seeds", *map(str, args.seeds), "--sweep", name,
             "--out-dir", args.out_dir, *baselines, *extra, "--no-progress"])
        out(f"\n## {what}\n")
        out((sweep_folder(args.out_dir, name) / "table.md").read_text().split("\n", 2)[2])
    out.finish(args.write_results)


if __name__ == "__main__":
    main_()
