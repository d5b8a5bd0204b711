"""The diffusion core against the paper, every expectation derived here and not by the code it checks.

The schedule is recomputed in Python floats (float64) from its definition (Ho et al. 2020): ``beta_t``
linear from ``beta_start`` to ``beta_end``, ``a_bar_t = prod_{s <= t} (1 - beta_s)``, with the project's
0-based ``t``. The network is replaced by stubs whose outputs are known, so that what the core does with
them (the forward process, the training target, label dropout, guidance, the timesteps it hands over)
can be written out by hand.
"""

from __future__ import annotations

import itertools
import math
import operator

import pytest
import torch
from torch import nn

from ddpm import DDPM
from lib.samplers import Sampling, ancestral, sample


# The buffers are float32 (computed in float64): what they hold matches the float64 derivations here to float32's
# precision, so comparisons allow 1e-6 relative.
CLOSE = dict(rtol=1e-6, atol=1e-7)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def schedule(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> tuple[list[float], list[float]]:
    """``betas`` and ``a_bar`` of the linear schedule, in Python floats."""
    betas = [beta_start + (beta_end - beta_start) * i / (T - 1) for i in range(T)]
    return betas, list(itertools.accumulate((1 - b for b in betas), operator.mul))


def column(values: list[float], t: list[int]) -> torch.Tensor:
    """``values[t]`` per image, shaped ``(B, 1, 1, 1)`` to broadcast over images, in float64."""
    return torch.tensor([values[i] for i in t], dtype=torch.float64).view(-1, 1, 1, 1)


class Stub(nn.Module):
    """A network that returns ``output(x, t, labels)`` and records every call: what the core hands it."""

    in_channels, image_size, n_classes, null_label = 1, 4, 10, 10

    def __init__(self, output=lambda x, t, labels: torch.zeros_like(x)) -> None:
        super().__init__()
        self.output, self.calls = output, []

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.clone(), t.clone(), labels.clone()))
        return self.output(x, t, labels)


def stub_ddpm(stub: Stub, T: int = 500, **kwargs) -> DDPM:
    return DDPM(stub, T=T, **kwargs).double().eval()


def draw(ddpm: DDPM, how: Sampling, labels: torch.Tensor = torch.tensor([1, 2])) -> torch.Tensor:
    return sample(ddpm, labels, how, torch.Generator().manual_seed(0))


def test_schedule_buffers_are_the_papers_coefficients():
    ddpm = DDPM(Stub(), T=500)
    betas, a_bar = schedule(500)
    for t in (0, 1, 249, 498, 499):
        b, a, a_prev = betas[t], a_bar[t], a_bar[t - 1] if t else 1.0
        expected = {
            "betas": b, "alphas_cumprod": a, "sqrt_alphas_cumprod": math.sqrt(a),
            "sqrt_one_minus_alphas_cumprod": math.sqrt(1 - a), "sqrt_recip_alphas": 1 / math.sqrt(1 - b),
            "eps_coef": b / math.sqrt(1 - a),  # Algorithm 2: beta_t / sqrt(1 - a_bar_t)
            "posterior_variance": b * (1 - a_prev) / (1 - a),  # eq. 7's beta_tilde_t
            "half_log_snr": 0.5 * math.log(a / (1 - a)),
        }
        for name, value in expected.items():
            buffer = getattr(ddpm, name)
            assert buffer.dtype == torch.float32 and buffer.shape == (500,)
            assert buffer[t].item() == pytest.approx(value, rel=2e-6, abs=1e-12), (name, t)


def test_q_sample_is_eq_4():
    ddpm, (_, a_bar) = stub_ddpm(Stub()), schedule(500)
    t = [0, 100, 250, 499]
    x0, noise = torch.rand(4, 1, 4, 4, dtype=torch.float64) * 2 - 1, torch.randn(4, 1, 4, 4, dtype=torch.float64)
    a = column(a_bar, t)
    torch.testing.assert_close(ddpm.q_sample(x0, torch.tensor(t), noise), a.sqrt() * x0 + (1 - a).sqrt() * noise,
                               **CLOSE)


def test_the_ancestral_sampler_steps_to_the_posterior_of_eq_7():
    """Algorithm 2 over T = 4 steps with a stub noise estimate ``eps = 0.1 x_t`` and given draws of ``z``: each step
    is eq. 7's posterior mean at the ``x_0`` the estimate implies, plus ``sqrt(beta_tilde_t) z``; the last step
    (``t = 0``) adds no noise."""
    betas, a_bar = schedule(4, 0.1, 0.4)
    ddpm = DDPM(Stub(), T=4, beta_start=0.1, beta_end=0.4).double()
    start, *draws = torch.randn(4, 2, 1, 4, 4, dtype=torch.float64)
    given = iter([d.clone() for d in draws])
    x = ancestral(ddpm, lambda x, t: 0.1 * x, start.clone(), lambda: next(given), Sampling("ddpm"), lambda x: None)
    expected, noise = start, iter(draws)
    for t in (3, 2, 1, 0):
        b, a, a_prev = betas[t], a_bar[t], a_bar[t - 1] if t else 1.0
        x0 = (expected - math.sqrt(1 - a) * 0.1 * expected) / math.sqrt(a)  # eq. 4 solved for x_0
        mean = math.sqrt(a_prev) * b / (1 - a) * x0 + math.sqrt(1 - b) * (1 - a_prev) / (1 - a) * expected
        expected = mean + math.sqrt(b * (1 - a_prev) / (1 - a)) * next(noise) if t else mean
    torch.testing.assert_close(x, expected, **CLOSE)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_the_training_loss_hands_the_network_x_t_t_and_the_dropped_labels(prediction):
    """Algorithm 1 with the draws fixed: the network sees ``x_t`` of eq. 4, the drawn ``t`` and the labels with
    the dropped ones replaced by the "no label" token, and the loss is the mean squared error of its output
    against the noise, or against ``v = sqrt(a_bar) eps - sqrt(1 - a_bar) x_0`` (Salimans & Ho 2022, Sec. 4)."""
    output = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    ddpm, (_, a_bar) = stub_ddpm(Stub(lambda x, t, labels: output), prediction=prediction), schedule(500)
    t, drop = [0, 7, 250, 499], torch.tensor([False, True, False, True])
    x0, noise = torch.rand(4, 1, 4, 4, dtype=torch.float64) * 2 - 1, torch.randn(4, 1, 4, 4, dtype=torch.float64)
    loss = ddpm.loss(x0, torch.tensor([3, 5, 7, 9]), draws=(torch.tensor(t), noise, drop))
    (x_t, t_seen, labels_seen), = ddpm.model.calls
    a = column(a_bar, t)
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise, **CLOSE)
    assert t_seen.tolist() == t and labels_seen.tolist() == [3, 10, 7, 10]
    target = noise if prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * x0
    assert loss.item() == pytest.approx((output - target).pow(2).mean().item(), rel=1e-6)


def test_labels_are_dropped_with_probability_p_uncond():
    ddpm = stub_ddpm(Stub(), T=10, p_uncond=0.3)
    _, _, drop = ddpm.draw_training_noise(20_000, (1, 1, 1), torch.device("cpu"), torch.Generator().manual_seed(0))
    # a binomial share of 20,000 draws: standard deviation sqrt(0.3 * 0.7 / 20,000) = 0.0032; allow 5 of them
    assert drop.float().mean().item() == pytest.approx(0.3, abs=0.016)


def test_a_v_output_is_turned_into_the_noise_it_implies():
    """From ``x_t = sqrt(a) x_0 + sqrt(1 - a) eps`` and ``v = sqrt(a) eps - sqrt(1 - a) x_0``: a network that
    outputs the true ``v`` gives back the true noise."""
    _, a_bar = schedule(500)
    t = [0, 100, 499]
    a = column(a_bar, t)
    x0, eps = torch.rand(3, 1, 4, 4, dtype=torch.float64) * 2 - 1, torch.randn(3, 1, 4, 4, dtype=torch.float64)
    x_t, v = a.sqrt() * x0 + (1 - a).sqrt() * eps, a.sqrt() * eps - (1 - a).sqrt() * x0
    ddpm = stub_ddpm(Stub(lambda x, t, labels: v), prediction="v")
    torch.testing.assert_close(ddpm.network_eps(x_t, torch.tensor(t), torch.tensor([1, 2, 3])), eps, **CLOSE)


def label_values(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each image's output is its label plus one, and -1 for "no label" (10): the halves tell themselves apart."""
    value = torch.where(labels == 10, -1.0, labels + 1.0).to(x.dtype)
    return value.view(-1, 1, 1, 1).expand_as(x)


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0])
def test_guidance_is_eps_uncond_plus_s_times_the_difference(scale):
    """``eps = eps_u + s (eps_c - eps_u)`` (Ho & Salimans 2022): with eps_c = label + 1 and eps_u = -1 per image,
    ``-1 + s (label + 2)``."""
    ddpm = stub_ddpm(Stub(label_values), T=10)
    x, labels = torch.zeros(3, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 4, 9])
    eps = ddpm.guided_eps(x, torch.full((3,), 5), labels, scale)
    expected = torch.tensor([-1 + scale * (k + 2) for k in (0, 4, 9)], dtype=torch.float64)
    torch.testing.assert_close(eps[:, 0, 0, 0], expected)
    asked = torch.cat([labels for _, _, labels in ddpm.model.calls]).tolist()
    assert sorted(asked) == sorted({0.0: [10] * 3, 1.0: [0, 4, 9]}.get(scale, [0, 4, 9, 10, 10, 10]))


# The default sampler's 20 timesteps on T = 500: round((i * sqrt(499) / 19)^2) for i = 19, 18, ..., 0 (quadratic
# spacing, Song et al. 2020, App. D.2), written out.
DEFAULT_TIMESTEPS = [499, 448, 399, 354, 311, 271, 234, 199, 167, 138, 112, 88, 68, 50, 35, 22, 12, 6, 1, 0]


@pytest.mark.parametrize("sampler, T, expected", [("ddpm", 10, list(range(9, -1, -1))),
                                                  ("dpm++", 500, DEFAULT_TIMESTEPS)])
def test_the_sampler_hands_the_network_each_timestep_in_turn(sampler, T, expected):
    ddpm = stub_ddpm(Stub(), T=T)
    draw(ddpm, Sampling(sampler, guidance=1.0))
    seen = [t for _, t, _ in ddpm.model.calls]
    assert all(len(set(t.tolist())) == 1 for t in seen) and [int(t[0]) for t in seen] == expected


def test_guidance_applies_only_at_noise_levels_inside_the_interval():
    """The default interval ``0.28 < sigma_t <= 5.42``, ``sigma_t = sqrt((1 - a_bar_t) / a_bar_t)`` (Kynkaanniemi
    et al. 2024): a guided step asks the network twice (one batch of both halves), another once."""
    _, a_bar = schedule(500)
    inside = [t for t in DEFAULT_TIMESTEPS if 0.28 < math.sqrt((1 - a_bar[t]) / a_bar[t]) <= 5.42]
    assert inside == [399, 354, 311, 271, 234, 199, 167, 138, 112, 88, 68]  # 11 of the 20
    for guidance, guided in ((2.0, inside), (0.5, DEFAULT_TIMESTEPS)):  # a scale <= 1 applies at every step
        ddpm = stub_ddpm(Stub(), T=500)
        draw(ddpm, Sampling(guidance=guidance))
        doubled = [int(t[0]) for _, t, labels in ddpm.model.calls if len(labels) == 4]
        assert doubled == guided, guidance
