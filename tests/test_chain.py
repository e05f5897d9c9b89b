"""The job table: the committed batch scripts are what it renders, its order and links hold, and the
report finds runs by what their checkpoints record (a custom --name still lands in its family)."""
import json
import subprocess
from pathlib import Path

import pytest

from distillation_lab.chain import main as chain_main
from distillation_lab.chain import (CHAIN, DEFAULT_PARTITION, DEMO, RENDERED_NOTE, Job, check_order, render_script,
                                    rendered_files)
from distillation_lab.main import main
from distillation_lab.recipes import recipe_config
from pruning_lab.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def test_committed_scripts_are_what_the_table_renders():
    for path, text in rendered_files().items():
        assert path.read_text() == text, f"{path.name} differs: run python -m distillation_lab.chain --write"
        assert text.splitlines()[1] == RENDERED_NOTE  # a user who opens one reads first that it is rendered
    scripts = {p.name for p in (ROOT / "slurm").glob("*.slurm")}
    assert scripts == {f"{job.script}.slurm" for job in CHAIN}  # no script without a row
    assert chain_main(["--check"]) == 0  # what `python -m distillation_lab.chain --check` runs


def test_table_is_in_dependency_order_and_its_links_hold():
    check_order(CHAIN)
    check_order(DEMO)
    names = {job.name for job in CHAIN}
    with pytest.raises(AssertionError, match="waits for"):
        check_order((Job("b", "train-student", "", after=("a",)), Job("a", "train-teacher", "")))
    for job in CHAIN + DEMO:
        if job.recipe:
            cfg = recipe_config(job.recipe)  # every recipe exists and is a valid config
            assert cfg.run_name() == job.name, job
        if job.teacher:
            assert next(j for j in CHAIN + DEMO if j.name == job.teacher).command == "train-teacher"
    report = next(job for job in CHAIN if job.command == "report")
    assert set(report.after) == names - {"report", "tweet_bert"}  # tweet_bert through its conversion


def test_a_new_row_renders_a_complete_script():
    job = Job("cnn_pruned", "distill", "A pruned ResNet-18 fine-tuned with KD.", recipe="distill_cnn",
              after=("cnn_teacher",), script="prune_cnn", time="04:00:00", smoke={"--epochs": "2"})
    text = render_script(job)
    assert "#SBATCH --job-name=cnn_pruned\n" in text and "#SBATCH --time=04:00:00\n" in text
    assert "#SBATCH --requeue\n" in text and "KD. Runs after cnn_teacher in the chain.\n" in text
    assert "dl_require cnn_teacher.pth\ndl_stage cnn_pruned.pth cnn_pruned_last.pth\n" in text
    assert "--teacher-checkpoint models_saved/cnn_teacher.pth --resume\n" in text
    assert "--epochs 2" in text and "--epochs 1" not in text  # the row's smoke flag replaces the preset's


def test_submit_chain_dry_run_submits_every_row_after_its_dependencies(tmp_path):
    proc = subprocess.run(["bash", "slurm/submit_chain.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": f"{tmp_path}:/usr/bin:/bin"})  # no sinfo: plain submission
    assert proc.returncode == 0, proc.stderr
    commands = [line for line in proc.stderr.splitlines() if line.startswith("sbatch")]
    assert len(commands) == len(CHAIN)
    for job, command in zip(CHAIN, commands):
        assert command.endswith(f"slurm/{job.script}.slurm ")
        deps = ":".join(f"\\<{j.script}\\>" for j in CHAIN if j.name in job.after)
        assert (f"--dependency=afterok:{deps}" in command) == bool(job.after), command
    assert proc.stdout.startswith("submitted: " + " ".join(f"{j.name}=<{j.script}>" for j in CHAIN[:3]))


TINY = ["--dataset", "mnist_embedded", "--epochs", "1", "--train-subset", "256", "--val-size", "100",
        "--batch-size", "32", "--no-progress"]


@pytest.mark.e2e
def test_report_finds_runs_by_their_checkpoints_not_their_file_names(tmp_path):
    out = tmp_path / "models"
    assert main(["train-teacher", "--model", "resnet18", "--model-args", "{width: 4}", *TINY,
                 "--out-dir", str(out), "--name", "my_teacher"]) == 0
    assert main(["distill", "--model-args", "{width: 4}", "--teacher-checkpoint", str(out / "my_teacher.pth"),
                 *TINY, "--out-dir", str(out), "--name", "kd_try"]) == 0
    assert main(["train-student", "--model", "mnist_mlp", "--model-args", "{hidden: [16, 8]}", *TINY,
                 "--out-dir", str(out), "--name", "mlp_probe"]) == 0
    kd = load_checkpoint(out / "kd_try.pth")
    assert (kd["role"], kd["family"], kd["teacher"]["name"], kd["surgery"]) == ("student", "cnn", "my_teacher", [])
    (out / "renamed_file.pth").write_bytes((out / "my_teacher.pth").read_bytes())  # same run, same seed: its own row
    report = main(["report", "--models-dir", str(out), "--output", str(tmp_path / "report.json"), "--device", "cpu"])
    assert report == 0
    details = json.loads((tmp_path / "report_details.json").read_text())
    lab = json.loads((tmp_path / "report.json").read_text())
    assert details["cnn"]["student_accuracy_with_kd"]["run"] == "kd_try"
    assert lab["cnn"]["student_accuracy_with_kd"] == kd["test"]["acc"]
    assert lab["cnn"]["student_accuracy_without_kd"] is None  # none was trained
    assert details["cnn"]["teacher_accuracy"]["status"] == "ambiguous"  # two teacher runs, neither the table's
    assert set(details["cnn"]["teacher_accuracy"]["candidates"]) == {"my_teacher", "renamed_file"}
    assert [r["run"] for r in details["mlp"]["other_runs"]] == ["mlp_probe"]  # its own family
    assert "mlp_probe" in (tmp_path / "report.md").read_text()


def test_loss_shorthands_and_loss_are_one_setting(tmp_path, capsys):
    from pruning_lab.config import make_config
    from pruning_lab.errors import UserError

    recipe = recipe_config("distill_cnn")  # alpha 0.5, temperature 4
    assert make_config({"alpha": 0.7}, base=recipe).temperature == 4.0  # shorthands add up
    replaced = make_config({"loss": {"kd": {"weight": 1.0}}}, base=recipe)
    assert replaced.loss == {"kd": {"weight": 1.0}} and replaced.alpha is None  # a later `loss` replaces them
    with pytest.raises(UserError, match="gives both 'loss' and 'alpha'"):
        make_config({"loss": {"kd": {"weight": 1.0}}, "alpha": 0.3}, "my.yaml")
    with pytest.raises(UserError, match="'temperature' in command line would change a loss given as the mapping"):
        make_config({"temperature": 2.0}, "command line", base=replaced)
    out = tmp_path / "models"
    assert main(["train-teacher", "--model", "resnet18", "--model-args", "{width: 4}", *TINY,
                 "--out-dir", str(out)]) == 0
    assert main(["distill", "--model-args", "{width: 4}", "--teacher-checkpoint", str(out / "cnn_teacher.pth"),
                 "--alpha", "0.3", "--temperature", "2", *TINY, "--out-dir", str(out)]) == 0
    recorded = load_checkpoint(out / "cnn_student_kd.pth")["config"]  # the loss that ran, not the shorthands
    assert recorded["loss"] == {"ce": {"weight": 0.3, "label_smoothing": 0.0}, "kd": {"weight": 0.7, "temperature": 2.0}}
    assert recorded["alpha"] is None and recorded["temperature"] is None
    capsys.readouterr()
    assert main(["distill", "--teacher-checkpoint", str(out / "cnn_teacher.pth"), "--alpha", "0.3",
                 "--loss", "{kd: {weight: 1}}", *TINY, "--out-dir", str(out / "x")]) == 2
    assert "gives both 'loss' and 'alpha'" in capsys.readouterr().err and not (out / "x").exists()
    assert main(["train-student", "--teacher-checkpoint", str(out / "cnn_teacher.pth"), *TINY,
                 "--out-dir", str(out / "x")]) == 2
    assert "use the distill command" in capsys.readouterr().err and not (out / "x").exists()


def test_submit_best_gpu_works_from_any_directory_with_dry_run_anywhere(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "submit_best_gpu.sh"), "../" + str(Path("slurm/report.slurm")),
                           "--dry-run", "--hold"], cwd=ROOT / "tests", capture_output=True, text=True,
                          env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["sbatch", "--parsable", f"--partition={DEFAULT_PARTITION}", "--hold",
                                   str(ROOT / "slurm/report.slurm")]


def test_submit_best_gpu_leaves_the_partition_to_the_cluster_when_the_script_names_none(tmp_path):
    script = tmp_path / "plain.slurm"
    script.write_text("#!/bin/bash\n#SBATCH --time=1:00\necho hi\n")
    run = lambda **env: subprocess.run(["bash", str(ROOT / "submit_best_gpu.sh"), "--dry-run", str(script)],  # noqa: E731
                                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", **env})
    assert run().stdout.split() == ["sbatch", "--parsable", str(script)]
    assert run(DL_PARTITION="gpu_a").stdout.split() == ["sbatch", "--parsable", "--partition=gpu_a", str(script)]


def test_pipeline_options_reach_every_job_and_the_loss_only_distillation():
    from distillation_lab.pipeline import preset_configs

    configs = preset_configs("demo", {"model_args": {"width": 2}, "alpha": 0.3, "epochs": 1}, seeds=[0])
    assert [c.name for c in configs] == ["cnn_teacher", "cnn_student", "cnn_student_kd"]
    assert all(c.model_args == {"width": 2} and c.epochs == 1 and c.resume for c in configs)
    assert [c.alpha for c in configs] == [None, None, 0.3]
    assert configs[2].teacher_checkpoint == "models_saved/demo/cnn_teacher.pth"


def test_submit_jobs_names_unknown_jobs_and_missing_checkpoints_before_submitting(tmp_path, monkeypatch, capsys):
    """`submit --jobs`: unknown names list the table's; a dependency outside the subset counts as done, so its
    checkpoint must exist; a refusal is one line and submits nothing (no SLURM needed to see it)."""
    from distillation_lab.submit import made_checkpoint, select_jobs

    monkeypatch.chdir(tmp_path)  # where the jobs would run: its models_saved/
    folder = tmp_path / "submitit"
    assert main(["submit", "--jobs", "cnn_student_kd", "cnn_teachr", "--folder", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown job cnn_teachr in --jobs; the jobs are: " + ", ".join(j.name for j in CHAIN)
    assert main(["submit", "--jobs", "report", "cnn_student_kd", "cnn_teacher", "--folder", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: models_saved/vit_teacher.pth not found (job vit_teacher makes it); ") and "\n" not in err
    assert "cnn_teacher.pth" not in err and "cnn_student_kd.pth" not in err  # submitted with it: made first
    assert "models_saved/vit_teacher_clos_m4.pth not found (job vit_teacher_clos makes it)" in err
    assert "models_saved/cnn_teacher_pruned.pth not found (job cnn_teacher_pruned makes it)" in err
    assert err.endswith("add those jobs to --jobs or run them first; nothing was submitted")
    assert not folder.exists()
    (tmp_path / "models_saved").mkdir()
    (tmp_path / "models_saved/cnn_teacher.pth").touch()
    assert [j.name for j in select_jobs(["cnn_teacher_pruned", "cnn_student_kd"])] == ["cnn_student_kd",
                                                                                       "cnn_teacher_pruned"]
    assert select_jobs() == list(CHAIN)  # without --jobs: every job of the table, the Clos conversions too
    # What each job makes is what the jobs after it read.
    for job in CHAIN:
        for dep in job.after:
            made = made_checkpoint(next(j for j in CHAIN if j.name == dep))
            assert made in job.argv() or job.command in ("train-student", "report"), (job.name, made)
