"""The shipped YAML recipes (distillation_lab/configs/), in one place."""
from __future__ import annotations

from pathlib import Path

from pruning_lab.config import Config, load_yaml, make_config

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# The lab plan's recipe for each model, used by train-teacher / train-student / distill without --config.
RECIPES = {"teacher": {"resnet18": "cnn_teacher", "vit_tiny": "vit_teacher"},
           "student": {"resnet8": "cnn_student", "vit_student": "vit_student"},
           "distill": {"resnet8": "distill_cnn", "vit_student": "distill_vit"}}
DEFAULT_MODEL = {"teacher": "resnet18", "student": "resnet8", "distill": "resnet8"}


def recipe_path(name: str) -> Path:
    """Path of the shipped recipe `name` (e.g. cnn_teacher)."""
    return CONFIG_DIR / f"{name}.yaml"


def recipe_config(name: str, overrides: dict | None = None, source: str = "command line") -> Config:
    """A shipped recipe with `overrides` applied on top."""
    path = recipe_path(name)
    return make_config(overrides or {}, source, base=make_config(load_yaml(path), str(path)))
