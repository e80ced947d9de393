"""predict.py on a tiny checkpoint: files, sizes, determinism, samplers, denoising, metrics, bad input."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_script, write_blobs
from modules import Denoiser


def predict(run, *args):
    return run_script("predict.py", "--output-dir", run, "--compile", "false", "--sample-steps", "5", *args)


def one_line_error(r, text):
    assert r.returncode == 2, r.stderr
    assert text in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_writes_samples_grid_process_denoise_and_metrics(tiny_run, tiny_data):
    r = predict(tiny_run, "--num-samples", "6", "--sample-batch", "4", "--data-dir", tiny_data)
    assert r.returncode == 0, r.stderr
    out = os.path.join(tiny_run, "predict")
    samples = sorted(f for f in os.listdir(out) if f.startswith("sample_"))
    assert samples == [f"sample_{i:03d}.png" for i in range(6)]
    img = Image.open(os.path.join(out, samples[0]))
    assert img.mode == "L" and img.size == (32, 32)
    for name in ("grid.png", "process.png", "process.gif", "denoise.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert Image.open(os.path.join(out, "process.gif")).n_frames >= 5  # noise, then each of the 5 steps
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    for key in ("ssim_to_nearest_heldout", "psnr_to_nearest_heldout", "ms_ssim_between_samples",
                "ms_ssim_between_real", "rmse_sample_to_nearest_train", "possible_copies", "images_per_s"):
        assert key in metrics, key
    assert -1 <= metrics["ssim_to_nearest_heldout"] <= 1 and "images/s" in r.stdout


def test_same_seed_same_images(tiny_run, tmp_path):
    pics = []
    for out in ("a", "b"):
        r = predict(tiny_run, "--num-samples", "2", "--no-metrics", "--input", write_blobs(str(tmp_path / "in"), 2),
                    "--checkpoint", os.path.join(tiny_run, "checkpoint.pt"), "--output-dir", str(tmp_path / out))
        assert r.returncode == 0, r.stderr
        pics.append(open(tmp_path / out / "predict" / "sample_001.png", "rb").read())
    assert pics[0] == pics[1]


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++", "dpm++sde"])
def test_every_sampler_runs(tiny_run, tmp_path, sampler):
    r = predict(tiny_run, "--sampler", sampler, "--num-samples", "2", "--no-metrics", "--output-dir", str(tmp_path),
                "--checkpoint", os.path.join(tiny_run, "checkpoint.pt"), "--input", write_blobs(str(tmp_path / "in"), 2))
    assert r.returncode == 0, r.stderr
    assert os.path.exists(tmp_path / "predict" / "sample_001.png")


def test_small_strength_gives_back_the_input(tiny_run):
    import predict as p
    trained = p.load_model(os.path.join(tiny_run, "checkpoint.pt"), True, torch.device("cpu"))
    images = (torch.rand(4, 1, 32, 32) * 255).to(torch.uint8)
    settings = dict(SEED=0, SAMPLER="dpm++", SAMPLE_STEPS=5, DDIM_ETA=0.0, STEP_SPACING=2.0, GUIDANCE=1.0,
                    AUTOGUIDANCE=1.0)
    import tempfile
    with tempfile.TemporaryDirectory() as out:
        sampling = p.Sampling(trained.net, trained.schedule, trained.cfg, settings, torch.device("cpu"))
        result = p.noise_and_restore(sampling, images, 0.002, out)
    assert (result - (images.float() / 127.5 - 1)).abs().mean() < 0.05


def test_step_spacing_reaches_the_sampler(tmp_path):
    import predict as p
    from utils import NoiseSchedule
    schedule, seen = NoiseSchedule(1000, "cosine", "eps"), []

    def net(x, t, labels=None, positions=None):
        seen.append(int(t[0]))
        return torch.zeros_like(x)
    for spacing, expected in ((1.0, [999, 749, 500, 250, 0]), (3.0, [999, 421, 125, 16, 0])):
        settings = dict(SEED=0, NUM_SAMPLES=1, SAMPLE_BATCH=1, SAMPLER="dpm++", SAMPLE_STEPS=5, DDIM_ETA=0.0,
                        STEP_SPACING=spacing, GUIDANCE=1.0, AUTOGUIDANCE=1.0)
        seen.clear()
        sampling = p.Sampling(net, schedule, dict(IMAGE_SIZE=8, CHANNELS=1), settings, torch.device("cpu"))
        p.generate(sampling, 1, str(tmp_path))
        assert seen == expected


def test_bad_inputs_get_one_clear_line(tiny_run, tmp_path):
    one_line_error(predict(str(tmp_path)), "no checkpoint")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(os.path.join(tiny_run, "checkpoint.pt"), "rb").read()[:5000])
    one_line_error(predict(tiny_run, "--checkpoint", str(truncated)), "not a readable checkpoint")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    one_line_error(predict(tiny_run, "--checkpoint", str(foreign)), "not a checkpoint of this project")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(predict(tiny_run, "--input", str(empty), "--no-metrics", "--num-samples", "1"), str(empty))
    one_line_error(predict(tiny_run, "--sampler", "euler"), "unknown SAMPLER")
    one_line_error(predict(tiny_run, "--strength", "1.5", "--num-samples", "1", "--no-metrics", "--input",
                           write_blobs(str(tmp_path / "in"), 1)), "--strength")


# ---------------------------------------------------------------- the checkpoint decides, the flags are honoured
def constant_output_checkpoint(tiny_run, path, raw_value, ema_value, guide_value=None):
    """tiny_run's checkpoint made to predict x0 = raw_value (raw weights) or ema_value (EMA weights) everywhere, with
    a schedule, T and prediction type that all differ from the constants in utils.py; its early snapshot (for
    autoguidance) predicts guide_value, or is left out."""
    state = torch.load(os.path.join(tiny_run, "checkpoint.pt"), weights_only=True)
    state["config"].update(PREDICTION="x0", BETA_SCHEDULE="linear", TIMESTEPS=50)
    weights = {"model": state["model"], "ema": state["ema"], "guide": state.pop("guide")["weights"]}
    if guide_value is not None:
        state["guide"] = {"step": 2, "weights": weights["guide"]}
    for part, value in (("model", raw_value), ("ema", ema_value), ("guide", guide_value)):
        weights[part]["out.2.weight"].zero_()
        weights[part]["out.2.bias"].fill_(0.0 if value is None else value)
    torch.save(state, path)
    return str(path)


def test_load_model_rebuilds_network_and_schedule_from_the_checkpoint(tiny_run, tmp_path):
    import predict as p
    import utils
    path = constant_output_checkpoint(tiny_run, tmp_path / "c.pt", -0.5, 0.5)
    assert (utils.TIMESTEPS, utils.BETA_SCHEDULE, utils.PREDICTION) != (50, "linear", "x0")
    for use_ema, value in ((True, 0.5), (False, -0.5)):
        trained = p.load_model(path, use_ema, torch.device("cpu"))
        schedule = trained.schedule
        assert (schedule.timesteps, schedule.prediction) == (50, "x0") and trained.cfg["BASE_CHANNELS"] == 8
        torch.testing.assert_close(schedule.alphas_cumprod, utils.NoiseSchedule(50, "linear", "x0").alphas_cumprod)
        assert trained.net.out[2].bias.item() == value


def test_a_checkpoint_older_than_a_setting_takes_its_default(tiny_run, tmp_path):
    """A checkpoint written before LABELS existed still loads its data (for metrics, edits and --inpaint-eval)."""
    import dataset
    import predict as p
    import utils
    state = torch.load(os.path.join(tiny_run, "checkpoint.pt"), weights_only=False)
    del state["config"]["LABELS"]
    torch.save(state, tmp_path / "old.pt")
    cfg = p.load_model(str(tmp_path / "old.pt"), True, torch.device("cpu")).cfg
    assert cfg["LABELS"] == utils.LABELS and len(dataset.load_data(cfg).val) > 0


def test_samples_come_from_the_ema_unless_no_ema(tiny_run, tmp_path):
    """EMA weights that predict x0 = 0.5 give pixels of 191 ((0.5 + 1) / 2 * 255 = 191.25, rounded); the raw
    ones, -0.5, give 64 (63.75)."""
    path = constant_output_checkpoint(tiny_run, tmp_path / "c.pt", -0.5, 0.5)
    for flags, pixel in (((), 191), (("--no-ema",), 64)):
        out = tmp_path / f"out{len(flags)}"
        r = predict(str(out), "--checkpoint", path, "--num-samples", "2", "--no-metrics", *flags,
                    "--input", write_blobs(str(tmp_path / "in"), 1))
        assert r.returncode == 0, r.stderr
        img = np.array(Image.open(out / "predict" / "sample_001.png"))
        assert img.min() == img.max() == pixel, (flags, img.min(), img.max())


def test_autoguidance_steers_away_from_the_early_snapshot(tiny_run, tmp_path):
    """EMA weights that predict x0 = 0.5 and an early snapshot that predicts 0: autoguidance 1.25 gives
    0 + 1.25 * (0.5 - 0) = 0.625 (pixels of 207), 1 gives the EMA's 191; without a snapshot it is off, and says so."""
    guided = constant_output_checkpoint(tiny_run, tmp_path / "g.pt", -0.5, 0.5, guide_value=0.0)
    plain = constant_output_checkpoint(tiny_run, tmp_path / "p.pt", -0.5, 0.5)
    for i, (path, flags, pixel, said) in enumerate((
            (guided, (), 207, "autoguidance 1.25 from step 2"), (guided, ("--autoguidance", "1"), 191, ""),
            (plain, (), 191, "holds no early snapshot"))):
        r = predict(str(tmp_path / f"out{i}"), "--checkpoint", path, "--num-samples", "2", "--no-metrics", *flags,
                    "--input", write_blobs(str(tmp_path / "in"), 1))
        assert r.returncode == 0 and said in r.stdout, r.stdout + r.stderr
        assert ("autoguidance 1.25 from" in r.stdout) == (pixel == 207), r.stdout
        img = np.array(Image.open(tmp_path / f"out{i}" / "predict" / "sample_001.png"))
        assert img.min() == img.max() == pixel, (flags, img.min(), img.max())


def test_sampler_and_seed_flags_change_the_images(tiny_run, tmp_path):
    images = {}
    for name, flags in (("default", ()), ("seed", ("--seed", "1")), ("sampler", ("--sampler", "ddim"))):
        r = predict(tiny_run, "--num-samples", "2", "--no-metrics", "--output-dir", str(tmp_path / name),
                    "--checkpoint", os.path.join(tiny_run, "checkpoint.pt"),
                    "--input", write_blobs(str(tmp_path / "in"), 1), *flags)
        assert r.returncode == 0, r.stderr
        images[name] = np.array(Image.open(tmp_path / name / "predict" / "sample_000.png")).astype(float)
    for name in ("seed", "sampler"):
        assert np.abs(images[name] - images["default"]).mean() > 2, name


def test_denoise_takes_noised_images_along_the_exact_ode(tmp_path):
    """With the exact denoiser of Gaussian data and the deterministic dpm++, denoise() noises to step strength*T
    and returns the ODE's exact image of that noised input: much closer to the clean image than the input was."""
    import predict as p
    from test_schedule import MU2, SIGMA2, exact_ode_map, gaussian_oracle
    from utils import NoiseSchedule
    schedule, strength, seed = NoiseSchedule(1000, "cosine", "v"), 0.3, 4
    gen = torch.Generator().manual_seed(0)
    images = ((MU2 + SIGMA2 * torch.randn(8, 1, 32, 32, generator=gen)).clamp(-1, 1) * 127.5 + 127.5).round().byte()
    settings = dict(SEED=seed, SAMPLER="dpm++", SAMPLE_STEPS=25, DDIM_ETA=0.0, STEP_SPACING=2.0, GUIDANCE=1.0,
                    AUTOGUIDANCE=1.0)
    oracle = gaussian_oracle(schedule, "v", MU2, SIGMA2)
    sampling = p.Sampling(lambda x, t, *cond: oracle(x, t), schedule, {}, settings, torch.device("cpu"))
    result = p.noise_and_restore(sampling, images, strength, str(tmp_path))
    clean, start_t = images.float() / 127.5 - 1, round(strength * 1000) - 1
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    noised = schedule.q_sample(clean, torch.full((8,), start_t), noise)
    assert (result - exact_ode_map(schedule, noised, start_t, MU2, SIGMA2)).abs().mean() < 0.01
    assert (result - clean).abs().mean() < 0.7 * (noised - clean).abs().mean()
    assert os.path.exists(tmp_path / "denoise.png") and os.path.exists(tmp_path / "denoised_007.png")


def distinct_images(n, seed):
    """n smooth random uint8 32 px images, all far apart."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, 1, 8, 8, generator=gen), size=32, mode="bicubic")
    return (x.clamp(0, 1) * 255).round().byte()


def test_psnr_and_diversity_known_answers():
    """A sample 0.1 brighter everywhere than a held-out image is 20 dB from it; copies of one image have MS-SSIM 1
    between them, different images less."""
    import dataset
    import evaluate
    dim = lambda images: (images.float() * 0.8).round().byte()  # noqa: E731  room to brighten
    data = dataset.Data("folder", "x", dim(distinct_images(16, 0)), dim(distinct_images(16, 1)))
    _, psnr, _ = evaluate.nearest_similarity(data.val[:4].float() / 255 + 0.1, data.val, torch.device("cpu"))
    assert psnr.tolist() == pytest.approx([20.0] * 4, abs=1e-3)
    gen = torch.Generator().manual_seed(0)
    same = data.val[:1].float().repeat(8, 1, 1, 1) / 255
    assert evaluate.ms_ssim_pairs(same, gen) == pytest.approx(1, abs=1e-6)
    assert evaluate.ms_ssim_pairs(data.val.float() / 255, gen) < 0.9


def test_nearest_searches_past_a_chunk():
    import evaluate
    pool = torch.full((4100, 1, 4, 4), 200, dtype=torch.uint8)
    pool[4096] = 10  # the only dark image sits in the second chunk
    idx, rmse = evaluate.nearest(torch.full((1, 1, 4, 4), 10 / 255), pool, torch.device("cpu"))
    assert idx.item() == 4096 and rmse.item() < 1e-6


def test_metrics_flag_training_images_and_score_heldout_images_perfectly():
    import dataset
    import evaluate as p
    data = dataset.Data("folder", "x", distinct_images(64, 0), distinct_images(32, 1))
    as_samples = lambda images: images.float() / 127.5 - 1  # noqa: E731
    copies = p.metrics(as_samples(data.train[:16]), data, torch.device("cpu"))
    assert copies["possible_copies"] == 16 and copies["rmse_sample_to_nearest_train"] < 1e-3
    heldout = p.metrics(as_samples(data.val[:16]), data, torch.device("cpu"))
    assert heldout["ssim_to_nearest_heldout"] == pytest.approx(1, abs=1e-4)
    assert 0 < heldout["ssim_heldout_to_nearest_train"] < 0.99  # the reference: real slices are not copies
    everything = p.metrics(as_samples(data.val), data, torch.device("cpu"))
    assert everything["frechet_distance"] == pytest.approx(0, abs=1e-6)  # the held-out slices themselves
    black = p.metrics(torch.full_like(as_samples(data.val), -1), data, torch.device("cpu"))
    assert black["frechet_distance"] > 10 * black["frechet_distance_real"] > 0  # far from real, beside its reference
    assert heldout["possible_copies"] <= 3 and heldout["rmse_sample_to_nearest_train"] > 0.05
