"""Clos's peers among structured matrices, for comparison at equal parameters: low-rank and Monarch.

A Clos layer's block (l, j) (egress switch l, ingress switch j) is A_l diag(d_jl) B_j: a BLAST
matrix. Its relatives here:
- LowRank: W = U V (rank r); its weight-space optimum is the truncated SVD, and the optimum for the
  layer's outputs on calibration inputs is reduced-rank regression (closed form, below).
- Monarch (Dao et al., 2022): two block-diagonal stages with a stride permutation between them, so
  that block (l, k) of the map (output group l, input block k) is an independent rank-R matrix;
  its closed-form projection of a dense matrix is a rank-R SVD of every block.
Both are drop-in replacements for nn.Linear, recorded in checkpoints by their constructor arguments.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn as nn

from ..errors import UserError
from .layer import largest_divisor_up_to_sqrt
from .linalg import centred, ridge_solve


class LowRank(nn.Module):
    """nn.Linear(in, out) as U @ V with V: in -> rank, U: rank -> out (+ bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        if not isinstance(rank, int) or not 1 <= rank <= min(in_features, out_features):
            raise UserError(f"LowRank: rank must be an integer in [1, {min(in_features, out_features)}], got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.v = nn.Linear(in_features, rank, bias=False)
        self.u = nn.Linear(rank, out_features, bias=bias)

    def config(self) -> dict:
        """Constructor arguments (recorded in checkpoints)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.u.bias is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(self.v(x))

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, rank={self.rank}"


def monarch_blocks(size: int) -> int:
    """Default number of blocks a side of `size` is cut into: its largest divisor <= sqrt (28 for 784)."""
    return largest_divisor_up_to_sqrt(size)


class Monarch(nn.Module):
    """nn.Linear(in, out) as two block-diagonal stages: in = k blocks of p, out = l groups of s.

    Stage 1: input block k -> l * R values (weights [k, l*R, p]); value (l, r) of block k goes to
    output group l. Stage 2: group l maps its k * R values to its s outputs (weights [l, s, k*R]).
    Block (l, k) of the map is stage2[l][:, k*R:(k+1)*R] @ stage1[k][l*R:(l+1)*R, :]: rank R.
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 1, in_blocks: int | None = None,
                 out_blocks: int | None = None, bias: bool = True) -> None:
        super().__init__()
        k = in_blocks or monarch_blocks(in_features)
        l_ = out_blocks or monarch_blocks(out_features)
        for name, size, blocks in (("in_features", in_features, k), ("out_features", out_features, l_)):
            if size % blocks:
                raise UserError(f"Monarch: {name}={size} is not divisible into {blocks} blocks")
        if not isinstance(rank, int) or rank < 1:
            raise UserError(f"Monarch: rank must be an integer >= 1, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.k, self.p, self.l, self.s = k, in_features // k, l_, out_features // l_
        self.w1 = nn.Parameter(torch.empty(k, l_ * rank, self.p))
        self.w2 = nn.Parameter(torch.empty(l_, self.s, k * rank))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.uniform_(self.w1, -1 / math.sqrt(self.p), 1 / math.sqrt(self.p))
        nn.init.uniform_(self.w2, -1 / math.sqrt(k * rank), 1 / math.sqrt(k * rank))

    def config(self) -> dict:
        """Constructor arguments (recorded in checkpoints)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "in_blocks": self.k, "out_blocks": self.l, "bias": self.bias is not None}

    def group_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Stage 1 and the permutation: what each output group sees, [l, k*R, N] for x of shape [..., in]."""
        xt = x.reshape(-1, self.in_features).t().reshape(self.k, self.p, -1)  # [k, p, N]
        h = torch.bmm(self.w1, xt)  # [k, l*R, N]
        h = h.reshape(self.k, self.l, self.rank, -1).permute(1, 0, 2, 3)  # [l, k, R, N]
        return h.reshape(self.l, self.k * self.rank, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.bmm(self.w2, self.group_inputs(x))  # [l, s, N]
        y = h.reshape(self.out_features, -1).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """The map as a dense [out, in] matrix."""
        return self.map_of(self.w1, self.w2)

    def map_of(self, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        """The dense [out, in] map of stages `w1`, `w2` of this layer's shape: block (l, k) is w2[l][:, k's R
        columns] @ w1[k][l's R rows]."""
        w1 = w1.reshape(self.k, self.l, self.rank, self.p)
        w2 = w2.reshape(self.l, self.s, self.k, self.rank)
        return torch.einsum("lskr,klrp->lskp", w2, w1).reshape(self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return (f"{self.in_features} -> {self.out_features}, rank={self.rank}, "
                f"{self.k} input blocks of {self.p}, {self.l} output groups of {self.s}")


# ------------------------------------------------------------------------------ closed-form fits
@torch.no_grad()
def project_lowrank(layer: LowRank, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Weight space: the truncated SVD of `weight` (the best rank-r approximation in Frobenius norm)."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    root = s[: layer.rank].sqrt()
    layer.u.weight.copy_((u[:, : layer.rank] * root).to(layer.u.weight.dtype))
    layer.v.weight.copy_((root[:, None] * vh[: layer.rank]).to(layer.v.weight.dtype))
    if layer.u.bias is not None:
        layer.u.bias.copy_(bias if bias is not None else torch.zeros_like(layer.u.bias))


@torch.no_grad()
def fit_lowrank_to_outputs(layer: LowRank, stats: dict, ridge: float = 1e-6) -> None:
    """Data-aware: the rank-r map minimising ||y - layer(x)|| on the calibration rows whose statistics (`fit.
    output_statistics`) are given (reduced-rank regression).

    With centred inputs X and targets Y, the least-squares map is W = Y^T X (X^T X)^-1; the best rank-r
    map projects it onto the top-r principal directions of the fitted outputs W X. When y = dense(x)
    this is the SVD of the weight after whitening by the inputs' covariance."""
    x_mean, y_mean = stats["x_mean"], stats["y_mean"]
    xx, yx = (centred(stats)[key] for key in ("xx", "yx"))  # Xc^T Xc, Yc^T Xc
    w = ridge_solve(xx, yx.T, ridge).T  # [out, in], least squares
    # The fitted outputs' principal directions: the top eigenvectors of their Gram matrix W X^T X W^T [out, out]
    # (the right singular vectors of the [N, out] fitted outputs, without an SVD over every row).
    _, vectors = torch.linalg.eigh(w @ xx @ w.T)
    basis = vectors.flip(1)[:, : layer.rank].T  # [r, out], largest eigenvalues first
    layer.u.weight.copy_(basis.T.to(layer.u.weight.dtype))
    layer.v.weight.copy_((basis @ w).to(layer.v.weight.dtype))
    if layer.u.bias is not None:
        layer.u.bias.copy_((y_mean - (basis.T @ (basis @ w)) @ x_mean).to(layer.u.bias.dtype))


@torch.no_grad()
def project_monarch(layer: Monarch, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Weight space: every block (l, k) of `weight` by its rank-R truncated SVD (the closed-form projection)."""
    blocks = weight.double().reshape(layer.l, layer.s, layer.k, layer.p).permute(0, 2, 1, 3)  # [l, k, s, p]
    u, s, vh = torch.linalg.svd(blocks, full_matrices=False)
    r = layer.rank
    if r > min(layer.s, layer.p):
        raise UserError(f"Monarch: rank {r} exceeds the blocks' size {layer.s}x{layer.p}")
    root = s[..., :r].sqrt()
    left = u[..., :r] * root[..., None, :]  # [l, k, s, R]
    right = root[..., :, None] * vh[..., :r, :]  # [l, k, R, p]
    layer.w2.copy_(left.permute(0, 2, 1, 3).reshape(layer.l, layer.s, layer.k * r).to(layer.w2.dtype))
    layer.w1.copy_(right.permute(1, 0, 2, 3).reshape(layer.k, layer.l * r, layer.p).to(layer.w1.dtype))
    if layer.bias is not None:
        layer.bias.copy_(bias if bias is not None else torch.zeros_like(layer.bias))


@torch.no_grad()
def solve_monarch_last_stage(layer: Monarch, x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-6) -> None:
    """Stage 2 (and the bias) at its least-squares optimum for a fixed stage 1: one solve per output group."""
    a = layer.group_inputs(x).double()  # [l, k*R, N]
    a = torch.cat([a, torch.ones_like(a[:, :1])], 1)  # a constant row: the bias
    t = y.double().reshape(-1, layer.l, layer.s).transpose(0, 1)  # [l, N, s]
    solution = ridge_solve(a @ a.transpose(1, 2), a @ t, ridge)  # [l, kR+1, s]
    layer.w2.copy_(solution[:, :-1].transpose(1, 2).to(layer.w2.dtype))
    if layer.bias is not None:
        layer.bias.copy_(solution[:, -1].reshape(-1).to(layer.bias.dtype))


def nearest_rank(per_rank: int, fixed: int, budget: int, largest: int) -> int:
    """The rank r in [1, largest] whose count fixed + r * per_rank is nearest to `budget`."""
    low = max(1, min((budget - fixed) // per_rank, largest))
    high = min(low + 1, largest)
    return min((low, high), key=lambda r: (abs(fixed + r * per_rank - budget), r))


def monarch_rank_for(in_features: int, out_features: int, budget: int, in_blocks: int | None = None,
                     out_blocks: int | None = None) -> int:
    """The Monarch rank whose parameter count (bias included) is nearest to `budget`."""
    k, l_ = in_blocks or monarch_blocks(in_features), out_blocks or monarch_blocks(out_features)
    return nearest_rank(in_features * l_ + out_features * k, out_features, budget,
                        min(in_features // k, out_features // l_))


def divisors(n: int) -> list[int]:
    """The divisors of n that cut it into at least two blocks of at least two (all of n's for n < 4)."""
    found = [d for d in range(2, n // 2 + 1) if n % d == 0]
    return found or [1]


def monarch_shape_for(in_features: int, out_features: int, budget: int, tolerance: float = 0.02) -> tuple[int, int, int]:
    """(input blocks, output groups, rank) of a Monarch layer with `budget` parameters (bias included): of the
    block counts whose nearest rank comes within `tolerance` of it, the nearest to the square-root default
    (ratios); where none does, the nearest count. The default blocks alone missed the budget by up to 15%
    (192 -> 576 at m = 2)."""
    default = (monarch_blocks(in_features), monarch_blocks(out_features))

    def miss(shape: tuple[int, int, int]) -> float:
        k, l_, rank = shape
        return abs(rank * (in_features * l_ + out_features * k) + out_features - budget) / budget

    def away(shape: tuple[int, int, int]) -> float:
        return abs(math.log(shape[0] / default[0])) + abs(math.log(shape[1] / default[1]))

    shapes = [(k, l_, monarch_rank_for(in_features, out_features, budget, k, l_))
              for k in divisors(in_features) for l_ in divisors(out_features)]
    close = [shape for shape in shapes if miss(shape) <= tolerance]
    return min(close, key=lambda s: (away(s), miss(s))) if close else min(shapes, key=lambda s: (miss(s), away(s)))


def lowrank_rank_for(in_features: int, out_features: int, budget: int) -> int:
    """The rank whose parameter count (bias included) is nearest to `budget`."""
    return nearest_rank(in_features + out_features, out_features, budget, min(in_features, out_features))


def timed(fn, *args) -> float:
    """Seconds `fn(*args)` takes."""
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start
