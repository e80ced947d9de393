"""The U-Net: shapes, gradients, time conditioning, determinism, and that it can learn."""
import pytest
import torch

from modules import UNet
from utils import InputError, NoiseSchedule, check_config, constants

TINY = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, num_heads=2)


@pytest.mark.parametrize("size", [32, 64, 128, 256])
def test_output_shape_equals_input_shape(size):
    levels = size.bit_length() - 4  # down to 16 px, with attention there
    model = UNet(size, base_channels=8, channel_mult=(1,) * levels, num_res_blocks=1, attn_resolutions=(16,))
    x = torch.randn(2, 1, size, size)
    assert model(x, torch.tensor([0, 999])).shape == x.shape


def test_gradient_reaches_every_parameter():
    model = UNet(32, attn_resolutions=(16,), num_classes=2, **TINY)
    for p in model.parameters():  # zero-initialised layers would block gradients to what lies before them
        torch.nn.init.normal_(p, std=0.1)
    out = model(torch.randn(2, 1, 32, 32), torch.tensor([3, 500]), torch.tensor([0, 2]))
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def test_time_changes_output_and_seed_fixes_it():
    torch.manual_seed(0)
    a = UNet(32, attn_resolutions=(16,), **TINY)
    torch.manual_seed(0)
    b = UNet(32, attn_resolutions=(16,), **TINY)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        torch.nn.init.normal_(p, std=0.1)
        q.data.copy_(p.data)
    x = torch.randn(1, 1, 32, 32)
    assert torch.equal(a(x, torch.tensor([10])), b(x, torch.tensor([10])))
    assert not torch.allclose(a(x, torch.tensor([10])), a(x, torch.tensor([900])))


def test_class_label_changes_output():
    model = UNet(32, attn_resolutions=(), num_classes=2, **TINY)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(1, 1, 32, 32), torch.tensor([100])
    assert not torch.allclose(model(x, t, torch.tensor([0])), model(x, t, torch.tensor([1])))


def test_patch_size_runs_the_unet_on_folded_pixels():
    """PATCH_SIZE 2: a 64 px image enters the U-Net as 32 px with 4 channels and leaves at 64 px."""
    model = UNet(64, patch_size=2, attn_resolutions=(16,), **TINY)
    seen = []
    model.stem.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0].shape, output.shape)))
    x = torch.randn(2, 1, 64, 64)
    assert model(x, torch.tensor([0, 999])).shape == x.shape
    assert seen == [(torch.Size([2, 4, 32, 32]), torch.Size([2, 8, 32, 32]))]


@pytest.mark.parametrize("sizes, expected", [
    (dict(IMAGE_SIZE=64, PATCH_SIZE=2, ATTN_RESOLUTIONS=(64,)), "ATTN_RESOLUTIONS has 64"),  # after folding: 32, 16
    (dict(IMAGE_SIZE=36, CHANNEL_MULT=(1, 2, 2, 2), ATTN_RESOLUTIONS=()), "not a multiple of 8"),
    (dict(IMAGE_SIZE=32, CHANNEL_MULT=(1, 2), ATTN_RESOLUTIONS=(5,)), "ATTN_RESOLUTIONS has 5"),
    (dict(IMAGE_SIZE=32, CHANNEL_MULT=(1, 2), PATCH_SIZE=3, ATTN_RESOLUTIONS=()), "not a multiple of 6")])
def test_sizes_the_unet_cannot_take_are_refused_with_the_settings(sizes, expected):
    with pytest.raises(InputError, match=expected):
        check_config(dict(constants(), **sizes))


def shapes(size=16):
    """Four images a denoiser must tell apart: a disk, a square, a bar across and a bar down, in [-1, 1]."""
    yy, xx = torch.meshgrid(torch.arange(size) - (size - 1) / 2, torch.arange(size) - (size - 1) / 2, indexing="ij")
    masks = [yy ** 2 + xx ** 2 < 25, (yy.abs() < 4) & (xx.abs() < 4), yy.abs() < 2, xx.abs() < 2]
    return torch.stack([m.float() * 2 - 1 for m in masks])[:, None]


@pytest.mark.parametrize("patch_size", [1, 2])
def test_tiny_unet_learns_to_denoise_and_needs_x_t_and_t(patch_size):
    """Trained to predict the noise in noised copies of four shapes at t in [50, 600], the U-Net's loss falls far
    below the noise's variance; it rises back when it is shown another image's x_t or told another t. With
    PATCH_SIZE 2 too: folding pixels into channels loses nothing the network needs."""
    torch.manual_seed(0)
    family = shapes()
    model = UNet(16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                 patch_size=patch_size)
    schedule = NoiseSchedule(1000, "cosine", "eps")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def batch(n=32):
        x0, t = family[torch.randint(0, 4, (n,))], torch.randint(50, 600, (n,))
        noise = torch.randn_like(x0)
        return schedule.q_sample(x0, t, noise), t, noise
    for _ in range(250):
        x_t, t, noise = batch()
        loss = (model(x_t, t) - noise).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        x_t, t, noise = batch(512)
        shuffled = torch.roll(torch.arange(512), 1)
        true = (model(x_t, t) - noise).square().mean().item()
        other_image = (model(x_t[shuffled], t) - noise).square().mean().item()
        other_time = (model(x_t, t[shuffled]) - noise).square().mean().item()
    assert true < 0.1, true
    assert other_image > 5 * true and other_time > 2 * true, (true, other_image, other_time)
