"""The command line: lab commands as written, evaluate, and bad inputs that fail with one clear line."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distillation_lab.main import build_parser, main, resolve_config

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--dataset", "mnist_embedded", "--model-args", "{width: 4}", "--epochs", "1", "--train-subset", "128",
        "--val-size", "100", "--batch-size", "32", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real tiny resnet8 checkpoint made through the CLI."""
    out = tmp_path_factory.mktemp("models")
    assert main(["train-student", "--model", "resnet8", *TINY, "--out-dir", str(out), "--name", "s"]) == 0
    return out / "s.pth"


def fingerprint(folder: Path) -> dict:
    """Every file under the folder (training curves included) by its contents."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_error(capsys, argv) -> str:
    """Run the CLI in-process; assert exit status 2 and a one-line error without traceback."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_lab_plan_commands_resolve_to_the_recipes():
    parser = build_parser()
    cfg = resolve_config(parser.parse_args(["train-teacher", "--model", "resnet18", "--epochs", "300"]), "teacher")
    assert (cfg.model, cfg.epochs, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay) == ("resnet18", 300, "sgd", 0.1, 0.9, 5e-4)
    assert (cfg.milestones, cfg.dataset, cfg.role, cfg.run_name()) == ([150, 225, 275], "cifar10", "teacher", "cnn_teacher")
    cfg = resolve_config(parser.parse_args(["train-student", "--model", "resnet8", "--epochs", "200"]), "student")
    assert (cfg.model, cfg.epochs, cfg.milestones, cfg.role) == ("resnet8", 200, [100, 150, 180], "student")
    cfg = resolve_config(parser.parse_args(["train-teacher", "--model", "vit_tiny"]), "teacher")
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.scheduler, cfg.epochs) == ("adamw", 1e-3, 0.05, "cosine", 100)
    cfg = resolve_config(parser.parse_args(["train-student", "--model", "vit_student"]), "student")
    assert (cfg.optimizer, cfg.scheduler, cfg.epochs) == ("adamw", "cosine", 150)


def test_evaluate_reports_the_test_split(trained, capsys):
    assert main(["evaluate", str(trained), "--json"]) == 0
    import json

    result = json.loads(capsys.readouterr().out)
    stored = torch.load(trained, weights_only=True)
    assert result["test_accuracy"] == pytest.approx(stored["test"]["acc"]) and result["test_images"] == 1000
    assert result["parameters"] == sum(v.numel() for k, v in stored["state_dict"].items()
                                       if "running" not in k and "num_batches" not in k)
    assert result["macs"] > 0 and result["latency_ms_batch1"] > 0 and result["model"] == "resnet8"


def test_unknown_config_key_changes_nothing(tmp_path, trained, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: resnet8\nepochs: 1\nlearnin_rate: 0.1\n")
    before = fingerprint(trained.parent)
    err = run_error(capsys, ["train-student", "--config", str(bad), "--out-dir", str(trained.parent), "--name", "s"])
    assert "unknown config key 'learnin_rate'" in err and str(bad) in err
    assert fingerprint(trained.parent) == before


def test_wrong_type(capsys):
    err = run_error(capsys, ["train-student", *TINY, "--epochs", "many"])
    assert "'epochs'" in err and "must be an integer" in err


def test_missing_data_directory(tmp_path, capsys):
    err = run_error(capsys, ["train-teacher", "--data-dir", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path)])
    assert "cifar10 not found" in err and "nowhere" in err and "prepare-data" in err
    assert list(tmp_path.iterdir()) == []


def test_truncated_checkpoint(tmp_path, trained, capsys):
    cut = tmp_path / "cut.pth"
    cut.write_bytes(trained.read_bytes()[: trained.stat().st_size // 2])
    assert "truncated or corrupt" in run_error(capsys, ["evaluate", str(cut)])


def test_files_that_are_not_checkpoints(tmp_path, capsys):
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    assert "is not a checkpoint: not a file torch.save writes" in run_error(capsys, ["evaluate", str(text)])
    config = tmp_path / "grid.yaml"  # its first bytes once read as pickle opcodes: "contains pickled Python objects"
    config.write_text("lr: [0.1, 0.1]\n")
    err = run_error(capsys, ["evaluate", str(config)])
    assert "is not a checkpoint: not a file torch.save writes" in err and "pickled" not in err
    bare = tmp_path / "bare.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, bare)
    assert "not a distill-lab checkpoint" in run_error(capsys, ["evaluate", str(bare)])


class Payload:
    """An object whose unpickling would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_object_is_refused_and_never_executed(tmp_path, capsys):
    marker, evil = tmp_path / "executed", tmp_path / "evil.pth"
    torch.save({"format": "distill-lab-checkpoint", "state_dict": Payload(marker)}, evil)
    err = run_error(capsys, ["evaluate", str(evil)])
    assert "refused" in err and "pickled Python objects" in err
    assert not marker.exists()


def test_checkpoint_of_another_architecture(trained, capsys):
    err = run_error(capsys, ["evaluate", str(trained), "--model", "resnet18"])
    assert "holds a 'resnet8' model, but 'resnet18' was expected" in err


def test_resume_with_another_architecture_changes_nothing(trained, capsys):
    before = fingerprint(trained.parent)
    err = run_error(capsys, ["train-teacher", "--model", "resnet18", *TINY, "--out-dir", str(trained.parent),
                             "--name", "s", "--resume"])
    assert "cannot resume" in err and fingerprint(trained.parent) == before


def test_path_that_does_not_exist(tmp_path, capsys):
    assert "checkpoint not found" in run_error(capsys, ["evaluate", str(tmp_path / "missing.pth")])
    assert "config file not found" in run_error(capsys, ["train-teacher", "--config", str(tmp_path / "c.yaml")])


@pytest.mark.e2e  # real processes: 8 s of interpreter starts
def test_process_exit_status_and_no_traceback(tmp_path):
    for entry in (["main.py"], ["-m", "distillation_lab.main"]):
        proc = subprocess.run([sys.executable, *entry, "evaluate", str(tmp_path / "x.pth")], cwd=ROOT,
                              capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.strip() == f"error: checkpoint not found: {tmp_path / 'x.pth'}"


@pytest.mark.e2e
def test_sigterm_saves_and_exits_for_requeue(tmp_path):
    """A real SIGTERM to the CLI process (what SLURM sends at the time limit): exit 3, then --resume finishes."""
    import signal
    import time

    args = [sys.executable, "main.py", "train-student", *TINY, "--epochs", "30", "--out-dir", str(tmp_path),
            "--name", "r"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "r_log.csv").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3 and "--resume" in err and "Traceback" not in err
    done = subprocess.run([*args[:-4], "--epochs", "2", "--out-dir", str(tmp_path), "--name", "r", "--resume"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "resuming" in done.stdout


def test_a_download_without_internet_is_one_line_and_leaves_no_folder(tmp_path, capsys, monkeypatch):
    import urllib.error

    import pruning_lab.data

    def offline(dataset, data_dir):
        Path(data_dir).mkdir(parents=True, exist_ok=True)  # as torchvision does before it fetches
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(pruning_lab.data, "download", offline)
    err = run_error(capsys, ["prepare-data", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--download"])
    assert "cannot fetch it" in err and "Name or service not known" in err and "login node" in err
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "afile").write_text("")
    err = run_error(capsys, ["prepare-data", "--dataset", "cifar10", "--data-dir", str(tmp_path / "afile"), "--download"])
    assert f"--data-dir {tmp_path / 'afile'} is a file" in err
