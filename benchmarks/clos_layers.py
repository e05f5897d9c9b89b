"""Clos against low-rank and Monarch layer type by layer type, at clos-convert's default fit budget.

    python -m benchmarks.clos_layers [--checkpoint models_saved/text/tweet_bert.pth] [--block 5]
                                     [--multipliers 4 2] [--calibration-examples 4096] [--write-results]

For each linear layer of one transformer block (`--block`) of a BERT text classifier (query, key,
value, attention output, FFN in, FFN out; results/clos_layers.md) or a ViT (qkv, proj, fc1, fc2;
results/clos_layers_vit.md) and each budget (the parameters of the Clos layer at m), fits
every structure as `clos-convert` does by default, on the layer's inputs from `--calibration-examples`
training examples (targets: the layer's outputs), and prints the relative output error on the
validation examples' tokens (held out) and the seconds of the fit (weight-space start and the
statistics of the rows included: every structure computes its own, as a conversion to that one
structure does):

- clos: the grouped-SVD start and 10 ALS iterations, then least-squares sweeps until the held-out
  error stops falling (at most 100);
- clos, gradient fit: the fit before it (50 ALS iterations from a random start, then 1,000 Adam
  steps and an exact last stage), the same start and budget as clos-convert used until 2026-12-07
  (its weight-space ALS runs in today's faster code, so its seconds are below what it took then);
- lowrank: reduced-rank regression (closed form);
- monarch: per-block SVD, then least-squares sweeps as Clos's;
- monarch, gradient fit: the fit before it (per-block SVD, then 1,000 Adam steps and an exact last
  stage), clos-convert's until 2026-12-07.

Then what the budget buys at the first multiplier: Clos's held-out error and seconds after 10, 30 and
100 sweeps (one fit run to 100 without stopping) beside the gradient fit after 100, 300 and 1,000
steps and low-rank's closed form, and the Clos fit stopped at twice low-rank's time (the issue's
target: at most 2x low-rank's time at no more error than the gradient fit). One seed; the
checkpoint is `benchmarks.text_students`' teacher (`tweet_bert.yaml`).
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.results import Results, add_results_flag
from distillation_lab.clos_convert import fit_structure, layer_examples
from pruning_lab.clos.fit import LayerData, fit_clos, fit_clos_als, fit_to_dense
from pruning_lab.clos.structures import STRUCTURES, FitBudget
from pruning_lab.inference import open_checkpoint

# Per model family: the path of block N, and its layer types' paths inside the block.
FAMILIES = {"bert": ("encoder.layer.{}", {"query": "attention.self.query", "key": "attention.self.key",
                                          "value": "attention.self.value", "attention output": "attention.output.dense",
                                          "FFN in": "intermediate.dense", "FFN out": "output.dense"}),
            "vit": ("blocks.{}", {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"})}
LAYER_TYPES = {label: path for _, types in FAMILIES.values() for label, path in types.items()}


def block_of(model: torch.nn.Module, block: int) -> tuple[str, str, dict[str, str]]:
    """(family, the path of transformer block `block`, its layer types) for a BERT or ViT model."""
    names = [n for n, _ in model.named_modules()]
    for family, (pattern, types) in FAMILIES.items():
        found = [n for n in names if n.endswith(pattern.format(block))]
        if found:
            return family, found[0], types
    raise SystemExit(f"no BERT or ViT transformer block {block} in this model")
COLUMNS = ("clos", "clos, gradient fit", "lowrank", "monarch", "monarch, gradient fit")


def gradient_fit(dense: torch.nn.Module, m: int, examples, steps: int, structure: str = "clos") -> dict:
    """The fits before the least-squares ones (until 2026-12-07): Clos from 50 random-start ALS iterations, Monarch
    from its projection, then `steps` Adam steps and an exact last stage."""
    start = time.perf_counter()
    torch.manual_seed(0)
    layer = STRUCTURES[structure].make(dense, m)
    if structure == "clos":
        fit_to_dense(layer, dense, 50, "random")
    else:
        STRUCTURES[structure].fit_weights(layer, dense, FitBudget())
    x, y, x_val, y_val = examples
    result = fit_clos(layer, x, y, steps, x_val=x_val, y_val=y_val)
    return {"error": result["relative_error_heldout"], "seconds": time.perf_counter() - start}


def default_fit(dense: torch.nn.Module, structure: str, m: int, examples) -> dict:
    """`structure` fitted as clos-convert fits it by default (FitBudget's defaults, the start of --fit data)."""
    start = time.perf_counter()
    torch.manual_seed(0)
    _, result = fit_structure(dense, structure, m, LayerData(*examples), FitBudget(als_iterations=10))  # own statistics
    data = result["data_aware"]
    return {"error": data["relative_error_heldout"], "seconds": time.perf_counter() - start,
            "sweeps": data.get("sweeps"), "parameters": result["parameters"], "budget": result["clos_parameters"]}


def sweep_curve(dense: torch.nn.Module, m: int, examples, sweeps: int, accel: str = "line") -> list[tuple[float, float]]:
    """Clos's held-out error (the map before its biases) and seconds (weight-space start and statistics included)
    after each sweep 0..`sweeps`, from one fit that does not stop (`accel`: what follows each sweep)."""
    torch.manual_seed(0)
    layer = STRUCTURES["clos"].make(dense, m)
    began = time.perf_counter()
    fit_to_dense(layer, dense, 10, "svd")
    started = time.perf_counter() - began
    fit = fit_clos_als(layer, LayerData(*examples), sweeps, patience=sweeps + 1, accel=accel)
    return [(error, started + seconds) for error, seconds in zip(fit["heldout_by_sweep"], fit["seconds_by_sweep"])]


def within(curve: list[tuple[float, float]], seconds: float) -> str:
    """The curve's error after the last sweep done within `seconds`, with the sweeps and time."""
    done = [i for i, (_, t) in enumerate(curve) if t <= seconds]
    if not done:
        return f"(the start alone takes {curve[0][1]:.1f} s)"
    return f"{curve[done[-1]][0]:.4f} ({done[-1]} sweeps, {curve[done[-1]][1]:.1f} s)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="models_saved/text/tweet_bert.pth")
    parser.add_argument("--block", type=int, default=5, help="the transformer block whose layers are fitted")
    parser.add_argument("--multipliers", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--calibration-examples", type=int, default=4096, help="clos-convert's default")
    parser.add_argument("--layer-types", nargs="+", choices=list(LAYER_TYPES),
                        help="default: every type of the model's block (BERT: query ... FFN out; ViT: qkv proj fc1 fc2)")
    add_results_flag(parser)
    args = parser.parse_args(argv)
    opened = open_checkpoint(args.checkpoint, device="cpu")
    family, prefix, types = block_of(opened.model, args.block)
    args.layer_types = args.layer_types or list(types)
    if set(args.layer_types) - set(types):
        raise SystemExit(f"--layer-types: a {family} block has {', '.join(types)}")
    out = Results("clos_layers", argv, None if family == "bert" else f"clos_layers_{family}")
    out(f"{args.checkpoint}, block {args.block}; {args.calibration_examples} calibration examples; held-out: the "
        f"validation examples' tokens; error: relative output error ||f(x) - y|| / ||y||; seconds on "
        f"{torch.get_num_threads()} thread(s)\n")
    out("| layer | in -> out | m | parameters (dense -> Clos budget) | " + " | ".join(COLUMNS)
        + " | Clos sweeps | seconds: " + " / ".join(COLUMNS) + " |")
    out("|---" * (6 + len(COLUMNS)) + "|")
    budget_rows = []
    for label in args.layer_types:
        name = f"{prefix}.{types[label]}"
        dense = opened.model.get_submodule(name)
        examples = tuple(tensor for split in ("train", "val") for tensor in
                         layer_examples(opened.model, None, name, opened.loader(split), args.calibration_examples))
        first = None
        for m in args.multipliers:
            fits = {"clos": default_fit(dense, "clos", m, examples),
                    "clos, gradient fit": gradient_fit(dense, m, examples, 1000),
                    "lowrank": default_fit(dense, "lowrank", m, examples),
                    "monarch": default_fit(dense, "monarch", m, examples),
                    "monarch, gradient fit": gradient_fit(dense, m, examples, 1000, "monarch")}
            first = first or fits
            best = min(COLUMNS, key=lambda c: fits[c]["error"])
            errors = " | ".join((f"**{fits[c]['error']:.4f}**" if c == best else f"{fits[c]['error']:.4f}")
                                for c in COLUMNS)
            seconds = " / ".join(f"{fits[c]['seconds']:.1f}" for c in COLUMNS)
            out(f"| {label} | {dense.in_features} -> {dense.out_features} | {m} | "
                f"{dense.weight.numel() + dense.out_features:,} -> {fits['clos']['budget']:,} | {errors} | "
                f"{fits['clos']['sweeps']} | {seconds} |")
        m = args.multipliers[0]
        steps = {n: gradient_fit(dense, m, examples, n) for n in (100, 300)}
        steps[1000] = first["clos, gradient fit"]
        budget_rows.append((label, sweep_curve(dense, m, examples, 100),
                            {n: (r["error"], r["seconds"]) for n, r in steps.items()}, first["lowrank"]))
    out(f"\nWhat the fit budget buys (m = {args.multipliers[0]}; held-out error (seconds); the sweeps' errors are the "
        "map's before its biases and last exact stage, which lower it slightly; the last column: the Clos fit "
        "stopped at twice low-rank's time):\n")
    out("| layer | 10 sweeps | 30 sweeps | 100 sweeps | 100 Adam steps | 300 steps | 1,000 steps | lowrank | "
        "Clos in 2x low-rank's time |")
    out("|---|---|---|---|---|---|---|---|---|")
    for label, curve, steps, lowrank in budget_rows:
        out(f"| {label} | " + " | ".join(f"{curve[s][0]:.4f} ({curve[s][1]:.1f} s)" for s in (10, 30, 100)) + " | "
            + " | ".join(f"{steps[s][0]:.4f} ({steps[s][1]:.1f} s)" for s in (100, 300, 1000))
            + f" | {lowrank['error']:.4f} ({lowrank['seconds']:.1f} s) | {within(curve, 2 * lowrank['seconds'])} |")
    out.finish(args.write_results)


if __name__ == "__main__":
    main()
