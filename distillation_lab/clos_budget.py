"""clos-convert --budget: a total parameter budget for all converted layers, spent where it lowers the error most.

Every layer gets candidates: each structure (Clos, low-rank, Monarch; or the one --structure names) at each
Clos multiplier m = 1, 2, 4, ... whose layer is smaller than the dense one, each fitted on the original
model's inputs of that layer and scored by its relative output error on held-out examples; and the dense
layer itself (error 0). `allocate` starts every layer at its cheapest candidate and then, greedily, takes
the change that lowers the summed held-out error most per extra parameter while the total stays within the
budget. The fitted candidates chosen go in place (they were fitted independently, on the original inputs).
"""
from __future__ import annotations

import math
from typing import Callable

import torch.nn as nn

from pruning_lab.clos.structures import STRUCTURES
from pruning_lab.errors import UserError

DENSE = "dense"  # the candidate that keeps a layer as it is


def multipliers(dense: nn.Linear, count: Callable[[str, nn.Linear, int], int], structures: list[str]) -> list[int]:
    """m = 1, 2, 4, ... while the smallest of `structures` at m has fewer parameters than the dense layer."""
    found, m = [], 1
    dense_parameters = dense.weight.numel() + (dense.bias.numel() if dense.bias is not None else 0)
    while min(count(s, dense, m) for s in structures) < dense_parameters and m <= 1024:
        found.append(m)
        m *= 2
    return found


def allocate(options: dict[str, list[dict]], budget: int) -> dict[str, dict]:
    """Per layer the chosen option ({"parameters", "error", ...}): each layer starts at its cheapest option (the
    lowest error among those), then the change that saves the most summed error per extra parameter is taken,
    again and again, while the total stays within `budget`."""
    chosen = {name: min(opts, key=lambda o: (o["parameters"], o["error"])) for name, opts in options.items()}
    spent = sum(c["parameters"] for c in chosen.values())
    if spent > budget:
        raise UserError(f"--budget allows {budget:,} parameters for the converted layers, but their smallest "
                        f"candidates already take {spent:,}: raise --budget or convert fewer layers")
    while True:
        best = None
        for name, opts in options.items():
            current = chosen[name]
            for option in opts:
                extra, saved = option["parameters"] - current["parameters"], current["error"] - option["error"]
                if saved <= 0 or spent + extra > budget:
                    continue
                ratio = math.inf if extra <= 0 else saved / extra
                if best is None or ratio > best[0]:
                    best = (ratio, name, option)
        if best is None:
            return chosen
        _, name, option = best
        spent += option["parameters"] - chosen[name]["parameters"]
        chosen[name] = option


def budget_structures(structure: str) -> list[str]:
    """The structures --budget chooses among: all of them for auto, else the one named."""
    return list(STRUCTURES) if structure == "auto" else [structure]
