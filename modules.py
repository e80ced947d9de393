"""The noise predictor: a U-Net with a sinusoidal time embedding (Ho et al. 2020; Dhariwal & Nichol 2021)."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import UserError


def groups(ch):
    """GroupNorm groups: the most (up to 32) that divide ch with at least 4 channels each."""
    return next(g for g in (32, 16, 8, 4, 2, 1) if ch % g == 0 and ch // g >= 4 or g == 1)


def timestep_embedding(t, dim):
    """Sinusoidal embedding of (possibly fractional) timesteps, as in Transformers."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; the time embedding scales and shifts the second norm."""

    def __init__(self, in_ch, out_ch, emb_dim, dropout):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(groups(out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map (PyTorch SDPA)."""

    def __init__(self, ch, heads):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups(ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2)
        out = F.scaled_dot_product_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2])  # b, heads, hw, c/heads
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Level(nn.Module):
    """A residual block, followed by attention at the chosen resolutions."""

    def __init__(self, in_ch, out_ch, emb_dim, dropout, attn, heads):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, dropout)
        self.attn = Attention(out_ch, heads) if attn else None

    def forward(self, x, emb):
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


class UNet(nn.Module):
    """eps/v/x0 predictor: `UNet(...)(x_t, t)` keeps the input's shape.

    `num_classes` adds a label embedding (with one extra 'null' label, index num_classes,
    for classifier-free guidance); then call `model(x_t, t, y)`.
    """

    def __init__(self, image_size=128, channels=1, base_channels=64, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                 attn_resolutions=(16,), num_heads=4, dropout=0.0, num_classes=0):
        super().__init__()
        factor = 2 ** (len(channel_mult) - 1)
        if image_size % factor:
            raise UserError(f"IMAGE_SIZE {image_size} is not a multiple of the U-Net's downsampling factor {factor}")
        sizes = [image_size // 2 ** i for i in range(len(channel_mult))]
        if any(r not in sizes for r in attn_resolutions):
            raise UserError(f"ATTN_RESOLUTIONS {tuple(attn_resolutions)} must be among the U-Net's resolutions {sizes}")
        self.base_channels, self.num_classes = base_channels, num_classes
        emb_dim = max(128, 4 * base_channels)
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.stem = nn.Conv2d(channels, base_channels, 3, padding=1)

        self.down, skips, ch = nn.ModuleList(), [base_channels], base_channels
        for i, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(Level(ch, base_channels * mult, emb_dim, dropout, sizes[i] in attn_resolutions,
                                       num_heads))
                ch = base_channels * mult
                skips.append(ch)
            if i < len(channel_mult) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid = nn.ModuleList([Level(ch, ch, emb_dim, dropout, True, num_heads),
                                  Level(ch, ch, emb_dim, dropout, False, num_heads)])
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(Level(ch + skips.pop(), base_channels * mult, emb_dim, dropout,
                                     sizes[i] in attn_resolutions, num_heads))
                ch = base_channels * mult
            if i > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(ch, ch, 3, padding=1)))
        self.out = nn.Sequential(nn.GroupNorm(groups(ch), ch), nn.SiLU(), nn.Conv2d(ch, channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, t, y=None):
        emb = self.time_mlp(timestep_embedding(t, self.base_channels))
        if self.label_emb is not None:
            y = torch.full_like(t, self.num_classes) if y is None else y  # no label: the 'null' class
            emb = emb + self.label_emb(y)
        h = self.stem(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, Level) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], dim=1), emb) if isinstance(layer, Level) else layer(h)
        return self.out(h)


def build_model(cfg, num_classes=0):
    """The U-Net described by a configuration dict (the constants of utils.py)."""
    return UNet(cfg["IMAGE_SIZE"], cfg["CHANNELS"], cfg["BASE_CHANNELS"], tuple(cfg["CHANNEL_MULT"]),
                cfg["NUM_RES_BLOCKS"], tuple(cfg["ATTN_RESOLUTIONS"]), cfg["NUM_HEADS"], cfg["DROPOUT"], num_classes)
