"""Denoising diffusion (Ho et al. 2020, "DDPM"): noise schedule, training loss and samplers.

Samplers are small step objects (:class:`Sampler`), registered by name in :data:`SAMPLERS`, the one
list the command-line choices, the defaults and the tests read. :meth:`DDPM.sample` is one loop for
all of them: at each timestep it asks the network for the guided noise estimate and hands it to the
sampler's ``step``. Three are registered: the ancestral sampler of DDPM (Algorithm 2, all ``T``
steps); DDIM (Song et al. 2020), which visits a sub-sequence of the timesteps; and DPM-Solver++(2M)
(Lu et al. 2022), the same DDIM step with a second-order estimate of ``x_0`` taken from the last two
steps, which keeps its accuracy with far fewer steps. Adding one is a class and a line in
:data:`SAMPLERS`.

Notation follows the paper, with one difference written down once: timesteps are
0-based. Integer ``t`` in ``[0, T-1]`` here is the paper's step ``t + 1``, so
``alphas_cumprod[t]`` is the paper's ``alpha_bar_{t+1}`` and ``t = 0`` is the last
(least noisy) reverse step, the one that adds no noise.

Images live in ``[-1, 1]`` inside this module; ``data.py`` converts at the boundary.

Classifier-free guidance (Ho & Salimans 2022) lives in :meth:`DDPM.guided_eps`
alone. Labels are dropped during training with probability ``p_uncond`` by
replacing them with the model's learned "no label" token (``model.null_label``).
At sampling time::

    eps = eps_uncond + s * (eps_cond - eps_uncond)

``s = 0`` is unconditional, ``s = 1`` plain conditional, ``s > 1`` sharpens the class.
The paper's form ``(1 + w) * eps_cond - w * eps_uncond`` is the same with ``s = 1 + w``.

Autoguidance (Karras et al. 2024) may be added to it, in the same method: a weaker model of the same
schedule (e.g. an earlier snapshot of the same run) is asked for the same label, and the estimate moves
away from it, ``+ (a - 1) * (eps_cond - eps_weak)``; ``a = 1`` is off. With ``s = 1`` it is Karras et al.'s
``eps_weak + a * (eps_cond - eps_weak)``.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

# The sampler used when none is asked for: a name in SAMPLERS (below). Why this one: docs/quality.md.
DEFAULT_SAMPLER = "dpm++"
# Noise levels sigma at which a guidance above 1 applies by default (None: every step); see DDPM.step_eps.
# The interval of Kynkaanniemi et al. 2024; why it is the default: docs/quality.md.
DEFAULT_GUIDANCE_INTERVAL: tuple[float, float] | None = (0.28, 5.42)


def linear_beta_schedule(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """``beta_t`` rising linearly from ``beta_start`` to ``beta_end`` (Ho et al. 2020, Sec. 4): ``(T,)`` float64."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def cosine_beta_schedule(T: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: ``alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2)`` normalised to 1 at
    ``t = 0``; betas clipped at 0.999 so the last step stays finite. ``(T,)`` float64."""
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(max=0.999)


BETA_SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "v", "x0")
LOSS_WEIGHTS = ("uniform", "min-snr", "truncated-snr")
T_SAMPLINGS = ("uniform", "log-normal", "stratified")
NOISE_PAIRINGS = ("random", "assign", "knn")


def beta_schedule(kind: str, T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """The betas ``(T,)`` float64 of schedule ``kind`` (:data:`BETA_SCHEDULES`)."""
    return linear_beta_schedule(T, beta_start, beta_end) if kind == "linear" else cosine_beta_schedule(T)


def extract(coefficients: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Gather ``coefficients[t]`` per sample and shape it to broadcast: ``(B,) -> (B, 1, ..., 1)``."""
    return coefficients[t].reshape(t.shape[0], *([1] * (ndim - 1)))


def _draw_device(device: torch.device, generator: torch.Generator | None) -> torch.device:
    # Draw on the generator's own device, so a CPU generator gives the same
    # numbers whatever device the model runs on.
    return generator.device if generator is not None else device


def _randn(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=_draw_device(device, generator)).to(device)


def _noise(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None,
           shared: bool) -> torch.Tensor:
    """``z ~ N(0, I)`` of ``shape``; ``shared``: one image's draw repeated over the batch."""
    if shared:
        return _randn((1, *shape[1:]), device, generator).expand(shape)
    return _randn(shape, device, generator)


def greedy_assignment(cost: torch.Tensor) -> torch.Tensor:
    """For a square ``cost (B, B)``, ``column (B,)``: row ``i`` gets column ``column[i]``, each column once,
    the cheapest remaining pair taken first (greedy; an optimal assignment can be cheaper in total)."""
    # one read-back per row: fine for a batch of 32 on a CPU, a stall per row on a GPU
    cost, n = cost.clone(), cost.shape[0]
    column = torch.empty(n, dtype=torch.long, device=cost.device)
    for _ in range(n):
        i, j = divmod(int(cost.argmin()), n)
        column[i] = j
        cost[i, :], cost[:, j] = math.inf, math.inf
    return column


class DDPM(nn.Module):
    """Wraps a network ``eps_model(x_t, t, labels)`` with the DDPM process.

    Args:
        eps_model: network as in ``unet.ContextUnet`` (must expose ``null_label``, ``in_channels`` and
            ``image_size``). It predicts what ``prediction`` names; the samplers always receive noise
            estimates (:meth:`network_eps` converts).
        T: number of diffusion steps.
        beta_start, beta_end: ends of the linear beta schedule.
        p_uncond: probability of dropping a label during training.
        schedule: ``"linear"`` (Ho et al.) or ``"cosine"`` (Nichol & Dhariwal 2021; ignores the betas).
        prediction: ``"eps"`` (the noise, Ho et al.), ``"v"`` (Salimans & Ho 2022) or ``"x0"``.
        loss_weight: ``"uniform"`` (plain MSE on the target), ``"min-snr"`` (Hang et al. 2023, with
            ``snr_gamma``) or ``"truncated-snr"`` (Salimans & Ho 2022, with ``snr_floor``); see
            :meth:`loss_weights`.
        t_sampling: how training draws ``t``: ``"uniform"`` (Algorithm 1), ``"log-normal"``, the noise
            levels of EDM (Karras et al. 2022): ``log sigma ~ N(log_sigma_mean, log_sigma_std^2)``, see
            :meth:`timestep_probabilities`, or ``"stratified"``: uniform, but one draw in each ``1/B`` of
            ``[0, T)`` per batch (the low-discrepancy sampler of Kingma et al. 2021), see :meth:`stratified_t`.
        noise_pairing: which noise draw each training image gets: ``"random"`` (Algorithm 1), ``"assign"`` (the
            batch's draws, each given to a near image) or ``"knn"`` (the nearest of ``noise_candidates`` draws
            of its own), the two forms of immiscible diffusion (Li et al. 2024, 2025); see :meth:`pair_noise`.
    """

    def __init__(
        self,
        eps_model: nn.Module,
        T: int = 500,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        p_uncond: float = 0.1,
        schedule: str = "linear",
        prediction: str = "eps",
        loss_weight: str = "uniform",
        snr_gamma: float = 5.0,
        t_sampling: str = "uniform",
        log_sigma_mean: float = -1.2,
        log_sigma_std: float = 1.2,
        snr_floor: float = 1.0,
        noise_pairing: str = "random",
        noise_candidates: int = 64,
    ) -> None:
        super().__init__()
        if T < 1:
            raise ValueError(f"T must be at least 1, got {T}")
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        for name, value, known in (("schedule", schedule, BETA_SCHEDULES), ("prediction", prediction, PREDICTIONS),
                                   ("loss_weight", loss_weight, LOSS_WEIGHTS),
                                   ("t_sampling", t_sampling, T_SAMPLINGS),
                                   ("noise_pairing", noise_pairing, NOISE_PAIRINGS)):
            if value not in known:
                raise ValueError(f"{name} must be one of {', '.join(known)}, got {value!r}")
        self.eps_model, self.T, self.p_uncond = eps_model, T, p_uncond
        self.prediction, self.loss_weight, self.snr_gamma = prediction, loss_weight, snr_gamma
        self.t_sampling, self.snr_floor = t_sampling, snr_floor
        self.noise_pairing, self.noise_candidates = noise_pairing, noise_candidates
        self.self_cond = bool(getattr(eps_model, "self_cond", False))
        self.image_shape = (eps_model.in_channels, eps_model.image_size, eps_model.image_size)
        coefficients = self.schedule(beta_schedule(schedule, T, beta_start, beta_end))
        coefficients["t_probabilities"] = self.timestep_probabilities(
            coefficients["half_log_snr"], log_sigma_mean, log_sigma_std)
        for name, value in coefficients.items():
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
            # eps coefficient in the mean of Algorithm 2: beta_t / sqrt(1 - alpha_bar_t)
            "eps_coef": betas / (1.0 - alphas_cumprod).sqrt(),
            # beta_tilde_t of eq. 7; zero at t = 0, so the last step adds no noise
            "posterior_variance": betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            # lambda_t = log(sqrt(alpha_bar_t) / sqrt(1 - alpha_bar_t)), the time variable of DPM-Solver
            "half_log_snr": 0.5 * (alphas_cumprod.log() - (1.0 - alphas_cumprod).log()),
            # signal-to-noise ratio alpha_bar / (1 - alpha_bar), for Min-SNR loss weights
            "snr": alphas_cumprod / (1.0 - alphas_cumprod),
        }

    @staticmethod
    def timestep_probabilities(half_log_snr: torch.Tensor, mean: float, std: float) -> torch.Tensor:
        """``(T,)`` probabilities of each ``t`` when ``log sigma ~ N(mean, std^2)`` (EDM's p_train, Karras et
        al. 2022, Table 1; their defaults -1.2 and 1.2), ``sigma = sqrt((1 - a_bar) / a_bar)``.

        Step ``t`` gets the normal's mass between the midpoints of its ``log sigma`` and its neighbours';
        the tails go to the first and last step. From float64 ``half_log_snr (T,)`` (``log sigma = -it``).
        """
        log_sigma = -half_log_snr
        edges = torch.cat((log_sigma.new_tensor([-math.inf]), (log_sigma[1:] + log_sigma[:-1]) / 2,
                           log_sigma.new_tensor([math.inf])))
        cdf = torch.special.ndtr((edges - mean) / std)
        return cdf[1:] - cdf[:-1]

    def stratified_t(self, offset: torch.Tensor, batch: int) -> torch.Tensor:
        """``(B,)`` timesteps ``floor(T * ((offset + i / B) mod 1))``, ``i = 0..B-1``, from one uniform ``offset
        (1,)``: each is uniform on ``[0, T-1]``, but together they cover ``[0, T)`` evenly, which lowers the
        variance of the batch's loss (the low-discrepancy sampler of Kingma et al. 2021)."""
        u = (offset + torch.arange(batch, device=offset.device) / batch) % 1.0
        return (u * self.T).long().clamp_(max=self.T - 1)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Diffuse clean images to step ``t`` (eq. 4): ``x_t = sqrt(a_bar) x0 + sqrt(1 - a_bar) eps``."""
        return (
            extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise
        )

    def draw_training_noise(
        self, batch: int, shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The random part of Algorithm 1 for ``batch`` images of ``shape (C, H, W)``.

        Returns ``t (B,)`` in ``[0, T-1]`` (uniform, or as ``t_sampling`` says), ``noise (B, C, H, W)`` (``(B, K,
        C, H, W)``, ``K = noise_candidates`` draws per image, under ``noise_pairing="knn"``) and ``drop (B,)``,
        true where the label is replaced by the "no label" token (probability ``p_uncond``).
        """
        source = _draw_device(device, generator)
        if self.t_sampling == "uniform":
            t = torch.randint(0, self.T, (batch,), generator=generator, device=source).to(device)
        elif self.t_sampling == "stratified":
            t = self.stratified_t(torch.rand(1, generator=generator, device=source), batch).to(device)
        else:
            t = torch.multinomial(self.t_probabilities.to(source), batch, replacement=True,
                                  generator=generator).to(device)
        candidates = (self.noise_candidates,) if self.noise_pairing == "knn" else ()
        noise = _randn((batch, *candidates, *shape), device, generator)
        drop = torch.rand(batch, generator=generator, device=source).to(device) < self.p_uncond
        return t, noise, drop

    def loss(
        self,
        x0: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
        draws: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Simplified training objective (Algorithm 1, eq. 14) with label dropout.

        ``x0 (B, C, H, W)`` in ``[-1, 1]``, ``labels (B,)`` -> scalar MSE between the network's output and its
        :meth:`target` (the noise, as in the paper, unless ``prediction`` says otherwise), per timestep
        weighted by :meth:`loss_weights` unless ``loss_weight="uniform"``.
        ``draws`` (from :meth:`draw_training_noise`) are drawn here from ``generator`` when not given.
        """
        if draws is None:
            draws = self.draw_training_noise(x0.shape[0], tuple(x0.shape[1:]), x0.device, generator)
        t, noise, drop = draws
        noise = self.pair_noise(x0, noise)
        labels = torch.where(drop, torch.full_like(labels, self.eps_model.null_label), labels)
        x_t = self.q_sample(x0, t, noise)
        out = self.network(x_t, t, labels, self.training_estimate(x_t, t, labels))
        target = self.target(x0, t, noise)
        if self.loss_weight == "uniform":
            return F.mse_loss(out, target)
        per_image = (out.float() - target).pow(2).mean(dim=tuple(range(1, x0.ndim)))
        return (self.loss_weights(t) * per_image).mean()

    def pair_noise(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The noise ``(B, C, H, W)`` each image of ``x0 (B, C, H, W)`` is diffused with, from the draws ``noise``.

        ``"random"``: the draws as they are. ``"assign"``: the same ``B`` draws, reordered so that each image
        gets a near one (greedily, the closest remaining pair first: a cheap stand-in for the linear
        assignment of Li et al. 2024); each is still ``N(0, I)``. ``"knn"``: of each image's ``K`` draws
        ``(B, K, C, H, W)``, the nearest (Li et al. 2025), a slightly shorter vector than a free draw.
        With several processes, ``"assign"`` pairs within each process's part of the batch.
        """
        if self.noise_pairing == "knn":
            distance = (noise.float() - x0.float().unsqueeze(1)).flatten(2).square().sum(-1)
            return noise[torch.arange(len(noise), device=noise.device), distance.argmin(dim=1)]
        if self.noise_pairing == "assign":
            return noise[greedy_assignment(torch.cdist(x0.flatten(1).float(), noise.flatten(1).float()))]
        return noise

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network learns to output at ``x_t``: the noise, ``x0``, or
        ``v = sqrt(a_bar) eps - sqrt(1 - a_bar) x0`` (Salimans & Ho 2022, Sec. 4)."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        return (extract(self.sqrt_alphas_cumprod, t, x0.ndim) * noise
                - extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Per-timestep weights ``(B,)`` of the loss on the network's target.

        In units of the x0 loss (``|x0 - x0_hat|^2``) the noise loss weighs ``SNR`` and the v loss ``SNR + 1``.
        Min-SNR-gamma (Hang et al. 2023) weighs ``min(SNR, gamma)``, truncated SNR (Salimans & Ho 2022, there
        with a floor of 1) ``max(SNR, floor)``: the noise loss with the nearly pure-noise steps kept in. Both
        are divided by the target's own weight (``SNR`` for eps, ``SNR + 1`` for v)."""
        snr = self.snr[t]
        if self.loss_weight == "min-snr":
            weight = snr.clamp(max=self.snr_gamma)
        else:
            weight = snr.clamp(min=self.snr_floor)
        return {"eps": weight / snr, "v": weight / (snr + 1), "x0": weight}[self.prediction]

    def network(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                x0_estimate: torch.Tensor | None = None) -> torch.Tensor:
        """The network's own output at ``x_t``; ``x0_estimate`` reaches only a self-conditioned network."""
        return self.eps_model(x, t, labels, x0_estimate) if self.self_cond else self.eps_model(x, t, labels)

    def training_estimate(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """Self-conditioning's input in training (Chen et al. 2022, Sec. 3.2): for the first half of the batch the
        network's own estimate of ``x0`` given none, without a gradient and clamped to ``[-1, 1]`` as the samplers
        clamp it; zeros ("no estimate yet") for the rest. ``None`` without ``self_cond``.

        The first half, not a coin per batch: the same cost every step, and no read-back of a random draw. The
        batch is in shuffled order, so which images get an estimate is random.
        """
        if not self.self_cond:
            return None
        half = x_t.shape[0] // 2
        estimate = torch.zeros_like(x_t)
        if half:
            with torch.no_grad():
                x, t_half = x_t[:half], t[:half]
                estimate[:half] = self.predict_x0(x, self.network_eps(x, t_half, labels[:half]), t_half)
        return estimate

    def network_eps(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                    x0_estimate: torch.Tensor | None = None) -> torch.Tensor:
        """The network's output at ``x_t (B, C, H, W)`` as a noise estimate, whatever it predicts.

        From ``x_t = sqrt(a) x0 + sqrt(1 - a) eps``: ``eps = (x_t - sqrt(a) x0) / sqrt(1 - a)`` and
        ``eps = sqrt(a) v + sqrt(1 - a) x_t``. ``x0_estimate`` reaches a self-conditioned network (zeros when
        ``None``); any other network ignores it.
        """
        out = self.network(x, t, labels, x0_estimate)
        if self.prediction == "eps":
            return out
        sqrt_a = extract(self.sqrt_alphas_cumprod, t, x.ndim)
        sqrt_1ma = extract(self.sqrt_one_minus_alphas_cumprod, t, x.ndim)
        if self.prediction == "v":
            return sqrt_a * out + sqrt_1ma * x
        return (x - sqrt_a * out) / sqrt_1ma

    def forward(self, x0: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None,
                draws: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The training loss (:meth:`loss`), so that DDP can wrap the whole DDPM."""
        return self.loss(x0, labels, generator, draws)

    def null_labels_like(self, labels: torch.Tensor) -> torch.Tensor:
        """The "no label" token in the form of ``labels``: indices ``(B,)`` or class weights ``(B, K + 1)``."""
        null = self.eps_model.null_label
        if labels.is_floating_point():
            return F.one_hot(torch.full(labels.shape[:1], null, device=labels.device), labels.shape[1]).to(labels)
        return torch.full_like(labels, null)

    def guided_eps(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: float,
                   weak: DDPM | None = None, autoguidance: float = 1.0,
                   estimates: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Classifier-free guided noise estimate ``eps_u + s (eps_c - eps_u)`` with ``s = guidance``.

        ``labels`` are class indices ``(B,)`` or class weights ``(B, K + 1)`` (see ``unet.ContextUnet``).
        One network call: the conditional and unconditional halves share a batch.
        ``s = 1`` and ``s = 0`` need only one of them and skip the other. With a ``weak`` model and
        ``autoguidance = a != 1``, plus ``(a - 1) (eps_c - eps_weak)``, ``eps_weak`` the weak model's
        estimate for the same labels (Karras et al. 2024). ``estimates``: self-conditioning's state
        (:meth:`branch_eps`); a self-conditioned weak model reads zeros.
        """
        autoguided = weak is not None and autoguidance != 1.0
        if guidance == 0.0 and not autoguided:
            return self.branch_eps(x, t, self.null_labels_like(labels), estimates, ("uncond",))
        if guidance == 1.0:
            eps = eps_cond = self.branch_eps(x, t, labels, estimates, ("cond",))
        else:
            null = self.null_labels_like(labels)
            eps_cond, eps_uncond = self.branch_eps(torch.cat((x, x)), torch.cat((t, t)), torch.cat((labels, null)),
                                                   estimates, ("cond", "uncond")).chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        if autoguided:
            eps = eps + (autoguidance - 1) * (eps_cond - weak.network_eps(x, t, labels))
        return eps

    def branch_eps(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                   estimates: dict[str, torch.Tensor] | None, branches: tuple[str, ...]) -> torch.Tensor:
        """:meth:`network_eps` for a batch of ``len(branches)`` equal parts, one per guidance branch (``"cond"``,
        ``"uncond"``). For a self-conditioned network, part ``i`` reads ``estimates[branches[i]]`` (zeros if it
        has none yet) and leaves there the clean image its own noise estimate implies, clamped to ``[-1, 1]``:
        each branch reads its own estimate, as in training, where a dropped label's estimate was made without it.
        """
        if not self.self_cond or estimates is None:
            return self.network_eps(x, t, labels)
        parts = x.chunk(len(branches))
        given = torch.cat([estimates[name] if name in estimates else torch.zeros_like(part)
                           for name, part in zip(branches, parts)])
        eps = self.network_eps(x, t, labels, given)
        estimates.update(zip(branches, self.predict_x0(x, eps, t).chunk(len(branches))))
        return eps

    def check_weak(self, weak: DDPM) -> None:
        """``ValueError`` unless ``weak`` can guide this model: the same images, classes and noise schedule.

        Its width, prediction target and training may differ; the guidance compares noise estimates.
        """
        if weak.image_shape != self.image_shape or weak.eps_model.n_classes != self.eps_model.n_classes:
            raise ValueError(f"the weak model draws {weak.image_shape} images of {weak.eps_model.n_classes} classes, "
                             f"this one {self.image_shape} of {self.eps_model.n_classes}")
        same = weak.T == self.T and torch.allclose(weak.alphas_cumprod.cpu(), self.alphas_cumprod.cpu())
        if not same:
            raise ValueError(f"the weak model has another noise schedule (T={weak.T}, this one T={self.T}); "
                             "use a checkpoint trained with the same --T, --schedule and betas")

    def check_autoguidance(self, weak: DDPM | None, autoguidance: float) -> None:
        """``ValueError`` if ``autoguidance != 1`` has no ``weak`` model, or ``weak`` fails :meth:`check_weak`."""
        if weak is not None:
            self.check_weak(weak)
        elif autoguidance != 1.0:
            raise ValueError(f"autoguidance {autoguidance:g} needs a weak model to guide away from")

    def ddim_timesteps(self, steps: int) -> list[int]:
        """``steps`` distinct timesteps from ``T-1`` down to ``0`` (``1 <= steps <= T``).

        Spaced quadratically (Song et al. 2020, Appendix D.2): dense near ``t = 0``, where the
        details of a digit form.
        """
        if not 1 <= steps <= self.T:
            raise ValueError(f"steps must be between 1 and T={self.T}, got {steps}")
        if steps == 1:
            return [self.T - 1]
        grid = torch.linspace(0, (self.T - 1) ** 0.5, steps, dtype=torch.float64) ** 2
        timesteps = grid.round().long().tolist()
        for i in range(1, steps):  # near t = 0 the squares can round to the same step
            timesteps[i] = max(timesteps[i], timesteps[i - 1] + 1)
        for i in range(steps - 1, -1, -1):  # and keep room for the steps above
            timesteps[i] = min(timesteps[i], self.T - steps + i)
        return timesteps[::-1]

    def predict_x0(self, x: torch.Tensor, eps: torch.Tensor, t: int | torch.Tensor,
                   clip_x0: bool = True) -> torch.Tensor:
        """The clean image implied by a noise estimate (eq. 15): ``(x_t - sqrt(1 - a_bar) eps) / sqrt(a_bar)``.

        ``t`` is one step for the whole batch, or one per image ``(B,)``. ``clip_x0`` clamps the result to the
        data range ``[-1, 1]``, as the reference implementations do: at high noise ``1 / sqrt(a_bar)``
        magnifies small errors in eps, and a deterministic sampler never washes them out.
        """
        sqrt_1ma, sqrt_a = self.sqrt_one_minus_alphas_cumprod, self.sqrt_alphas_cumprod
        if torch.is_tensor(t):
            sqrt_1ma, sqrt_a = extract(sqrt_1ma, t, x.ndim), extract(sqrt_a, t, x.ndim)
        else:
            sqrt_1ma, sqrt_a = sqrt_1ma[t], sqrt_a[t]
        x0 = (x - sqrt_1ma * eps) / sqrt_a
        return x0.clamp(-1.0, 1.0) if clip_x0 else x0

    def posterior_step(self, x: torch.Tensor, eps: torch.Tensor, t: int, z: torch.Tensor | None) -> torch.Tensor:
        """Algorithm 2, line 4: ``x_{t-1} = (x_t - beta_t / sqrt(1 - a_bar_t) eps) / sqrt(alpha_t) + sigma_t z``.

        ``sigma_t^2`` is the posterior variance ``beta_tilde_t`` (eq. 7), zero at ``t = 0``; no noise is added
        when ``z`` is ``None``.
        """
        mean = self.sqrt_recip_alphas[t] * (x - self.eps_coef[t] * eps)
        if t == 0 or z is None:
            return mean
        return mean + self.posterior_variance[t].sqrt() * z

    def ddim_update(
        self, x: torch.Tensor, x0: torch.Tensor, t: int, t_prev: int, eta: float, z: torch.Tensor | None = None
    ) -> torch.Tensor:
        """DDIM's step ``x_t -> x_{t_prev}`` (Song et al. 2020, eq. 12) given an estimate ``x0`` of the clean image.

        The noise direction is re-derived from ``x_t`` and ``x0``; ``t_prev = -1`` means "to x_0".
        ``eta`` scales the fresh noise ``z ~ N(0, I)``: 0 is deterministic, 1 the posterior's (eq. 7).
        """
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones_like(a_t)
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta == 0 or t_prev < 0 or z is None:
            return x_prev
        return x_prev + sigma * z

    def extrapolate_x0(
        self, x0: torch.Tensor, x0_before: torch.Tensor, t_before: int, t: int, t_prev: int
    ) -> torch.Tensor:
        """DPM-Solver++(2M)'s estimate of ``x_0`` for the step ``t -> t_prev`` (Lu et al. 2022, Algorithm 2).

        ``x0`` and ``x0_before`` were predicted at ``t`` and at the step before, ``t_before``. Taken as a
        linear function of ``lambda`` (``half_log_snr``), the prediction is evaluated halfway through the
        step: ``x0 + (x0 - x0_before) / (2 r)`` with ``r = (lambda_t - lambda_before) / (lambda_prev - lambda_t)``.
        """
        lam = self.half_log_snr
        r = (lam[t] - lam[t_before]) / (lam[t_prev] - lam[t])
        return x0 + (x0 - x0_before) / (2 * r)

    @torch.inference_mode()
    def sample(
        self,
        labels: torch.Tensor,
        guidance: float = 2.0,
        generator: torch.Generator | None = None,
        return_trajectory: bool = False,
        progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
        sampler: str = DEFAULT_SAMPLER,
        steps: int | None = None,
        eta: float | None = None,
        clip_x0: bool = True,
        shared_noise: bool = False,
        guidance_interval: tuple[float, float] | None = DEFAULT_GUIDANCE_INTERVAL,
        weak: DDPM | None = None,
        autoguidance: float = 1.0,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Generate images for any labels ``(B,)`` (or class weights ``(B, K + 1)``) with a registered sampler.

        ``sampler`` names a class in :data:`SAMPLERS`; ``steps`` and ``eta`` left ``None`` take its defaults.
        ``clip_x0`` is passed to samplers that estimate ``x_0``. Returns ``x_0 (B, C, H, W)`` in roughly
        ``[-1, 1]`` (the ancestral sampler's last step is not clipped; the samplers that estimate ``x_0`` end on
        their estimate, clipped when ``clip_x0``); with ``return_trajectory`` also every state from ``x_T`` to
        ``x_0`` as ``(S + 1, B, C, H, W)`` on the CPU. ``progress`` may wrap the step iterator (e.g. ``tqdm``).
        ``shared_noise`` gives every image the same noise at the start and at every step, so that the images
        differ only by label. Where guidance applies: :meth:`step_eps`. The loop is Algorithm 2's: estimate
        the noise, take a step, add fresh noise except on the last step.
        """
        solver = make_sampler(sampler, self, steps, eta, clip_x0)
        self.check_autoguidance(weak, autoguidance)
        shape = (labels.shape[0], *self.image_shape)
        noise = functools.partial(_noise, shape, labels.device, generator, shared_noise)
        x = noise()
        trajectory = [x.cpu()] if return_trajectory else None
        pairs = list(zip(solver.timesteps, solver.timesteps[1:] + [-1]))
        guided = self.guided_steps(guidance_interval)  # read once: a per-step read would wait for the device
        estimates: dict[str, torch.Tensor] = {}  # self-conditioning's, per guidance branch (branch_eps)
        for t, t_prev in progress(pairs) if progress else pairs:
            eps = self.step_eps(x, t, labels, guidance, guided[t], weak, autoguidance, estimates)
            x = solver.step(x, eps, t, t_prev, noise() if solver.adds_noise(t_prev) else None)
            if trajectory is not None:
                trajectory.append(x.cpu())
        return (x, torch.stack(trajectory)) if trajectory is not None else x

    def step_eps(self, x: torch.Tensor, t: int, labels: torch.Tensor, guidance: float, guided: bool,
                 weak: DDPM | None, autoguidance: float, estimates: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`guided_eps` at sampling step ``t`` for the whole batch ``x (B, C, H, W)``.

        A ``guidance`` above 1, and ``autoguidance`` by a ``weak`` model, apply only at a ``guided`` step (one
        inside the guidance interval, :meth:`guided_steps`); ``guidance <= 1`` applies at every step.
        ``estimates`` carries a self-conditioned network's clean-image estimates from step to step
        (:meth:`branch_eps`).
        """
        scale = guidance if guidance <= 1 or guided else 1.0
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        return self.guided_eps(x, t_batch, labels, scale, weak, autoguidance if guided else 1.0, estimates)

    def guided_steps(self, interval: tuple[float, float] | None) -> list[bool]:
        """For each timestep, whether its noise level lies in the guidance ``interval = (lo, hi)``: ``lo < sigma_t
        <= hi`` with ``sigma_t = sqrt((1 - a_bar_t) / a_bar_t)`` (Kynkaanniemi et al. 2024); all if ``None``."""
        if interval is None:
            return [True] * self.T
        sigma = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt().tolist()
        return [interval[0] < s <= interval[1] for s in sigma]


class Sampler:
    """One way to walk the reverse process, made for one run (in the spirit of diffusers' schedulers).

    It knows its ``timesteps`` (from ``T - 1`` down to ``0``) and takes one step ``x_t -> x_{t_prev}``
    from the guided noise estimate ``eps`` (``t_prev = -1``: to ``x_0``); it may keep state between steps.
    Subclasses set ``name``, ``summary`` and their defaults: ``default_steps`` (``None``: every one of the
    ``T`` timesteps, and no other count) and ``default_eta`` (``None``: the sampler takes no ``eta``).
    """

    name = ""
    summary = ""
    default_steps: int | None = 20
    default_eta: float | None = 1.0

    def __init__(self, ddpm: DDPM, steps: int | None = None, eta: float | None = None, clip_x0: bool = True) -> None:
        self.ddpm, self.clip_x0 = ddpm, clip_x0
        self.steps, self.eta = self.settings(steps, eta, ddpm.T)
        self.timesteps = self.make_timesteps()

    @classmethod
    def settings(cls, steps: int | None, eta: float | None, T: int) -> tuple[int, float | None]:
        """``(steps, eta)`` with the defaults filled in for a schedule of ``T`` steps; ``ValueError`` if invalid."""
        if cls.default_steps is None and steps not in (None, T):
            raise ValueError(f"the {cls.name} sampler always takes all T steps; "
                             f"steps are for {', '.join(fewer_step_samplers())}")
        if cls.default_eta is None and eta is not None:
            raise ValueError(f"the {cls.name} sampler takes no eta; eta is for {', '.join(eta_samplers())}")
        if steps is not None and not 1 <= steps <= T:
            raise ValueError(f"steps must be at most T={T} for this model, got {steps}")
        default = T if cls.default_steps is None else min(cls.default_steps, T)
        return steps or default, cls.default_eta if eta is None else eta

    def make_timesteps(self) -> list[int]:
        return self.ddpm.ddim_timesteps(self.steps)

    def adds_noise(self, t_prev: int) -> bool:
        """Whether the step to ``t_prev`` takes fresh noise ``z`` (never the last step)."""
        return t_prev >= 0 and bool(self.eta)

    def step(self, x: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int, z: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def describe(cls, steps: int) -> str:
        return f"{cls.name} (all T steps)" if cls.default_steps is None else f"{cls.name} {steps} steps"


class Ancestral(Sampler):
    """Algorithm 2 of Ho et al. 2020 over every timestep, with the posterior's noise."""

    name, summary = "ddpm", "ancestral sampling over all T steps (Algorithm 2)"
    default_steps, default_eta = None, None

    def make_timesteps(self) -> list[int]:
        return list(range(self.ddpm.T - 1, -1, -1))

    def adds_noise(self, t_prev: int) -> bool:
        return t_prev >= 0

    def step(self, x: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int, z: torch.Tensor | None) -> torch.Tensor:
        return self.ddpm.posterior_step(x, eps, t, z)


class DDIM(Sampler):
    """DDIM (Song et al. 2020, eq. 12) on a quadratically spaced sub-sequence of the timesteps.

    With every timestep, ``eta = 1`` and ``clip_x0=False`` its step is exactly the ancestral one.
    """

    name, summary = "ddim", "DDIM over --steps timesteps"

    def step(self, x: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int, z: torch.Tensor | None) -> torch.Tensor:
        return self.ddpm.ddim_update(x, self.ddpm.predict_x0(x, eps, t, self.clip_x0), t, t_prev, self.eta, z)


class DPMSolverPP2M(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022): DDIM's step on :meth:`DDPM.extrapolate_x0`'s second-order ``x_0``.

    The first and the last step (to ``x_0``) are plain DDIM. With ``eta = 1`` this is the stochastic
    solver of Lu et al. (their "SDE-DPM-Solver++(2M)"), with ``eta = 0`` the deterministic one.
    """

    name, summary = "dpm++", "DPM-Solver++(2M) over --steps timesteps"
    default_eta = 1.2  # a little more noise than the posterior's: see docs/quality.md

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.before: tuple[int, torch.Tensor] | None = None  # (t, predicted x_0) of the previous step

    def step(self, x: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int, z: torch.Tensor | None) -> torch.Tensor:
        x0 = self.ddpm.predict_x0(x, eps, t, self.clip_x0)
        estimate = x0
        if self.before is not None and t_prev >= 0:
            estimate = self.ddpm.extrapolate_x0(x0, self.before[1], self.before[0], t, t_prev)
        self.before = (t, x0)
        return self.ddpm.ddim_update(x, estimate, t, t_prev, self.eta, z)


# The registry, name -> sampler class: the one list the command lines, their defaults and the tests read.
SAMPLERS: dict[str, type[Sampler]] = {cls.name: cls for cls in (Ancestral, DDIM, DPMSolverPP2M)}


def fewer_step_samplers() -> list[str]:
    return [name for name, cls in SAMPLERS.items() if cls.default_steps is not None]


def eta_samplers() -> list[str]:
    return [name for name, cls in SAMPLERS.items() if cls.default_eta is not None]


def sampler_class(name: str) -> type[Sampler]:
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {name!r}")
    return SAMPLERS[name]


def make_sampler(name: str, ddpm: DDPM, steps: int | None = None, eta: float | None = None,
                 clip_x0: bool = True) -> Sampler:
    """The registered sampler ``name`` for one run on ``ddpm``."""
    return sampler_class(name)(ddpm, steps, eta, clip_x0)
