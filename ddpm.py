"""Denoising diffusion (Ho et al. 2020): the noise schedule, the forward process, the training target and
classifier-free guidance. The samplers are in ``lib/samplers.py``.

Timesteps are 0-based: ``t`` in ``[0, T-1]`` is the paper's step ``t + 1`` (``alphas_cumprod[t]`` is its
``alpha_bar_{t+1}``), and ``t = 0`` is the last reverse step, which adds no noise. Images are in ``[-1, 1]``.

Guidance (Ho & Salimans 2022): training drops labels with probability ``p_uncond`` for the network's "no label"
token; sampling takes ``eps = eps_uncond + s (eps_cond - eps_uncond)`` (the paper's ``w`` is ``s - 1``), a scale
above 1 only where ``lo < sigma_t <= hi`` (Kynkaanniemi et al. 2024). :data:`GUIDANCE` and
:data:`GUIDANCE_INTERVAL` are the defaults, here and nowhere else.
"""

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

GUIDANCE = 2.0
GUIDANCE_INTERVAL: tuple[float, float] | None = (0.28, 5.42)  # why these: docs/results.md
PREDICTIONS = ("eps", "v")

# eps(x_t, t) for a batch at one timestep: what a sampler asks for at each step
EpsFn = Callable[[torch.Tensor, int], torch.Tensor]


def linear_betas(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """``beta_t`` rising linearly from ``beta_start`` to ``beta_end`` (Ho et al. 2020, Sec. 4): ``(T,)`` float64."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def extract(coefficients: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Gather ``coefficients[t]`` per sample and shape it to broadcast: ``(B,) -> (B, 1, ..., 1)``."""
    return coefficients[t].reshape(t.shape[0], *([1] * (ndim - 1)))


def draw_device(device: torch.device, generator: torch.Generator | None) -> torch.device:
    """Where to draw random numbers: on the generator's device, so a CPU generator draws the same on any device."""
    return generator.device if generator is not None else device


class DDPM(nn.Module):
    """A network ``model(x_t, t, labels)`` (``unet.ContextUnet``: it exposes ``null_label``, ``in_channels`` and
    ``image_size``) with the DDPM process around it: ``T`` steps of a linear beta schedule, the noise or
    ``v = sqrt(a_bar) eps - sqrt(1 - a_bar) x0`` (Salimans & Ho 2022) as its target, labels dropped at ``p_uncond``."""

    def __init__(self, model: nn.Module, T: int = 500, beta_start: float = 1e-4, beta_end: float = 0.02,
                 prediction: str = "eps", p_uncond: float = 0.1) -> None:
        super().__init__()
        if T < 1 or not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"need T >= 1 and 0 < beta_start <= beta_end < 1, got {T}, {beta_start}, {beta_end}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
        self.model, self.T, self.prediction, self.p_uncond = model, T, prediction, p_uncond
        self.image_shape = (model.in_channels, model.image_size, model.image_size)
        for name, value in self.schedule(linear_betas(T, beta_start, beta_end)).items():
            self.register_buffer(name, value.float(), persistent=False)

    @staticmethod
    def schedule(betas: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every per-step coefficient of float64 ``betas (T,)``, computed once in float64; each ``(T,)``."""
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat((torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]))
        return {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas": alphas.rsqrt(),
            # the eps coefficient in the mean of Algorithm 2: beta_t / sqrt(1 - a_bar_t)
            "eps_coef": betas / (1.0 - alphas_cumprod).sqrt(),
            # beta_tilde_t of eq. 7; zero at t = 0, so the last step adds no noise
            "posterior_variance": betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            # lambda_t = log(sqrt(a_bar_t) / sqrt(1 - a_bar_t)), the time variable of DPM-Solver
            "half_log_snr": 0.5 * (alphas_cumprod.log() - (1.0 - alphas_cumprod).log()),
            # sigma_t = sqrt((1 - a_bar_t) / a_bar_t), the noise level of the guidance interval
            "sigmas": ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt(),
        }

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Diffuse clean images to step ``t`` (eq. 4): ``x_t = sqrt(a_bar) x0 + sqrt(1 - a_bar) eps``."""
        return (extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network learns to output at ``x_t``: the noise, or ``v = sqrt(a_bar) eps - sqrt(1 - a_bar) x0``."""
        if self.prediction == "eps":
            return noise
        return (extract(self.sqrt_alphas_cumprod, t, x0.ndim) * noise
                - extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)

    def draw_training_noise(self, batch: int, shape: tuple[int, ...], device: torch.device,
                            generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
        """The random part of Algorithm 1: ``t (B,)`` uniform in ``[0, T-1]``, the noise and ``drop (B,)``."""
        source = draw_device(device, generator)
        t = torch.randint(0, self.T, (batch,), generator=generator, device=source).to(device)
        noise = torch.randn((batch, *shape), generator=generator, device=source).to(device)
        drop = torch.rand(batch, generator=generator, device=source).to(device) < self.p_uncond
        return t, noise, drop

    def loss(self, x0: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None,
             draws: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """Algorithm 1 (eq. 14) with label dropout: the MSE of the network's output at ``x_t`` against its
        :meth:`target`; ``x0 (B, C, H, W)`` in ``[-1, 1]``, ``draws`` as :meth:`draw_training_noise` gives them."""
        t, noise, drop = draws or self.draw_training_noise(x0.shape[0], tuple(x0.shape[1:]), x0.device, generator)
        labels = torch.where(drop, torch.full_like(labels, self.model.null_label), labels)
        return F.mse_loss(self.model(self.q_sample(x0, t, noise), t, labels), self.target(x0, t, noise))

    def forward(self, x0: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None,
                draws: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """The training loss (:meth:`loss`), so that DDP can wrap the whole DDPM."""
        return self.loss(x0, labels, generator, draws)

    def network_eps(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The network's output as a noise estimate; for ``v``, ``eps = sqrt(a_bar) v + sqrt(1 - a_bar) x_t``."""
        out = self.model(x, t, labels)
        if self.prediction == "eps":
            return out
        return extract(self.sqrt_alphas_cumprod, t, x.ndim) * out + extract(self.sqrt_one_minus_alphas_cumprod, t,
                                                                             x.ndim) * x

    def guided_eps(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
        """``eps_u + s (eps_c - eps_u)``, ``s = scale``, at ``x (B, C, H, W)`` for labels ``(B,)`` or class weights
        ``(B, K + 1)``: both halves in one network call, one of them only at ``s = 1`` or ``0``."""
        null = null_labels_like(labels, self.model.null_label)
        if scale in (0.0, 1.0):
            return self.network_eps(x, t, labels if scale else null)
        both = self.network_eps(torch.cat((x, x)), torch.cat((t, t)), torch.cat((labels, null)))
        eps_cond, eps_uncond = both.chunk(2)
        return eps_uncond + scale * (eps_cond - eps_uncond)

    def guided(self, labels: torch.Tensor, scale: float = GUIDANCE,
               interval: tuple[float, float] | None = GUIDANCE_INTERVAL) -> EpsFn:
        """``eps(x, t)`` for a sampler: :meth:`guided_eps` at ``scale`` inside the interval (everywhere for ``None``),
        plain conditional outside; a scale of at most 1 applies at every step."""
        inside = [interval is None or interval[0] < s <= interval[1] for s in self.sigmas.tolist()]

        def eps(x: torch.Tensor, t: int) -> torch.Tensor:
            t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            return self.guided_eps(x, t_batch, labels, scale if scale <= 1 or inside[t] else 1.0)

        return eps

    def predict_x0(self, x: torch.Tensor, eps: torch.Tensor, t: int, clip: bool = True) -> torch.Tensor:
        """The clean image an estimate implies (eq. 15), clamped to ``[-1, 1]`` with ``clip`` (at high noise
        ``1 / sqrt(a_bar)`` magnifies the estimate's errors)."""
        x0 = (x - self.sqrt_one_minus_alphas_cumprod[t] * eps) / self.sqrt_alphas_cumprod[t]
        return x0.clamp(-1.0, 1.0) if clip else x0


def null_labels_like(labels: torch.Tensor, null: int) -> torch.Tensor:
    """The "no label" token in the form of ``labels``: indices ``(B,)`` or class weights ``(B, K + 1)``."""
    if labels.is_floating_point():
        return F.one_hot(torch.full(labels.shape[:1], null, device=labels.device), labels.shape[1]).to(labels)
    return torch.full_like(labels, null)
