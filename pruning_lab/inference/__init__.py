"""Evaluation helpers: accuracy and loss on a loader, parameters, FLOPs, latency."""
from .evaluate import count_flops, count_parameters, evaluate, measure_latency

__all__ = ["count_flops", "count_parameters", "evaluate", "measure_latency"]
