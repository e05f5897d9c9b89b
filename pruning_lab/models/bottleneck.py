"""The discrete key-value bottleneck (Träuble et al., 2023), in place of a model's classifier.

The encoder's output [B, D] is split into `codebooks` heads of D / codebooks dimensions; each head
is looked up in its own codebook of `keys` keys (vector quantisation by vector-quantize-pytorch),
and each key holds a learnable value of `num_classes` numbers; the logits are the mean of the
selected values. The keys are fitted once to the encoder's outputs on training data (k-means over
EXAMPLES_PER_KEY examples per key at once, `init_keys`) and then frozen, so training
changes only the values of the keys an input selects: updates stay local, which is why a model
with the bottleneck forgets less when it learns classes one after another. The lookup is hard, so
no gradient reaches the encoder through it: the bottleneck is meant for a pretrained encoder
(`--init-checkpoint`), which it keeps frozen (its weights, and its batch-norm statistics and dropout
in eval mode even while the values train), so that the keys keep matching what it outputs.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from ..errors import UserError
from ..surgery import record_surgery, register_surgery, replace_module

OPTIONS = {"codebooks": int, "keys": int, "keys_from": str}  # bottleneck config keys and their types
KEYS_FROM = ("fit", "teacher")  # k-means on this model's encoder outputs, or the distillation teacher's keys
EXAMPLES_PER_KEY = 20  # encoder outputs the keys are fitted on, per key (up to the training set)
KMEANS_ITERATIONS = 20


def check_options(options: dict, width: int) -> dict:
    """The bottleneck options with defaults, or a one-line error naming the bad one."""
    if "decay" in options:
        raise UserError("bottleneck decay no longer applies: the keys are fitted by k-means over the encoder's outputs "
                        "at once (no moving average); leave it out")
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise UserError(f"unknown bottleneck option(s) {', '.join(sorted(unknown))}; allowed: {', '.join(OPTIONS)}")
    merged = {"codebooks": 8, "keys": 512, "keys_from": "fit", **options}
    if merged["keys_from"] not in KEYS_FROM:
        raise UserError(f"bottleneck keys_from must be one of {', '.join(KEYS_FROM)}; got {merged['keys_from']!r}")
    if not all(isinstance(merged[k], int) and not isinstance(merged[k], bool) and merged[k] >= 1
               for k in ("codebooks", "keys")):
        raise UserError(f"bottleneck codebooks and keys must be integers >= 1; got {merged['codebooks']!r}, "
                        f"{merged['keys']!r}")
    if width % merged["codebooks"]:
        raise UserError(f"bottleneck codebooks {merged['codebooks']} must divide the encoder's output width {width} "
                        "(each codebook looks up an equal slice of it)")
    return merged


class KeyValueBottleneck(nn.Module):
    """Encoder output [B, D] -> logits [B, num_classes] through frozen keys and learnable values."""

    def __init__(self, in_features: int, num_classes: int, codebooks: int = 8, keys: int = 512,
                 keys_from: str = "fit", decay: float | None = None) -> None:  # decay: older checkpoints record it
        super().__init__()
        from vector_quantize_pytorch import VectorQuantize

        options = check_options({"codebooks": codebooks, "keys": keys, "keys_from": keys_from}, in_features)
        self.config = {"in_features": in_features, "num_classes": num_classes, **options}
        self.in_features, self.out_features = in_features, num_classes
        # codebook_dim = D / heads: each head looks up its own slice, with no learned projection in between.
        self.quantizer = VectorQuantize(dim=in_features, codebook_dim=in_features // codebooks, codebook_size=keys,
                                        heads=codebooks, separate_codebook_per_head=True,
                                        kmeans_init=True, kmeans_iters=KMEANS_ITERATIONS, commitment_weight=0.0)
        self.values = nn.Parameter(torch.randn(codebooks, keys, num_classes) * 0.01)

    def key_indices(self, x: torch.Tensor) -> torch.Tensor:
        """The key each codebook selects for each input: [B, codebooks] (the keys never move here)."""
        if not bool(self.quantizer._codebook.initted):
            raise RuntimeError("the bottleneck's keys were never fitted: call init_keys first")
        with torch.autocast(x.device.type, enabled=False):
            _, indices, _ = self.quantizer(x.float().detach().unsqueeze(1), freeze_codebook=True)
        return indices[:, 0, :]

    @torch.no_grad()
    def fit_keys(self, outputs: torch.Tensor) -> None:
        """The keys of each codebook by k-means over its slice of the encoder outputs [N, D] (the library's k-means,
        KMEANS_ITERATIONS iterations); fewer outputs than keys leave duplicates, and the library says so."""
        codebook = self.quantizer._codebook
        heads = self.config["codebooks"]
        data = outputs.float().reshape(len(outputs), heads, -1).transpose(0, 1).contiguous()  # [codebooks, N, D/codebooks]
        codebook.initted.fill_(False)
        codebook.init_embed_(data)

    @torch.no_grad()
    def key_usage(self, outputs: torch.Tensor) -> dict:
        """Per codebook: how many keys are distinct, and how many `outputs` [N, D] select."""
        embed = self.quantizer._codebook.embed  # [codebooks, keys, D/codebooks]
        distinct = [len(torch.unique(book, dim=0)) for book in embed]
        chosen = torch.cat([self.key_indices(chunk) for chunk in outputs.split(4096)])
        used = [len(torch.unique(chosen[:, h])) for h in range(chosen.shape[1])]
        return {"keys": self.config["keys"], "examples": len(outputs), "distinct": distinct, "used": used}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        indices = self.key_indices(x)
        heads = torch.arange(indices.shape[1], device=indices.device)
        return self.values[heads, indices].mean(1)  # [B, codebooks, classes] -> [B, classes]


def classifier_name(model: nn.Module) -> str:
    """The name of the model's final classifier layer, which the bottleneck replaces."""
    from .bert import BertClassifier, DistilBertClassifier
    from .mlp import MLP
    from .resnet import CifarResNet
    from .vit import ViT

    for cls, name in ((CifarResNet, "fc"), (MLP, "fc3"), (ViT, "vit.head"), (BertClassifier, "hf.classifier"),
                      (DistilBertClassifier, "hf.classifier")):
        if isinstance(model, cls):
            return name
    raise UserError(f"the bottleneck replaces the classifier of the registered models; a {type(model).__name__} "
                    "is not one of them")


class _EncoderOnly(Exception):
    """Raised by a hook on the bottleneck to stop a forward pass once the encoder has run."""


@torch.no_grad()
def encoder_outputs(model: nn.Module, batches: Iterable, limit: int) -> torch.Tensor:
    """What the encoder gives the bottleneck for up to `limit` examples of `batches` [N, D] (eval mode)."""
    bottleneck, captured = find_bottleneck(model), []

    def capture(module: nn.Module, inputs: tuple) -> None:
        captured.append(inputs[0].detach().float())
        raise _EncoderOnly

    handle = bottleneck.register_forward_pre_hook(capture)
    was_training = model.training
    model.eval()
    try:
        for x, _ in batches:
            try:
                model(x)
            except _EncoderOnly:
                pass
            if sum(len(c) for c in captured) >= limit:
                break
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(captured)[:limit]


def init_keys(model: nn.Module, batches: Iterable, examples: int | None = None) -> dict:
    """Fit the bottleneck's keys by k-means over the encoder's outputs on up to `examples` training examples
    (default EXAMPLES_PER_KEY per key), then leave them frozen; return how many keys are distinct and used.

    All at once, not per batch: k-means on the first batch alone (the library's own start) gave 32 texts to
    512 keys, whose duplicates then died at the first moving-average update (33 distinct keys of 512)."""
    bottleneck = find_bottleneck(model)
    outputs = encoder_outputs(model, batches, examples or EXAMPLES_PER_KEY * bottleneck.config["keys"])
    bottleneck.fit_keys(outputs)
    return bottleneck.key_usage(outputs)


@torch.no_grad()
def copy_teacher_keys(bottleneck: KeyValueBottleneck, teacher_checkpoint: str, state: dict) -> None:
    """The keys of the teacher's bottleneck (its checkpoint's `state` dict), as the thesis starts a student's:
    refused unless the teacher has a bottleneck of the same width, codebooks and keys."""
    found = [k for k in state if k.endswith("quantizer._codebook.embed")]
    mine = bottleneck.quantizer._codebook.embed
    if not found:
        raise UserError(f"bottleneck keys_from teacher: {teacher_checkpoint} has no key-value bottleneck; fit the "
                        "student's own keys (leave keys_from out) or distil from a teacher with one")
    theirs = state[found[0]]
    if theirs.shape != mine.shape:
        raise UserError(f"bottleneck keys_from teacher: {teacher_checkpoint}'s keys are {list(theirs.shape)} "
                        f"(codebooks, keys, width / codebooks), the student's {list(mine.shape)}: they must match")
    codebook = bottleneck.quantizer._codebook
    codebook.embed.copy_(theirs)
    codebook.embed_avg.copy_(theirs)
    codebook.cluster_size.fill_(1.0)
    codebook.initted.fill_(True)


def record_key_usage(model: nn.Module, usage: dict) -> None:
    """Keep how many keys the fit left distinct and in use in the model's bottleneck record (its checkpoints carry
    it; `evaluate` shows it)."""
    for step in getattr(model, "surgery", []):
        if step.get("kind") == "bottleneck":
            step["keys_fitted"] = usage


def find_bottleneck(model: nn.Module) -> KeyValueBottleneck | None:
    """The model's bottleneck, if it has one."""
    return next((m for m in model.modules() if isinstance(m, KeyValueBottleneck)), None)


def _only_head_trains(model: nn.Module, inputs: tuple) -> None:
    """Forward pre-hook: every module but the head (and the containers holding it) runs in eval mode."""
    head = model._trainable_head
    holders = {".".join(head.split(".")[:i]) for i in range(len(head.split(".")))}
    for name, module in model.named_modules():
        if name not in holders and not (name + ".").startswith(head + "."):
            module.training = False


def freeze_all_but(model: nn.Module, head: str) -> None:
    """Freeze everything but the submodule `head`: no gradients, and eval-mode behaviour (batch-norm
    statistics, dropout) even while the model trains: a frozen encoder under a trained head."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(head + "."))
    if getattr(model, "_trainable_head", None) is None:
        model.register_forward_pre_hook(_only_head_trains)
    model._trainable_head = head


def freeze_encoder(model: nn.Module) -> None:
    """Keep the encoder of a model with a bottleneck frozen; only the bottleneck's values train."""
    name = next(n for n, m in model.named_modules() if isinstance(m, KeyValueBottleneck))
    freeze_all_but(model, name)


@register_surgery("bottleneck")
def replay_bottleneck(model: nn.Module, step: dict) -> None:
    """Put a bottleneck of the recorded shape in place of a freshly built model's classifier; freeze the encoder."""
    replace_module(model, step["layer"], KeyValueBottleneck(**step["config"]))
    freeze_encoder(model)


def add_bottleneck(model: nn.Module, options: dict) -> KeyValueBottleneck:
    """Replace the model's classifier by a bottleneck of the same input width and classes (recorded as
    surgery); its keys still need `init_keys`."""
    name = classifier_name(model)
    classifier = model.get_submodule(name)
    bottleneck = KeyValueBottleneck(classifier.in_features, classifier.out_features,
                                    **check_options(options, classifier.in_features)).to(classifier.weight.device)
    replace_module(model, name, bottleneck)
    record_surgery(model, {"kind": "bottleneck", "layer": name, "config": bottleneck.config})
    freeze_encoder(model)
    return bottleneck


def keys_ready(bottleneck: KeyValueBottleneck) -> bool:
    """Whether the keys were fitted (loaded from a checkpoint, or by init_keys)."""
    return bool(bottleneck.quantizer._codebook.initted)
