"""The batch scripts, submit_best_gpu.sh and the chain, on a real one-node SLURM cluster (CPU, smoke preset)."""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distillation_lab.chain import CHAIN
from slurm_cluster import LocalSlurm, available

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "slurm").glob("*.slurm"))
VENV = Path(sys.prefix)  # the venv the tests run in; jobs activate it (never copied)
# Epochs of a job that is signalled after its third: about a second each in the smoke preset, so the job is still
# running when the signal comes (even on a loaded machine), and the part after the resume is short.
SIGNALLED_EPOCHS = 20


def test_every_script_parses():
    for script in [*SCRIPTS, ROOT / "slurm/common.sh", ROOT / "slurm/submit_chain.sh", ROOT / "submit_best_gpu.sh"]:
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", "-x", "-s", "bash", *map(str, SCRIPTS), str(ROOT / "slurm/common.sh"),
                               str(ROOT / "slurm/submit_chain.sh"), str(ROOT / "submit_best_gpu.sh")],
                              capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout


def test_sbatch_headers_come_first_and_name_the_lab_resources():
    names = {s.stem for s in SCRIPTS}
    assert names == {job.script for job in CHAIN} >= {"train_cnn_teacher", "train_vit_teacher", "distill_cnn",
                                                      "train_cnn_student_baseline", "report"}
    for script in SCRIPTS:
        lines = [l for l in script.read_text().splitlines()[1:] if l.strip() and not l.startswith("# ")]
        headers = [l for l in lines if l.startswith("#SBATCH")]
        assert lines[: len(headers)] == headers, f"{script.name}: #SBATCH lines must precede commands"
        text = "\n".join(headers)
        for flag in ("--partition=markov_gpu", "--gres=gpu:1", "--time=", "--cpus-per-task=", "--mem=",
                     "--job-name=", "--output=slurm/logs/"):
            assert flag in text, (script.name, flag)
    assert "--time=24:00:00" in (ROOT / "slurm/train_cnn_teacher.slurm").read_text()
    assert "--signal=B:USR1@" in (ROOT / "slurm/distill_cnn.slurm").read_text()


def copy_repo(dest: Path) -> Path:
    """The code and scripts (not the venv, data or checkpoints) in a directory whose path has spaces."""
    dest.mkdir(parents=True)
    for name in ("main.py", "submit_best_gpu.sh"):
        shutil.copy(ROOT / name, dest / name)
    for name in ("pruning_lab", "distillation_lab", "slurm"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.out"))
    (dest / "models_saved").mkdir()
    return dest


def job_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DL_"))}
    env.update(DL_VENV=str(VENV), HF_HUB_OFFLINE="1", **extra)
    return env


@pytest.mark.e2e
def test_local_run_without_slurm_in_a_path_with_spaces(tmp_path):
    repo = copy_repo(tmp_path / "my repo")
    scratch = tmp_path / "tmp dir"
    scratch.mkdir()
    proc = subprocess.run(["bash", str(repo / "slurm/train_cnn_teacher.slurm")], capture_output=True, text=True,
                          env=job_env(DL_SMOKE="1", TMPDIR=str(scratch)), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "warning: 'module' is not available" in proc.stderr
    assert (repo / "models_saved/cnn_teacher.pth").exists() and (repo / "models_saved/cnn_teacher_last.pth").exists()
    assert list(scratch.iterdir()) == []  # the per-job scratch directory is gone


def test_a_job_without_its_teacher_stops_at_once_naming_the_real_folder(tmp_path):
    repo = copy_repo(tmp_path / "no teacher repo")
    proc = subprocess.run(["bash", str(repo / "slurm/distill_cnn.slurm")], capture_output=True, text=True,
                          env=job_env(DL_SMOKE="1", TMPDIR=str(tmp_path)), timeout=120)
    assert proc.returncode == 2
    assert f"error: {repo}/models_saved/cnn_teacher.pth not found: run the job that writes it first" in proc.stderr
    assert "python main.py" not in proc.stderr  # nothing ran
    assert [p.name for p in tmp_path.iterdir()] == ["no teacher repo"]  # the scratch copy is gone


@pytest.mark.e2e
def test_an_error_inside_the_scratch_copy_names_the_real_models_folder(tmp_path):
    repo = copy_repo(tmp_path / "bad init repo")
    proc = subprocess.run(["bash", str(repo / "slurm/train_cnn_teacher.slurm")], capture_output=True, text=True,
                          env=job_env(DL_SMOKE="1", TMPDIR=str(tmp_path),
                                      DL_EXTRA_ARGS="--init-checkpoint models_saved/missing.pth"), timeout=120)
    assert proc.returncode == 2
    assert f"error: checkpoint not found: {repo}/models_saved/missing.pth" in proc.stderr, proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["bad init repo"]  # the scratch copy is gone


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not available():
        if os.environ.get("CI"):
            pytest.fail("SLURM is not installed: .ci/run must apt-get install it")
        pytest.skip("SLURM packages not installed (see .ci/run)")
    slurm = LocalSlurm(tmp_path_factory.mktemp("slurm"), nodes=2)
    try:
        yield slurm.start()
    finally:
        slurm.stop()


def sacct_times(cluster, job):
    start, end = cluster.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "Start,End"]).stdout.strip().split("|")
    return start, end


@pytest.fixture(scope="module")
def batch_chain(cluster, tmp_path_factory):
    """The whole chain through the batch scripts (slurm/submit_chain.sh --smoke), run once: the repository
    it ran in, {job name: id} and their final states."""
    repo = copy_repo(tmp_path_factory.mktemp("chain") / "lab repo")
    proc = cluster.run(["bash", "slurm/submit_chain.sh", "--smoke"], cwd=repo, env=job_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    jobs = dict(re.findall(r"(\w+)=(\d+)", proc.stdout.splitlines()[-1]))
    return repo, jobs, cluster.wait_all(list(jobs.values()), timeout=900)


@pytest.mark.slurm
def test_chain_runs_in_dependency_order_and_writes_the_report(cluster, batch_chain):
    repo, jobs, states = batch_chain
    assert set(jobs) == {job.name for job in CHAIN}
    logs = "\n".join(p.read_text() for p in (repo / "slurm/logs").glob("*.out"))
    assert set(states.values()) == {"COMPLETED"}, (states, logs[-3000:])
    times = {name: sacct_times(cluster, job) for name, job in jobs.items()}
    for job in CHAIN:  # every job started after the jobs it waits for had ended
        for dep in job.after:
            assert times[job.name][0] >= times[dep][1], (job.name, dep, times)
    assert all(times["report"][0] >= end for _, end in times.values() if end != times["report"][1])
    for name in ("cnn_teacher", "vit_teacher", "cnn_student", "cnn_student_kd", "vit_student", "vit_student_kd",
                 "tweet_bert"):
        assert (repo / "models_saved" / f"{name}.pth").exists() and (repo / "models_saved" / f"{name}_log.csv").exists()
        assert list((repo / "models_saved/tensorboard" / name).glob("events.out.tfevents.*")), name  # curves came back
    import json

    report = json.loads((repo / "report.json").read_text())
    assert set(report) == {"cnn", "vit"}  # the lab plan's keys exactly; text is in the details
    assert all(v is not None for family in report.values() for v in family.values())
    assert (repo / "report.md").exists() and (repo / "report.png").exists() and (repo / "report.html").exists()
    details = json.loads((repo / "report_details.json").read_text())
    text = {key: details["text"][key] for key in ("teacher_accuracy", "student_accuracy_without_kd",
                                                  "student_accuracy_with_kd")}
    assert [e["run"] for e in text.values()] == ["tweet_bert", "text_student", "text_student_kd"]
    assert all(e["status"] == "ok" and "test_mcc" in e["runs"][0] for e in text.values())
    assert text["student_accuracy_with_kd"]["runs"][0]["parameters"] < text["teacher_accuracy"]["runs"][0]["parameters"]
    assert "| text " in (repo / "report.md").read_text()
    converted = {r["run"]: r for r in details["converted"]}
    assert set(converted) == {"vit_teacher_clos_m4", "vit_teacher_clos_m4_kd", "tweet_bert_clos_m4",
                              "tweet_bert_clos_m4_kd"}
    assert len(converted["vit_teacher_clos_m4"]["clos_layers"]) == 4
    assert len(converted["tweet_bert_clos_m4"]["clos_layers"]) == 12  # 2 smoke layers x (q, k, v, out, 2 MLP)
    assert converted["tweet_bert_clos_m4_kd"]["dataset"] == "tweets"
    assert "Converted models" in (repo / "report.md").read_text()
    pruned = {r["run"]: r["runs"][0] for family in ("cnn", "vit") for r in details[family]["other_runs"]}
    assert {"cnn_teacher_pruned", "cnn_teacher_pruned_kd", "vit_teacher_pruned", "vit_teacher_pruned_kd"} <= set(pruned)
    teacher_params = details["cnn"]["teacher_accuracy"]["runs"][0]["parameters"]
    assert pruned["cnn_teacher_pruned_kd"]["parameters"] <= teacher_params / 2  # the smoke target: 2x fewer
    assert pruned["vit_teacher_pruned_kd"]["method"] == "pruned, structured (l2) + KD fine-tuning"
    leftovers = [p for p in (cluster.dir / "jobtmp").rglob("distill-lab.*")]
    assert leftovers == []  # every job removed its scratch directory
    assert "warning: 'module' is not available" in logs


@pytest.mark.slurm
def test_failed_teacher_cancels_its_dependants(cluster, tmp_path):
    repo = copy_repo(tmp_path / "fail repo")
    env = job_env(DL_SMOKE="1")
    bad = cluster.run(["bash", "submit_best_gpu.sh", "slurm/train_cnn_teacher.slurm"], cwd=repo,
                      env={**env, "DL_EXTRA_ARGS": "--lr not-a-number"})
    teacher = bad.stdout.strip()
    dependants = [cluster.run(["bash", "submit_best_gpu.sh", script, f"--dependency=afterok:{teacher}",
                               "--kill-on-invalid-dep=yes"], cwd=repo, env=env).stdout.strip()
                  for script in ("slurm/distill_cnn.slurm", "slurm/train_cnn_student_baseline.slurm")]
    states = cluster.wait_all([teacher, *dependants], timeout=300)
    assert states[teacher] == "FAILED"
    assert [states[d] for d in dependants] == ["CANCELLED", "CANCELLED"]
    assert not (repo / "models_saved/cnn_student_kd.pth").exists()


@pytest.mark.slurm
def test_time_limit_signal_requeues_and_the_job_resumes(cluster, tmp_path):
    """USR1 (what --signal=B:USR1@300 sends before the time limit): save, requeue, resume, finish; while the
    job runs its checkpoints are copied back every DL_SYNC_INTERVAL seconds."""
    repo = copy_repo(tmp_path / "requeue repo")
    env = job_env(DL_SMOKE="1", DL_EXTRA_ARGS=f"--epochs {SIGNALLED_EPOCHS}", DL_SYNC_INTERVAL="1")
    job = cluster.run(["bash", "submit_best_gpu.sh", "slurm/train_cnn_student_baseline.slurm"], cwd=repo,
                      env=env).stdout.strip()
    log = repo / "slurm/logs" / f"cnn_student-{job}.out"
    wait_for_line(log, f"epoch 3/{SIGNALLED_EPOCHS}")
    synced = repo / "models_saved/cnn_student_last.pth"
    deadline = time.time() + 30
    while not synced.exists() and time.time() < deadline:
        time.sleep(0.5)
    assert synced.exists() and cluster.state(job) == "RUNNING"  # copied back while the job runs
    assert cluster.run(["scancel", "--signal=USR1", "--batch", job]).returncode == 0
    info = release_requeued(cluster, job)
    assert "Restarts=1" in info, info
    states = cluster.wait_all([job], timeout=600)
    text = log.read_text()
    assert states[job] == "COMPLETED", text[-3000:]
    assert "requeueing job" in text and "resuming" in text
    assert "cp: " not in text and "cmp: " not in text  # the copies back (every second here) are silent
    assert list((repo / "models_saved/tensorboard/cnn_student").glob("events.*"))  # the curves came back
    import torch

    history = torch.load(repo / "models_saved/cnn_student_last.pth", weights_only=True)["history"]
    assert [row["epoch"] for row in history] == list(range(1, SIGNALLED_EPOCHS + 1))
    assert list((cluster.dir / "jobtmp").rglob("distill-lab.*")) == []


@pytest.mark.slurm
def test_scancel_ends_the_job_and_a_resubmitted_job_finishes_on_its_staged_best(cluster, tmp_path):
    """A user's scancel (SIGTERM) saves and ends the job, no requeue; submitting the script again with no
    epochs left ends cleanly on the best checkpoint, which is staged with the last one."""
    repo = copy_repo(tmp_path / "scancel repo")
    env = job_env(DL_SMOKE="1", DL_EXTRA_ARGS="--epochs 60")
    job = cluster.run(["bash", "submit_best_gpu.sh", "slurm/train_cnn_student_baseline.slurm"], cwd=repo,
                      env=env).stdout.strip()
    log = repo / "slurm/logs" / f"cnn_student-{job}.out"
    wait_for_line(log, "epoch 3/60")
    assert cluster.run(["scancel", job]).returncode == 0
    states = cluster.wait_all([job], timeout=120)
    text = log.read_text()
    assert states[job] == "CANCELLED", text[-3000:]
    assert "not requeued" in text and "requeueing" not in text
    assert "Restarts=0" in cluster.run(["scontrol", "show", "job", job]).stdout
    import torch

    done = torch.load(repo / "models_saved/cnn_student_last.pth", weights_only=True)["progress"]["epoch"]
    assert done >= 3 and (repo / "models_saved/cnn_student.pth").exists()
    again = cluster.run(["bash", "submit_best_gpu.sh", "slurm/train_cnn_student_baseline.slurm"], cwd=repo,
                        env={**env, "DL_EXTRA_ARGS": f"--epochs {done}"}).stdout.strip()
    states = cluster.wait_all([again], timeout=300)
    text = (repo / "slurm/logs" / f"cnn_student-{again}.out").read_text()
    assert states[again] == "COMPLETED", text[-3000:]
    assert f"has finished its {done} epochs" in text and "test acc" in text
    assert list((cluster.dir / "jobtmp").rglob("distill-lab.*")) == []


@pytest.mark.slurm
def test_submit_best_gpu_prefers_a_declared_type_and_falls_back(cluster, tmp_path):
    repo = copy_repo(tmp_path / "gpu repo")
    env = job_env(DL_SMOKE="1", DL_GPU_PREFERENCE="h100 a100")  # the test node declares gpu,a100
    proc = cluster.run(["bash", "submit_best_gpu.sh", "slurm/report.slurm", "--hold"], cwd=repo, env=env)
    assert proc.returncode == 0 and "choosing a100" in proc.stderr, proc.stderr
    job = proc.stdout.strip()
    assert "Features=a100" in cluster.run(["scontrol", "show", "job", job]).stdout
    proc = cluster.run(["bash", "submit_best_gpu.sh", "slurm/report.slurm", "--hold"], cwd=repo,
                       env={**env, "DL_GPU_PREFERENCE": "h100 v100"})
    assert proc.returncode == 0 and "submitting without a GPU type" in proc.stderr
    plain = proc.stdout.strip()
    assert "Features=(null)" in cluster.run(["scontrol", "show", "job", plain]).stdout
    # What it avoids: asking for a feature the cluster does not declare is refused at submit.
    refused = cluster.run(["sbatch", "-C", "h100", str(repo / "slurm/report.slurm")], cwd=repo, env=env)
    assert refused.returncode != 0 and "Invalid feature" in refused.stderr
    dry = cluster.run(["bash", "submit_best_gpu.sh", "--dry-run", "slurm/report.slurm"], cwd=repo, env=env)
    assert dry.stdout.startswith("sbatch --parsable --partition=markov_gpu -C a100")
    # From another directory, with --dry-run after the script: the job still runs in the repository.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dry = cluster.run(["bash", str(repo / "submit_best_gpu.sh"), str(repo / "slurm/report.slurm"), "--dry-run"],
                      cwd=elsewhere, env=env)
    assert dry.returncode == 0 and dry.stdout.startswith("sbatch --parsable"), dry.stderr
    proc = cluster.run(["bash", str(repo / "submit_best_gpu.sh"), "../gpu repo/slurm/report.slurm", "--hold"],
                       cwd=elsewhere, env=env)
    assert proc.returncode == 0, proc.stderr
    other = proc.stdout.strip()
    assert f"WorkDir={repo}" in cluster.run(["scontrol", "show", "job", other]).stdout
    cluster.run(["scancel", job, plain, other])


@pytest.mark.slurm
def test_data_parallel_job_under_slurm(cluster, tmp_path):
    """DL_NPROC=2: the batch script launches torchrun with two processes (gloo on CPU)."""
    repo = copy_repo(tmp_path / "ddp repo")
    env = job_env(DL_SMOKE="1", DL_NPROC="2")
    job = cluster.run(["bash", "submit_best_gpu.sh", "slurm/train_cnn_teacher.slurm"], cwd=repo, env=env).stdout.strip()
    states = cluster.wait_all([job], timeout=300)
    log = (repo / "slurm/logs" / f"cnn_teacher-{job}.out").read_text()
    assert states[job] == "COMPLETED", log[-3000:]
    assert "data-parallel: 2 processes with torchrun" in log and log.count("test acc") == 1
    assert (repo / "models_saved/cnn_teacher.pth").exists()


def release_requeued(cluster, job: str) -> str:
    """Wait until a stopped job is back in the queue, then let it start at once; its scontrol record."""
    # SLURM holds a requeued job back for a while before it may start again; skip that wait here.
    deadline, info = time.time() + 120, ""
    while time.time() < deadline and not ("Restarts=1" in info and "JobState=PENDING" in info):
        time.sleep(0.5)
        info = cluster.run(["scontrol", "show", "job", job]).stdout
    # slurmd refuses a credential made in the same second as the revoked one ("Job credential revoked").
    time.sleep(3)
    cluster.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
    return info


def wait_for_line(path: Path, text: str, timeout: float = 180) -> None:
    """Wait until a job's log contains `text`."""
    deadline = time.time() + timeout
    while time.time() < deadline and not (path.exists() and text in path.read_text()):
        time.sleep(0.5)


@pytest.mark.slurm
def test_multi_node_job_stages_every_node_trains_data_parallel_and_resumes(cluster, tmp_path):
    """--nodes=2: one srun step per node with its own scratch copy, torchrun across the nodes; the
    time-limit signal reaches every node through srun, the job requeues and resumes."""
    repo = copy_repo(tmp_path / "two node repo")
    env = job_env(DL_SMOKE="1", DL_EXTRA_ARGS=f"--epochs {SIGNALLED_EPOCHS}")
    job = cluster.run(["bash", "submit_best_gpu.sh", "slurm/train_cnn_teacher.slurm", "--nodes=2"], cwd=repo,
                      env=env).stdout.strip()
    log = repo / "slurm/logs" / f"cnn_teacher-{job}.out"
    wait_for_line(log, f"epoch 3/{SIGNALLED_EPOCHS}")
    assert cluster.run(["scancel", "--signal=USR1", "--batch", job]).returncode == 0
    assert "Restarts=1" in release_requeued(cluster, job)
    states = cluster.wait_all([job], timeout=300)
    text = log.read_text()
    assert states[job] == "COMPLETED", text[-3000:]
    assert "data-parallel: 2 nodes x 1 processes" in text and "data-parallel: 2 processes (gloo)" in text
    assert "requeueing job" in text and "resuming" in text
    scratch_dirs = set(re.findall(r"on (\S+): scratch (\S+)", text))
    assert {node for node, _ in scratch_dirs} == {"dlnode1", "dlnode2"}  # each node staged its own copy
    assert text.count("test acc") == 1  # rank 0 alone reports and writes
    import torch

    history = torch.load(repo / "models_saved/cnn_teacher_last.pth", weights_only=True)["history"]
    assert [row["epoch"] for row in history] == list(range(1, SIGNALLED_EPOCHS + 1))
    assert list((cluster.dir / "jobtmp").rglob("distill-lab.*")) == []


@pytest.mark.slurm
def test_submitit_chain_resubmits_part_of_the_table(cluster, batch_chain, tmp_path):
    """`submit --jobs` (the batch-script chain above ran every job): one job of each command that reads a
    checkpoint (distill, clos-convert, prune) and the report, which waits for them (afterok); the jobs they
    need outside the subset count as done: their checkpoints, made by the batch chain, are read."""
    made = batch_chain[0] / "models_saved"
    repo = copy_repo(tmp_path / "submitit repo")
    subset = ["cnn_student_kd", "vit_teacher_clos", "cnn_teacher_pruned", "report"]
    for path in made.iterdir():  # everything but what the subset makes
        if path.is_file() and not path.name.startswith(tuple(subset)):
            shutil.copy(path, repo / "models_saved")
    assert (repo / "models_saved/cnn_teacher.pth").exists() and not (repo / "models_saved/cnn_student_kd.pth").exists()
    proc = subprocess.run([sys.executable, "main.py", "submit", "--smoke", "--folder", str(tmp_path / "sub"),
                           "--jobs", *subset, "--wait"], cwd=repo, env={**cluster.env, **job_env()},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    jobs = dict(re.findall(r"(\w+)=(\d+)", proc.stdout.splitlines()[0]))
    assert list(jobs) == subset  # in table order
    assert all(cluster.state(j) == "COMPLETED" for j in jobs.values())
    times = {name: sacct_times(cluster, job) for name, job in jobs.items()}
    assert all(times["report"][0] >= end for name, (_, end) in times.items() if name != "report")
    for name in ("cnn_student_kd", "vit_teacher_clos_m4", "vit_teacher_clos_m4_kd", "cnn_teacher_pruned",
                 "cnn_teacher_pruned_kd"):
        assert (repo / "models_saved" / f"{name}.pth").exists(), name
    import json

    report = json.loads((repo / "report.json").read_text())
    assert all(v is not None for family in report.values() for v in family.values())
    details = json.loads((repo / "report_details.json").read_text())
    assert {"vit_teacher_clos_m4", "vit_teacher_clos_m4_kd"} <= {r["run"] for r in details["converted"]}
    assert "cnn_teacher_pruned_kd" in {r["run"] for r in details["cnn"]["other_runs"]}


@pytest.mark.slurm
def test_submitit_job_requeues_on_its_signal_and_resumes(cluster, tmp_path):
    """submitit's time-limit/preemption signal (USR2): the job is requeued with the same command line
    and the training resumes from its last checkpoint to the end."""
    repo = copy_repo(tmp_path / "submitit requeue repo")
    script = (
        "import sys, submitit\n"
        "from distillation_lab.chain import CHAIN\n"
        "from distillation_lab.submit import CliJob, job_argv\n"
        "job = next(j for j in CHAIN if j.name == 'cnn_student')\n"
        "ex = submitit.AutoExecutor(folder=sys.argv[1])\n"
        "ex.update_parameters(slurm_partition='markov_gpu', timeout_min=30, cpus_per_task=1, mem_gb=4)\n"
        f"print(ex.submit(CliJob(), job_argv(job, True, {{'epochs': {SIGNALLED_EPOCHS}}})).job_id)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "sub")], cwd=repo,
                          env={**cluster.env, **job_env()}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    job = proc.stdout.split()[-1]
    out = tmp_path / "sub" / f"{job}_0_log.out"
    wait_for_line(out, f"epoch 3/{SIGNALLED_EPOCHS}")
    assert cluster.run(["scancel", "--signal=USR2", job]).returncode == 0
    assert "Restarts=1" in release_requeued(cluster, job)
    states = cluster.wait_all([job], timeout=600)
    text = out.read_text()
    assert states[job] == "COMPLETED", text[-3000:]
    assert "resuming" in text
    import torch

    history = torch.load(repo / "models_saved/cnn_student_last.pth", weights_only=True)["history"]
    assert [row["epoch"] for row in history] == list(range(1, SIGNALLED_EPOCHS + 1))


@pytest.mark.slurm
def test_a_sweep_as_one_slurm_array_job_then_its_table(cluster, tmp_path):
    tiny = ["--dataset", "mnist_embedded", "--model-args", "{width: 4}", "--train-subset", "256", "--val-size", "100",
            "--batch-size", "64", "--epochs", "1", "--no-progress"]
    repo = copy_repo(tmp_path / "sweep repo")
    assert subprocess.run([sys.executable, "main.py", "train-teacher", "--model", "resnet8", *tiny,
                           "--out-dir", "models_saved", "--name", "t"], cwd=repo).returncode == 0
    proc = cluster.run([sys.executable, "main.py", "sweep", "--model", "resnet8", *tiny, "--teacher", "resnet8",
                        "--teacher-checkpoint", "models_saved/t.pth", "--out-dir", "models_saved", "--sweep", "a",
                        "--seeds", "0", "--grid", "loss: [ce, kd]", "--baseline", "loss=ce", "--launcher", "slurm",
                        "--max-parallel", "2", "--time", "00:10:00"], cwd=repo, env=job_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    array, table = proc.stdout.split("submitted array job ")[1].split()[0], proc.stdout.split("and job ")[1].split()[0]
    script = (repo / "models_saved/a.sweep/sweep.slurm").read_text()
    assert "#SBATCH --array=0-1%2" in script and "slurm/common.sh" in script
    states = cluster.wait_all([array, table], timeout=600)
    assert set(states.values()) == {"COMPLETED"}, states
    for name in ("a__loss-ce_seed0", "a__loss-kd_seed0"):
        assert (repo / "models_saved" / f"{name}.pth").exists(), name
    md = (repo / "models_saved/a.sweep/table.md").read_text()
    assert "| loss-kd | 1/1 |" in md and "better in" in md
