"""The least-squares solve every closed-form fit of the Clos module uses, and the centred statistics."""
from __future__ import annotations

import torch


def ridge_solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """Solve (gram + ridge * mean diag * I) x = rhs for a batch of symmetric positive semi-definite `gram`.

    By Cholesky: the system is positive definite, and the LU path of torch.linalg.solve fails on batches
    of such systems with MKL once torch.set_num_threads was called ("Pivots given to lu_solve must all be
    greater or equal to 1", seen with torch 2.14 on a 2-core AVX2 CPU for 16 systems of 161); least squares
    where rounding leaves a system not quite positive definite."""
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)[..., None, None]
    system = gram + ridge * scale * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(system)
    if bool((info == 0).all()):
        return torch.cholesky_solve(rhs, factor)
    return torch.linalg.lstsq(system, rhs).solution


def centred(stats: dict) -> dict:
    """The statistics of the centred rows: a layer with a free bias per output fits its map on these (its best bias
    is then the output mean less the map of the input mean)."""
    n, x_mean, y_mean = stats["n"], stats["x_mean"], stats["y_mean"]
    return {"n": n, "xx": stats["xx"] - n * torch.outer(x_mean, x_mean),
            "yx": stats["yx"] - n * torch.outer(y_mean, x_mean), "yy": stats["yy"] - n * float(y_mean.square().sum())}
