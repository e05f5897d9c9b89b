"""Sweeps: the grid, run names, method losses, the paired statistics, and a local sweep that reruns and fails one point
alone (the same sweep as a SLURM array job is in test_slurm.py, on its cluster)."""
import json

import pytest
from scipy import stats

from distillation_lab import sweep as sw
from distillation_lab.main import main
from pruning_lab.checkpoint import load_checkpoint
from pruning_lab.config import make_config
from pruning_lab.errors import UserError

TINY = ["--dataset", "mnist_embedded", "--model-args", "{width: 4}", "--train-subset", "256", "--val-size", "100",
        "--batch-size", "64", "--epochs", "1", "--no-progress"]


def test_the_grid_from_flags_and_a_file_gives_one_run_per_point_and_seed(tmp_path):
    (tmp_path / "grid.yaml").write_text("loss: [kd, dist]\n")
    grid = sw.parse_grid(["temperature: [2, 4]"], str(tmp_path / "grid.yaml"))
    assert grid == {"loss": ["kd", "dist"], "temperature": [2, 4]}
    runs = sw.plan(grid, [0, 1], "s")
    assert [r.name for r in runs[:3]] == ["s__loss-kd_temperature-2_seed0", "s__loss-kd_temperature-2_seed1",
                                           "s__loss-kd_temperature-4_seed0"]
    assert len(runs) == 8 and len({r.point for r in runs}) == 4
    for bad, message in (("temperature 2", r"must be KEY: \[VALUES\]"), ("a: [1, 2", "is not YAML"),
                         ("a: []", "has no values"), ("lr: 0.1", r"must list its values: 'lr: \[0.1\]'"),
                         ("lr: [0.1, 0.1]", "has the value 0.1 twice"), ("seed: [0, 1]", "give the seeds with --seeds"),
                         ("out_dir: [a, b]", "give the folder with --out-dir"), ("lr: [0.1]\nlr: [0.2]", "given twice")):
        with pytest.raises(UserError, match=message):
            sw.parse_grid([bad])
    with pytest.raises(UserError, match="given twice"):
        sw.parse_grid(["loss: [kd]"], str(tmp_path / "grid.yaml"))


def test_a_method_name_is_its_loss_and_a_temperature_beside_it_goes_into_its_terms():
    values = sw.point_values({"loss": "dkd", "temperature": 2})
    assert values == {"loss": {"ce": {"weight": 1.0}, "dkd": {"weight": 1.0, "alpha": 1.0, "beta": 8.0,
                                                             "temperature": 2}}}
    assert sw.point_values({"loss": "ls_kd"})["loss"]["kd"]["standardize"] is True
    assert sw.METHOD_LOSSES["kd"]["kd"]["temperature"] == 4.0  # the table itself is never changed
    with pytest.raises(UserError, match="unknown method 'fitnetz'.*methods: ce, kd, ls_kd"):
        sw.point_values({"loss": "fitnetz"})
    with pytest.raises(UserError, match="grid key alpha beside 'loss'"):
        sw.point_values({"loss": "kd", "alpha": 0.3})
    base = make_config({"teacher_checkpoint": "t.pth", "teacher": "resnet18"})
    alone = sw.run_config(base, sw.Run("loss-ce", {"loss": "ce"}, 1, "s__loss-ce_seed1"), "out")
    assert (alone.teacher_checkpoint, alone.seed, alone.name, alone.out_dir) == ("", 1, "s__loss-ce_seed1", "out")
    assert sw.command_of(alone) == "train-student"
    for method in sw.METHOD_LOSSES:  # every method's settings pass the loss checks
        cfg = sw.run_config(base, sw.Run(f"loss-{method}", {"loss": method}, 0, f"s__loss-{method}_seed0"), "out")
        assert sw.command_of(cfg) == ("train-student" if method == "ce" else "distill")


def test_the_paired_statistics_are_scipys_paired_t_test():
    a, b = [0.91, 0.93, 0.92, 0.95], [0.90, 0.90, 0.93, 0.91]
    out = sw.paired([x - y for x, y in zip(a, b)])
    assert out["p_value"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert out["wins"] == 3 and out["seeds"] == 4 and out["mean"] == pytest.approx(0.0175)
    assert sw.paired([0.01])["p_value"] is None and sw.paired([0.01])["std"] is None
    assert sw.matches({"loss": "kd", "temperature": 4}, "loss=kd") and not sw.matches({"loss": "dkd"}, "loss=kd")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    assert main(["train-teacher", "--model", "resnet8", *TINY, "--model-args", "{width: 8}", "--out-dir", str(out),
                 "--name", "t"]) == 0
    return out / "t.pth"


@pytest.mark.e2e
def test_a_local_sweep_trains_every_point_reruns_only_what_is_left_and_fails_a_point_alone(teacher, tmp_path, capsys):
    out = tmp_path / "sweeps"
    argv = ["sweep", "--model", "resnet8", *TINY, "--teacher-checkpoint", str(teacher), "--teacher", "resnet8",
            "--out-dir", str(out), "--sweep", "m", "--seeds", "0", "1", "--baseline", "loss=kd",
            "--grid", "loss: [ce, kd, {ce: {weight: 1}, rkd: {weight: 1, layer: 9}}]"]
    assert main(argv) == 1  # the last point cannot build its term: it fails alone
    err = capsys.readouterr().err
    assert "2 run(s) failed: m__loss-h" in err
    table = json.loads((out / "m.sweep" / "table.json").read_text())
    rows = {r["point"]: r for r in table["rows"]}
    assert [rows[p]["seeds_done"] for p in ("loss-ce", "loss-kd")] == [2, 2]
    assert rows["loss-ce"]["vs"]["loss=kd"]["seeds"] == 2 and rows["loss-kd"]["vs"] == {}
    assert load_checkpoint(out / "m__loss-ce_seed1.pth")["teacher"] is None  # the student alone: no teacher
    assert load_checkpoint(out / "m__loss-kd_seed1.pth")["config"]["seed"] == 1
    md = (out / "m.sweep" / "table.md").read_text()
    assert "| loss-kd | 2/2 |" in md and "(baseline)" in md and "| loss-ce | 2/2 |" in md
    before = {p.name: p.stat().st_mtime for p in out.glob("m__loss-*_seed*_last.pth")}
    assert main(argv[:-1] + ["loss: [ce, kd]"]) == 0  # the rerun only evaluates what is finished
    assert {p.name: p.stat().st_mtime for p in out.glob("m__loss-*_seed*_last.pth")} == before


def test_bad_sweeps_are_refused_before_any_run(teacher, tmp_path, capsys):
    base = ["sweep", "--model", "resnet8", *TINY, "--teacher-checkpoint", str(teacher), "--teacher", "resnet8",
            "--out-dir", str(tmp_path / "s")]
    for extra, message in ((["--grid", "lr: [0.1, -1]"], "config key 'lr' in sweep point lr-1 must be > 0"),
                           (["--grid", "learning_rate: [0.1]"], "unknown config key 'learning_rate'"),
                           (["--grid", "loss: [kd]", "--baseline", "loss=dkd"], "--baseline loss=dkd matches no point"),
                           (["--grid", "loss: [kd]", "--sweep", "../x"], "--sweep '../x' must be a plain name"),
                           (["--grid", "loss: [kd]", "--launcher", "slurm"], "add --out-dir models_saved"),
                           ([], "a sweep needs a grid"),
                           (["--grid", "loss: [kd]", "--seeds", "0", "0"], "--seeds 0 is given twice"),
                           (["--grid", "loss: [kd]", "--seeds", str(2**32)], "must be <= 2**32 - 1"),
                           (["--grid", "loss: [kd]", "--max-parallel", "4"],
                            "--max-parallel applies to --launcher slurm or submitit, not local"),
                           (["--grid", "loss: [kd]", "--launcher", "submitit", "--time=-1:00:00"],
                            "'-1:00:00' is not a time limit HH:MM:SS above zero")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "s").exists()


def test_each_distillation_method_is_its_own_method_in_the_report():
    """A sweep's points (students distilled with other terms) are told apart on the report's rows and pictures."""
    from distillation_lab.report import method_of

    def student(loss, surgery=()):
        return {"config": {"loss": loss}, "surgery": list(surgery)}

    assert method_of(student({"ce": {}, "kd": {}}), "student_with_kd") == "student with kd"
    assert method_of(student({"ce": {}, "dist": {}}), "student_with_kd") == "student with kd (dist)"
    assert method_of(student({"kd": {}, "rkd": {}, "sp": {}}), "student_with_kd") == "student with kd (rkd + sp)"
    assert method_of(student({"ce": {}, "kd": {}}, [{"kind": "bottleneck"}]), "student_with_kd") == \
        "student with kd + key-value bottleneck"


def test_report_of_a_sweep_refuses_a_damaged_plan_and_flags_that_do_not_apply(tmp_path, capsys):
    folder = tmp_path / "s.sweep"
    folder.mkdir()
    (folder / "sweep.json").write_text("{not json")
    for extra, message in (([], f"cannot read the sweep's plan {folder / 'sweep.json'}"),
                           (["--output", str(tmp_path / "r.json")], "--output does not apply with --sweep"),
                           (["--models-dir", str(tmp_path)], "--models-dir does not apply with --sweep")):
        assert main(["report", "--sweep", str(folder), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["s.sweep", "sweep.json"]
