"""Clos layer and its peers (low-rank, Monarch) against the dense layer they replace: forward + backward time.

    python -m benchmarks.clos_speed [--device cpu|cuda] [--shapes 784x784:256 384x1536:2048] [--repeats 50]
                                    [--precisions fp32 bf16]

For each shape IN x OUT : ROWS (rows = batch, or tokens of a batch of sequences) prints the median
milliseconds per forward+backward of nn.Linear(IN, OUT) and of Clos(IN, OUT, m) for m = 4 and 2 along
both of its paths (the three stages; one product with the composed weight), which path its cost
model picks (`auto`), and a low-rank and a Monarch layer with the parameters of that Clos layer (the
nearest rank), each against dense, with parameter counts; then the cost model's two factors as each
Clos layer measures them on its first forward on this device and precision, and how long that took.
The defaults: the MNIST MLP's fc1 at batch 256, and the MiniLM BERT's attention and MLP layers at
2,048 tokens (32 tweets of 64 tokens).
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from pruning_lab.clos import Clos
from pruning_lab.clos.cost import CALIBRATION_ROWS, cost_factors, time_step
from pruning_lab.clos.peers import LowRank, Monarch, lowrank_rank_for, monarch_rank_for
from benchmarks.results import Results, add_results_flag
from pruning_lab.runtime import autocast


def parse_shape(text: str) -> tuple[int, int, int]:
    """'784x784:256' -> (784, 784, 256)."""
    try:
        sizes, rows = text.split(":")
        in_features, out_features = sizes.split("x")
        return int(in_features), int(out_features), int(rows)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not IN x OUT : ROWS, e.g. 784x784:256") from None


def layers_at(in_features: int, out_features: int, m: int) -> dict[str, torch.nn.Module]:
    """Clos at multiplier m and its peers with (as near as their shapes allow) the same parameters."""
    clos = Clos(in_features, out_features, m)
    budget = sum(p.numel() for p in clos.parameters())
    return {"clos": clos, "lowrank": LowRank(in_features, out_features, lowrank_rank_for(in_features, out_features, budget)),
            "monarch": Monarch(in_features, out_features, monarch_rank_for(in_features, out_features, budget))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", type=parse_shape, nargs="+",
                        default=[parse_shape(s) for s in ("784x784:256", "384x384:2048", "384x1536:2048", "1536x384:2048")])
    parser.add_argument("--multipliers", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=("fp32", "bf16"),
                        help="fp32, and/or bf16 autocast (as training runs where the device has native bf16)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", help="also write every row and cost factor here")
    add_results_flag(parser)
    args = parser.parse_args(argv)
    out = Results("clos_speed", argv)
    device = torch.device(args.device)
    out(f"device {args.device}, threads {torch.get_num_threads()}, forward+backward, median of {args.repeats}")
    out("| layer | rows | precision | structure | at Clos m | parameters | ms | vs dense |")
    out("|---|---|---|---|---|---|---|---|")
    costs, rows_out = [], []
    for (in_features, out_features, rows), precision in itertools.product(args.shapes, args.precisions):
        x = torch.randn(rows, in_features, device=device, requires_grad=True)
        row = f"| {in_features} -> {out_features} | {rows} | {precision} |"
        with autocast(precision, device):
            dense_ms = time_step(torch.nn.Linear(in_features, out_features).to(device), x, args.repeats)
            out(f"{row} dense | | {in_features * out_features + out_features:,} | {dense_ms:.2f} | 1.00x |")
            shape = {"in_features": in_features, "out_features": out_features, "rows": rows, "precision": precision}
            rows_out.append({**shape, "structure": "dense", "multiplier": None, "path": None, "auto": False,
                             "parameters": in_features * out_features + out_features, "ms": dense_ms})
            for m in args.multipliers:
                for name, layer in layers_at(in_features, out_features, m).items():
                    layer.to(device)
                    params = sum(p.numel() for p in layer.parameters())
                    paths = ("stages", "composed") if name == "clos" else ("",)
                    auto = "stages"
                    if name == "clos":  # what the layer measures on its first forward, timed here
                        started = time.perf_counter()
                        factors = cost_factors(layer, device, torch.bfloat16 if precision == "bf16" else torch.float32)
                        costs.append((row, m, *factors, time.perf_counter() - started))
                        auto = "composed" if layer.uses_composed_weight(rows, factors=factors) else "stages"
                    for path in paths:
                        if path:
                            layer.path = path
                        ms = time_step(layer, x, args.repeats)
                        picked = " (auto)" if path == auto else ""
                        label = f"clos, {path}{picked}" if path else name
                        out(f"{row} {label} | {m} | {params:,} | {ms:.2f} | {dense_ms / ms:.2f}x |")
                        rows_out.append({**shape, "structure": name, "multiplier": m, "path": path or None,
                                         "auto": path == auto, "parameters": params, "ms": ms,
                                         "speedup_over_dense": dense_ms / ms})

    out(f"\nThe Clos cost model's factors as measured here (per multiply-add, in units of dense's; "
        f"{CALIBRATION_ROWS} rows):\n\n| layer | rows | precision | at Clos m | stage factor | compose factor | measured in s |")
    out("|---|---|---|---|---|---|---|")
    for row, m, stage, compose, seconds in costs:
        out(f"{row} {m} | {stage:.2f} | {compose:.2f} | {seconds:.2f} |")
    if args.json:
        factors = [{"layer": row, "multiplier": m, "stage_factor": stage, "compose_factor": compose, "seconds": seconds}
                   for row, m, stage, compose, seconds in costs]
        Path(args.json).write_text(json.dumps({"device": str(device), "repeats": args.repeats, "rows": rows_out,
                                               "cost_factors": factors}, indent=2))
    out.finish(args.write_results)


if __name__ == "__main__":
    main()
