"""The fast path: switches that change how fast training runs, never what it computes.

Each switch is chosen by device (:func:`default_speed`) and can be turned off from the
command line, so a slow "plain" run (fp32, a DataLoader, eager, one host sync per step) is
always one flag away for debugging and for side-by-side benchmarks (``benchmarks/bench.py``).
"""

from __future__ import annotations

import contextlib
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
    """

    amp: bool = False
    channels_last: bool = False
    fused_optimizer: bool = False
    on_device_data: bool = True
    log_every: int = 1
    compile: bool = False


PLAIN = Speed(amp=False, channels_last=False, fused_optimizer=False, on_device_data=False, log_every=1,
              compile=False)


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
    )


def with_switches_off(speed: Speed, off: list[str]) -> Speed:
    """``speed`` with the named boolean switches turned off."""
    return replace(speed, **{name: False for name in off})


def autocast(device: torch.device, speed: Speed) -> contextlib.AbstractContextManager:
    if not speed.amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def prepare_model(model: nn.Module, speed: Speed) -> None:
    """Apply the memory layout and compile in place (state-dict keys stay unchanged)."""
    if speed.channels_last:
        model.to(memory_format=torch.channels_last)
    if speed.compile:
        model.compile()
