"""The network's shapes and inputs, and the samplers: their registry and settings, their agreement with each
other, and their accuracy on Gaussian data with its exact denoiser."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ddpm import DDPM, extract
from lib import samplers
from lib.errors import UsageError
from lib.samplers import SAMPLERS, Sampling, ddim_step, generate, quadratic_timesteps, sample
from unet import ContextUnet


def tiny_ddpm(T: int = 10, seed: int = 0) -> DDPM:
    torch.manual_seed(seed)
    return DDPM(ContextUnet(1, 8, 10), T=T, beta_start=1e-3, beta_end=0.2).eval()


def run(ddpm: DDPM, labels: torch.Tensor, seed: int = 0, trajectory: bool = False, **how) -> torch.Tensor:
    return sample(ddpm, labels, Sampling(**how), torch.Generator().manual_seed(seed), trajectory)


def test_schedule_is_not_saved_in_state_dict():
    assert all(key.startswith("model.") for key in tiny_ddpm().state_dict())


def test_extract_broadcasts_per_sample():
    out = extract(torch.arange(10.0), torch.tensor([3, 7]), ndim=4)
    assert out.shape == (2, 1, 1, 1) and out.flatten().tolist() == [3.0, 7.0]


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_network_output_shapes(batch):
    model = ContextUnet(1, 16, 10)
    x, t = torch.randn(batch, 1, 28, 28), torch.randint(0, 500, (batch,))
    conditional = model(x, t, torch.randint(0, 10, (batch,)))
    unconditional = model(x, t, torch.full((batch,), model.null_label))
    assert conditional.shape == unconditional.shape == (batch, 1, 28, 28)
    assert not torch.allclose(conditional, unconditional)


def test_network_rejects_bad_width():
    with pytest.raises(ValueError):
        ContextUnet(1, 12, 10)


@pytest.mark.parametrize("cond_encoder", [False, True])
def test_network_uses_time_and_label(cond_encoder):
    torch.manual_seed(0)
    model, x = ContextUnet(1, 8, 10, cond_encoder=cond_encoder), torch.randn(2, 1, 28, 28)
    base = model(x, torch.tensor([5, 5]), torch.tensor([1, 1]))
    assert not torch.allclose(base, model(x, torch.tensor([6, 6]), torch.tensor([1, 1])))
    assert not torch.allclose(base, model(x, torch.tensor([5, 5]), torch.tensor([2, 2])))


def test_encoder_conditioning_adds_two_small_mlps_and_keeps_the_convolutions():
    plain, conditioned = ContextUnet(1, 16, 10), ContextUnet(1, 16, 10, cond_encoder=True)
    extra = set(conditioned.state_dict()) - set(plain.state_dict())
    assert extra and all(key.startswith("encoder_embed.") for key in extra)
    assert set(plain.state_dict()) <= set(conditioned.state_dict())


def test_sampler_is_seeded_and_takes_any_labels():
    ddpm, labels = tiny_ddpm(), torch.tensor([7, 7, 3])  # not a multiple of 10
    a, b, c = (run(ddpm, labels, seed, sampler="ddpm") for seed in (42, 42, 43))
    assert a.shape == (3, 1, 28, 28)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_trajectory_only_when_asked():
    ddpm, labels = tiny_ddpm(T=6), torch.tensor([1, 2])
    x = run(ddpm, labels, sampler="ddpm")
    x2, trajectory = run(ddpm, labels, trajectory=True, sampler="ddpm")
    assert isinstance(x, torch.Tensor) and trajectory.shape == (7, 2, 1, 28, 28)
    torch.testing.assert_close(trajectory[-1], x2)
    torch.testing.assert_close(x, x2)


@pytest.mark.parametrize("T, steps", [(500, 20), (500, 100), (500, 500), (200, 7), (10, 1), (10, 2), (8, 4),
                                      (1000, 999)])
def test_quadratic_timesteps(T, steps):
    timesteps = quadratic_timesteps(T, steps)
    assert len(timesteps) == steps and len(set(timesteps)) == steps
    assert timesteps[0] == T - 1 and (steps == 1 or timesteps[-1] == 0)
    assert all(a > b for a, b in zip(timesteps, timesteps[1:]))


def test_ddim_with_every_step_and_eta_1_is_the_ancestral_sampler():
    """With all T timesteps and eta = 1, DDIM's update is Algorithm 2's: same noise, same images."""
    ddpm, labels = tiny_ddpm(T=10), torch.arange(10).repeat(20)
    a = run(ddpm, labels, sampler="ddpm")
    how = dict(sampler="ddim", steps=10, eta=1.0, clip=False)
    torch.testing.assert_close(run(ddpm, labels, **how), a, rtol=1e-3, atol=1e-3)
    c = run(ddpm, labels, seed=1, **how)  # and in distribution, with independent noise
    assert c.mean().item() == pytest.approx(a.mean().item(), abs=0.05)
    assert c.std().item() == pytest.approx(a.std().item(), rel=0.05)


def test_ddim_eta_0_is_deterministic_given_the_start():
    ddpm, labels = tiny_ddpm(T=50), torch.tensor([3, 8])
    a, trajectory = run(ddpm, labels, trajectory=True, sampler="ddim", steps=5, eta=0.0)
    assert trajectory.shape == (6, 2, 1, 28, 28)
    torch.testing.assert_close(a, run(ddpm, labels, sampler="ddim", steps=5, eta=0.0), rtol=0, atol=0)


def test_ddim_step_is_eq_12():
    """One DDIM step against Song et al.'s eq. 12 written out with the schedule recomputed here: the clean
    image, plus the direction to x_t, plus sigma z with sigma of eq. 16."""
    ddpm, x, x0, z = tiny_ddpm(T=20).double(), *torch.randn(3, 2, 1, 28, 28, dtype=torch.float64)
    a_bar = math.prod(1 - (1e-3 + (0.2 - 1e-3) * i / 19) for i in range(16))  # t = 15
    a_prev = math.prod(1 - (1e-3 + (0.2 - 1e-3) * i / 19) for i in range(10))  # t = 9
    eps = (x - math.sqrt(a_bar) * x0) / math.sqrt(1 - a_bar)
    for eta in (0.0, 1.0):
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_bar) * (1 - a_bar / a_prev))
        expected = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps + sigma * z
        torch.testing.assert_close(ddim_step(ddpm, x, x0, 15, 9, eta, lambda: z), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ddim_step(ddpm, x, x0, 15, -1, 1.0, lambda: z), x0)  # the last step: x_0 itself


def test_dpm_solver_in_two_steps_is_ddim():
    """Its first step and its last step (to x_0) are plain DDIM steps, so with two steps it is DDIM."""
    ddpm, labels = tiny_ddpm(T=20), torch.tensor([2, 9])
    for eta in (0.0, 1.0):
        torch.testing.assert_close(run(ddpm, labels, sampler="dpm++", steps=2, eta=eta),
                                   run(ddpm, labels, sampler="ddim", steps=2, eta=eta), rtol=0, atol=0)
    assert not torch.allclose(run(ddpm, labels, sampler="dpm++", steps=3), run(ddpm, labels, sampler="ddim", steps=3))


class GaussianEps(nn.Module):
    """The exact noise predictor when every pixel of class ``k`` is independently ``N(means[k], std^2)``.

    ``x_t ~ N(sqrt(a) m, a std^2 + 1 - a)``, so ``E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) m) / (a std^2 + 1 - a)``.
    """

    in_channels, image_size, null_label = 1, 28, 2

    def __init__(self, means: list[float], std: float, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.means, self.std, self.alphas_cumprod = torch.tensor(means, dtype=torch.float64), std, alphas_cumprod

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        a, m = self.alphas_cumprod[t].view(-1, 1, 1, 1), self.means[labels].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * m) / (a * self.std**2 + 1 - a)


def gaussian_ddpm(T: int = 1000) -> DDPM:
    ddpm = DDPM(GaussianEps([0.3, -0.2, 0.0], 0.25, torch.zeros(T)), T=T).double()
    ddpm.model.alphas_cumprod = ddpm.alphas_cumprod
    return ddpm


def test_dpm_solver_is_second_order_where_ddim_is_first():
    """Deterministic sampling of Gaussian data with its exact denoiser, against the exact solution.

    For Gaussian pixels the probability-flow ODE keeps ``(x_t - sqrt(a) m) / sqrt(a std^2 + 1 - a)``
    constant, so the exact ``x_0`` is known for every starting noise. Halving the step should halve
    DDIM's error (first order) and quarter DPM-Solver++(2M)'s (second order).
    """
    ddpm = gaussian_ddpm()
    labels = torch.tensor([0, 1, 2, 0])
    a_T, m = ddpm.alphas_cumprod[-1], ddpm.model.means[labels].view(-1, 1, 1, 1)
    x_T = torch.randn((4, 1, 28, 28), generator=torch.Generator().manual_seed(0)).double()
    exact = m + 0.25 * (x_T - a_T.sqrt() * m) / (a_T * 0.25**2 + 1 - a_T).sqrt()

    def error(sampler: str, steps: int) -> float:
        x = run(ddpm, labels, sampler=sampler, steps=steps, eta=0.0, guidance=1.0, clip=False)
        return (x - exact).abs().mean().item()

    ddim = [error("ddim", n) for n in (40, 80, 160)]
    dpm = [error("dpm++", n) for n in (40, 80, 160)]
    assert all(1.6 < a / b < 2.5 for a, b in zip(ddim, ddim[1:])), ddim
    assert all(a / b > 3.5 for a, b in zip(dpm, dpm[1:])), dpm
    assert dpm[0] < ddim[0] / 5, (dpm, ddim)


def test_stochastic_samplers_in_20_steps_keep_the_mean_and_dpm_the_spread():
    """With eta = 1 and 20 steps both keep each class's mean; DPM-Solver++'s spread is the data's (0.25)."""
    ddpm, labels = gaussian_ddpm(T=500), torch.tensor([0, 1]).repeat(50)
    for sampler in ("ddim", "dpm++"):
        x = run(ddpm, labels, sampler=sampler, steps=20, eta=1.0, guidance=1.0, clip=False)
        assert x[0::2].mean().item() == pytest.approx(0.3, abs=0.01)
        assert x[1::2].mean().item() == pytest.approx(-0.2, abs=0.01)
    assert x[0::2].std().item() == pytest.approx(0.25, abs=0.03)


# Seeded outputs of every registered sampler, computed by the code before samplers became functions (tiny_ddpm(T=10),
# labels 0 3 7, guidance 2 at every step, generator seed 1): the sum, and every 301st value. A regression check
# of the rewrite, not a derivation (tests/test_core.py derives the steps).
PINNED = {
    ("ddpm", None, None): (62.568352, [-1.249844, 3.085385, -0.416807, -1.406697, 2.122213, 1.956699, 1.618166,
                                      1.271732]),
    ("ddim", 4, 1.0): (43.948886, [-0.888011, 0.942333, -1.0, -0.750906, 0.793247, 0.950287, 0.970909, 0.998951]),
    ("ddim", 4, 0.0): (72.631903, [-1.0, 1.0, -0.96679, 0.024157, 1.0, 1.0, 1.0, 1.0]),
    ("dpm++", 4, 1.0): (19.31933, [-0.856791, 0.905538, -0.999515, -1.0, 0.565096, 0.934722, 0.906949, 0.999427]),
    ("dpm++", 4, 0.0): (75.115999, [-1.0, 1.0, -0.956909, 0.049128, 1.0, 1.0, 1.0, 0.999842]),
}


@pytest.mark.parametrize("sampler, steps, eta", list(PINNED))
def test_pinned_seeded_output_of_each_sampler(sampler, steps, eta):
    x = run(tiny_ddpm(), torch.tensor([0, 3, 7]), seed=1, sampler=sampler, steps=steps, eta=eta, interval=None)
    total, values = PINNED[(sampler, steps, eta)]
    assert x.double().sum().item() == pytest.approx(total, abs=1e-3)
    assert x.flatten()[::301].tolist() == pytest.approx(values, abs=1e-4)


def test_every_sampler_has_a_pin_and_its_defaults_apply():
    assert {name for name, _, _ in PINNED} == set(SAMPLERS)
    defaults = {"ddpm": (50, None), "ddim": (20, 1.0), "dpm++": (20, 1.2)}  # README: steps and eta of each
    for name in SAMPLERS:
        how = Sampling(name).resolve(50)
        assert (how.steps, how.eta) == defaults[name]


@pytest.mark.parametrize("name, steps, eta, words", [
    ("ddpm", 5, None, "always takes all T steps"), ("ddpm", None, 0.5, "takes no eta"),
    ("ddim", 11, None, "between 1 and T=10"), ("dpm++", 0, None, "between 1 and T=10"),
    ("euler", None, None, "sampler must be one of ddpm, ddim, dpm++"),
])
def test_sampler_settings_are_checked(name, steps, eta, words):
    with pytest.raises(UsageError, match=words.replace("+", "\\+")):
        Sampling(name, steps, eta).resolve(10)


def euler(ddpm, eps, x, noise, how, on_step):
    """A toy sampler: Euler steps of the probability-flow ODE in ``sqrt(a_bar)``-scaled coordinates."""
    timesteps = quadratic_timesteps(ddpm.T, how.steps)
    for t, t_prev in zip(timesteps, timesteps[1:] + [-1]):
        a_t = ddpm.alphas_cumprod[t]
        a_prev = ddpm.alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones_like(a_t)
        e = eps(x, t)
        x = a_prev.sqrt() * (x / a_t.sqrt() + ((1 / a_prev - 1).sqrt() - (1 / a_t - 1).sqrt()) * e)
        on_step(x)
    return x


def test_a_registered_sampler_is_one_function_and_one_line(monkeypatch):
    """Adding a sampler is a function and a registry entry: sample() (and so the command lines) find it by name."""
    monkeypatch.setitem(samplers.SAMPLERS, "euler", samplers.SamplerInfo(euler, "Euler steps", 10, None))
    ddpm = tiny_ddpm(T=20)
    x, trajectory = run(ddpm, torch.tensor([1, 2]), trajectory=True, sampler="euler")
    assert x.shape == (2, 1, 28, 28) and trajectory.shape == (11, 2, 1, 28, 28) and torch.isfinite(x).all()
    assert Sampling("euler").resolve(20).describe() == "euler 10 steps, guidance 2"


def test_generate_gives_the_same_images_at_the_same_seed_and_batch_size():
    ddpm, labels, how = tiny_ddpm(), torch.arange(6), Sampling(steps=3)
    first = generate(ddpm, labels, how, seed=1, batch_size=3)
    torch.testing.assert_close(generate(ddpm, labels, how, seed=1, batch_size=3), first, rtol=0, atol=0)
    # the noise is drawn one batch at a time (README, --batch-size): another batch size, other images
    assert not torch.allclose(generate(ddpm, labels, how, seed=1, batch_size=6), first)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_runs_with_every_prediction(prediction, sampler):
    torch.manual_seed(0)
    ddpm = DDPM(ContextUnet(1, 8, 10), T=50, beta_start=1e-3, beta_end=0.2, prediction=prediction).eval()
    x = run(ddpm, torch.arange(3), sampler=sampler)
    assert x.shape == (3, 1, 28, 28) and torch.isfinite(x).all()
