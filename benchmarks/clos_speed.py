"""Clos layer against the dense layer it replaces: forward + backward time.

    python -m benchmarks.clos_speed [--device cpu|cuda] [--shapes 784x784:256 384x1536:2048] [--repeats 50]

For each shape IN x OUT : ROWS (rows = batch, or tokens of a batch of sequences) prints the median
milliseconds per forward+backward of nn.Linear(IN, OUT) and of Clos(IN, OUT, m) for m = 4 and 2 along
both of its paths (the three stages; one product with the composed weight), which path its cost
model picks (`auto`) and that path's speed against dense, with parameter counts and multiply-adds.
The defaults: the MNIST MLP's fc1 at batch 256, and the MiniLM BERT's attention and MLP layers at
2,048 tokens (32 tweets of 64 tokens).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pruning_lab.clos import Clos


def time_step(layer: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median milliseconds of one forward + backward."""
    times = []
    for i in range(repeats + 5):
        x.grad = None
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        layer(x).sum().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        if i >= 5:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def parse_shape(text: str) -> tuple[int, int, int]:
    """'784x784:256' -> (784, 784, 256)."""
    try:
        sizes, rows = text.split(":")
        in_features, out_features = sizes.split("x")
        return int(in_features), int(out_features), int(rows)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not IN x OUT : ROWS, e.g. 784x784:256") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", type=parse_shape, nargs="+",
                        default=[parse_shape(s) for s in ("784x784:256", "384x384:2048", "384x1536:2048", "1536x384:2048")])
    parser.add_argument("--multipliers", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    print(f"device {args.device}, threads {torch.get_num_threads()}, forward+backward, median of {args.repeats}")
    print("| layer | rows | m | parameters | MACs/row | stages ms | composed ms | auto runs | auto vs dense |")
    print("|---|---|---|---|---|---|---|---|---|")
    for in_features, out_features, rows in args.shapes:
        x = torch.randn(rows, in_features, device=args.device, requires_grad=True)
        dense = torch.nn.Linear(in_features, out_features).to(args.device)
        dense_ms = time_step(dense, x, args.repeats)
        print(f"| {in_features} -> {out_features} | {rows} | dense | {in_features * out_features + out_features:,} | "
              f"{in_features * out_features:,} | {dense_ms:.2f} | | dense | 1.00x |", flush=True)
        for m in args.multipliers:
            clos = Clos(in_features, out_features, m).to(args.device)
            ms = {}
            for path in ("stages", "composed"):
                clos.path = path
                ms[path] = time_step(clos, x, args.repeats)
            clos.path = "auto"
            auto = "composed" if clos.uses_composed_weight(rows) else "stages"
            params = sum(p.numel() for p in clos.parameters())
            print(f"| {in_features} -> {out_features} | {rows} | {m} | {params:,} | {clos.stage_macs():,} | "
                  f"{ms['stages']:.2f} | {ms['composed']:.2f} | {auto} | {dense_ms / ms[auto]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
