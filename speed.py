"""The fast path: switches that change how fast training runs, never what it computes.

Each switch is chosen by device (:func:`default_speed`) and can be turned off from the
command line, so a slow "plain" run (fp32, a DataLoader, eager, one host sync per step) is
always one flag away for debugging and for side-by-side benchmarks (``benchmarks/bench.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
from dataclasses import dataclass, replace

import torch
from torch import nn


@dataclass(frozen=True)
class Speed:
    """How to run training steps.

    amp: bf16 autocast (CUDA, and CPUs with native bf16 matrix instructions).
    channels_last: NHWC memory layout for the convolutions.
    fused_optimizer: Adam's fused kernel instead of a Python loop over parameters.
    on_device_data: the whole dataset on the device as one uint8 tensor, batched by index;
        off: a ``torch.utils.data.DataLoader`` that collates and copies every batch.
    log_every: read the loss back to the host every N steps (1 = after every step).
    compile: ``torch.compile`` the network.
    keep_freed_memory: glibc's malloc keeps freed blocks for the next step instead of handing them back
        to the kernel (:func:`keep_freed_memory`); process-wide, and it stays set once set.
    """

    amp: bool = False
    channels_last: bool = False
    fused_optimizer: bool = False
    on_device_data: bool = True
    log_every: int = 1
    compile: bool = False
    keep_freed_memory: bool = False


PLAIN = Speed(amp=False, channels_last=False, fused_optimizer=False, on_device_data=False, log_every=1,
              compile=False, keep_freed_memory=False)

# mallopt(3) parameters of glibc's <malloc.h>
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 1 << 30


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 matrix work is native (and so fast) on ``device``."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def cpu_capability() -> str:
    """The widest vector instructions torch's CPU kernels use here: ``"AVX512"``, ``"AVX2"``, ..."""
    return torch.backends.cpu.get_cpu_capability()


def channels_last_pays(device: torch.device, amp: bool) -> bool:
    """Whether the NHWC layout is the faster one: for fp32 convolutions on a CPU with AVX-512. With bf16 it
    is much slower, on AVX2-only CPUs no different, and on GPUs not measured (docs/performance.md)."""
    return device.type == "cpu" and not amp and cpu_capability().startswith("AVX512")


def default_speed(device: torch.device, amp: bool | None = None) -> Speed:
    """The fast path for ``device``, with bf16 where it is native unless ``amp`` says otherwise; see
    docs/performance.md for what each part buys."""
    amp = bf16_supported(device) if amp is None else amp
    return Speed(
        amp=amp,
        channels_last=channels_last_pays(device, amp),
        fused_optimizer=device.type in ("cuda", "cpu"),
        on_device_data=True,
        log_every=25,
        compile=False,
        keep_freed_memory=device.type == "cpu",
    )


def with_switches_off(speed: Speed, off: list[str]) -> Speed:
    """``speed`` with the named boolean switches turned off."""
    return replace(speed, **{name: False for name in off})


def autocast(device: torch.device, speed: Speed) -> contextlib.AbstractContextManager:
    if not speed.amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep up to 1 GiB of freed memory in the process; whether it could (not off glibc).

    By default glibc gives each block above its mmap threshold (128 KiB, raised up to 32 MiB as such blocks
    are freed) a mapping of its own and unmaps it when it is freed, so on a CPU every training step maps its
    activations afresh and the kernel zeroes each page on first touch (docs/performance.md counts the page
    faults). Raising the mmap and trim thresholds keeps those blocks on the heap for the next step.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc, or no C library to open by name
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))


def prepare_process(speed: Speed) -> None:
    """The process-wide part of the fast path: the allocator's thresholds."""
    if speed.keep_freed_memory:
        keep_freed_memory()


def prepare_model(model: nn.Module, speed: Speed) -> None:
    """Apply the memory layout and compile in place (state-dict keys stay unchanged)."""
    if speed.channels_last:
        model.to(memory_format=torch.channels_last)
    if speed.compile:
        model.compile()
