"""Inpainting (RePaint): the conditional law it draws from on Gaussian toy data with the exact denoiser, pixels
outside the mask kept bit for bit, masks of every kind and bad ones, and the measured comparison (CPU, tiny)."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_script, write_blobs
import utils
from utils import NoiseSchedule

MU, SIGMA, RHO = torch.tensor([0.2, 0.1]), 0.3, 0.8  # two-pixel images from N(MU, SIGMA^2 [[1, RHO], [RHO, 1]])
COV = SIGMA ** 2 * torch.tensor([[1, RHO], [RHO, 1]])


def correlated_oracle(schedule):
    """The exact optimal v-predictor for two-pixel images (N x 1 x 1 x 2) from N(MU, COV):
    E[x0 | x_t] = MU + alpha COV (alpha^2 COV + sigma^2 I)^-1 (x_t - alpha MU)."""
    def model(x, t):
        abar = schedule.alphas_cumprod[t].float().view(-1, 1, 1)
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        gain = alpha * COV @ torch.linalg.inv(alpha ** 2 * COV + sigma ** 2 * torch.eye(2))
        x0 = (MU + (gain @ (x.view(-1, 2, 1) - alpha * MU.view(2, 1)))[..., 0]).view_as(x)
        alpha, sigma = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
        return alpha * (x - alpha * x0) / sigma - sigma * x0  # v = alpha eps - sigma x0
    return model


def fill_second_pixel(resample, jump, n=20_000, known=0.5, everything=False):
    s = NoiseSchedule(1000, "cosine", "v")
    image = torch.full((n, 1, 1, 2), known)
    fill = torch.zeros(n, 1, 1, 2, dtype=torch.bool)
    fill[..., 1] = True
    if everything:
        fill[:] = True
    out = s.inpaint(correlated_oracle(s), image, fill, "dpm++sde", 50, resample, jump,
                    generator=torch.Generator().manual_seed(0), clip=False)
    return out


def test_repaint_draws_the_missing_pixel_from_its_conditional_law():
    """Given the first pixel (0.5), the second follows N(0.1 + 0.8 (0.5 - 0.2), 0.3^2 (1 - 0.8^2)) = N(0.34, 0.18^2).
    Replacing the known pixel alone (one pass) falls short of that (RePaint's own finding); resampling reaches it."""
    once, resampled = fill_second_pixel(1, 1), fill_second_pixel(10, 5)
    assert (once[..., 0] == 0.5).all() and (resampled[..., 0] == 0.5).all()  # the known pixel, exactly
    assert once[..., 1].mean() < 0.34 - 0.07
    assert resampled[..., 1].mean().item() == pytest.approx(0.34, abs=0.02)
    assert resampled[..., 1].std().item() == pytest.approx(0.18, rel=0.06)


def model_calls(sampler, steps, resample, jump, n=2000, known=0.5, timesteps=1000):
    """The schedule, and (t, the known pixel) at each call inpaint makes of the exact denoiser."""
    s, seen = NoiseSchedule(timesteps, "cosine", "v"), []
    oracle = correlated_oracle(s)

    def recording(x, t):
        seen.append((int(t[0]), x[:, 0, 0, 0].clone()))
        return oracle(x, t)
    fill = torch.zeros(n, 1, 1, 2, dtype=torch.bool)
    fill[..., 1] = True
    s.inpaint(recording, torch.full((n, 1, 1, 2), known), fill, sampler, steps, resample, jump,
              generator=torch.Generator().manual_seed(0), clip=False)
    return s, seen


def test_repaint_shows_the_model_the_known_pixel_noised_to_each_steps_level():
    """Alg. 1 line 5: at every model call, on the way down and after each back-up, the known pixel is a fresh draw
    from q(x_t | x_0) = N(sqrt(abar_t) x_0, 1 - abar_t), not x_0 itself nor noised to another step's level."""
    s, seen = model_calls("dpm++sde", 10, resample=2, jump=2)
    assert len(seen) > 10  # the back-ups ran too
    for t, x in seen:
        abar = s.alphas_cumprod[t].float()
        z = (x - abar.sqrt() * 0.5) / (1 - abar).sqrt()  # N(0, 1) under q(x_t | x_0)
        mean, std = z.mean().item(), z.std().item()
        assert abs(mean) < 0.1 and std == pytest.approx(1, abs=0.08), (t, mean, std)


def test_resampling_walks_each_stretch_of_jump_steps_resample_times():
    """Every stretch of `jump` steps is walked `resample` times, the last (which ends on x0) once; ddpm takes every
    step of the schedule, the other samplers `steps` of them."""
    s, seen = model_calls("dpm++sde", 10, resample=3, jump=2, n=4)
    ts = s.sampling_steps(999, 10)
    assert [t for t, _ in seen] == [ts[i] for i in [0, 1] * 3 + [2, 3] * 3 + [4, 5] * 3 + [6, 7] * 3 + [8, 9]]
    _, seen = model_calls("ddpm", 10, resample=1, jump=1, n=4, timesteps=20)
    assert [t for t, _ in seen] == list(range(19, -1, -1))


def test_by_default_inpaint_walks_down_once_and_clips():
    """Defaults: the run's sampler and steps, no resampling, the model's x0 clipped to [-1, 1] (unless told not to)."""
    s, seen = NoiseSchedule(1000, "cosine", "x0"), []

    def three(x, t):  # an x0-predictor out of range
        seen.append(int(t[0]))
        return torch.full_like(x, 3.0)
    known, fill = torch.zeros(2, 1, 1, 2), torch.tensor([False, True]).view(1, 1, 1, 2).expand(2, 1, 1, 2)
    out = s.inpaint(three, known, fill, generator=torch.Generator().manual_seed(0))
    assert seen == s.sampling_steps(999, utils.SAMPLE_STEPS) and utils.SAMPLER != "ddpm"
    assert (out[..., 1] == 1).all() and (out[..., 0] == 0).all()
    assert (s.inpaint(three, known, fill, clip=False)[..., 1] == 3).all()


def test_a_mask_of_everything_draws_a_sample_of_the_model():
    out = fill_second_pixel(1, 1, everything=True).view(-1, 2)
    assert torch.allclose(out.mean(0), MU, atol=0.015)
    assert torch.allclose(torch.cov(out.T), COV, atol=0.012)  # the spread and the correlation of the data


# ---------------------------------------------------------------- edit.py --mask on a tiny model
def fill(run, tmp_path, mask, *flags):
    slices = write_blobs(str(tmp_path / "slices"), 3)
    r = run_script("edit.py", "--output-dir", str(tmp_path / "out"), "--checkpoint",
                   os.path.join(run, "checkpoint.pt"), "--compile", "false", "--sample-steps", "5", "--input", slices,
                   "--mask", mask, "--resample", "2", "--jump", "2", *flags)
    return r, slices, tmp_path / "out" / "edit"


def pixels(path):
    return np.array(Image.open(path)).astype(int)


def test_pixels_outside_the_mask_are_the_inputs_bit_for_bit(tiny_run, tmp_path):
    r, slices, out = fill(tiny_run, tmp_path, "box:0.25,0.25,0.75,0.5")
    assert r.returncode == 0, r.stderr
    assert os.path.getsize(out / "inpaint.png") > 0
    box = np.zeros((32, 32), bool)
    box[8:16, 8:24] = True
    changed = 0
    for i in range(3):
        given, filled = pixels(os.path.join(slices, f"img_{i:03d}.png")), pixels(out / "inpaint" / f"img_{i:03d}_filled.png")
        assert (given[~box] == filled[~box]).all()
        changed += (given[box] != filled[box]).sum()
    assert changed > 100  # the box is drawn anew


def test_masks_pair_by_name_are_resized_and_thresholded(tiny_run, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(3):
        grey = np.zeros((64, 64), np.uint8)
        grey[16:48, 16:48] = 200  # bigger than the images, and grey rather than white
        Image.fromarray(grey).save(masks / f"img_{i:03d}.png")
    r, slices, out = fill(tiny_run, tmp_path, str(masks))
    assert r.returncode == 0, r.stderr
    assert "masks laid into the model's 32x32 frame" in r.stdout and "thresholded at half grey" in r.stdout
    assert r.stdout.count("thresholded") == 1  # said once
    given, filled = pixels(os.path.join(slices, "img_000.png")), pixels(out / "inpaint" / "img_000_filled.png")
    outside = np.ones((32, 32), bool)
    outside[8:24, 8:24] = False
    assert (given[outside] == filled[outside]).all()


def test_an_empty_mask_gives_the_input_back_and_says_so(tiny_run, tmp_path):
    black = tmp_path / "black.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(black)
    r, slices, out = fill(tiny_run, tmp_path, str(black))
    assert r.returncode == 0 and "3 of the masks are empty" in r.stdout, r.stdout + r.stderr
    assert (pixels(os.path.join(slices, "img_001.png")) == pixels(out / "inpaint" / "img_001_filled.png")).all()


@pytest.mark.parametrize("case, expected", [
    ("box:0.5,0.2,0.4,0.9", "give box:X0,Y0,X1,Y1"), ("box:a,b", "give box:X0,Y0,X1,Y1"),
    ("stray", "has no slice of its name"), ("missing", "no mask for img_002"), ("nowhere", "is neither"),
    ("no input", "--mask needs the slices to fill")])
def test_bad_masks_get_one_line(tiny_run, tmp_path, case, expected):
    masks = tmp_path / "masks"
    masks.mkdir()
    for name in {"stray": ["img_000", "img_001", "img_002", "other"], "missing": ["img_000", "img_001"]}.get(case, []):
        Image.fromarray(np.full((32, 32), 255, np.uint8)).save(masks / f"{name}.png")
    spec = case if case.startswith("box:") else str(tmp_path / "nowhere") if case == "nowhere" else str(masks)
    if case == "no input":
        r = run_script("edit.py", "--output-dir", tiny_run, "--compile", "false", "--mask", "box:0,0,1,1")
    else:
        r, _, _ = fill(tiny_run, tmp_path, spec)
    assert r.returncode == 2 and expected in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_inpaint_eval_measures_repaint_beside_simpler_fills(tiny_run, tiny_data):
    r = run_script("edit.py", "--output-dir", tiny_run, "--compile", "false", "--sample-steps", "5",
                   "--inpaint-eval", "--resample", "2", "--jump", "2", "--data-dir", tiny_data)
    assert r.returncode == 0, r.stderr
    figures = json.load(open(os.path.join(tiny_run, "edit", "inpaint.json")))
    boxes = figures["boxes"]
    assert set(boxes) >= {"repaint", "no_resampling", "biharmonic", "height_mean"} and 0.05 < boxes["mask_share"] < 0.3
    assert all(0 <= boxes[k]["mae"] <= 1 and boxes[k]["seam_gradient_truth"] > 0 for k in ("repaint", "biharmonic"))
