"""Age (and any numeric table column) as a condition, and progression: the covariates read from cohort tables, the
labelled demo's ages and futures, the network's covariate embeddings and their guidance, predict.py --age, and
progress.py against the demo's future truth (CPU, tiny models)."""
import csv
import json
import math
import os
import re

import pytest
import torch

from conftest import TINY, made_once, run_script, trained

import cohorts
import dataset
import demo
import objective
import progress
import train
import truth
import utils
from modules import Denoiser, UNet, guided_output
from utils import InputError, NoiseSchedule


@pytest.fixture(scope="session")
def aged_demo(tmp_path_factory):
    """A small labelled demo at 64 px (2 subjects per class to train on, 2 held out), with its ages and futures."""
    return made_once(tmp_path_factory, "aged_demo",
                     lambda f: demo.build_labelled_demo(f, subjects=(2, 2), slices=8, size=64))


@pytest.fixture(scope="session")
def age_run(aged_demo, tmp_path_factory):
    """OUTPUT_DIR of a tiny class+slice model with the age covariate, trained for 2 epochs on aged_demo."""
    return made_once(tmp_path_factory, "age_run", trained(
        "--data-dir", os.path.join(aged_demo, "AD_NC"), "--epochs", "2", "--condition", "class+slice",
        "--covariates", "age", *TINY))


def table_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def config(folder, **overrides):
    return {**utils.constants(), "DATA_DIR": str(folder), "IMAGE_SIZE": 32, **overrides}


# ---------------------------------------------------------------- the labelled demo's ages and futures
def test_the_demo_ages_everyone_and_renders_the_heldout_futures(aged_demo):
    """Every subject has an age in DEMO_AGES in the ADNI-like table; held-out slices (of both classes) have their
    futures, which for 'AD' grow the ventricles more than for 'NC' (the disease progresses on top of age)."""
    rows = table_rows(os.path.join(aged_demo, "AD_NC", demo.TABLE))
    drawn = {r["subject"]: r for r in table_rows(os.path.join(aged_demo, "truth", "subjects.csv"))}
    assert len(rows) == 8 and all(demo.DEMO_AGES[0] <= float(r["Age"]) <= demo.DEMO_AGES[1] for r in rows)
    assert {r["Group"] for r in rows} == {"AD", "CN"} and {r["Sex"] for r in rows} <= {"M", "F"}
    assert all(float(drawn[r["Subject"]]["age"]) == float(r["Age"]) for r in rows)
    assert all((float(d["rate_per_year"]) > 0) == (d["class"] == "AD") for d in drawn.values())
    data = dataset.load_data(config(os.path.join(aged_demo, "AD_NC"), IMAGE_SIZE=64, CONDITION="class"))
    present = data.val.int()
    dark = lambda images: ((images.int() < 90) & (present > 20)).flatten(1).sum(1).float()  # noqa: E731  CSF-like
    growth = {}
    for years in demo.FUTURE_YEARS:
        index, future = truth.read_future(data, years)
        assert index.tolist() == list(range(len(data.val)))  # every held-out slice, both classes
        growth[years] = dark(future) - dark(present)
    for label in (0, 1):
        assert growth[10][data.val_labels == label].mean() >= growth[5][data.val_labels == label].mean() >= 0
    assert growth[10][data.val_labels == 0].mean() > 2 * growth[10][data.val_labels == 1].mean()
    heldout = sorted(os.path.basename(n) for n in data.val_names)
    assert all(sorted(os.listdir(os.path.join(aged_demo, "truth", f"future_{y}"))) == heldout
               for y in demo.FUTURE_YEARS)  # never a training subject's


def test_a_subjects_atrophy_is_its_ages_and_its_diseases():
    who = demo.Subject("941_S_0001", "AD", 70.0, "F", onset=60.0, rate=0.04)
    assert who.atrophy() == pytest.approx(demo.AGE_RATE * (70 - demo.AGE_ONSET) + 0.4)
    assert who.atrophy(10) - who.atrophy() == pytest.approx(10 * (demo.AGE_RATE + 0.04))
    healthy = demo.Subject("941_S_0002", "NC", 40.0, "M")
    assert healthy.atrophy() == 0 and healthy.atrophy(20) == pytest.approx(10 * demo.AGE_RATE)  # onset at 50


def test_older_ad_subjects_are_further_into_the_disease():
    """As in a cross-sectional cohort (and unlike a severity drawn apart from the age): the disease's severity grows
    with the age at the scan, so that a model of (class, age) can learn the progression from one scan a subject."""
    g = torch.Generator().manual_seed(0)
    drawn = [demo._subject(k, "AD", g) for k in range(400)]
    ages, severity = torch.tensor([w.age for w in drawn]), torch.tensor([w.disease() for w in drawn])
    assert torch.corrcoef(torch.stack([ages, severity]))[0, 1] > 0.5
    assert all(w.age - w.onset >= demo.AD_SCANNED_AFTER - 0.1 and demo.DEMO_AGES[0] <= w.age <= demo.DEMO_AGES[1]
               for w in drawn)


# ---------------------------------------------------------------- covariates from tables
def test_the_demos_ages_reach_every_image(aged_demo):
    data = dataset.load_data(config(os.path.join(aged_demo, "AD_NC"), CONDITION="class+slice", COVARIATES="age,sex"))
    ages = {r["Subject"]: (float(r["Age"]), float(r["Sex"] == "F")) for r in table_rows(
        os.path.join(aged_demo, "AD_NC", demo.TABLE))}
    for names, values in ((data.train_names, data.train_covariates), (data.val_names, data.val_covariates)):
        expected = torch.tensor([ages[cohorts.subject_of(n)] for n in names])
        assert torch.equal(values, expected)
    assert data.covariate_names == ["Age", "Sex"] and "Age: 64 files given" in data.labels_report


def write_ids(folder, subjects):
    """One image per ADNI subject id, SUBJECT_scan.png, in a plain folder."""
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    for k, subject in enumerate(subjects):
        Image.new("L", (16, 16), 40 + 10 * k).save(os.path.join(folder, f"{subject}_scan.png"))


def test_careless_covariate_values_are_counted_and_not_given(tmp_path, capsys):
    """Blanks, text and impossible ages become 'not given' for their files, counted in the report; a subject's
    rows that disagree give no value; text M/F is a sex of 0/1."""
    subjects = [f"002_S_{k:04d}" for k in range(7)]
    write_ids(tmp_path / "images", subjects)
    with open(tmp_path / "table.csv", "w") as f:
        f.write("Subject,Age,Sex\n" + "".join(f"{s},{a},{x}\n" for s, a, x in zip(
            subjects, ["71.5", "", "unknown", "-3", "150", "80", "81"], ["F", "M", "female", "", "x", "M", "M"]))
                + f"{subjects[5]},82,M\n")  # a second visit of subject 5 at another age
    data = dataset.load_data(config(tmp_path / "images", LABELS=str(tmp_path / "table.csv"), COVARIATES="age,sex",
                                    IMAGE_SIZE=16))
    values = torch.cat([data.train_covariates, data.val_covariates])
    by_subject = {cohorts.subject_of(n): v.tolist() for n, v in zip(data.train_names + data.val_names, values)}
    assert by_subject[subjects[0]] == [71.5, 1.0] and by_subject[subjects[6]] == [81.0, 0.0]
    assert all(math.isnan(by_subject[s][0]) for s in subjects[1:6])
    report = data.labels_report
    assert "Age: 2 files given" in report and "4 blank or unreadable" in report and "1 rows disagree" in report
    assert "1 blank" in report and "1 text" in report and "2 impossible" in report, report


def test_a_table_without_the_covariate_names_its_columns(tmp_path):
    write_ids(tmp_path / "images", ["002_S_0001", "002_S_0002"])
    (tmp_path / "table.csv").write_text("Subject,Group\n002_S_0001,AD\n002_S_0002,NC\n")
    with pytest.raises(InputError) as e:
        dataset.load_data(config(tmp_path / "images", LABELS=str(tmp_path / "table.csv"), COVARIATES="MMSE"))
    assert "has no column MMSE; its columns: Subject, Group" in str(e.value)
    with pytest.raises(InputError) as e:
        dataset.load_data(config(tmp_path / "images", COVARIATES="age"))
    assert "holds no CSV or TSV files" in str(e.value) and "--labels FILE" in str(e.value)


def test_adnimerge_ages_are_per_visit_and_sex_is_binary():
    columns = ["PTID", "AGE", "Years_bl", "PTGENDER"]
    row = {"PTID": "002_S_0295", "AGE": "70.2", "Years_bl": "2.5", "PTGENDER": "Female"}
    assert cohorts.covariate_value(row, "AGE", columns) == (pytest.approx(72.7), None)
    assert cohorts.covariate_value(dict(row, Years_bl=""), "AGE", columns) == (pytest.approx(70.2), None)
    assert cohorts.covariate_value(row, "PTGENDER", columns) == (1.0, None)
    assert cohorts.covariate_value(dict(row, AGE="121"), "AGE", columns)[1] == "impossible"


# ---------------------------------------------------------------- the network
def test_covariates_are_embedded_and_not_given_is_learned():
    torch.manual_seed(0)
    model = UNet(16, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), num_heads=2,
                 covariates=2)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([10, 500, 900])
    values = torch.tensor([[0.2, 0.5], [float("nan"), 0.5], [0.9, float("nan")]])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), model(x, t, covariates=torch.full((3, 2), float("nan"))))
        full = model(x, t, covariates=values)
        assert not torch.allclose(full[0], model(x[:1], t[:1])[0])
        assert not torch.allclose(model(x, t, covariates=values.nan_to_num(0.5))[1], full[1])  # NaN is not a value
        torch.testing.assert_close(full[2], model(x[2:], t[2:], covariates=values[2:])[0])


def test_guidance_on_the_covariates_keeps_the_class():
    torch.manual_seed(0)
    model = UNet(16, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), num_heads=2,
                 num_classes=2, slice_positions=True, covariates=1).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([100, 700])
    y, s, c = torch.tensor([0, 1]), torch.tensor([0.3, 0.6]), torch.tensor([[0.2], [0.8]])
    with torch.no_grad():
        cond, no_age = model(x, t, y, s, c), model(x, t, y, s)
        torch.testing.assert_close(guided_output(model, x, t, y, s, 3.0, "covariates", c), no_age + 3 * (cond - no_age),
                                   rtol=1e-4, atol=1e-5)
        no_class_no_age = model(x, t, None, s)
        torch.testing.assert_close(guided_output(model, x, t, y, s, 3.0, "class+covariates", c),
                                   no_class_no_age + 3 * (cond - no_class_no_age), rtol=1e-4, atol=1e-5)


def test_a_model_draws_the_covariate_it_is_asked_for():
    """Trained briefly on disks whose radius follows a covariate (scaled to [0, 1]), the model draws the asked-for
    radius: the covariate's embedding carries it."""
    torch.manual_seed(0)
    values = torch.linspace(0, 1, 24)
    yy, xx = torch.meshgrid(torch.arange(16) - 7.5, torch.arange(16) - 7.5, indexing="ij")
    images = ((yy ** 2 + xx ** 2)[None] < ((3 + 4 * values) ** 2)[:, None, None]).to(torch.uint8)[:, None] * 255
    model = UNet(16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), num_heads=2,
                 covariates=1)
    schedule, cfg = NoiseSchedule(100, "cosine", "v"), {**utils.constants(), "TIMESTEPS": 100, "COND_DROP": 0.1}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(400):
        idx = torch.randint(0, len(images), (32,), generator=gen)
        x0, t, noise, cond = objective.make_batch(images, idx, gen, cfg, 0, 1, torch.device("cpu"),
                                                  covariates=values[:, None])
        train.train_step(model, model, optimizer, schedule, x0, t, noise, cond, cfg, bf16=False)
    asked = torch.tensor([0.1, 0.4, 0.6, 0.9]).repeat(2)
    with torch.no_grad():
        out = schedule.sample(Denoiser(model.eval(), guidance=2.0, covariates=asked[:, None]), (8, 1, 16, 16), "dpm++",
                              10, generator=torch.Generator().manual_seed(1))[:, 0]
    radius = ((out > 0).sum((1, 2)) / math.pi).sqrt()
    assert (radius - (3 + 4 * asked)).abs().max() < 1, radius


def test_covariates_scale_over_their_training_range():
    values = torch.tensor([[60.0, 0], [90, 1], [float("nan"), 1], [75, float("nan")]])
    ranges = utils.covariate_ranges(values)
    assert ranges == [(60.0, 90.0), (0.0, 1.0)]
    scaled = utils.scaled_covariates(values, ranges)
    torch.testing.assert_close(scaled, torch.tensor([[0.0, 0], [1, 1], [float("nan"), 1], [0.5, float("nan")]]),
                               equal_nan=True)
    assert utils.scaled_covariates(torch.tensor([[5.0]]), [(5.0, 5.0)]).item() == 0.5  # a constant column


# ---------------------------------------------------------------- predict.py --age and progress.py
def test_predict_draws_asked_ages_and_reads_them_back(age_run, tmp_path):
    r = run_script("predict.py", "--output-dir", age_run, "--age", "65:85", "--num-samples", "8", "--sample-batch",
                   "8", "--sample-steps", "5")
    assert r.returncode == 0, r.stderr
    metrics = json.load(open(os.path.join(age_run, "predict", "metrics.json")))
    assert {"age_mae", "age_mae_real_heldout", "class_agreement", "slice_mae"} <= set(metrics)
    assert os.path.isfile(os.path.join(age_run, "predict", "conditions_age.png"))
    assert "covariates age (" in r.stdout


def test_bad_ages_get_one_line(age_run):
    r = run_script("predict.py", "--output-dir", age_run, "--no-metrics", "--age", "old")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == \
        "error: --age old: give an age in years (75) or a range A:B (60:90)", r.stderr


def test_an_age_outside_the_trained_range_is_a_notice(age_run):
    r = run_script("predict.py", "--output-dir", age_run, "--no-metrics", "--age", "20", "--num-samples", "2",
                   "--sample-batch", "2", "--sample-steps", "5")
    assert r.returncode == 0 and "notice: --age 20 is outside the ages this model was trained on" in r.stdout


@pytest.mark.parametrize("script, flags", [("predict.py", ("--no-metrics", "--age", "70")), ("progress.py", ())])
def test_age_on_a_model_without_it_is_refused(conditional_run, script, flags):
    r = run_script(script, "--output-dir", conditional_run, *flags)
    assert r.returncode == 2 and "trained with an age covariate" in r.stderr.strip().splitlines()[-1], r.stderr


def test_progress_measures_against_the_future(age_run):
    r = run_script("progress.py", "--output-dir", age_run, "--edit-steps", "5")
    assert r.returncode == 0, r.stderr
    out = os.path.join(age_run, "progress")
    figures = json.load(open(os.path.join(out, "progression.json")))
    assert figures["years"] == [5, 10] and figures["slices"] == 32
    for horizon in ("+5", "+10"):
        f = figures[horizon]
        assert {"to_future", "input_to_future", "mean_change_to_future", "true_ventricle_change", "change_AD",
                "true_change_NC", "probe_age_mae", "null_change_outside"} <= set(f)
        assert f["true_change_AD"] > f["true_change_NC"] > 0
    assert figures["+10"]["true_change_AD"] > figures["+5"]["true_change_AD"]
    assert figures["+10"]["asked_age"] == pytest.approx(figures["+5"]["asked_age"] + 5, abs=1e-3)
    for name in ("progression.png", "progression.gif"):
        assert os.path.getsize(os.path.join(out, name)) > 1000
    assert len([n for n in os.listdir(os.path.join(out, "edits")) if n.endswith("_+10y.png")]) == 32


def test_progress_of_your_scan(age_run, tmp_path):
    """A scan of yours (nilearn's MNI template, every 12th axial slice) ten years on: a stack per horizon, of the
    slices with brain; its age is needed."""
    import nibabel
    import nilearn
    path = os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data", demo.TEMPLATE.format("t1"))
    image = nibabel.load(path)
    scan = tmp_path / "mni.nii.gz"
    nibabel.save(nibabel.Nifti1Image(image.get_fdata()[:, :, 30:150:12].astype("float32"), image.affine), scan)
    r = run_script("progress.py", "--output-dir", tmp_path, "--checkpoint", os.path.join(age_run, "checkpoint.pt"),
                   "--input", scan, "--years", "10", "--edit-steps", "5")
    assert r.returncode == 2 and "the age of the --input slices is not known: pass --age" in r.stderr
    r = run_script("progress.py", "--output-dir", tmp_path, "--checkpoint", os.path.join(age_run, "checkpoint.pt"),
                   "--input", scan, "--years", "10", "--age", "70", "--label", "NC", "--edit-steps", "5")
    assert r.returncode == 0, r.stderr
    stack = nibabel.load(tmp_path / "progress" / "progression_+10y.nii.gz")
    edits = [n for n in os.listdir(tmp_path / "progress" / "edits") if n.endswith("_+10y.png")]
    assert stack.shape == (32, 32, len(edits)) and len(edits) >= 6  # the slices that hold brain


def test_bad_progress_flags_get_one_line(age_run):
    """One bad flag through the script (one line, exit 2), the others through progress.py's checks in-process."""
    r = run_script("progress.py", "--output-dir", age_run, "--years", "ten")
    assert r.returncode == 2 and "--years ten: give years on, comma-separated" in r.stderr.strip().splitlines()[-1]
    for flags, expected in [(("--years", "-5"), "each in (0, 100]"),
                            (("--age", "70"), "--label, --slice-position and --age describe --input slices")]:
        with pytest.raises(InputError, match=re.escape(expected)):
            progress.parse_settings(["--output-dir", age_run, *flags])


# ---------------------------------------------------------------- the measures, against known answers
def test_ventricle_area_counts_csf_deep_in_the_brain_and_keeps_it_when_the_brain_shrinks():
    yy, xx = torch.meshgrid(torch.arange(64) - 31.5, torch.arange(64) - 31.5, indexing="ij")

    def brain(radius, scale=1.0, edge=False):
        x = torch.full((1, 1, 64, 64), -1.0)
        x[0, 0][yy ** 2 + xx ** 2 < radius ** 2] = 0.5  # the brain: tissue
        x[0, 0][((yy / scale).abs() < 4) & ((xx / scale).abs() < 6)] = -0.8  # a ventricle: 8 x 12 pixels, dark
        x[0, 0][(yy.abs() < 2) & ((xx - 24).abs() < 1)] = -0.8  # a sulcus at the edge: not counted
        if edge:
            x[0, 0][(yy.abs() < 4) & ((xx - 6.5).abs() < 0.5)] = (105 / 127.5 - 1)  # half-way CSF: half counted
        return x
    assert progress.ventricle_area(brain(26)).item() == 96
    assert progress.ventricle_area(brain(26, edge=True)).item() == 96 + 8 * 0.5
    assert progress.ventricle_area(brain(13)).item() == 96  # a smaller brain, the same ventricle


def test_the_mean_change_baseline_is_the_difference_of_age_groups():
    class Data:
        train = torch.tensor([0, 0, 254, 254], dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 1, 2, 2)
        train_labels, train_positions = torch.tensor([0, 0, 0, 0]), torch.tensor([0.5, 0.5, 0.5, 0.5])
        covariate_names, train_covariates = ["age"], torch.tensor([[60.0], [61], [70], [71]])
        val_covariates = train_covariates[:0]
    change = progress.mean_change(Data, torch.tensor([0]), torch.tensor([0.5]), torch.tensor([60.5]), 10)
    torch.testing.assert_close(change, torch.full((1, 1, 2, 2), 254 / 127.5))
