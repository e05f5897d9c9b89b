"""`--structure auto` and `--budget` against every single structure at equal parameters, on one model's layers.

    python -m benchmarks.clos_auto [--checkpoint models_saved/text/tweet_bert.pth]
                                   [--layers LAYERS] [--multiplier 4] [--write-results]

Runs `clos-convert` (its default fit, no fine-tuning) on the matching linear layers with each of
`--structure clos`, `lowrank`, `monarch` and `auto` at `--multiplier`, then `--budget` at the share of
the layers' dense parameters that the Clos layers at that multiplier hold (per layer any structure
at any multiplier, or the layer kept dense). Prints per run the converted layers' parameters, the
mean and worst held-out relative output error over the layers, the structures chosen, the test
accuracy after conversion (for text also the sentence-embedding cosine to the original) and the
seconds. One seed; the settings are clos-convert's defaults.
"""
from __future__ import annotations

import argparse
import time
from collections import Counter

from benchmarks.results import Results, add_results_flag
from distillation_lab.clos_convert import ClosConvertOptions, clos_convert
from pruning_lab.checkpoint import build_model, load_checkpoint
from pruning_lab.clos.structures import DEFAULT_FIT_SWEEPS, STRUCTURES, clos_for
from pruning_lab.clos.surgery import matching_linears
from pruning_lab.inference import count_parameters


def clos_share(checkpoint: str, layers: str, multiplier: int) -> float:
    """The Clos layers' parameters at `multiplier` over the dense layers' parameters, for the matching layers."""
    model = build_model(load_checkpoint(checkpoint), source=checkpoint)
    dense = [model.get_submodule(n) for n in matching_linears(model, layers)]
    return sum(count_parameters(clos_for(d, multiplier)) for d in dense) / sum(count_parameters(d) for d in dense)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="models_saved/text/tweet_bert.pth")
    parser.add_argument("--layers", default="hf.bert.encoder.layer.5.attention.output.dense,"
                        "hf.bert.encoder.layer.5.intermediate.dense",
                        help="default: a layer where Clos fits best and one where low-rank does (benchmarks.clos_layers)")
    parser.add_argument("--multiplier", type=int, default=4)
    parser.add_argument("--calibration-examples", type=int, default=4096, help="clos-convert's default")
    parser.add_argument("--fit-sweeps", type=int, default=DEFAULT_FIT_SWEEPS, help="clos-convert's default")
    add_results_flag(parser)
    args = parser.parse_args(argv)
    out = Results("clos_auto", argv)
    share = clos_share(args.checkpoint, args.layers, args.multiplier)
    runs = [(s, {"structure": s}) for s in (*STRUCTURES, "auto")]
    runs.append((f"--budget {share:.4f}", {"structure": "auto", "budget": round(share, 4)}))
    rows = []
    for label, extra in runs:
        start = time.perf_counter()
        summary = clos_convert(ClosConvertOptions(checkpoint=args.checkpoint, layers=args.layers,
                                                  multiplier=None if "budget" in extra else args.multiplier,
                                                  overwrite=True,
                                                  calibration_examples=args.calibration_examples,
                                                  fit_sweeps=None if label == "lowrank" else args.fit_sweeps,
                                                  **extra))
        converted = [layer for layer in summary["layers"] if layer.get("structure") != "dense"]
        errors = [layer["data_aware"]["relative_error_heldout"] if "data_aware" in layer else 0.0
                  for layer in summary["layers"]]
        chosen = Counter(f"{layer['structure']}" + (f" m={layer['multiplier']}" if "budget" in extra and
                                                    layer["structure"] != "dense" else "")
                         for layer in summary["layers"])
        rows.append({"run": label, "parameters": sum(layer["parameters"] for layer in summary["layers"]),
                     "dense": sum(layer["dense_parameters"] for layer in summary["layers"]),
                     "mean": sum(errors) / len(errors), "worst": max(errors), "converted": len(converted),
                     "chosen": ", ".join(f"{k} x{v}" for k, v in sorted(chosen.items())),
                     "accuracy": summary["test_accuracy_after"], "before": summary["test_accuracy_before"],
                     "cosine": summary.get("embedding_cosine_after"), "seconds": time.perf_counter() - start})
    first = rows[0]
    out(f"{args.checkpoint}, layers {args.layers}: {first['dense']:,} dense parameters; test accuracy before "
        f"{first['before']:.4f}; Clos m = {args.multiplier} holds {share:.1%} of them\n")
    text = first["cosine"] is not None
    out("| run | parameters | held-out error, mean | worst | structures | test accuracy |"
        + (" embedding cosine |" if text else "") + " seconds |")
    out("|---" * (7 + text) + "|")
    for r in rows:
        out(f"| {r['run']} | {r['parameters']:,} | {r['mean']:.4f} | {r['worst']:.4f} | {r['chosen']} | "
            f"{r['accuracy']:.4f} |" + (f" {r['cosine']:.4f} |" if text else "") + f" {r['seconds']:.0f} |")
    out.finish(args.write_results)


if __name__ == "__main__":
    main()
