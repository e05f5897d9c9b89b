"""distill: the lab command as written, a frozen teacher, cross-architecture, and rejected pairings."""
import hashlib
import json

import pandas as pd
import pytest
import torch

from distillation_lab.criterion import DistillationCriterion
from distillation_lab.main import main
from distillation_lab.report import write_report
from distillation_lab.teacher import load_teacher
from pruning_lab.checkpoint import load_checkpoint

SMALL = ["--dataset", "mnist_embedded", "--epochs", "2", "--train-subset", "256", "--val-size", "100",
         "--batch-size", "32", "--no-progress"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    assert main(["train-teacher", "--model", "resnet18", "--model-args", "{width: 8}", *SMALL,
                 "--out-dir", str(out)]) == 0
    return out / "cnn_teacher.pth"


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_lab_distill_command_as_written(teacher, tmp_path, capsys):
    before = digest(teacher)
    code = main(["distill", "--teacher", "resnet18", "--student", "resnet8", "--teacher-checkpoint", str(teacher),
                 "--alpha", "0.5", "--temperature", "4.0", "--feature-distill", "--model-args", "{width: 4}",
                 *SMALL, "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "agreement with the teacher" in out
    best = load_checkpoint(tmp_path / "cnn_student_kd.pth")
    assert best["config"]["teacher"] == "resnet18" and best["role"] == "student"
    assert 0 <= best["alignment"]["agreement"] <= 1 and best["alignment"]["kl"] >= 0
    log = pd.read_csv(tmp_path / "cnn_student_kd_log.csv")
    assert {"train_loss_ce", "train_loss_kd", "train_loss_feature"} <= set(log.columns)
    # loss = weighted sum of the logged terms
    row = log.iloc[-1]
    assert row["train_loss"] == pytest.approx(row["train_loss_ce"] + row["train_loss_kd"] + row["train_loss_feature"], rel=1e-4)
    last = load_checkpoint(tmp_path / "cnn_student_kd_last.pth")
    regressors = [k for k in last["criterion"] if "regressors" in k]
    assert regressors and not any(k.startswith("teacher") for k in best["state_dict"])
    assert digest(teacher) == before  # the teacher file is read, never written


def test_teacher_stays_frozen_in_eval_mode(teacher):
    data = load_checkpoint(teacher)["data"]
    frozen = load_teacher(str(teacher), "resnet18", data, torch.device("cpu"))
    criterion = DistillationCriterion({"kd": {"weight": 1.0}}, [4, 8, 16, 32], frozen)
    criterion.train()
    assert not frozen.model.training and not any(p.requires_grad for p in frozen.model.parameters())
    assert not any(p is q for p in criterion.parameters() for q in frozen.model.parameters())
    x = torch.randn(4, 1, 28, 28)
    s_logits = torch.randn(4, 10, requires_grad=True)
    terms = criterion(s_logits, [], torch.zeros(4, dtype=torch.long), x)
    terms["kd"].backward()
    assert all(p.grad is None for p in frozen.model.parameters()) and s_logits.grad is not None


def test_cross_architecture_resnet_teacher_vit_student(teacher, tmp_path):
    vit = "{depth: 1, embed_dim: 16, num_heads: 2}"
    assert main(["distill", "--student", "vit_student", "--model-args", vit, "--teacher", "resnet18",
                 "--teacher-checkpoint", str(teacher), "--feature-distill", "--optimizer", "adamw", "--lr", "1e-3",
                 *SMALL, "--out-dir", str(tmp_path), "--name", "vit_kd"]) == 0
    assert load_checkpoint(tmp_path / "vit_kd.pth")["arch"]["name"] == "vit_student"


def run_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err
    return err


def test_teacher_and_student_must_agree(teacher, tmp_path, capsys):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / "imgs" / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "imgs" / split / cls / f"{i}.png")
    out = tmp_path / "out"
    err = run_error(capsys, ["distill", "--teacher-checkpoint", str(teacher), "--dataset", "imagefolder",
                             "--data-dir", str(tmp_path / "imgs"), "--model-args", "{width: 4}", "--epochs", "1",
                             "--out-dir", str(out)])
    assert "10 classes and 1x28x28" in err and "2 classes and 3x32x32" in err and "must agree" in err
    assert not out.exists()


def test_rejected_teacher_and_loss_settings(teacher, tmp_path, capsys):
    base = ["--model-args", "{width: 4}", *SMALL, "--out-dir", str(tmp_path)]
    err = run_error(capsys, ["distill", "--teacher", "vit_tiny", "--teacher-checkpoint", str(teacher), *base])
    assert "holds a 'resnet18' model, but 'vit_tiny' was expected" in err
    assert "needs a teacher checkpoint" in run_error(capsys, ["distill", "--teacher-checkpoint", "", *base])
    err = run_error(capsys, ["distill", "--teacher-checkpoint", str(teacher), "--loss", "{kd: {weight: 1, temp: 2}}", *base])
    assert "unknown parameter(s) temp" in err
    err = run_error(capsys, ["distill", "--teacher-checkpoint", str(teacher), "--loss", "{fitnet: {weight: 1}}", *base])
    assert "unknown loss term 'fitnet'" in err
    err = run_error(capsys, ["train-student", "--loss", "{kd: {weight: 1}}", *base])
    assert "needs a teacher" in err
    assert list(tmp_path.iterdir()) == []


def test_report_marks_missing_and_unreadable_checkpoints(teacher, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "cnn_teacher.pth").write_bytes(teacher.read_bytes())
    (models / "cnn_student.pth").write_bytes(teacher.read_bytes()[:1000])  # truncated
    report = write_report(str(models), str(tmp_path / "report.json"), device="cpu")
    assert report == {"cnn": {"teacher_accuracy": load_checkpoint(teacher)["test"]["acc"],
                              "student_accuracy_without_kd": None, "student_accuracy_with_kd": None},
                      "vit": {"teacher_accuracy": None, "student_accuracy_without_kd": None,
                              "student_accuracy_with_kd": None}}
    details = json.loads((tmp_path / "report_details.json").read_text())
    assert details["cnn"]["student_accuracy_without_kd"]["status"] == "unreadable"
    assert details["cnn"]["student_accuracy_with_kd"]["status"] == "missing"
    assert "missing" in (tmp_path / "report.md").read_text() and (tmp_path / "report.png").stat().st_size > 0


@pytest.mark.e2e
def test_pipeline_smoke_with_seeds(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["pipeline", "--epochs", "1", "--max-steps-per-epoch", "3", "--seeds", "0", "1",
                 "--out-dir", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"cnn", "vit"} and set(report["cnn"]) == {
        "teacher_accuracy", "student_accuracy_without_kd", "student_accuracy_with_kd"}
    assert all(0 <= v <= 1 for v in report["cnn"].values()) and set(report["vit"].values()) == {None}
    details = json.loads((out / "report_details.json").read_text())
    kd = details["cnn"]["student_accuracy_with_kd"]
    assert kd["seeds"] == [0, 1] and kd["test_accuracy_mean"] == pytest.approx(
        sum(r["test_accuracy"] for r in kd["runs"]) / 2)
    assert details["cnn"]["kd_minus_baseline"]["seeds"] == 2
    assert "paired by seed" in capsys.readouterr().out


@pytest.mark.e2e
def test_cifar10_preset_end_to_end_on_tiny_files(tmp_path, monkeypatch):
    """The GPU preset's whole chain (full-size ResNets and ViTs) on a tiny CIFAR-10 in the real format."""
    import torchvision.datasets.cifar as cifar

    from pruning_lab.inference import checkpoint_eval

    from test_data import write_fake_cifar10

    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: __import__("os").path.isfile(path))
    # The model cards' latencies on one forward of one image: the full-size models' batch-256 forwards took most of
    # this test's minute on a CPU (measure_latency's rule is tested in test_prune.py).
    real_latency = checkpoint_eval.measure_latency
    monkeypatch.setattr(checkpoint_eval, "measure_latency",
                        lambda model, shape, device, batch_size=1, **kw: real_latency(model, shape, device, 1, 1, 0, 1))
    write_fake_cifar10(tmp_path / "data", n_per_batch=8)
    out = tmp_path / "models"
    assert main(["pipeline", "--preset", "cifar10", "--data-dir", str(tmp_path / "data"), "--val-size", "8",
                 "--epochs", "1", "--max-steps-per-epoch", "1", "--batch-size", "8", "--out-dir", str(out),
                 "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert all(v is not None for family in report.values() for v in family.values())
    details = json.loads((out / "report_details.json").read_text())
    assert details["vit"]["student_accuracy_with_kd"]["runs"][0]["model"] == "vit_student"
    assert details["cnn"]["teacher_accuracy"]["runs"][0]["parameters"] > 11_000_000


def test_two_teachers_give_the_gradient_of_kd_on_their_averaged_soft_targets():
    """kd, kd@1 at half the weight each: mean_i T^2 KL(p_i || q) differs from T^2 KL(mean_i p_i || q) by a constant
    (the teachers' entropies), so the student's gradient is that of KD on the averaged soft targets."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    t_logits = [torch.randn(6, 10), 3 * torch.randn(6, 10)]
    teachers = [lambda x, z=z: (z, []) for z in t_logits]
    for t in teachers:
        t.feature_widths = []
    criterion = DistillationCriterion({"kd": {"weight": 1.0, "temperature": 4.0}}, [], teachers[0], (teachers[1],))
    s_logits = torch.randn(6, 10, requires_grad=True)
    terms = criterion(s_logits, [], torch.zeros(6, dtype=torch.long), torch.zeros(6, 1))
    assert set(terms) == {"kd", "kd@1"}
    sum(terms.values()).backward()
    target = torch.stack([F.softmax(z / 4.0, 1) for z in t_logits]).mean(0)  # the averaged soft targets
    expected = torch.autograd.grad(16.0 * F.kl_div(F.log_softmax(s_logits / 4.0, 1), target, reduction="batchmean"),
                                   s_logits)[0]
    assert torch.allclose(s_logits.grad, expected, atol=1e-6)


def test_distill_from_two_teachers_records_both(teacher, tmp_path, capsys):
    other = tmp_path / "t2.pth"  # a second teacher: a copy will do (the terms and records are what is tested)
    other.write_bytes(teacher.read_bytes())
    assert main(["distill", "--teacher", "resnet18", "--teacher-checkpoint", str(teacher), "--extra-teachers",
                 str(other), "--model-args", "{width: 4}", *SMALL, "--epochs", "1", "--out-dir",
                 str(tmp_path), "--name", "two", "--feature-distill"]) == 0
    best = load_checkpoint(tmp_path / "two.pth")
    assert best["teacher"]["checkpoint"] == str(teacher) and [t["checkpoint"] for t in best["extra_teachers"]] == [str(other)]
    log = pd.read_csv(tmp_path / "two_log.csv")
    assert {"train_loss_kd", "train_loss_kd@1", "train_loss_feature", "train_loss_feature@1"} <= set(log.columns)
    capsys.readouterr()
    assert main(["train-student", "--extra-teachers", str(other), *SMALL, "--out-dir", str(tmp_path)]) == 2
    assert "but extra_teachers is set" in capsys.readouterr().err


def test_crd_distills_and_saves_its_memories_for_resume(teacher, tmp_path):
    assert main(["distill", "--teacher", "resnet18", "--teacher-checkpoint", str(teacher), "--model-args",
                 "{width: 4}", *SMALL, "--out-dir", str(tmp_path), "--name", "crd",
                 "--loss", "{ce: {weight: 1.0}, crd: {weight: 0.8, negatives: 256}}"]) == 0
    last = load_checkpoint(tmp_path / "crd_last.pth")
    assert last["criterion"]["terms.crd.memory_teacher"].shape == (256, 128)
    assert int(last["criterion"]["terms.crd.position"]) == (2 * 8 * 32) % 256  # 2 epochs of 8 batches of 32
    assert last["history"][-1]["train_loss_crd"] > 0
