"""One training loop for teachers, students and distillation, with its checkpoints."""
from .checkpoint import CheckpointError, build_model, load_checkpoint, save_checkpoint, update_checkpoint
from .loop import CrossEntropyCriterion, TrainingInterrupted, train

__all__ = ["CheckpointError", "build_model", "load_checkpoint", "save_checkpoint", "update_checkpoint",
           "CrossEntropyCriterion", "TrainingInterrupted", "train"]
