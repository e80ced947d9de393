"""The diffusion math against exact answers: the optimal denoiser of Gaussian data."""
import pytest
import torch

from utils import NoiseSchedule, BETA_SCHEDULES, noise_to_signal

MU, SIGMA = 0.3, 0.5  # per-pixel data distribution N(MU, SIGMA^2)


@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
def test_betas_and_alphas_cumprod(schedule):
    s = NoiseSchedule(1000, schedule)
    assert s.betas.dtype == torch.float64
    assert ((s.betas > 0) & (s.betas < 1)).all()
    assert (s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all()
    assert s.alphas_cumprod[-1] < 1e-3 and s.alphas_cumprod[0] > 0.99


def test_linear_matches_ho_et_al():
    s = NoiseSchedule(1000, "linear")
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    assert NoiseSchedule(250, "linear").betas[-1].item() == pytest.approx(0.08)  # scaled for other T


def test_cosine_matches_nichol_dhariwal():
    s = NoiseSchedule(1000, "cosine")
    f = lambda t: torch.cos(torch.tensor((t / 1000 + 0.008) / 1.008 * torch.pi / 2, dtype=torch.float64)) ** 2
    assert s.alphas_cumprod[499].item() == pytest.approx((f(500) / f(0)).item(), rel=1e-9)
    assert s.betas.max().item() <= 0.999


def test_q_sample_moments():
    s = NoiseSchedule(1000, "cosine")
    x0 = torch.full((200_000,), 0.7)
    t = torch.full((200_000,), 400)
    xt = s.q_sample(x0, t, torch.randn(200_000, generator=torch.Generator().manual_seed(0)))
    abar = s.alphas_cumprod[400].item()
    assert xt.mean().item() == pytest.approx(abar ** 0.5 * 0.7, abs=5e-3)
    assert xt.var().item() == pytest.approx(1 - abar, rel=1e-2)


def gaussian_oracle(schedule, prediction, mu=MU, sigma=SIGMA):
    """The exact optimal network for data N(mu, sigma^2) (per pixel), returning `prediction`."""
    def model(x, t):
        abar = schedule.alphas_cumprod[t].view(-1, *[1] * (x.dim() - 1)).to(x.dtype)
        alpha, noise = abar.sqrt(), (1 - abar).sqrt()
        eps = noise * (x - alpha * mu) / (alpha ** 2 * sigma ** 2 + noise ** 2)
        x0 = (x - noise * eps) / alpha
        return {"eps": eps, "x0": x0, "v": alpha * eps - noise * x0}[prediction]
    return model


oracle = gaussian_oracle  # for N(MU, SIGMA^2)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_prediction_conversions_round_trip(prediction):
    s = NoiseSchedule(1000, "cosine", prediction)
    x0, noise, t = torch.randn(64, 1, 4, 4), torch.randn(64, 1, 4, 4), torch.randint(0, 1000, (64,))
    alpha, sigma = s.alpha_sigma(t, x0)
    xt = s.q_sample(x0, t, noise)
    eps, x0_hat = s.split(s.target(x0, noise, t), xt, alpha, sigma)
    torch.testing.assert_close(eps, noise, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(x0_hat, x0, atol=1e-3, rtol=1e-3)


# (sampler, steps, relative tolerance on the std): ddim is first order, so 50 of its steps lose ~3% of the spread;
# the SDE form of dpm++ adds noise at every step, which 25 steps integrate less exactly (+4% on 'linear')
CASES = [("ddpm", 1000, 0.015), ("ddim", 50, 0.04), ("dpm++", 25, 0.025), ("dpm++sde", 25, 0.05)]


@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("sampler,steps,tol", CASES)
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_samplers_recover_gaussian_data(schedule, sampler, steps, tol, prediction):
    if sampler == "ddpm" and prediction == "v" and schedule != "cosine":
        pytest.skip("ddpm x v is covered on the cosine schedule; 1000 steps each is slow")
    s = NoiseSchedule(1000, schedule, prediction)
    gen = torch.Generator().manual_seed(0)
    x = s.sample(oracle(s, prediction), (20_000,), sampler, steps, generator=gen, clip=False)
    assert x.mean().item() == pytest.approx(MU, abs=0.015)
    assert x.std().item() == pytest.approx(SIGMA, rel=tol)


def test_even_time_spacing_loses_the_spread():
    """Why STEP_SPACING is 2: with steps even in t, dpm++ at 25 steps overshoots the data's spread."""
    s = NoiseSchedule(1000, "linear", "eps")
    x = s.sample(oracle(s, "eps"), (20_000,), "dpm++", 25, generator=torch.Generator().manual_seed(0), clip=False,
                 spacing=1.0)
    assert x.std().item() > SIGMA * 1.1


def test_x0_prediction_and_ddim_eta():
    s = NoiseSchedule(1000, "linear", "x0")
    x = s.sample(oracle(s, "x0"), (20_000,), "ddim", 100, eta=1.0, generator=torch.Generator().manual_seed(1),
                 clip=False)
    assert x.mean().item() == pytest.approx(MU, abs=0.02)
    assert x.std().item() == pytest.approx(SIGMA, rel=0.05)


def test_start_part_way_and_callback():
    """Starting from a clean sample at a small step returns (nearly) that sample."""
    s = NoiseSchedule(1000, "cosine", "eps")
    gen = torch.Generator().manual_seed(2)
    x0 = MU + SIGMA * torch.randn(5000, generator=gen)
    xt = s.q_sample(x0, torch.full((5000,), 20), torch.randn(5000, generator=gen))
    seen = []
    out = s.sample(oracle(s, "eps"), sampler="dpm++", steps=5, x=xt, start_t=20, generator=gen, clip=False,
                   callback=lambda i, n, x, x0_pred: seen.append((i, n)))
    assert (out - x0).abs().mean() < 0.05
    assert seen[-1] == (len(seen) - 1, len(seen)) and len(seen) == 5


# ---------------------------------------------------------------- the path predict.py takes: clip=True, start_t
MU2, SIGMA2 = 0.2, 0.25  # data well inside [-1, 1], so clipping the x0 prediction only rounds off what is outside


def exact_ode_map(schedule, x_t, t, mu, sigma):
    """Where the probability-flow ODE takes x_t for Gaussian data: the same quantile of N(mu, sigma^2)."""
    abar = schedule.alphas_cumprod[t].item()
    return mu + sigma * (x_t - abar ** 0.5 * mu) / (abar * sigma ** 2 + 1 - abar) ** 0.5


@pytest.mark.parametrize("sampler,steps,tol", CASES)
def test_samplers_with_clipping_recover_gaussian_data(sampler, steps, tol):
    s = NoiseSchedule(1000, "cosine", "v")
    x = s.sample(gaussian_oracle(s, "v", MU2, SIGMA2), (20_000,), sampler, steps,
                 generator=torch.Generator().manual_seed(0), clip=True)
    assert x.mean().item() == pytest.approx(MU2, abs=0.01)
    assert x.std().item() == pytest.approx(SIGMA2, rel=tol)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++", "dpm++sde"])
def test_starting_part_way_denoises(sampler):
    """From x_t at t = 300 every sampler returns data-distributed values; the ODE samplers the exact ODE image of x_t.
    x_t itself is far from both (its spread is twice the data's)."""
    s, start = NoiseSchedule(1000, "cosine", "eps"), 300
    gen = torch.Generator().manual_seed(3)
    x0 = MU2 + SIGMA2 * torch.randn(20_000, generator=gen)
    x_t = s.q_sample(x0, torch.full((20_000,), start), torch.randn(20_000, generator=gen))
    out = s.sample(gaussian_oracle(s, "eps", MU2, SIGMA2), sampler=sampler, steps=25, x=x_t.clone(), start_t=start,
                   generator=gen, clip=True)
    assert out.mean().item() == pytest.approx(MU2, abs=0.01) and out.std().item() == pytest.approx(SIGMA2, rel=0.05)
    assert x_t.std().item() > 1.5 * SIGMA2
    if sampler in ("ddim", "dpm++"):
        exact = exact_ode_map(s, x_t, start, MU2, SIGMA2)
        assert (out - exact).abs().mean() < 0.01 < 0.1 < (x_t - exact).abs().mean()
    else:  # a fresh posterior draw: correlated with x0 as rho^2 = 0.19 (a start from scratch would give 0)
        assert torch.corrcoef(torch.stack([out, x0]))[0, 1] > 0.12


@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
def test_noise_to_signal_are_each_steps_noise_to_signal_ratio(schedule):
    """x_t / sqrt(abar_t) = x0 + sigma_t noise: sigma_t is the noise that rides on the unscaled image."""
    sched = NoiseSchedule(200, schedule, "eps")
    t = torch.tensor([0, 50, 120, 199])
    x0, noise = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    unscaled = sched.q_sample(x0, t, noise) / sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1).float()
    levels = noise_to_signal(schedule, 200)
    torch.testing.assert_close(unscaled - x0, levels[t].view(-1, 1, 1, 1) * noise, rtol=1e-3, atol=1e-4)
    assert torch.all(levels[1:] > levels[:-1])  # rising: searchsorted may look a sigma up in it


# ---------------------------------------------------------------- DDIM inversion: the image to its noise and back
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_inversion_follows_the_exact_ode_and_ddim_brings_the_image_back(prediction):
    """With the exact denoiser of Gaussian data the inverted image lands where the probability-flow ODE takes it (the
    same quantile of x_t's law), and ddim back with the same steps returns the image, the error shrinking with the
    steps (first order): what is left at 200 steps is the discretisation error."""
    s, end = NoiseSchedule(1000, "cosine", prediction), 600
    model = gaussian_oracle(s, prediction, MU2, SIGMA2)
    x = MU2 + SIGMA2 * torch.randn(20_000, generator=torch.Generator().manual_seed(5))
    abar = s.alphas_cumprod[end].item()
    on_the_ode = abar ** 0.5 * MU2 + (abar * SIGMA2 ** 2 + 1 - abar) ** 0.5 * (x - MU2) / SIGMA2
    errors, misses = [], []
    for steps in (10, 50, 200):
        latent = s.invert(model, x, end, steps)
        back = s.sample(model, sampler="ddim", steps=steps, x=latent.clone(), start_t=end, clip=False)
        errors.append((back - x).abs().mean().item())
        misses.append((latent - on_the_ode).abs().mean().item())
    spread = (on_the_ode - on_the_ode.mean()).abs().mean().item()  # 0.65
    assert errors[0] > 3 * errors[1] > 9 * errors[2] and errors[2] < 3e-3, errors  # about first order in the steps
    assert misses[0] > 3 * misses[1] > 9 * misses[2] and misses[2] < 0.01 * spread, misses
