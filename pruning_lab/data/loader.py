"""A batched loader over a Split held on the training device (no DataLoader workers, no PIL).

With CUDA the whole dataset lives on the GPU as one uint8 tensor and each batch is cropped,
flipped, resized and normalised there; on CPU the same code runs on tensors in memory. All of an
epoch's randomness (order, crop offsets, flips) is drawn up front from a generator seeded by
(seed, epoch), so an epoch can be restarted at any step and yields exactly the same batches: that
is what makes a resumed run bit-identical to an uninterrupted one.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from .datasets import DataSpec, Split


def random_crop(x: torch.Tensor, offsets: torch.Tensor, pad: int) -> torch.Tensor:
    """Crop each image of x [B, C, H, W] from its zero-padded copy at offsets [B, 2] in [0, 2*pad]."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dev = x.device
    rows = (offsets[:, 0, None] + torch.arange(h, device=dev)).view(b, 1, h, 1)
    cols = (offsets[:, 1, None] + torch.arange(w, device=dev)).view(b, 1, 1, w)
    return padded[torch.arange(b, device=dev).view(b, 1, 1, 1), torch.arange(c, device=dev).view(1, c, 1, 1), rows, cols]


class BatchLoader:
    """Yields (inputs, int64 labels) batches of one split: normalised float images, or token ids as they are.

    `batch_size` is the global batch; with `shard=(rank, world_size)` this process yields its share.
    """

    def __init__(self, split: Split, spec: DataSpec, batch_size: int, device: torch.device | str = "cpu",
                 train: bool = False, augment: bool = False, seed: int = 0, input_size: Optional[int] = None,
                 channels_last: bool = False, max_steps: Optional[int] = None, shard: tuple = (0, 1)) -> None:
        self.device = torch.device(device)
        self.inputs = split.inputs.to(self.device)
        self.labels = split.labels.to(self.device)
        self.spec, self.batch_size, self.train, self.seed = spec, batch_size, train, seed
        self.augment = augment and train
        self.input_size = input_size or spec.input_size  # images are resized to it on the device
        self.channels_last = channels_last
        self.rank, self.world_size = shard  # data-parallel: this process takes every world_size-th image
        self.mean = torch.tensor(spec.mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(spec.std, device=self.device).view(1, -1, 1, 1)
        n = len(self.labels)
        # Training drops the last partial batch (a batch of 1 breaks BatchNorm); evaluation keeps it.
        steps = n // batch_size if train and n >= batch_size else -(-n // batch_size)
        self.steps = min(steps, max_steps) if max_steps else steps

    def __len__(self) -> int:
        return self.steps

    def _epoch_randomness(self, epoch: int) -> tuple:
        """(order, crop offsets, flip mask) for one epoch, drawn from a generator seeded by (seed, epoch)."""
        n = len(self.labels)
        if not self.train:
            return torch.arange(n, device=self.device), None, None
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g)
        offsets = torch.randint(0, 2 * self.spec.crop_padding + 1, (n, 2), generator=g)
        flips = torch.rand(n, generator=g) < 0.5
        return order.to(self.device), offsets.to(self.device), flips.to(self.device)

    def epoch(self, epoch: int = 0, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of epoch `epoch`, beginning at step `start_step` (for a mid-epoch resume)."""
        order, offsets, flips = self._epoch_randomness(epoch)
        for step in range(start_step, self.steps):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size][self.rank::self.world_size]
            x = self.inputs[idx]
            if self.spec.kind == "tokens":  # token ids go to the model as they are
                yield x, self.labels[idx]
                continue
            if self.augment and self.spec.crop_padding:
                x = random_crop(x, offsets[idx], self.spec.crop_padding)
            x = self._normalise(x)
            if self.augment and self.spec.flip:
                x = torch.where(flips[idx].view(-1, 1, 1, 1), x.flip(3), x)
            yield x, self.labels[idx]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float().div_(255) - self.mean) / self.std
        if self.input_size != x.shape[-1]:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
