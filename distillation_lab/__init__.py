"""distillation_lab: knowledge distillation on top of pruning_lab's data, models and training loop."""
