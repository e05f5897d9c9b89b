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


# ------------------------------------------------------------ data-aware fit (exact ALS on statistics)


@torch.no_grad()
def output_statistics(x: torch.Tensor, y: torch.Tensor) -> dict:
    """What every least-squares step of the data-aware fit needs from (inputs, targets), in float64: the means,
    the input Gram matrix X^T X [in, in], the cross term Y^T X [out, in] and ||Y||^2 (not centred: the Clos
    layer's few biases cannot carry the outputs' means, its map has to)."""
    x, y = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
    xx = x.T @ x
    return {"x_mean": x.mean(0), "y_mean": y.mean(0), "xx": xx, "xx32": xx.float(), "yx": y.T @ x,
            "yy": float((y * y).sum())}


def stats_error(weight: torch.Tensor, stats: dict) -> float:
    """Relative error ||X W^T - Y|| / ||Y|| of the bias-free map `weight` on the rows of the statistics."""
    squared = (weight @ stats["xx"] * weight).sum() - 2 * (weight * stats["yx"]).sum() + stats["yy"]
    return float(squared.clamp_min(0).sqrt() / max(stats["yy"], 1e-300) ** 0.5)


class ClosFactors:
    """A Clos layer's map as blocks A_l diag(d_jl) B_j in float64 (a [l, o, k], d [j, l, k], b [j, k, i]):
    what the data-aware ALS updates in place."""

    def __init__(self, clos: Clos) -> None:
        self.clos = clos
        self.a = clos.w3.detach().double().permute(1, 2, 0).clone()  # [l, o, k]
        self.b = clos.w1.detach().double().permute(1, 2, 0).clone()  # [j, k, i]
        self.d = clos.w2.detach().double().permute(0, 2, 1).clone()  # [j, l, k]

    def weight(self) -> torch.Tensor:
        """The map as a dense [out, in] matrix."""
        c = self.clos
        return torch.einsum("lok,jlk,jki->loji", self.a, self.d, self.b).reshape(c.out_features, c.in_features)

    def state(self) -> tuple[torch.Tensor, ...]:
        """A copy of the factors (a, b, d)."""
        return self.a.clone(), self.b.clone(), self.d.clone()

    def restore(self, state: tuple[torch.Tensor, ...]) -> None:
        """Put back factors saved by `state`."""
        self.a, self.b, self.d = (t.clone() for t in state)

    def write(self) -> None:
        """Copy the factors into the layer's stage weights."""
        c = self.clos
        c.w3.copy_(self.a.permute(2, 0, 1).to(c.w3.dtype))
        c.w1.copy_(self.b.permute(2, 0, 1).to(c.w1.dtype))
        c.w2.copy_(self.d.permute(0, 2, 1).to(c.w2.dtype))


@torch.no_grad()
def als_sweep(f: ClosFactors, stats: dict, ridge: float) -> None:
    """One sweep of exact least squares on the outputs: every egress stage at once (the output groups are
    independent), then ingress switch by ingress switch its first stage and its middle weights (each the
    exact optimum given the rest: a Kronecker system solved through two small eigendecompositions, and a
    b2 x b2 system per egress switch)."""
    c = f.clos
    xx, yx = stats["xx"], stats["yx"]
    b1, b3, bin_, bout = c.b1, c.b3, c.bin, c.bout
    # Egress: W_l = A_l H_l with H_l [b2, in] = [diag(d_jl) B_j]_j, so A_l = G_l H_l^T (H_l Σ H_l^T)^-1.
    h = (f.d.permute(1, 0, 2)[..., None] * f.b[None]).permute(0, 2, 1, 3).reshape(b3, c.b2, c.in_features)
    hs = (h.float() @ stats["xx32"]).double()  # [l, k, in]; the sweep's largest product, in float32 (2x faster)
    gram = hs @ h.transpose(1, 2)
    rhs = h @ yx.reshape(b3, bout, c.in_features).transpose(1, 2)  # [l, k, o]
    f.a = ridge_solve(gram, rhs, ridge).transpose(1, 2)  # [l, o, k]
    residual = yx - f.weight() @ xx  # G - W Σ: the negative half-gradient, kept current below
    cols = lambda j: slice(j * bin_, (j + 1) * bin_)  # noqa: E731
    for j in range(b1):
        sjj = xx[cols(j), cols(j)]
        # Ingress switch j: W[:, j] = M_j B_j with M_j [(l, o), k] = a[l, o, k] d[j, l, k].
        m = (f.a * f.d[j][:, None, :]).reshape(c.out_features, c.b2)
        p = m.T @ m
        rhs = m.T @ residual[:, cols(j)] + p @ f.b[j] @ sjj
        e1, u1 = torch.linalg.eigh(p)
        e2, u2 = torch.linalg.eigh(sjj)
        scale = (e1.clamp_min(0)[:, None] * e2.clamp_min(0)[None]) + ridge * float(e1.mean() * e2.mean())
        new_b = u1 @ ((u1.T @ rhs @ u2) / scale.clamp_min(1e-300)) @ u2.T
        residual -= m @ (new_b - f.b[j]) @ xx[cols(j)]
        f.b[j] = new_b
        # Its middle weights d[j, l, :] for every l (rows of different egress switches do not interact).
        bsb = f.b[j] @ sjj @ f.b[j].T  # [k, k]
        q = (f.a.transpose(1, 2) @ f.a) * bsb[None]  # [l, k, k]
        r = residual[:, cols(j)].reshape(b3, bout, bin_)
        lin = torch.einsum("ki,loi,lok->lk", f.b[j], r, f.a)  # diag(B R^T A) per l
        delta = ridge_solve(q, lin[..., None], ridge)[..., 0]  # [l, k]
        f.d[j] += delta
        change = torch.einsum("lok,lk,ki->loi", f.a, delta, f.b[j]).reshape(c.out_features, bin_)
        residual -= change @ xx[cols(j)]


@torch.no_grad()
def extrapolate(f: ClosFactors, previous: tuple[torch.Tensor, ...], step: float, stats: dict) -> None:
    """Move the factors `step` times further along the last sweep's change where that lowers the training error
    (ALS creeps along narrow valleys; this line search halves the sweeps it needs)."""
    swept = f.state()
    error = stats_error(f.weight(), stats)
    f.restore(tuple(now + step * (now - before) for now, before in zip(swept, previous)))
    if stats_error(f.weight(), stats) >= error:
        f.restore(swept)


def stopping_sweep(errors: list[float], patience: int, tolerance: float) -> int | None:
    """The sweep (1-based) after which the data-aware fit stops: the first whose held-out error is less than
    `tolerance` (relative) below the best error of `patience` sweeps before; None while it keeps falling."""
    for done in range(patience + 1, len(errors) + 1):
        if errors[done - 1] > (1 - tolerance) * min(errors[: done - patience]):
            return done
    return None


@torch.no_grad()
def fit_clos_als(clos: Clos, x: torch.Tensor, y: torch.Tensor, sweeps: int = 100, x_val: Optional[torch.Tensor] = None,
                 y_val: Optional[torch.Tensor] = None, ridge: float = 1e-6, patience: int = 5,
                 tolerance: float = 1e-3) -> dict:
    """Data-aware fit by exact alternating least squares on the calibration rows' statistics, from the layer's
    current stages (the weight-space fit): each sweep solves every stage given the others (then tries a longer step
    along the sweep's change). With held-out rows it stops once their error has fallen by less than `tolerance`
    (relative) in `patience` sweeps, and keeps the sweep with the lowest. The biases and a last exact solve of the
    egress stage on the rows themselves finish it. Returns the errors, the held-out error and the seconds after
    each sweep, the sweeps run and seconds."""
    start = time.perf_counter()
    stats = output_statistics(x, y)
    val = output_statistics(x_val, y_val) if x_val is not None else None
    for bias in (clos.bias1, clos.bias2, clos.bias3):
        bias.zero_()  # the sweeps fit the map alone; the biases come last, on what it leaves of the means
    f = ClosFactors(clos)
    watch = val or stats
    errors = [stats_error(f.weight(), watch)]  # before the first sweep
    elapsed = [time.perf_counter() - start]
    best_state = previous = f.state()
    for done in range(1, sweeps + 1):
        als_sweep(f, stats, ridge)
        if done > 2:
            extrapolate(f, previous, done ** (1 / 3), stats)
        previous = f.state()
        errors.append(stats_error(f.weight(), watch))
        elapsed.append(time.perf_counter() - start)
        if errors[-1] <= min(errors[:-1]):
            best_state = previous
        if val is not None and stopping_sweep(errors[1:], patience, tolerance):
            break
    f.restore(best_state)
    f.write()
    fit_bias(clos, stats["y_mean"].to(clos.w1.dtype) - F.linear(stats["x_mean"].to(clos.w1.dtype), clos.composed()[0]))
    before_ls = relative_error(clos(x), y)
    solve_last_stage(clos, x, y)
    result = {"relative_error": relative_error(clos(x), y), "relative_error_before_last_stage_solve": before_ls,
              "sweeps": len(errors) - 1, "seconds": time.perf_counter() - start}
    if x_val is not None:
        result["relative_error_heldout"] = relative_error(clos(x_val), y_val)
        result["heldout_by_sweep"] = [round(e, 6) for e in errors]  # the map's, before the biases and last solve
        result["seconds_by_sweep"] = [round(t, 3) for t in elapsed]  # since the start, the statistics included
    return result
