"""The CUDA path (skipped without a GPU; `pytest -m cuda` on a GPU machine): bf16 autocast and channels_last
training that learns, the on-device loader equal to the CPU one, the bf16 teacher, checkpoints that move
between GPU and CPU, and a one-GPU torchrun run."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distillation_lab.runs import run_training
from distillation_lab.teacher import FrozenTeacher
from pruning_lab.checkpoint import load_checkpoint
from pruning_lab.data import load_splits
from pruning_lab.data.loader import BatchLoader
from pruning_lab.inference.checkpoint_eval import evaluate_checkpoint
from pruning_lab.models import create_model

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parent.parent


def test_bf16_channels_last_training_learns_on_the_gpu(tiny):
    summary = run_training(tiny(device="cuda", epochs=4, train_subset=2048, model_args={"width": 8}, lr=0.1))
    assert summary["test_acc"] > 0.9, summary["test_acc"]
    assert load_checkpoint(summary["checkpoint"])["config"]["precision"] == "auto"  # bf16 autocast on the GPU
    on_cpu = evaluate_checkpoint(summary["checkpoint"], device="cpu")  # a GPU checkpoint evaluates on a CPU
    assert abs(on_cpu["test_accuracy"] - summary["test_acc"]) < 0.02, (on_cpu["test_accuracy"], summary["test_acc"])


@pytest.mark.parametrize("input_size", [None, 224])
def test_the_device_loader_yields_the_cpu_loaders_batches(input_size):
    """Crop offsets, flips and order come from one CPU generator: the GPU batches equal the CPU ones (resized to
    224 for a pretrained ViT, up to interpolation rounding)."""
    spec, train, _, _ = load_splits("mnist_embedded", "data", 100, 512)
    kw = dict(train=True, augment=True, seed=5, max_steps=3, input_size=input_size)
    cpu = BatchLoader(train, spec, 64, "cpu", **kw)
    gpu = BatchLoader(train, spec, 64, "cuda", channels_last=True, **kw)
    for epoch in (0, 1):
        for (xa, ya), (xb, yb) in zip(cpu.epoch(epoch), gpu.epoch(epoch)):
            assert xb.is_cuda and xb.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(ya, yb.cpu())
            torch.testing.assert_close(xa, xb.cpu(), rtol=1e-5, atol=1e-4 if input_size else 1e-6)


def test_the_teacher_runs_in_bf16_on_the_gpu_and_agrees_with_fp32():
    torch.manual_seed(0)
    model = create_model("resnet18", 10, 1, 28, width=16)
    with torch.no_grad():
        model.fc.weight.mul_(20)
    x = torch.randn(128, 1, 28, 28)
    exact = FrozenTeacher(model, torch.device("cpu"), dtype=torch.float32)(x)[0]
    same = create_model("resnet18", 10, 1, 28, width=16)
    same.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()})
    teacher = FrozenTeacher(same, torch.device("cuda"))
    assert teacher.dtype == torch.bfloat16
    logits = teacher(x.cuda())[0]
    assert logits.dtype == torch.float32
    assert (logits.argmax(1).cpu() == exact.argmax(1)).float().mean() > 0.98


@pytest.mark.parametrize("first, second", [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_checkpoint_written_on_one_device_resumes_on_the_other(tiny, first, second):
    run_training(tiny(device=first, epochs=1, name="moved"))
    summary = run_training(tiny(device=second, epochs=2, name="moved", resume=True))
    assert [row["epoch"] for row in summary["history"]] == [1, 2]
    assert load_checkpoint(summary["checkpoint"].replace(".pth", "_last.pth"))["progress"]["epoch"] == 2


def test_one_gpu_torchrun(tmp_path):
    args = ["train-student", "--dataset", "mnist_embedded", "--model-args", "{width: 4}", "--epochs", "1",
            "--train-subset", "256", "--val-size", "100", "--batch-size", "64", "--no-progress", "--device", "cuda",
            "--out-dir", str(tmp_path), "--name", "one_gpu"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           "main.py", *args], cwd=ROOT, capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "one_gpu.pth").exists() and proc.stdout.count("test acc") == 1
