"""A fixed, untrained-but-perturbed class+slice model and the outputs the scripts make from it on a fixed seed: what
tests/test_golden.py compares with tests/golden/outputs.npz, written by the code before the predict/edit split."""
import os

import numpy as np
import torch
from PIL import Image

import checkpoints
import utils
from conftest import TINY, write_disks
from modules import build_model

FLAGS = [*TINY, "--image-size", "16", "--attn-resolutions", "8", "--condition", "class+slice"]


def golden_checkpoint(path):
    """A checkpoint of a seeded U-Net whose weights are all perturbed (so no zero-initialised layer hides the input),
    with an early snapshot for autoguidance."""
    cfg, _ = utils.parse_settings(utils.build_parser(""), FLAGS)
    torch.manual_seed(0)
    nets = [build_model(cfg, 2) for _ in range(2)]
    for net in nets:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
    weights = nets[0].state_dict()
    checkpoints.save_checkpoint({"model": weights, "ema": weights, "config": cfg, "step": 8, "classes": ["AD", "NC"],
                                 "guide": {"step": 2, "weights": nets[1].state_dict()}, "history": []}, path)
    return path


def read_pngs(folder):
    """{relative path: pixels} of every PNG under folder."""
    found = {}
    for root, _, files in os.walk(folder):
        for f in sorted(files):
            if f.endswith(".png") and f not in ("conditions.png", "counterfactual.png", "inpaint.png"):  # text labels
                found[os.path.relpath(os.path.join(root, f), folder)] = np.asarray(Image.open(os.path.join(root, f)))
    return found


def inputs(tmp):
    """The data (an ADNI-layout set of disks) and a folder of 4 of its 'AD' slices to edit."""
    data = write_disks(os.path.join(tmp, "AD_NC"))
    given = os.path.join(tmp, "given")
    os.makedirs(given)
    for name in sorted(os.listdir(os.path.join(data, "test", "AD")))[:4]:
        os.link(os.path.join(data, "test", "AD", name), os.path.join(given, name))
    return data, given
