"""How likely a slice is under a trained DDPM: the variational bound in bits per dimension (Ho et al. 2020, eq. 5;
Nichol & Dhariwal 2021, sec. 2) with the discretised Gaussian decoder for 8-bit data, its T-1 middle terms estimated
on a stratified subset of the steps with a stated standard error, and a per-pixel map of where the bound is spent.

With the posterior variance beta~_t as the reverse variance, the term at step t is
    KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) = (SNR_{t-1} - SNR_t) / 2 * |x_0 - x0_hat(x_t)|^2   (in nats),
so every term is a weighted denoising error: the per-level errors are also what the out-of-distribution score reads.
"""
import math
from dataclasses import dataclass

import torch

import utils
from modules import call

STRATA = 16  # the middle terms' strata, of equal width in log(1 + SNR) (narrow near the image, where terms are large)
DRAWS = 2  # steps drawn per stratum (two give the estimator's variance); network calls per slice: STRATA * DRAWS + 1
BINS = 255  # the decoder's 8-bit data: 256 levels in [-1, 1], bins 2 / BINS wide


@dataclass
class Bound:
    """The bound of each of N slices (nats, summed over pixels), and its parts."""
    total: torch.Tensor  # N: prior + middle + decoder, an unbiased estimate of the negative ELBO
    stderr: torch.Tensor  # N: the estimate's standard error (from the DRAWS draws in each stratum)
    levels: torch.Tensor  # N x STRATA: each stratum's estimated share of the middle terms
    pixels: torch.Tensor  # N x 1 x S x S: where the total is spent (nats per pixel)

    def bits_per_dim(self, dims):
        return self.total / (dims * math.log(2)), self.stderr / (dims * math.log(2))


def log_snr(schedule):
    """log SNR_t = log(abar_t / (1 - abar_t)) for t = 0..T-1, in float64 (falling)."""
    abar = schedule.alphas_cumprod.double()
    return abar.log() - (-abar).log1p()


def strata(schedule, count=STRATA):
    """The middle steps 1..T-1 cut into `count` runs of equal width in log(1 + SNR) (each at least one step), and each
    step's probability within its run, proportional to the width it spans: the term an optimal denoiser of unit-variance
    Gaussian data would cost there, (SNR_{t-1} - SNR_t) / (1 + SNR), so that draws go where the bound is spent."""
    level = torch.nn.functional.softplus(log_snr(schedule))  # log(1 + SNR_t), falling to 0
    width = (level[:-1] - level[1:]).clamp(min=1e-12)  # step t = k + 1 spans level[k] - level[k + 1]
    edges = torch.linspace(level[0].item(), level[-1].item(), count + 1)[1:-1]
    cut = sorted({int(torch.searchsorted(-level[1:], -e).item()) for e in edges} - {0, len(width)})
    runs = zip([0] + cut, cut + [len(width)])
    return [(torch.arange(lo, hi) + 1, width[lo:hi] / width[lo:hi].sum()) for lo, hi in runs]


def drawn_steps(schedule, generator, count=STRATA, draws=DRAWS):
    """(steps, their probabilities within their stratum, stratum index): `draws` steps from each stratum, drawn with
    the generator (shared by every slice scored with it, so that per-level terms compare across slices)."""
    steps, probs, which = [], [], []
    for k, (ts, p) in enumerate(strata(schedule, count)):
        idx = torch.multinomial(p, draws, replacement=True, generator=generator)
        steps += ts[idx].tolist()
        probs += p[idx].tolist()
        which += [k] * draws
    return torch.tensor(steps), torch.tensor(probs, dtype=torch.float64), torch.tensor(which)


def normal_cdf(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def decoder_nll(x, mean, log_scale):
    """-log p(x | mean, scale) per pixel of the discretised Gaussian (Ho et al. 2020, eq. 13): the normal's mass over
    x's bin, 2 / BINS wide, the outermost bins reaching to -inf and +inf."""
    inv = torch.exp(-torch.as_tensor(log_scale, dtype=x.dtype))
    upper, lower = normal_cdf(inv * (x - mean + 1 / BINS)), normal_cdf(inv * (x - mean - 1 / BINS))
    mass = torch.where(x < -1 + 1 / BINS, upper, torch.where(x > 1 - 1 / BINS, 1 - lower, upper - lower))
    return -mass.clamp(min=1e-12).log()


def prior_kl(schedule, x):
    """KL(q(x_{T-1} | x_0) || N(0, I)) per pixel: what the prior term costs (tiny where abar_{T-1} is near 0)."""
    abar = schedule.alphas_cumprod[-1].double().item()
    return 0.5 * (abar * x.double() ** 2 + (1 - abar) - 1 - math.log(1 - abar)).float()


def denoised(schedule, model, x, steps, labels=None, positions=None, covariates=None, generator=None):
    """The model's x0 from x noised to each of `steps` (one fresh noise each, drawn with the generator): N x len(steps)
    x C x S x S, clipped to [-1, 1] as sampling clips it. One network call per step, for all slices."""
    found = []
    for t in steps.tolist():
        noise = torch.randn(x.shape, generator=generator).to(x.device)
        tt = torch.full((len(x),), t, device=x.device, dtype=torch.long)
        xt = schedule.q_sample(x, tt, noise)
        alpha, sigma = schedule.alpha_sigma(tt, x)
        out = call(model, xt, tt, labels, positions, covariates).float()
        found.append(schedule.split(out, xt, alpha, sigma)[1].clamp(-1, 1))
    return torch.stack(found, 1)


@torch.no_grad()
def bound(schedule, model, x, labels=None, positions=None, covariates=None, seed=0, count=STRATA, draws=DRAWS):
    """The Bound of slices x (in [-1, 1], on 256 levels) under model(x_t, t, labels, positions, covariates): the
    prior term exactly, the decoder term at step 0 (mean x0_hat, the variance of step 1's posterior, as Nichol &
    Dhariwal clip it), and the middle terms by stratified importance sampling of the steps (seeded: the same steps and
    noises for every call with the same seed)."""
    gen = torch.Generator().manual_seed(seed)
    steps, probs, which = drawn_steps(schedule, gen, count, draws)
    snr = log_snr(schedule).exp()
    weight = (0.5 * (snr[steps - 1] - snr[steps]) / probs / draws).float().to(x.device)  # each draw's share
    x0 = denoised(schedule, model, x, torch.cat([torch.zeros(1, dtype=torch.long), steps]), labels, positions,
                  covariates, gen)
    terms = (x[:, None] - x0[:, 1:]) ** 2 * weight.view(1, -1, 1, 1, 1)  # N x steps x C x S x S, nats per pixel
    abar, betas = schedule.alphas_cumprod.double(), schedule.betas.double()
    log_scale = 0.5 * math.log((1 - abar[0]) / (1 - abar[1]) * betas[1])
    pixels = prior_kl(schedule, x) + terms.sum(1) + decoder_nll(x, x0[:, 0], log_scale)
    per_draw = terms.flatten(2).sum(2).view(len(x), -1, draws)  # N x strata x draws: each draw / draws
    stderr = (per_draw.var(2) * draws).sum(1).sqrt() if draws > 1 else torch.full((len(x),), math.nan)
    return Bound(pixels.flatten(1).sum(1), stderr, per_draw.sum(2), pixels)
