"""The fast path: switches that change how fast training runs, never what it computes, chosen by device
(:func:`default_speed`); ``train.py --plain`` turns them off, ``tools/bench.py`` times each one."""

import contextlib
import ctypes
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Speed:
    """How training steps run: bf16, NHWC, fused Adam, the loss read every ``log_every`` steps, compiled, and
    freed memory kept for the next step (process-wide)."""

    amp: bool = False
    channels_last: bool = False
    fused_optimizer: bool = False
    log_every: int = 1
    compile: bool = False
    keep_freed_memory: bool = False


PLAIN = Speed()

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
    """Whether NHWC is faster: for fp32 on a CPU with AVX-512 (slower with bf16, no faster on AVX2)."""
    return device.type == "cpu" and not amp and cpu_capability().startswith("AVX512")


def default_speed(device: torch.device, amp: bool | None = None, compile: bool = False) -> Speed:
    """The fast path for ``device``, with bf16 where it is native unless ``amp`` says otherwise."""
    amp = bf16_supported(device) if amp is None else amp
    return Speed(amp=amp, channels_last=channels_last_pays(device, amp), fused_optimizer=device.type in ("cuda", "cpu"),
                 log_every=25, compile=compile, keep_freed_memory=device.type == "cpu")


def autocast(device: torch.device, speed: Speed) -> contextlib.AbstractContextManager:
    if not speed.amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep up to 1 GiB of freed memory, instead of mapping (and zeroing) every step's large
    blocks afresh; whether it could."""
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
