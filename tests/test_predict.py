"""predict.py on a tiny checkpoint: files, sizes, determinism, samplers, denoising, metrics, bad input."""
import json
import os

import pytest
import torch
from PIL import Image

from conftest import run_script, write_blobs


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
    model, schedule, cfg, _, _ = p.load_model(os.path.join(tiny_run, "checkpoint.pt"), True, torch.device("cpu"))
    images = (torch.rand(4, 1, 32, 32) * 255).to(torch.uint8)
    run = dict(SEED=0, SAMPLER="dpm++", SAMPLE_STEPS=5, DDIM_ETA=0.0, STEP_SPACING=2.0)
    import tempfile
    with tempfile.TemporaryDirectory() as out:
        result = p.denoise(p.make_net(model, torch.device("cpu")), schedule, images, run, 0.002, torch.device("cpu"),
                           out)
    assert (result - (images.float() / 127.5 - 1)).abs().mean() < 0.05


def test_step_spacing_reaches_the_sampler(tmp_path):
    import predict as p
    from utils import NoiseSchedule
    schedule, seen = NoiseSchedule(1000, "cosine", "eps"), []

    def net(x, t):
        seen.append(int(t[0]))
        return torch.zeros_like(x)
    for spacing, expected in ((1.0, [999, 749, 500, 250, 0]), (3.0, [999, 421, 125, 16, 0])):
        run = dict(SEED=0, NUM_SAMPLES=1, SAMPLE_BATCH=1, SAMPLER="dpm++", SAMPLE_STEPS=5, DDIM_ETA=0.0,
                   STEP_SPACING=spacing)
        seen.clear()
        p.generate(net, schedule, dict(IMAGE_SIZE=8, CHANNELS=1), run, torch.device("cpu"), str(tmp_path))
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
