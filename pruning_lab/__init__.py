"""pruning_lab: the shared foundations of distill-lab, and the compression that changes a model's layers.

What lives here: the config (`config.py`), data (`data/`), models (`models/`), the checkpoint format
(`checkpoint.py`), the one training loop and its loss (`train/`), evaluation (`inference/`) and
the compression that changes a model's layers: Clos layers (`clos/`), pruning (`prune/`) and the
record of both in checkpoints (`surgery.py`). It was the first lab, so everything every
compression method needs sits here, and `distillation_lab`, the second lab, builds on it: imports
go from distillation_lab to pruning_lab only, never back.
"""
