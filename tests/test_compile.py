"""torch.compile (inductor, on this machine's device; on the CPU too) trains, samples under classifier-free guidance
and autoguidance, inverts and inpaints like the eager network, with one graph for training and one for inference."""
import copy

import pytest
import torch
from torch._dynamo.utils import counters

import dataset
import objective
import train
import utils
from conftest import TINY
from modules import Denoiser, build_model

TRAIN_STEPS = 4  # training steps of each twin
CLOSE = 1e-4  # largest relative difference, compiled against eager, in fp32


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def graphs():
    """Graphs torch.compile has made, and graph breaks, since the counters were cleared."""
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


@pytest.fixture(scope="module")
def twins(disks_data, tmp_path_factory):
    """The tiny class+slice model trained TRAIN_STEPS steps twice from the same start on the same batches, eagerly and
    with --compile true: cfg, data, the two models, their losses, and the graphs made by training."""
    cfg, _ = utils.parse_settings(utils.build_parser("test"), [
        *TINY, "--condition", "class+slice", "--image-size", "16", "--attn-resolutions", "8", "--compile", "true",
        "--bf16", "false", "--data-dir", disks_data, "--output-dir", str(tmp_path_factory.mktemp("compile"))])
    device = utils.get_device()
    torch.backends.cudnn.allow_tf32 = False  # fp32 convolutions on CUDA, so that the two agree to rounding
    assert utils.wants_compile(cfg, device)
    data = dataset.load_data(cfg)
    images, labels, positions = (v.to(device) for v in (data.train, data.train_labels, data.train_positions))
    schedule = utils.NoiseSchedule(cfg["TIMESTEPS"], cfg["BETA_SCHEDULE"], cfg["PREDICTION"])
    torch.manual_seed(0)
    eager = build_model(cfg, len(data.classes)).to(device, memory_format=utils.memory_format(False, device))
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()
    losses = {}
    for name, model, net in (("eager", eager, eager), ("compiled", compiled, torch.compile(compiled))):
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["LR"], fused=True)
        gen, order = torch.Generator(device=device).manual_seed(0), torch.Generator().manual_seed(0)
        losses[name] = []
        for step in range(TRAIN_STEPS):
            idx = torch.randperm(len(images), generator=order)[:cfg["BATCH_SIZE"]].to(device)
            x0, t, noise, cond = objective.make_batch(images, idx, gen, cfg, 0, 1, device, labels, positions)
            loss, _ = train.train_step(net, model, optimizer, schedule, x0, t, noise, cond, cfg, False)
            losses[name].append(loss.item())
    return cfg, data, eager, compiled, losses, graphs()


@pytest.fixture(scope="module")
def networks(twins):
    """Model and guide (an early snapshot's stand-in) for sampling, eager and compiled (the same weights), made
    non-trivial (the zero-initialised layers too); the conditions of 3 slices; the schedule. torch.compile starts
    afresh, as in predict.py's process."""
    cfg, data, eager, _, _, _ = twins
    device = next(eager.parameters()).device
    gen = torch.Generator(device=device).manual_seed(1)
    model, guide = (copy.deepcopy(eager).eval().requires_grad_(False) for _ in range(2))
    for net, spread in ((model, 0.05), (guide, 0.1)):
        for p in net.parameters():
            p.add_(spread * torch.randn(p.shape, generator=gen, device=device))
    conditions = torch.tensor([0, 1, 0], device=device), torch.tensor([0.2, 0.5, 0.9], device=device)
    schedule = utils.NoiseSchedule(cfg["TIMESTEPS"], cfg["BETA_SCHEDULE"], cfg["PREDICTION"])
    torch._dynamo.reset()
    counters.clear()
    return {"eager": (model, guide), "compiled": (torch.compile(model), torch.compile(guide))}, conditions, schedule


def test_compiled_training_matches_eager_with_one_graph(twins):
    _, _, eager, compiled, losses, (made, breaks) = twins
    assert made == 1 and breaks == 0  # compiled once, not once per step; the whole U-Net in one graph
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=CLOSE)
    weights = [torch.cat([p.flatten() for p in m.parameters()]) for m in (compiled, eager)]
    assert relative(*weights) < CLOSE


def inference(networks, conditions, schedule, kind, n):
    """Under one kind of network (eager or compiled): a guided, autoguided dpm++sde sample of the first n
    conditions; a DDIM inversion of it (the class guided alone, as edit.py's Sampling.plain()); a RePaint fill of its
    right half, the class not given."""
    model, guide = networks[kind]
    labels, positions = (c[:n] for c in conditions)
    device = labels.device
    gen = torch.Generator(device=device).manual_seed(2)
    sample = schedule.sample(Denoiser(model, labels, positions, 2.0, guide, 1.25), (n, 1, 16, 16), "dpm++sde", 5,
                             generator=gen, device=device)
    inverted = schedule.invert(Denoiser(model, labels, positions, 2.0, guided="class"), sample, 60, 5)
    fill = torch.zeros_like(sample, dtype=torch.bool)
    fill[..., 8:] = True
    filled = schedule.inpaint(Denoiser(model, None, positions, 1.0, guide, 1.25), sample, fill, "ddim", 5,
                              resample=2, generator=gen)
    return sample, inverted, filled


def test_compiled_sampling_inversion_and_repaint_match_eager_with_one_graph(twins, networks):
    for n in (3, 2):  # a full batch, then a last, partial one
        eager = inference(*networks, "eager", n)
        compiled = inference(*networks, "compiled", n)
        for a, b in zip(compiled, eager):
            assert relative(a, b) < CLOSE
    assert graphs() == (1, 0)  # model and guide, every batch size, guided or not: one graph
