"""distillation_lab: knowledge distillation, and the lab's chain, report and command line, on top of pruning_lab.

What lives here: the KD losses, the loss terms a config names (`methods/`, one file each, registered on
import here, so every entry point sees them) and the frozen teacher (`losses.py`, `criterion.py`, `teacher.py`),
`run_training` (`runs.py`, the one way into training: it distills when there is a teacher), the
Python API (`api.py`), the job table of the chain (`chain.py`) and what reads it (`pipeline.py`,
`submit.py`, `report.py`, the rendered `slurm/` scripts), Clos conversion with KD fine-tuning
(`clos_convert.py`) and the command line (`main.py`). It imports pruning_lab (data, models, loop,
checkpoints, evaluation); pruning_lab never imports it.
"""
from . import methods  # noqa: F401  (registers the distillation loss terms, wherever the package is used)
from .api import distill
from .losses import (attention_transfer_loss, distillation_loss, dkd_loss, feature_distillation_loss,
                     kl_divergence_loss)

__all__ = ["distill", "attention_transfer_loss", "distillation_loss", "dkd_loss", "feature_distillation_loss",
           "kl_divergence_loss"]
