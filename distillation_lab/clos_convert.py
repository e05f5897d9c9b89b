"""clos-convert: replace a trained model's linear layers by Clos layers fitted to them, then
optionally fine-tune the converted model with knowledge distillation from the original."""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from pruning_lab.clos.fit import ACCELERATIONS, LayerData
from pruning_lab.clos.structures import DEFAULT_FIT_SWEEPS, STRUCTURES, FitBudget, clos_for
from pruning_lab.clos.surgery import matching_linears
from pruning_lab.surgery import record_surgery, replace_module
from pruning_lab.checkpoint import build_model, load_checkpoint, save_derived
from pruning_lab.config import DEVICES, POSITIVE, REQUIRED, check_dataclass, from_dict, minimum, option
from pruning_lab.inference import count_parameters, evaluate, open_checkpoint
from pruning_lab.errors import UserError
from pruning_lab.models.bert import PAD_ID
from pruning_lab.train.run_folder import writing_outputs

from .clos_budget import DENSE, allocate, budget_structures, multipliers
from .runs import check_finetuning, check_finetuning_options, finetune_config, run_training


class _Captured(Exception):
    """Raised by the capture hooks to stop the forward pass once every wanted layer has been seen."""


def _rows(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A layer's activations flattened to [rows, features]; for text without the padding tokens' rows, which are
    not part of any sentence."""
    if x.dtype == torch.long and h.shape[:2] == x.shape:  # token ids [B, L] -> activations [B, L, H]
        h = h[x != PAD_ID]
    return h.reshape(-1, h.shape[-1]).float()


@torch.no_grad()
def capture(model: nn.Module, layers: list[str], loader, limit: int, outputs: bool = False,
            memory: Optional[int] = None) -> dict[str, torch.Tensor]:
    """The inputs (or outputs) of `layers` on up to `limit` examples, each [rows, features], in one forward pass
    that stops once the last of them is seen. Where all of them would take more than `memory` bytes (judged on the
    first batch), only the first ones that fit are kept (at least one)."""
    kept, batch = list(layers), {}
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in layers}

    def keeper(name: str):
        def keep(module, inputs, output=None) -> None:
            h = output if outputs else inputs[0]
            if name in kept and name not in batch["seen"]:
                # q, k and v receive one tensor: its rows are made once (h is held, so that its id is not reused)
                if id(h) not in batch["by_id"]:
                    batch["by_id"][id(h)] = (h, _rows(h, batch["x"]))
                rows[name].append(batch["by_id"][id(h)][1])
                batch["seen"].add(name)
            if batch["seen"] >= set(kept):
                raise _Captured  # the rest of the forward pass is not needed
        return keep

    hooks = [model.get_submodule(name).register_forward_hook(keeper(name)) if outputs else
             model.get_submodule(name).register_forward_pre_hook(keeper(name)) for name in layers]
    seen = 0
    model.eval()
    try:
        for x, _ in loader:
            batch.update(x=x, seen=set(), by_id={})
            try:
                model(x)
            except _Captured:
                pass
            if seen == 0 and memory is not None:  # keep the first layers whose projected rows fit
                batches = min(math.ceil(limit / len(x)), len(loader) if hasattr(loader, "__len__") else math.inf)
                projected = [rows[name][0].numel() * 4 * batches if rows[name] else 0 for name in kept]
                kept[:] = kept[:max(1, sum(1 for total in itertools.accumulate(projected) if total <= memory))]
            seen += len(x)
            if seen >= limit:
                break
    finally:
        for hook in hooks:
            hook.remove()
    missing = [name for name in kept if not rows[name]]
    if missing:
        raise UserError(f"layer {missing[0]} is never called in the model's forward pass: leave it out of --layers")
    joined: dict[int, torch.Tensor] = {}  # layers that shared their input share its rows
    return {name: joined.setdefault(id(rows[name][0]), torch.cat(rows[name])) for name in kept}


@torch.no_grad()
def independent_runs(model: nn.Module, names: list[str], loader) -> dict[str, list[str]]:
    """For each layer, it and the layers after it whose inputs depend on none of the layers from it to them
    (q, k and v of one attention block): their inputs can be captured in one pass before the first of them is
    converted. Found by adding noise to each layer's output on two examples and seeing which inputs move."""
    x, y = next(iter(loader))
    probe = [(x[:2], y[:2])]
    base = capture(model, names, probe, 2)
    noise = torch.Generator(device=x.device).manual_seed(0)  # the global generator is left as it was
    depends: dict[str, set[str]] = {}
    for i, name in enumerate(names[:-1]):
        shift = lambda module, inputs, out: out + torch.randn(out.shape, generator=noise, device=out.device,  # noqa: E731
                                                               dtype=out.dtype)
        hook = model.get_submodule(name).register_forward_hook(shift)
        try:
            moved = capture(model, names[i + 1:], probe, 2)
        finally:
            hook.remove()
        depends[name] = {later for later, h in moved.items() if not torch.allclose(h, base[later], rtol=1e-4, atol=1e-5)}
    runs = {}
    for i, name in enumerate(names):
        run = [name]
        for later in names[i + 1:]:
            if any(later in depends[earlier] for earlier in run):
                break
            run.append(later)
        runs[name] = run
    return runs


class LayerExamples:
    """(inputs, targets) to fit a replacement of each of `names`, in order, on one split: the inputs the layer
    receives in `model` (whose earlier layers may already be converted) and, as targets, the original model's
    outputs of that layer on the same examples, so that the fit also undoes the error of the layers converted
    before it (with `original=None`, the layer's own outputs on those inputs).

    Each forward pass captures as many layers as memory allows: the original's outputs of the layers that follow,
    and the model's inputs of the layers that do not depend on each other (`independent_runs`)."""

    def __init__(self, model: nn.Module, original: Optional[nn.Module], names: list[str], loader, limit: int,
                 memory: Optional[int] = None) -> None:
        self.model, self.original, self.names, self.loader, self.limit = model, original, names, loader, limit
        self.memory = memory if memory is not None else capture_memory(next(model.parameters()).device)
        self.runs = independent_runs(model, names, loader) if len(names) > 1 else {names[0]: names}
        self.inputs: dict[str, torch.Tensor] = {}
        self.targets: dict[str, torch.Tensor] = {}

    @torch.no_grad()  # the targets are data: no graph through the dense layer
    def __call__(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's (inputs, targets); each is captured once and handed out once."""
        if name not in self.inputs:
            self.inputs.update(capture(self.model, self.runs[name], self.loader, self.limit, memory=self.memory))
        x = self.inputs.pop(name)
        if self.original is None:
            return x, self.model.get_submodule(name)(x)
        if name not in self.targets:
            later = self.names[self.names.index(name):]
            self.targets.update(capture(self.original, later, self.loader, self.limit, outputs=True,
                                        memory=self.memory))
        return x, self.targets.pop(name)


def capture_memory(device: torch.device) -> int | None:
    """Bytes one capture may hold: a quarter of what `device` has free (the model's inputs and the original's
    outputs are held at once, and the fit needs room too)."""
    free = available_memory(device)
    return None if free is None else free // 4


def layer_examples(model: nn.Module, original: Optional[nn.Module], layer: str, loader,
                   limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of one layer (`LayerExamples` of that layer alone)."""
    return LayerExamples(model, original, [layer], loader, limit)(layer)


@torch.no_grad()
def embedding_cosine(model: nn.Module, original: nn.Module, loader) -> float:
    """Mean cosine similarity of the two models' sentence embeddings over `loader` (text models)."""
    model.eval()
    original.eval()
    sims = [F.cosine_similarity(model.sentence_embedding(x), original.sentence_embedding(x), dim=1)
            for x, _ in loader]
    return float(torch.cat(sims).mean())


AUTO = "auto"  # --structure auto: per layer, the registered structure with the lowest held-out error


def make_structure(structure: str, dense: nn.Linear, multiplier: int) -> nn.Module:
    """An untrained `structure` layer for `dense` at the parameters of the Clos layer at `multiplier` (auto: the
    Clos layer, whose parameters every candidate has)."""
    return STRUCTURES["clos" if structure == AUTO else structure].make(dense, multiplier)


def planned_layer(structure: str, dense: nn.Linear, multiplier: int) -> nn.Module:
    """The new layer for `dense` on the meta device: its shapes and parameter count without allocating any memory."""
    with torch.device("meta"):
        return make_structure(structure, dense, multiplier)


def planned_layers(model: nn.Module, names: list[str], multiplier: int, structure: str) -> dict[str, nn.Module]:
    """The new layer for each name, on the meta device."""
    return {name: planned_layer(structure, model.get_submodule(name), multiplier) for name in names}


def check_saves_parameters(model: nn.Module, names: list[str], multiplier: int, structure: str = "clos") -> None:
    """Refuse before any fitting where a new layer would not be smaller than the dense layer it replaces."""
    for name, layer in planned_layers(model, names, multiplier, structure).items():
        dense = model.get_submodule(name)
        if count_parameters(layer) >= count_parameters(dense):
            what = f"a Clos layer at m={multiplier}" if structure == "clos" else \
                f"a {structure} layer the size of Clos m={multiplier}"
            raise UserError(f"{name} ({dense.in_features} -> {dense.out_features}) as {what} would have {count_parameters(layer):,} parameters, not "
                            f"fewer than the dense layer's {count_parameters(dense):,}: choose a smaller --multiplier, "
                            "leave the layer out of --layers, or add --allow-more-parameters")


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device` (the kernel's MemAvailable on CPU); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def check_fits_in_memory(model: nn.Module, names: list[str], multiplier: int, structure: str,
                         device: torch.device) -> None:
    """Refuse a conversion whose fitting cannot fit in memory, before allocating anything (a layer of billions of
    parameters would otherwise end in the kernel's out-of-memory kill, without a word)."""
    free = available_memory(device)
    for name, layer in planned_layers(model, names, multiplier, structure).items():
        # At least the weights, their gradients and Adam's two moments, in fp32; activations come on top.
        needed = 16 * count_parameters(layer)
        if free is not None and needed > free:
            raise UserError(f"{name} as a {structure} layer at m={multiplier} has {count_parameters(layer):,} parameters: "
                            f"fitting it needs at least {needed / 2**30:,.1f} GiB, and {device.type} has "
                            f"{free / 2**30:,.1f} GiB free; choose a smaller --multiplier")


def convert_layer(model: nn.Module, name: str, multiplier: int, fit: str, calibration, held_out,
                  budget: FitBudget = FitBudget(), structure: str = "clos") -> dict:
    """Fit a Clos (or low-rank, or Monarch) layer to one linear layer (weight-space, then data-aware)
    and put it in its place; `auto`: fit each structure at the Clos layer's parameters and keep the one
    with the lowest held-out error.

    `calibration(name)` and `held_out(name)` give (inputs, targets) of the layer (`LayerExamples`)."""
    dense = model.get_submodule(name)
    data = LayerData(*calibration(name), *held_out(name)) if fit == "data" else None  # once, for every candidate
    fitted = {kind: fit_structure(dense, kind, multiplier, data, budget)
              for kind in (STRUCTURES if structure == AUTO else [structure])}
    chosen = min(fitted, key=lambda k: fitted[k][1]["data_aware"]["relative_error_heldout"]) \
        if structure == AUTO else structure
    layer, result = fitted[chosen]
    if structure == AUTO:
        result["candidates"] = {k: r["data_aware"]["relative_error_heldout"] for k, (_, r) in fitted.items()}
    replace_module(model, name, layer)
    record_surgery(model, {"kind": chosen, "layer": name, "config": layer.config()})
    return {"layer": name, **result}


def convert_within_budget(model: nn.Module, original: nn.Module, names: list[str], opened, o) -> list[dict]:
    """--budget: every candidate of every layer fitted on the original model's inputs, the greedy choice within
    the budget put in place (or the layer kept dense); one summary per layer with every candidate's error."""
    structures = budget_structures(o.structure)
    count = lambda s, dense, m: count_parameters(planned_layer(s, dense, m))  # noqa: E731
    budget = int(o.budget * sum(count_parameters(model.get_submodule(name)) for name in names))
    plans = {name: [(kind, m) for m in multipliers(model.get_submodule(name), count, structures) for kind in structures]
             for name in names}
    # Refused before any fitting where even the smallest candidates do not fit (their errors do not matter here).
    allocate({name: [{"parameters": count(k, model.get_submodule(name), m), "error": 0.0} for k, m in plan]
                     + [{"parameters": count_parameters(model.get_submodule(name)), "error": 0.0}]
              for name, plan in plans.items()}, budget)
    options = {}
    examples = [LayerExamples(original, None, names, opened.loader(split), o.calibration_examples)
                for split in ("train", "val")]
    for name in tqdm(names, desc="fitting candidates", unit="layer", disable=None):
        dense = model.get_submodule(name)
        data = LayerData(*examples[0](name), *examples[1](name))
        options[name] = [{"structure": DENSE, "multiplier": None, "parameters": count_parameters(dense), "error": 0.0}]
        for kind, m in plans[name]:
            layer, result = fit_structure(dense, kind, m, data, o.fit_budget())
            options[name].append({"structure": kind, "multiplier": m, "parameters": result["parameters"],
                                  "error": result["data_aware"]["relative_error_heldout"], "layer": layer,
                                  "result": result})
    layers = []
    for name, chosen in allocate(options, budget).items():
        candidates = {(f"{c['structure']} m={c['multiplier']}" if c["multiplier"] else DENSE): c["error"]
                      for c in options[name]}
        dense = model.get_submodule(name)
        if chosen["structure"] == DENSE:
            layers.append({"layer": name, "structure": DENSE, "dense_parameters": count_parameters(dense),
                           "parameters": count_parameters(dense), "candidates": candidates})
            continue
        replace_module(model, name, chosen["layer"])
        record_surgery(model, {"kind": chosen["structure"], "layer": name, "config": chosen["layer"].config()})
        layers.append({"layer": name, **chosen["result"], "multiplier": chosen["multiplier"], "candidates": candidates})
    return layers


def fit_structure(dense: nn.Linear, structure: str, multiplier: int, data: Optional[LayerData],
                  budget: FitBudget = FitBudget()) -> tuple[nn.Module, dict]:
    """One structure fitted to `dense` (weight space, then on the layer's calibration `data` if given)."""
    kind = STRUCTURES[structure]
    layer = kind.make(dense, multiplier).to(dense.weight.device)
    result = {"structure": structure, "dense_parameters": count_parameters(dense), "parameters": count_parameters(layer),
              "clos_parameters": count_parameters(clos_for(dense, multiplier))}
    result["weight_space"] = kind.fit_weights(layer, dense, budget)
    if data is not None:
        result["data_aware"] = kind.fit_data(layer, data, budget)
    return layer, result


DEFAULT_MULTIPLIER = 4  # --multiplier when neither it nor --budget is given


@dataclass
class ClosConvertOptions:
    """What `clos-convert` does: which layers, the Clos size, the fit budget, and the KD fine-tuning."""

    checkpoint: str = option(REQUIRED, "the trained model (.pth)")
    layers: str = option(REQUIRED, "e.g. fc1 (MLP), 'vit.blocks.*.attn.qkv,vit.blocks.*.mlp.fc*' (ViT) or "
                         "'*.attention.*' (BERT)")
    multiplier: Optional[int] = option(None, "Clos's middle-stage multiplier m (b2 = m * bin); with --structure lowrank "
                                       "or monarch, the layer gets the parameters of this Clos layer", range=minimum(1),
                                       shown_default=str(DEFAULT_MULTIPLIER))
    structure: str = option("clos", "the compact layer: clos, lowrank (truncated SVD, then the closed-form fit to the "
                            "layer's outputs), monarch (per-block SVD, then least-squares sweeps as Clos), or auto: per layer each of them at the same parameters, keeping the one "
                            "with the lowest held-out error", lambda: (*STRUCTURES, AUTO))
    budget: Optional[float] = option(None, "instead of one multiplier for every layer: spend at most this share "
                                     "(0, 1) of the layers' dense parameters, per layer choosing the structure (of "
                                     "--structure; auto: any) and multiplier, or keeping it dense, where it lowers "
                                     "the summed held-out error most per parameter (greedy)",
                                     range=("in (0, 1) (at 1 every layer stays dense)", lambda v: 0 < v < 1),
                                     metavar="SHARE")
    als_start: Optional[str] = option(None, "Clos: start the weight-space ALS at random or at the closed-form grouped "
                                      "SVD (where b2 is a multiple of bout; else random)", ("random", "svd"),
                                      shown_default="svd")
    fit: str = option("data", "data-aware (after the weight-space fit) or weight-space only", ("data", "weights"))
    fit_sweeps: Optional[int] = option(None, "Clos and Monarch: at most this many sweeps of the data-aware fit "
                                       "(exact least squares stage by stage; it stops once 5 sweeps lower the held-out "
                                       "error by less than a thousandth of it)", range=minimum(1),
                                       shown_default=str(DEFAULT_FIT_SWEEPS))
    fit_accel: Optional[str] = option(None, "Clos and Monarch: after each sweep of the data-aware fit, a longer step "
                                      "along its change (line) or Anderson acceleration over the last 8 sweeps "
                                      "(anderson; the longer step where its point does not lower the error)",
                                      ACCELERATIONS, shown_default="line")
    als_iterations: Optional[int] = option(None, "iterations of Clos's weight-space ALS fit", range=minimum(1),
                                           shown_default="50 with --fit weights; 10 with --fit data, where it only "
                                           "starts the data-aware fit")
    calibration_examples: int = option(4096, "training examples (images or texts) whose layer inputs are fitted "
                                       "(--calibration-images and --calibration-texts are the same option)",
                                       range=minimum(1), aliases=("--calibration-images", "--calibration-texts"),
                                       metavar="N")
    finetune_epochs: int = option(0, "KD fine-tuning epochs with the original as teacher", range=minimum(0))
    finetune_lr: float = option(1e-3, "Adam learning rate of the KD fine-tuning (1e-3 for small models; about 1e-4 "
                                "for a pretrained BERT)", range=POSITIVE)
    # The fine-tuning loss: config keys loss / alpha / temperature / ..., whose flags are Config's.
    loss: dict = option({}, "the fine-tuning loss: Config's loss keys (loss, alpha, temperature, ...)")
    output: Optional[str] = option(None, "converted checkpoint path",
                                   shown_default="CHECKPOINT_STRUCTURE_mM.pth beside it")
    device: str = option("auto", "device", DEVICES)
    overwrite: bool = option(False, "replace an existing output checkpoint (and its _kd)")
    allow_more_parameters: bool = option(False, "convert layers whose Clos layer would have as many parameters as "
                                         "the dense one or more (tiny layers, smoke tests); refused otherwise")

    def __post_init__(self) -> None:
        check_dataclass(self)  # each value as its flag checks it: fit_sweeps=0 fails as --fit-sweeps 0

    def fit_budget(self) -> FitBudget:
        """The fit's iterations, start and sweeps, with the defaults that depend on --fit filled in."""
        return FitBudget(self.als_iterations or (50 if self.fit == "weights" else 10), self.als_start or "svd",
                         self.fit_sweeps or DEFAULT_FIT_SWEEPS, self.fit_accel or "line")

    def output_path(self) -> Path:
        """Where the converted checkpoint goes: --output, or CHECKPOINT_clos_mM.pth beside the original."""
        size = f"budget{self.budget:g}" if self.budget is not None else f"m{self.multiplier or DEFAULT_MULTIPLIER}"
        stem = Path(self.checkpoint).stem + f"_{self.structure}_{size}"
        return Path(self.output or Path(self.checkpoint).with_name(stem + ".pth"))


def clos_convert(options: ClosConvertOptions) -> dict:
    """Convert, evaluate, save (recording the surgery); optionally KD fine-tune; return the summary. Every
    check comes before the first file is written; a lock beside the output keeps a second identical run out."""
    o = options
    check_finetuning_options(o.finetune_epochs, {"the loss options": o.loss})
    if o.budget is not None and o.fit != "data":
        raise UserError("--budget chooses by the held-out error of the data-aware fit: leave out --fit weights")
    if o.structure == AUTO and o.fit != "data":
        raise UserError("--structure auto keeps, per layer, the structure with the lowest held-out error of the "
                        "data-aware fit: leave out --fit weights")
    if o.budget is not None and o.multiplier is not None:
        raise UserError(f"--multiplier {o.multiplier} sets one size for every layer; --budget chooses each layer's "
                        "structure and size: give one of them")
    o = dataclasses.replace(o, multiplier=o.multiplier or DEFAULT_MULTIPLIER)
    for flag, value in (("--fit-sweeps", o.fit_sweeps), ("--fit-accel", o.fit_accel)):
        if value is not None and o.fit != "data":
            raise UserError(f"{flag} {value} sets the sweeps of the data-aware fit; --fit weights has none: leave it out")
        if value is not None and o.structure == "lowrank":
            raise UserError(f"{flag} {value} sets the sweeps of Clos's and Monarch's data-aware fit; --structure "
                            "lowrank has none (its fit is closed-form): leave it out")
    if o.als_start is not None and o.structure not in ("clos", AUTO):
        raise UserError(f"--als-start {o.als_start} starts the Clos fit; --structure {o.structure} has its own start: "
                        "leave it out")
    out = o.output_path()
    outputs = [out, out.with_name(out.stem + "_kd.pth"), out.with_name(out.stem + "_kd_last.pth")]
    with writing_outputs(o.checkpoint, o.output, outputs, o.overwrite, "converted"):
        return convert_locked(o)


def convert_locked(o: ClosConvertOptions) -> dict:
    """clos-convert's work, its output locked."""
    out = o.output_path()
    opened = open_checkpoint(o.checkpoint, device=o.device)
    o = dataclasses.replace(o, device=str(opened.device))
    ckpt, model = opened.ckpt, opened.model
    names = matching_linears(model, o.layers)
    if not o.allow_more_parameters and o.budget is None:  # --budget keeps a layer dense rather than enlarge it
        check_saves_parameters(model, names, o.multiplier, o.structure)
    check_fits_in_memory(model, names, 1 if o.budget is not None else o.multiplier, o.structure, opened.device)
    tuned = None
    if o.finetune_epochs:
        tuned = finetune_config(from_dict(ckpt["config"], o.checkpoint), out, out.stem + "_kd", o.finetune_epochs,
                                o.finetune_lr, o.loss, o.checkpoint, ckpt["config"]["model"], o.overwrite, o.device)
        check_finetuning(tuned, ckpt.get("data", {}))
    original = build_model(ckpt, source=o.checkpoint).to(opened.device).eval()
    test_acc = lambda: evaluate(model, opened.loader("test"))["acc"]  # noqa: E731
    summary = {"checkpoint": o.checkpoint, "structure": o.structure, "multiplier": o.multiplier, "fit": o.fit,
               "fit_budget": dataclasses.asdict(o.fit_budget()),  # iterations, start, sweeps, acceleration
               "parameters_before": count_parameters(model), "test_accuracy_before": test_acc(), "layers": []}
    if o.budget is not None:
        summary.update(budget_share=o.budget, layers=convert_within_budget(model, original, names, opened, o))
    if o.budget is None:  # layer by layer: later layers see converted inputs
        train, val = (LayerExamples(model, original, names, opened.loader(split), o.calibration_examples)
                      for split in ("train", "val"))
        summary["layers"] = [convert_layer(model, name, o.multiplier, o.fit, train, val, o.fit_budget(), o.structure)
                             for name in tqdm(names, desc="converting", unit="layer", disable=None)]
    summary.update(parameters_after=count_parameters(model), test_accuracy_after=test_acc())
    summary["compression"] = summary["parameters_before"] / summary["parameters_after"]
    if hasattr(model, "sentence_embedding"):  # text: how close the converted encoder stays to the original
        summary["embedding_cosine_after"] = embedding_cosine(model, original, opened.loader("test"))
    save_derived(ckpt, model, out, {"clos": summary})
    summary["output"] = str(out)
    if tuned is not None:
        result = run_training(tuned)
        summary.update(finetuned_output=result["checkpoint"], test_accuracy_finetuned=result["test_acc"])
        if "embedding_cosine_after" in summary:
            tuned_model = build_model(load_checkpoint(result["checkpoint"]), source=result["checkpoint"])
            summary["embedding_cosine_finetuned"] = embedding_cosine(tuned_model.to(opened.device), original,
                                                                     opened.loader("test"))
    return summary
