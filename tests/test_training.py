"""The training loop: it learns, it resumes bit-identically, its checkpoints survive a kill."""
import os
import signal

import pandas as pd
import pytest
import torch

import pruning_lab.checkpoint as checkpoint_module
from pruning_lab.config import make_config
from pruning_lab.checkpoint import load_checkpoint, save_checkpoint
from pruning_lab.train import CrossEntropyCriterion, TrainingInterrupted, train
from pruning_lab.train.optim import lr_factor


def test_short_run_learns_and_writes_checkpoints_and_log(tiny):
    cfg = tiny(epochs=3, train_subset=1024, model_args={"width": 8})
    result = train(cfg)
    assert result["test_acc"] > 0.6  # chance is 0.1
    best = load_checkpoint(result["checkpoint"])
    assert best["arch"]["name"] == "resnet8" and best["config"]["epochs"] == 3
    assert best["test"]["acc"] == result["test_acc"] and best["test"]["n"] == 1000
    assert best["best_val_acc"] == max(r["val_acc"] for r in best["history"])
    assert "optimizer" not in best  # best is weights + metadata; resume state lives in _last
    last = load_checkpoint(os.path.join(cfg.out_dir, "tiny_last.pth"))
    assert {"optimizer", "scheduler", "rng", "scaler", "progress"} <= set(last)
    log = pd.read_csv(os.path.join(cfg.out_dir, "tiny_log.csv"))
    assert list(log["epoch"]) == [1, 2, 3]
    assert {"train_loss", "train_loss_ce", "train_acc", "val_acc", "lr", "images_per_s", "seconds"} <= set(log.columns)
    assert log["train_loss"].iloc[-1] < log["train_loss"].iloc[0]


class SigtermAtStep(CrossEntropyCriterion):
    """Cross-entropy that sends this process a real SIGTERM at a given step (a SLURM time limit)."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step, self.calls = step, 0

    def forward(self, *args):
        self.calls += 1
        if self.calls == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().forward(*args)


@pytest.mark.parametrize("stop_step", [5, 8])  # mid-epoch, and the last step of epoch 1
def test_interrupted_and_resumed_run_is_bit_identical(tiny, tmp_path, stop_step):
    cfg = tiny(epochs=3, train_subset=256, batch_size=32, warmup_epochs=1, augment=True)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        train(cfg, SigtermAtStep(stop_step))
    progress = load_checkpoint(os.path.join(cfg.out_dir, "tiny_last.pth"))["progress"]
    assert (progress["epoch"], progress["step"]) == ((0, stop_step) if stop_step < 8 else (1, 0))
    resumed = train(make_config({"resume": True}, base=cfg))
    straight_cfg = make_config({"out_dir": str(tmp_path / "straight")}, base=cfg)
    straight = train(straight_cfg)
    a = load_checkpoint(os.path.join(cfg.out_dir, "tiny_last.pth"))
    b = load_checkpoint(os.path.join(straight_cfg.out_dir, "tiny_last.pth"))
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    timing = {"seconds", "images_per_s"}
    strip = lambda h: [{k: v for k, v in row.items() if k not in timing} for row in h]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])
    assert resumed["test_acc"] == straight["test_acc"]


def test_resume_refuses_another_architecture(tiny):
    cfg = tiny(epochs=1)
    train(cfg)
    with pytest.raises(Exception, match="cannot resume .* holds resnet8 .*this run builds resnet18"):
        train(make_config({"resume": True, "model": "resnet18"}, base=cfg))


def test_save_killed_half_way_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "model.pth"
    save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    real_save = torch.save

    def dying_save(obj, f):
        real_save(obj, f)
        f.truncate(f.tell() // 2)  # half the bytes are on disk when the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]


def test_lr_schedules(tiny):
    cfg = tiny(epochs=10, scheduler="multistep", milestones=[5, 8], gamma=0.1, warmup_epochs=1)
    assert lr_factor(0, 10, cfg) == pytest.approx(0.1) and lr_factor(9, 10, cfg) == pytest.approx(1.0)
    assert lr_factor(49, 10, cfg) == 1.0 and lr_factor(50, 10, cfg) == pytest.approx(0.1)
    assert lr_factor(80, 10, cfg) == pytest.approx(0.01)
    cos = make_config({"scheduler": "cosine", "warmup_epochs": 0.0}, base=cfg)
    assert lr_factor(0, 10, cos) == 1.0 and lr_factor(50, 10, cos) == pytest.approx(0.5)
    assert lr_factor(100, 10, cos) == pytest.approx(0.0)


@pytest.mark.e2e
def test_two_process_data_parallel_matches_one_process(tmp_path):
    """torchrun with 2 gloo processes on CPU, global batch 64, equals 1 process at batch 64."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    args = ["train-student", "--model", "mnist_mlp", "--model-args", "{hidden: [32, 16]}", "--dataset",
            "mnist_embedded", "--epochs", "2", "--train-subset", "512", "--val-size", "100", "--batch-size", "64",
            "--lr", "0.05", "--no-progress", "--name", "m",
            "--precision", "fp32"]  # exact arithmetic: bf16 rounds a batch of 32 and one of 64 differently
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "main.py", *args, "--out-dir", str(tmp_path / "one")], cwd=root,
                         capture_output=True, text=True, env=env)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "main.py", *args, "--out-dir", str(tmp_path / "two")], cwd=root, capture_output=True,
                         text=True, env=env)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("test acc") == 1  # rank 0 reports
    a = load_checkpoint(tmp_path / "one/m_last.pth")
    b = load_checkpoint(tmp_path / "two/m_last.pth")
    for key in a["state_dict"]:
        assert torch.allclose(a["state_dict"][key], b["state_dict"][key], atol=1e-5), key
    assert a["history"][-1]["train_loss"] == pytest.approx(b["history"][-1]["train_loss"], rel=1e-5)
    assert a["history"][-1]["val_acc"] == b["history"][-1]["val_acc"]
