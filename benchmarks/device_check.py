"""The GPU path proven in one call: tests, the demo, the chain's speed and Clos on the device, every figure written.

    python -m benchmarks.device_check --out DIR [--device cuda] [--budget-s 480]
    python -m benchmarks.device_check --out DIR --device cpu --quick      # the same parts, small, under 2 minutes

Runs, in order, each as its own process with its share of a time budget it enforces itself (a part
that fails or runs out of time is recorded, and the next one still runs):

1. tests: `pytest -m cuda` (tests/test_cuda.py; skipped without a GPU) and the CPU tests that touch
   devices, dtypes and checkpoints (tests/test_integrity.py, tests/test_api.py);
2. demo: the demo pipeline for one seed on the device, compared with the CPU seeds in the README;
3. train_speed: images per second of each job of the chain, its projected time at the plan's epochs,
   the fraction of the bf16 peak, peak memory; the tutorial loop and torchdistill beside ours;
4. clos_speed: Clos, low-rank and Monarch against dense on the MNIST and BERT shapes, in fp32 and
   bf16 (where the device has it), and whether the cost model picks the faster of Clos's two paths.

Writes DIR/device_check.json (every figure), DIR/device_check.md (one table) and DIR/NAME.log (each
part's output); the parts' own JSON files land in DIR too.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent

# The demo on CPU, as the README quotes it (`python main.py pipeline`, 3 seeds, 2026-12-02, AVX512-BF16
# CPU): mean and sample std over seeds of each report.json key; tests/test_benchmarks.py checks that the
# README still says so.
CPU_DEMO = {"teacher_accuracy": (0.9790, None, 1), "student_accuracy_without_kd": (0.9263, 0.0031, 3),
            "student_accuracy_with_kd": (0.9573, 0.0035, 3)}
TEST_EXAMPLES = 1000  # the demo's test digits
MIN_PART_S = 5.0  # a part is not started with less time than this left


@dataclass
class Part:
    """One part of the check: a command, its share of the budget, and how its figures are read."""

    name: str
    argv: list[str]
    share_s: float
    figures: Callable[[Path], dict]
    result: dict = field(default_factory=dict)


def test_counts(out: Path) -> dict:
    """Passed, failed, errors and skipped from pytest's JUnit XML."""
    suite = ET.parse(out / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failed, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    failing = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
               if case.find("failure") is not None or case.find("error") is not None]
    return {"passed": total - failed - errors - skipped, "failed": failed, "errors": errors, "skipped": skipped,
            "failing": failing}


def within_spread(key: str, measured: Optional[float]) -> dict:
    """The device's demo figure against the CPU seeds: within 2 sample std of their mean (at least 2 standard
    errors of a test-set accuracy, for the one-seed teacher)."""
    mean, std, seeds = CPU_DEMO[key]
    test_se = math.sqrt(mean * (1 - mean) / TEST_EXAMPLES)
    tolerance = max(2 * (std or 0.0), 2 * test_se)
    return {"device": measured, "cpu_mean": mean, "cpu_std": std, "cpu_seeds": seeds, "tolerance": tolerance,
            "within": measured is not None and abs(measured - mean) <= tolerance}


def demo_figures(folder: Path, compare: bool) -> Callable[[Path], dict]:
    """Reads the demo's report.json in `folder` (compared with the CPU seeds unless the run was cut short)."""
    def read(out: Path) -> dict:
        report = json.loads((folder / "report.json").read_text())["cnn"]
        if not compare:
            return {key: {"device": report.get(key), "compared": False} for key in CPU_DEMO}
        return {key: within_spread(key, report.get(key)) for key in CPU_DEMO}
    return read


def speed_figures(out: Path) -> dict:
    """Per job the training rate, projected time and fraction of the bf16 peak; the loop comparison."""
    data = json.loads((out / "train_speed.json").read_text())
    jobs = {r["job"]: {k: r.get(k) for k in ("train_images_per_s", "projected_job_s", "fraction_of_bf16_peak",
                                              "peak_memory_mb", "precision", "batch_size")} for r in data["jobs"]}
    comparison = data.get("comparison") or {}
    return {"device": data["settings"]["device"], "jobs": jobs, "skipped": data.get("skipped", []),
            "projected_chain_s": sum(j["projected_job_s"] for j in jobs.values()),
            "comparison": {k: v for k, v in comparison.items() if k.startswith(("speedup", "ours_s", "tutorial_s",
                                                                                 "torchdistill_s", "rounds"))}}


def clos_figures(out: Path) -> dict:
    """Per shape, precision and multiplier: Clos (the path its cost model picks) against dense, whether that path
    was the faster of the two, and the low-rank and Monarch layers of the same parameters."""
    rows = json.loads((out / "clos_speed.json").read_text())["rows"]
    key = lambda r: (r["in_features"], r["out_features"], r["rows"], r["precision"])  # noqa: E731
    dense = {key(r): r["ms"] for r in rows if r["structure"] == "dense"}
    found = []
    for r in rows:
        if r["structure"] != "clos" or not r["auto"]:
            continue
        other = next(o for o in rows if key(o) == key(r) and o["structure"] == "clos"
                     and o["multiplier"] == r["multiplier"] and not o["auto"])
        peers = {o["structure"]: o["ms"] for o in rows if key(o) == key(r) and o["multiplier"] == r["multiplier"]
                 and o["structure"] in ("lowrank", "monarch")}
        found.append({"shape": f"{r['in_features']}x{r['out_features']}:{r['rows']}", "precision": r["precision"],
                      "multiplier": r["multiplier"], "dense_ms": dense[key(r)], "clos_ms": r["ms"],
                      "clos_path": r["path"], "picked_faster_path": r["ms"] <= other["ms"] * 1.05,
                      "clos_vs_dense": dense[key(r)] / r["ms"], **{f"{k}_ms": v for k, v in peers.items()}})
    return {"layers": found, "picked_faster": sum(f["picked_faster_path"] for f in found), "of": len(found)}


def parts(out: Path, device: str, quick: bool) -> list[Part]:
    """The check's parts, in order, for `device`; `quick`: small enough for 2 CPU cores in under 2 minutes."""
    py = sys.executable
    tests = ["tests/test_cuda.py", "tests/test_integrity.py", *([] if quick else ["tests/test_api.py"])]
    demo = out / "demo"
    demo_flags = (["--epochs", "1", "--train-subset", "512", "--val-size", "100", "--model-args", "{width: 4}"]
                  if quick else [])
    speed = (["--jobs", "cnn_student", "--steps", "2", "--warmup", "1", "--compare-steps", "4", "--compare-rounds",
              "1"] if quick else [])
    clos = (["--shapes", "64x64:32", "--repeats", "3", "--precisions", "fp32"] if quick else
            ["--precisions", "fp32", "bf16", "--repeats", "30"])
    shares = (25, 45, 25, 15) if quick else (120, 120, 150, 90)
    return [
        Part("tests", [py, "-m", "pytest", "-q", *tests, *(["-k", "checksum or gpu or device"] if quick else []),
                       f"--junitxml={out / 'tests.xml'}"], shares[0], test_counts),
        Part("demo", [py, "main.py", "pipeline", "--seeds", "0", "--device", device, "--out-dir", str(demo),
                      "--overwrite", "--no-progress", *demo_flags], shares[1], demo_figures(demo, compare=not quick)),
        Part("train_speed", [py, "-m", "benchmarks.train_speed", "--device", device, *speed,
                             "--json", str(out / "train_speed.json")], shares[2], speed_figures),
        Part("clos_speed", [py, "-m", "benchmarks.clos_speed", "--device", device, *clos,
                            "--json", str(out / "clos_speed.json")], shares[3], clos_figures),
    ]


def run_part(part: Part, out: Path, deadline: float) -> dict:
    """Run one part within its share and what is left of the budget; record what happened and its figures."""
    left = deadline - time.monotonic()
    timeout = min(part.share_s, left)
    if timeout < MIN_PART_S:
        return {"status": "not run: the time budget was spent", "seconds": 0.0}
    started = time.monotonic()
    log = out / f"{part.name}.log"
    with open(log, "w") as f:
        f.write("$ " + " ".join(part.argv) + "\n")
        f.flush()
        try:
            code = subprocess.run(part.argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
            status = "ok" if code == 0 else f"failed (exit status {code})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout:.0f} s"
    result = {"status": status, "seconds": round(time.monotonic() - started, 1), "log": log.name}
    try:
        result["figures"] = part.figures(out)
    except (OSError, ValueError, KeyError, StopIteration, TypeError, ET.ParseError) as e:
        result["figures_error"] = f"{type(e).__name__}: {e}"
    return result


def summary_lines(results: dict) -> list[str]:
    """The Markdown table: one row per part, its status, time and headline figures."""
    lines = ["| part | status | seconds | figures |", "|---|---|---:|---|"]
    for name, r in results["parts"].items():
        lines.append(f"| {name} | {r['status']} | {r['seconds']} | {headline(name, r.get('figures'))} |")
    return lines


def headline(name: str, f: Optional[dict]) -> str:
    """A part's figures in one cell."""
    if not f:
        return "-"
    if name == "tests":
        return f"{f['passed']} passed, {f['failed'] + f['errors']} failed, {f['skipped']} skipped"
    if name == "demo" and not all(v.get("compared", True) for v in f.values()):
        return "; ".join(f"{k.replace('_accuracy', '').replace('_', ' ')} {v['device']:.4f}" for k, v in f.items()
                         if v["device"] is not None) + " (--quick: cut short, not compared with the CPU seeds)"
    if name == "demo":
        return "; ".join(f"{k.replace('_accuracy', '').replace('_', ' ')} {v['device']:.4f} (CPU {v['cpu_mean']:.4f}, "
                         f"{'within' if v['within'] else 'OUTSIDE'} ±{v['tolerance']:.4f})"
                         for k, v in f.items() if v["device"] is not None)
    if name == "train_speed":
        jobs = ", ".join(f"{k} {v['train_images_per_s']:,.0f} img/s" for k, v in f["jobs"].items())
        cmp = f["comparison"]
        ratios = ", ".join(f"{k.replace('speedup_over_', '')} {v:.2f}x" for k, v in cmp.items() if k.startswith("speedup"))
        return f"{jobs}; chain projected {f['projected_chain_s'] / 60:,.1f} min" + (f"; ours vs {ratios}" if ratios else "")
    if name == "clos_speed":
        worst = min((x["clos_vs_dense"] for x in f["layers"] if x["multiplier"] == 2), default=None)
        return (f"cost model picked the faster path {f['picked_faster']}/{f['of']}"
                + (f"; Clos m=2 vs dense at worst {worst:.2f}x" if worst is not None else ""))
    return "-"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for device_check.json, device_check.md and the logs")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--quick", action="store_true", help="small parts: the whole check in under 2 minutes on 2 CPU cores")
    p.add_argument("--budget-s", type=float, default=None, help="seconds for all parts [default: 480, quick: 110]")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget = args.budget_s or (110 if args.quick else 480)
    deadline = time.monotonic() + budget
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": args.device, "quick": args.quick,
               "budget_s": budget, "command": " ".join([sys.executable, "-m", "benchmarks.device_check",
                                                        *(argv if argv is not None else sys.argv[1:])]),
               "parts": {}}
    for part in parts(out, args.device, args.quick):
        print(f"device_check: {part.name} (up to {min(part.share_s, max(deadline - time.monotonic(), 0)):.0f} s)",
              flush=True)
        results["parts"][part.name] = run_part(part, out, deadline)
        print(f"device_check: {part.name}: {results['parts'][part.name]['status']}", flush=True)
    results["seconds"] = round(budget - max(deadline - time.monotonic(), 0), 1)
    (out / "device_check.json").write_text(json.dumps(results, indent=2) + "\n")
    table = "\n".join([f"# device_check, {results['date']}", "", f"`{results['command']}`", "",
                       *summary_lines(results), ""])
    (out / "device_check.md").write_text(table)
    print(table)
    return 0 if all(r["status"] == "ok" for r in results["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
