"""prune: make a trained model smaller by structured pruning (channels, hidden units and heads
removed) or unstructured pruning (weights set to zero), in one step or several, each followed by
fine-tuning through the training loop, by default distilling from the unpruned model."""
from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch.nn as nn

from pruning_lab.checkpoint import save_derived
from pruning_lab.clos.structures import STRUCTURES
from pruning_lab.config import (DEVICES, FRACTION, POSITIVE, REQUIRED, check_dataclass, from_dict, make_config,
                                 minimum, option)
from pruning_lab.errors import UserError
from pruning_lab.inference import count_flops, count_parameters, evaluate, open_checkpoint
from pruning_lab.inference.checkpoint_eval import OpenedCheckpoint
from pruning_lab.inference.evaluate import example_input
from pruning_lab.models import create_model
from pruning_lab.prune import IMPORTANCES, prune_structured, prune_unstructured, ratio_for_target, shape_changes, sparsity
from pruning_lab.prune.structured import accumulate_gradients, check_structured
from pruning_lab.prune.unstructured import layer_sparsity
from pruning_lab.train.run_folder import writing_outputs

from .runs import check_finetuning, check_finetuning_options, finetune_config, run_training

METHODS = ("structured", "unstructured")


def parse_target(value: Optional[str], what: str) -> Optional[tuple[str, float]]:
    """'N' (at most N) or 'Fx' (F times fewer than now) -> ('count', N) or ('factor', F)."""
    if value is None:
        return None
    text = str(value).strip().lower().replace("_", "").replace(",", "")
    try:
        if text.endswith("x"):
            factor = float(text[:-1])
            if math.isfinite(factor) and factor > 1:
                return "factor", factor
        elif int(text) >= 1:
            return "count", int(text)
    except ValueError:
        pass
    raise UserError(f"--target-{what} must be {TARGET[0]}, got '{value}'")


def _is_target(value: str) -> bool:
    try:
        return parse_target(value, "") is not None
    except UserError:
        return False


TARGET = ("a count (e.g. 19226) or a reduction like 2x (more than 1x)", _is_target)


DEFAULT_ROUND_TO, DEFAULT_CALIBRATION = 8, 512  # --round-to, --calibration-examples when not given


@dataclass
class PruneOptions:
    """What `prune` does: the method and how much, the schedule, the fine-tuning and where it writes."""

    checkpoint: str = option(REQUIRED, "the trained model (.pth)")
    method: str = option("structured", "what is removed: channels, hidden units and heads (structured) or weights "
                         "(unstructured)", METHODS)
    importance: Optional[str] = option(None, "structured: how channels are ranked: weight magnitude (l1, l2), "
                                       "first-order Taylor on training batches, or batch-norm scale (ResNets)",
                                       IMPORTANCES, shown_default="l2")
    amount: Optional[float] = option(None, "fraction removed: of every layer's channels (structured) or of all "
                                     "weights (unstructured)", range=FRACTION)
    target_parameters: Optional[str] = option(None, "structured: prune until at most N parameters, or Fx fewer "
                                              "(e.g. 4x)", range=TARGET)
    target_macs: Optional[str] = option(None, "structured: prune until at most N MACs per example, or Fx fewer "
                                        "(e.g. 2x)", range=TARGET)
    steps: int = option(1, "gradual pruning: K steps, each removing the same share of what is left and followed by "
                        "fine-tuning", range=minimum(1))
    round_to: Optional[int] = option(None, "structured: channel counts become multiples of this (aligned widths run "
                                     "faster on GPUs; 1 for exact ratios on tiny models)", range=minimum(1),
                                     shown_default=str(DEFAULT_ROUND_TO))
    finetune_epochs: int = option(0, "fine-tuning epochs in all, spread over the steps", range=minimum(0))
    finetune_lr: float = option(1e-3, "Adam learning rate of the fine-tuning", range=POSITIVE)
    teacher_checkpoint: str = option("", "distil from this model while fine-tuning",
                                     shown_default="the unpruned checkpoint")
    no_kd: bool = option(False, "fine-tune on the labels alone (the baseline for the KD fine-tuning)")
    # The fine-tuning loss: config keys loss / alpha / temperature / ..., whose flags are Config's.
    loss: dict = option({}, "the fine-tuning loss: Config's loss keys (loss, alpha, temperature, ...)")
    calibration_examples: Optional[int] = option(None, "training examples whose gradients rank channels for "
                                                 "--importance taylor", range=minimum(1),
                                                 shown_default=str(DEFAULT_CALIBRATION))
    output: Optional[str] = option(None, "pruned checkpoint path", shown_default="CHECKPOINT_TAG.pth beside it: "
                                   "pruned50, pruned_p19226, pruned_macs2x, sparse70")
    device: str = option("auto", "device", DEVICES)
    overwrite: bool = option(False, "replace existing outputs")

    def __post_init__(self) -> None:
        check_dataclass(self)  # each value as its flag checks it: PruneOptions(round_to=0) fails as --round-to 0

    def tag(self) -> str:
        """What was asked, for the default file name: pruned50, pruned_p19226, pruned_macs2x, sparse70."""
        if self.amount is not None:
            return f"{'sparse' if self.method == 'unstructured' else 'pruned'}{round(self.amount * 100)}"
        what, value = ("p", self.target_parameters) if self.target_parameters else ("macs", self.target_macs)
        return f"pruned_{what}" + re.sub(r"[^0-9a-z.]", "", str(value).lower())

    def output_path(self) -> Path:
        """Where the pruned checkpoint goes: --output, or CHECKPOINT_TAG.pth beside the original."""
        return Path(self.output or Path(self.checkpoint).with_name(f"{Path(self.checkpoint).stem}_{self.tag()}.pth"))

    def finetuned_path(self) -> Path:
        """The fine-tuned checkpoint: OUTPUT_kd.pth (distilled) or OUTPUT_ft.pth (labels only)."""
        out = self.output_path()
        return out.with_name(out.stem + ("_ft" if self.no_kd else "_kd") + ".pth")

    def check(self) -> None:
        """Refuse a bad combination of options before any work, naming the option (each value alone is checked
        when the options are made)."""
        check_dataclass(self)  # again: a field may have been changed since
        given = [k for k in ("amount", "target_parameters", "target_macs") if getattr(self, k) is not None]
        if len(given) != 1:
            raise UserError("give exactly one of --amount, --target-parameters, --target-macs"
                            + (f" (got {', '.join('--' + g.replace('_', '-') for g in given)})" if given else ""))
        if self.method == "unstructured":
            if self.amount is None:
                raise UserError("unstructured pruning takes --amount (the fraction of weights set to zero); "
                                "--target-parameters and --target-macs are for --method structured")
            if self.importance is not None:
                raise UserError("unstructured pruning ranks weights by magnitude; --importance is for --method structured")
            if self.round_to is not None:
                raise UserError("unstructured pruning zeroes single weights; --round-to is for --method structured")
        if self.calibration_examples is not None and self.importance != "taylor":
            raise UserError(f"--calibration-examples ranks channels for --importance taylor; the importance here is "
                            f"{self.importance or 'l2'}: leave it out")
        if self.no_kd and self.teacher_checkpoint:
            raise UserError("--no-kd fine-tunes without a teacher, but --teacher-checkpoint names one: give one of them")
        if self.no_kd and self.loss:
            raise UserError("--no-kd fine-tunes on the labels alone; the loss options are for distillation")
        make_config(self.loss, "command line")  # a loss given twice is refused here
        check_finetuning_options(self.finetune_epochs, {"--teacher-checkpoint": self.teacher_checkpoint,
                                                        "--no-kd": self.no_kd, "the loss options": self.loss})


def schedule(total: int, steps: int) -> list[int]:
    """Fine-tuning epochs after each pruning step: `total` spread as evenly as possible, the rest first."""
    return [total // steps + (1 if i < total % steps else 0) for i in range(steps)]


def model_size(model: nn.Module, input_shape: tuple, what: str) -> int:
    """Parameters or MACs of a model."""
    if what == "parameters":
        return count_parameters(model)
    return count_flops(model, input_shape, next(model.parameters()).device) // 2


def calibration_batches(opened: OpenedCheckpoint, limit: int) -> list:
    """Up to `limit` training examples in batches (for the Taylor importance)."""
    batches, seen = [], 0
    for x, y in opened.loader("train", batch_size=min(limit, 128)):
        batches.append((x, y))
        seen += len(x)
        if seen >= limit:
            break
    return batches


def final_size(opened: OpenedCheckpoint, o: PruneOptions, original_size: dict) -> tuple[str, float]:
    """What structured pruning must reach at the last step: (parameters or macs, count). For --amount
    that is the size one-shot pruning at that amount gives, so gradual steps end where one shot would."""
    if o.target_parameters or o.target_macs:
        what = "parameters" if o.target_parameters else "macs"
        kind, value = parse_target(o.target_parameters or o.target_macs, what)
        count = value if kind == "count" else original_size[what] / value
        if count >= original_size[what]:
            raise UserError(f"--target-{what.replace('macs', 'macs')} {count:,.0f} is not below the model's "
                            f"{original_size[what]:,} {what}: nothing would be pruned")
        return what, count
    example = example_input(opened.model, opened.input_shape, 2, opened.device)
    one_shot = prune_structured(copy.deepcopy(opened.model), o.amount, example, "l2", o.round_to)
    left = model_size(one_shot, opened.input_shape, "parameters")
    if left >= original_size["parameters"]:
        raise UserError(f"--amount {o.amount} with --round-to {o.round_to} removes nothing from {opened.path}: no layer's "
                        f"width minus {o.amount:.0%} rounds to a smaller multiple of {o.round_to}; give a larger --amount "
                        "or a smaller --round-to (1 for exact fractions)")
    return "parameters", left


def prune_step(opened: OpenedCheckpoint, o: PruneOptions, step: int, original_size: dict,
               final: tuple[str, float] | None) -> dict:
    """Prune the opened model in place by step `step` (1-based) of the schedule; return what it did."""
    model, shape = opened.model, opened.input_shape
    done = step / o.steps  # geometric: every step removes the same fraction of what is left
    if o.method == "unstructured":
        names = prune_unstructured(model, 1 - (1 - o.amount) ** done)
        record = {"kind": "sparse", "weights": names, "sparsity": sparsity(model, names),
                  "layer_sparsity": layer_sparsity(model, names)}
        return {"record": record, "sparsity": record["sparsity"]}
    example = example_input(model, shape, 2, opened.device)
    if o.amount is not None and o.steps == 1:
        ratio = o.amount  # exactly the fraction asked of every layer
    else:
        what, last = final
        target = int(original_size[what] * (last / original_size[what]) ** done)
        ratio = ratio_for_target(model, lambda m: model_size(m, shape, what), target, example, o.round_to)
    criterion = o.importance or "l2"
    gradients = (lambda m: accumulate_gradients(m, calibration_batches(opened, o.calibration_examples))) \
        if criterion == "taylor" else None
    prune_structured(model, ratio, example, criterion, o.round_to, gradients)
    arch = opened.ckpt["arch"]
    unpruned = create_model(arch["name"], arch["num_classes"], arch["in_chans"], arch["image_size"], **arch["kwargs"])
    record = {"kind": "prune", "importance": criterion, "round_to": o.round_to, "modules": shape_changes(model, unpruned)}
    return {"record": record, "ratio": ratio}


def check_prunable(opened: OpenedCheckpoint, o: PruneOptions) -> None:
    """Refuse a model the method does not apply to, before any work."""
    kinds = {s.get("kind") for s in opened.ckpt.get("surgery", [])}
    if kinds & set(STRUCTURES):
        raise UserError(f"{opened.path} has Clos (or low-rank, Monarch) layers: prune the model before converting "
                        "it, not after")
    if "bottleneck" in kinds:
        raise UserError(f"{opened.path} has the key-value bottleneck, whose keys were fitted to its frozen encoder's "
                        "outputs: pruning the encoder would leave them matching nothing; prune the model before "
                        "adding the bottleneck (train-student --init-checkpoint PRUNED.pth --bottleneck ...)")
    if o.method == "structured":
        check_structured(opened.model, o.importance or "l2")  # e.g. bn-scale without batch norm


def save_pruned(opened: OpenedCheckpoint, record: dict, summary: dict, path: Path) -> None:
    """Write the pruned model: plain weights, the surgery that rebuilds it, and what pruning did."""
    model, ckpt = opened.model, opened.ckpt
    others = [s for s in ckpt.get("surgery", []) if s.get("kind") != record["kind"]]  # one record per kind: the latest
    model.surgery = [*others, record]
    # Not the original's training record: the pruned model has not been trained yet.
    save_derived(ckpt, model, path, {"prune": summary}, drop=("prune", "history", "best_epoch", "best_val_acc"))


def finetuning_runs(o: PruneOptions, opened: OpenedCheckpoint, teacher: str) -> list:
    """The fine-tuning run after each step (None where a step has no epochs), each checked as training would
    check it (its folder, its loss, its teacher against the data) before the first file is written."""
    out, tuned_out = o.output_path(), o.finetuned_path()
    original_cfg = from_dict(opened.ckpt["config"], o.checkpoint)
    runs = []
    for step, epochs in enumerate(schedule(o.finetune_epochs, o.steps), 1):
        last = step == o.steps
        if not epochs:
            runs.append(None)
            continue
        pruned_path = out if last else out.with_name(out.stem + "_steps") / f"step{step}.pth"
        name = tuned_out.stem if last else f"step{step}" + ("_ft" if o.no_kd else "_kd")
        tuned = finetune_config(original_cfg, pruned_path, name, epochs, o.finetune_lr, o.loss, teacher,
                                original_cfg.model if teacher == o.checkpoint else "", o.overwrite, o.device)
        check_finetuning(tuned, opened.ckpt.get("data", {}))
        runs.append(tuned)
    return runs


def prune(options: PruneOptions) -> dict:
    """Prune (in `steps` steps, each fine-tuned), evaluate, save; return the summary. Every check comes
    before the first file is written; a lock beside the output keeps a second identical prune out."""
    o = options
    o.check()
    o = dataclasses.replace(o, round_to=o.round_to or DEFAULT_ROUND_TO,
                            calibration_examples=o.calibration_examples or DEFAULT_CALIBRATION)
    if o.teacher_checkpoint and not Path(o.teacher_checkpoint).is_file():
        raise UserError(f"teacher checkpoint {o.teacher_checkpoint} " + ("is a folder: give the .pth file in it"
                        if Path(o.teacher_checkpoint).is_dir() else "not found"))
    out = o.output_path()
    tuned = o.finetuned_path()
    outputs = [out, tuned, tuned.with_name(tuned.stem + "_last.pth"),
               *([out.with_name(out.stem + "_steps")] if o.steps > 1 else [])]
    with writing_outputs(o.checkpoint, o.output, outputs, o.overwrite, "pruned"):
        return prune_locked(o)


def prune_locked(o: PruneOptions) -> dict:
    """prune's work, its output locked."""
    out = o.output_path()
    teacher = "" if o.no_kd else (o.teacher_checkpoint or o.checkpoint)
    opened = open_checkpoint(o.checkpoint, device=o.device)
    shape = opened.input_shape
    check_prunable(opened, o)
    runs = finetuning_runs(o, opened, teacher)
    original_size = {"parameters": model_size(opened.model, shape, "parameters"),
                     "macs": model_size(opened.model, shape, "macs")}
    final = final_size(opened, o, original_size) if o.method == "structured" else None
    summary = {"checkpoint": o.checkpoint, "method": o.method, "importance": o.importance, "amount": o.amount,
               "target_parameters": o.target_parameters, "target_macs": o.target_macs, "steps": o.steps,
               "round_to": o.round_to, "finetune_epochs": o.finetune_epochs,
               "teacher_checkpoint": teacher, "parameters_before": original_size["parameters"],
               "macs_before": original_size["macs"],
               "test_accuracy_before": evaluate(opened.model, opened.loader("test"))["acc"], "schedule": []}
    for step in range(1, o.steps + 1):
        did = prune_step(opened, o, step, original_size, final)
        record = did.pop("record")
        last = step == o.steps
        pruned_path = out if last else out.with_name(out.stem + "_steps") / f"step{step}.pth"
        row = {"step": step, **did, "parameters": model_size(opened.model, shape, "parameters"),
               "macs": model_size(opened.model, shape, "macs"),
               "test_accuracy_pruned": evaluate(opened.model, opened.loader("test"))["acc"], "checkpoint": str(pruned_path)}
        summary["schedule"].append(row)
        save_pruned(opened, record, {**summary, "parameters_after": row["parameters"], "macs_after": row["macs"],
                                     "test_accuracy_pruned": row["test_accuracy_pruned"]}, pruned_path)
        print(f"step {step}/{o.steps}: {row['parameters']:,} parameters, {row['macs']:,} MACs"
              + (f", sparsity {did['sparsity']:.3f}" if "sparsity" in did else "")
              + f"; test accuracy {row['test_accuracy_pruned']:.4f} before fine-tuning", flush=True)
        current = pruned_path
        if runs[step - 1] is not None:
            result = run_training(runs[step - 1])
            row.update(finetuned_checkpoint=result["checkpoint"], test_accuracy_finetuned=result["test_acc"])
            current = Path(result["checkpoint"])
        if not last:
            opened = open_checkpoint(str(current), device=o.device)
    summary.update(output=str(out), parameters_after=summary["schedule"][-1]["parameters"],
                   macs_after=summary["schedule"][-1]["macs"],
                   test_accuracy_pruned=summary["schedule"][-1]["test_accuracy_pruned"])
    if "finetuned_checkpoint" in summary["schedule"][-1]:
        summary.update(finetuned_output=summary["schedule"][-1]["finetuned_checkpoint"],
                       test_accuracy_finetuned=summary["schedule"][-1]["test_accuracy_finetuned"])
    return summary
