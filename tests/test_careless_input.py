"""Careless input and repeated runs (issue 35): every error before the work, in one line; outputs that never collide
or go stale; masks laid on slices the way the slices are laid into the frame."""
import os
import re
import types

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_script, write_blobs

import dataset
import edit
import inpainting
import truth
from utils import InputError


def one_error_line(r, expected):
    assert r.returncode == 2 and expected in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------- flags refused before any work
def test_editing_flags_on_predict_name_the_edit_command(tmp_path):
    r = run_script("predict.py", "--output-dir", str(tmp_path), "--to-label", "NC", "--anomaly")
    one_error_line(r, "--to-label is edit.py's now: python edit.py --output-dir")
    assert not os.path.exists(tmp_path / "predict")


def test_edit_refuses_flags_that_would_be_ignored(tmp_path):
    """Each conflict refused by edit.py's checks, which run before the output folder, the checkpoint or the data; one
    of them through the script, for its one line and exit code (the rest in-process: a second each saved)."""
    r = run_script("edit.py", "--output-dir", str(tmp_path), "--to-label", "NC", "--mask", "box:0,0,1,1", "--input", "x")
    one_error_line(r, "run them one at a time")
    assert not os.listdir(tmp_path)
    for flags, expected in ((["--inpaint-eval", "--mask", "box:0,0,1,1"], "run it without"),
                            (["--inpaint-eval", "--input", "x"], "run it without"),
                            (["--mask", "box:0,0,1,1"], "--mask needs the slices to fill"),
                            ([], "say what to do"),
                            (["--to-label", "NC", "--depth", "0"], "--depth must be in (0, 1]"),
                            (["--mask", "box:0,0,1,1", "--input", "x", "--resample", "0"], "--resample and --jump")):
        with pytest.raises(InputError, match=re.escape(expected)):
            edit.parse_settings(["--output-dir", str(tmp_path), *flags])
    assert not os.listdir(tmp_path)


def test_predict_checks_strength_and_the_output_folder_before_sampling(tiny_run, tmp_path):
    one_error_line(run_script("predict.py", "--output-dir", tiny_run, "--strength", "2"), "--strength must be in (0, 1]")
    blocked = tmp_path / "out"
    blocked.mkdir()
    (blocked / "predict").write_text("a file where the output folder should be")
    r = run_script("predict.py", "--output-dir", str(blocked), "--checkpoint", os.path.join(tiny_run, "checkpoint.pt"),
                   "--compile", "false", "--no-metrics")
    one_error_line(r, "cannot write to")
    assert "samples in" not in r.stdout  # nothing was sampled


def test_predict_leaves_no_sample_of_a_longer_earlier_run(tiny_run, tmp_path):
    common = ["--output-dir", str(tmp_path), "--checkpoint", os.path.join(tiny_run, "checkpoint.pt"), "--compile",
              "false", "--no-metrics", "--sample-steps", "3", "--input", write_blobs(str(tmp_path / "in"), 2)]
    for n in (4, 2):
        assert run_script("predict.py", *common, "--num-samples", n).returncode == 0
    assert sorted(f for f in os.listdir(tmp_path / "predict") if f.startswith("sample_")) == ["sample_000.png",
                                                                                                "sample_001.png"]


# ---------------------------------------------------------------- names and masks
def test_slices_named_alike_in_different_folders_get_their_own_names(tmp_path):
    assert edit.unique_names(["in/AD/s_1.jpeg", "in/NC/s_1.jpeg"], "in") == ["AD_s_1", "NC_s_1"]
    assert edit.unique_names(["in/AD/s_1.jpeg", "in/NC/s_2.jpeg"], "in") == ["s_1", "s_2"]  # stems that differ stay


def test_a_mask_on_a_non_square_slice_lands_where_the_slice_does(tmp_path):
    """A 40 x 20 slice and its mask, both white on their right half: the slice is padded to a square (rows 10-29 of
    40) and resized to 20, and the mask must be laid the same way, not stretched over the whole height."""
    half = np.zeros((20, 40), np.uint8)
    half[:, 20:] = 255
    Image.fromarray(half).save(tmp_path / "slice.png")
    slice_pixels, _ = dataset.decode_image(str(tmp_path / "slice.png"), 20)
    mask = inpainting.read_mask(str(tmp_path / "slice.png"), 20, set())[0].numpy()
    assert mask[5:15, 10:].all() and not mask[:5].any() and not mask[15:].any() and not mask[:, :10].any()
    assert (mask == (slice_pixels >= 128)).all()


def test_blank_held_out_slices_get_no_box_and_are_not_picked_to_fill(monkeypatch):
    images = torch.full((4, 1, 16, 16), -1.0)
    images[1:3, :, 4:12, 4:12] = 0.5
    boxes = inpainting.random_boxes(images, seed=0)  # a blank slice used to end in "random_ expects 'from' < 'to'"
    assert not boxes[0].any() and not boxes[3].any() and boxes[1].any() and boxes[2].any()
    monkeypatch.setattr(truth, "read_truth", lambda data: None)
    data = types.SimpleNamespace(val=((images + 1) * 127.5).round().to(torch.uint8), val_labels=None,
                                 val_positions=None, val_names=[f"s_{i}.png" for i in range(4)])
    assert edit.heldout_slices(data, None, 32, with_brain=True).names == ["s_1", "s_2"]
