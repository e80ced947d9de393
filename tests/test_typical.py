"""How typical a slice is: typical.py's table, verdicts and picture, the diffusion classifier, the corruptions, and
bad input (CPU, tiny models)."""
import csv
import json
import os

import numpy as np
import torch
from PIL import Image

from conftest import run_script

import corruptions
import predict
import typical


def toy_sampling(run):
    trained = predict.load_model(os.path.join(run, "checkpoint.pt"), True, torch.device("cpu"))
    settings = dict(SAMPLE_BATCH=16, DATA_DIR="data")
    return predict.Sampling(trained.net, trained.schedule, trained.cfg, settings, torch.device("cpu"),
                            class_names=trained.class_names)


def disks(run):
    data = predict.load_heldout(toy_sampling(run))
    return data, data.val.float() / 127.5 - 1


def test_the_diffusion_classifier_reads_the_disks_classes(toy_run):
    """White disks are 'AD', grey ones 'NC': the class under which each held-out disk is most likely is its own."""
    data, x = disks(toy_run)
    scores = typical.scored(toy_sampling(toy_run), x, seed=0, per_class=True)
    assert scores.class_bits.shape == (len(x), 2)
    assert (scores.class_bits.argmin(1) == data.val_labels).float().mean().item() >= 0.9


def test_noise_and_blank_slices_score_above_the_typical_range(toy_run):
    """Calibrated on the held-out disks, noisy copies and a blank slice are atypical; the clean disks mostly not."""
    data, x = disks(toy_run)
    sampling = toy_sampling(toy_run)
    cal = typical.calibrate(typical.scored(sampling, x, seed=0))
    clean = typical.ood_score(typical.scored(sampling, x, seed=1), cal)
    noisy = corruptions.noisy(0.3)(x, torch.Generator().manual_seed(0))  # the toy (T = 50) sees only heavy noise
    blank = torch.full_like(x[:1], -1.0)
    odd = typical.ood_score(typical.scored(sampling, torch.cat([noisy, blank]), seed=1), cal)
    assert (odd[:-1] > cal.threshold).float().mean().item() >= 0.9 and odd[-1] > cal.threshold, (odd, cal.threshold)
    assert typical.auroc(clean, odd[:-1]) > 0.95
    assert (clean > cal.threshold).float().mean().item() <= 0.25
    assert torch.isfinite(odd).all()


def test_every_corruption_changes_the_slices_and_keeps_their_shape():
    x = torch.full((3, 1, 32, 32), -1.0)
    for i, r in enumerate((6, 9, 12)):
        yy, xx = torch.meshgrid(torch.arange(32) - 12.0, torch.arange(32) - 16.0, indexing="ij")
        x[i, 0][yy ** 2 + xx ** 2 < r ** 2] = 179 / 127.5 - 1  # on the 8-bit levels, as a file holds it
    for name, levels in corruptions.CORRUPTIONS.items():
        for level, corrupt in levels.items():
            y = corrupt(x, torch.Generator().manual_seed(0))
            assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1, name
            assert (y - x).abs().mean() > 0.005, f"{name} ({level}) left the slices as they were"
            levels = (y + 1) * 127.5
            assert torch.allclose(levels.round(), levels, atol=1e-3), f"{name} ({level}) is not on 8-bit levels"


def test_typical_writes_its_table_verdicts_and_picture(toy_run, tmp_path):
    """Held-out slices scored with the class read: a row each with bits, error, score, verdict and both readings;
    the typical range cached beside the checkpoint and used again."""
    r = run_script("typical.py", "--output-dir", toy_run, "--compile", "false", "--read-class")
    assert r.returncode == 0, r.stderr
    out = os.path.join(toy_run, "typical")
    with open(os.path.join(out, "typical.csv")) as f:
        rows = list(csv.DictReader(f))
    assert rows and {"bits_per_dim", "bits_stderr", "ood_score", "verdict", "bits_per_dim_AD", "diffusion_class",
                     "probe_class"} <= set(rows[0])
    assert all(float(row["bits_per_dim"]) > 0 and row["verdict"] in ("typical", "atypical") for row in rows)
    assert os.path.isfile(os.path.join(out, "typical.png"))
    summary = json.load(open(os.path.join(out, "typical.json")))
    assert summary["slices"] == len(rows) and summary["scans"]
    assert os.path.isfile(os.path.join(toy_run, "typical_calibration.json"))
    again = run_script("typical.py", "--output-dir", toy_run, "--compile", "false")
    assert again.returncode == 0 and "measuring the typical range" not in again.stdout


def test_a_blank_slice_and_another_size_get_scores_and_verdicts(toy_run, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / "blank.png")
    big = np.zeros((40, 40), np.uint8)
    big[10:30, 10:30] = 255
    Image.fromarray(big).save(folder / "big.png")
    r = run_script("typical.py", "--output-dir", toy_run, "--compile", "false", "--input", folder,
                   "--output-dir", tmp_path / "out", "--checkpoint", os.path.join(toy_run, "checkpoint.pt"))
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "out" / "typical" / "typical.csv") as f:
        rows = {row["slice"]: row for row in csv.DictReader(f)}
    assert rows["blank"]["verdict"] == "atypical" and np.isfinite(float(rows["blank"]["ood_score"]))


def test_the_class_of_a_model_without_classes_is_refused(tiny_run):
    r = run_script("typical.py", "--output-dir", tiny_run, "--compile", "false", "--read-class")
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "class" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_corruptions_are_measured(toy_run, tmp_path):
    r = run_script("typical.py", "--checkpoint", os.path.join(toy_run, "checkpoint.pt"), "--compile", "false",
                   "--corruptions", "--output-dir", tmp_path)
    assert r.returncode == 0, r.stderr
    result = json.load(open(tmp_path / "typical" / "corruptions.json"))
    assert set(result["auroc"]) == {f"{n} ({lv})" for n, levels in corruptions.CORRUPTIONS.items() for lv in levels}
    assert all(set(v) == {*typical.METHODS, "flagged"} and all(0 <= f <= 1 for f in v.values())
               for v in result["auroc"].values())
    assert {"train", "heldout"} <= set(result["bits_per_dim"]) and "diffusion_accuracy" in result["classifier"]
