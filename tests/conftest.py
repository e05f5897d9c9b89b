"""Shared test helpers: offline, few threads, tiny configs on the embedded data."""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/slurm_cluster.py
import os

# OpenMP threads that spin while they wait for each other crawl when the cores are shared (measured on 2 busy
# cores: 5 training steps of a tiny ResNet in 28 s spinning, 1.3 s passive); tests, their subprocesses and their
# SLURM jobs (which inherit this environment) wait passively.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a download path in tests
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
import tempfile  # noqa: E402

os.environ.setdefault("DL_CACHE_DIR", tempfile.mkdtemp(prefix="dl-cache-"))  # tokenised texts: not in ~/.cache

import pytest  # noqa: E402
import torch  # noqa: E402

from pruning_lab.config import Config, make_config  # noqa: E402

torch.set_num_threads(2)


def tiny_config(out_dir, **overrides) -> Config:
    """A seconds-long run on the embedded MNIST digits."""
    values = dict(model="resnet8", model_args={"width": 4}, dataset="mnist_embedded", epochs=2, batch_size=32,
                  train_subset=256, val_size=200, optimizer="sgd", lr=0.05, scheduler="cosine",
                  out_dir=str(out_dir), progress=False, name="tiny")
    values.update(overrides)
    return make_config(values, "test")


@pytest.fixture
def tiny(tmp_path):
    """Factory for tiny configs writing under a fresh temporary directory."""
    return lambda **kw: tiny_config(tmp_path / "models", **kw)


def pytest_collection_modifyitems(items) -> None:
    """A test that uses the SLURM cluster fixture must be marked slurm, or the fast lane would run it."""
    unmarked = [item.nodeid for item in items if "cluster" in getattr(item, "fixturenames", ())
                and not item.get_closest_marker("slurm")]
    if unmarked:
        raise pytest.UsageError(f"mark these tests @pytest.mark.slurm (they use the cluster): {unmarked}")
