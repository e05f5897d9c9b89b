"""Which linear layers a Clos conversion replaces (the replay of recorded surgery is pruning_lab/surgery.py)."""
from __future__ import annotations

import fnmatch

import torch.nn as nn

from ..errors import UserError


def matching_linears(model: nn.Module, pattern: str) -> list[str]:
    """Names of the nn.Linear layers matching a glob pattern (comma-separated alternatives allowed)."""
    patterns = [p.strip() for p in pattern.split(",") if p.strip()]
    names = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    if not names:
        linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise UserError(f"no linear layer matches '{pattern}'; the model's linear layers: {', '.join(linears)}")
    return names
