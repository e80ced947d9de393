"""Behaviour kept through refactors: samples, counterfactuals, effect maps and fills of a fixed model on a fixed seed,
pixel for pixel the outputs the code made before predict.py and edit.py were split (tests/golden/outputs.npz)."""
import os

import numpy as np
import pytest

import golden_run
from conftest import ROOT, run_script

GOLDEN = os.path.join(ROOT, "tests", "golden", "outputs.npz")
COMMON = ["--sample-steps", "5", "--edit-steps", "5", "--num-samples", "6", "--sample-batch", "4"]


@pytest.fixture(scope="module")
def golden_inputs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("golden"))
    data, given = golden_run.inputs(tmp)
    return tmp, data, given, golden_run.golden_checkpoint(os.path.join(tmp, "ck.pt"))


@pytest.mark.parametrize("name,script,args", [
    ("predict", "predict.py", ["--no-metrics", "--slice-sweep", "3"]),
    ("counterfactual", "edit.py", ["--to-label", "NC", "--input", "GIVEN", "--anomaly", "--edit-guidance", "2",
                                   "--edit-mask", "none"]),  # the defaults before issue 36's measurements
    ("inpaint", "edit.py", ["--input", "GIVEN", "--mask", "box:0.2,0.2,0.6,0.6", "--resample", "2", "--jump", "2"])])
def test_outputs_are_pixel_identical_to_the_golden_run(golden_inputs, name, script, args):
    tmp, data, given, checkpoint = golden_inputs
    out = os.path.join(tmp, name)
    r = run_script(script, "--checkpoint", checkpoint, "--data-dir", data, "--output-dir", out, *COMMON,
                   *[given if a == "GIVEN" else a for a in args])
    assert r.returncode == 0, r.stderr
    made = {f"{name}/{k.split(os.sep, 1)[1]}": v for k, v in golden_run.read_pngs(out).items()}
    golden = np.load(GOLDEN)
    expected = sorted(k for k in golden.files if k.startswith(name + "/"))
    assert sorted(made) == expected
    for key in expected:
        np.testing.assert_array_equal(made[key], golden[key], err_msg=key)
