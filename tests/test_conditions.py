"""Conditional generation: class labels and slice positions from each layout, the network's condition embeddings,
classifier-free guidance, a model that follows what it is asked for, the labelled demo, the probe, predict.py's
conditional outputs and its errors (CPU, tiny models)."""
import json
import math
import os

import numpy as np
import pytest
import torch

from conftest import TINY, run_script, write_blobs

import dataset
import demo
import evaluate
import objective
import predict
import train
import utils
import volumes
from modules import Denoiser, UNet, guided_output
from utils import NoiseSchedule, InputError


def config(data_dir, **overrides):
    return {**utils.constants(), "DATA_DIR": str(data_dir), "IMAGE_SIZE": 16, "BATCH_SIZE": 4, **overrides}


def one_line_error(r, *texts):
    assert r.returncode == 2, (r.returncode, r.stdout[-1500:], r.stderr[-1500:])
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for text in texts:
        assert text in r.stderr, r.stderr


# ---------------------------------------------------------------- positions and classes from the data
def test_slice_positions_are_ranks_within_each_subject():
    oasis = ["t/case_001_slice_3.nii.png", "t/case_001_slice_10.nii.png", "t/case_001_slice_7.nii.png",
             "t/case_002_slice_0.nii.png", "t/case_002_slice_1.nii.png", "t/case_003_slice_5.nii.png"]
    positions, unnamed = dataset.slice_positions(oasis, "oasis")
    assert unnamed is None and positions.tolist() == [0, 1, 0.5, 0, 1, 0.5]
    adni = ["train/AD/123_80.jpeg", "train/AD/123_78.jpeg", "train/AD/123_79.jpeg", "train/AD/124_80.jpeg",
            "train/AD/124_81.jpeg", "train/NC/123_5.jpeg"]
    positions, unnamed = dataset.slice_positions(adni, "adni")
    assert unnamed is None and positions.tolist() == [1, 0, 0.5, 0, 1, 0.5]  # subject 123 in NC is another head
    assert dataset.slice_positions(["sub-01_slice_2.png", "sub-01_slice_9.png"], "folder")[0].tolist() == [0, 1]
    assert dataset.slice_positions(["a/img_001.png", "a/img_002.png"], "folder") == (None, "a/img_001.png")


def test_layouts_give_positions_and_classes(tmp_path):
    from test_dataset import make_adni, make_oasis
    oasis = dataset.load_data(config(make_oasis(tmp_path / "o" / "keras_png_slices_data"), CONDITION="slice"))
    assert oasis.train_positions.shape == (12,) and oasis.classes == [] and oasis.train_labels is None
    adni = dataset.load_data(config(make_adni(tmp_path / "a" / "AD_NC"), CONDITION="class+slice"))
    assert adni.classes == ["AD", "NC"] and adni.train_positions.tolist() == [0.5] * 5  # one slice per subject
    folder = tmp_path / "f"
    for cls in ("healthy", "tumour"):
        write_blobs(str(folder / cls), 6, seed=len(cls))
    plain = dataset.load_data(config(folder))
    assert plain.classes == [] and plain.train_labels is None  # classes only when asked for
    labelled = dataset.load_data(config(folder, CONDITION="class"))
    assert labelled.classes == ["healthy", "tumour"]
    assert labelled.train_labels.bincount().tolist() == [6 - (labelled.val_labels == 0).sum(),
                                                         6 - (labelled.val_labels == 1).sum()]


@pytest.mark.parametrize("case, condition, expected", [
    ("loose", "class", "class conditioning needs images in two or more class folders"),
    ("one_class", "class", "has only healthy"),
    ("loose", "slice", "has none: use --condition none"),
    ("oasis", "class+slice", "class conditioning needs")])
def test_data_without_the_condition_is_one_clear_error(tmp_path, case, condition, expected):
    from test_dataset import make_oasis
    if case == "loose":
        write_blobs(str(tmp_path), 4)
    elif case == "one_class":
        write_blobs(str(tmp_path / "healthy"), 4)
    else:
        make_oasis(tmp_path / "keras_png_slices_data")
    with pytest.raises(InputError) as e:
        dataset.load_data(config(tmp_path, CONDITION=condition))
    assert "\n" not in str(e.value) and expected in str(e.value), str(e.value)
    if case == "loose" and condition == "slice":
        assert str(tmp_path / "img_000.png") in str(e.value) or "img_00" in str(e.value)


def test_labelled_demo_has_simulated_atrophy(tmp_path):
    demo.build_labelled_demo(str(tmp_path), subjects=(3, 1), slices=6, size=128)
    d = dataset.load_data(config(tmp_path / "AD_NC", IMAGE_SIZE=128, CONDITION="class+slice"))
    assert (d.layout, d.classes, len(d.train), len(d.val)) == ("adni", ["AD", "NC"], 36, 12)
    assert sorted(d.train_positions.unique().tolist()) == pytest.approx([i / 5 for i in range(6)])
    middle = (d.train_positions > 0.3) & (d.train_positions < 0.8)  # where the ventricles are
    x = d.train.float()[:, 0]
    brain = x > 20
    csf = ((x < 90) & brain).sum((1, 2)) / brain.sum((1, 2))  # dark (CSF-like) share of the brain
    ad, nc = csf[middle & (d.train_labels == 0)], csf[middle & (d.train_labels == 1)]
    # larger ventricles, wider sulci (1.27x on this seed: since demo 4 the NC subjects carry their age's atrophy too)
    assert ad.mean() > 1.2 * nc.mean(), (ad.mean(), nc.mean())
    assert brain[d.train_labels == 0].float().mean() < brain[d.train_labels == 1].float().mean()  # smaller brains


# ---------------------------------------------------------------- the network and guidance
def tiny_conditional_unet():
    torch.manual_seed(0)
    model = UNet(16, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), num_heads=2,
                 num_classes=2, slice_positions=True)
    for p in model.parameters():  # conditions start as no-ops: give them something to say
        torch.nn.init.normal_(p, std=0.1)
    return model.eval()


def test_not_given_conditions_use_their_learned_entries():
    model, x, t = tiny_conditional_unet(), torch.randn(3, 1, 16, 16), torch.tensor([10, 500, 900])
    labels, positions = torch.tensor([0, 1, -1]), torch.tensor([0.2, float("nan"), 0.9])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), model(x, t, torch.full((3,), -1), torch.full((3,), float("nan"))))
        full = model(x, t, labels, positions)
        assert not torch.allclose(full[0], model(x[:1], t[:1])[0])
        torch.testing.assert_close(full[2], model(x[2:], t[2:], None, positions[2:])[0])
        assert not torch.allclose(model(x, t, labels, positions.nan_to_num(0.5))[1], full[1])  # NaN is not a position


def test_guidance_combines_one_batched_pair():
    model, x, t = tiny_conditional_unet(), torch.randn(4, 1, 16, 16), torch.tensor([5, 50, 500, 950])
    labels, positions = torch.tensor([0, 1, 0, 1]), torch.tensor([0.1, 0.4, 0.6, 0.9])
    calls = []
    counted = lambda *a: calls.append(len(a[0])) or model(*a)  # noqa: E731
    with torch.no_grad():
        cond, uncond = model(x, t, labels, positions), model(x, t)
        guided = lambda scale: guided_output(counted, x, t, labels, positions, scale)  # noqa: E731
        torch.testing.assert_close(guided(0.0), uncond)  # 0: the unconditional model
        torch.testing.assert_close(guided(1.0), cond)
        torch.testing.assert_close(guided(3.0), uncond + 3 * (cond - uncond), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(guided_output(counted, x, t, None, positions, 3.0),
                                   model(x, t) + 3 * (model(x, t, None, positions) - model(x, t)), rtol=1e-4, atol=1e-5)
    assert calls == [4, 4, 8, 8]  # the guided pair is one call of twice the batch


def disks(labels, positions, size=16):
    """uint8 images of two classes whose slice position sets the size: a centred disk on black, of radius
    3 + 4 * position pixels, white for class 0 ('AD') and grey for class 1 ('NC')."""
    yy, xx = torch.meshgrid(torch.arange(size) - (size - 1) / 2, torch.arange(size) - (size - 1) / 2, indexing="ij")
    inside = (yy ** 2 + xx ** 2)[None] < ((3 + 4 * positions) ** 2)[:, None, None]
    return (inside * torch.where(labels == 0, 255.0, 120.0)[:, None, None]).to(torch.uint8)[:, None]


def disk_images(n, seed=0):
    """n disks of random class and position: (images, labels, positions)."""
    gen = torch.Generator().manual_seed(seed)
    labels, positions = torch.randint(0, 2, (n,), generator=gen), torch.rand(n, generator=gen)
    return disks(labels, positions), labels, positions


def test_a_conditional_model_draws_what_it_is_asked_for():
    """Trained briefly on white and grey disks whose size follows the slice position, the model draws the
    asked-for class (brightness) at the asked-for position (radius)."""
    torch.manual_seed(0)
    labels, positions = torch.tensor([0, 1]).repeat_interleave(14), torch.linspace(0, 1, 14).repeat(2)
    images = disks(labels, positions)
    model = UNet(16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), num_heads=2,
                 num_classes=2, slice_positions=True)
    schedule = NoiseSchedule(100, "cosine", "v")
    cfg = {**utils.constants(), "TIMESTEPS": 100, "COND_DROP": 0.1, "MIN_SNR_GAMMA": 5.0, "GRAD_CLIP": 1.0}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(400):
        idx = torch.randint(0, len(images), (32,), generator=gen)
        x0, t, noise, cond = objective.make_batch(images, idx, gen, cfg, 0, 1, torch.device("cpu"), labels, positions)
        train.train_step(model, model, optimizer, schedule, x0, t, noise, cond, cfg, bf16=False)
    asked_y, asked_s = torch.tensor([0, 1] * 4), torch.tensor([0.1, 0.1, 0.4, 0.4, 0.6, 0.6, 0.9, 0.9])
    with torch.no_grad():
        out = schedule.sample(Denoiser(model.eval(), asked_y, asked_s, 2.0), (8, 1, 16, 16), "dpm++", 10,
                              generator=torch.Generator().manual_seed(1))[:, 0]
    inside = out > -0.55  # brighter than half-way to the grey class: the disk
    brightness = (out * inside).sum((1, 2)) / inside.sum((1, 2))  # white 1.0, grey -0.06
    assert ((brightness > 0.45) == (asked_y == 0)).all(), brightness
    radius = (inside.sum((1, 2)) / math.pi).sqrt()
    assert (radius - (3 + 4 * asked_s)).abs().max() < 1, radius


# ---------------------------------------------------------------- the probe
def test_probe_reads_class_and_position(monkeypatch):
    monkeypatch.setattr(evaluate, "PROBE_EPOCHS", 150)  # 150 steps of 64 images
    images, labels, positions = disk_images(64)
    model = evaluate.fit_probe(images, labels, positions, 2, torch.device("cpu"))
    test_images, test_labels, test_positions = disk_images(32, seed=1)
    _, predicted, position = evaluate.read_slices(model, test_images, torch.device("cpu"))
    assert (predicted == test_labels).float().mean() > 0.95
    assert (position - test_positions).abs().mean() < 0.1


def test_train_on_synthetic_gets_the_training_budget_of_train_on_real(monkeypatch, tmp_path):
    """16 labelled 'samples' teach the TSTR classifier as well as 256 real slices do: it trains as many steps."""
    monkeypatch.setattr(evaluate, "PROBE_EPOCHS", 30)  # 120 steps of 64 images for 256 training slices
    train_images, train_labels, _ = disk_images(256)
    val_images, val_labels, _ = disk_images(32, seed=2)
    data = dataset.Data("adni", str(tmp_path), train_images, val_images, train_labels, val_labels, ["AD", "NC"])
    few, few_labels, _ = disk_images(16, seed=3)
    assert evaluate.classifier_accuracy(few, few_labels, data, torch.device("cpu")) > 0.9


def test_control_figures_follow_the_probe(monkeypatch, tmp_path):
    """Real held-out slices asked for their own labels agree with the probe as often as its held-out accuracy;
    asked for the other label, as often as it errs."""
    monkeypatch.setattr(evaluate, "PROBE_EPOCHS", 80)  # 60 steps of 64 images
    train_images, train_labels, train_positions = disk_images(48)
    val_images, val_labels, val_positions = disk_images(24, seed=2)
    data = dataset.Data("adni", str(tmp_path), train_images, val_images, train_labels, val_labels, ["AD", "NC"],
                        train_positions, val_positions, fingerprint="test", cache=str(tmp_path))
    as_samples = val_images.float() / 127.5 - 1
    right = evaluate.control(as_samples, val_labels, val_positions, data, torch.device("cpu"))
    wrong = evaluate.control(as_samples, 1 - val_labels, 1 - val_positions, data, torch.device("cpu"))
    assert right["class_agreement"] == right["class_accuracy_real_heldout"] == 1 - wrong["class_agreement"]
    assert right["slice_mae"] == pytest.approx(right["slice_mae_real_heldout"])
    assert wrong["slice_mae"] > right["slice_mae"] + 0.1
    assert any(f.startswith("probe_") for f in os.listdir(tmp_path))  # cached beside the data's cache


# ---------------------------------------------------------------- predict.py and the checkpoint
def test_predict_writes_conditional_outputs(conditional_run, disks_data):
    r = run_script("predict.py", "--output-dir", conditional_run, "--data-dir", disks_data, "--compile", "false",
                   "--num-samples", "4", "--sample-steps", "3", "--slice-sweep", "3", "--tstr", "8",
                   "--label", "NC", "--slice-position", "0.2:0.6")
    assert r.returncode == 0, r.stderr
    out = os.path.join(conditional_run, "predict")
    for name in ("conditions.png", "slice_sweep.png", "slice_sweep.gif", "slice_sweep_NC.nii.gz", "grid.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert not os.path.exists(os.path.join(out, "slice_sweep_AD.nii.gz"))  # --label NC: one class only
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    for key in ("class_agreement", "class_accuracy_real_heldout", "slice_mae", "slice_mae_real_heldout",
                "tstr_accuracy", "train_on_real_accuracy"):
        assert 0 <= metrics[key] <= 1, key
    assert metrics["tstr_samples"] == 8 and metrics["guidance"] == utils.GUIDANCE
    stack = volumes.load_ras(os.path.join(out, "slice_sweep_NC.nii.gz"))[0]
    assert stack.shape == (16, 16, 3)  # three positions, stacked bottom to top


def test_slice_stacks_open_the_right_way_up():
    """A stack written by predict.py and read back as a scan gives the same slices: RAS on disk, nose up here."""
    import tempfile

    import pictures
    slices = torch.zeros(3, 8, 8, dtype=torch.uint8)
    slices[:, 0, :] = 200  # the top row: anterior
    slices[:, :, 0] = 100  # the left column: the patient's right
    slices[2] = 50  # the last slice: the top of the head
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "s.nii.gz")
        pictures.save_stack(slices[:, None].float() / 127.5 - 1, path, 1.0, 1.0)
        vol = volumes.load_ras(path)[0]
    assert (vol[:-1, -1, 0] == 200).all() and (vol[-1, :-1, 0] == 100).all()  # anterior is +y; right is +x
    assert vol[:, :, 2].max() == 50  # superior is +z
    back = torch.from_numpy(vol.transpose(2, 1, 0)[:, ::-1, ::-1].copy())  # as volumes.py lays scans out
    assert torch.equal(back.to(torch.uint8), slices)


def test_a_checkpoint_from_before_condition_and_patch_size_loads_as_class_unpatched(conditional_run, tmp_path):
    state = torch.load(os.path.join(conditional_run, "checkpoint.pt"), weights_only=True)
    model = UNet(16, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_heads=2,
                 num_classes=2)  # the class-only network of the old format
    state["model"] = state["ema"] = model.state_dict()
    del state["guide"]  # the old format had no early snapshot either
    state["config"].pop("CONDITION")
    state["config"].pop("PATCH_SIZE")  # nor pixels folded into channels
    state["config"]["CONDITIONAL"] = True
    torch.save(state, tmp_path / "old.pt")
    old = predict.load_model(str(tmp_path / "old.pt"), True, torch.device("cpu"))
    assert old.cfg["CONDITION"] == "class" and old.class_names == ["AD", "NC"] and old.net.slice_mlp is None
    assert old.cfg["PATCH_SIZE"] == 1 and old.net.patch_size == 1 and old.guide is None


@pytest.mark.parametrize("flags, expected", [
    (("--label", "MCI"), "--label MCI is not one of this model's classes: AD, NC"),
    (("--label", "7"), "not one of this model's classes"),
    (("--slice-position", "1.5"), "--slice-position 1.5: give a position in [0, 1]"),
    (("--slice-position", "0.2:x"), "give a position in [0, 1]"),
    (("--slice-sweep", "-2"), "--slice-sweep and --tstr take a number")])
def test_bad_conditions_get_one_line(conditional_run, flags, expected):
    r = run_script("predict.py", "--output-dir", conditional_run, "--compile", "false", "--no-metrics", *flags)
    one_line_error(r, expected)


@pytest.mark.parametrize("flags, expected", [
    (("--label", "AD"), "not trained with class conditioning"),
    (("--slice-position", "0.5"), "not trained with slice conditioning"),
    (("--slice-sweep", "4"), "not trained with slice conditioning"),
    (("--tstr", "16"), "not trained with class conditioning")])
def test_conditions_for_an_unconditional_model_get_one_line(tiny_run, flags, expected):
    r = run_script("predict.py", "--output-dir", tiny_run, "--compile", "false", "--no-metrics", *flags)
    one_line_error(r, expected)


def test_training_on_data_without_the_condition_gets_one_line(tiny_data, tmp_path):
    r = run_script("train.py", "--data-dir", tiny_data, "--output-dir", str(tmp_path), *TINY, "--condition", "class")
    one_line_error(r, "class conditioning needs images in two or more class folders")
    assert not os.path.exists(tmp_path / "checkpoint.pt")


def test_frechet_distance_of_known_gaussians():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(100_000, 4, generator=gen, dtype=torch.float64)
    b = 2 * torch.randn(100_000, 4, generator=gen, dtype=torch.float64) + torch.tensor([1.0, 0, 0, 2])
    assert evaluate.frechet(a, a) == pytest.approx(0, abs=1e-9)
    assert evaluate.frechet(a, b) == pytest.approx(5 + 4 * (1 + 4 - 2 * 2), rel=0.02)  # |dmu|^2 + D (1 + 4 - 2*2)
