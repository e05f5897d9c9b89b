"""Fitting a Clos layer to a dense layer: minimise the output error on calibration inputs.

Gradient steps (Adam) on all three stages, then an exact least-squares solve of the last stage
(linear in its weights once the first two are fixed, and independent per egress switch), which
removes what the gradient steps leave of the last stage's error. With the identity (plus the zero
input) as calibration inputs this is the weight-space fit; with a layer's real inputs it is the
data-aware fit.
"""
from __future__ import annotations

import functools
import time
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layer import Clos
from .linalg import centred, ridge_solve
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


def _pair_sums(d: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """[n, k, m]: sum over the first axis t of d[t, n, k] d[t, n, m] other[t, k, m] (one n at a time: the [t, n, k, m]
    product would need gigabytes for wide layers)."""
    return torch.stack([(d[:, n, :, None] * d[:, n, None, :] * other).sum(0) for n in range(d.shape[1])])


@torch.no_grad()
def fit_weights_als(clos: Clos, weight: torch.Tensor, iterations: int = 100, ridge: float = 1e-9) -> list[float]:
    """Make the Clos layer's linear map equal `weight` [out, in] by alternating exact least squares.

    Block (l, j) of the map, egress switch l by ingress switch j, is A_l diag(d_jl) B_j with
    A_l = w3[:, l, :]^T, d_jl = w2[j, :, l] and B_j = w1[:, j, :]^T: each of A, B and d is a linear
    least-squares problem when the other two are fixed, and splits into small independent solves.
    The products are batched matrix products over contiguous views (torch.einsum's order for three
    operands made an iteration 1.2 s on a 1536 -> 384 layer; this takes a tenth of that).
    Returns the relative error after each iteration.
    """
    b1, b3, bin_, bout, b2 = clos.b1, clos.b3, clos.bin, clos.bout, clos.b2
    wj = weight.double().reshape(b3 * bout, b1, bin_).transpose(0, 1).contiguous()  # [j, (l, o), i]
    a = clos.w3.double().permute(1, 2, 0).contiguous()  # [l, o, k]
    b = clos.w1.double().permute(1, 2, 0).contiguous()  # [j, k, i]
    d = clos.w2.double().permute(0, 2, 1).contiguous()  # [j, l, k]
    norm = float(weight.double().norm())
    errors = []
    for _ in range(iterations):
        # A_l: sum_j diag(d_jl) B_j B_j^T diag(d_jl) A_l^T = sum_j diag(d_jl) B_j W_lj^T
        wb = (wj @ b.transpose(1, 2)).view(b1, b3, bout, b2)  # [j, l, o, k] = W_lj B_j^T
        rhs = (wb * d[:, :, None, :]).sum(0).transpose(1, 2)  # [l, k, o]
        a = ridge_solve(_pair_sums(d, b @ b.transpose(1, 2)), rhs, ridge).transpose(1, 2).contiguous()
        aa = a.transpose(1, 2) @ a  # [l, k, m]
        # B_j: sum_l diag(d_jl) A_l^T A_l diag(d_jl) B_j = sum_l diag(d_jl) A_l^T W_lj
        u = (d[:, :, None, :] * a[None]).reshape(b1, b3 * bout, b2)  # [j, (l, o), k] = A_l diag(d_jl)
        b = ridge_solve(_pair_sums(d.transpose(0, 1), aa), u.transpose(1, 2) @ wj, ridge)
        # d_jl: (A_l^T A_l * B_j B_j^T) d_jl = diag(A_l^T W_lj B_j^T)
        bb = b @ b.transpose(1, 2)
        rhs = ((wj @ b.transpose(1, 2)).view(b1, b3, bout, b2) * a[None]).sum(2)  # [j, l, k]
        d = torch.stack([ridge_solve(aa * bb[j][None], rhs[j][..., None], ridge)[..., 0] for j in range(b1)])
        approx = (d[:, :, None, :] * a[None]).reshape(b1, b3 * bout, b2) @ b  # [j, (l, o), i]
        errors.append(float((approx - wj).norm()) / norm)
    clos.w3.copy_(a.permute(2, 0, 1).to(clos.w3.dtype))
    clos.w1.copy_(b.permute(2, 0, 1).to(clos.w1.dtype))
    clos.w2.copy_(d.permute(0, 2, 1).to(clos.w2.dtype))
    return errors


@torch.no_grad()
def fit_bias(clos: Clos, bias: torch.Tensor) -> float:
    """Choose the three stage biases so that clos(0) matches `bias` in least squares; relative error."""
    # clos(0) is linear in (bias1, bias2, bias3): its columns are the responses to unit biases. bias1_j reaches
    # output (l, o) through sum_k w3[k, l, o] w2[j, k, l], bias2_k through w3[k, l, o], bias3_l directly.
    w2, w3 = clos.w2.double(), clos.w3.double()  # [j, k, l], [k, l, o]
    from1 = torch.bmm(w3.permute(1, 2, 0), w2.permute(2, 1, 0)).reshape(clos.out_features, clos.b1)
    from2 = w3.permute(1, 2, 0).reshape(clos.out_features, clos.b2)
    from3 = torch.eye(clos.b3, dtype=torch.float64, device=w3.device).repeat_interleave(clos.bout, 0)
    basis = torch.cat([from1, from2, from3], 1)  # [out, b1 + b2 + b3]
    solution = torch.linalg.lstsq(basis, bias.double()[:, None], driver="gelsd" if basis.device.type == "cpu"
                                  else None).solution[:, 0]
    clos.bias1.copy_(solution[: clos.b1])
    clos.bias2.copy_(solution[clos.b1: clos.b1 + clos.b2])
    clos.bias3.copy_(solution[clos.b1 + clos.b2:])
    return relative_error(clos.composed()[1], bias)


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


STATISTICS_CHUNK = 8192  # rows per float64 product of the statistics


@torch.no_grad()
def output_statistics(x: torch.Tensor, y: torch.Tensor) -> dict:
    """What every least-squares fit on (inputs, targets) needs, in float64: the row count, the sums, the input Gram
    matrix X^T X [in, in], the cross term Y^T X [out, in] and ||Y||^2 (not centred: the Clos layer's few biases
    cannot carry the outputs' means, its map has to).

    The products are of the centred rows, in float64 over chunks of rows (no float64 copy of all the rows), the means'
    part added after: a centred Gram stays accurate at its own scale (low-rank's fit centres it again) and an input
    that is constant in the calibration rows keeps an exactly zero row. (float32 products, twice as fast on a CPU, put
    rounding noise of 1e-7 of the largest eigenvalue into the directions the rows do not span: with 256 MNIST images
    for 784 inputs, low-rank's closed form then gave weights that took the test accuracy from 0.75 to 0.20.)"""
    x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    n = len(x)
    x_mean, y_mean = x.sum(0, dtype=torch.float64) / max(n, 1), y.sum(0, dtype=torch.float64) / max(n, 1)
    xx = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    yx = torch.zeros(y.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    yy = torch.zeros((), dtype=torch.float64, device=x.device)
    for xc, yc in zip(x.split(STATISTICS_CHUNK), y.split(STATISTICS_CHUNK)):
        xc, yc = xc.double() - x_mean, yc.double() - y_mean
        xx += xc.T @ xc
        yx += yc.T @ xc
        yy += yc.square().sum()
    xx += n * torch.outer(x_mean, x_mean)
    yx += n * torch.outer(y_mean, x_mean)
    yy += n * y_mean.square().sum()
    return {"n": n, "x_sum": x_mean * n, "y_sum": y_mean * n, "x_mean": x_mean, "y_mean": y_mean,
            "xx": xx, "yx": yx, "yy": float(yy)}


class LayerData:
    """A layer's calibration rows (x, y) and held-out rows (x_val, y_val), with their statistics computed on first
    use and kept: every structure fitted to the layer shares them."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor) -> None:
        self.x, self.y, self.x_val, self.y_val = x, y, x_val, y_val

    @functools.cached_property
    def stats(self) -> dict:
        """The calibration rows' statistics (`output_statistics`)."""
        return output_statistics(self.x, self.y)

    @functools.cached_property
    def val_stats(self) -> dict:
        """The held-out rows' statistics."""
        return output_statistics(self.x_val, self.y_val)


def stats_error(weight: torch.Tensor, stats: dict) -> float:
    """Relative error ||X W^T - Y|| / ||Y|| of the bias-free map `weight` on the rows of the statistics."""
    squared = (weight @ stats["xx"] * weight).sum() - 2 * (weight * stats["yx"]).sum() + stats["yy"]
    return float(squared.clamp_min(0).sqrt() / max(stats["yy"], 1e-300) ** 0.5)


def factors_error(f, stats: dict) -> float:
    """`stats_error` of the map of factors `f` (Clos's or Monarch's), its product with the Gram through their blocks."""
    return residual_error(f.weight(), stats["yx"] - f.times_gram(stats["xx"]), stats)


def residual_error(weight: torch.Tensor, residual: torch.Tensor, stats: dict) -> float:
    """`stats_error` of `weight` from its residual G - W Σ (which a sweep keeps current): ||XW^T - Y||^2 =
    ||Y||^2 - <W, G + R>, without the [out, in] x [in, in] product (on the MNIST fc1 that product, once per error,
    cost more than the sweep's solves)."""
    squared = stats["yy"] - (weight * (stats["yx"] + residual)).sum()
    return float(squared.clamp_min(0).sqrt() / max(stats["yy"], 1e-300) ** 0.5)


def augmented(stats: dict) -> dict:
    """The statistics of the inputs with a constant 1 appended: an affine map is a linear one on them."""
    xx = torch.cat([torch.cat([stats["xx"], stats["x_sum"][:, None]], 1),
                    torch.cat([stats["x_sum"], stats["xx"].new_tensor([stats["n"]])])[None]], 0)
    return {"xx": xx, "yx": torch.cat([stats["yx"], stats["y_sum"][:, None]], 1), "yy": stats["yy"]}


@torch.no_grad()
def affine_map(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Any linear-plus-bias layer's (weight [out, in], bias [out]), read off its outputs for the identity rows and 0."""
    if hasattr(layer, "composed"):  # Clos: exact, without a forward pass
        weight, bias = layer.composed()
        return weight.double(), bias.double()
    x = torch.cat([torch.eye(layer.in_features), torch.zeros(1, layer.in_features)])
    param = next(layer.parameters())
    out = layer(x.to(param.device, param.dtype)).double()
    return (out[:-1] - out[-1]).T, out[-1]


def layer_error(layer: nn.Module, stats: dict) -> float:
    """The layer's relative output error ||layer(X) - Y|| / ||Y|| on the rows of the statistics, without the rows."""
    weight, bias = affine_map(layer)
    return stats_error(torch.cat([weight, bias[:, None]], 1), augmented(stats))


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

    def egress_map(self) -> torch.Tensor:
        """H [l, k, in]: what egress switch l's middle inputs k are, as linear maps of the layer's input."""
        c = self.clos
        return (self.d.permute(1, 0, 2)[..., None] * self.b[None]).permute(0, 2, 1, 3).reshape(c.b3, c.b2, c.in_features)

    def egress_times_gram(self, xx: torch.Tensor) -> torch.Tensor:
        """H_l Σ [l, k, in] for a Gram Σ [in, in], through the block structure: B_j Σ_{j,:} once, then summed over j
        with the weights d[j, l, :] (b2 b1 bin in + b3 b2 b1 in multiply-adds instead of b3 b2 in^2)."""
        c = self.clos
        bs = self.b @ xx.view(c.b1, c.bin, c.in_features)  # [j, k, in]
        return (self.d.permute(2, 1, 0) @ bs.transpose(0, 1)).transpose(0, 1)

    def times_gram(self, xx: torch.Tensor) -> torch.Tensor:
        """W Σ [out, in]: egress switch l's rows are A_l H_l Σ (on the MNIST fc1 at m = 4, 3/7 of the dense
        product's multiply-adds)."""
        return (self.a @ self.egress_times_gram(xx)).reshape(self.clos.out_features, self.clos.in_features)

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


def solve_egress(h: torch.Tensor, xx: torch.Tensor, yx: torch.Tensor, ridge: float,
                 hs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The egress stage's least-squares optimum [l, k, o] when egress switch l sees H_l x (h [l, k, in], `hs` = H_l Σ
    where known) and must give its outputs' rows of `yx`: W_l = A_l H_l, so A_l = G_l H_l^T (H_l Σ H_l^T)^-1."""
    b3, _, width = h.shape
    hs = h @ xx if hs is None else hs  # [l, k, in]
    rhs = h @ yx.reshape(b3, -1, width).transpose(1, 2)  # [l, k, o]
    return ridge_solve(hs @ h.transpose(1, 2), rhs, ridge)


def ingress_eigh(stats: dict, bin_: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecompositions of the input Gram's diagonal blocks Σ_jj (one per ingress switch), computed once per fit."""
    key = ("ingress_eigh", bin_)
    if key not in stats:
        xx = stats["xx"]
        blocks = torch.stack([xx[j:j + bin_, j:j + bin_] for j in range(0, len(xx), bin_)])
        stats[key] = torch.linalg.eigh(blocks)
    return stats[key]


@torch.no_grad()
def als_sweep(f: ClosFactors, stats: dict, ridge: float) -> float:
    """One sweep of exact least squares on the outputs: every egress stage at once (the output groups are
    independent), then ingress switch by ingress switch its first stage and its middle weights (each the
    exact optimum given the rest: a Kronecker system solved through two small eigendecompositions, and a
    b2 x b2 system per egress switch). Returns the training error it leaves."""
    c = f.clos
    xx, yx = stats["xx"], stats["yx"]
    b1, b3, bin_, bout, b2 = c.b1, c.b3, c.bin, c.bout, c.b2
    # Egress, from H_l Σ through the block structure (a sixth of the dense product's work for BERT's layers at m = 4).
    hs = f.egress_times_gram(xx)  # [l, k, in]
    f.a = solve_egress(f.egress_map(), xx, yx, ridge, hs).transpose(1, 2).contiguous()  # [l, o, k]
    aa = f.a.transpose(1, 2) @ f.a  # [l, k, k], fixed for the rest of the sweep
    # G - W Σ: the negative half-gradient, kept current below. W Σ's rows of egress switch l are A_l H_l Σ.
    residual = yx - (f.a @ hs).reshape(c.out_features, c.in_features)
    e2s, u2s = ingress_eigh(stats, bin_)
    for j in range(b1):
        cols = slice(j * bin_, (j + 1) * bin_)
        sjj, e2, u2 = xx[cols, cols], e2s[j], u2s[j]
        # Ingress switch j: W[:, j] = M_j B_j with M_j [(l, o), k] = a[l, o, k] d[j, l, k].
        m = (f.a * f.d[j][:, None, :]).reshape(c.out_features, b2)
        p = (aa * (f.d[j][:, :, None] * f.d[j][:, None, :])).sum(0)  # M_j^T M_j without the [out, b2] product
        rj = residual[:, cols]
        rhs = m.T @ rj + p @ f.b[j] @ sjj
        e1, u1 = torch.linalg.eigh(p)
        scale = (e1.clamp_min(0)[:, None] * e2.clamp_min(0)[None]) + ridge * float(e1.mean() * e2.mean())
        step = u1 @ ((u1.T @ rhs @ u2) / scale.clamp_min(1e-300)) @ u2.T - f.b[j]
        f.b[j] += step
        moved = m @ step  # [out, bin]: the change of W[:, j]
        rj = rj - moved @ sjj
        # Its middle weights d[j, l, :] for every l (rows of different egress switches do not interact).
        q = aa * (f.b[j] @ sjj @ f.b[j].T)[None]  # [l, k, k]
        lin = ((rj @ f.b[j].T).view(b3, bout, b2) * f.a).sum(1)  # [l, k] = diag(A_l^T R_lj B_j^T)
        delta = ridge_solve(q, lin[..., None], ridge)[..., 0]  # [l, k]
        f.d[j] += delta
        moved += (f.a * delta[:, None, :]).reshape(c.out_features, b2) @ f.b[j]
        residual -= moved @ xx[cols]
    return residual_error(f.weight(), residual, stats)


@torch.no_grad()
def extrapolate(f, previous: tuple[torch.Tensor, ...], step: float, stats: dict, error: float) -> None:
    """Move the factors `step` times further along the last sweep's change where that lowers the training error
    below the sweep's `error` (ALS creeps along narrow valleys; this line search halves the sweeps it needs)."""
    swept = f.state()
    f.restore(tuple(now + step * (now - before) for now, before in zip(swept, previous)))
    if factors_error(f, stats) >= error:
        f.restore(swept)


ACCELERATIONS = ("line", "anderson")  # clos-convert's --fit-accel


class Anderson:
    """Anderson acceleration of the sweeps, a fixed-point map x -> sweep(x) on the flattened factors: the next point
    mixes the last `depth` sweeps' outputs with the weights that best cancel their changes (x - sweep(x)) in least
    squares (Walker and Ni 2011, type II; De Sterck 2012 accelerates ALS for tensor factorisations with this idea)."""

    def __init__(self, depth: int = 8, ridge: float = 1e-4) -> None:
        self.depth, self.ridge = depth, ridge
        self.changes: list[torch.Tensor] = []  # differences of consecutive sweeps' changes sweep(x) - x
        self.outputs: list[torch.Tensor] = []  # differences of consecutive sweeps' outputs
        self.last: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # the last sweep's (change, output)

    def point(self, before: torch.Tensor, after: torch.Tensor) -> Optional[torch.Tensor]:
        """The accelerated point after a sweep from `before` to `after` (flat), or None while there is no history."""
        change = after - before
        if self.last is not None:
            self.changes = (self.changes + [change - self.last[0]])[-self.depth:]
            self.outputs = (self.outputs + [after - self.last[1]])[-self.depth:]
        self.last = change, after
        if not self.changes:
            return None
        changes = torch.stack(self.changes, 1)
        weights = ridge_solve(changes.T @ changes, (changes.T @ change)[:, None], self.ridge)[:, 0]
        return after - torch.stack(self.outputs, 1) @ weights

    def forget(self) -> None:
        """Drop the history (after a rejected point: the mixing came from a region the fit has left)."""
        self.changes, self.outputs = [], []


def _flat(state: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in state])


def _unflat(flat: torch.Tensor, like: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    sizes = [t.numel() for t in like]
    return tuple(part.view_as(t) for part, t in zip(flat.split(sizes), like))


def stopping_sweep(errors: list[float], patience: int, tolerance: float) -> int | None:
    """The sweep (1-based) after which the data-aware fit stops: the first whose held-out error is less than
    `tolerance` (relative) below the best error of `patience` sweeps before; None while it keeps falling."""
    for done in range(patience + 1, len(errors) + 1):
        if errors[done - 1] > (1 - tolerance) * min(errors[: done - patience]):
            return done
    return None


@torch.no_grad()
def finish_biases(f: ClosFactors, stats: dict, ridge: float) -> None:
    """After the sweeps (which fit the bias-free map): the three stage biases for what the map leaves of the means,
    then the egress stage once more, exact for the affine map (the statistics with a constant input appended)."""
    c = f.clos
    f.write()
    fit_bias(c, (stats["y_mean"] - f.weight() @ stats["x_mean"]).to(c.w1.dtype))
    offsets = c.egress_inputs(torch.zeros(1, c.in_features, dtype=c.w1.dtype, device=c.w1.device)).double()  # [l, k, 1]
    h = torch.cat([f.egress_map(), offsets], 2)  # [l, k, in + 1]
    wide = augmented(stats)
    constant = torch.cat([stats["x_sum"], stats["xx"].new_tensor([stats["n"]])])  # X~^T 1: the cross term of bias3
    targets = wide["yx"] - c.bias3.double().repeat_interleave(c.bout)[:, None] * constant[None]
    f.a = solve_egress(h, wide["xx"], targets, ridge).transpose(1, 2)
    f.write()


def sweep_until_stalled(f, sweep: Callable[[], float], stats: dict, heldout: Callable[[], float], sweeps: int,
                        patience: int, tolerance: float, start: float,
                        accel: str = "line") -> tuple[list[float], list[float]]:
    """Run `sweep` (exact least squares, stage by stage, on the factors `f`) until the held-out error has fallen by
    less than `tolerance` (relative) in `patience` sweeps or `sweeps` ran; leaves the factors at the sweep with the
    lowest held-out error. `sweep` returns the training error it leaves. After each sweep, `accel` "line" takes a
    longer step along its change where that lowers the training error on `stats`; "anderson" moves to the Anderson
    point of the last sweeps where that lowers it, else takes the longer step (and forgets the history). Returns the
    held-out error and the seconds since `start` before the first sweep and after each."""
    if accel not in ACCELERATIONS:
        raise ValueError(f"accel must be one of {ACCELERATIONS}, got {accel!r}")
    errors, elapsed = [heldout()], [time.perf_counter() - start]
    best_state = previous = f.state()
    anderson = Anderson() if accel == "anderson" else None
    last_output = previous  # the last sweep's output, before any acceleration
    for done in range(1, sweeps + 1):
        error = sweep()
        output = f.state()
        accepted = False
        if anderson is not None:
            point = anderson.point(_flat(previous), _flat(output))
            if point is not None:
                f.restore(_unflat(point, output))
                accepted = factors_error(f, stats) < error
                if not accepted:
                    f.restore(output)
                    anderson.forget()
        if not accepted and done > 2:
            # The longer step: along this sweep's change ("line"), or along the change between the last two sweeps'
            # outputs where an Anderson point came between them.
            extrapolate(f, previous if anderson is None else last_output, done ** (1 / 3), stats, error)
        last_output, previous = output, f.state()
        errors.append(heldout())
        elapsed.append(time.perf_counter() - start)
        if errors[-1] <= min(errors[:-1]):
            best_state = previous
        if stopping_sweep(errors[1:], patience, tolerance):
            break
    f.restore(best_state)
    return errors, elapsed


def sweep_summary(layer: nn.Module, data: "LayerData", errors: list[float], elapsed: list[float], start: float) -> dict:
    """What a least-squares fit returns: the finished layer's errors, and the map's held-out error by sweep."""
    return {"relative_error": layer_error(layer, data.stats),
            "relative_error_heldout": layer_error(layer, data.val_stats), "sweeps": len(errors) - 1,
            "seconds": time.perf_counter() - start,
            "heldout_by_sweep": [round(e, 6) for e in errors],  # the map's, before the biases (and Clos's last solve)
            "seconds_by_sweep": [round(t, 3) for t in elapsed]}


@torch.no_grad()
def fit_clos_als(clos: Clos, data: LayerData, sweeps: int = 100, ridge: float = 1e-6, patience: int = 5,
                 tolerance: float = 1e-3, accel: str = "line") -> dict:
    """Data-aware fit by exact alternating least squares on the calibration rows' statistics, from the layer's
    current stages (the weight-space fit): each sweep solves every stage given the others (then tries a longer step
    along the sweep's change, or the Anderson point with `accel` "anderson"). It stops once the held-out error has
    fallen by less than `tolerance` (relative) in `patience` sweeps, and keeps the sweep with the lowest. The biases and a last exact solve of the egress stage for
    the affine map finish it. Returns the errors, the held-out error and the seconds after each sweep (the
    statistics' time included where this fit computed them), the sweeps run and seconds."""
    start = time.perf_counter()
    stats, val = data.stats, data.val_stats
    for bias in (clos.bias1, clos.bias2, clos.bias3):
        bias.zero_()  # the sweeps fit the map alone; the biases come last, on what it leaves of the means
    f = ClosFactors(clos)
    errors, elapsed = sweep_until_stalled(f, lambda: als_sweep(f, stats, ridge), stats,
                                          lambda: factors_error(f, val), sweeps, patience, tolerance, start, accel)
    finish_biases(f, stats, ridge)
    return sweep_summary(clos, data, errors, elapsed, start)


# ------------------------------------------------------- Monarch's data-aware fit (exact ALS on statistics)


class MonarchFactors:
    """A Monarch layer's two stages in float64 (w1 [k, l*R, p], w2 [l, s, k*R]): what its data-aware ALS updates."""

    def __init__(self, layer: Monarch) -> None:
        self.layer = layer
        self.w1 = layer.w1.detach().double().clone()
        self.w2 = layer.w2.detach().double().clone()

    def weight(self) -> torch.Tensor:
        """The map as a dense [out, in] matrix."""
        return self.layer.map_of(self.w1, self.w2)

    def stage2_times_gram(self, xx: torch.Tensor) -> torch.Tensor:
        """H_l Σ [l, k, R, in] for a Gram Σ: output group l sees H_l x, H_l [k*R, in] block-diagonal with blocks
        w1[k][l's R rows]."""
        m = self.layer
        return (self.w1 @ xx.view(m.k, m.p, m.in_features)).view(m.k, m.l, m.rank, m.in_features).transpose(0, 1)

    def times_gram(self, xx: torch.Tensor) -> torch.Tensor:
        """W Σ [out, in]: group l's rows are w2[l] H_l Σ."""
        m = self.layer
        hs = self.stage2_times_gram(xx).reshape(m.l, m.k * m.rank, m.in_features)
        return (self.w2 @ hs).reshape(m.out_features, m.in_features)

    def state(self) -> tuple[torch.Tensor, ...]:
        """A copy of the stages."""
        return self.w1.clone(), self.w2.clone()

    def restore(self, state: tuple[torch.Tensor, ...]) -> None:
        """Put back stages saved by `state`."""
        self.w1, self.w2 = (t.clone() for t in state)

    def write(self, bias: torch.Tensor) -> None:
        """Copy the stages and `bias` into the layer."""
        m = self.layer
        m.w1.copy_(self.w1.to(m.w1.dtype))
        m.w2.copy_(self.w2.to(m.w2.dtype))
        if m.bias is not None:
            m.bias.copy_(bias.to(m.bias.dtype))


@torch.no_grad()
def monarch_sweep(f: MonarchFactors, stats: dict, ridge: float) -> float:
    """One sweep of exact least squares on the (centred) outputs: the second stage for every output group at once
    (the groups are independent), then input block by input block the first stage (each the exact optimum given the
    rest: a Kronecker system solved through two small eigendecompositions, as Clos's ingress switches). Returns the
    training error it leaves."""
    m = f.layer
    k, p, l_, s, r, width = m.k, m.p, m.l, m.s, m.rank, m.in_features
    xx, yx = stats["xx"], stats["yx"]
    # Stage 2: H_l Σ H_l^T and H_l G_l^T through the blocks (no dense H_l).
    w1 = f.w1.view(k, l_, r, p)
    hs = f.stage2_times_gram(xx)  # [l, k, R, in]
    gram = torch.einsum("lakbq,blrq->lakbr", hs.reshape(l_, k, r, k, p), w1)
    rhs = torch.einsum("klrp,lskp->lkrs", w1, yx.view(l_, s, k, p))  # [l, k, R, s]
    f.w2 = ridge_solve(gram.reshape(l_, k * r, k * r), rhs.reshape(l_, k * r, s), ridge).transpose(1, 2).contiguous()
    # Stage 1, block by block: W[:, k] = M_k B_k, M_k block-diagonal with blocks w2[l][:, k's R columns] [s, R].
    # G - W Σ, kept current below; W Σ's rows of group l are w2[l] H_l Σ.
    residual = yx - (f.w2 @ hs.reshape(l_, k * r, width)).reshape(m.out_features, width)
    e2s, u2s = ingress_eigh(stats, p)
    w2 = f.w2.view(l_, s, k, r)
    for block in range(k):
        cols = slice(block * p, (block + 1) * p)
        mk = w2[:, :, block, :]  # [l, s, R]
        pk = mk.transpose(1, 2) @ mk  # [l, R, R]
        old = f.w1[block].view(l_, r, p).clone()  # (a view would change with the assignment below)
        rk = residual[:, cols].view(l_, s, p)
        rhs = mk.transpose(1, 2) @ rk + pk @ old @ xx[cols, cols]  # [l, R, p]
        e1, u1 = torch.linalg.eigh(pk)  # [l, R], [l, R, R]
        e2, u2 = e2s[block], u2s[block]
        scale = e1.clamp_min(0)[..., None] * e2.clamp_min(0) + ridge * e1.mean(1, keepdim=True)[..., None] * e2.mean()
        new = u1 @ ((u1.transpose(1, 2) @ rhs @ u2) / scale.clamp_min(1e-300)) @ u2.T
        f.w1[block] = new.reshape(l_ * r, p)
        moved = (mk @ (new - old)).reshape(m.out_features, p)  # the change of W[:, k]
        residual -= moved @ xx[cols]
    return residual_error(f.weight(), residual, stats)


@torch.no_grad()
def fit_monarch_als(layer: Monarch, data: LayerData, sweeps: int = 100, ridge: float = 1e-6, patience: int = 5,
                    tolerance: float = 1e-3, accel: str = "line") -> dict:
    """Monarch's data-aware fit by exact alternating least squares on the centred statistics, from its current stages
    (the weight-space projection), stopped as Clos's (`sweep_until_stalled`); the bias is then the output mean less
    the map of the input mean. Returns what `fit_clos_als` returns."""
    start = time.perf_counter()
    stats, val = data.stats, data.val_stats
    train, val_wide = centred(stats), augmented(val)
    f = MonarchFactors(layer)

    def affine() -> torch.Tensor:  # [out, in + 1]: the map and its best bias on the calibration rows
        weight = f.weight()
        return torch.cat([weight, (stats["y_mean"] - weight @ stats["x_mean"])[:, None]], 1)

    errors, elapsed = sweep_until_stalled(f, lambda: monarch_sweep(f, train, ridge), train,
                                          lambda: stats_error(affine(), val_wide), sweeps, patience, tolerance,
                                          start, accel)
    f.write(affine()[:, -1])
    return sweep_summary(layer, data, errors, elapsed, start)
