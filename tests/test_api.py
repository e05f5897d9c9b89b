"""The Python API: the README's example runs as written and the student learns."""
import re
import runpy
from pathlib import Path

import pytest
import torch

from pruning_lab.checkpoint import load_checkpoint

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.e2e
def test_readme_api_example_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    block = re.search(r"<!-- api-example.*?-->\n```python\n(.*?)```", text, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(block)
    monkeypatch.chdir(tmp_path)
    namespace = runpy.run_path(str(script))
    result = namespace["result"]
    assert result["val_acc"] > 0.75  # 10 classes: chance is 0.1
    assert set(result["history"][-1]) >= {"train_loss_ce", "train_loss_kd", "train_loss_feature", "val_acc", "val_top2"}
    ckpt = load_checkpoint(tmp_path / "runs/api/student.pth")
    assert ckpt["arch"]["name"] == "custom:Sequential" and ckpt["config"]["loss"]["kd"]["temperature"] == 4.0
    # The feature regressor (16 -> 256 channels) trained with the student and is saved for resume.
    last = load_checkpoint(tmp_path / "runs/api/student_last.pth")
    assert last["criterion"]["terms.feature.regressors.0.weight"].shape == (256, 16, 1, 1)
    # Teacher weights never enter the student's checkpoint.
    assert set(ckpt["state_dict"]) == set(namespace["student"].state_dict())  # its own keys, as a CLI checkpoint
    assert len(ckpt["state_dict"]) == 4
    assert torch.isfinite(torch.tensor([r["train_loss"] for r in result["history"]])).all()


def test_evaluate_says_why_it_cannot_rebuild_an_api_checkpoint(tmp_path, capsys):
    import torch.nn as nn
    from torch.utils.data import DataLoader, TensorDataset

    from distillation_lab import distill
    from distillation_lab.main import main

    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    distill(None, nn.Linear(8, 2), loader, {"val": loader}, loss_weights={"ce": 1.0}, epochs=1,
            checkpoint_dir=str(tmp_path), name="mine", progress=False)
    assert main(["evaluate", str(tmp_path / "mine.pth")]) == 2
    assert "holds your own Linear module (written by the Python API)" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "mine.pth")]) == 2  # the same refusal, nothing changed
    with pytest.raises(Exception, match="mine.pth exists"):  # a second call never replaces the first run
        distill(None, nn.Linear(8, 2), loader, {"val": loader}, loss_weights={"ce": 1.0}, epochs=1,
                checkpoint_dir=str(tmp_path), name="mine", progress=False)


def test_a_registry_model_trained_through_the_api_is_recorded_as_itself(tmp_path, capsys):
    from torch.utils.data import DataLoader, TensorDataset

    from distillation_lab import distill
    from distillation_lab.main import main
    from pruning_lab.checkpoint import build_model
    from pruning_lab.models import create_model

    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    student = create_model("resnet8", 10, 3, 32, width=4)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    distill(create_model("resnet8", 10, 3, 32, width=8), student, loader, {"val": loader}, epochs=1,
            checkpoint_dir=str(tmp_path), progress=False)
    ckpt = load_checkpoint(tmp_path / "student_last.pth")
    assert ckpt["arch"]["name"] == "resnet8" and ckpt["config"]["model"] == "resnet8"
    assert ckpt["config"]["model_args"] == {"width": 4}
    rebuilt = build_model(ckpt).eval()
    assert torch.allclose(rebuilt(x[:4])[0], student.eval()(x[:4])[0], atol=1e-5)
    assert main(["evaluate", str(tmp_path / "student.pth")]) == 2  # its data are the caller's loaders
    assert "holds a resnet8 trained through the Python API on your own loaders" in capsys.readouterr().err


class SigtermAtCall(torch.nn.Module):
    """A linear student that sends this process a real SIGTERM on its n-th training forward."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.fc, self.n, self.calls = torch.nn.Linear(8, 2), n, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.n:
                import os
                import signal

                os.kill(os.getpid(), signal.SIGTERM)
        return self.fc(x)


def test_resume_with_a_shuffled_seeded_dataloader_is_exact(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from distillation_lab import distill
    from pruning_lab.train import TrainingInterrupted

    data = TensorDataset(torch.randn(96, 8), torch.randint(0, 2, (96,)))

    def run(student, folder, resume=False):
        torch.manual_seed(0)
        student.fc.reset_parameters()
        loader = DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(7))
        return distill(None, student, loader, {"val": DataLoader(data, batch_size=48)}, loss_weights={"ce": 1.0},
                       epochs=3, optimizer="sgd", lr=0.1, checkpoint_dir=str(folder), name="s", resume=resume,
                       progress=False)

    with pytest.raises(TrainingInterrupted):
        run(SigtermAtCall(9), tmp_path / "a")  # mid-epoch 2
    run(SigtermAtCall(0), tmp_path / "a", resume=True)
    run(SigtermAtCall(0), tmp_path / "b")
    a = load_checkpoint(tmp_path / "a/s_last.pth")["state_dict"]
    b = load_checkpoint(tmp_path / "b/s_last.pth")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
