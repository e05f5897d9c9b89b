"""report.html: self-contained (nothing fetched), every part on it, and drawn without errors in a real browser."""
import re
import shutil
import subprocess

import pytest

from distillation_lab.main import main

TINY = ["--dataset", "mnist_embedded", "--model-args", "{width: 4}", "--train-subset", "256", "--val-size", "100",
        "--batch-size", "64", "--no-progress"]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A small lab's report: a teacher, a student, a distilled student (two seeds) and a pruned model."""
    out = tmp_path_factory.mktemp("lab")
    assert main(["train-teacher", "--model", "resnet8", *TINY, "--model-args", "{width: 8}", "--epochs", "1",
                 "--out-dir", str(out), "--name", "cnn_teacher"]) == 0
    assert main(["train-student", "--model", "resnet8", *TINY, "--epochs", "1", "--out-dir", str(out),
                 "--name", "cnn_student"]) == 0
    for seed in ("0", "1"):
        assert main(["distill", "--teacher", "resnet8", "--teacher-checkpoint", str(out / "cnn_teacher.pth"), *TINY,
                     "--epochs", "2", "--out-dir", str(out), "--name", f"cnn_student_kd_seed{seed}", "--seed", seed]) == 0
    assert main(["prune", "--checkpoint", str(out / "cnn_teacher.pth"), "--amount", "0.5", "--round-to", "1",
                 "--finetune-epochs", "1"]) == 0
    assert main(["report", "--models-dir", str(out), "--device", "cpu"]) == 0
    return out / "report.html"


@pytest.mark.e2e
def test_the_page_holds_the_table_pictures_curves_and_cards_and_fetches_nothing(page):
    text = page.read_text()
    assert "The lab plan&#x27;s table" in text or "The lab plan's table" in text
    assert "cnn: accuracy against size and latency" in text
    assert text.count('<div class="card">') == 6  # teacher, student, 2 distilled seeds, pruned, pruned + KD
    assert "cnn_student_kd: training loss" not in text  # curves are pictures, their titles inside them
    assert text.count("data:image/png;base64,") >= 1 + 4  # the family picture and one per trained run
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # nothing from the network
    assert "trained</th><td>20" in text and "macro F1" in text


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium not installed (.ci/run installs it)")
def test_the_page_draws_every_picture_in_headless_chromium_without_console_errors(page, tmp_path):
    shot = tmp_path / "report.png"
    browser = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", f"file://{page}"]
    dom = subprocess.run([*browser[:-1], "--dump-dom", browser[-1]], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    drawn = re.search(r'data-pictures="(\d+)/(\d+)"', dom.stdout)
    assert drawn and drawn.group(1) == drawn.group(2) and int(drawn.group(2)) >= 5, drawn
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not [line for line in console if "error" in line.lower()], console
    taken = subprocess.run([*browser[:-1], f"--screenshot={shot}", "--window-size=1280,2400", browser[-1]],
                           capture_output=True, text=True, timeout=120)
    assert taken.returncode == 0 and shot.stat().st_size > 20_000, taken.stderr[-2000:]  # a drawn page, not blank
