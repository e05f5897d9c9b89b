"""Device and precision choices shared by training and evaluation."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import sys

import torch

from .errors import UserError


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """'auto' is bf16 autocast where the device computes bf16 natively (CUDA, CPUs with AVX512-BF16 or AMX:
    fast, no loss scaling needed; tests/test_speed_paths.py checks it learns as fp32 does), else fp32."""
    if name == "auto":
        return "bf16" if bf16_is_native(device) else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise UserError("precision fp16 needs CUDA; use fp32 or bf16 on CPU")
    return name


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for `precision` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def bf16_is_native(device: torch.device) -> bool:
    """Whether `device` computes in bf16 at full speed: CUDA, or a CPU with AVX512-BF16 or AMX (elsewhere
    bf16 is emulated and slower than fp32)."""
    if device.type == "cuda":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def channels_last_is_safe(device: torch.device) -> bool:
    """Whether convolutions may run channels_last on `device`: on CUDA, and on CPUs with AVX512, where it
    was measured 1.2-1.4x faster. On AVX2-only CPUs torch 2.14.1's channels_last convolution backward
    corrupts the heap ("double free or corruption" training a ResNet-8 on an AMD EPYC, 2026-12-06; the
    same steps in the plain layout are fine), so the plain layout there."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


@functools.cache
def tune_cpu_allocator() -> bool:
    """glibc: let freed activation buffers up to 32 MiB stay in the heap instead of going back to the
    system and being page-faulted in again at the next step (measured 15-20% faster CPU distillation steps;
    README, Speed). The price is up to 64 MiB of freed memory kept by the process."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameter numbers
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 64 << 20))
