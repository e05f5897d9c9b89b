"""The Python API: the README's example runs as written and the student learns."""
import re
import runpy
from pathlib import Path

import torch

from pruning_lab.checkpoint import load_checkpoint

README = Path(__file__).resolve().parent.parent / "README.md"


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
    assert all(k.startswith("module.") for k in ckpt["state_dict"]) and len(ckpt["state_dict"]) == 4
    assert torch.isfinite(torch.tensor([r["train_loss"] for r in result["history"]])).all()
