"""Fitting a Clos layer to a dense layer: minimise the output error on calibration inputs.

Gradient steps (Adam) on all three stages, then an exact least-squares solve of the last stage
(linear in its weights once the first two are fixed, and independent per egress switch), which
removes what the gradient steps leave of the last stage's error. With the identity (plus the zero
input) as calibration inputs this is the weight-space fit; with a layer's real inputs it is the
data-aware fit.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layer import Clos
from .linalg import ridge_solve
from .peers import Monarch, solve_monarch_last_stage


def relative_error(output: torch.Tensor, target: torch.Tensor) -> float:
    """||output - target|| / ||target||."""
    return float((output - target).norm() / target.norm().clamp_min(1e-12))


def identity_probe(dense: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration inputs for the weight-space fit: the identity rows and the zero input."""
    x = torch.cat([torch.eye(dense.in_features), torch.zeros(1, dense.in_features)]).to(dense.weight.device)
    with torch.no_grad():
        return x, dense(x)


@torch.no_grad()
def solve_last_stage(clos: Clos, x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-6) -> None:
    """Set the egress weights to the least-squares optimum for fixed stages 1-2 (and bias3)."""
    a = clos.egress_inputs(x).double()  # [b3, b2, N]
    t = (y.reshape(-1, clos.b3, clos.bout).transpose(0, 1) - clos.bias3.view(-1, 1, 1)).double()  # [b3, N, bout]
    solution = ridge_solve(a @ a.transpose(1, 2), a @ t, ridge)  # [b3, b2, bout]
    clos.w3.copy_(solution.permute(1, 0, 2).to(clos.w3.dtype))


def fit_clos(clos: Clos | Monarch, x: torch.Tensor, y: torch.Tensor, steps: int = 2000, lr: float = 3e-3,
             batch_size: Optional[int] = 1024, x_val: Optional[torch.Tensor] = None,
             y_val: Optional[torch.Tensor] = None, seed: int = 0) -> dict:
    """Fit `clos` so that clos(x) ~ y; returns relative errors (train, held-out) and seconds."""
    start = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(clos.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    n = len(x)
    for _ in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=g).to(x.device) if batch_size and batch_size < n else None
        xb, yb = (x, y) if idx is None else (x[idx], y[idx])
        loss = F.mse_loss(clos(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        before_ls = relative_error(clos(x), y)
        (solve_monarch_last_stage if isinstance(clos, Monarch) else solve_last_stage)(clos, x, y)
        result = {"relative_error": relative_error(clos(x), y), "relative_error_before_last_stage_solve": before_ls,
                  "steps": steps, "seconds": time.perf_counter() - start}
        if x_val is not None:
            result["relative_error_heldout"] = relative_error(clos(x_val), y_val)
    return result


# ---------------------------------------------------------------- weight-space fit (exact ALS)


@torch.no_grad()
def fit_weights_als(clos: Clos, weight: torch.Tensor, iterations: int = 100, ridge: float = 1e-9) -> list[float]:
    """Make the Clos layer's linear map equal `weight` [out, in] by alternating exact least squares.

    Block (l, j) of the map, egress switch l by ingress switch j, is A_l diag(d_jl) B_j with
    A_l = w3[:, l, :]^T, d_jl = w2[j, :, l] and B_j = w1[:, j, :]^T: each of A, B and d is a linear
    least-squares problem when the other two are fixed, and splits into small independent solves.
    Returns the relative error after each iteration.
    """
    b1, b3, bin_, bout = clos.b1, clos.b3, clos.bin, clos.bout
    w = weight.double().reshape(b3, bout, b1, bin_).permute(0, 2, 1, 3)  # [l, j, o, i]
    a = clos.w3.double().permute(1, 2, 0).clone()  # [l, o, k]
    b = clos.w1.double().permute(1, 2, 0).clone()  # [j, k, i]
    d = clos.w2.double().permute(0, 2, 1).clone()  # [j, l, k]
    errors = []
    for _ in range(iterations):
        bb = b @ b.transpose(1, 2)  # [j, k, m]
        gram = torch.einsum("jlk,jlm,jkm->lkm", d, d, bb)
        a = ridge_solve(gram, torch.einsum("ljoi,jki,jlk->lko", w, b, d), ridge).transpose(1, 2)
        aa = a.transpose(1, 2) @ a  # [l, k, m]
        gram = torch.einsum("jlk,jlm,lkm->jkm", d, d, aa)
        b = ridge_solve(gram, torch.einsum("jlk,lok,ljoi->jki", d, a, w), ridge)
        gram = aa[None] * (b @ b.transpose(1, 2))[:, None]  # [j, l, k, m]
        rhs = torch.einsum("lok,ljoi,jki->jlk", a, w, b)
        d = ridge_solve(gram, rhs[..., None], ridge)[..., 0]
        approx = torch.einsum("lok,jlk,jki->ljoi", a, d, b)
        errors.append(float((approx - w).norm() / w.norm()))
    clos.w3.copy_(a.permute(2, 0, 1).to(clos.w3.dtype))
    clos.w1.copy_(b.permute(2, 0, 1).to(clos.w1.dtype))
    clos.w2.copy_(d.permute(0, 2, 1).to(clos.w2.dtype))
    return errors


@torch.no_grad()
def fit_bias(clos: Clos, bias: torch.Tensor) -> float:
    """Choose the three stage biases so that clos(0) matches `bias` in least squares; relative error."""
    clos.bias1.zero_()
    clos.bias2.zero_()
    clos.bias3.zero_()
    zero = torch.zeros(1, clos.in_features, dtype=clos.w1.dtype, device=clos.w1.device)
    # clos(0) is linear in (bias1, bias2, bias3): its columns are the responses to unit biases.
    columns = []
    for param in (clos.bias1, clos.bias2, clos.bias3):
        for i in range(len(param)):
            param[i] = 1.0
            columns.append(clos(zero)[0])
            param[i] = 0.0
    basis = torch.stack(columns, 1).double()  # [out, b1 + b2 + b3]
    solution = torch.linalg.lstsq(basis, bias.double()[:, None], driver="gelsd" if basis.device.type == "cpu"
                                  else None).solution[:, 0]
    clos.bias1.copy_(solution[: clos.b1])
    clos.bias2.copy_(solution[clos.b1: clos.b1 + clos.b2])
    clos.bias3.copy_(solution[clos.b1 + clos.b2:])
    return relative_error(clos(zero)[0], bias)


@torch.no_grad()
def grouped_svd_start(clos: Clos, weight: torch.Tensor) -> bool:
    """A closed-form start for the ALS where b2 is a multiple g of bout: egress output o sums its own g
    middle switches (a fixed 0/1 last stage), so row o of every block (l, j) is a combination of the g
    rows of B_j in group o, and the best such B_j and d_jl are the rank-g SVD of those rows stacked over
    l. With g = 1 this is a Monarch projection with the identity as last stage. False where the shapes
    do not allow it (the random start stays)."""
    if clos.b2 % clos.bout:
        return False
    g = clos.b2 // clos.bout
    w = weight.double().reshape(clos.b3, clos.bout, clos.b1, clos.bin)  # [l, o, j, i]
    rows = w.permute(2, 1, 0, 3)  # [j, o, l, i]: for each (j, o) the rows o of blocks (l, j)
    u, s, vh = torch.linalg.svd(rows, full_matrices=False)  # u [j, o, l, q], vh [j, o, q, i]
    r = min(g, s.shape[-1])
    coeff = torch.zeros(clos.b1, clos.bout, clos.b3, g, dtype=torch.float64, device=weight.device)
    basis = torch.zeros(clos.b1, clos.bout, g, clos.bin, dtype=torch.float64, device=weight.device)
    coeff[..., :r] = u[..., :r] * s[..., None, :r]
    basis[..., :r, :] = vh[..., :r, :]
    w3 = torch.zeros(clos.b2, clos.b3, clos.bout, dtype=torch.float64, device=weight.device)
    k = torch.arange(clos.b2, device=weight.device)
    w3[k, :, k // g] = 1.0  # middle switch k feeds output k // g of every egress switch
    clos.w3.copy_(w3.to(clos.w3.dtype))
    clos.w2.copy_(coeff.permute(0, 1, 3, 2).reshape(clos.b1, clos.b2, clos.b3).to(clos.w2.dtype))  # [j, k, l]
    clos.w1.copy_(basis.reshape(clos.b1, clos.b2, clos.bin).permute(2, 0, 1).to(clos.w1.dtype))  # [i, j, k]
    return True


def fit_to_dense(clos: Clos, dense: nn.Linear, iterations: int = 100, start: str = "random") -> dict:
    """Weight-space fit: the map by ALS (what probing with the identity measures), the bias from the zero input.

    start="svd" begins the ALS at the closed-form grouped SVD where the shapes allow it, "random" at
    the layer's random initialisation."""
    begin = time.perf_counter()
    started = start == "svd" and grouped_svd_start(clos, dense.weight.detach())
    errors = fit_weights_als(clos, dense.weight.detach(), iterations)
    bias_error = fit_bias(clos, dense.bias.detach()) if dense.bias is not None else 0.0
    x, y = identity_probe(dense)
    with torch.no_grad():
        probe_error = relative_error(clos(x), y)
    return {"weight_relative_error": errors[-1], "bias_relative_error": bias_error,
            "identity_probe_relative_error": probe_error, "iterations": iterations,
            "start": "svd" if started else "random", "seconds": time.perf_counter() - begin}
