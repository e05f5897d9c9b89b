"""Reference knowledge-distillation loops that benchmarks/train_speed.py times beside this project's loop.

Both do the same KD as ours: loss = alpha * CE(student, y) + (1 - alpha) * T^2 * KL(p_teacher^T || p_student^T)
(KL averaged over the batch, 'batchmean'), SGD(lr, momentum 0.9, weight decay 5e-4), the teacher frozen in
eval mode, fp32. They load the data the way their users do:

- `tutorial_kd_steps`: a plain loop in the style of PyTorch's knowledge-distillation tutorial
  (https://pytorch.org/tutorials/beginner/knowledge_distillation_tutorial.html): a Dataset of PIL images as
  torchvision's CIFAR10 returns them, per-sample torchvision transforms, a shuffling DataLoader.
- `torchdistill_kd_steps`: the same with torchdistill's DistillationBox built from a train_config dict, with
  its own KDLoss, stepped the way torchdistill's examples/torchvision/image_classification.py does.
  Needs `pip install -r requirements-bench.txt`; torchdistill is imported only inside that function.

The models they take return plain logits: wrap this project's (logits, features) models in `LogitsOnly`.
Each function trains the student it is given in place, runs one untimed warm-up step, then returns the
seconds that `steps` optimizer steps took.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4
Device = Union[str, torch.device]


class LogitsOnly(nn.Module):
    """Adapter: a model returning (logits, features) seen as one returning the logits only."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out[0] if isinstance(out, (tuple, list)) else out


class CifarLikeDataset(Dataset):
    """uint8 images [N, C, H, W] served as torchvision's CIFAR10 serves them: a PIL image per index."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Optional[Callable] = None) -> None:
        # torchvision keeps CIFAR10 as a transposed HWC view of the CHW array, and its targets as a list of ints.
        self.data = np.asarray(images).transpose((0, 2, 3, 1))
        self.targets = np.asarray(labels).astype(np.int64).tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple:
        img, target = self.data[index], self.targets[index]
        img = Image.fromarray(img)
        if self.transform is not None:
            img = self.transform(img)
        return img, target


def train_transform(mean: Sequence[float], std: Sequence[float], size: int = 32) -> transforms.Compose:
    """The usual CIFAR training augmentation, applied per sample to a PIL image."""
    return transforms.Compose([
        transforms.RandomCrop(size, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def _dataset(images: np.ndarray, labels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> CifarLikeDataset:
    return CifarLikeDataset(images, labels, train_transform(mean, std, size=int(np.asarray(images).shape[-1])))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cycle(loader: DataLoader, on_epoch: Optional[Callable[[int], None]] = None) -> Iterator:
    """Batches of `loader` without end, a new epoch (and a new shuffle) whenever one runs out."""
    epoch = 0
    while True:
        if on_epoch is not None:
            on_epoch(epoch)
        yield from loader
        epoch += 1


def _time_steps(step: Callable[[tuple], object], batches: Iterator, steps: int, device: torch.device) -> float:
    """One untimed warm-up step, then the seconds `steps` steps take (data loading included)."""
    step(next(batches))
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(next(batches))
    _sync(device)
    return time.perf_counter() - start


# ---------------------------------------------------------------- (a) the tutorial's plain loop
def tutorial_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                     temperature: float, alpha: float) -> torch.Tensor:
    """The tutorial's KD loss: alpha * CE + (1 - alpha) * T^2 * KL(p_t^T || p_s^T), KL summed / batch size."""
    soft_targets = F.softmax(teacher_logits / temperature, dim=-1)
    soft_prob = F.log_softmax(student_logits / temperature, dim=-1)
    # As the tutorial writes it; equal to F.kl_div(soft_prob, soft_targets, reduction="batchmean").
    soft_targets_loss = torch.sum(soft_targets * (soft_targets.log() - soft_prob)) / soft_prob.size()[0] \
        * temperature**2
    label_loss = F.cross_entropy(student_logits, labels)
    return (1 - alpha) * soft_targets_loss + alpha * label_loss


def tutorial_kd_step(teacher: nn.Module, student: nn.Module, optimizer: torch.optim.Optimizer,
                     inputs: torch.Tensor, labels: torch.Tensor, device: torch.device,
                     temperature: float, alpha: float) -> torch.Tensor:
    """One step of the tutorial's loop on one batch; returns the (detached) loss."""
    inputs, labels = inputs.to(device), labels.to(device)
    optimizer.zero_grad()
    with torch.no_grad():
        teacher_logits = teacher(inputs)
    student_logits = student(inputs)
    loss = tutorial_kd_loss(student_logits, teacher_logits, labels, temperature, alpha)
    loss.backward()
    optimizer.step()
    # The tutorial also does `running_loss += loss.item()` here; left out (as in (b) and ours): no host sync per step.
    return loss.detach()


def tutorial_kd_steps(teacher: nn.Module, student: nn.Module, images: np.ndarray, labels: np.ndarray,
                      mean: Sequence[float], std: Sequence[float], batch_size: int, steps: int, device: Device,
                      temperature: float = 4.0, alpha: float = 0.5, workers: int = 0, lr: float = 0.1) -> float:
    """Seconds of `steps` KD steps of a PyTorch-tutorial-style loop (after one untimed warm-up step)."""
    device = torch.device(device)
    loader = DataLoader(_dataset(images, labels, mean, std), batch_size=batch_size, shuffle=True, drop_last=True,
                        num_workers=workers)
    if len(loader) == 0:
        raise ValueError(f"{len(labels)} images make no full batch of {batch_size}")
    teacher.to(device).eval()
    student.to(device).train()
    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def step(batch: tuple) -> None:
        tutorial_kd_step(teacher, student, optimizer, batch[0], batch[1], device, temperature, alpha)

    return _time_steps(step, _cycle(loader), steps, device)


# ---------------------------------------------------------------- (b) torchdistill's DistillationBox
def torchdistill_train_config(batch_size: int, workers: int, temperature: float, alpha: float, lr: float,
                              num_epochs: int = 1) -> dict:
    """torchdistill's `train` config (its YAML's keys, as a dict) for this KD."""
    return {
        "num_epochs": num_epochs,
        "train_data_loader": {
            "dataset_id": "train",
            # torchdistill builds the DataLoader with an explicit sampler; RandomSampler == shuffle=True.
            "sampler": {"class_or_func": torch.utils.data.RandomSampler, "kwargs": {}},
            "kwargs": {"batch_size": batch_size, "num_workers": workers, "drop_last": True},
            # requires_supp defaults to True: torchdistill wraps the dataset so a batch is (x, y, supp_dict).
        },
        # forward_proc must be named (no default in 1.1.5); forward_batch_only calls model(x), as (a) does.
        "teacher": {"forward_proc": "forward_batch_only", "sequential": [], "frozen_modules": [],
                    "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only", "sequential": [], "frozen_modules": [],
                    "requires_grad": True},
        # No "wrapper" (no DataParallel), no "scheduler" (constant lr, as ours), no grad accumulation or clipping.
        "optimizer": {"key": "SGD", "kwargs": {"lr": lr, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY}},
        "criterion": {
            "key": "WeightedSumLoss",
            "kwargs": {"sub_terms": {"kd": {
                "criterion": {"key": "KDLoss", "kwargs": {
                    "student_module_path": ".", "student_module_io": "output",
                    "teacher_module_path": ".", "teacher_module_io": "output",
                    "temperature": temperature, "alpha": alpha, "reduction": "batchmean"}},
                "weight": 1.0}}},
        },
    }


def torchdistill_box(teacher: nn.Module, student: nn.Module, dataset: Dataset, batch_size: int, device: Device,
                     temperature: float = 4.0, alpha: float = 0.5, workers: int = 0, lr: float = 0.1,
                     num_epochs: int = 1):
    """torchdistill's DistillationBox for this KD over `dataset` (ImportError naming the requirements file)."""
    try:
        from torchdistill.core.distillation import get_distillation_box
    except ImportError as e:
        raise ImportError(f"torchdistill is not installed ({e}); pip install -r requirements-bench.txt") from None
    device = torch.device(device)
    # torchdistill 1.1.5 never puts the teacher in eval mode (its pre_epoch_process only calls student.train()).
    teacher.to(device).eval()
    student.to(device)
    config = torchdistill_train_config(batch_size, workers, temperature, alpha, lr, num_epochs)
    return get_distillation_box(teacher, student, {"train": dataset}, config, device, device_ids=None,
                                distributed=False, lr_factor=1)


def torchdistill_kd_steps(teacher: nn.Module, student: nn.Module, images: np.ndarray, labels: np.ndarray,
                          mean: Sequence[float], std: Sequence[float], batch_size: int, steps: int, device: Device,
                          temperature: float = 4.0, alpha: float = 0.5, workers: int = 0, lr: float = 0.1) -> float:
    """Seconds of `steps` KD steps with torchdistill's DistillationBox (after one untimed warm-up step)."""
    device = torch.device(device)
    dataset = _dataset(images, labels, mean, std)
    batches_per_epoch = len(dataset) // batch_size
    if batches_per_epoch == 0:
        raise ValueError(f"{len(dataset)} images make no full batch of {batch_size}")
    num_epochs = -(-(steps + 1) // batches_per_epoch)
    box = torchdistill_box(teacher, student, dataset, batch_size, device, temperature, alpha, workers, lr, num_epochs)

    def on_epoch(epoch: int) -> None:
        if epoch > 0:
            box.post_epoch_process()  # a no-op here (no scheduler, not distributed), as the example calls it
        box.pre_epoch_process(epoch=epoch)

    def step(batch: tuple) -> None:
        sample_batch, targets, supp_dict = batch
        sample_batch, targets = sample_batch.to(device), targets.to(device)
        loss = box.forward_process(sample_batch, targets, supp_dict)
        # The example also logs loss.item() and img/s each step (MetricLogger); left out, as in (a).
        box.post_forward_process(loss=loss)

    try:
        return _time_steps(step, _cycle(box.train_data_loader, on_epoch), steps, device)
    finally:
        box.clean_modules()  # as the example does after training; note it sets requires_grad=True on the teacher
