"""Clos layer against the dense layer it replaces: forward + backward time at batch 256.

    python -m benchmarks.clos_speed [--device cpu|cuda] [--size 784] [--repeats 50]

Prints the median milliseconds per forward+backward for nn.Linear(size, size) and Clos(size, size, m)
for m = 4 and 2, with their parameter counts and multiply-adds.
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
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        layer(x).sum().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        if i >= 5:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=784)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    x = torch.randn(args.batch, args.size, device=args.device, requires_grad=True)
    print(f"device {args.device}, threads {torch.get_num_threads()}, batch {args.batch}, {args.size} -> {args.size}")
    layers = {"dense": torch.nn.Linear(args.size, args.size)}
    layers.update({f"clos m={m}": Clos(args.size, args.size, m) for m in (4, 2)})
    for name, layer in layers.items():
        layer.to(args.device)
        params = sum(p.numel() for p in layer.parameters())
        macs = args.size * args.size if name == "dense" else (
            layer.in_features * layer.b2 + layer.b2 * layer.b1 * layer.b3 + layer.b2 * layer.out_features)
        ms = time_step(layer, x, args.repeats)
        print(f"{name:<10} params {params:>9,}  MACs/sample {macs:>9,}  forward+backward {ms:7.2f} ms")


if __name__ == "__main__":
    main()
