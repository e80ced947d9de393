"""What training minimises: the noisy batch a step sees (its timesteps, noise, flips and dropped conditions) and
the weighted loss of the network's prediction on it."""
import torch

import utils


def training_timesteps(cfg, n, gen, device):
    """n training timesteps: uniform, logit-normal (t / T = sigmoid(z), z ~ N(0, 1)), or edm (ln of the noise-to-signal
    ratio ~ N(EDM_MEAN, EDM_STD^2), each taken to the first step t whose ratio reaches it)."""
    if cfg["TIMESTEP_SAMPLING"] == "uniform":
        return torch.randint(0, cfg["TIMESTEPS"], (n,), generator=gen, device=device)
    if cfg["TIMESTEP_SAMPLING"] == "logit-normal":
        u = torch.randn(n, generator=gen, device=device).sigmoid()
        return (u * cfg["TIMESTEPS"]).long().clamp(max=cfg["TIMESTEPS"] - 1)
    ratio = (cfg["EDM_MEAN"] + cfg["EDM_STD"] * torch.randn(n, generator=gen, device=device)).exp()
    levels = utils.noise_to_signal(cfg["BETA_SCHEDULE"], cfg["TIMESTEPS"], device)
    return torch.searchsorted(levels, ratio).clamp(max=cfg["TIMESTEPS"] - 1)


def make_batch(images, idx, gen, cfg, rank, world, device, labels=None, positions=None, covariates=None):
    """This rank's share of a global batch: x0 in [-1, 1], t, noise, and cond = (class labels, slice positions,
    covariates N x K), each condition (each covariate too) dropped on its own with chance COND_DROP (to -1 and NaN:
    'not given'), None where not given.

    Every rank draws the whole global batch's random numbers, so any world size sees the same ones.
    """
    n, mine = len(idx), slice(rank * (len(idx) // world), (rank + 1) * (len(idx) // world))
    noise = torch.randn((n, *images.shape[1:]), generator=gen, device=device)[mine]
    t = training_timesteps(cfg, n, gen, device)[mine]
    flip = torch.rand(n, generator=gen, device=device)[mine] < 0.5
    drop_class, drop_slice = torch.rand(2, n, generator=gen, device=device)[:, mine] < cfg["COND_DROP"]
    x0 = images[idx[mine]].to(device, non_blocking=True).float().div_(127.5).sub_(1)
    layout = utils.memory_format(utils.wants_bf16(cfg, device), device)
    x0 = x0.contiguous(memory_format=layout)
    if cfg["HFLIP"]:
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    labels = None if labels is None else torch.where(drop_class, -1, labels[idx[mine]])
    positions = None if positions is None else torch.where(drop_slice, torch.nan, positions[idx[mine]])
    if covariates is not None:
        drop = torch.rand(n, covariates.shape[1], generator=gen, device=device)[mine] < cfg["COND_DROP"]
        covariates = torch.where(drop, torch.nan, covariates[idx[mine]])
    return x0, t, noise.contiguous(memory_format=layout), (labels, positions, covariates)


def batch_loss(model, schedule, x0, t, noise, cond, cfg, bf16):
    """Per-image min-SNR-weighted MSE of the network's prediction (under bf16 autocast if asked); cond = (class
    labels, slice positions, covariates), each None where the model has no such condition."""
    x_t = schedule.q_sample(x0, t, noise)
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(x_t, t, *cond)
    err = (out.float() - schedule.target(x0, noise, t)).pow(2).mean(dim=(1, 2, 3))
    return err * schedule.loss_weight(t, cfg["MIN_SNR_GAMMA"])
