"""Evaluate a saved checkpoint on its dataset's test split (the `evaluate` command)."""
from __future__ import annotations

from typing import Optional

from ..data import BatchLoader, load_splits
from ..errors import UserError
from ..runtime import resolve_device, resolve_precision
from ..train.checkpoint import build_model, load_checkpoint
from .evaluate import count_flops, count_parameters, evaluate, measure_latency


def evaluate_checkpoint(path: str, expect_model: Optional[str] = None, data_dir: Optional[str] = None,
                        device: str = "auto", batch_size: int = 256) -> dict:
    """Test accuracy and loss, parameters, FLOPs, MACs and batch-1 latency of the checkpoint at `path`."""
    ckpt = load_checkpoint(path)
    model = build_model(ckpt, expect_model, source=str(path))
    cfg = ckpt["config"]
    dev = resolve_device(device)
    spec, _, _, test = load_splits(cfg["dataset"], data_dir or cfg["data_dir"], cfg["val_size"],
                               image_size=cfg["image_size"])
    arch = ckpt["arch"]
    if (spec.num_classes, spec.channels) != (arch["num_classes"], arch["in_chans"]):
        raise UserError(f"{path} was trained for {arch['num_classes']} classes and {arch['in_chans']} channels, "
                        f"but {cfg['dataset']} in {data_dir or cfg['data_dir']} has {spec.num_classes} and {spec.channels}")
    model.to(dev)
    loader = BatchLoader(test, spec, batch_size, dev, image_size=arch["image_size"])
    result = evaluate(model, loader, resolve_precision("auto", dev))
    input_shape = (arch["in_chans"], arch["image_size"], arch["image_size"])
    flops = count_flops(model, input_shape, dev)
    return {"checkpoint": str(path), "model": arch["name"], "role": ckpt.get("role", "model"),
            "dataset": cfg["dataset"], "test_images": result["n"], "test_accuracy": round(result["acc"], 6),
            "test_loss": round(result["loss"], 6), "parameters": count_parameters(model), "flops": flops,
            "macs": flops // 2, "latency_ms_batch1": round(measure_latency(model, input_shape, dev), 3),
            "best_epoch": ckpt.get("best_epoch"), "device": str(dev), "code_revision": ckpt.get("code_revision")}
