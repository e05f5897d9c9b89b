"""pruning_lab: the shared foundations of distill-lab (data, models, training loop, checkpoints).

distillation_lab imports from here; nothing here imports distillation_lab.
"""
