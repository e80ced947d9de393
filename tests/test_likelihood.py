"""The likelihood against exact answers: the bound's middle terms under the optimal denoiser of Gaussian data have a
closed form, (SNR_{t-1} - SNR_t) / 2 * v / (1 + v SNR_t) per pixel; the decoder is a distribution over 256 levels."""
import math

import pytest
import torch

import likelihood
from utils import NoiseSchedule

from test_schedule import gaussian_oracle

MU, SD = 0.1, 0.2  # the toy's pixels: N(MU, SD^2), well inside [-1, 1], where clipping x0 never acts


def network(schedule, prediction):
    """The oracle in the network's signature (conditions ignored)."""
    oracle = gaussian_oracle(schedule, prediction, MU, SD)
    return lambda x, t, labels, positions: oracle(x, t)


def exact_middle(schedule):
    """The expected sum of the middle terms per pixel under the exact denoiser: the posterior variance of x0 given
    x_t, v / (1 + v SNR_t), weighted by (SNR_{t-1} - SNR_t) / 2, over t = 1..T-1."""
    snr = likelihood.log_snr(schedule).exp()
    v = SD ** 2
    return (0.5 * (snr[:-1] - snr[1:]) * v / (1 + v * snr[1:])).sum().item()


def test_strata_cover_every_middle_step_once_with_their_probabilities():
    s = NoiseSchedule(1000, "cosine")
    runs = likelihood.strata(s)
    steps = torch.cat([t for t, _ in runs])
    assert steps.tolist() == list(range(1, 1000))
    assert all(abs(p.sum().item() - 1) < 1e-9 and (p > 0).all() for _, p in runs)
    assert len(runs[0][0]) < len(runs[-1][0])  # narrow near the image, where the terms are large


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_the_stratified_bound_is_unbiased_and_its_error_is_stated(prediction):
    """Over seeds, the middle terms' estimate averages to the exact sum, and its spread matches the stated error."""
    s = NoiseSchedule(1000, "cosine", prediction)
    net = network(s, prediction)
    x = MU + SD * torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    pixels = x.numel()
    estimates, errors = [], []
    for seed in range(150):
        b = likelihood.bound(s, net, x, seed=seed)
        estimates.append(b.levels.sum().item() / pixels)
        errors.append(b.stderr.item() / pixels)
    estimates = torch.tensor(estimates)
    exact = exact_middle(s)
    assert estimates.mean().item() == pytest.approx(exact, rel=0.03)
    spread = estimates.std().item()
    assert 0.7 < torch.tensor(errors).pow(2).mean().sqrt().item() / spread < 1.4
    assert spread / exact < 0.15  # 32 draws already pin the sum within a few percent per slice


def test_a_worse_denoiser_costs_more_bits():
    """The bound ranks models: an oracle that believes the data twice as spread pays for it."""
    s = NoiseSchedule(1000, "cosine", "eps")
    x = MU + SD * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    good = likelihood.bound(s, network(s, "eps"), x, seed=3).total
    oracle = gaussian_oracle(s, "eps", MU, 2 * SD)
    wrong = likelihood.bound(s, lambda x, t, labels, positions: oracle(x, t), x, seed=3).total
    assert (wrong > good).all()


def test_the_decoder_is_a_distribution_over_the_256_levels():
    levels = torch.arange(256).float() / 127.5 - 1
    for mean, log_scale in [(0.0, math.log(0.01)), (0.99, math.log(0.05)), (-1.0, math.log(0.3))]:
        nll = likelihood.decoder_nll(levels, torch.full_like(levels, mean), torch.tensor(log_scale))
        assert nll.neg().exp().sum().item() == pytest.approx(1, abs=1e-5)
    sharp = likelihood.decoder_nll(levels, levels, torch.tensor(math.log(1e-3)))
    assert sharp.max().item() < 1e-3  # a mean on the level, narrow: all the mass in its bin (float32)


def test_the_prior_term_is_the_kl_to_the_standard_normal():
    s = NoiseSchedule(1000, "linear")
    abar = s.alphas_cumprod[-1].double()
    x = torch.tensor([0.0, 1.0, -0.5], dtype=torch.float64)
    q = torch.distributions.Normal(abar.sqrt() * x, (1 - abar).sqrt())
    expected = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0))
    assert torch.allclose(likelihood.prior_kl(s, x).double(), expected, rtol=1e-4, atol=1e-9)
