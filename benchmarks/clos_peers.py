"""Clos against low-rank and Monarch at equal parameters, and a dense control, on one model's layers.

    python -m benchmarks.clos_peers --checkpoint models_saved/clos/mnist_mlp.pth --layers fc1 \
        [--multipliers 4 2] [--finetune-epochs 5] [--finetune-lr 1e-3] [--fit-sweeps 100] [--rows 256]

For each budget (the parameters of the Clos layer at m = 4 and m = 2) and each structure (clos,
lowrank, monarch), runs `clos-convert` on the matching layers (weight-space fit, then the data-aware
fit on calibration inputs, then the same KD fine-tuning from the original) and prints: the
converted layers' parameters against the Clos budget, the mean and worst relative output error per
layer on held-out inputs, the model's test accuracy (and, for text, the sentence-embedding cosine
to the original) after conversion and after fine-tuning, the conversion's fitting seconds, and the
forward+backward speed against dense (dense's time over the structure's, above 1 is faster; the mean
over the layers' shapes) at --rows rows. The dense
control is the original model given the same KD fine-tuning. Then the Clos fit's two starts (the
closed-form grouped SVD against random) on the first layer: weight error after the ALS, held-out
output error after the data-aware fit, and seconds, beside low-rank's error and seconds on the same
rows and the sweep (and second) at which Clos's fit first goes below low-rank's error.
With --write-results: results/clos_peers_MODEL.md, or results/clos_peers_MODEL_m2.md for a run without
m = 4 (--multipliers 2), so that it does not replace the m = 4 table; a run of one structure adds _STRUCTURE.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch

from benchmarks.results import Results, add_results_flag
from distillation_lab.clos_convert import ClosConvertOptions, clos_convert, fit_structure, layer_examples, make_structure
from distillation_lab.runs import finetune_config, run_training
from pruning_lab.checkpoint import load_checkpoint
from pruning_lab.clos import Clos
from pruning_lab.clos.cost import time_step
from pruning_lab.clos.fit import LayerData, fit_clos_als, fit_to_dense
from pruning_lab.clos.structures import DEFAULT_FIT_SWEEPS, STRUCTURES
from pruning_lab.clos.surgery import matching_linears
from pruning_lab.config import from_dict
from pruning_lab.inference import count_parameters, open_checkpoint

def layer_speed(opened, names: list[str], structure: str, m: int, rows: int) -> float:
    """Mean over the layers' distinct shapes of dense's fwd+bwd time / the structure's (above 1: faster), at `rows` rows."""
    shapes = sorted({(opened.model.get_submodule(n).in_features, opened.model.get_submodule(n).out_features)
                     for n in names})
    ratios = []
    for fan_in, fan_out in shapes:
        dense = torch.nn.Linear(fan_in, fan_out)
        layer = make_structure(structure, dense, m)
        x = torch.randn(rows, fan_in, requires_grad=True)
        ratios.append(time_step(dense, x, 30) / time_step(layer, x, 30))
    return sum(ratios) / len(ratios)


def compare_starts(opened, original_path: str, name: str, m: int, calibration: int, fit_sweeps: int,
                   als_iterations: int) -> list[dict]:
    """The Clos fit of layer `name` from the grouped-SVD start and from a random start."""
    model = opened.model
    dense = model.get_submodule(name)
    examples = (*layer_examples(model, None, name, opened.loader("train"), calibration),
                *layer_examples(model, None, name, opened.loader("val"), calibration))
    start_time = time.perf_counter()
    _, lowrank = fit_structure(dense, "lowrank", m, LayerData(*examples))  # its own statistics, timed
    lowrank_seconds = time.perf_counter() - start_time
    lowrank_error = lowrank["data_aware"]["relative_error_heldout"]
    rows = []
    for start in ("svd", "random"):
        torch.manual_seed(0)
        clos = Clos(dense.in_features, dense.out_features, m)
        weight = fit_to_dense(clos, dense, als_iterations, start)
        data = fit_clos_als(clos, LayerData(*examples), fit_sweeps)  # its own statistics, timed
        # The first sweep whose map (before the biases) is below low-rank's held-out error, and when it ended.
        below = next((k for k, e in enumerate(data["heldout_by_sweep"]) if e <= lowrank_error), None)
        rows.append({"start": weight["start"], "m": m, "weight_error_after_als": weight["weight_relative_error"],
                     "als_seconds": weight["seconds"], "heldout_output_error": data["relative_error_heldout"],
                     "total_seconds": weight["seconds"] + data["seconds"], "lowrank_error": lowrank_error,
                     "lowrank_seconds": lowrank_seconds, "sweeps_to_lowrank": below,
                     "seconds_to_lowrank": None if below is None else weight["seconds"] + data["seconds_by_sweep"][below]})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--layers", required=True)
    parser.add_argument("--multipliers", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--structures", nargs="+", default=list(STRUCTURES), choices=(*STRUCTURES, "auto"),
                        help="auto: per layer the structure with the lowest held-out error (its speed is not timed)")
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--fit-sweeps", type=int, default=DEFAULT_FIT_SWEEPS, help="Clos's least-squares sweeps at most")
    parser.add_argument("--als-iterations", type=int, default=10, help="Clos's weight-space ALS (the fit's start)")
    parser.add_argument("--als-start", choices=("random", "svd"), default="svd", help="the Clos ALS start of the table")
    parser.add_argument("--calibration-examples", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=256, help="rows (batch or tokens) of the speed measurement")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the rows here")
    add_results_flag(parser)
    args = parser.parse_args(argv)
    # One table per model; a run without the default budget m = 4 (e.g. --multipliers 2) writes its own file, and so
    # does a run of one structure (a row added to a table: results/clos_peers_vit_mnist_m2_monarch.md).
    suffix = "" if 4 in args.multipliers else "_m" + "_".join(map(str, args.multipliers))
    suffix += f"_{args.structures[0]}" if len(args.structures) == 1 else ""
    out = Results("clos_peers", argv, f"clos_peers_{Path(args.checkpoint).stem}{suffix}")
    opened = open_checkpoint(args.checkpoint, device=args.device)
    names = matching_linears(opened.model, args.layers)
    ckpt = load_checkpoint(args.checkpoint)
    stem = Path(args.checkpoint).with_suffix("")
    text = hasattr(opened.model, "sentence_embedding")

    control = finetune_config(from_dict(ckpt["config"], args.checkpoint), Path(args.checkpoint),
                              stem.name + "_dense_kd", args.finetune_epochs, args.finetune_lr, {}, args.checkpoint,
                              ckpt["config"]["model"], True, args.device)
    control_result = run_training(control)
    rows = [{"structure": "dense", "m": "-", "parameters": sum(count_parameters(opened.model.get_submodule(n))
                                                                for n in names),
             "accuracy_converted": ckpt["test"]["acc"], "accuracy_finetuned": control_result["test_acc"]}]
    for m in args.multipliers:
        for structure in args.structures:
            summary = clos_convert(ClosConvertOptions(
                checkpoint=args.checkpoint, layers=args.layers, multiplier=m, structure=structure,
                fit_sweeps=None if structure == "lowrank" else args.fit_sweeps,  # low-rank's fit has no sweeps
                als_iterations=args.als_iterations,
                calibration_examples=args.calibration_examples, finetune_epochs=args.finetune_epochs,
                als_start=args.als_start if structure == "clos" else None,  # the others have their own start
                finetune_lr=args.finetune_lr, device=args.device, overwrite=True))
            errors = [layer["data_aware"]["relative_error_heldout"] for layer in summary["layers"]]
            seconds = sum(layer["weight_space"]["seconds"] + layer["data_aware"]["seconds"] for layer in summary["layers"])
            rows.append({"structure": structure, "m": m, "parameters": sum(layer["parameters"] for layer in summary["layers"]),
                         "clos_budget": sum(layer["clos_parameters"] for layer in summary["layers"]),
                         "mean_error": sum(errors) / len(errors), "worst_error": max(errors),
                         "accuracy_converted": summary["test_accuracy_after"],
                         "accuracy_finetuned": summary["test_accuracy_finetuned"],
                         "cosine_converted": summary.get("embedding_cosine_after"),
                         "cosine_finetuned": summary.get("embedding_cosine_finetuned"),
                         "fit_seconds": seconds, "speed_vs_dense": layer_speed(opened, names, structure, m, args.rows)
                         if structure in STRUCTURES else None,
                         "chosen": [layer["structure"] for layer in summary["layers"]]})
    out(f"\n{args.checkpoint}, layers {args.layers} ({len(names)}): test accuracy before conversion "
        f"{ckpt['test']['acc']:.4f}")
    head = "| structure | m budget | parameters (Clos budget) | rel. error mean | worst | test acc converted | after KD FT |"
    out("\n" + head + (" emb. cosine converted | after FT |" if text else "") + " fit s | fwd+bwd speed vs dense |")
    out("|" + "---|" * (head.count("|") - 1 + (2 if text else 0) + 2))
    for r in rows:
        if r["structure"] == "dense":
            out(f"| dense (same KD fine-tuning) | - | {r['parameters']:,} | - | - | {r['accuracy_converted']:.4f} | "
                f"{r['accuracy_finetuned']:.4f} |" + (" 1.0000 | - |" if text else "") + " - | 1.00x |")
            continue
        cos = f" {r['cosine_converted']:.4f} | {r['cosine_finetuned']:.4f} |" if text else ""
        out(f"| {r['structure']} | {r['m']} | {r['parameters']:,} ({r['clos_budget']:,}) | {r['mean_error']:.4f} | "
            f"{r['worst_error']:.4f} | {r['accuracy_converted']:.4f} | {r['accuracy_finetuned']:.4f} |{cos} "
            f"{r['fit_seconds']:.1f} | " + (f"{r['speed_vs_dense']:.2f}x |" if r["speed_vs_dense"] else
                                            "chose " + ", ".join(f"{k} {v}" for k, v in Counter(r["chosen"]).items())
                                            + " |"))
    starts = [row for m in args.multipliers
              for row in compare_starts(opened, args.checkpoint, names[0], m, args.calibration_examples,
                                        args.fit_sweeps, args.als_iterations)]
    out(f"\nClos fit of {names[0]} from two starts ({args.als_iterations} ALS iterations, at most {args.fit_sweeps} "
        "data-aware sweeps), beside low-rank's closed form on the same rows; the last column is the first sweep whose "
        "map (before the biases) is below low-rank's held-out error, and the seconds from the start of the fit to its "
        "end:\n\n| m | start | weight error after ALS | ALS s | held-out output error | total s | low-rank error "
        "(s) | Clos below low-rank after |")
    out("|---|---|---|---|---|---|---|---|")
    for r in starts:
        below = "never" if r["sweeps_to_lowrank"] is None else \
            f"{r['sweeps_to_lowrank']} sweeps ({r['seconds_to_lowrank']:.1f} s)"
        out(f"| {r['m']} | {r['start']} | {r['weight_error_after_als']:.4f} | {r['als_seconds']:.1f} | "
            f"{r['heldout_output_error']:.4f} | {r['total_seconds']:.1f} | {r['lowrank_error']:.4f} "
            f"({r['lowrank_seconds']:.1f}) | {below} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "starts": starts}, indent=2))
    out.finish(args.write_results)


if __name__ == "__main__":
    main()
