"""The U-Net: shapes, gradients, time conditioning, determinism, and that it can learn."""
import pytest
import torch

from modules import UNet
from utils import NoiseSchedule, UserError

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


def test_bad_sizes_are_refused():
    with pytest.raises(UserError, match="multiple"):
        UNet(36, channel_mult=(1, 2, 2, 2), attn_resolutions=())
    with pytest.raises(UserError, match="ATTN_RESOLUTIONS"):
        UNet(32, attn_resolutions=(5,), **TINY)


def test_tiny_unet_learns_a_disk():
    """A few hundred steps on one fixed image drive the diffusion loss far down."""
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    disk = (((yy - 7.5) ** 2 + (xx - 7.5) ** 2) < 25).float().mul(2).sub(1)[None, None].repeat(16, 1, 1, 1)
    model = UNet(16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=())
    schedule = NoiseSchedule(1000, "cosine", "x0")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(300):
        t = torch.randint(0, 1000, (16,))
        noise = torch.randn_like(disk)
        loss = (model(schedule.q_sample(disk, t, noise), t) - disk).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.05 * first, (first, last)
