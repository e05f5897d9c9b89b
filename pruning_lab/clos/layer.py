"""A three-stage Clos layer: in = bin*b1 inputs -> out = bout*b3 outputs through small dense switches.

Stage 1: b1 ingress switches, each bin -> b2 (weights [bin, b1, b2], bias [b1]).
Stage 2: b2 middle switches, each b1 -> b3 (weights [b1, b2, b3], bias [b2]).
Stage 3: b3 egress switches, each b2 -> bout (weights [b2, b3, bout], bias [b3]).
b2 = m * bin, m the middle-stage multiplier. Every stage is one batched matrix product over its
switches; every input reaches every output, and the map has full rank (a test checks it), unlike
a shortcut that sums an index away early and is a low-rank layer in disguise.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from .cost import compute_dtype, cost_factors


def largest_divisor_up_to_sqrt(n: int) -> int:
    """The largest divisor of n that is at most sqrt(n) (1 for a prime)."""
    return max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)


def default_factors(in_features: int, out_features: int, bin_: Optional[int] = None,
                    bout: Optional[int] = None) -> tuple[int, int, int, int]:
    """(bin, b1, b3, bout): given factors are checked; missing ones are the largest divisor <= sqrt."""
    for name, size in (("in_features", in_features), ("out_features", out_features)):
        if size < 1:
            raise UserError(f"Clos: {name} must be positive, got {size}")
    bin_ = bin_ or largest_divisor_up_to_sqrt(in_features)
    bout = bout or largest_divisor_up_to_sqrt(out_features)
    for name, size, factor in (("in_features", in_features, bin_), ("out_features", out_features, bout)):
        if size % factor:
            raise UserError(f"Clos: {name}={size} is not divisible by the switch size {factor}")
        if factor == 1 and size > 1:
            warnings.warn(f"Clos: {name}={size} has no divisor in [2, sqrt]: the layer degenerates "
                          "(switches of size 1)", stacklevel=3)
    return bin_, in_features // bin_, out_features // bout, bout


class Clos(nn.Module):
    """Drop-in replacement for nn.Linear(in_features, out_features) with far fewer parameters."""

    # A forward runs either the three stages or one dense product with the composed weight, whichever
    # a cost model says is cheaper: the stages cost a factor times their multiply-adds (their middle
    # activations are m times wider than the input: they are often memory-bound), composing the
    # weight another factor times its in*out*b2 multiply-adds, both in units of the dense product's.
    # The factors depend on the machine and the precision, so they are measured on the first forward
    # of each shape, device and dtype (cost.py); set `path` to force one path.
    path: str = "auto"  # "auto", "stages" or "composed"

    def __init__(self, in_features: int, out_features: int, multiplier: int = 4, bin_: Optional[int] = None,
                 bout: Optional[int] = None) -> None:
        super().__init__()
        if not isinstance(multiplier, int) or multiplier < 1:
            raise UserError(f"Clos: the middle-stage multiplier must be an integer >= 1, got {multiplier}")
        self.in_features, self.out_features, self.multiplier = in_features, out_features, multiplier
        self.bin, self.b1, self.b3, self.bout = default_factors(in_features, out_features, bin_, bout)
        self.b2 = multiplier * self.bin
        self.w1 = nn.Parameter(torch.empty(self.bin, self.b1, self.b2))
        self.w2 = nn.Parameter(torch.empty(self.b1, self.b2, self.b3))
        self.w3 = nn.Parameter(torch.empty(self.b2, self.b3, self.bout))
        self.bias1 = nn.Parameter(torch.zeros(self.b1))
        self.bias2 = nn.Parameter(torch.zeros(self.b2))
        self.bias3 = nn.Parameter(torch.zeros(self.b3))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each stage scaled like a Linear of its fan-in, so the layer starts near unit gain."""
        for w, fan_in in ((self.w1, self.bin), (self.w2, self.b1), (self.w3, self.b2)):
            nn.init.uniform_(w, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def config(self) -> dict:
        """Constructor arguments (recorded in checkpoints so that loading rebuilds the layer)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "multiplier": self.multiplier,
                "bin_": self.bin, "bout": self.bout}

    # The stages run with the samples as the last (contiguous) axis: x.t() is a free view, every
    # stage's input is then a batch of BLAS-ready matrices (the interconnect is a transposed view,
    # never a copy), and the weights enter as permuted views. With the samples first instead, every
    # stage needs a permuted copy and CPU bmm clones each switch's slice: 4-5x slower (see
    # benchmarks/clos_speed.py).
    def egress_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Stages 1 and 2: what each egress switch sees, [b3, b2, N] for x of shape [..., in]."""
        xt = x.reshape(-1, self.in_features).t().reshape(self.b1, self.bin, -1)  # [b1, bin, N]
        # Stage 1: ingress switch j maps its bin inputs to b2 outputs: [b1, b2, bin] @ [b1, bin, N]
        h = torch.baddbmm(self.bias1.view(-1, 1, 1), self.w1.permute(1, 2, 0), xt)
        # Stage 2: middle switch k sees output k of every ingress switch: [b2, b3, b1] @ [b2, b1, N]
        h = torch.baddbmm(self.bias2.view(-1, 1, 1), self.w2.permute(1, 2, 0), h.transpose(0, 1))
        return h.transpose(0, 1)  # egress switch l sees output l of every middle switch

    def composed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's map as a dense (weight [out, in], bias [out]), differentiable in the stage weights."""
        # weight[(l, o), (j, i)] = sum_k w3[k, l, o] w2[j, k, l] w1[i, j, k]: per ingress switch j,
        # one [out, b2] @ [b2, bin] product (the cheapest order: no [out, in, b2] intermediate).
        paths = self.w2.permute(0, 2, 1).unsqueeze(2) * self.w3.permute(1, 2, 0).unsqueeze(0)  # [b1, b3, bout, b2]
        weight = torch.bmm(paths.reshape(self.b1, self.out_features, self.b2), self.w1.permute(1, 2, 0))
        middle = self.bias2[:, None] + torch.einsum("jkl,j->kl", self.w2, self.bias1)  # [b2, b3]
        bias = self.bias3[:, None] + torch.einsum("klo,kl->lo", self.w3, middle)
        return weight.transpose(0, 1).reshape(self.out_features, self.in_features), bias.reshape(-1)

    def stage_macs(self) -> int:
        """Multiply-adds per row through the three stages."""
        return self.b2 * (self.in_features + self.b1 * self.b3 + self.out_features)

    def uses_composed_weight(self, rows: int, device: torch.device = torch.device("cpu"),
                             dtype: torch.dtype = torch.float32,
                             factors: Optional[tuple[float, float]] = None) -> bool:
        """Whether a forward over `rows` rows on `device` in `dtype` runs the composed weight (see `path`);
        `factors` (stage cost, compose cost) replace the ones measured here."""
        if self.path != "auto":
            if self.path not in ("stages", "composed"):
                raise UserError(f"Clos.path must be 'auto', 'stages' or 'composed', got {self.path!r}")
            return self.path == "composed"
        stage, compose = factors or cost_factors(self, device, dtype)
        dense = self.in_features * self.out_features
        return rows * dense + compose * dense * self.b2 < stage * rows * self.stage_macs()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_composed_weight(x.numel() // self.in_features, x.device, compute_dtype(x)):
            return F.linear(x, *self.composed())
        # Stage 3: [b3, bout, b2] @ [b3, b2, N] -> [b3, bout, N], i.e. the output transposed
        h = torch.baddbmm(self.bias3.view(-1, 1, 1), self.w3.permute(1, 2, 0), self.egress_inputs(x))
        return h.reshape(self.out_features, -1).t().reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"{self.in_features} -> {self.out_features}, multiplier={self.multiplier}, "
                f"switches: {self.b1}x({self.bin}->{self.b2}), {self.b2}x({self.b1}->{self.b3}), "
                f"{self.b3}x({self.b2}->{self.bout})")
