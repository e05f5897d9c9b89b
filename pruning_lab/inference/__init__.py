"""Evaluation: accuracy and loss on a loader, parameters, FLOPs, latency, agreement with a teacher, and
opening a saved checkpoint for all of these. Imports the checkpoint format, never the training package."""
from .checkpoint_eval import OpenedCheckpoint, evaluate_checkpoint, model_card, open_checkpoint
from .evaluate import count_flops, count_parameters, evaluate, measure_latency, soft_target_alignment

__all__ = ["OpenedCheckpoint", "evaluate_checkpoint", "model_card", "open_checkpoint", "count_flops",
           "count_parameters", "evaluate", "measure_latency", "soft_target_alignment"]
