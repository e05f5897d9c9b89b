"""Does the discrete key-value bottleneck forget less? Class-incremental learning on the embedded digits.

    python -m benchmarks.kvb_continual [--seeds 0 1 2] [--lr 1e-3] [--out-dir models_saved/kvb_continual]

An encoder (ResNet-8 at width 8) is trained once on 1,000 labelled training images (all classes).
It is then frozen, and a new head learns the classes in order, two at a time (0-1, 2-3, ..., 8-9),
seeing only the current pair's training images in each step (3 epochs, Adam 1e-3, batch 32, the
one training loop): either a linear head, or the bottleneck (16 codebooks of 64 keys over the
encoder's 64 outputs; keys fitted to the encoder's outputs on all training images, unlabelled,
then frozen). After each step: test accuracy on all the classes seen so far. Settings fixed before
running; three seeds (head initialisation, key initialisation, data order).
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn as nn

from benchmarks.results import Results, add_results_flag
from distillation_lab.main import main
from distillation_lab.runs import run_training
from pruning_lab.checkpoint import build_model, load_checkpoint
from pruning_lab.config import make_config
from pruning_lab.data import BatchLoader, load_splits
from pruning_lab.data.datasets import Split
from pruning_lab.inference import evaluate
from pruning_lab.models.bottleneck import add_bottleneck, freeze_all_but, init_keys
from pruning_lab.train.loop import RunParts

PAIRS = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]


def of_classes(split: Split, classes: tuple) -> Split:
    """The examples of `split` whose label is one of `classes`."""
    keep = torch.isin(split.labels, torch.tensor(classes))
    return Split(split.inputs[keep], split.labels[keep])


def head_model(encoder: Path, kind: str, train: Split, spec, seed: int) -> nn.Module:
    """The frozen encoder with a fresh linear head, or with a bottleneck whose keys are fitted."""
    torch.manual_seed(seed)
    model = build_model(load_checkpoint(encoder))
    if kind == "linear":
        model.fc = nn.Linear(model.fc.in_features, model.fc.out_features)
        freeze_all_but(model, "fc")
    else:
        add_bottleneck(model, {"codebooks": 16, "keys": 64})
        init_keys(model, BatchLoader(train, spec, 256))
    return model


def learn_in_order(model: nn.Module, kind: str, splits: dict, spec, seed: int, out: Path, lr: float) -> list[float]:
    """Train the head pair by pair through the one loop; accuracy on all seen classes after each pair."""
    seen, accuracies = (), []
    for step, pair in enumerate(PAIRS):
        seen += pair
        cfg = make_config({"name": f"{kind}_seed{seed}_step{step}", "out_dir": str(out), "epochs": 3,
                           "batch_size": 32, "optimizer": "adam", "lr": lr, "weight_decay": 0.0,
                           "scheduler": "constant", "dataset": "custom", "model": model.arch["name"],
                           "model_args": model.arch["kwargs"], "seed": seed, "device": "cpu", "progress": False,
                           "overwrite": True}, "kvb_continual")
        train = BatchLoader(of_classes(splits["train"], pair), spec, cfg.batch_size, train=True, augment=False,
                            seed=seed + step)
        run_training(cfg, RunParts(model, train, {}, None, {"dataset": "mnist_embedded"}, torch.device("cpu")))
        accuracies.append(evaluate(model, BatchLoader(of_classes(splits["test"], seen), spec, 256))["acc"])
    return accuracies


def main_(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the heads")
    parser.add_argument("--out-dir", default="models_saved/kvb_continual")
    add_results_flag(parser)
    args = parser.parse_args(argv)
    out_ = Results("kvb_continual", argv)
    out = Path(args.out_dir)
    encoder = out / "encoder.pth"
    if main(["train-teacher", "--model", "resnet8", "--model-args", "{width: 8}", "--dataset", "mnist_embedded",
             "--train-subset", "1000", "--epochs", "15", "--optimizer", "sgd", "--lr", "0.05", "--scheduler", "cosine",
             "--batch-size", "64", "--out-dir", str(out), "--name", "encoder", "--resume", "--no-progress"]) != 0:
        raise SystemExit("training the encoder failed")
    spec, train, val, test = load_splits("mnist_embedded", "data", None)
    splits = {"train": train, "test": test}
    results = {kind: [learn_in_order(head_model(encoder, kind, train, spec, seed), kind, splits, spec, seed, out,
                                     args.lr)
                      for seed in args.seeds] for kind in ("linear", "bottleneck")}
    out_(f"\nheads trained with Adam at lr {args.lr}; encoder test accuracy {load_checkpoint(encoder)['test']['acc']:.4f}; test accuracy on all classes "
         f"seen so far, mean ± std over seeds {args.seeds}:\n")
    out_("| head | " + " | ".join(f"after {a}-{b}" for a, b in PAIRS) + " |")
    out_("|---|" + "---|" * len(PAIRS))
    for kind, runs in results.items():
        cells = [f"{statistics.fmean(col):.4f} ± {statistics.stdev(col) if len(col) > 1 else 0:.4f}"
                 for col in zip(*runs)]
        out_(f"| {kind} | " + " | ".join(cells) + " |")
    diffs = [b[-1] - a[-1] for a, b in zip(results["linear"], results["bottleneck"])]
    out_(f"\nafter the last pair, bottleneck minus linear, paired by seed: {statistics.fmean(diffs) * 100:+.2f} ± "
         f"{statistics.stdev(diffs) * 100 if len(diffs) > 1 else 0:.2f} points ({sum(d > 0 for d in diffs)}/{len(diffs)} seeds)")
    out_.finish(args.write_results)


if __name__ == "__main__":
    main_()
