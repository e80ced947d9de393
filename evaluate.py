"""Measuring samples against real slices: fidelity and diversity against the held-out split, memorisation against
the training split, and what a probe network trained on the real training split says of them (class and slice
control, and whether a classifier trained on samples alone works on real slices). predict.py calls these."""
import math
import os

import torch
import torch.nn.functional as F

import checkpoints
import utils
from modules import Probe

SSIM_KERNEL = 7  # Gaussian window of SSIM / MS-SSIM (small images need a small one)
DIVERSITY_PAIRS = 200  # random pairs for the MS-SSIM diversity figures
PROBE_SIZE = 64  # side of the images the probe reads (larger slices are resized to it)
PROBE_EPOCHS = 11  # passes over its training images (also those of the TSTR classifiers)
PROBE_BATCH = 64  # images per probe training step
PROBE_LR = 2e-3  # peak learning rate of the probe (cosine decay)
PROBE_VERSION = 2  # part of the probe cache's name: change it when the probe or its training changes
PROBE_AGE_SCALE = 100  # the probe's age head reads age / this (years)


# ---------------------------------------------------------------- pixels: fidelity, diversity, memorisation
def nearest(a, b, device):
    """For each image of a, the index and RMSE of its nearest image (L2) in b; a in [0, 1], b uint8."""
    a2 = a.flatten(1).to(device)
    best_d, best_i = torch.full((len(a),), float("inf"), device=device), torch.zeros(len(a), dtype=torch.long,
                                                                                       device=device)
    for s in range(0, len(b), 4096):
        bb = b[s:s + 4096].flatten(1).to(device).float() / 255
        d = (a2.square().sum(1, keepdim=True) - 2 * a2 @ bb.T + bb.square().sum(1)).clamp(min=0)
        dmin, imin = d.min(1)
        better = dmin < best_d
        best_d, best_i = torch.where(better, dmin, best_d), torch.where(better, imin + s, best_i)
    return best_i.cpu(), (best_d / a2.shape[1]).sqrt().cpu()


def ms_ssim_pairs(x, gen):
    """Mean MS-SSIM over random pairs of distinct images: lower means more diverse."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim
    i = torch.randint(0, len(x), (DIVERSITY_PAIRS,), generator=gen)
    j = (i + torch.randint(1, len(x), (DIVERSITY_PAIRS,), generator=gen)) % len(x)
    scales = max(1, min(5, int(math.log2(x.shape[-1] / (SSIM_KERNEL - 1))) + 1))
    betas = torch.tensor((0.0448, 0.2856, 0.3001, 0.2363, 0.1333)[:scales])
    return ms_ssim(x[i], x[j], data_range=1.0, kernel_size=SSIM_KERNEL, betas=tuple((betas / betas.sum()).tolist()),
                   normalize="relu").item()


def nearest_similarity(images, pool, device):
    """SSIM, PSNR and RMSE of each image ([0, 1]) to its nearest (L2) image in pool (uint8)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    idx, rmse = nearest(images, pool, device)
    match = pool[idx].float() / 255
    ssim = structural_similarity_index_measure(images, match, data_range=1.0, kernel_size=SSIM_KERNEL,
                                               reduction="none")
    return ssim, peak_signal_noise_ratio(images, match, data_range=1.0, reduction="none", dim=(1, 2, 3)), rmse


def metrics(samples, data, device):
    """Fidelity (SSIM/PSNR to the nearest held-out image; the Frechet distance of the probe's features), diversity
    (MS-SSIM between pairs) and memorisation (distance to the nearest training image), each beside the same
    figure for real held-out slices."""
    fake = utils.to_unit(samples)
    heldout = data.val.float() / 255
    real = heldout[:len(fake) * 4]  # as many real slices as it takes, up to four per sample
    ssim, psnr, _ = nearest_similarity(fake, data.val, device)
    real_ssim, real_psnr, real_to_train = nearest_similarity(real, data.train, device)
    _, fake_to_train = nearest(fake, data.train, device)
    copy_threshold = torch.quantile(real_to_train, 0.05).item()  # closer than 95% of unseen real images
    gen = torch.Generator().manual_seed(0)
    fd, fd_real = frechet_distances(samples, data, device)
    return {"num_samples": len(fake), "heldout_images": len(heldout),
            "ssim_to_nearest_heldout": ssim.mean().item(), "ssim_heldout_to_nearest_train": real_ssim.mean().item(),
            "psnr_to_nearest_heldout": psnr.mean().item(), "psnr_heldout_to_nearest_train": real_psnr.mean().item(),
            "frechet_distance": fd, "frechet_distance_real": fd_real,
            "ms_ssim_between_samples": ms_ssim_pairs(fake, gen) if len(fake) > 1 else None,
            "ms_ssim_between_real": ms_ssim_pairs(heldout, gen) if len(heldout) > 1 else None,
            "rmse_sample_to_nearest_train": fake_to_train.mean().item(),
            "rmse_heldout_to_nearest_train": real_to_train.mean().item(),
            "possible_copies": int((fake_to_train < copy_threshold).sum())}


def frechet(a, b):
    """The Frechet distance between Gaussians fitted to two sets of feature vectors (N x D, float64)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root = torch.linalg.eigvals(cov_a @ cov_b).real.clamp(min=0).sqrt().sum()  # trace of sqrt(cov_a cov_b)
    return ((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * root).item()


def frechet_distances(samples, data, device):
    """(samples, real) Frechet distances to the held-out slices, over the probe's features; real: as many training
    slices as there are samples, the figure a perfect generator would reach with this many samples."""
    model, _ = probe_for(data, device)
    pick = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[:len(samples)]
    fake, train, heldout = (read_slices(model, x, device)[0].double() for x in (samples, data.train[pick], data.val))
    return frechet(fake, heldout), frechet(train, heldout)


# ---------------------------------------------------------------- the probe
def probe_size(images):
    return min(PROBE_SIZE, images.shape[-1])


def probe_steps(n):
    """Training steps of PROBE_EPOCHS passes over n images."""
    return max(1, round(PROBE_EPOCHS * n / PROBE_BATCH))


def fit_probe(images, labels, positions, num_classes, device, seed=0, steps=None, ages=None):
    """A Probe trained for `steps` (default: PROBE_EPOCHS passes) on uint8 slices (N x 1 x S x S) for the targets
    given: class labels, slice positions and ages in years (NaN: unknown; any may be None); with none, the quarter
    turn of each slice."""
    steps = steps or probe_steps(len(images))
    with torch.random.fork_rng(devices=[]):  # a fixed initialisation that leaves the caller's random state alone
        torch.manual_seed(seed)
        model = Probe(num_classes, probe_size(images)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PROBE_LR, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = PROBE_LR * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, len(images), (PROBE_BATCH,), generator=gen)
        x = images[idx].to(device).float() / 127.5 - 1
        x = torch.where(torch.rand(len(x), 1, 1, 1, generator=gen).to(device) < 0.5, x.flip(-1), x)  # mirror
        turns = torch.randint(0, 4, (len(x),), generator=gen).to(device)
        turned = torch.stack([x.rot90(k, (-2, -1)) for k in range(4)])[turns, torch.arange(len(x))]
        supervised = labels is not None or positions is not None or ages is not None
        f, logits, position, turn = model(x if supervised else turned)
        loss = 0
        if labels is not None:
            loss = loss + F.cross_entropy(logits, labels[idx].to(device))
        if positions is not None:
            loss = loss + 5 * F.l1_loss(position, positions[idx].to(device))
        if ages is not None and (known := ~ages[idx].isnan()).any():
            loss = loss + 5 * F.l1_loss(model.age(f)[:, 0][known.to(device)],
                                        ages[idx][known].to(device) / PROBE_AGE_SCALE)
        if not supervised:
            loss = F.cross_entropy(turn, turns)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def read_slices(model, images, device, batch=256):
    """The probe's reading of images (uint8, or float in [-1, 1]): (features, predicted class or None, position)."""
    feats, classes, positions = [], [], []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].to(device)
        f, logits, position, _ = model(x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float())
        feats.append(f.cpu())
        positions.append(position.clamp(0, 1).cpu())
        classes.append(None if logits is None else logits.argmax(1).cpu())
    return torch.cat(feats), None if classes[0] is None else torch.cat(classes), torch.cat(positions)


@torch.no_grad()
def read_ages(model, images, device, batch=256):
    """The probe's reading of the images' ages, in years."""
    return torch.cat([model.age(model.features(x.to(device).float() / 127.5 - 1 if x.dtype == torch.uint8 else
                                              x.to(device).float()))[:, 0].cpu() * PROBE_AGE_SCALE
                      for x in images.split(batch)])


def heldout_ages(data):
    """(training ages, held-out ages) in years (NaN: unknown) where the data has an age covariate, else (None, None)."""
    column = utils.age_column(data.covariate_names)
    return (None, None) if column is None else (data.train_covariates[:, column], data.val_covariates[:, column])


def probe_path(data):
    """Where the probe trained on this data is cached."""
    return os.path.join(data.cache, f"probe_v{PROBE_VERSION}_{data.fingerprint}_{data.train.shape[-1]}_"
                        f"{probe_size(data.train)}_{PROBE_EPOCHS}.pt")


def probe_for(data, device):
    """(probe, its figures on the real held-out split), trained on the real training split once and cached beside
    the data's cache, keyed by the data's fingerprint."""
    labels, positions, path = data.train_labels, data.train_positions, probe_path(data)
    ages, val_ages = heldout_ages(data)
    if os.path.isdir(data.cache) and os.path.isfile(path):
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = Probe(len(data.classes), probe_size(data.train)).to(device)
        model.load_state_dict(state["model"])
        return model.eval().requires_grad_(False), state["real"]
    print(f"training the probe network on the {len(data.train)} real training slices (cached for next time)...",
          flush=True)
    model = fit_probe(data.train, labels, positions, len(data.classes), device, ages=ages)
    _, predicted, position = read_slices(model, data.val, device)
    real = {"heldout_images": len(data.val)}
    if labels is not None:
        real["class_accuracy"] = (predicted == data.val_labels).float().mean().item()
        real["train_on_real_accuracy"] = classifier_accuracy(data.train, labels, data, device)  # the TSTR reference
    if positions is not None:
        real["slice_mae"] = (position - data.val_positions).abs().mean().item()
    if ages is not None:
        known = ~val_ages.isnan()
        real["age_mae"] = (read_ages(model, data.val[known], device) - val_ages[known]).abs().mean().item()
    if os.path.isdir(data.cache):
        checkpoints.save_checkpoint({"model": model.state_dict(), "real": real}, path)
    return model, real


def control(samples, y, s, data, device, ages=None):
    """How well samples asked for class y, slice position s and ages in years (any None) show them, to the probe,
    beside the same figures for the real held-out slices."""
    model, real = probe_for(data, device)
    _, predicted, position = read_slices(model, samples, device)
    result = {}
    if y is not None:
        result.update(class_agreement=(predicted == y.cpu()).float().mean().item(),
                      class_accuracy_real_heldout=real["class_accuracy"])
    if s is not None:
        result.update(slice_mae=(position - s.cpu()).abs().mean().item(), slice_mae_real_heldout=real["slice_mae"])
    if ages is not None and "age_mae" in real:
        result.update(age_mae=(read_ages(model, samples, device) - ages.cpu()).abs().mean().item(),
                      age_mae_real_heldout=real["age_mae"])
    return result


def classifier_accuracy(images, labels, data, device):
    """Held-out accuracy of a classifier (the probe's network and class head) trained on these images for as many
    steps as on the real training split, however many there are: the same budget for real and synthetic."""
    model = fit_probe(images, labels, None, len(data.classes), device, seed=1, steps=probe_steps(len(data.train)))
    return (read_slices(model, data.val, device)[1] == data.val_labels).float().mean().item()


def train_on_synthetic(samples, y, data, device):
    """Usefulness: a classifier trained on labelled samples only, tested on the real held-out slices, beside the
    same classifier trained on the real training split."""
    images = (utils.to_unit(samples) * 255).round().to(torch.uint8)
    return {"tstr_samples": len(samples), "tstr_accuracy": classifier_accuracy(images, y.cpu(), data, device),
            "train_on_real_accuracy": probe_for(data, device)[1]["train_on_real_accuracy"]}
