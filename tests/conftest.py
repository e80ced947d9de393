"""Shared fixtures: a tiny image folder and a tiny trained checkpoint, made once per test session."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "2")

# a model small enough to train in seconds on 2 CPU cores
TINY = ["--image-size", "32", "--base-channels", "8", "--channel-mult", "1,2", "--num-res-blocks", "1",
        "--attn-resolutions", "16", "--num-heads", "2", "--batch-size", "8", "--timesteps", "100",
        "--sample-steps", "5", "--edit-steps", "5", "--log-every", "2", "--warmup-steps", "2", "--compile", "false",
        "--lr", "1e-3", "--train-minutes", "0"]
CACHE = os.environ.get("TEST_RUNS_CACHE")  # mutation testing (docs/testing.md): the fixtures' data and models kept here


def run_script(script, *args, timeout=300, **kwargs):
    """Run one of the project's scripts; returns the CompletedProcess (text output)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=kwargs.pop("cwd", ROOT), **kwargs)


def write_blobs(folder, n, size=32, seed=0):
    """n grayscale images of bright ellipses on black, all different."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx = rng.uniform(size * 0.35, size * 0.65, 2)
        ry, rx = rng.uniform(size * 0.2, size * 0.4, 2)
        img = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1) * rng.uniform(120, 255)
        Image.fromarray(img.astype(np.uint8), "L").save(os.path.join(folder, f"img_{i:03d}.png"))
    return folder


def made_once(tmp_path_factory, name, make):
    """make(folder) into a new folder; or, where TEST_RUNS_CACHE names a folder, into CACHE/name once, kept across
    sessions (mutation testing runs the suite once a mutant, and these data and models come from unmutated files)."""
    if not CACHE:
        folder = str(tmp_path_factory.mktemp(name))
        make(folder)
        return folder
    folder = os.path.join(CACHE, name)
    if not os.path.exists(folder + ".done"):
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        make(folder)
        open(folder + ".done", "w").close()
    return folder


def trained(*flags):
    """make() for made_once: train.py with these flags into the folder."""
    def make(out):
        r = run_script("train.py", "--output-dir", out, *flags)
        assert r.returncode == 0, r.stderr
    return make


def tree_listing():
    """What lies in the repository's top folder, data/ and outputs/ (caches aside)."""
    return {os.path.join(d, f) for d in (".", "data", "outputs") if os.path.isdir(os.path.join(ROOT, d))
            for f in os.listdir(os.path.join(ROOT, d)) if f not in ("__pycache__", ".pytest_cache")}


@pytest.fixture(scope="session", autouse=True)
def working_tree_untouched():
    """Every test writes under its own temporary folder: the checkout looks the same after the suite."""
    before = tree_listing()
    yield
    assert tree_listing() == before, f"the tests wrote into the checkout: {sorted(tree_listing() ^ before)}"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return made_once(tmp_path_factory, "blobs", lambda folder: write_blobs(folder, 40))


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory):
    """OUTPUT_DIR of a tiny model trained for 2 epochs on tiny_data."""
    return made_once(tmp_path_factory, "run", trained("--data-dir", tiny_data, "--epochs", "2", *TINY))


def write_disks(folder, subjects=(6, 2), slices=6, size=16, seed=0):
    """An ADNI-layout set (train/test, AD/NC, SUBJECT_K names) of two visibly different classes: a centred disk on
    black, white for 'AD' and grey for 'NC', its radius growing with the slice number K of its subject."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    subject = 0
    for split, n in zip(("train", "test"), subjects):
        for cls in ("AD", "NC"):
            os.makedirs(os.path.join(folder, split, cls), exist_ok=True)
            for _ in range(n):
                subject += 1
                for rank, k in enumerate(np.sort(rng.choice(np.arange(40, 90), slices, replace=False))):
                    disk = yy ** 2 + xx ** 2 < (3 + 4 * rank / (slices - 1)) ** 2
                    img = (disk * (255 if cls == "AD" else 120)).astype(np.uint8)
                    Image.fromarray(img, "L").save(os.path.join(folder, split, cls, f"{subject}_{k}.png"))
    return folder


@pytest.fixture(scope="session")
def disks_data(tmp_path_factory):
    return os.path.join(made_once(tmp_path_factory, "disks", lambda f: write_disks(os.path.join(f, "AD_NC"))), "AD_NC")


@pytest.fixture(scope="session")
def conditional_run(disks_data, tmp_path_factory):
    """OUTPUT_DIR of a tiny class+slice-conditional model trained for 2 epochs on disks_data."""
    return made_once(tmp_path_factory, "conditional", trained("--data-dir", disks_data, "--epochs", "2", "--condition",
                                                              "class+slice", *TINY, "--image-size", "16",
                                                              "--attn-resolutions", "8"))


@pytest.fixture(scope="session")
def toy_run(disks_data, tmp_path_factory):
    """A tiny class-conditional model that has learned the disks' classes: white 'AD', grey 'NC' (225 steps)."""
    flags = ("--data-dir", disks_data, "--epochs", "25", "--condition", "class", *TINY, "--image-size", "16",
             "--attn-resolutions", "8", "--lr", "3e-3", "--timesteps", "50", "--sample-every", "1000")
    return made_once(tmp_path_factory, "toy", trained(*flags))
