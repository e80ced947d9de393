"""The GPU's fast paths, where there is a GPU (docs/gpu_check.sh runs these): bf16 autocast, channels_last, fused AdamW,
the training images on the GPU, bf16 sampling compiled, and CUDA graphs (bench.py --cuda-graphs). They skip on a CPU."""
import copy

import pytest
import torch

import bench
import objective
import train
import utils
from modules import Denoiser, build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CFG = dict(utils.constants(), IMAGE_SIZE=16, BASE_CHANNELS=8, CHANNEL_MULT=(1, 2), NUM_RES_BLOCKS=1,
           ATTN_RESOLUTIONS=(8,), NUM_HEADS=2, TIMESTEPS=100, BATCH_SIZE=8, BF16="auto")


def relative(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def trained_bits():
    """A tiny U-Net (weights made non-trivial) in the GPU's layout, its schedule, and a batch of the training split
    held on the GPU."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(CFG).to(device, memory_format=utils.memory_format(True, device))
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    images = utils.to_device_if_fits(torch.randint(0, 256, (32, 1, 16, 16), dtype=torch.uint8), device)
    gen = torch.Generator(device=device).manual_seed(0)
    batch = objective.make_batch(images, torch.arange(8, device=device), gen, CFG, 0, 1, device)
    return model, utils.NoiseSchedule(CFG["TIMESTEPS"]), images, batch


def test_bf16_is_on_and_the_batch_lives_on_the_gpu_in_channels_last():
    _, _, images, (x0, t, noise, _) = trained_bits()
    assert utils.wants_bf16(CFG, x0.device) and images.is_cuda
    assert x0.is_cuda and x0.is_contiguous(memory_format=torch.channels_last)
    assert noise.is_contiguous(memory_format=torch.channels_last)


def test_bf16_loss_is_near_fp32_and_fused_adamw_steps():
    model, schedule, _, (x0, t, noise, cond) = trained_bits()
    fp32 = objective.batch_loss(model, schedule, x0, t, noise, cond, CFG, False).mean()
    bf16 = objective.batch_loss(model, schedule, x0, t, noise, cond, CFG, True).mean()
    assert relative(bf16, fp32) < 2e-2
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    loss, bad = train.train_step(model, model, optimizer, schedule, x0, t, noise, cond, CFG, True)
    assert torch.isfinite(loss) and not bad
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_fused_adamw_skips_a_non_finite_step_without_a_sync():
    model, schedule, _, (x0, t, noise, cond) = trained_bits()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    _, bad = train.train_step(model, model, optimizer, schedule, x0, t, noise * torch.nan, cond, CFG, True)
    assert bad and all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def sample(net, guide, n):
    """A dpm++sde sample of n images under autoguidance, in bf16, from a fixed seed."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    return utils.NoiseSchedule(CFG["TIMESTEPS"]).sample(Denoiser(net, guide=guide, autoguidance=1.25, bf16=True),
                                                        (n, 1, 16, 16), "dpm++sde", 5, generator=gen, device="cuda")


@pytest.mark.parametrize("kind", ["compiled", "cuda graphs"])
def test_compiled_bf16_sampling_is_near_eager(kind):
    """torch.compile, plainly or replaying CUDA graphs (model and guide each a graph; a full batch, then a last,
    partial one), samples in bf16 what the eager network does, to bf16's rounding."""
    model = trained_bits()[0].eval().requires_grad_(False)
    guide = copy.deepcopy(model)
    for p in guide.parameters():
        p.add_(0.05 * torch.randn_like(p))
    wrap = torch.compile if kind == "compiled" else bench.replayed
    with torch.inference_mode():
        for n in (4, 3):
            assert relative(sample(wrap(model), wrap(guide), n), sample(model, guide, n)) < 5e-2
