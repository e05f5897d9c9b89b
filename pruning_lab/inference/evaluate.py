"""Accuracy, loss, parameter count, FLOPs and latency of a model, and its agreement with a teacher."""
from __future__ import annotations

import statistics
import time
import warnings
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ..runtime import autocast


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, precision: str = "fp32") -> dict:
    """Mean cross-entropy, top-1 accuracy, macro F1 and Matthews correlation of `model` over every
    batch of `loader` (F1 and MCC by scikit-learn; they tell more than accuracy on unbalanced classes,
    e.g. the GLUE tasks); for a regression (float labels) the mean squared error, Pearson and Spearman."""
    was_training = model.training
    model.eval()
    loss_sum, predictions, labels = 0.0, [], []
    for x, y in loader:
        with autocast(precision, x.device):
            logits, _ = model(x)
        if y.is_floating_point():  # a regression (one output per example): squared error, the output itself
            loss_sum = loss_sum + F.mse_loss(logits[:, 0].float(), y, reduction="sum")
            predictions.append(logits[:, 0].float())
        else:
            loss_sum = loss_sum + F.cross_entropy(logits.float(), y, reduction="sum")
            predictions.append(logits.argmax(1))
        labels.append(y)
    model.train(was_training)
    if not labels:
        return {"loss": float("nan"), "acc": float("nan"), "n": 0, "f1_macro": float("nan"), "mcc": float("nan")}
    predicted, truth = torch.cat(predictions).cpu().numpy(), torch.cat(labels).cpu().numpy()  # one transfer
    n = len(truth)
    if truth.dtype.kind == "f":
        scores = regression_scores(truth, predicted)
        return {"loss": float(loss_sum) / n, "acc": scores["pearson"], "n": n, **scores}
    return {"loss": float(loss_sum) / n, "acc": float((predicted == truth).mean()), "n": n,
            **classification_scores(truth, predicted)}


def regression_scores(truth, predicted) -> dict:
    """Pearson and Spearman correlation of predicted with true scores (GLUE's STS-B metrics; 0 when the
    predictions are constant). The run's `acc`, which selects its best epoch, is the Pearson correlation."""
    from scipy import stats

    def correlation(fn) -> float:
        if not (predicted.std() > 0 and truth.std() > 0):
            return 0.0
        with warnings.catch_warnings():  # early in training the outputs are nearly constant: a low value says so
            warnings.simplefilter("ignore", stats.NearConstantInputWarning)
            value = float(fn(truth, predicted)[0])
        return value if value == value else 0.0

    return {"pearson": correlation(stats.pearsonr), "spearman": correlation(stats.spearmanr)}


def classification_scores(truth, predicted) -> dict:
    """Macro-averaged F1 and Matthews correlation coefficient of predicted against true labels."""
    from sklearn.metrics import f1_score, matthews_corrcoef

    return {"f1_macro": float(f1_score(truth, predicted, average="macro", zero_division=0)),
            "mcc": float(matthews_corrcoef(truth, predicted))}


def count_parameters(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def example_input(model: nn.Module, input_shape: tuple, batch_size: int, device: torch.device | str) -> torch.Tensor:
    """A batch to time or count: zeros of `input_shape` (C, H, W), or the model's own (token ids for text)."""
    if hasattr(model, "example_input"):
        return model.example_input(batch_size, device)
    return torch.zeros(batch_size, *input_shape, device=device)


@torch.no_grad()
def count_flops(model: nn.Module, input_shape: tuple, device: torch.device | str = "cpu") -> int:
    """Forward FLOPs for one input of `input_shape` (C, H, W), counted by torch's FlopCounterMode (MACs = FLOPs / 2)."""
    model.eval()
    x = example_input(model, input_shape, 1, device)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


@torch.no_grad()
def measure_latency(model: nn.Module, input_shape: tuple, device: torch.device | str = "cpu",
                    batch_size: int = 1, repeats: int = 20, warmup: int = 3, min_repeats: int = 3,
                    max_seconds: float = 2.0) -> float:
    """Median forward latency in milliseconds for a batch of `batch_size`: up to `repeats` timed forwards after
    `warmup`, stopping early once `min_repeats` are timed and `max_seconds` have passed (a full-size model at
    batch 256 on a CPU takes seconds a forward; its median of 3 is as telling and a report of six such models
    is not kept waiting minutes)."""
    model.eval()
    x = example_input(model, input_shape, batch_size, device)
    cuda = torch.device(device).type == "cuda"

    def timed_forward() -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(x)
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1000

    for _ in range(warmup):
        if timed_forward() > 1000 * max_seconds / min_repeats:  # a slow model: one warm-up forward is enough
            break
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < repeats:
        times.append(timed_forward())
        if len(times) >= min_repeats and time.perf_counter() - began > max_seconds:
            break
    return statistics.median(times)


@torch.no_grad()
def soft_target_alignment(student: nn.Module, teacher: Callable[[torch.Tensor], tuple], loader: Iterable,
                          precision: str = "fp32") -> dict:
    """Fraction of examples where student and teacher agree on the top class, and mean KL(p_t || p_s) at T=1.

    `teacher` maps a batch to (logits, features), e.g. a frozen teacher. For a regression (one output) both
    are None: there are no classes to agree on."""
    was_training = student.training
    student.eval()
    agree, kl, n = 0.0, 0.0, 0
    for x, _ in loader:
        with autocast(precision, x.device):
            s_logits = student(x)[0].float()
        if s_logits.shape[1] == 1:
            student.train(was_training)
            return {"agreement": None, "kl": None}
        t_logits = teacher(x)[0].float()
        agree = agree + (s_logits.argmax(1) == t_logits.argmax(1)).sum()
        kl = kl + F.kl_div(F.log_softmax(s_logits, 1), F.log_softmax(t_logits, 1), log_target=True, reduction="sum")
        n += len(x)
    student.train(was_training)
    return {"agreement": float(agree) / max(n, 1), "kl": float(kl) / max(n, 1)}
