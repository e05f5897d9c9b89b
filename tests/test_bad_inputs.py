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
    (["--name", "../escape"], "'name' in command line must be a plain file name"),
    (["--name", "/tmp/abs"], "'name' in command line must be a plain file name"),
    (["--model", "mnist_mlp", "--model-args", "{hidden: [16]}"], "bad model_args for 'mnist_mlp'"),
    (["--model-args", "{width:4}"], "has a key 'width:4' without a value: write a space after the colon, e.g. {width: 4}"),
    (["--resume", "--overwrite"], "gives both resume and overwrite"),
    (["--alpha", "0.3"], "train-student trains without a teacher, but alpha is set; use the distill command"),
    (["--teacher", "resnet18"], "train-student trains without a teacher, but teacher is set"),
    (["--name", "a\nb"], "'name' in command line must be a plain file name"),
    (["--channels", "3"], "config sets channels 3 (only imagefolder reads it"),
    (["--image-size", "64"], "config sets image_size 64 (mnist_embedded has a fixed size"),
    (["--resume-changes"], "resume_changes (it applies to --resume only)"),
    (["--labelled-subset", "200"], "labelled_subset 200 is more than train_subset 128"),
    (["--loss", "{ce: {weight: 0}}"], "every loss term in config key 'loss' has weight 0"),
    (["--model-args", "{width: 0}"], "bad model_args for 'resnet8' {'width': 0}: they give"),
    (["--model", "mnist_mlp", "--model-args", "{hidden: [0, 32]}"], "they give fc1.weight no weights"),
    (["--dataset", "tweets"], "model resnet8 {'width': 4} cannot run on tweets's token ids [B, 64]"),
    (["--optimizer", "adamw", "--momentum", "0.8"], "command line gives --momentum (only sgd uses it; the optimizer is adamw)"),
    (["--scheduler", "cosine", "--milestones", "5"], "--milestones (only the multistep schedule uses it; the schedule is cosine)"),
    (["--data-dir", "my_data"], "--data-dir (mnist_embedded ships inside a package and reads no folder)"),
    (["--model", "vit_student", "--model-args", "{drop_path_rate: 5}"],
     "drop_path_rate is a probability and must be in [0, 1), got 5"),
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
    (["--loss", "{kd: {weight: 1, standardize: maybe}}"], "loss term 'kd': standardize must be true or false, got 'maybe'"),
    (["--loss", "{ce: {weight: 1}}", "--extra-teachers", "{s}"], "no term of the loss (ce) sees a teacher"),
    (["--extra-teachers", "{s}"], "is given twice (--teacher-checkpoint, --extra-teachers): each teacher once"),
])
def test_loss_numbers_are_checked_before_work(finished, capsys, flags, message):
    flags = [flag.replace("{s}", str(finished / "s.pth")) for flag in flags]
    err = refused(capsys, ["distill", *TINY, "--teacher-checkpoint", str(finished / "s.pth"),
                           "--out-dir", str(finished), "--name", "kd", *flags], finished)
    assert message in err


@pytest.mark.parametrize("argv, message", [
    (["clos-convert", "--checkpoint", "x.pth", "--layers", "fc1", "--als-iterations", "0"], "--als-iterations must be >= 1, got 0"),
    (["clos-convert", "--checkpoint", "x.pth", "--layers", "fc1", "--fit-sweeps", "0"], "--fit-sweeps must be >= 1, got 0"),
    (["clos-convert", "--checkpoint", "x.pth", "--layers", "fc1", "--calibration-examples", "0"],
     "--calibration-examples must be >= 1, got 0"),
    (["clos-convert", "--checkpoint", "x.pth", "--layers", "fc1", "--finetune-lr", "nan"],
     "--finetune-lr must be a finite number > 0, got nan"),
    (["clos-convert", "--checkpoint", "x.pth", "--layers", "fc1", "--alpha", "0.3"],
     "the loss options set up the fine-tuning, but --finetune-epochs is 0"),
    (["clos-convert", "--checkpoint", "x.pth", "--layers", "fc1", "--structure", "lowrank", "--als-start", "svd"],
     "--als-start svd starts the Clos fit; --structure lowrank has its own start"),
    (["clos-convert", "--checkpoint", "x.pth", "--layers", "fc1", "--structure", "lowrank", "--fit-sweeps", "5"],
     "--fit-sweeps 5 sets the sweeps of Clos's and Monarch's data-aware fit; --structure lowrank has none"),
    (["clos-convert", "--checkpoint", "x.pth", "--layers", "fc1", "--fit", "weights", "--fit-sweeps", "5"],
     "--fit-sweeps 5 sets the sweeps of the data-aware fit; --fit weights has none"),
    (["clos-convert", "--checkpoint", "x.pth", "--layers", "fc1", "--structure", "lowrank", "--fit-accel", "anderson"],
     "--fit-accel anderson sets the sweeps of Clos's and Monarch's data-aware fit; --structure lowrank has none"),
    (["clos-convert", "--checkpoint", "x.pth", "--layers", "fc1", "--fit-accel", "newton"],
     "--fit-accel must be one of"),
    (["clos-convert", "--checkpoint", "x.pth", "--layers", "fc1", "--multiplier", "2", "--params-like", "clos:8"],
     "--params-like clos:8 and --multiplier 2 both set the size: give one"),
    (["clos-convert", "--checkpoint", "x.pth", "--layers", "fc1", "--multiplier", "2", "--budget", "0.5"],
     "--multiplier 2 sets one size for every layer; --budget chooses each layer's structure and size"),
    (["prune", "--checkpoint", "x.pth", "--method", "unstructured", "--amount", "0.5", "--round-to", "4"],
     "unstructured pruning zeroes single weights; --round-to is for --method structured"),
    (["prune", "--checkpoint", "x.pth", "--amount", "0.5", "--calibration-examples", "64"],
     "--calibration-examples ranks channels for --importance taylor; the importance here is l2"),
    (["evaluate", "x.pth", "--batch-size", "0"], "0 must be >= 1"),
    (["pipeline", "--seeds", "-1"], "-1 must be >= 0"),
    (["pipeline", "--seeds", "0", "0"], "--seeds 0 is given twice"),
    (["submit", "--cluster", "local", "--smoke", "--jobs", "cnn_teacher", "cnn_teacher"], "--jobs cnn_teacher is given twice"),
    (["submit", "--cluster", "local", "--smoke", "--timeout-min", "0"], "0 must be >= 1"),
    (["submit", "--cluster", "local", "--smoke", "--partition", "gpu"],
     "--partition gpu is for SLURM: --cluster local runs the jobs here"),
    (["clos-convert", "--checkpoint", "x.pth", "--layers", "fc1", "--budget", "1"],
     "in (0, 1) (at 1 every layer stays dense)"),
])
def test_command_options_are_checked_before_work(capsys, argv, message):
    assert message in refused(capsys, argv)


def test_settings_a_recipe_gives_for_its_own_schedule_do_not_block_a_flag_that_changes_it(finished, capsys):
    """cnn_student.yaml sets momentum and milestones; switching to adamw and cosine on the command line is fine,
    only typing --momentum or --milestones for a run that would not use them is refused (above)."""
    assert main(["train-student", *TINY, "--out-dir", str(finished), "--name", "adamw_cosine", "--optimizer", "adamw",
                 "--lr", "1e-3", "--scheduler", "cosine", "--max-steps-per-epoch", "1"]) == 0
    assert load_checkpoint(finished / "adamw_cosine.pth")["config"]["optimizer"] == "adamw"


def test_outputs_that_are_folders_or_unwritable_fail_before_any_evaluation(finished, tmp_path, capsys):
    err = refused(capsys, ["report", "--models-dir", str(finished), "--output", str(tmp_path)])
    assert "--output " + str(tmp_path) + " is a folder" in err
    err = refused(capsys, ["clos-convert", "--checkpoint", str(finished / "s.pth"), "--layers", "*",
                           "--output", str(tmp_path)], finished)
    assert "is a folder: give the path of the converted checkpoint" in err
    (tmp_path / "file").write_text("x")
    err = refused(capsys, ["report", "--models-dir", str(finished), "--output", str(tmp_path / "file" / "r.json")])
    assert "--output's folder" in err and "is a file, not a folder" in err


def test_a_config_file_with_a_key_twice_is_refused(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("lr: 0.1\nepochs: 2\nlr: 0.5\n")
    assert "key 'lr' is given twice" in refused(capsys, ["train-student", "--config", str(tmp_path / "c.yaml")])


def test_a_damaged_resume_state_is_one_line(finished, tmp_path, capsys):
    import shutil

    for name in ("s.pth", "s_last.pth"):
        shutil.copy(finished / name, tmp_path / name)
    state = torch.load(tmp_path / "s_last.pth", weights_only=True)
    state.pop("optimizer")
    state.pop("checksum")  # as written before checksums (with it, the file is refused as damaged: test_integrity)
    state["history"] = state["history"][:0]  # unfinished: it resumes
    torch.save(state, tmp_path / "s_last.pth")
    err = refused(capsys, ["train-student", *TINY, "--out-dir", str(tmp_path), "--name", "s", "--resume", "--epochs", "1"])
    assert "not a valid resume state (KeyError: 'optimizer')" in err


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
    assert not (out / ".busy.lock").exists()  # a run that ends removes its lock file


def test_a_lock_file_removed_by_a_finishing_run_is_not_held_by_two(tmp_path):
    """B opened the lock file just before A (finishing) removed it: B must lock the new file, as C does."""
    paths = RunPaths.of(make_config({"out_dir": str(tmp_path), "name": "r"}))
    first = RunLock(paths).__enter__()
    late = RunLock(paths)
    late._file = open(paths.lock, "a+")  # opened before the first run's exit removed the path
    first.__exit__(None, None, None)
    assert not paths.lock.exists() and not late._holds_the_current_file()
    late._file.close()
    with RunLock(paths):  # a later process locks the file at the path
        assert paths.lock.exists()
        with pytest.raises(Exception, match="is being written by pid"):
            RunLock(paths).__enter__()


def test_crafted_checkpoint_is_refused_as_not_valid(tmp_path, capsys):
    crafted = tmp_path / "crafted.pth"
    torch.save({"format": "distill-lab-checkpoint", "version": 1, "state_dict": {}, "config": {}}, crafted)
    err = refused(capsys, ["evaluate", str(crafted)])
    assert "is not a valid distill-lab checkpoint: missing or malformed arch" in err


def test_real_checkpoints_with_fields_removed_or_from_a_newer_version_are_refused(finished, tmp_path, capsys):
    good = torch.load(finished / "s.pth", weights_only=True)
    for change, message in ((lambda c: c.update(config={}), "missing or malformed config"),
                            (lambda c: c.update(surgery=["x"]), "missing or malformed surgery"),
                            (lambda c: c.update(data="x"), "missing or malformed data"),
                            (lambda c: c.update(version=99), "has checkpoint format version 99")):
        crafted = {k: v for k, v in good.items() if k != "checksum"}  # crafted, or written before checksums
        change(crafted)
        torch.save(crafted, tmp_path / "c.pth")
        assert message in refused(capsys, ["evaluate", str(tmp_path / "c.pth")])
        err = refused(capsys, ["train-student", *TINY, "--init-checkpoint", str(tmp_path / "c.pth"),
                               "--out-dir", str(tmp_path / "out")])
        assert message in err


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
    assert "The [default: ...] values below are those of cnn_teacher.yaml" in text
    # each flag shows the value the command would use: the recipe's, not the dataclass's (200 epochs, no name)
    assert "--epochs VALUE number of epochs [default: 300]" in text
    assert "[default: cnn_teacher]" in text and "milestones [150, 225, 275]" not in text
    assert "[default: [150, 225, 275]]" in text
    assert main(["distill", "--help"]) == 0
    assert "[default: cnn_student_kd]" in " ".join(capsys.readouterr().out.split())


def test_a_refused_prune_or_conversion_leaves_no_output_folder(finished, tmp_path, capsys):
    err = refused(capsys, ["prune", "--checkpoint", str(finished / "s.pth"), "--amount", "0.5", "--finetune-epochs", "1",
                           "--teacher-checkpoint", str(finished), "--output", str(tmp_path / "p" / "x.pth")], finished)
    assert f"teacher checkpoint {finished} is a folder: give the .pth file in it" in err
    # refused inside the output's lock (the layer pattern is checked on the opened model): the folder the lock made goes
    err = refused(capsys, ["clos-convert", "--checkpoint", str(finished / "s.pth"), "--layers", "nothing.*",
                           "--output", str(tmp_path / "c" / "x.pth")], finished)
    assert "nothing.*" in err
    for layers, message in (("fc,bn1", "'bn1' in --layers 'fc,bn1' matches no linear layer"),  # a norm layer
                            ("fc,fc", "'fc' is given twice in --layers 'fc,fc'")):
        err = refused(capsys, ["clos-convert", "--checkpoint", str(finished / "s.pth"), "--layers", layers,
                               "--allow-more-parameters", "--output", str(tmp_path / "c" / "x.pth")], finished)
        assert message in err
    assert list(tmp_path.iterdir()) == []


def test_a_pipeline_checks_every_job_before_the_first_trains(tmp_path, capsys):
    """The demo's students take 500 labelled examples: with --train-subset 128 they fail, before the teacher trains."""
    err = refused(capsys, ["pipeline", "--train-subset", "128", "--epochs", "1", "--no-progress",
                           "--out-dir", str(tmp_path / "models")])
    assert "labelled_subset 500 is more than train_subset 128" in err
    assert not (tmp_path / "models").exists()


def test_submit_into_a_folder_or_a_report_of_a_folder_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    err = refused(capsys, ["submit", "--cluster", "local", "--smoke", "--folder", str(tmp_path / "afile")])
    assert f"--folder {tmp_path / 'afile'} is a file" in err
    err = refused(capsys, ["report", "--models-dir", str(tmp_path / "afile"), "--output", str(tmp_path / "r.json")])
    assert f"--models-dir {tmp_path / 'afile'} is a file" in err
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]
