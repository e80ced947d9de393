"""Asking about a brain you hold: DDIM inversion and back, counterfactuals that change the class and keep the shape,
effect maps, the scores against known answers, the labelled demo's truth, and bad input (CPU, tiny models)."""
import csv
import json
import os
import re

import nibabel
import numpy as np
import pytest
import torch

from conftest import run_script

import dataset
import demo
import edit
import edit_scores
import truth
import predict
from utils import InputError


def toy_sampling(run, steps=20, edit_steps=None):
    """Sampling in `steps`, counterfactuals in `edit_steps` (the same by default)."""
    trained = predict.load_model(os.path.join(run, "checkpoint.pt"), True, torch.device("cpu"))
    settings = dict(SEED=0, SAMPLER="dpm++sde", SAMPLE_STEPS=steps, EDIT_STEPS=edit_steps or steps, DDIM_ETA=0.0,
                    STEP_SPACING=2.0, GUIDANCE=2.0, AUTOGUIDANCE=1.0, SAMPLE_BATCH=8)
    return predict.Sampling(trained.net, trained.schedule, trained.cfg, settings, torch.device("cpu"),
                            class_names=trained.class_names)


def ad_disks(run):
    data = dataset.load_data(dict(torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)["config"]))
    return data, edit.heldout_slices(data, target=1, count=12)  # the held-out 'AD' disks, to be made 'NC'


def test_decoding_under_the_source_returns_the_input(toy_run):
    """The null intervention (inverted and decoded under its own class, unguided) gives the slice back up to the
    discretisation error, and more exactly with more EDIT_STEPS (whatever the sampler's SAMPLE_STEPS)."""
    _, slices = ad_disks(toy_run)
    errors = []
    for steps in (5, 20):
        _, null = edit.counterfactual(toy_sampling(toy_run, 5, edit_steps=steps), slices.images, slices.labels, None,
                                      torch.ones(len(slices.images), dtype=torch.long), 0.6, 2.0)
        errors.append((null - slices.images).abs().mean().item())
    assert errors[1] < errors[0] and errors[1] < 0.03, errors


def test_a_counterfactual_takes_the_other_class_look_and_keeps_the_shape(toy_run):
    """White 'AD' disks asked to be 'NC' turn most of the way to its grey (-0.06), more so with more guidance; their
    size and place stay."""
    _, slices = ad_disks(toy_run)
    disk, brightness = slices.images > 0, []
    for guidance in (1.0, 3.0):
        cf, _ = edit.counterfactual(toy_sampling(toy_run), slices.images, slices.labels, None,
                                    torch.ones(len(slices.images), dtype=torch.long), 0.6, guidance)
        brightness.append(cf[disk].mean().item())
    assert brightness[1] < brightness[0] < 1.0 and brightness[1] < (1.0 - 0.06) / 2, brightness
    kept = cf > (cf[disk].mean() + cf[~disk].mean()) / 2  # the disk, as bright as the counterfactual draws it
    assert (kept & disk).sum() / (kept | disk).sum() > 0.85


def test_edit_writes_counterfactuals_and_their_figures(toy_run, tmp_path):
    r = run_script("edit.py", "--output-dir", toy_run, "--compile", "false", "--to-label", "NC", "--anomaly",
                   "--sample-steps", "5", "--edit-steps", "5")
    assert r.returncode == 0, r.stderr
    out = os.path.join(toy_run, "edit")
    figures = json.load(open(os.path.join(out, "counterfactual.json")))
    assert figures["slices"] == 12 and 0 <= figures["effectiveness"] <= 1 and figures["round_trip_change"] > 0
    assert (figures["depth"], figures["anomaly_depth"]) == (edit.DEPTH, edit.ANOMALY_DEPTH)  # each method's own
    assert os.path.getsize(os.path.join(out, "counterfactual.png")) > 0
    assert len([f for f in os.listdir(os.path.join(out, "edits")) if f.endswith("_to_NC.png")]) == 12
    assert len([f for f in os.listdir(os.path.join(out, "edits")) if f.endswith("_effect.png")]) == 12


def test_a_scan_in_gives_a_stack_out(toy_run, tmp_path):
    """--input a scan: its kept slices are edited and written back as a stack that opens in an MRI viewer."""
    volume = np.zeros((16, 16, 10), np.int16)
    yy, xx = np.mgrid[:16, :16]
    for z in range(2, 8):
        volume[:, :, z] = ((yy - 7.5) ** 2 + (xx - 7.5) ** 2 < 20) * (800 + 40 * xx)  # a disk with some contrast
    scan = str(tmp_path / "head.nii.gz")
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), scan)
    r = run_script("edit.py", "--output-dir", toy_run, "--compile", "false", "--to-label", "NC", "--input", scan,
                   "--sample-steps", "5", "--edit-steps", "5", "--anomaly")
    assert r.returncode == 0, r.stderr
    stack = nibabel.load(os.path.join(toy_run, "edit", "counterfactual.nii.gz"))
    assert stack.shape == (16, 16, 6)
    from PIL import Image  # the effect maps' stack holds the values of their PNGs
    effects = nibabel.load(os.path.join(toy_run, "edit", "effect_map.nii.gz")).get_fdata()
    pngs = [np.asarray(Image.open(os.path.join(toy_run, "edit", "edits", f"slice_{k:03d}_effect.png"))) for k in range(6)]
    assert effects.shape == (16, 16, 6) and np.array_equal(np.sort(effects.ravel()), np.sort(np.ravel(pngs)))


def test_the_figures_against_a_known_truth(toy_run, tmp_path):
    """With a truth beside the slices (as the labelled demo writes): each 'AD' disk's twin the grey 'NC' disk of the
    same size, its mask the disk's left half. The counterfactuals come closer to the twin inside the mask than the
    inputs are; unmasked, they also change the right half, far more than the null intervention does; the effect maps
    and the height's mean NC slice are scored; the twin's area change is nil; each figure for both truths."""
    data, slices = ad_disks(toy_run)
    disk = slices.images > 0
    slices.twins = slices.local_twins = torch.where(disk, torch.full_like(slices.images, -0.06), slices.images)
    slices.masks = slices.local_masks = disk & (torch.arange(16) < 8)
    figures = edit.edit_and_score(toy_sampling(toy_run, 5), slices, 1, 0.6, 2.0, None, data, str(tmp_path), "none")
    for which in ("", "local_"):
        assert figures[f"{which}cf_to_twin_in_mask"] < 0.6 * figures[f"{which}input_to_twin_in_mask"], figures
        assert figures[f"{which}cf_change_outside_mask"] > 3 * figures[f"{which}null_change_outside_mask"]
        assert 0.4 < figures[f"{which}mask_share_of_brain"] < 0.6
        assert {f"{which}counterfactual_map_auroc", f"{which}baseline_map_auprc"} <= set(figures)
    assert figures["twin_brain_area_change"] == 0 and "cf_brain_area_change" in figures


# ---------------------------------------------------------------- edit masks (DiffEdit)
def test_masked_decoding_keeps_the_slice_outside_the_mask(toy_run):
    """Outside the edit mask each step takes the inversion's own intermediate: the counterfactual is the input there
    (the encoding's start), and the edit shows inside."""
    _, slices = ad_disks(toy_run)
    x, ones = slices.images, torch.ones(len(slices.images), dtype=torch.long)
    edit_mask = torch.zeros_like(x)
    edit_mask[..., :, :8] = 1  # the left half
    cf, null = edit.counterfactual(toy_sampling(toy_run, 5), x, slices.labels, None, ones, 0.6, 2.0, edit_mask)
    assert torch.equal(cf[..., 8:], x[..., 8:])
    assert (cf - x)[..., :8].abs().mean() > 3 * (null - x).abs().mean()


def test_an_all_white_mask_is_the_unmasked_counterfactual(toy_run):
    _, slices = ad_disks(toy_run)
    x, ones = slices.images, torch.ones(len(slices.images), dtype=torch.long)
    sampling = toy_sampling(toy_run, 5)
    plain = edit.counterfactual(sampling, x, slices.labels, None, ones, 0.6, 2.0)[0]
    white = edit.counterfactual(sampling, x, slices.labels, None, ones, 0.6, 2.0, edit.feathered(x > -2))[0]
    assert torch.equal(white, plain)


def test_the_automatic_mask_finds_where_the_classes_differ(toy_run):
    """The toy's classes differ in the disk's brightness alone: the contrast of the model's predictions under them
    marks the disk and little else (on this 16 px toy, at half the diffusion, the disk's rim and the largest disks,
    whose contrast is near the image's mean, fall under the threshold); as an effect map it ranks the disk first."""
    _, slices = ad_disks(toy_run)
    disk = slices.images > 0
    contrast, mask = edit.auto_mask(toy_sampling(toy_run), slices.images, slices.labels, None,
                                    torch.ones(len(disk), dtype=torch.long))
    assert (mask & disk).sum() > 0.85 * mask.sum() and (mask & disk).sum() > 0.5 * disk.sum(), (mask.sum(), disk.sum())
    scores = edit_scores.map_scores("m", contrast, disk, torch.ones_like(disk))
    assert scores["m_map_auroc"] > 0.9, scores


def test_the_change_mask_edits_where_the_counterfactual_changes_most(toy_run):
    """--edit-mask change: the unmasked counterfactual's effect map, thresholded, marks the disk (whose brightness
    the class changes) and little else (on these disks, which change evenly and fill a large part of the image, the
    part that changes most: a third of it); decoded again within it, the marked disk turns grey, and outside the mask
    the slice is the input itself."""
    _, slices = ad_disks(toy_run)
    x, disk, ones = slices.images, slices.images > 0, torch.ones(len(slices.images), dtype=torch.long)
    cf, _, masks, contrast = edit.counterfactuals(toy_sampling(toy_run, 5), slices, slices.labels, None, ones, 0.6,
                                                  2.0, "change")
    found = masks == 1
    assert (found & disk).sum() > 0.75 * found.sum() and (found & disk).sum() > 0.2 * disk.sum(), (found.sum(),
                                                                                                  disk.sum())
    assert torch.equal(cf[masks == 0], x[masks == 0]) and cf[found & disk].mean() < (1.0 - 0.06) / 2
    assert edit_scores.map_scores("m", contrast, disk, torch.ones_like(disk))["m_map_auroc"] > 0.9


def test_edit_masks_from_files_and_empty_ones(toy_run, disks_data, tmp_path):
    """--edit-mask with a mask file (of another size: resized) that is all white edits as --edit-mask none does; an
    automatic mask with nothing to change (a blank slice) says so and writes the input unchanged; the picture shows
    the masks; the soundness figures come for a user's slices too."""
    from PIL import Image
    given = tmp_path / "given"
    given.mkdir()
    disk = np.asarray(Image.open(os.path.join(disks_data, "test", "AD", sorted(os.listdir(os.path.join(disks_data,
                                                                                                "test", "AD")))[0])))
    Image.fromarray(disk).save(given / "disk.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(given / "blank.png")
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(tmp_path / "white.png")
    made, widths = {}, {}
    for setting in ("none", str(tmp_path / "white.png"), "change", "auto"):
        out = tmp_path / setting.replace("/", "_")
        r = run_script("edit.py", "--checkpoint", os.path.join(toy_run, "checkpoint.pt"), "--output-dir", out,
                       "--compile", "false", "--to-label", "NC", "--input", given, "--sample-steps", "5",
                       "--edit-steps", "5", "--edit-mask", setting)
        assert r.returncode == 0, r.stderr
        made[setting] = {n: np.asarray(Image.open(out / "edit" / "edits" / f"{n}_to_NC.png")) for n in ("disk", "blank")}
        widths[setting] = Image.open(out / "edit" / "counterfactual.png").width
        figures = json.load(open(out / "edit" / "counterfactual.json"))
        assert {"null_change", f"null_{edit.NULL_CYCLES}_cycles_change_first_{edit.CYCLED_SLICES}",
                "round_trip_change"} <= set(figures)
    assert all(np.array_equal(made["none"][n], made[str(tmp_path / "white.png")][n]) for n in ("disk", "blank"))
    assert "1 of 2 edit masks are empty" in r.stdout and not made["auto"]["blank"].any()
    assert not made["change"]["blank"].any()
    assert widths["change"] == widths["auto"] > widths["none"]  # the picture shows the edit mask in a column


# ---------------------------------------------------------------- the scores, on known answers
def test_pixel_auc_of_perfect_random_and_inverted_maps():
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(4, 1, 16, 16, generator=gen) < 0.2
    region = torch.ones_like(masks)
    perfect = edit_scores.map_scores("m", masks.float(), masks, region)
    assert perfect == {"m_map_auroc": 1.0, "m_map_auprc": 1.0}
    noise = edit_scores.map_scores("m", torch.rand(masks.shape, generator=gen), masks, region)
    assert abs(noise["m_map_auroc"] - 0.5) < 0.06 and abs(noise["m_map_auprc"] - masks.float().mean()) < 0.06
    assert edit_scores.map_scores("m", 1 - masks.float(), masks, region)["m_map_auroc"] == 0.0


def test_truth_scores_of_known_edits():
    """A counterfactual that is the twin inside the mask and the input outside it: 0 from the twin, no change
    outside; the input's distance to the twin beside it."""
    x, twin = torch.full((2, 1, 8, 8), 0.5), torch.full((2, 1, 8, 8), 0.5)
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    mask[:, :, 2:4, 2:4] = True
    twin[mask] = -0.5  # the atrophy made these brighter by 1
    cf = torch.where(mask, twin, x)
    scores = edit_scores.truth_scores(x, cf, x + 0.1, twin, mask, torch.ones_like(mask))
    assert scores["cf_to_twin_in_mask"] == 0 and scores["input_to_twin_in_mask"] == pytest.approx(1.0)
    assert scores["cf_change_outside_mask"] == 0 and scores["null_change_outside_mask"] == pytest.approx(0.1)
    assert scores["mask_share_of_brain"] == pytest.approx(8 / 128)


# ---------------------------------------------------------------- the labelled demo's truth
@pytest.fixture(scope="module")
def labelled_truth(tmp_path_factory):
    """A small labelled demo at 64 px: its held-out 'AD' slices and their truth (truth.read_truth)."""
    folder = tmp_path_factory.mktemp("labelled")
    demo.build_labelled_demo(str(folder), subjects=(1, 2), slices=6, size=64)
    data = dataset.load_data(dict(dataset.utils.constants(), DATA_DIR=str(folder / "AD_NC"), IMAGE_SIZE=64,
                                  CONDITION="class"))
    return folder, data, truth.read_truth(data)


def test_the_labelled_demo_holds_the_truth_of_its_heldout_ad_slices(labelled_truth):
    """Each held-out 'AD' slice has a local-atrophy twin: the same slice wherever the atrophy did not reach, with
    smaller ventricles and narrower sulci (less dark tissue) where it did; 'NC' and training slices have none."""
    folder, data, (index, _, _, twins, masks) = labelled_truth
    assert len(index) == 12 and (data.val_labels[index] == 0).all()  # the two held-out AD subjects
    ad = data.val[index].int()
    assert (ad - twins.int())[~masks].abs().max() <= demo.TRUTH_LEVEL and masks.any()
    brain = ad > 20
    dark = lambda images: ((images < 90) & brain).sum()  # noqa: E731  CSF-like pixels in the brain
    assert dark(ad) > 1.3 * dark(twins.int())
    listings = [sorted(os.listdir(folder / "truth" / kind)) for kind in demo.TRUTH_KINDS]
    assert all(names == listings[0] for names in listings)


def test_the_whole_disease_twin_undoes_the_shrink_too(labelled_truth):
    """The whole-disease twin is the slice without the disease's atrophy and without its share of the brain's shrink
    (the age's kept): its brain is larger than the input's by about that shrink, ((1 - BRAIN_SHRINK * age) / (1 -
    BRAIN_SHRINK * (age + disease)))^2 by area for the severities drawn, more than the local twin's; its mask holds
    the atrophy's and the outline the shrink moved."""
    folder, data, (index, whole, whole_masks, local, local_masks) = labelled_truth
    ad = data.val[index].int()
    area = lambda images: (images.int() > 20).sum().item()  # noqa: E731
    growth, local_growth = area(whole) / area(ad) - 1, area(local) / area(ad) - 1
    with open(folder / "truth" / "subjects.csv") as f:
        drawn = [r for r in csv.DictReader(f) if r["split"] == "test" and r["class"] == "AD"]
    shrink = lambda severity: 1 - demo.BRAIN_SHRINK * severity  # noqa: E731
    expected = sum((shrink(demo.age_severity(float(r["age"]))) / shrink(demo.age_severity(float(r["age"])) + float(
        r["disease_severity"]))) ** 2 - 1 for r in drawn) / len(drawn)
    assert abs(growth - local_growth - expected) < 0.02 + 0.2 * expected, (growth, local_growth, expected)
    assert (ad - whole.int())[~whole_masks].abs().max() <= demo.TRUTH_LEVEL
    assert (whole_masks >= local_masks).all() and whole_masks.sum() > 1.1 * local_masks.sum()


def test_an_old_labelled_demo_is_rebuilt_once(tmp_path):
    (tmp_path / "DONE").write_text("MNI ICBM152 labelled demo (simulated atrophy): ...\n")  # before the truth
    assert not demo.is_built(str(tmp_path), labelled=True) and demo.is_built(str(tmp_path), labelled=False)
    (tmp_path / "DONE").write_text(demo.LABELLED_VERSION + "\n")
    assert demo.is_built(str(tmp_path), labelled=True)


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing half-written
def test_bad_edits_get_one_line(toy_run):
    """A class the model lacks, through the script: one line, exit 2. The flags refused before the checkpoint is
    opened, through edit.py's checks in-process (a script start saved each)."""
    r = run_script("edit.py", "--output-dir", toy_run, "--compile", "false", "--to-label", "MCI")
    expected = "--to-label MCI is not one of this model's classes: AD, NC"
    assert r.returncode == 2 and expected in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for flags, expected in [
            (("--to-label", "NC", "--depth", "0"), "--depth must be in (0, 1]"),
            (("--to-label", "NC", "--depth", "1.5"), "--depth must be in (0, 1]"),
            (("--to-label", "NC", "--edit-mask", "no/such/masks"), "--edit-mask no/such/masks: no such mask file"),
            (("--anomaly", "--edit-mask", "auto"), "use it with --to-label"),
            (("--to-label", "NC", "--label", "AD"), "--label and --slice-position describe --input slices"),
            (("--to-label", "NC", "--age", "70"), "use progress.py --age YEARS --years N")]:
        with pytest.raises(InputError, match=re.escape(expected)):
            edit.parse_settings(["--output-dir", toy_run, *flags])


def test_edits_need_a_class_model_and_readable_input(tiny_run, toy_run, tmp_path):
    for flags in (("--to-label", "NC"), ("--to-label", "NC", "--edit-mask", "auto")):
        r = run_script("edit.py", "--output-dir", tiny_run, "--compile", "false", *flags)
        assert r.returncode == 2 and "not trained with class conditioning" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and flags[-1] in r.stderr, r.stderr
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not a scan")
    empty = tmp_path / "empty"
    empty.mkdir()
    for given in (broken, empty):
        r = run_script("edit.py", "--output-dir", str(tmp_path / "out"), "--checkpoint",
                       os.path.join(toy_run, "checkpoint.pt"), "--compile", "false", "--to-label", "NC",
                       "--input", str(given))
        assert r.returncode == 2 and str(given) in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not os.path.exists(tmp_path / "out" / "edit" / "counterfactual.png")


def test_names_give_heights_only_where_they_span_a_stack():
    """--input files: OASIS-style NAME_slice_K or ADNI-style SUBJECT_K names give heights (the rank of K in the
    subject's stack) where each subject has NAMED_STACK slices or more; a few slices of a subject, or names without
    numbers, give none (three slices would otherwise read as bottom, middle and top)."""
    n = edit.NAMED_STACK
    oasis = [f"in/case_001_slice_{k}.png" for k in range(10, 10 + 2 * n, 2)]
    assert torch.allclose(edit.named_heights(oasis[::-1]), torch.linspace(1, 0, n))
    adni = [f"in/AD/{s}_{k}.png" for s in (7, 8) for k in range(40, 40 + n)]
    assert torch.allclose(edit.named_heights(adni), torch.linspace(0, 1, n).repeat(2))
    assert edit.named_heights(oasis[:n - 1]) is None and edit.named_heights(adni[:2 * n - 1]) is None
    assert edit.named_heights(["in/a.png", "in/b.png"]) is None


def test_input_slices_take_the_class_and_heights_given(capsys):
    """--label names the --input slices' own class and --slice-position their heights (A:B spread over them in
    order); without them a conditional model is told what it edits with, in a notice."""
    from types import SimpleNamespace as Given
    sampling = Given(cfg={"CONDITION": "class+slice"}, labels=[1], positions=(0.2, 0.6))
    slices = edit.Slices(torch.zeros(5, 1, 8, 8), [str(i) for i in range(5)])
    edit.given_conditions(slices, sampling, Given(label="NC", slice_position="0.2:0.6"))
    assert slices.labels.tolist() == [1] * 5 and torch.allclose(slices.positions, torch.linspace(0.2, 0.6, 5))
    assert capsys.readouterr().out == ""
    bare = edit.given_conditions(edit.Slices(torch.zeros(2, 1, 8, 8), ["a", "b"]), sampling,
                                 Given(label=None, slice_position=None))
    assert bare.labels is None and bare.positions is None
    said = capsys.readouterr().out
    assert "heights of the --input slices are not known" in said and "class of the --input slices" in said


def test_healthy_names_the_control_class_whatever_it_is_called():
    assert edit.target_class("healthy", ["AD", "CN", "MCI"]) == 1
    assert edit.target_class("healthy", ["tumour", "normal"]) == 1
    assert edit.target_class("healthy", ["cat", "dog"]) is None  # edit.py says so and edits nothing
    assert edit.target_class("0", ["AD", "NC"]) == 0


def test_row_labels_keep_the_slice_number():
    import pictures
    assert pictures.row_label("data/x/case_105_slice_17.nii.png") == "case_105_slice_17"
    assert pictures.row_label("scans/sub-01_ses-01_T1w.nii.gz:12") == "...1_ses-01_T1w:12"


def test_a_second_edit_replaces_the_first_runs_set(toy_run, tmp_path, disks_data):
    """Counterfactuals of held-out slices (figures against labels and truth), then of one slice of the user's
    (soundness only): the JSON and the pictures describe the second run alone."""
    out = tmp_path / "out"
    common = ["--output-dir", str(out), "--checkpoint", os.path.join(toy_run, "checkpoint.pt"), "--compile", "false",
              "--sample-steps", "3", "--edit-steps", "3", "--to-label", "NC"]
    assert run_script("edit.py", *common).returncode == 0
    assert (out / "edit" / "counterfactual.json").exists() and len(os.listdir(out / "edit" / "edits")) == 36
    mine = tmp_path / "mine"
    mine.mkdir()
    first = sorted(os.listdir(os.path.join(disks_data, "test", "AD")))[0]
    os.link(os.path.join(disks_data, "test", "AD", first), mine / first)
    assert run_script("edit.py", *common, "--input", str(mine)).returncode == 0
    figures = json.load(open(out / "edit" / "counterfactual.json"))
    assert figures["slices"] == 1 and "effectiveness" not in figures
    assert sorted(os.listdir(out / "edit" / "edits")) == [f"{first[:-4]}_to_NC{end}.png" for end in ("", "_map", "_mask")]
