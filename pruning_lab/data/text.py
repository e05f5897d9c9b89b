"""Text datasets read from files: GLUE tasks in GLUE's own TSV layout, and a user's CSV of texts and labels.

Each becomes token ids [N, L] (the MiniLM tokenizer; a sentence pair as "[CLS] a [SEP] b [SEP]", the
model telling the two apart by the [SEP]) plus int64 labels. Tokenising a large task takes minutes, so
the ids are cached on disk (DL_CACHE_DIR, default ~/.cache/distill-lab), keyed by the file's path, size
and modification time, the columns and the length: a changed file is tokenised again.
GLUE's test labels are hidden, so its dev split is our test split (MNLI: dev_matched).
"""
from __future__ import annotations

import csv
import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from ..config import GLUE_TASKS
from ..errors import UserError
from ..files import write_atomically

if TYPE_CHECKING:
    import pandas

DEFAULT_SEQ_LEN = 128  # GLUE's usual maximum length


@dataclass(frozen=True)
class GlueTask:
    """Where a GLUE task's files are and which of their columns hold the texts and the label."""

    folder: str
    texts: tuple  # column names (or positions where the file has no header) of the text or the pair
    label: str | int
    labels: tuple  # the label values as written in the files, in class-index order (as Hugging Face's glue);
    # empty for a regression (STS-B): the label is a number
    test_file: str = "dev.tsv"
    header: bool = True
    url: str = ""


GLUE_DATA = "https://dl.fbaipublicfiles.com/glue/data/"
GLUE = {
    "cola": GlueTask("CoLA", (3,), 1, ("0", "1"), header=False, url=GLUE_DATA + "CoLA.zip"),
    "sst2": GlueTask("SST-2", ("sentence",), "label", ("0", "1"), url=GLUE_DATA + "SST-2.zip"),
    "mrpc": GlueTask("MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1")),
    "rte": GlueTask("RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"),
                    url=GLUE_DATA + "RTE.zip"),
    "qnli": GlueTask("QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment"),
                     url=GLUE_DATA + "QNLIv2.zip"),
    "mnli": GlueTask("MNLI", ("sentence1", "sentence2"), "gold_label", ("entailment", "neutral", "contradiction"),
                     test_file="dev_matched.tsv", url=GLUE_DATA + "MNLI.zip"),
    "qqp": GlueTask("QQP", ("question1", "question2"), "is_duplicate", ("0", "1"), url=GLUE_DATA + "QQP-clean.zip"),
    "wnli": GlueTask("WNLI", ("sentence1", "sentence2"), "label", ("0", "1"), url=GLUE_DATA + "WNLI.zip"),
    # A regression: the similarity score (0 to 5) is the label; one output, squared error, Pearson/Spearman.
    "stsb": GlueTask("STS-B", ("sentence1", "sentence2"), "score", (), url=GLUE_DATA + "STS-B.zip"),
}
# MRPC is not hosted by GLUE: its script builds train/dev.tsv from SentEval's copy and GLUE's dev ids.
MRPC_FILES = {"msr_paraphrase_train.txt": "https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_train.txt",
              "mrpc_dev_ids.tsv": GLUE_DATA + "mrpc_dev_ids.tsv"}
assert tuple(GLUE) == GLUE_TASKS  # the names are declared in pruning_lab.config


def cache_dir() -> Path:
    """Where tokenised texts are cached."""
    return Path(os.environ.get("DL_CACHE_DIR") or Path.home() / ".cache" / "distill-lab") / "tokens"


def cached_tokenize(path: Path, columns: tuple, texts: list, pairs: Optional[list], max_length: int) -> np.ndarray:
    """Token ids of `texts` (and `pairs`) read from `path`, from the disk cache when the file is unchanged."""
    import transformers

    from ..models.bert import minilm_path, tokenize

    stat = path.stat()
    key = repr((str(path.resolve()), stat.st_size, stat.st_mtime_ns, columns, max_length, len(texts),
                Path(minilm_path()).name, transformers.__version__))
    file = cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.npy"
    if file.exists():
        try:
            tokens = np.load(file, allow_pickle=False)
            if tokens.shape == (len(texts), max_length):
                return tokens
        except (OSError, ValueError):
            pass  # a damaged cache entry: tokenise again and replace it
    tokens = tokenize(texts, max_length, pairs)
    try:  # the cache is an optimisation: a read-only home must not stop training
        write_atomically(file, lambda f: np.save(f, tokens, allow_pickle=False))
    except (OSError, UserError):  # unwritable, or a full disk
        pass
    return tokens


def _read_table(path: Path, name: str, header: bool, hint: str) -> "pandas.DataFrame":
    """A TSV (GLUE: no quoting) or CSV file as strings; a missing or malformed file is a one-line error."""
    import pandas as pd

    if not path.is_file():
        raise UserError(f"{name}: {path.resolve()} not found; {hint}")
    tsv = path.suffix == ".tsv"
    try:
        table = pd.read_csv(path, sep="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL,
                            header=0 if header else None, dtype=str, keep_default_na=False, encoding="utf-8")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"{name}: cannot read {path}: {str(e).splitlines()[0]}") from None
    if table.empty:
        raise UserError(f"{name}: {path} has no rows")
    return table


def _columns(table, path: Path, name: str, wanted: tuple) -> None:
    missing = [c for c in wanted if c not in table.columns]
    if missing:
        found = ", ".join(map(str, table.columns))
        raise UserError(f"{name}: {path} has no column {', '.join(map(str, missing))} (its columns: {found}); "
                        f"expected {', '.join(map(str, wanted))}")


def _label_ids(values, classes: tuple, path: Path, name: str, header: bool) -> np.ndarray:
    """Class indices of the label strings; a label outside `classes` names its line."""
    index = {c: i for i, c in enumerate(classes)}
    bad = next(((i, v) for i, v in enumerate(values) if v not in index), None)
    if bad is not None:
        line = bad[0] + 1 + header
        raise UserError(f"{name}: {path} line {line} has label '{bad[1]}'; the task's labels are "
                        f"{', '.join(map(str, classes))}")
    return np.fromiter((index[v] for v in values), np.int64, len(values))


def _tokens(table, path: Path, columns: tuple, max_length: int, name: str, first_line: int) -> np.ndarray:
    """Token ids of the text columns; an empty or missing text is refused with its line."""
    for column in columns:
        values = table[column].tolist()
        empty = next((i for i, v in enumerate(values) if not isinstance(v, str) or not v.strip()), None)
        if empty is not None:
            raise UserError(f"{name}: {path} line {int(table.index[empty]) + first_line} has no text in column "
                            f"'{column}'; every row needs one (remove the row or fill it in)")
    texts = table[columns[0]].tolist()
    pairs = table[columns[1]].tolist() if len(columns) > 1 else None
    return cached_tokenize(path, columns, texts, pairs, max_length)


def csv_label(raw) -> int | str | None:
    """A label as written in a CSV: integer-like text ('1', '1.0', ' 1') as that integer, other text as
    itself (stripped), nothing (empty, NaN) as None."""
    text = raw.strip() if isinstance(raw, str) else ""
    if not text or text.lower() in ("nan", "na", "n/a", "none", "null"):
        return None
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() else text


def csv_labels(values: list, path: Path) -> list:
    """The labels of a CSV, all integers or all names; an empty label, or one that is not like the rest,
    is refused with its line."""
    labels = [csv_label(v) for v in values]
    integers = sum(isinstance(v, int) for v in labels) * 2 >= len(labels)
    for i, (raw, label) in enumerate(zip(values, labels)):
        if label is None:
            raise UserError(f"textcsv: {path} line {i + 2} has no label ({raw!r}); every row needs one")
        if isinstance(label, int) != integers:
            want = "integer class indices (0, 1, ...)" if integers else "class names"
            raise UserError(f"textcsv: {path} line {i + 2} has label {raw!r}, but the file's labels are {want}: "
                            "write every label the same way")
    return labels


def read_glue(task: str, data_dir: Path, max_length: int, hint: str) -> tuple[int, tuple, tuple]:
    """(classes, (train ids, labels), (dev ids, labels)) of GLUE task `task` under data_dir/FOLDER/."""
    spec = GLUE[task]
    name = f"glue-{task}"
    out = []
    for file in ("train.tsv", spec.test_file):
        path = data_dir / spec.folder / file
        table = _read_table(path, name, spec.header, hint)
        _columns(table, path, name, (*spec.texts, spec.label))
        if task == "mnli" and file == "train.tsv":  # a handful of MNLI rows have no gold label ("-")
            table = table[table[spec.label] != "-"]
            if table.empty:
                raise UserError(f"{name}: {path} has no row with a gold label (every label is '-')")
        labels = (_label_ids(table[spec.label].tolist(), spec.labels, path, name, spec.header) if spec.labels
                  else _scores(table[spec.label].tolist(), path, name))
        out.append((_tokens(table, path, spec.texts, max_length, name, 1 + spec.header), labels))
    return max(1, len(spec.labels)), out[0], out[1]


def _scores(values: list, path: Path, name: str) -> np.ndarray:
    """A regression task's labels as float32; one that is not a finite number names its line."""
    scores = np.full(len(values), np.nan, np.float32)
    for i, v in enumerate(values):
        try:
            scores[i] = float(v)
        except ValueError:
            pass
        if not np.isfinite(scores[i]):
            raise UserError(f"{name}: {path} line {i + 2} has score '{v}'; every row needs a number")
    return scores


def read_textcsv(data_dir: Path, max_length: int) -> tuple[int, tuple, tuple]:
    """A user's train.csv and test.csv with columns text (and text_pair for pairs) and label."""
    name = "textcsv"
    hint = "put train.csv and test.csv with columns text and label (optionally text_pair) in --data-dir"
    tables = {f: _read_table(data_dir / f, name, True, hint) for f in ("train.csv", "test.csv")}
    columns = ("text", "text_pair") if "text_pair" in tables["train.csv"].columns else ("text",)
    for f, table in tables.items():
        _columns(table, data_dir / f, name, (*columns, "label"))
    read = {f: csv_labels(table["label"].tolist(), data_dir / f) for f, table in tables.items()}
    values = sorted(set(read["train.csv"]), key=lambda v: (isinstance(v, str), v))  # 0..9, not 0, 1, 10, 2
    out = []
    for f, table in tables.items():
        labels = _label_ids(read[f], tuple(values), data_dir / f, name, True)
        out.append((_tokens(table, data_dir / f, columns, max_length, name, 2), labels))
    if len(values) < 2:
        raise UserError(f"textcsv: {data_dir / 'train.csv'} has {len(values)} label value(s); a classifier needs two or more")
    return len(values), out[0], out[1]


def mrpc_tsvs(train_txt: Path, dev_ids: Path, folder: Path) -> None:
    """Write MRPC's train.tsv and dev.tsv from SentEval's training file and GLUE's dev ids (as GLUE's script)."""
    dev = {tuple(line.strip().split("\t")) for line in dev_ids.read_text(encoding="utf-8").splitlines() if line.strip()}
    lines = train_txt.read_text(encoding="utf-8-sig").splitlines()
    header, rows = lines[0], [line for line in lines[1:] if line.strip()]
    folder.mkdir(parents=True, exist_ok=True)
    split = {"train.tsv": [], "dev.tsv": []}
    for row in rows:
        label, id1, id2, s1, s2 = row.split("\t")
        split["dev.tsv" if (id1, id2) in dev else "train.tsv"].append("\t".join((label, id1, id2, s1, s2)))
    for file, kept in split.items():
        (folder / file).write_text("\n".join([header, *kept]) + "\n", encoding="utf-8")


def download_glue(task: str, data_dir: Path) -> None:
    """Fetch GLUE task `task` into data_dir/FOLDER/ in GLUE's layout (needs the internet)."""
    import tempfile
    import urllib.request

    spec = GLUE[task]
    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
        if task == "mrpc":
            for file, url in MRPC_FILES.items():
                urllib.request.urlretrieve(url, Path(tmp) / file)
            mrpc_tsvs(Path(tmp) / "msr_paraphrase_train.txt", Path(tmp) / "mrpc_dev_ids.tsv", data_dir / spec.folder)
            return
        archive = Path(tmp) / "task.zip"
        urllib.request.urlretrieve(spec.url, archive)
        with zipfile.ZipFile(archive) as z:
            z.extractall(data_dir)
    if not (data_dir / spec.folder / "train.tsv").is_file():
        raise UserError(f"glue-{task}: {spec.url} did not unpack into {data_dir / spec.folder}/train.tsv; "
                        f"move its files there")
