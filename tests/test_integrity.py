"""Nothing silently wrong: a run whose loss stops being finite stops without saving, and a damaged
checkpoint is refused instead of evaluated."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from distillation_lab.main import main
from pruning_lab.checkpoint import FORMAT, VERSION, CheckpointError, load_checkpoint, save_checkpoint, update_checkpoint

TINY = ["--dataset", "mnist_embedded", "--model-args", "{width: 4}", "--train-subset", "128", "--val-size", "100",
        "--batch-size", "32", "--no-progress", "--optimizer", "sgd", "--scheduler", "constant"]


def test_a_diverging_run_stops_at_once_and_the_checkpoints_on_disk_stay_as_they_were(tmp_path, capsys):
    out = ["--out-dir", str(tmp_path), "--name", "run"]
    assert main(["train-student", *TINY, *out, "--epochs", "1", "--lr", "0.05"]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.glob("run*")}
    capsys.readouterr()
    code = main(["train-student", *TINY, *out, "--epochs", "1", "--lr", "1e30", "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2
    assert "the loss became non-finite (NaN or infinite) at epoch 1, step" in err and "lr 1e+30" in err
    assert len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in tmp_path.glob("run*")} == before  # nothing of the diverged run saved
    assert not list(tmp_path.glob(".*.lock"))  # nor a lock left behind


def test_a_loss_weight_out_of_scale_is_caught_too(tmp_path, capsys):
    assert main(["train-student", *TINY, "--out-dir", str(tmp_path), "--epochs", "1",
                 "--loss", "{ce: {weight: 1.0e+308}}"]) == 2
    assert "non-finite" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.pth"))


def written(tmp_path: Path) -> Path:
    weights = {"w": torch.randn(64, 1024), "b": torch.arange(10, dtype=torch.bfloat16)}
    return save_checkpoint({"state_dict": weights, "config": {"name": "x"}, "history": [{"acc": 0.5}]},
                           tmp_path / "x.pth")


def test_every_checkpoint_carries_a_checksum_of_its_contents(tmp_path):
    path = written(tmp_path)
    data = load_checkpoint(path)
    assert len(data["checksum"]) == 64
    update_checkpoint(path, test={"acc": 0.9})  # rewritten with a new checksum, still loads
    assert load_checkpoint(path)["test"] == {"acc": 0.9}


def test_a_checkpoint_with_flipped_bytes_is_refused_naming_it(tmp_path):
    path = written(tmp_path)
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 4096] = bytes(b ^ 0xFF for b in raw[middle:middle + 4096])
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=f"{path}"):
        load_checkpoint(path)


def test_a_changed_tensor_is_refused_even_where_the_file_itself_reads(tmp_path):
    path = written(tmp_path)
    data = torch.load(path, weights_only=True)
    data["state_dict"]["w"][3, 7] += 1.0  # what a flipped bit inside the weights does
    torch.save(data, path)
    with pytest.raises(CheckpointError, match="is damaged: its contents do not match the checksum"):
        load_checkpoint(path)


def test_checkpoints_written_before_checksums_still_load(tmp_path):
    path = tmp_path / "old.pth"
    torch.save({"format": FORMAT, "version": VERSION, "state_dict": {"w": torch.ones(2)}, "config": {}}, path)
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.ones(2))
    assert os.path.getsize(path) > 0


# --- text labels and texts are read as the task's classes, or refused with their line ------------------------
def write_csvs(folder: Path, train_labels: list, test_labels: list, texts: list | None = None) -> None:
    import pandas as pd

    texts = texts or [f"text number {i}" for i in range(len(train_labels))]
    pd.DataFrame({"text": texts, "label": train_labels}).to_csv(folder / "train.csv", index=False)
    pd.DataFrame({"text": [f"t {i}" for i in range(len(test_labels))], "label": test_labels}).to_csv(
        folder / "test.csv", index=False)


def test_integer_labels_written_differently_are_one_class(tmp_path):
    from pruning_lab.data import load_splits

    write_csvs(tmp_path, ["1", "1.0", " 1", "0", "0.0", "2"], ["0", " 2 "])
    spec, train, val, test = load_splits("textcsv", tmp_path, image_size=16, val_size=0)
    assert spec.num_classes == 3
    assert sorted(train.labels.tolist()) == [0, 0, 1, 1, 1, 2] and test.labels.tolist() == [0, 2]


@pytest.mark.parametrize("labels, message", [
    (["1", "0", "one", "1"], r"train.csv line 4 has label 'one', but the file's labels are integer class indices"),
    (["1", "", "0", "1"], r"train.csv line 3 has no label \(''\); every row needs one"),
    (["pos", "neg", "NaN", "pos"], r"train.csv line 4 has no label"),
])
def test_labels_unlike_the_rest_or_missing_are_refused_with_their_line(tmp_path, labels, message):
    from pruning_lab.data import load_splits
    from pruning_lab.errors import UserError

    write_csvs(tmp_path, labels, ["0", "1"] if labels[0] == "1" else ["pos", "neg"])
    with pytest.raises(UserError, match=message):
        load_splits("textcsv", tmp_path, image_size=16, val_size=0)


def test_an_empty_text_is_refused_with_its_line(tmp_path):
    from pruning_lab.data import load_splits
    from pruning_lab.errors import UserError

    write_csvs(tmp_path, ["0", "1", "0"], ["0", "1"], texts=["fine", "  ", "ok"])
    with pytest.raises(UserError, match=r"train.csv line 3 has no text in column 'text'"):
        load_splits("textcsv", tmp_path, image_size=16, val_size=0)


def test_an_mnli_file_without_gold_labels_is_refused(tmp_path):
    from pruning_lab.data import load_splits
    from pruning_lab.errors import UserError

    head = "index\tpromptID\tpairID\tgenre\ts1b\ts2b\ts1p\ts2p\tsentence1\tsentence2\tlabel1\tgold_label"
    row = "{i}\t{i}\t{i}e\tfiction\tx\ty\tx\ty\tA {i}.\tB {i}.\t-\t-"
    (tmp_path / "MNLI").mkdir()
    (tmp_path / "MNLI" / "train.tsv").write_text("\n".join([head] + [row.format(i=i) for i in range(4)]) + "\n")
    (tmp_path / "MNLI" / "dev_matched.tsv").write_text(head + "\n" + row.format(i=9).replace("-\t-", "neutral\tneutral")
                                                       + "\n")
    with pytest.raises(UserError, match=r"MNLI/train.tsv has no row with a gold label"):
        load_splits("glue-mnli", tmp_path, image_size=16, val_size=0)


# --- nothing written where it should not be -----------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("trained")
    assert main(["train-student", *TINY, "--out-dir", str(folder), "--name", "m", "--epochs", "1"]) == 0
    return folder / "m.pth"


@pytest.mark.parametrize("command", [["prune", "--amount", "0.5", "--round-to", "1"],
                                     ["clos-convert", "--layers", "fc", "--allow-more-parameters", "--fit-sweeps", "1",
                                      "--als-iterations", "1", "--calibration-examples", "8"]])
def test_an_output_that_is_the_input_is_refused_whatever_the_flags(trained, command, capsys):
    before = trained.read_bytes()
    assert main([*command, "--checkpoint", str(trained), "--output", str(trained), "--overwrite"]) == 2
    assert "would replace the checkpoint it reads" in capsys.readouterr().err
    assert trained.read_bytes() == before


def test_an_output_written_as_a_folder_is_refused_before_anything_is_written(trained, tmp_path, capsys):
    target = tmp_path / "newdir"
    assert main(["prune", "--checkpoint", str(trained), "--amount", "0.5", "--output", f"{target}/"]) == 2
    assert f"--output {target}/ is a folder: give the path of the pruned checkpoint" in capsys.readouterr().err
    assert not target.exists()


def test_evaluate_refuses_a_data_dir_for_a_dataset_that_ships_in_a_package(trained, capsys):
    assert main(["evaluate", str(trained), "--data-dir", "/somewhere"]) == 2
    assert "ships inside a package and reads no folder" in capsys.readouterr().err


def test_reported_accuracy_is_computed_in_fp32_unless_asked(trained, capsys):
    import json

    assert main(["evaluate", str(trained), "--json", "--device", "cpu"]) == 0
    fp32 = json.loads(capsys.readouterr().out)["test_accuracy"]
    assert load_checkpoint(trained)["test"]["acc"] == pytest.approx(fp32, abs=1e-9)  # the run's end, the same way


def test_a_pruning_that_would_remove_nothing_is_refused_before_anything_is_written(trained, capsys):
    out = trained.with_name("nothing.pth")
    assert main(["prune", "--checkpoint", str(trained), "--amount", "0.1", "--round-to", "1000",
                 "--output", str(out)]) == 2
    assert "--amount 0.1 with --round-to 1000 removes nothing" in capsys.readouterr().err
    assert not out.exists()


def test_a_seed_too_large_for_the_random_generators_is_one_line(capsys):
    assert main(["train-student", *TINY, "--seed", "99999999999999999999"]) == 2
    assert "config key 'seed' in command line must be in [0, 2**32 - 1]" in capsys.readouterr().err


# --- a full disk: one line naming the file; no partial file; the previous one intact ---------------------------
def filling_disk(after_bytes: int):
    """A write that fills the disk after `after_bytes`, as ENOSPC would."""
    import errno

    def write(f):
        f.write(b"x" * after_bytes)
        raise OSError(errno.ENOSPC, "No space left on device")
    return write


def test_a_full_disk_is_one_line_and_leaves_the_previous_file_intact(tmp_path):
    from pruning_lab.errors import UserError
    from pruning_lab.files import write_atomically

    path = written(tmp_path)
    before = path.read_bytes()
    with pytest.raises(UserError, match=rf"cannot write {path}: the disk is full .* the 2.0 MB written when it filled"):
        write_atomically(path, filling_disk(2_000_000))
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["x.pth"]


def test_a_checkpoint_save_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    import errno

    import pruning_lab.checkpoint as checkpoint_module
    from pruning_lab.errors import UserError

    def full(obj, f):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", full)
    with pytest.raises(UserError, match="the disk is full"):
        save_checkpoint({"state_dict": {"w": torch.ones(3)}}, tmp_path / "y.pth")
    assert not list(tmp_path.iterdir())


def test_report_into_a_folder_that_does_not_exist_yet(trained, tmp_path):
    out = tmp_path / "new" / "deeper" / "report.json"
    assert main(["report", "--models-dir", str(trained.parent), "--output", str(out), "--device", "cpu"]) == 0
    assert {p.name for p in out.parent.iterdir()} == {"report.json", "report_details.json", "report.md", "report.png",
                                                      "report.html"}


@pytest.mark.parametrize("damage", [
    {"kind": "lowrank", "layer": "fc", "config": {"out_features": 10, "rank": 2}},
    {"kind": "prune", "modules": {"fc": {"shapes": {"weight": [10, 4]}}}},
    {"kind": "sparse", "weights": ["no.such.weight"]},
])
def test_a_surgery_record_that_lost_a_field_is_one_line_naming_the_file(trained, tmp_path, damage, capsys):
    from pruning_lab.checkpoint import load_checkpoint as load

    ckpt = load(trained)
    broken = tmp_path / "broken.pth"
    save_checkpoint({**ckpt, "surgery": [damage]}, broken)
    assert main(["evaluate", str(broken)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(broken) in err and "Traceback" not in err
    assert main(["report", "--models-dir", str(tmp_path), "--output", str(tmp_path / "r" / "report.json")]) == 2
    assert "could be evaluated" in capsys.readouterr().err  # the report went past it and said why


def test_an_output_named_as_a_hidden_file_is_refused(trained, capsys):
    assert main(["prune", "--checkpoint", str(trained), "--amount", "0.5", "--output",
                 str(trained.with_name(".x.pth"))]) == 2
    assert "names a hidden file" in capsys.readouterr().err


# --- resume compares the data, not only the path -------------------------------------------------------------
def image_folder(root: Path, flip: bool = False) -> Path:
    from PIL import Image

    for split, n in (("train", 24), ("test", 8)):
        for k in range(n):
            label = ("dark", "light")[(k % 2) ^ flip]
            (root / split / label).mkdir(parents=True, exist_ok=True)
            value = 40 if k % 2 == 0 else 215
            Image.new("L", (8, 8), color=value).save(root / split / label / f"{k}.png")
    return root


def test_resume_on_other_data_in_the_same_folder_is_refused(tmp_path, capsys):
    import shutil

    data = image_folder(tmp_path / "data")
    common = ["--dataset", "imagefolder", "--data-dir", str(data), "--image-size", "8", "--channels", "1",
              "--model-args", "{width: 4}", "--val-size", "4", "--batch-size", "8", "--no-progress",
              "--optimizer", "sgd", "--scheduler", "constant", "--out-dir", str(tmp_path / "out"), "--name", "r"]
    assert main(["train-student", *common, "--epochs", "1"]) == 0
    shutil.rmtree(data)
    image_folder(data, flip=True)  # the same files, their labels swapped
    capsys.readouterr()
    assert main(["train-student", *common, "--epochs", "2", "--resume"]) == 2
    assert "are not the examples and labels the run was started on" in capsys.readouterr().err
    assert main(["train-student", *common, "--epochs", "2", "--resume", "--resume-changes"]) == 0


def test_the_api_leaves_the_callers_teacher_as_it_was(tmp_path):
    import torch.nn as nn
    from torch.utils.data import DataLoader, TensorDataset

    from distillation_lab import distill

    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).train()
    student = nn.Sequential(nn.Linear(8, 3))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    distill(teacher, student, loader, {"val": loader}, epochs=1, checkpoint_dir=str(tmp_path), progress=False,
            precision="bf16", teacher_layers=["1"], student_layers=["0"], loss_weights={"ce": 0.5, "kd": 0.5})
    assert teacher.training and all(p.requires_grad and p.dtype == torch.float32 for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not any(m._forward_hooks for m in teacher.modules())
    assert teacher(x).dtype == torch.float32


def test_prune_of_a_model_with_the_bottleneck_is_refused_naming_the_order(trained, tmp_path, capsys):
    assert main(["train-student", *TINY, "--init-checkpoint", str(trained), "--bottleneck", "{codebooks: 8, keys: 8}",
                 "--epochs", "1", "--max-steps-per-epoch", "1", "--out-dir", str(tmp_path), "--name", "kvb"]) == 0
    for method in ("structured", "unstructured"):
        assert main(["prune", "--checkpoint", str(tmp_path / "kvb.pth"), "--method", method, "--amount", "0.5",
                     *(["--round-to", "1"] if method == "structured" else [])]) == 2
        assert "prune the model before adding the bottleneck" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kvb.pth", "kvb_last.pth", "kvb_log.csv", "tensorboard"]


@pytest.mark.parametrize("command, stem", [
    (["prune", "--amount", "0.5", "--round-to", "1"], "p"),
    (["clos-convert", "--layers", "fc", "--allow-more-parameters", "--fit-sweeps", "1", "--als-iterations", "1",
      "--calibration-examples", "8"], "c")])
def test_the_fine_tuning_is_checked_before_the_first_file_is_written(trained, tmp_path, command, stem, capsys):
    out = tmp_path / f"{stem}.pth"
    tuned = [*command, "--checkpoint", str(trained), "--output", str(out), "--finetune-epochs", "1"]
    (tmp_path / f"{stem}_kd_last.pth").write_bytes(b"an earlier fine-tuning")
    assert main(tuned) == 2
    assert f"{stem}_kd_last.pth exists: add --overwrite" in capsys.readouterr().err
    (tmp_path / f"{stem}_kd_last.pth").unlink()
    assert main([*tuned, "--loss", "{kd: {weight: 1, temperature: -1}}"]) == 2  # a loss the fine-tuning would refuse
    assert "temperature" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_prune_fine_tuned_from_a_teacher_of_other_data_is_refused_before_pruning(trained, tmp_path, capsys):
    ckpt = load_checkpoint(trained)
    save_checkpoint({**{k: v for k, v in ckpt.items() if k not in ("format", "version", "checksum")},
                     "data": {**ckpt["data"], "dataset": "imagefolder", "num_classes": 2}}, tmp_path / "other.pth")
    out = tmp_path / "p.pth"
    assert main(["prune", "--checkpoint", str(trained), "--amount", "0.5", "--round-to", "1", "--output", str(out),
                 "--finetune-epochs", "1", "--teacher-checkpoint", str(tmp_path / "other.pth")]) == 2
    assert "was trained on imagefolder with 2 classes" in capsys.readouterr().err
    assert not out.exists()


def test_two_identical_prunes_at_once_the_second_is_refused(trained, tmp_path, capsys):
    from pruning_lab.train.run_folder import RunLock

    out = tmp_path / "p.pth"
    with RunLock.for_output(out):  # the first prune, still running
        assert main(["prune", "--checkpoint", str(trained), "--amount", "0.5", "--round-to", "1",
                     "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert "is being written by pid" in err and "give another --output" in err, err
    assert not out.exists()
    assert main(["prune", "--checkpoint", str(trained), "--amount", "0.5", "--round-to", "1", "--output", str(out)]) == 0
    assert out.exists() and not list(tmp_path.glob(".*.lock"))


def models_folder(trained: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "m.pth").write_bytes(trained.read_bytes())
    return folder


def test_a_report_goes_beside_its_models_and_never_replaces_a_report_of_others(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    one, two = models_folder(trained, tmp_path / "one"), models_folder(trained, tmp_path / "two")
    assert main(["report", "--models-dir", str(one), "--device", "cpu"]) == 0
    assert (one / "report.json").exists() and not (tmp_path / "report.json").exists()  # beside its models
    before = (one / "report.json").read_bytes()
    assert main(["report", "--models-dir", str(two), "--output", str(one / "report.json")]) == 2
    assert f"exists and is a report of ., not of {two}: add --overwrite" in capsys.readouterr().err
    assert (one / "report.json").read_bytes() == before and not list(one.glob("report*.png.*"))
    assert main(["report", "--models-dir", str(one), "--device", "cpu"]) == 0  # its own models: replaced
    (tmp_path / "report.json").write_text("{}")  # a report an older version wrote, naming no folder
    models_folder(trained, tmp_path / "models_saved")
    assert main(["report", "--device", "cpu"]) == 2  # the chain's models_saved/ reports at the top
    assert "not a report this version wrote" in capsys.readouterr().err
    assert main(["report", "--device", "cpu", "--overwrite"]) == 0
    assert json.loads((tmp_path / "report_details.json").read_text())["models_dir"] == "models_saved"


def test_a_checkpoint_with_non_finite_weights_is_refused_and_the_report_shows_no_nan(trained, tmp_path, capsys):
    folder = models_folder(trained, tmp_path / "models")
    ckpt = load_checkpoint(trained)
    state = dict(ckpt["state_dict"])
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], float("nan"))
    save_checkpoint({**{k: v for k, v in ckpt.items() if k not in ("format", "version", "checksum")},
                     "config": {**ckpt["config"], "name": "diverged"}, "state_dict": state}, folder / "diverged.pth")
    assert main(["evaluate", str(folder / "diverged.pth")]) == 2
    assert f"holds non-finite weights (NaN or infinite, first in {name})" in capsys.readouterr().err
    assert main(["report", "--models-dir", str(folder), "--device", "cpu"]) == 0
    assert "diverged not evaluated" in capsys.readouterr().err
    for written in folder.glob("report*"):
        if written.suffix in (".json", ".md"):
            assert "nan" not in written.read_text().lower().replace("nan or infinite", ""), written


def test_a_conversion_too_big_for_memory_is_refused_before_allocating(trained, tmp_path, capsys):
    import resource

    assert main(["clos-convert", "--checkpoint", str(trained), "--layers", "fc", "--multiplier", "100000000",
                 "--allow-more-parameters", "--output", str(tmp_path / "c.pth")]) == 2
    assert "has 33,200,000,013 parameters: fitting it needs at least 494.7 GiB" in capsys.readouterr().err
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 8 * 2**20  # KB: never near the 132 GB of its weights
    assert not list(tmp_path.iterdir())


def test_resume_changes_applies_the_new_learning_rate_and_weight_decay(tmp_path):
    run = [*TINY, "--out-dir", str(tmp_path), "--name", "r"]
    assert main(["train-student", *run, "--epochs", "1", "--lr", "0.05"]) == 0
    assert main(["train-student", *run, "--epochs", "2", "--lr", "0.001", "--weight-decay", "0.01", "--resume",
                 "--resume-changes"]) == 0
    last = load_checkpoint(tmp_path / "r_last.pth")
    assert [h["lr"] for h in last["history"]] == [0.05, 0.001]  # not the restored optimizer's 0.05
    group = last["optimizer"]["param_groups"][0]
    assert group["lr"] == 0.001 and group["weight_decay"] == 0.01
