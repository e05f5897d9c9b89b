"""Checkpoints: plain dicts of tensors and values, written atomically, read with weights_only=True.

A checkpoint is data, never code: loading refuses anything that needs unpickling of Python objects.
Every checkpoint carries a SHA-256 of its contents (tensors' bytes and plain values), checked on every
load, so a damaged file is refused instead of evaluated; checkpoints written before it still load.
"""
from __future__ import annotations

import hashlib
import pickle
import subprocess
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from .errors import UserError
from .files import write_atomically
from .models import create_model
from .clos import structures  # noqa: F401  (the modules below register the layer surgery kinds they replay)
from .models import bottleneck, thin  # noqa: F401
from .prune.record import pack_sparse, unpack_sparse
from .surgery import apply_surgery, sparse_weights

FORMAT = "distill-lab-checkpoint"
VERSION = 1
ENVELOPE = ("format", "version", "checksum")  # written by save_checkpoint around the payload


def content_digest(value, digest=None) -> str:
    """SHA-256 over a checkpoint's contents: keys, tensors' dtype, shape and bytes, and plain values."""
    digest = digest or hashlib.sha256()
    if isinstance(value, dict):
        digest.update(b"{")
        for key in sorted(value, key=repr):
            digest.update(repr(key).encode() + b":")
            content_digest(value[key], digest)
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[" if isinstance(value, list) else b"(")
        for item in value:
            content_digest(item, digest)
        digest.update(b"]")
    elif isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}:".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        digest.update(repr(value).encode())
    return digest.hexdigest()


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, refused, or not what was expected."""


def save_checkpoint(payload: dict, path: str | Path) -> Path:
    """Write `payload` to `path` atomically (files.py: a kill or a full disk never leaves half a file)."""
    payload = {k: v for k, v in payload.items() if k not in ENVELOPE}  # e.g. a loaded checkpoint saved again
    envelope = {"format": FORMAT, "version": VERSION, "checksum": content_digest(payload)}
    return write_atomically(path, lambda f: torch.save({**envelope, **payload}, f))


def update_checkpoint(path: str | Path, **fields) -> None:
    """Add or replace top-level entries of an existing checkpoint (atomically)."""
    data = load_checkpoint(path)
    data.update(fields)
    save_checkpoint({k: v for k, v in data.items() if k not in ENVELOPE}, path)


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by `save_checkpoint`, or raise a CheckpointError saying why not."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] != b"PK" and head[:1] != b"\x80":  # torch.save's zip file, or the legacy pickle's protocol byte
        raise CheckpointError(f"{path} is not a checkpoint: not a file torch.save writes (a text or other file?); "
                              "give a .pth this tool wrote")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(f"refused {path}: it contains pickled Python objects, which could run code; "
                                  "a checkpoint must hold only tensors and plain values (nothing was executed)") from None
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt): {str(e).splitlines()[0]}") from None
    except Exception as e:  # torch raises many types on damaged files (EOFError, KeyError, RuntimeError...)
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt): {(str(e) or type(e).__name__).splitlines()[0]}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a distill-lab checkpoint (no '{FORMAT}' marker); "
                              "it may be a bare state_dict or another tool's file")
    if not isinstance(data.get("version"), int) or data["version"] > VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {data.get('version')!r}; this code reads "
                              f"version {VERSION} and older: update distill-lab")
    if "checksum" in data and content_digest({k: v for k, v in data.items() if k not in ENVELOPE}) != data["checksum"]:
        raise CheckpointError(f"{path} is damaged: its contents do not match the checksum written with them "
                              "(a partial copy or a disk error); copy it again or retrain it")
    return data


CONFIG_FIELDS = ("model", "dataset", "data_dir", "seed", "name", "val_size", "image_size")  # what evaluation and the report read
ARCH_FIELDS = {"name": str, "num_classes": int, "in_chans": int, "image_size": int, "kwargs": dict}


def check_model_fields(ckpt: dict, source: str) -> None:
    """A checkpoint that carries the format marker but not a model (crafted or damaged) is refused by name."""
    arch = ckpt.get("arch")
    problems = [] if isinstance(ckpt.get("state_dict"), dict) else ["state_dict"]
    if not isinstance(arch, dict):
        problems.append("arch")
    else:
        problems += [f"arch.{k}" for k, tp in ARCH_FIELDS.items() if not isinstance(arch.get(k), tp)
                     and not (k in ("num_classes", "in_chans", "image_size") and arch.get(k) is None)]
    config, surgery = ckpt.get("config"), ckpt.get("surgery", [])
    if not isinstance(config, dict) or not all(k in config for k in CONFIG_FIELDS):
        problems.append("config")
    if not isinstance(surgery, list) or not all(isinstance(s, dict) and isinstance(s.get("kind"), str) for s in surgery):
        problems.append("surgery")
    if not isinstance(ckpt.get("data", {}), dict):
        problems.append("data")
    if problems:
        raise CheckpointError(f"{source} is not a valid distill-lab checkpoint: missing or malformed "
                              f"{', '.join(problems)}")


def build_model(ckpt: dict, expect_model: Optional[str] = None, source: str = "checkpoint") -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights; check the architecture if asked."""
    check_model_fields(ckpt, source)
    arch = ckpt["arch"]  # its image_size is the sequence length for text models
    if arch["name"].startswith("custom:"):
        raise CheckpointError(f"{source} holds your own {arch['name'][7:]} module (written by the Python API): the "
                              "command line rebuilds registered models only; load its state_dict into your module")
    if expect_model is not None and arch["name"] != expect_model:
        raise CheckpointError(f"{source} holds a '{arch['name']}' model, but '{expect_model}' was expected")
    model = create_model(arch["name"], arch["num_classes"], arch["in_chans"], arch["image_size"], **arch["kwargs"])
    try:
        apply_surgery(model, ckpt.get("surgery", []))  # e.g. Clos layers in place of dense ones, pruned widths
    except UserError as e:
        raise CheckpointError(f"{source}: {e}") from None
    try:
        model.load_state_dict(checkpoint_weights(ckpt))
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{source}: weights do not fit '{arch['name']}': {str(e).splitlines()[0]}") from None
    check_finite_weights(model, source)
    return model


def check_finite_weights(model: nn.Module, source: str) -> None:
    """Refuse a model with NaN or infinite weights (a run that diverged before runs stopped at the first
    non-finite loss): its accuracy would be a number that means nothing."""
    bad = next((name for name, t in model.state_dict().items()
                if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise CheckpointError(f"{source} holds non-finite weights (NaN or infinite, first in {bad}): the run that "
                              "wrote it diverged; train it again (a run now stops at its first non-finite loss)")


def model_weights(model: nn.Module) -> dict:
    """The checkpoint entries holding a model's weights: `state_dict`, and the sparse weights of an
    unstructured-pruned model packed in `sparse_weights` (a bit mask and the non-zero values)."""
    state, packed = pack_sparse(model.state_dict(), sparse_weights(model))
    return {"state_dict": state, **({"sparse_weights": packed} if packed else {})}


def checkpoint_weights(ckpt: dict) -> dict:
    """The full state dict of a checkpoint (packed sparse weights unpacked)."""
    return {**ckpt["state_dict"], **unpack_sparse(ckpt.get("sparse_weights", {}))}


def save_derived(ckpt: dict, model: nn.Module, path: Path, extra: dict, drop: tuple = ()) -> None:
    """Save `model`, made from the model of `ckpt` by layer surgery (Clos conversion, pruning), as a run
    named after `path`: the original's record without its results, the new weights and surgery, `extra`;
    the keys in `drop` are left out too."""
    config = {**ckpt["config"], "name": path.stem, "out_dir": str(path.parent)}  # the report finds it by this name
    kept = {k: v for k, v in ckpt.items() if k not in (*ENVELOPE, "test", "alignment", "state_dict",
                                                       "sparse_weights", "surgery", "config", *drop)}
    save_checkpoint({**kept, "config": config, **model_weights(model), "surgery": model.surgery, **extra}, path)


def code_revision() -> str:
    """The git commit of the code (with '-dirty' for local changes), or 'unknown' outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
