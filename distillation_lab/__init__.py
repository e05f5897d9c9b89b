"""distillation_lab: knowledge distillation on top of pruning_lab's data, models and training loop."""
from .api import distill
from .losses import (attention_transfer_loss, distillation_loss, dkd_loss, feature_distillation_loss,
                     kl_divergence_loss)

__all__ = ["distill", "attention_transfer_loss", "distillation_loss", "dkd_loss", "feature_distillation_loss",
           "kl_divergence_loss"]
