"""How fast a Clos layer's two paths run on this machine: measured once per layer shape, device and precision.

A Clos forward runs either its three stages or one dense product with its composed weight. Which is
faster depends on the hardware and the precision (on CPU in bf16 the cheaper path is not the one it
is in fp32; a GPU differs again), so instead of constants fitted on one machine the first forward of
each (shape, device, compute dtype) times both paths and a dense layer of the same shape, forward +
backward at CALIBRATION_ROWS rows, and keeps two factors: the stages' cost per multiply-add and the
cost of composing the weight per multiply-add, both in units of the dense product's. Other row
counts then follow from the multiply-adds. The measurement draws its inputs and weights from a
forked random state, so a run's random stream is the same whether or not it measured.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn as nn

CALIBRATION_ROWS = 1024
_MEASURED: dict[tuple, tuple[float, float]] = {}


def time_step(layer: nn.Module, x: torch.Tensor, repeats: int, warmup: int = 5) -> float:
    """Median milliseconds of one forward + backward of `layer` on `x` (which requires grad)."""
    times = []
    for i in range(repeats + warmup):
        x.grad = None
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        layer(x).sum().backward()
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the products on `x` run in: autocast's where it is on, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def cost_factors(clos: nn.Module, device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(stage cost, compose cost) of `clos`'s shape on `device` in `dtype`, measured on first use."""
    key = (device.type, device.index, dtype, tuple(sorted(clos.config().items())))
    if key not in _MEASURED:
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return 1.0, float("inf")  # nothing can be timed inside a trace: the stages, until measured
        _MEASURED[key] = measure_cost_factors(clos, device, dtype)
    return _MEASURED[key]


def measure_cost_factors(clos: nn.Module, device: torch.device, dtype: torch.dtype,
                         rows: int = CALIBRATION_ROWS, repeats: int = 5) -> tuple[float, float]:
    """Time dense, the stages and the composed weight for `clos`'s shape; the factors that reproduce them."""
    return factors_from_times(clos, path_times(clos, device, dtype, rows, repeats), rows)


def factors_from_times(clos: nn.Module, times: dict[str, float], rows: int) -> tuple[float, float]:
    """(stage cost, compose cost) per multiply-add, in units of the dense product's, from times at `rows` rows."""
    dense_macs = clos.in_features * clos.out_features
    per_mac = times["dense"] / (rows * dense_macs)
    stage = times["stages"] / (per_mac * rows * clos.stage_macs())
    compose = max(times["composed"] - times["dense"], 0.0) / (per_mac * dense_macs * clos.b2)
    return stage, compose


def path_times(clos: nn.Module, device: torch.device, dtype: torch.dtype, rows: int,
               repeats: int) -> dict[str, float]:
    """Milliseconds of forward + backward at `rows` rows: a dense layer, and a copy of `clos` along each path."""
    fork = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork), torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(0)
        half = dtype in (torch.bfloat16, torch.float16)  # as training runs them: autocast over fp32 weights
        weights = torch.float32 if half else dtype
        stages, composed = (type(clos)(**clos.config()).to(device, weights) for _ in range(2))  # copies of its shape
        stages.path, composed.path = "stages", "composed"
        layers = {"dense": nn.Linear(clos.in_features, clos.out_features).to(device, weights),
                  "stages": stages, "composed": composed}
        x = torch.randn(rows, clos.in_features, device=device, dtype=weights, requires_grad=True)
        times: dict[str, list[float]] = {name: [] for name in layers}
        with torch.autocast(device.type, dtype=dtype, enabled=half):
            # one round to warm up, then rounds interleaved, so that the machine's load or clock drifting
            # affects the three alike
            for round_ in range(repeats + 1):
                for name, layer in layers.items():
                    ms = time_step(layer, x, 1, warmup=0)
                    if round_:
                        times[name].append(ms)
    return {name: statistics.median(ms) for name, ms in times.items()}
