"""Open a saved checkpoint for evaluation (its model, its data's splits, its input shape) and evaluate it.

The one way `evaluate`, `report` and `clos-convert` open a checkpoint: read once, model rebuilt
with its recorded surgery, the dataset it was trained on loaded with the same split settings.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ..checkpoint import build_model, load_checkpoint
from ..config import NO_DATA_DIR_DATASETS
from ..data import BatchLoader, DataSpec, Split, load_splits
from ..errors import UserError
from ..models.bottleneck import encoder_outputs, find_bottleneck
from ..runtime import resolve_device, resolve_precision
from .evaluate import count_flops, count_parameters, evaluate, measure_latency


@dataclass
class OpenedCheckpoint:
    """A checkpoint ready to evaluate: its dict, its model on `device`, and its dataset's splits."""

    path: str
    ckpt: dict
    model: nn.Module
    spec: DataSpec
    splits: dict[str, Split]  # train (with the run's train_subset), val, test
    device: torch.device

    @property
    def config(self) -> dict:
        """The resolved config the checkpoint recorded."""
        return self.ckpt["config"]

    @property
    def input_shape(self) -> tuple:
        """(channels, size, size) of one input (for text: size is the sequence length)."""
        arch = self.ckpt["arch"]
        return arch["in_chans"], arch["image_size"], arch["image_size"]

    def loader(self, split: str = "test", batch_size: int = 256) -> BatchLoader:
        """Evaluation batches of one split, at the model's input size."""
        return BatchLoader(self.splits[split], self.spec, batch_size, self.device,
                           input_size=self.ckpt["arch"]["image_size"])


def open_checkpoint(path: str, expect_model: Optional[str] = None, data_dir: Optional[str] = None,
                    device: str = "auto") -> OpenedCheckpoint:
    """Load the checkpoint at `path` once, rebuild its model and load its dataset (`data_dir` overrides the recorded one)."""
    ckpt = load_checkpoint(path)
    model = build_model(ckpt, expect_model, source=str(path))
    cfg, arch = ckpt["config"], ckpt["arch"]
    if data_dir and cfg["dataset"] in NO_DATA_DIR_DATASETS:
        raise UserError(f"--data-dir {data_dir}: {path} was trained on {cfg['dataset']}, which ships inside a package "
                        "and reads no folder; leave --data-dir out")
    if cfg["dataset"] == "custom":
        raise UserError(f"{path} holds a {arch['name']} trained through the Python API on your own loaders, which the "
                        "command line cannot read: evaluate it in Python (pruning_lab.checkpoint.build_model("
                        "load_checkpoint(path)) rebuilds the model)")
    where = data_dir or cfg["data_dir"]
    spec, train, val, test = load_splits(cfg["dataset"], where, cfg["val_size"], cfg.get("train_subset"),
                                         image_size=cfg["image_size"], channels=cfg.get("channels"))
    if (spec.num_classes, spec.channels) != (arch["num_classes"], arch["in_chans"]):
        raise UserError(f"{path} was trained for {arch['num_classes']} classes and {arch['in_chans']} channels, "
                        f"but {cfg['dataset']} in {where} has {spec.num_classes} and {spec.channels}")
    dev = resolve_device(device)
    return OpenedCheckpoint(str(path), ckpt, model.to(dev).eval(), spec, {"train": train, "val": val, "test": test},
                            dev)


def model_card(opened: OpenedCheckpoint, batch_size: int = 256, precision: str = "fp32") -> dict:
    """Test accuracy and loss, parameters, FLOPs, MACs, file size and batch-1 and batch-256 latency of an
    opened checkpoint (latency on the device it is opened on). The metrics are computed in fp32 unless
    `precision` says otherwise, as every reported number is: the same checkpoint, the same accuracy."""
    model, dev, ckpt = opened.model, opened.device, opened.ckpt
    result = evaluate(model, opened.loader("test", batch_size), resolve_precision(precision, dev))
    flops = count_flops(model, opened.input_shape, dev)
    return {"checkpoint": opened.path, "model": ckpt["arch"]["name"], "role": ckpt.get("role", "model"),
            "dataset": opened.config["dataset"], "test_images": result["n"], "test_accuracy": round(result["acc"], 6),
            "test_loss": round(result["loss"], 6),
            **{f"test_{k}": round(result[k], 6) for k in ("f1_macro", "mcc", "pearson", "spearman") if k in result},
            "parameters": count_parameters(model), "flops": flops,
            "macs": flops // 2, "file_megabytes": round(os.path.getsize(opened.path) / 1e6, 3),
            "latency_ms_batch1": round(measure_latency(model, opened.input_shape, dev), 3),
            "latency_ms_batch256": round(measure_latency(model, opened.input_shape, dev, 256, repeats=5, warmup=2), 3),
            "best_epoch": ckpt.get("best_epoch"), "device": str(dev), "code_revision": ckpt.get("code_revision"),
            **bottleneck_keys(opened)}


def bottleneck_keys(opened: OpenedCheckpoint) -> dict:
    """For a model with the key-value bottleneck: per codebook, its distinct keys, the keys in use on the training
    examples they were fitted on (as recorded) and on the test split (a model with most keys dead or duplicated
    looks up far fewer than it holds)."""
    bottleneck = find_bottleneck(opened.model)
    if bottleneck is None:
        return {}
    record = next((s for s in opened.ckpt.get("surgery", []) if s.get("kind") == "bottleneck"), {})
    fitted = record.get("keys_fitted") or {}
    test = bottleneck.key_usage(encoder_outputs(opened.model, opened.loader("test"), len(opened.splits["test"])))
    return {"bottleneck_keys_per_codebook": bottleneck.config["keys"], "bottleneck_distinct_keys": test["distinct"],
            "bottleneck_keys_used_in_fit": fitted.get("used", "not recorded (an older checkpoint)"),
            "bottleneck_fit_examples": fitted.get("examples"), "bottleneck_keys_used_on_test": test["used"]}


def evaluate_checkpoint(path: str, expect_model: Optional[str] = None, data_dir: Optional[str] = None,
                        device: str = "auto", batch_size: int = 256, precision: str = "fp32") -> dict:
    """The `evaluate` command: the model card of the checkpoint at `path`."""
    return model_card(open_checkpoint(path, expect_model, data_dir, device), batch_size, precision)
