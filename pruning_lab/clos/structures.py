"""The layer structures a dense nn.Linear can be converted to, in one registry: Clos, low-rank, Monarch.

A structure says how to make an untrained layer for a dense one at the parameters of the Clos layer
with middle-stage multiplier m (`make`), how to fit it to the dense weights (`fit_weights`) and to the
dense layer's outputs on calibration inputs (`fit_data`). Registering one also registers its layer
surgery, so a converted checkpoint loads:

    @register_structure("lowrank", LowRank, fit_weights=..., fit_data=...)
    def make_lowrank(dense: nn.Linear, multiplier: int) -> LowRank: ...

clos-convert, its --structure choices and the benchmarks read this registry.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ..surgery import register_surgery, replace_module
from .fit import LayerData, fit_clos_als, fit_monarch_als, fit_to_dense, identity_probe, layer_error, relative_error
from .layer import Clos
from .peers import (LowRank, Monarch, fit_lowrank_to_outputs, lowrank_rank_for, monarch_shape_for, project_lowrank,
                    project_monarch)

Make = Callable[[nn.Linear, int], nn.Module]


DEFAULT_FIT_SWEEPS = 100  # clos-convert's --fit-sweeps


@dataclass(frozen=True)
class FitBudget:
    """How much fitting a conversion gets (clos-convert's --als-iterations, --als-start, --fit-sweeps, --fit-accel)."""

    als_iterations: int = 50  # Clos's weight-space ALS
    als_start: str = "svd"  # Clos's weight-space ALS from the closed-form grouped SVD (where the shapes allow) or random
    sweeps: int = DEFAULT_FIT_SWEEPS  # at most this many least-squares sweeps of Clos's and Monarch's data-aware fits
    accel: str = "line"  # after each sweep: a longer step along its change, or the Anderson point ("anderson")


@dataclass(frozen=True)
class Structure:
    """A registered structure: its layer class and how to make and fit one in place of a dense layer."""

    name: str
    layer: type
    make: Make  # (dense, multiplier) -> an untrained layer at Clos m's parameters
    fit_weights: Callable[[nn.Module, nn.Linear, FitBudget], dict]  # (layer, dense, budget) -> errors
    fit_data: Callable[[nn.Module, LayerData, FitBudget], dict]  # (layer, data, budget) -> errors


STRUCTURES: dict[str, Structure] = {}


def register_structure(name: str, layer: type, fit_weights: Callable, fit_data: Callable) -> Callable[[Make], Make]:
    """Decorator on a structure's `make(dense, multiplier)`: registers it, and its layer surgery `name`."""
    def register(make: Make) -> Make:
        STRUCTURES[name] = Structure(name, layer, make, fit_weights, fit_data)

        @register_surgery(name)
        def replay(model: nn.Module, step: dict) -> None:
            replace_module(model, step["layer"], layer(**step["config"]))
        return make
    return register


def parameter_count(module: nn.Module) -> int:
    """Number of parameters (the count every structure is compared by)."""
    return sum(p.numel() for p in module.parameters())


def clos_for(dense: nn.Linear, multiplier: int) -> Clos:
    """The Clos layer at `multiplier` for `dense` (its parameters are every structure's budget)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. a prime width: clos-convert says what it costs
        return Clos(dense.in_features, dense.out_features, multiplier)


def fit_by_least_squares(layer: Clos, data: LayerData, budget: FitBudget) -> dict:
    """Clos: sweeps of exact least squares stage by stage on the outputs, until the held-out error stops falling."""
    return fit_clos_als(layer, data, budget.sweeps, accel=budget.accel)


def fit_monarch_data(layer: Monarch, data: LayerData, budget: FitBudget) -> dict:
    """Monarch: sweeps of exact least squares stage by stage on the centred outputs, stopped as Clos's."""
    return fit_monarch_als(layer, data, budget.sweeps, accel=budget.accel)


def fit_clos_weights(layer: Clos, dense: nn.Linear, budget: FitBudget) -> dict:
    """Clos's weight-space fit: ALS from the grouped SVD or a random start."""
    return fit_to_dense(layer, dense, budget.als_iterations, budget.als_start)


def fit_by_projection(project: Callable) -> Callable[[nn.Module, nn.Linear, int, str], dict]:
    """A weight-space fit by a closed-form projection of the dense weights (the ALS options do not apply)."""
    def fit(layer: nn.Module, dense: nn.Linear, budget: FitBudget) -> dict:
        start = time.perf_counter()
        weight, bias = dense.weight.detach(), None if dense.bias is None else dense.bias.detach()
        project(layer, weight, bias)
        x, y = identity_probe(dense)
        with torch.no_grad():
            probe = relative_error(layer(x), y)
        return {"identity_probe_relative_error": probe, "seconds": time.perf_counter() - start}
    return fit


def fit_lowrank_data(layer: LowRank, data: LayerData, budget: FitBudget) -> dict:
    """The closed-form optimum on the outputs (reduced-rank regression): no gradient steps."""
    start = time.perf_counter()
    fit_lowrank_to_outputs(layer, data.stats)
    return {"relative_error": layer_error(layer, data.stats),
            "relative_error_heldout": layer_error(layer, data.val_stats), "steps": 0,
            "seconds": time.perf_counter() - start}


@register_structure("clos", Clos, fit_weights=fit_clos_weights, fit_data=fit_by_least_squares)
def make_clos(dense: nn.Linear, multiplier: int) -> Clos:
    """A Clos layer with middle-stage multiplier m."""
    return clos_for(dense, multiplier)


@register_structure("lowrank", LowRank, fit_weights=fit_by_projection(project_lowrank), fit_data=fit_lowrank_data)
def make_lowrank(dense: nn.Linear, multiplier: int) -> LowRank:
    """U @ V with the rank whose parameter count is nearest to the Clos layer's."""
    budget = parameter_count(clos_for(dense, multiplier))
    return LowRank(dense.in_features, dense.out_features, lowrank_rank_for(dense.in_features, dense.out_features, budget),
                   bias=dense.bias is not None)


@register_structure("monarch", Monarch, fit_weights=fit_by_projection(project_monarch), fit_data=fit_monarch_data)
def make_monarch(dense: nn.Linear, multiplier: int) -> Monarch:
    """Two block-diagonal stages with the block counts and rank whose parameter count is nearest to the Clos layer's."""
    budget = parameter_count(clos_for(dense, multiplier))
    k, l_, rank = monarch_shape_for(dense.in_features, dense.out_features, budget)
    return Monarch(dense.in_features, dense.out_features, rank, in_blocks=k, out_blocks=l_, bias=dense.bias is not None)
