"""Model registry and factory. Every model maps images to (logits, features).

`features` is a list of intermediate stage outputs and `model.feature_widths` declares their
channel widths, so feature losses can size their adapters without a dry run.
"""
from .registry import MODELS, create_model, model_family, register_model
from . import bert, mlp, resnet, vit  # noqa: F401  (fill the registry)

__all__ = ["MODELS", "create_model", "model_family", "register_model"]
