"""One training loop for teachers, students and distillation, and the loss it minimises."""
from .criterion import CETerm, Criterion, CrossEntropyCriterion, masked_cross_entropy
from .loop import TrainingInterrupted, train

__all__ = ["CETerm", "Criterion", "CrossEntropyCriterion", "masked_cross_entropy", "TrainingInterrupted", "train"]
