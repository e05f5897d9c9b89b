"""Bad inputs a user can give: each refused before any work with one line (exit 2, no traceback), and the
output folder left byte for byte as it was; runs never replace each other's work by accident."""
import hashlib
from pathlib import Path

import pytest
import torch

from distillation_lab.main import main
from pruning_lab.checkpoint import load_checkpoint
from pruning_lab.config import make_config
from pruning_lab.train.run_folder import RunLock, RunPaths

TINY = ["--dataset", "mnist_embedded", "--model-args", "{width: 4}", "--epochs", "1", "--train-subset", "128",
        "--val-size", "100", "--batch-size", "32", "--no-progress"]


def fingerprint(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run: OUT/s.pth and OUT/s_last.pth."""
    out = tmp_path_factory.mktemp("models")
    assert main(["train-student", *TINY, "--out-dir", str(out), "--name", "s"]) == 0
    return out


def refused(capsys, argv, folder: Path | None = None) -> str:
    """Run the CLI; assert exit 2, one line on stderr without a traceback, and `folder` unchanged."""
    before = fingerprint(folder) if folder and folder.exists() else None
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    if before is not None:
        assert fingerprint(folder) == before
    return err


@pytest.mark.parametrize("flags, message", [
    (["--lr", "-1"], "'lr' in command line must be > 0, got -1.0"),
    (["--lr", "nan"], "'lr' in command line must be a finite number"),
    (["--epochs", "0"], "'epochs' in command line must be >= 1"),
    (["--batch-size", "0"], "'batch_size' in command line must be >= 1"),
    (["--label-smoothing", "1"], "'label_smoothing' in command line must be in [0, 1)"),
    (["--milestones", "-5"], "'milestones' in command line must be epochs >= 0"),
    (["--momentum", "1.5"], "'momentum' in command line must be in [0, 1)"),
    (["--train-subset", "99999"], "train_subset 99999 is more than the 3900 training examples"),
    (["--name", "../escape"], "'name' in command line must be a file name, not a path"),
    (["--name", "/tmp/abs"], "'name' in command line must be a file name, not a path"),
    (["--model", "mnist_mlp", "--model-args", "{hidden: [16]}"], "bad model_args for 'mnist_mlp'"),
    (["--model-args", "{width:4}"], "has a key 'width:4' without a value: write a space after the colon, e.g. {width: 4}"),
    (["--resume", "--overwrite"], "gives both resume and overwrite"),
    (["--alpha", "0.3"], "train-student trains without a teacher, but alpha is set; use the distill command"),
    (["--teacher", "resnet18"], "train-student trains without a teacher, but teacher is set"),
])
def test_numbers_names_and_model_args_are_checked_before_work(finished, capsys, flags, message):
    err = refused(capsys, ["train-student", *TINY, "--out-dir", str(finished), "--name", "new", *flags], finished)
    assert message in err
    assert not (finished / "new.pth").exists() and not (finished.parent / "escape.pth").exists()


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "0"], "'temperature' in command line must be > 0"),
    (["--alpha", "1.5"], "'alpha' in command line must be in [0, 1]"),
    (["--loss", "{ce: {weight: 1}, kd: {weight: -1, temperature: 4}}"], "loss term 'kd': weight must be >= 0"),
    (["--loss", "{kd: {weight: 1, temperature: 0}}"], "loss term 'kd': temperature must be > 0"),
])
def test_loss_numbers_are_checked_before_work(finished, capsys, flags, message):
    err = refused(capsys, ["distill", *TINY, "--teacher-checkpoint", str(finished / "s.pth"),
                           "--out-dir", str(finished), "--name", "kd", *flags], finished)
    assert message in err


def test_unknown_flag_and_bad_choice_are_one_line(capsys):
    assert "unrecognized arguments: --learning-rate" in refused(capsys, ["train-student", "--learning-rate", "1"])
    assert "must be one of sgd, adamw, adam" in refused(capsys, ["train-student", "--optimizer", "lion"])
    assert "--fit" in refused(capsys, ["clos-convert", "--checkpoint", "x.pth", "--layers", "fc1", "--fit", "x"])


def test_config_file_that_is_not_text(tmp_path, capsys):
    bad = tmp_path / "binary.yaml"
    bad.write_bytes(b"\xff\xfe\x00\x01epochs: 3")
    assert "is not UTF-8 text" in refused(capsys, ["train-student", "--config", str(bad)], tmp_path)


def test_out_dir_that_is_a_file_fails_in_the_first_second(tmp_path, capsys):
    target = tmp_path / "models"
    target.write_text("not a folder")
    err = refused(capsys, ["train-student", *TINY, "--out-dir", str(target)], tmp_path)
    assert f"--out-dir {target} is a file, not a folder" in err


def test_a_finished_run_is_never_replaced_by_accident(finished, capsys):
    err = refused(capsys, ["train-student", *TINY, "--out-dir", str(finished), "--name", "s"], finished)
    assert "s.pth exists (run 's'): add --resume" in err and "--overwrite" in err
    assert main(["train-student", *TINY, "--out-dir", str(finished), "--name", "s", "--resume"]) == 0
    assert "has finished its 1 epochs" in capsys.readouterr().out  # a finished run is only evaluated
    assert load_checkpoint(finished / "s_last.pth")["history"][-1]["epoch"] == 1


def test_overwrite_starts_afresh(tmp_path, capsys):
    out = tmp_path / "models"
    assert main(["train-student", *TINY, "--out-dir", str(out), "--name", "a"]) == 0
    assert main(["train-student", *TINY, "--out-dir", str(out), "--name", "a", "--overwrite", "--epochs", "2"]) == 0
    assert [r["epoch"] for r in load_checkpoint(out / "a_last.pth")["history"]] == [1, 2]


def test_resume_with_other_options_names_them(finished, capsys):
    err = refused(capsys, ["train-student", *TINY, "--out-dir", str(finished), "--name", "s", "--resume",
                           "--lr", "0.01", "--seed", "3"], finished)
    assert "it was started with lr=0.1, seed=0, this command gives lr=0.01, seed=3" in err and "--resume-changes" in err


def test_a_second_process_on_the_same_run_stops_at_once(tmp_path, capsys):
    out = tmp_path / "models"
    cfg = make_config({"out_dir": str(out), "name": "busy"})
    with RunLock(RunPaths.of(cfg)):
        err = refused(capsys, ["train-student", *TINY, "--out-dir", str(out), "--name", "busy"])
    assert "is being written by pid" in err and "use another --name" in err
    assert not (out / "busy.pth").exists()


def test_crafted_checkpoint_is_refused_as_not_valid(tmp_path, capsys):
    crafted = tmp_path / "crafted.pth"
    torch.save({"format": "distill-lab-checkpoint", "version": 1, "state_dict": {}, "config": {}}, crafted)
    err = refused(capsys, ["evaluate", str(crafted)])
    assert "is not a valid distill-lab checkpoint: missing or malformed arch" in err


def test_clos_conversion_that_would_not_save_parameters_is_refused(tmp_path, capsys):
    out = tmp_path / "models"
    assert main(["train-teacher", "--model", "mnist_mlp", "--model-args", "{hidden: [97, 16]}", *TINY[:2], *TINY[4:],
                 "--out-dir", str(out), "--name", "prime"]) == 0
    capsys.readouterr()
    err = refused(capsys, ["clos-convert", "--checkpoint", str(out / "prime.pth"), "--layers", "fc1"], out)
    assert "fc1 (784 -> 97) as a Clos layer at m=4 would have" in err and "not fewer than the dense layer's" in err


def test_report_that_could_evaluate_nothing_says_so(tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    (models / "cnn_teacher.pth").write_text("not a checkpoint")
    err = refused(capsys, ["report", "--models-dir", str(models), "--output", str(tmp_path / "report.json")])
    assert "no model in" in err and "could be evaluated" in err and "cnn_teacher.pth" in err
    assert not (tmp_path / "report.json").exists()


def test_a_bug_prints_one_line_before_its_traceback(monkeypatch, capsys):
    import distillation_lab.main as cli

    monkeypatch.setattr(cli, "cmd_evaluate", lambda args: [][1])
    monkeypatch.setattr(cli, "add_evaluate_parser", cli.add_evaluate_parser)
    parser = cli.build_parser()
    args = parser.parse_args(["evaluate", "x.pth"])
    args.func = lambda a: [][1]
    monkeypatch.setattr(cli, "build_parser", lambda: type("P", (), {"parse_args": lambda self, argv: args})())
    assert cli.main(["evaluate", "x.pth"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "error: internal error, please report it: IndexError: list index out of range"
    assert "Traceback" in err


def test_unreadable_image_and_empty_class_folder_name_the_file(tmp_path, capsys):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / "imgs" / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "imgs" / split / cls / f"{i}.png")
    broken = tmp_path / "imgs" / "train" / "b" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    argv = ["train-student", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "imgs"), "--epochs", "1",
            "--model-args", "{width: 4}", "--out-dir", str(tmp_path / "out")]
    err = refused(capsys, argv)
    assert f"cannot read image {broken}" in err and not (tmp_path / "out").exists()
    broken.unlink()
    for f in (tmp_path / "imgs" / "test" / "b").iterdir():
        f.unlink()
    assert "Found no valid file for the classes b" in refused(capsys, argv)


def test_evaluate_text_output_is_aligned(finished, capsys):
    assert main(["evaluate", str(finished / "s.pth"), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    starts = {len(line) - len(line.split(maxsplit=1)[1]) for line in lines if len(line.split(maxsplit=1)) == 2}
    assert len(starts) == 1  # every value starts in the same column


def test_help_shows_the_recipes_effective_defaults(capsys):
    assert main(["train-teacher", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--model resnet18: cnn_teacher.yaml (run name cnn_teacher, 300 epochs, sgd lr 0.1, batch 128, cifar10)" in text
    assert "The [default: ...] values below are the built-in ones" in text
