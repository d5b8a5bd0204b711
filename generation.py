"""Seeded, batched, guided generation: what ``sample.py``, ``evaluate.py``, the study and the benchmark draw with.

A :class:`Sampling` says how to draw (a sampler of ``ddpm.SAMPLERS``, its steps and eta, the guidance
scale, bf16 or not); :func:`generate` draws any labels in batches from one seeded generator: the same
seed and batch size give the same images. The noise is drawn one batch at a time, so another batch size
draws other images from the same model.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from config import UsageError
from ddpm import DDPM, DEFAULT_GUIDANCE_INTERVAL, DEFAULT_SAMPLER, sampler_class
from speed import Speed, autocast


def describe_interval(interval: tuple[float, float] | None) -> str:
    return "every step" if interval is None else f"{interval[0]:g} < sigma <= {interval[1]:g}"


@dataclass(frozen=True)
class Sampling:
    """How to draw. ``steps`` and ``eta`` left ``None`` take the sampler's own defaults (:meth:`resolve`).

    ``guidance_interval``: the noise levels at which ``guidance`` applies (``None``: all; ``DDPM.step_eps``).
    ``autoguidance``: the scale ``a`` of the guidance by a weaker model (1: off; ``DDPM.guided_eps``); the
    weak model itself is an argument of :func:`generate`.
    """

    sampler: str = DEFAULT_SAMPLER
    steps: int | None = None
    eta: float | None = None
    guidance: float = 2.0
    amp: bool = False
    guidance_interval: tuple[float, float] | None = DEFAULT_GUIDANCE_INTERVAL
    autoguidance: float = 1.0

    def resolve(self, T: int) -> Sampling:
        """The same with the sampler's defaults filled in for ``T`` steps; bad settings are a :class:`UsageError`."""
        try:
            steps, eta = sampler_class(self.sampler).settings(self.steps, self.eta, T)
        except ValueError as err:
            raise UsageError(str(err)) from None
        return replace(self, steps=steps, eta=eta)

    def describe(self) -> str:
        """``"dpm++ 20 steps"``, ``"ddpm (all T steps)"``; with ``", bf16"`` under autocast."""
        interval = ("" if self.guidance_interval == DEFAULT_GUIDANCE_INTERVAL
                    else f", guided {describe_interval(self.guidance_interval)}")
        auto = f", autoguidance {self.autoguidance:g}" if self.autoguidance != 1.0 else ""
        return sampler_class(self.sampler).describe(self.steps or 0) + interval + auto + (", bf16" if self.amp else "")


def requested_labels(digit: int | None, n: int, n_classes: int) -> torch.Tensor:
    """``n`` of one class, or ``n`` rows of ``0..n_classes-1`` (so a 10-wide grid has one class per column)."""
    if digit is None:
        return torch.arange(n_classes).repeat(n)
    return torch.full((n,), digit, dtype=torch.long)


def blended_labels(a: int, b: int, n: int, n_classes: int) -> torch.Tensor:
    """Class weights ``(n, n_classes + 1)`` moving in even steps from one-hot ``a`` to one-hot ``b``.

    The network embeds them as ``(1 - w) * embedding_a + w * embedding_b`` (``unet.ContextUnet``);
    the first and last rows are exactly the pure classes.
    """
    w = torch.linspace(0.0, 1.0, n)[:, None]
    return (1 - w) * F.one_hot(torch.tensor(a), n_classes + 1) + w * F.one_hot(torch.tensor(b), n_classes + 1)


def generate(ddpm: DDPM, labels: torch.Tensor, how: Sampling, seed: int = 0, batch_size: int = 100,
             trajectory: bool = False, shared_noise: bool = False,
             weak: DDPM | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample ``labels`` (``(N,)`` indices or ``(N, K + 1)`` weights) in batches from one seeded generator.

    Runs on ``ddpm``'s device. Returns ``(N, C, H, W)`` in ``[-1, 1]``, and with ``trajectory`` also every
    state ``(S + 1, N, C, H, W)``. ``shared_noise``: every image gets the same noise (see ``DDPM.sample``).
    ``weak``: the model that ``how.autoguidance`` guides away from, on the same device.
    """
    device = ddpm.betas.device
    generator = torch.Generator().manual_seed(seed)
    chunks = labels.split(batch_size)
    out, states = [], []
    for i, chunk in enumerate(chunks):
        with autocast(device, Speed(amp=how.amp)):
            result = ddpm.sample(chunk.to(device), how.guidance, generator=generator, progress=_bar(i, len(chunks)),
                                 return_trajectory=trajectory, shared_noise=shared_noise, weak=weak,
                                 **_sampler_args(how))
        x, steps = result if trajectory else (result, None)
        out.append(x.float().cpu())
        if steps is not None:
            states.append(steps.float())
    return (torch.cat(out), torch.cat(states, dim=1)) if trajectory else torch.cat(out)


def _sampler_args(how: Sampling) -> dict[str, Any]:
    return {"sampler": how.sampler, "steps": how.steps, "eta": how.eta, "guidance_interval": how.guidance_interval,
            "autoguidance": how.autoguidance}


def _bar(i: int, count: int):
    return lambda steps: tqdm(steps, desc=f"batch {i + 1}/{count}", leave=False, file=sys.stderr,
                              dynamic_ncols=True, disable=None)
