"""The training-recipe settings: beta schedules, prediction targets, loss weights, learning rates, the
encoder-conditioned network, and guidance limited to an interval of noise levels."""

import argparse
import math

import pytest
import torch

from checkpoint import build_ddpm
from config import PRESETS, Config, UsageError
from ddpm import DDPM, SAMPLERS, cosine_beta_schedule, greedy_assignment, make_sampler
from distributed import SINGLE
from speed import PLAIN
from training import build_state, ema_decay_at, learning_rate, train_step, update_ema
from unet import ContextUnet


class Oracle(torch.nn.Module):
    """A perfect network: it outputs the right answer it was given."""

    def __init__(self, answer: torch.Tensor) -> None:
        super().__init__()
        self.answer = answer

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.answer


def tiny(prediction: str = "eps", **kwargs) -> DDPM:
    torch.manual_seed(0)
    return DDPM(ContextUnet(1, 8, 10), T=50, beta_start=1e-3, beta_end=0.2, prediction=prediction, **kwargs).eval()


def test_cosine_schedule_follows_nichol_and_dhariwal():
    T, s = 1000, 0.008
    ddpm = DDPM(ContextUnet(1, 8, 10), T=T, schedule="cosine")
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 250, 500, 900):  # 0-based t is the paper's step t + 1
        assert ddpm.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5)
    betas = cosine_beta_schedule(T)
    assert betas.max().item() == pytest.approx(0.999) and betas[0].item() == pytest.approx(1 - f(1) / f(0))


def test_min_snr_weights_at_a_few_timesteps():
    # the ancestor's schedule (1e-4 .. 0.02 over 500 steps): SNR 9999, 17.37, 4.239, 0.00639 at these t
    ddpm = DDPM(ContextUnet(1, 8, 10), T=500, loss_weight="min-snr", snr_gamma=5.0)
    t = torch.tensor([0, 50, 100, 499])
    pinned = {"eps": [5 / 9999, 0.287915, 1.0, 1.0],  # min(SNR, 5) / SNR
              "v": [5 / 10000, 0.272239, 0.809140, 0.006352711],  # min(SNR, 5) / (SNR + 1)
              "x0": [5.0, 5.0, 4.239448, 0.006393326]}  # min(SNR, 5)
    for prediction, weights in pinned.items():
        ddpm.prediction = prediction
        torch.testing.assert_close(ddpm.loss_weights(t), torch.tensor(weights), rtol=1e-5, atol=1e-8)


def test_truncated_snr_weights_at_a_few_timesteps():
    # the same SNRs as above; max(SNR, 0.1) keeps the noise loss but lifts the nearly pure-noise steps
    ddpm = DDPM(ContextUnet(1, 8, 10), T=500, loss_weight="truncated-snr", snr_floor=0.1)
    t = torch.tensor([0, 50, 100, 499])
    pinned = {"eps": [1.0, 1.0, 1.0, 0.1 / 0.00639332],  # max(SNR, 0.1) / SNR
              "v": [9999 / 10000, 0.945552, 0.809140, 0.1 / 1.00639332],  # max(SNR, 0.1) / (SNR + 1)
              "x0": [9999.0, 17.36603, 4.239448, 0.1]}  # max(SNR, 0.1)
    for prediction, weights in pinned.items():
        ddpm.prediction = prediction
        torch.testing.assert_close(ddpm.loss_weights(t), torch.tensor(weights), rtol=1e-4, atol=1e-8)


def test_log_normal_timesteps_have_edms_noise_levels():
    # on the CPU preset's schedule log sigma runs from -4.3 to 5.1, so the normal's mean and spread show through
    ddpm = build_ddpm(PRESETS["cpu"].override(t_sampling="log-normal"))
    p, log_sigma = ddpm.t_probabilities.double(), -ddpm.half_log_snr.double()
    assert p.min() > 0 and p.sum().item() == pytest.approx(1.0, abs=1e-6)
    mean = (p * log_sigma).sum().item()
    std = (p * (log_sigma - mean) ** 2).sum().sqrt().item()
    assert mean == pytest.approx(-1.2, abs=0.05) and std == pytest.approx(1.2, abs=0.05)
    assert p[log_sigma > math.log(5.42)].sum().item() < 0.01  # uniform t puts 42% of the steps there
    shifted = build_ddpm(PRESETS["cpu"].override(t_sampling="log-normal", log_sigma_mean=0.0))
    assert (shifted.t_probabilities * -shifted.half_log_snr).sum().item() == pytest.approx(0.0, abs=0.05)


def test_training_draws_timesteps_as_the_setting_says():
    def draws(ddpm, n):
        return ddpm.draw_training_noise(n, (1, 2, 2), torch.device("cpu"), torch.Generator().manual_seed(0))[0]

    uniform = tiny()
    assert torch.equal(draws(uniform, 64), torch.randint(0, 50, (64,), generator=torch.Generator().manual_seed(0)))
    log_normal = tiny(t_sampling="log-normal")
    counts = torch.bincount(draws(log_normal, 100_000), minlength=50) / 100_000
    torch.testing.assert_close(counts, log_normal.t_probabilities, rtol=0, atol=0.005)
    assert counts[:10].sum() > 0.2 and counts[40:].sum() < 0.01
    stratified, generator = tiny(t_sampling="stratified"), torch.Generator().manual_seed(0)
    t = torch.stack([stratified.draw_training_noise(5, (1, 2, 2), torch.device("cpu"), generator)[0]
                     for _ in range(2000)])
    assert torch.equal(t.sort(dim=1).values // 10, torch.arange(5).expand(2000, 5))  # one draw per fifth of [0, 50)
    counts = torch.bincount(t.flatten(), minlength=50) / t.numel()
    torch.testing.assert_close(counts, torch.full((50,), 0.02), rtol=0, atol=0.006)  # each step equally likely


def test_stratified_timesteps_pinned():
    ddpm = tiny(t_sampling="stratified")  # T = 50
    assert ddpm.stratified_t(torch.tensor([0.5]), 4).tolist() == [25, 37, 0, 12]  # 50 * (0.5, 0.75, 0, 0.25)
    assert ddpm.stratified_t(torch.tensor([0.999999]), 2).tolist() == [49, 24]


def test_v_target_and_every_conversion_to_noise_is_exact():
    torch.manual_seed(1)
    x0, eps, t = torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28), torch.tensor([0, 10, 30, 49])
    for prediction in ("v", "x0"):  # for "eps" the conversion is the identity
        ddpm = tiny(prediction).double()
        a = ddpm.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        target = ddpm.target(x0.double(), t, eps.double())
        if prediction == "v":
            expected = a.sqrt() * eps.double() - (1 - a).sqrt() * x0.double()
            torch.testing.assert_close(target, expected, rtol=1e-5, atol=1e-6)
        x_t = ddpm.q_sample(x0.double(), t, eps.double())
        ddpm.eps_model = Oracle(target)
        torch.testing.assert_close(ddpm.network_eps(x_t, t, torch.zeros(4, dtype=torch.long)), eps.double())


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_runs_with_every_prediction(prediction, sampler):
    ddpm = tiny(prediction)
    x = ddpm.sample(torch.arange(3), generator=torch.Generator().manual_seed(0), sampler=sampler, steps=None)
    assert x.shape == (3, 1, 28, 28) and torch.isfinite(x).all()


@pytest.mark.parametrize("prediction,weight", [("eps", "uniform"), ("v", "min-snr"), ("x0", "min-snr"),
                                               ("v", "truncated-snr")])
def test_loss_trains_every_objective(prediction, weight):
    ddpm = tiny(prediction, loss_weight=weight).train()
    loss = ddpm.loss(torch.rand(8, 1, 28, 28) * 2 - 1, torch.arange(8), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(p.grad is not None for p in ddpm.eps_model.parameters())


def test_learning_rate_schedules():
    run = PRESETS["cpu"].override(epochs=4, lr=1e-3).training
    assert [learning_rate(run, s, 10) for s in (0, 9, 10, 39)] == [1e-3, 1e-3, 1e-3 * 0.75, 1e-3 * 0.25]
    cos = PRESETS["cpu"].override(epochs=4, lr=1e-3, lr_schedule="cosine", warmup=10).training
    assert learning_rate(cos, 0, 10) == pytest.approx(1e-4) and learning_rate(cos, 9, 10) == pytest.approx(1e-3)
    assert learning_rate(cos, 25, 10) == pytest.approx(5e-4)  # halfway through the cosine
    assert learning_rate(cos, 40, 10) == pytest.approx(0.0, abs=1e-12)


def test_ema_warm_up_is_a_power_function_average_of_exponent_gamma():
    # gamma 8 is the warm-up every run had before the setting: (1 + k) / (10 + k)
    assert [ema_decay_at(k, 0.995) for k in (0, 10, 2000)] == [0.1, 11 / 20, 0.995]
    assert [ema_decay_at(k, 0.995, 16.0) for k in (0, 10, 1256)] == [1 / 18, 11 / 28, 1257 / 1274]
    # Run it over weights equal to the step number: the average weights step k as about k**gamma, so
    # its mean is (gamma + 1) / (gamma + 2) of the way through the run (Karras et al. 2024).
    for gamma in (8.0, 16.0):
        ema, model = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
        for k in range(2000):
            model.weight.data.fill_(k + 1.0)
            update_ema(ema, model, ema_decay_at(k, 1.0 - 1e-9, gamma))
        assert ema.weight.item() / 2000 == pytest.approx((gamma + 1) / (gamma + 2), rel=2e-3)
    config = PRESETS["cpu"].override(ema_gamma=16.0)
    assert Config.from_dict(config.to_dict()) == config
    with pytest.raises(UsageError, match="--ema-gamma must be a number >= 0"):
        Config().override(ema_gamma=-1.0).validate()


def test_new_settings_are_checked_and_stored():
    with pytest.raises(UsageError, match="--prediction must be one of eps, v, x0"):
        Config().override(prediction="score").validate()
    with pytest.raises(UsageError, match="--cond-encoder must be 0 or 1"):
        Config().override(cond_encoder=2).validate()
    config = PRESETS["cpu"].override(prediction="v", schedule="cosine", cond_encoder=1, loss_weight="min-snr")
    assert Config.from_dict(config.to_dict()) == config
    ddpm = build_ddpm(config)
    assert ddpm.prediction == "v" and ddpm.eps_model.cond_encoder and ddpm.loss_weight == "min-snr"
    assert ddpm.alphas_cumprod[-1] < 1e-5  # the cosine schedule ignores the preset's betas
    with pytest.raises(UsageError, match="--t-sampling must be one of uniform, log-normal, stratified"):
        Config().override(t_sampling="edm").validate()
    with pytest.raises(UsageError, match="--log-sigma-std must be a positive number"):
        Config().override(log_sigma_std=0.0).validate()
    config = config.override(t_sampling="log-normal", log_sigma_mean=-0.5, log_sigma_std=1.5)
    assert Config.from_dict(config.to_dict()) == config
    assert build_ddpm(config).t_sampling == "log-normal"


def test_adams_beta2_is_a_setting_that_reaches_the_optimizer():
    config = PRESETS["cpu"].override(n_feat=8, adam_beta2=0.99)
    assert Config.from_dict(config.to_dict()) == config
    state, _ = build_state(config, torch.device("cpu"), PLAIN, SINGLE, None)
    assert state.optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    state, _ = build_state(PRESETS["cpu"].override(n_feat=8), torch.device("cpu"), PLAIN, SINGLE, None)
    assert state.optimizer.param_groups[0]["betas"] == (0.9, 0.999)  # Adam's default, as before the setting
    with pytest.raises(UsageError, match="--adam-beta2 must be below 1"):
        Config().override(adam_beta2=1.0).validate()


def test_gradient_clipping_bounds_the_gradient_that_adam_sees():
    def step(grad_clip):
        state, _ = build_state(PRESETS["cpu"].override(n_feat=8), torch.device("cpu"), PLAIN, SINGLE, None)
        images, labels = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8), torch.tensor([0, 1, 2, 3])
        draws = state.ddpm.draw_training_noise(4, state.ddpm.image_shape, torch.device("cpu"),
                                               torch.Generator().manual_seed(0))
        train_step(state, images, labels, draws, 0.5, grad_clip=grad_clip)
        grads = [p.grad for p in state.ddpm.eps_model.parameters()]
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()

    free = step(0.0)
    assert free > 0.1  # a fresh network's gradient is long (about 5 for the CPU preset's)
    assert step(0.05) == pytest.approx(0.05, rel=1e-4)
    assert step(1e6) == pytest.approx(free, rel=1e-5)  # a bound above the norm changes nothing
    config = PRESETS["cpu"].override(grad_clip=1.0)
    assert Config.from_dict(config.to_dict()) == config
    with pytest.raises(UsageError, match="--grad-clip must be a number >= 0"):
        Config().override(grad_clip=-1.0).validate()


def test_greedy_assignment_takes_the_cheapest_pair_first():
    assert greedy_assignment(torch.tensor([[1.0, 2.0], [3.0, 100.0]])).tolist() == [0, 1]  # optimal: [1, 0]
    assert greedy_assignment(torch.tensor([[5.0, 1.0, 9.0], [0.5, 4.0, 8.0], [7.0, 6.0, 2.0]])).tolist() == [1, 0, 2]


def test_assigned_noise_is_the_batchs_draws_each_given_to_a_near_image():
    torch.manual_seed(0)
    ddpm, x0 = tiny(noise_pairing="assign"), torch.rand(6, 1, 28, 28) * 2 - 1
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    draws = x0[order] + 0.1 * torch.randn(6, 1, 28, 28)  # draw i lies near image order[i]
    paired = ddpm.pair_noise(x0, draws)
    assert torch.equal(paired, draws[order.argsort()])  # each image got the draw near it
    free = torch.randn(6, 1, 28, 28)
    paired = ddpm.pair_noise(x0, free)
    assert torch.equal(paired.flatten(1).sort(dim=0).values, free.flatten(1).sort(dim=0).values)  # a reordering
    assert (paired - x0).square().sum() < (free - x0).square().sum()
    assert torch.equal(tiny().pair_noise(x0, free), free)  # "random": the draws as they are


def test_knn_noise_is_the_nearest_of_each_images_own_draws():
    ddpm = tiny(noise_pairing="knn", noise_candidates=5)
    t, noise, drop = ddpm.draw_training_noise(3, (1, 28, 28), torch.device("cpu"), torch.Generator().manual_seed(0))
    assert noise.shape == (3, 5, 1, 28, 28) and t.shape == drop.shape == (3,)
    x0 = noise[:, 0].clone()
    x0[1] = noise[1, 3] + 0.01
    x0[2] = noise[2, 4] - 0.01
    assert torch.equal(ddpm.pair_noise(x0, noise), noise[[0, 1, 2], [0, 3, 4]])
    loss = ddpm.loss(torch.rand(3, 1, 28, 28) * 2 - 1, torch.tensor([0, 1, 2]), draws=(t, noise, drop))
    assert loss.ndim == 0 and torch.isfinite(loss)
    config = PRESETS["cpu"].override(noise_pairing="knn", noise_candidates=8)
    assert Config.from_dict(config.to_dict()) == config and build_ddpm(config).noise_candidates == 8
    with pytest.raises(UsageError, match="--noise-pairing must be one of random, assign, knn"):
        Config().override(noise_pairing="nearest").validate()


def test_encoder_conditioning_is_an_addition():
    plain, conditioned = ContextUnet(1, 16, 10), ContextUnet(1, 16, 10, cond_encoder=True)
    extra = set(conditioned.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("encoder_embed.") for k in extra)
    assert set(plain.state_dict()) <= set(conditioned.state_dict())
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([3, 7])
    a = conditioned(x, t, torch.tensor([1, 1]))
    b = conditioned(x, t, torch.tensor([1, 2]))
    assert not torch.allclose(a, b)


def test_ada_norm_is_an_addition_that_starts_as_the_network_without_it():
    plain, ada = ContextUnet(1, 16, 10, cond_encoder=True), ContextUnet(1, 16, 10, cond_encoder=True, ada_norm=True)
    extra = set(ada.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("norm_embed.") for k in extra)
    assert set(plain.state_dict()) <= set(ada.state_dict())
    x, t, labels = torch.randn(2, 1, 28, 28), torch.tensor([3, 7]), torch.tensor([1, 10])
    ada.load_state_dict(plain.state_dict(), strict=False)
    torch.testing.assert_close(ada(x, t, labels), plain(x, t, labels), rtol=0, atol=0)  # zero-initialised
    # each of the seven blocks gets its own scale and shift: moving any one changes the output
    with torch.no_grad():
        ada.norm_embed[-1].bias.copy_(torch.randn(ada.norm_embed[-1].bias.shape))
    before = ada(x, t, labels)
    offset = 0
    for width in ada.block_widths:
        with torch.no_grad():
            ada.norm_embed[-1].bias[offset:offset + 2 * width] += 0.5
        after = ada(x, t, labels)
        assert not torch.allclose(after, before), offset
        before, offset = after, offset + 2 * width
    assert offset == ada.norm_embed[-1].out_features
    config = PRESETS["cpu"].override(n_feat=16, cond_encoder=1, ada_norm=1)
    assert Config.from_dict(config.to_dict()) == config and build_ddpm(config).eps_model.ada_norm
    with pytest.raises(UsageError, match="--ada-norm must be 0 or 1"):
        Config().override(ada_norm=2).validate()


def test_mid_blocks_add_conditioned_blocks_at_the_bottleneck():
    plain, mid = ContextUnet(1, 16, 10, cond_encoder=True), ContextUnet(1, 16, 10, cond_encoder=True, mid_blocks=2)
    assert set(ContextUnet(1, 16, 10, cond_encoder=True, mid_blocks=0).state_dict()) == set(plain.state_dict())
    extra = set(mid.state_dict()) - set(plain.state_dict())
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in extra} == {"mid.0", "mid.1", "mid_embed.0", "mid_embed.1"}
    h, t_emb = torch.randn(2, 32, 7, 7), torch.randn(2, 16)
    cond = torch.cat((mid.embed_labels(torch.tensor([1, 2])), t_emb), dim=1)
    assert mid.middle(h, cond).shape == h.shape and torch.equal(plain.middle(h, cond), h)
    # each block reads the label and the time
    other_label = torch.cat((mid.embed_labels(torch.tensor([1, 3])), t_emb), dim=1)
    assert not torch.allclose(mid.middle(h, cond)[1], mid.middle(h, other_label)[1])
    torch.testing.assert_close(mid.middle(h, cond)[0], mid.middle(h, other_label)[0])
    other_time = torch.cat((cond[:, :16], torch.randn(2, 16)), dim=1)
    assert not torch.allclose(mid.middle(h, cond), mid.middle(h, other_time))
    config = PRESETS["cpu"].override(n_feat=16, mid_blocks=3)
    assert Config.from_dict(config.to_dict()) == config and len(build_ddpm(config).eps_model.mid) == 3
    with pytest.raises(UsageError, match="--mid-blocks must be an integer >= 0"):
        Config().override(mid_blocks=-1).validate()
    with pytest.raises(ValueError, match="mid_blocks"):
        ContextUnet(1, 16, 10, mid_blocks=-1)


class Recorder(torch.nn.Module):
    """A self-conditioned network that answers ``v = 0.3`` for a label, 0.5 for "no label", and records the
    estimate of ``x0`` it was given."""

    in_channels, image_size, null_label, self_cond = 1, 28, 10, True

    def __init__(self) -> None:
        super().__init__()
        self.estimates: list[torch.Tensor] = []

    def forward(self, x, t, labels, x0_estimate):
        self.estimates.append(x0_estimate.clone())
        return (0.3 + 0.2 * (labels == 10).float()).reshape(-1, 1, 1, 1).expand_as(x)


def test_self_conditioning_feeds_each_guidance_branch_its_own_estimate():
    ddpm = DDPM(Recorder(), T=50, beta_start=1e-3, beta_end=0.2, prediction="v").eval()
    assert ddpm.self_cond
    timesteps = make_sampler("ddim", ddpm, steps=4).timesteps
    _, states = ddpm.sample(torch.arange(2), guidance=2.0, generator=torch.Generator().manual_seed(0),
                            sampler="ddim", steps=4, eta=0.0, return_trajectory=True, guidance_interval=None)
    given = ddpm.eps_model.estimates
    assert len(given) == 4 and given[0].shape == (4, 1, 28, 28) and not given[0].any()  # zeros: none yet
    for i in range(1, 4):  # then each branch's own clean image at the step before, clamped as the samplers clamp
        a = ddpm.alphas_cumprod[timesteps[i - 1]]
        for branch, v in zip(given[i].chunk(2), (0.3, 0.5)):  # the labelled half, then the "no label" half
            torch.testing.assert_close(branch, (a.sqrt() * states[i - 1] - (1 - a).sqrt() * v).clamp(-1, 1))


def test_self_conditioning_is_a_setting_that_reads_an_estimate():
    plain, sc = ContextUnet(1, 16, 10), ContextUnet(1, 16, 10, self_cond=True)
    assert set(plain.state_dict()) == set(sc.state_dict())  # one more input channel, no more modules
    assert sc.init_conv.conv1[0].in_channels == 2 and plain.init_conv.conv1[0].in_channels == 1
    x, t, labels = torch.randn(2, 1, 28, 28), torch.tensor([3, 7]), torch.tensor([1, 10])
    torch.testing.assert_close(sc(x, t, labels), sc(x, t, labels, torch.zeros_like(x)), rtol=0, atol=0)
    assert not torch.allclose(sc(x, t, labels), sc(x, t, labels, torch.ones_like(x)))
    with pytest.raises(ValueError, match="self_cond"):
        plain(x, t, labels, torch.zeros_like(x))
    config = PRESETS["cpu"].override(n_feat=16, prediction="v", self_cond=1)
    assert Config.from_dict(config.to_dict()) == config and build_ddpm(config).self_cond
    assert not build_ddpm(PRESETS["cpu"].override(n_feat=16)).self_cond
    with pytest.raises(UsageError, match="--self-cond must be 0 or 1"):
        Config().override(self_cond=2).validate()


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_runs_a_self_conditioned_network(sampler):
    torch.manual_seed(0)
    ddpm = DDPM(ContextUnet(1, 8, 10, self_cond=True), T=50, beta_start=1e-3, beta_end=0.2, prediction="v").eval()
    x = ddpm.sample(torch.arange(3), generator=torch.Generator().manual_seed(0), sampler=sampler)
    assert x.shape == (3, 1, 28, 28) and torch.isfinite(x).all()


def test_guidance_interval():
    ddpm = tiny()
    sigma = ((1 - ddpm.alphas_cumprod) / ddpm.alphas_cumprod).sqrt()
    lo, hi = float(sigma[10]), float(sigma[30])
    assert [ddpm.guided_steps((lo, hi))[t] for t in (10, 11, 30, 31)] == [False, True, True, False]

    def draw(**kwargs):
        return ddpm.sample(torch.arange(4), guidance=3.0, generator=torch.Generator().manual_seed(0), steps=10,
                           **kwargs)

    torch.testing.assert_close(draw(guidance_interval=(0.0, math.inf)), draw(guidance_interval=None))
    nowhere = ddpm.sample(torch.arange(4), guidance=1.0, generator=torch.Generator().manual_seed(0), steps=10)
    torch.testing.assert_close(draw(guidance_interval=(1e6, 2e6)), nowhere)


def test_recipe_driver_keeps_a_row_per_guidance_scale(monkeypatch):
    from benchmarks import recipes

    printed = ("| sampler | guidance | n | accuracy | FID | precision | recall | diversity |\n|---|---|\n"
               "| dpm++ 20 steps | 1.5 | 1000 | 98.9% | 0.142 | 0.814 | 0.630 | 0.83 |\n"
               "| dpm++ 20 steps | 2.0 | 1000 | 99.9% | 0.238 | 0.870 | 0.465 | 0.77 |\n"
               "| real training digits | - | 1000 | 99.8% | 0.032 | 0.884 | 0.895 | 1.00 |\n")
    commands = []
    monkeypatch.setattr(recipes, "train", lambda *a: "c.pt")
    monkeypatch.setattr(recipes, "log", lambda out, what, command: commands.append(command) or printed)
    args = argparse.Namespace(out_dir="runs", data_root="d", n=100, classifier_cache="k", guidance=[1.5, 2.0])
    rows = recipes.score("D-b32", 8, 0, args)
    assert commands[0][-3:] == ["--guidance", "1.5", "2.0"]
    flags = "`--prediction v --cond-encoder 1 --batch-size 32`"
    assert rows[0].startswith(f"| D-b32 | {flags} | 8 | 0 | 1.5 | 98.9% | 0.142")
    assert rows[1].split(" | ")[4:6] == ["2.0", "99.9%"] and rows[2].startswith("| real digits (floor) |")
    args.guidance = [2.0]
    with pytest.raises(UsageError, match="printed no score table"):
        recipes.score("D-b32", 8, 0, args)


def test_recipe_driver_resumes_a_run_that_stopped_early(monkeypatch, tmp_path):
    from benchmarks import recipes

    args = argparse.Namespace(out_dir=str(tmp_path), data_root="d", train_args="")
    path = tmp_path / "D_e8" / "checkpoints" / "ddpm_500_32.pt"
    commands = []

    def fake_train(out, what, command):  # train.py writes the checkpoint
        commands.append(command)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")

    monkeypatch.setattr(recipes, "log", fake_train)
    for epoch, expected in ((None, "fresh"), (3, "--resume"), (8, None)):
        commands.clear()
        monkeypatch.setattr(recipes, "load_checkpoint", lambda p: {"epoch": epoch})
        assert recipes.train("D", 8, args) == str(path)
        if expected is None:
            assert not commands  # finished: not trained again
        else:
            assert len(commands) == 1 and ("--resume" in commands[0]) == (expected == "--resume")


def test_every_recipe_is_a_valid_training_config():
    """A typo in a recipe's flags would otherwise surface only after the recipes before it had trained."""
    import train
    from benchmarks import recipes

    configs = {name: train.resolve_config(train.parse_args(["--preset", "cpu-2020", "--no-amp", *flags]))
               for name, flags in recipes.RECIPES.items()}
    for name, config in configs.items():
        assert config.preset == "cpu-2020", name
    # the CPU preset is the recipe that the ablation chose, at 8 epochs
    assert configs["D-muon-beta-end-0.02-p-uncond-0.3"].override(epochs=8, preset="cpu") == train.resolve_config(
        train.parse_args(["--preset", "cpu", "--no-amp"]))
    n40 = configs["D-b32-n40-beta-end-0.02-log-normal-wide"]
    assert (n40.model.n_feat, n40.training.batch_size, n40.diffusion.beta_end) == (40, 32, 0.02)
