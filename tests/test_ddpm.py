"""Schedule, forward process, network shapes, guidance and the sampler."""

from __future__ import annotations

import pytest
import torch

from torch import nn

import ddpm as ddpm_module
from ddpm import DDPM, SAMPLERS, Ancestral, DDIM, DPMSolverPP2M, Sampler, extract, make_sampler
from generation import Sampling, generate
from unet import ContextUnet


def tiny_ddpm(T: int = 10, seed: int = 0) -> DDPM:
    torch.manual_seed(seed)
    return DDPM(ContextUnet(1, 8, 10), T=T, beta_start=1e-3, beta_end=0.2).eval()


def test_schedule_pinned_values():
    ddpm = DDPM(ContextUnet(1, 8, 10), T=500)  # the ancestor's schedule: 1e-4 .. 0.02 over 500 steps
    expected = {  # t = 0, 249, 499
        "betas": [1e-4, 0.01003006012, 0.02],
        "alphas_cumprod": [0.9999, 0.2806852976, 0.006352710797],
        "posterior_variance": [0.0, 0.009990406231, 0.01999739048],
        "eps_coef": [0.01, 0.01182616864, 0.0200638314],
        "sqrt_recip_alphas": [1.000050004, 1.005053074, 1.010152545],
        "half_log_snr": [4.605120183, -0.4705324261, -2.526250342],
    }
    for name, values in expected.items():
        buffer = getattr(ddpm, name)
        assert buffer.dtype == torch.float32 and buffer.shape == (500,)
        assert buffer[[0, 249, 499]].tolist() == pytest.approx(values, rel=1e-6, abs=1e-12), name


def test_schedule_is_not_saved_in_state_dict():
    assert all(key.startswith("eps_model.") for key in tiny_ddpm().state_dict())


def test_extract_broadcasts_per_sample():
    coefficients = torch.arange(10.0)
    out = extract(coefficients, torch.tensor([3, 7]), ndim=4)
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


def test_network_uses_time_and_label():
    torch.manual_seed(0)
    model = ContextUnet(1, 8, 10)
    x = torch.randn(2, 1, 28, 28)
    base = model(x, torch.tensor([5, 5]), torch.tensor([1, 1]))
    assert not torch.allclose(base, model(x, torch.tensor([6, 6]), torch.tensor([1, 1])))
    assert not torch.allclose(base, model(x, torch.tensor([5, 5]), torch.tensor([2, 2])))


def test_guidance_formula():
    ddpm = tiny_ddpm()
    x, t, labels = torch.randn(4, 1, 28, 28), torch.tensor([0, 3, 6, 9]), torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        cond = ddpm.eps_model(x, t, labels)
        uncond = ddpm.eps_model(x, t, torch.full_like(labels, 10))
        torch.testing.assert_close(ddpm.guided_eps(x, t, labels, 1.0), cond)
        torch.testing.assert_close(ddpm.guided_eps(x, t, labels, 0.0), uncond)
        torch.testing.assert_close(ddpm.guided_eps(x, t, labels, 3.0), uncond + 3.0 * (cond - uncond),
                                   rtol=1e-4, atol=1e-5)
        # the batched path agrees with the single-pass path at s = 1 up to float error
        torch.testing.assert_close(ddpm.guided_eps(x, t, labels, 1.0 + 1e-9), cond, rtol=1e-4, atol=1e-5)


def test_loss_is_finite_and_drops_labels():
    ddpm = tiny_ddpm()
    seen = []
    forward = ddpm.eps_model.forward
    ddpm.eps_model.forward = lambda x, t, labels: (seen.append(labels.clone()), forward(x, t, labels))[1]
    ddpm.p_uncond = 0.5
    loss = ddpm.loss(torch.rand(64, 1, 28, 28) * 2 - 1, torch.arange(64) % 10, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and loss.ndim == 0
    dropped = (seen[0] == 10).float().mean().item()
    assert 0.3 < dropped < 0.7
    assert ((seen[0] == 10) | (seen[0] == torch.arange(64) % 10)).all()


def guided(ddpm: DDPM, x: torch.Tensor, t: int, labels: torch.Tensor, guidance: float) -> torch.Tensor:
    with torch.no_grad():
        return ddpm.guided_eps(x, torch.full((x.shape[0],), t), labels, guidance)


def test_last_step_adds_no_noise():
    ddpm = tiny_ddpm()
    x, labels = torch.randn(2, 1, 28, 28), torch.tensor([1, 2])
    z1, z2 = torch.randn(2, *x.shape)
    step = Ancestral(ddpm).step
    a = step(x, guided(ddpm, x, 0, labels, 2.0), 0, -1, z1)
    b = step(x, guided(ddpm, x, 0, labels, 2.0), 0, -1, z2)
    c = step(x, guided(ddpm, x, 1, labels, 2.0), 1, 0, z1)
    d = step(x, guided(ddpm, x, 1, labels, 2.0), 1, 0, z2)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(c, d)
    for cls in SAMPLERS.values():  # and no sampler asks for noise on its last step
        assert not cls(ddpm).adds_noise(-1)


def test_sampler_is_seeded_and_takes_any_labels():
    ddpm = tiny_ddpm()
    labels = torch.tensor([7, 7, 3])  # not a multiple of 10
    a = ddpm.sample(labels, 2.0, generator=torch.Generator().manual_seed(42), sampler="ddpm")
    b = ddpm.sample(labels, 2.0, generator=torch.Generator().manual_seed(42), sampler="ddpm")
    c = ddpm.sample(labels, 2.0, generator=torch.Generator().manual_seed(43), sampler="ddpm")
    assert a.shape == (3, 1, 28, 28)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_trajectory_only_when_asked():
    ddpm = tiny_ddpm(T=6)
    labels = torch.tensor([1, 2])
    x = ddpm.sample(labels, generator=torch.Generator().manual_seed(0), sampler="ddpm")
    x2, trajectory = ddpm.sample(labels, generator=torch.Generator().manual_seed(0), return_trajectory=True,
                                 sampler="ddpm")
    assert isinstance(x, torch.Tensor) and trajectory.shape == (7, 2, 1, 28, 28)
    torch.testing.assert_close(trajectory[-1], x2)
    torch.testing.assert_close(x, x2)


def test_sampler_follows_algorithm_2():
    """One reverse step equals the formula of Algorithm 2 written out by hand."""
    ddpm = tiny_ddpm()
    x, labels, t = torch.randn(2, 1, 28, 28), torch.tensor([4, 5]), 6
    eps = guided(ddpm, x, t, labels, 2.0)
    beta, a_bar = ddpm.betas[t], ddpm.alphas_cumprod[t]
    mean = (x - beta / (1 - a_bar).sqrt() * eps) / (1 - beta).sqrt()
    sigma = (beta * (1 - ddpm.alphas_cumprod[t - 1]) / (1 - a_bar)).sqrt()
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    step = Ancestral(ddpm).step(x, eps, t, t - 1, z)
    torch.testing.assert_close(step, mean + sigma * z, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T, steps", [(500, 20), (500, 100), (500, 500), (200, 7), (10, 1), (10, 2), (8, 4),
                                      (1000, 999)])
def test_ddim_timesteps(T, steps):
    timesteps = DDPM(ContextUnet(1, 8, 10), T=T).ddim_timesteps(steps)
    assert len(timesteps) == steps and len(set(timesteps)) == steps
    assert timesteps[0] == T - 1 and (steps == 1 or timesteps[-1] == 0)
    assert all(a > b for a, b in zip(timesteps, timesteps[1:]))


def test_ddim_timesteps_rejects_too_many():
    with pytest.raises(ValueError):
        tiny_ddpm(T=10).ddim_timesteps(11)


def test_ddim_with_every_step_and_eta_1_is_the_ancestral_sampler():
    """With all T timesteps and eta = 1, DDIM's update is Algorithm 2's: same noise, same images."""
    ddpm = tiny_ddpm(T=10)
    labels = torch.arange(10).repeat(20)
    a = ddpm.sample(labels, 2.0, generator=torch.Generator().manual_seed(0), sampler="ddpm")
    how = dict(sampler="ddim", steps=10, eta=1.0, clip_x0=False)
    b = ddpm.sample(labels, 2.0, generator=torch.Generator().manual_seed(0), **how)
    torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)
    # and in distribution, with independent noise
    c = ddpm.sample(labels, 2.0, generator=torch.Generator().manual_seed(1), **how)
    assert c.mean().item() == pytest.approx(a.mean().item(), abs=0.05)
    assert c.std().item() == pytest.approx(a.std().item(), rel=0.05)


def test_ddim_eta_0_is_deterministic_given_the_start():
    ddpm = tiny_ddpm(T=50)
    labels = torch.tensor([3, 8])
    a, traj = ddpm.sample(labels, 2.0, torch.Generator().manual_seed(0), True, sampler="ddim", steps=5, eta=0.0)
    assert traj.shape == (6, 2, 1, 28, 28)
    b = ddpm.sample(labels, 2.0, torch.Generator().manual_seed(0), sampler="ddim", steps=5, eta=0.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ddim_step_formula():
    """One deterministic DDIM step against eq. 12 written out: x0 prediction plus the direction to x_t."""
    ddpm = tiny_ddpm(T=20)
    x, labels = torch.randn(2, 1, 28, 28), torch.tensor([1, 6])
    eps = guided(ddpm, x, 15, labels, 1.5)
    a_t, a_prev = ddpm.alphas_cumprod[15], ddpm.alphas_cumprod[9]
    expected = a_prev.sqrt() * (x - (1 - a_t).sqrt() * eps) / a_t.sqrt() + (1 - a_prev).sqrt() * eps
    torch.testing.assert_close(DDIM(ddpm, eta=0.0, clip_x0=False).step(x, eps, 15, 9, None), expected,
                               rtol=1e-5, atol=1e-5)
    # with clipping, the predicted x_0 stays in the data range: the result is a_prev^(1/2) x0 + ...
    x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
    eps_clipped = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    torch.testing.assert_close(DDIM(ddpm, eta=0.0).step(x, eps, 15, 9, None),
                               a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps_clipped, rtol=1e-5, atol=1e-5)


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
    ddpm.eps_model.alphas_cumprod = ddpm.alphas_cumprod
    return ddpm


def test_extrapolate_x0_is_the_midpoint_of_a_linear_trend():
    """If the predicted x_0 moves linearly in lambda, the estimate is its value halfway through the step."""
    ddpm = DDPM(ContextUnet(1, 8, 10), T=500)
    lam = ddpm.half_log_snr
    trend = lambda value: torch.full((2, 1, 28, 28), 0.3) + 0.2 * value  # noqa: E731
    t_before, t, t_prev = 300, 120, 40
    estimate = ddpm.extrapolate_x0(trend(lam[t]), trend(lam[t_before]), t_before, t, t_prev)
    torch.testing.assert_close(estimate, trend((lam[t] + lam[t_prev]) / 2))


def test_dpm_first_and_last_steps_are_ddim_steps():
    ddpm = tiny_ddpm(T=20)
    x, labels, z = torch.randn(2, 1, 28, 28), torch.tensor([2, 9]), torch.randn(2, 1, 28, 28)
    eps = {t: guided(ddpm, x, t, labels, 2.0) for t in (15, 9, 0)}
    ddim, dpm = DDIM(ddpm, eta=1.0), DPMSolverPP2M(ddpm, eta=1.0)
    torch.testing.assert_close(dpm.step(x, eps[15], 15, 9, z), ddim.step(x, eps[15], 15, 9, z))
    t, x0 = dpm.before
    assert t == 15 and x0.shape == x.shape and x0.abs().max() <= 1
    middle = dpm.step(x, eps[9], 9, 4, z)  # the second step extrapolates from the first
    assert not torch.allclose(middle, ddim.step(x, eps[9], 9, 4, z))
    torch.testing.assert_close(dpm.step(x, eps[0], 0, -1, None), ddim.step(x, eps[0], 0, -1, None))


def test_dpm_solver_is_second_order_where_ddim_is_first():
    """Deterministic sampling of Gaussian data with its exact denoiser, against the exact solution.

    For Gaussian pixels the probability-flow ODE keeps ``(x_t - sqrt(a) m) / sqrt(a std^2 + 1 - a)``
    constant, so the exact ``x_0`` is known for every starting noise. Halving the step should halve
    DDIM's error (first order) and quarter DPM-Solver++(2M)'s (second order).
    """
    ddpm = gaussian_ddpm()
    labels = torch.tensor([0, 1, 2, 0])
    a_T, m = ddpm.alphas_cumprod[-1], ddpm.eps_model.means[labels].view(-1, 1, 1, 1)
    x_T = torch.randn((4, 1, 28, 28), generator=torch.Generator().manual_seed(0)).double()
    exact = m + 0.25 * (x_T - a_T.sqrt() * m) / (a_T * 0.25**2 + 1 - a_T).sqrt()

    def error(sampler: str, steps: int) -> float:
        x = ddpm.sample(labels, 1.0, torch.Generator().manual_seed(0), sampler=sampler, steps=steps, eta=0.0,
                        clip_x0=False)
        return (x - exact).abs().mean().item()

    ddim = [error("ddim", n) for n in (40, 80, 160)]
    dpm = [error("dpm++", n) for n in (40, 80, 160)]
    assert all(1.6 < a / b < 2.5 for a, b in zip(ddim, ddim[1:])), ddim
    assert all(a / b > 3.5 for a, b in zip(dpm, dpm[1:])), dpm
    assert dpm[0] < ddim[0] / 5, (dpm, ddim)


def test_stochastic_samplers_in_20_steps():
    """With eta = 1 and 20 steps both keep the mean; DDIM's spread falls short (0.20 for 0.25), dpm++'s less so."""
    ddpm = gaussian_ddpm(T=500)
    labels = torch.tensor([0, 1]).repeat(50)
    spread = {}
    for sampler in ("ddim", "dpm++"):
        x = ddpm.sample(labels, 1.0, torch.Generator().manual_seed(0), sampler=sampler, steps=20, eta=1.0,
                        clip_x0=False)
        assert x[0::2].mean().item() == pytest.approx(0.3, abs=0.01)
        assert x[1::2].mean().item() == pytest.approx(-0.2, abs=0.01)
        spread[sampler] = x[0::2].std().item()
    assert abs(spread["dpm++"] - 0.25) < 0.03 < abs(spread["ddim"] - 0.25), spread


def test_sample_rejects_an_unknown_sampler():
    with pytest.raises(ValueError, match="ddpm, ddim, dpm\\+\\+"):
        tiny_ddpm().sample(torch.tensor([1]), sampler="euler")


# Seeded outputs of every registered sampler, computed by the code before samplers became step objects
# (tiny_ddpm(T=10), labels 0 3 7, guidance 2, generator seed 1): the sum, and every 301st value.
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
    x = tiny_ddpm().sample(torch.tensor([0, 3, 7]), 2.0, torch.Generator().manual_seed(1), sampler=sampler,
                           steps=steps, eta=eta, guidance_interval=None)  # pinned before guidance intervals
    total, values = PINNED[(sampler, steps, eta)]
    assert x.double().sum().item() == pytest.approx(total, abs=1e-3)
    assert x.flatten()[::301].tolist() == pytest.approx(values, abs=1e-4)


def test_every_sampler_has_a_pin_and_its_defaults_apply():
    assert {name for name, _, _ in PINNED} == set(SAMPLERS)
    ddpm = tiny_ddpm(T=50)
    defaults = {"ddpm": (50, None), "ddim": (20, 1.0), "dpm++": (20, 1.2)}  # README: steps and eta of each
    for name in SAMPLERS:
        sampler = make_sampler(name, ddpm)
        assert (sampler.steps, sampler.eta) == defaults[name] and len(sampler.timesteps) == sampler.steps
        assert sampler.timesteps[0] == 49 and sampler.timesteps[-1] == 0


@pytest.mark.parametrize("name, steps, eta, words", [
    ("ddpm", 5, None, "always takes all T steps"), ("ddpm", None, 0.5, "takes no eta"),
    ("ddim", 11, None, "at most T=10"), ("dpm++", 0, None, "at most T=10"),
])
def test_sampler_settings_are_checked(name, steps, eta, words):
    with pytest.raises(ValueError, match=words):
        make_sampler(name, tiny_ddpm(), steps, eta)


class Euler(Sampler):
    """A toy sampler: the deterministic Euler step of the probability-flow ODE on the same x_0 estimate."""

    name, summary, default_steps, default_eta = "euler", "Euler steps of the probability-flow ODE", 10, 0.0

    def step(self, x, eps, t, t_prev, z):
        return self.ddpm.ddim_update(x, self.ddpm.predict_x0(x, eps, t, self.clip_x0), t, t_prev, 0.0)


def test_a_registered_toy_sampler_runs_from_sample(monkeypatch):
    """Adding a sampler is a class and a registry entry: DDPM.sample (and so the CLIs) find it by name."""
    monkeypatch.setitem(ddpm_module.SAMPLERS, "euler", Euler)
    ddpm = tiny_ddpm(T=20)
    x, trajectory = ddpm.sample(torch.tensor([1, 2]), 2.0, torch.Generator().manual_seed(0), True, sampler="euler")
    assert x.shape == (2, 1, 28, 28) and trajectory.shape == (11, 2, 1, 28, 28)
    again = ddpm.sample(torch.tensor([1, 2]), 2.0, torch.Generator().manual_seed(0), sampler="ddim", steps=10, eta=0.0)
    torch.testing.assert_close(x, again)  # deterministic DDIM is this Euler step in disguise


def test_generate_gives_the_same_images_at_the_same_seed_and_batch_size():
    ddpm, labels = tiny_ddpm(), torch.arange(6)
    how = Sampling(steps=3).resolve(ddpm.T)
    first = generate(ddpm, labels, how, seed=1, batch_size=3)
    torch.testing.assert_close(generate(ddpm, labels, how, seed=1, batch_size=3), first, rtol=0, atol=0)
    # the noise is drawn one batch at a time (README, --batch-size): another batch size, other images
    assert not torch.allclose(generate(ddpm, labels, how, seed=1, batch_size=6), first)
