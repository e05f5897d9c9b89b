"""Training curves: every run writes TensorBoard events that TensorBoard's own reader reads back, and a
resumed run continues the same curves (no restart at step 0, no step logged twice)."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from distillation_lab.main import main
from pruning_lab.train import TrainingInterrupted
from pruning_lab.train import loop
from pruning_lab.train.curves import curves_folder, read_curves
from test_api import SigtermAtCall

TINY = ["--dataset", "mnist_embedded", "--model-args", "{width: 4}", "--train-subset", "128", "--val-size", "100",
        "--batch-size", "32", "--no-progress"]


@pytest.mark.e2e
def test_a_distillation_run_writes_its_loss_terms_metrics_and_teacher_agreement(tmp_path):
    out = ["--out-dir", str(tmp_path)]
    assert main(["train-teacher", "--model", "resnet8", *TINY, *out, "--name", "t", "--epochs", "1"]) == 0
    assert main(["distill", "--teacher", "resnet8", "--teacher-checkpoint", str(tmp_path / "t.pth"), *TINY, *out,
                 "--name", "s", "--epochs", "2"]) == 0
    curves = read_curves(curves_folder(tmp_path, "s"))
    for tag in ("epoch/train_loss_ce", "epoch/train_loss_kd", "epoch/val_acc", "epoch/lr", "epoch/images_per_s",
                "epoch/val_teacher_agreement"):
        assert [step for step, _ in curves[tag]] == [4, 8], tag  # 4 steps per epoch
    assert all(0 <= v <= 1 for _, v in curves["epoch/val_teacher_agreement"])
    assert "epoch/val_teacher_agreement" not in read_curves(curves_folder(tmp_path, "t"))  # no teacher, no agreement


def test_a_resumed_run_continues_its_curves_without_repeating_a_step(tmp_path, monkeypatch):
    from distillation_lab import distill

    monkeypatch.setattr(loop, "CHECK_EVERY", 1)  # a step point at every step
    data = TensorDataset(torch.randn(96, 8), torch.randint(0, 2, (96,)))

    def run(student, resume=False):
        torch.manual_seed(0)
        loader = DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(7))
        return distill(None, student, loader, {"val": DataLoader(data, batch_size=48)}, loss_weights={"ce": 1.0},
                       epochs=2, optimizer="sgd", lr=0.1, checkpoint_dir=str(tmp_path), name="s", resume=resume,
                       progress=False)

    with pytest.raises(TrainingInterrupted):
        run(SigtermAtCall(9))  # mid-epoch 2 (6 steps per epoch): saved at step 9
    run(SigtermAtCall(0), resume=True)
    curves = read_curves(curves_folder(tmp_path, "s"))
    assert [step for step, _ in curves["train_step/loss_ce"]] == list(range(1, 13))  # each step once, in order
    assert [step for step, _ in curves["epoch/train_loss"]] == [6, 12]
    assert len(list(curves_folder(tmp_path, "s").glob("events.out.tfevents.*"))) == 2  # one file per attempt


@pytest.mark.e2e
def test_log_wandb_writes_the_same_curves_offline_inside_the_run_folder(tmp_path, monkeypatch, capsys):
    """--log wandb: offline by default (a compute node has no internet), one run id for every attempt of a run,
    the sync command printed; every epoch's scalars are in wandb's own run file."""
    pytest.importorskip("wandb", reason="optional: pip install -r requirements-optional.txt")
    from pruning_lab.train.curves import tracker_run_id

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = ["train-teacher", "--model", "resnet8", *TINY, "--out-dir", str(tmp_path), "--name", "t", "--log", "wandb"]
    assert main([*run, "--epochs", "1"]) == 0
    assert main([*run, "--epochs", "2", "--resume", "--resume-changes"]) == 0  # a second attempt: the same run
    out = capsys.readouterr().out
    run_id = tracker_run_id(tmp_path, "t")
    files = sorted(tmp_path.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2, list(tmp_path.rglob("*.wandb"))
    assert all(b"epoch/val_acc" in f.read_bytes() and b"epoch/train_loss_ce" in f.read_bytes() for f in files)
    assert f"upload with `wandb sync {tmp_path}/wandb/offline-run-" in out


def test_a_tracker_that_is_not_installed_is_refused_before_any_work(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("trackio") is not None:
        pytest.skip("trackio is installed here")
    assert main(["train-teacher", "--model", "resnet8", *TINY, "--out-dir", str(tmp_path), "--log", "trackio"]) == 2
    assert "log trackio needs the trackio package, which is not installed: pip install trackio" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
