"""The samplers, each a function ``run(ddpm, eps, x, noise, how, on_step) -> x_0`` that walks from pure noise
``x`` to an image with ``eps(x, t)`` (``DDPM.guided``), fresh ``noise()`` and the :class:`Sampling` settings
``how``, calling ``on_step(x)`` with every state. Adding one is a function and a line in :data:`SAMPLERS`.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ddpm import DDPM, GUIDANCE, GUIDANCE_INTERVAL, EpsFn, draw_device
from lib.errors import UsageError

DEFAULT_SAMPLER = "dpm++"  # why: docs/results.md
Noise = Callable[[], torch.Tensor]
OnStep = Callable[[torch.Tensor], None]


@dataclass(frozen=True)
class Sampling:
    """How to draw: a sampler of :data:`SAMPLERS`, its ``steps`` and ``eta`` (``None``: its defaults, filled in by
    :meth:`resolve`), the guidance and where it applies, and whether estimates of ``x_0`` are clamped."""

    sampler: str = DEFAULT_SAMPLER
    steps: int | None = None
    eta: float | None = None
    guidance: float = GUIDANCE
    interval: tuple[float, float] | None = GUIDANCE_INTERVAL
    clip: bool = True

    def resolve(self, T: int) -> Sampling:
        """The same with the sampler's defaults filled in for ``T`` steps; bad settings are a :class:`UsageError`."""
        if self.sampler not in SAMPLERS:
            raise UsageError(f"sampler must be one of {', '.join(SAMPLERS)}; got {self.sampler!r}")
        info = SAMPLERS[self.sampler]
        if info.steps is None and self.steps not in (None, T):
            raise UsageError(f"the {self.sampler} sampler always takes all T steps; --steps is for "
                             f"{', '.join(name for name, s in SAMPLERS.items() if s.steps)}")
        if self.steps is not None and not 1 <= self.steps <= T:
            raise UsageError(f"--steps must be between 1 and T={T} for this model, got {self.steps}")
        if info.eta is None and self.eta is not None:
            raise UsageError(f"the {self.sampler} sampler takes no eta")
        steps = self.steps or (T if info.steps is None else min(info.steps, T))
        return replace(self, steps=steps, eta=info.eta if self.eta is None else self.eta)

    def describe(self) -> str:
        """``"dpm++ 20 steps"``, ``"ddpm (all T steps)"``, with the guidance."""
        steps = " (all T steps)" if SAMPLERS[self.sampler].steps is None else f" {self.steps} steps"
        return f"{self.sampler}{steps}, guidance {self.guidance:g}"


def ancestral(ddpm: DDPM, eps: EpsFn, x: torch.Tensor, noise: Noise, how: Sampling, on_step: OnStep) -> torch.Tensor:
    """Algorithm 2 over ``t = T-1 .. 0``: ``x_{t-1} = (x_t - beta_t / sqrt(1 - a_bar_t) eps) / sqrt(alpha_t) +
    sigma_t z``, ``sigma_t^2`` the posterior variance ``beta_tilde_t`` (eq. 7), no noise on the last step."""
    for t in range(ddpm.T - 1, -1, -1):
        mean = ddpm.sqrt_recip_alphas[t] * (x - ddpm.eps_coef[t] * eps(x, t))
        x = mean + ddpm.posterior_variance[t].sqrt() * noise() if t > 0 else mean
        on_step(x)
    return x


def quadratic_timesteps(T: int, steps: int) -> list[int]:
    """``steps`` timesteps from ``T-1`` to 0, spaced quadratically (Song et al. 2020): dense near ``t = 0``."""
    if steps == 1:
        return [T - 1]
    timesteps = (torch.linspace(0, (T - 1) ** 0.5, steps, dtype=torch.float64) ** 2).round().long().tolist()
    for i in range(1, steps):  # near t = 0 the squares can round to the same step
        timesteps[i] = max(timesteps[i], timesteps[i - 1] + 1)
    for i in range(steps - 1, -1, -1):  # and keep room for the steps above
        timesteps[i] = min(timesteps[i], T - steps + i)
    return timesteps[::-1]


def ddim_step(ddpm: DDPM, x: torch.Tensor, x0: torch.Tensor, t: int, t_prev: int, eta: float,
              noise: Noise) -> torch.Tensor:
    """DDIM's step ``x_t -> x_{t_prev}`` (eq. 12) from an estimate ``x0`` (``t_prev = -1``: to ``x_0``); ``eta``
    scales the fresh noise, 0 deterministic, 1 the posterior's."""
    a_t = ddpm.alphas_cumprod[t]
    a_prev = ddpm.alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones_like(a_t)
    eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
    return x_prev + sigma * noise() if eta and t_prev >= 0 else x_prev


def ddim(ddpm: DDPM, eps: EpsFn, x: torch.Tensor, noise: Noise, how: Sampling, on_step: OnStep) -> torch.Tensor:
    """DDIM over ``how.steps`` timesteps; with every timestep, ``eta = 1`` and no clipping it is Algorithm 2."""
    timesteps = quadratic_timesteps(ddpm.T, how.steps)
    for t, t_prev in zip(timesteps, timesteps[1:] + [-1]):
        x = ddim_step(ddpm, x, ddpm.predict_x0(x, eps(x, t), t, how.clip), t, t_prev, how.eta, noise)
        on_step(x)
    return x


def dpm_solver_2m(ddpm: DDPM, eps: EpsFn, x: torch.Tensor, noise: Noise, how: Sampling,
                  on_step: OnStep) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): DDIM's step from the predictions of ``x_0`` at this step and the last,
    taken as linear in ``lambda`` and evaluated halfway: ``x0 + (x0 - x0_before) / (2 r)``, ``r = (lambda_t -
    lambda_before) / (lambda_prev - lambda_t)``. The first and last steps are plain DDIM."""
    timesteps, lam = quadratic_timesteps(ddpm.T, how.steps), ddpm.half_log_snr
    before: tuple[int, torch.Tensor] | None = None  # (t, x0) of the step before
    for t, t_prev in zip(timesteps, timesteps[1:] + [-1]):
        x0 = estimate = ddpm.predict_x0(x, eps(x, t), t, how.clip)
        if before is not None and t_prev >= 0:
            r = (lam[t] - lam[before[0]]) / (lam[t_prev] - lam[t])
            estimate = x0 + (x0 - before[1]) / (2 * r)
        before = (t, x0)
        x = ddim_step(ddpm, x, estimate, t, t_prev, how.eta, noise)
        on_step(x)
    return x


@dataclass(frozen=True)
class SamplerInfo:
    """A registered sampler: its function, a line of help, its default ``steps`` (``None``: all ``T``, no other)
    and ``eta`` (``None``: it takes none)."""

    run: Callable[..., torch.Tensor]
    summary: str
    steps: int | None
    eta: float | None


SAMPLERS: dict[str, SamplerInfo] = {
    "ddpm": SamplerInfo(ancestral, "ancestral sampling over all T steps (Algorithm 2)", None, None),
    "ddim": SamplerInfo(ddim, "DDIM over --steps timesteps", 20, 1.0),
    "dpm++": SamplerInfo(dpm_solver_2m, "DPM-Solver++(2M) over --steps timesteps", 20, 1.2),
}


def draw_noise(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None,
               shared: bool) -> torch.Tensor:
    """``z ~ N(0, I)`` of ``shape``; ``shared``: one image's draw repeated over the batch."""
    source = draw_device(device, generator)
    if shared:
        return torch.randn((1, *shape[1:]), generator=generator, device=source).to(device).expand(shape)
    return torch.randn(shape, generator=generator, device=source).to(device)


@torch.inference_mode()
def sample(ddpm: DDPM, labels: torch.Tensor, how: Sampling = Sampling(), generator: torch.Generator | None = None,
           trajectory: bool = False, shared_noise: bool = False,
           progress: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Images ``(B, C, H, W)`` for ``labels (B,)`` or class weights ``(B, K + 1)``; with ``trajectory`` also every
    state ``(S + 1, B, C, H, W)``; ``shared_noise``: the same noise for every image."""
    how = how.resolve(ddpm.T)
    noise = functools.partial(draw_noise, (labels.shape[0], *ddpm.image_shape), labels.device, generator,
                              shared_noise)
    eps, x = ddpm.guided(labels, how.guidance, how.interval), noise()
    states = [x.cpu()] if trajectory else []
    with tqdm(total=how.steps, leave=False, file=sys.stderr, disable=None if progress else True,
              dynamic_ncols=True) as bar:  # None: shown on a terminal only
        def on_step(state: torch.Tensor) -> None:
            bar.update()
            if trajectory:
                states.append(state.cpu())

        x = SAMPLERS[how.sampler].run(ddpm, eps, x, noise, how, on_step)
    return (x, torch.stack(states)) if trajectory else x


def generate(ddpm: DDPM, labels: torch.Tensor, how: Sampling = Sampling(), seed: int = 0, batch_size: int = 100,
             trajectory: bool = False, shared_noise: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, C, H, W)`` on the CPU for any number of labels, ``batch_size`` at a time, from one generator
    seeded by ``seed``: the same seed and batch size give the same images."""
    device, generator = ddpm.betas.device, torch.Generator().manual_seed(seed)
    results = [sample(ddpm, chunk.to(device), how, generator, trajectory, shared_noise, progress=True)
               for chunk in labels.split(batch_size)]
    if not trajectory:
        return torch.cat([x.float().cpu() for x in results])
    return torch.cat([x.float().cpu() for x, _ in results]), torch.cat([s.float() for _, s in results], dim=1)


def requested_labels(digit: int | None, n: int, n_classes: int) -> torch.Tensor:
    """``n`` of one class, or ``n`` rows of ``0..n_classes-1`` (so a 10-wide grid has one class per column)."""
    return torch.arange(n_classes).repeat(n) if digit is None else torch.full((n,), digit, dtype=torch.long)


def blended_labels(a: int, b: int, n: int, n_classes: int) -> torch.Tensor:
    """Class weights ``(n, n_classes + 1)`` in even steps from one-hot ``a`` to one-hot ``b``."""
    w = torch.linspace(0.0, 1.0, n)[:, None]
    return (1 - w) * F.one_hot(torch.tensor(a), n_classes + 1) + w * F.one_hot(torch.tensor(b), n_classes + 1)
