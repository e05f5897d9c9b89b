"""Which linear layers a Clos conversion replaces (the replay of recorded surgery is pruning_lab/surgery.py)."""
from __future__ import annotations

import fnmatch

import torch.nn as nn

from ..errors import UserError, given_twice


def matching_linears(model: nn.Module, pattern: str) -> list[str]:
    """Names of the nn.Linear layers matching a glob pattern (comma-separated alternatives allowed)."""
    patterns = [p.strip() for p in pattern.split(",") if p.strip()]
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    names = [name for name in linears if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    if not names:
        raise UserError(f"no linear layer matches '{pattern}'; the model's linear layers: {', '.join(linears)}")
    # Each alternative must match: one that matches nothing (a typo, a norm layer) would be silently left out.
    unmatched = next((p for p in patterns if not any(fnmatch.fnmatchcase(name, p) for name in linears)), None)
    if unmatched is not None:
        raise UserError(f"'{unmatched}' in --layers '{pattern}' matches no linear layer; the model's linear layers: "
                        f"{', '.join(linears)}")
    twice = given_twice(patterns)
    if twice is not None:
        raise UserError(f"'{twice}' is given twice in --layers '{pattern}'")
    return names
