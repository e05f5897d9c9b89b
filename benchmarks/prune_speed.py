"""Does pruning make the full-size models faster? Forward latency before and after pruning.

    python -m benchmarks.prune_speed [--device cpu|cuda] [--models resnet18 vit_tiny] [--repeats 20]

For the CIFAR-10 ResNet-18 and ViT-Tiny at their full widths (32x32 inputs), prints parameters,
MACs and the median forward latency at batch 1 and batch 256 of: the dense model, structured pruning
to 2x and 4x fewer MACs (channels in multiples of 8; for the ViT: MLP hidden units and whole heads),
and unstructured pruning of 50% and 90% of the weights. Latency does not depend on the weights'
values except through the zeros, so the models are randomly initialised (no dataset needed). Runs
are interleaved (every model once per round) so that a slower moment of the machine hits them all.
On CUDA: bf16 autocast and channels_last, as the training loop uses them.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from benchmarks.results import Results, add_results_flag
from pruning_lab.inference import count_flops, count_parameters
from pruning_lab.models import create_model
from pruning_lab.prune import prune_structured, prune_unstructured, ratio_for_target


def variants(name: str, device: str) -> dict[str, torch.nn.Module]:
    """The dense model and its pruned versions."""
    torch.manual_seed(0)
    dense = create_model(name, 10, 3, 32).eval()
    x = torch.randn(2, 3, 32, 32)
    macs = lambda m: count_flops(m, (3, 32, 32)) // 2  # noqa: E731
    models = {"dense": dense}
    for factor in (2, 4):
        ratio = ratio_for_target(dense, macs, macs(dense) // factor, x, round_to=8)
        models[f"structured, {factor}x fewer MACs"] = prune_structured(copy.deepcopy(dense), ratio, x, "l2", 8)
    for amount in (0.5, 0.9):
        sparse = copy.deepcopy(dense)
        prune_unstructured(sparse, amount)
        models[f"unstructured, {amount:.0%} zeros"] = sparse
    return {k: m.to(device).eval() for k, m in models.items()}


@torch.no_grad()
def latencies(models: dict, batch: int, device: str, repeats: int) -> dict[str, float]:
    """Median milliseconds per forward, interleaved over the models."""
    x = torch.randn(batch, 3, 32, 32, device=device)
    cuda = device == "cuda"
    if cuda:
        x = x.to(memory_format=torch.channels_last)
    times: dict[str, list] = {k: [] for k in models}
    for i in range(repeats + 3):
        for name, model in models.items():
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast("cuda", torch.bfloat16, enabled=cuda):
                model(x)
            if cuda:
                torch.cuda.synchronize()
            if i >= 3:
                times[name].append((time.perf_counter() - start) * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--models", nargs="+", default=["resnet18", "vit_tiny"])
    parser.add_argument("--repeats", type=int, default=20)
    add_results_flag(parser)
    args = parser.parse_args(argv)
    out = Results("prune_speed", argv)
    out(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    out("| model | variant | parameters | MACs | batch 1 ms | speed-up | batch 256 ms | speed-up |")
    out("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        models = variants(name, args.device)
        if args.device == "cuda":
            for m in models.values():
                m.to(memory_format=torch.channels_last)
        one = latencies(models, 1, args.device, args.repeats)
        many = latencies(models, 256, args.device, max(3, args.repeats // 4))
        for variant, model in models.items():
            out(f"| {name} | {variant} | {count_parameters(model):,} | {count_flops(model.cpu().float(), (3, 32, 32)) // 2:,} "
                f"| {one[variant]:.2f} | {one['dense'] / one[variant]:.2f}x | {many[variant]:.1f} | "
                f"{many['dense'] / many[variant]:.2f}x |")
    out.finish(args.write_results)


if __name__ == "__main__":
    main()
