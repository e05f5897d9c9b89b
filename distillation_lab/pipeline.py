"""The local chain of a preset: train each job in order, then evaluate every result on the test split."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from pruning_lab.config import load_yaml, make_config
from pruning_lab.errors import UserError
from pruning_lab.inference.checkpoint_eval import evaluate_checkpoint
from pruning_lab.train import train

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PRESETS = {
    "demo": ["demo_teacher", "demo_student"],  # embedded MNIST, minutes on 2 CPU cores
    "cifar10": ["cnn_teacher", "cnn_student", "vit_teacher", "vit_student"],  # the lab plan, on a GPU
}


def preset_configs(preset: str, overrides: dict) -> list:
    """The configs of a preset's jobs, each with the same overrides applied."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    configs = []
    for job in PRESETS[preset]:
        path = CONFIG_DIR / f"{job}.yaml"
        cfg = make_config(load_yaml(path), str(path))
        configs.append(make_config(overrides, "command line", base=cfg))
    return configs


def run_pipeline(preset: str, overrides: dict) -> list[dict]:
    """Train every job of `preset` in order and return one summary row per job."""
    rows = []
    for cfg in preset_configs(preset, overrides):
        print(f"\n=== {cfg.run_name()}: {cfg.model} on {cfg.dataset}, {cfg.epochs} epochs", flush=True)
        summary = train(cfg)
        card = evaluate_checkpoint(summary["checkpoint"], device=cfg.device)
        rows.append({**summary, "macs": card["macs"], "latency_ms_batch1": card["latency_ms_batch1"],
                     "config": dataclasses.asdict(cfg)})
    return rows
