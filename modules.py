"""The noise predictor: a U-Net with a sinusoidal time embedding (Ho et al. 2020; Dhariwal & Nichol 2021)."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import utils

SLICE_SCALE = 30  # slice positions in [0, 1] are embedded like timesteps in [0, 30]: at most 5 cycles, smooth between slices
COVARIATE_SCALE = 30  # covariates, scaled to [0, 1] over their training range, are embedded like slice positions


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

    `num_classes` adds a class embedding, `slice_positions` a sinusoidal embedding of the slice position in [0, 1],
    and `covariates` K more such embeddings, one per numeric covariate (age, sex, ...) scaled to [0, 1]; all are
    added to the time embedding. Call `model(x_t, t, labels, positions, covariates)` (covariates N x K): a class
    index of -1, a position or covariate of NaN, or None for all, means 'not given' (a learned entry of its own,
    which classifier-free guidance uses). The sizes must suit the U-Net (utils.check_config says which do).
    `patch_size` p folds each p x p block of pixels into channels on the way in and back on the way out, so the
    U-Net runs at 1/p of the image's side.
    """

    def __init__(self, image_size=128, channels=1, base_channels=64, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                 attn_resolutions=(16,), num_heads=4, dropout=0.0, num_classes=0, slice_positions=False,
                 patch_size=1, covariates=0):
        super().__init__()
        sizes = [image_size // patch_size // 2 ** i for i in range(len(channel_mult))]
        self.base_channels, self.num_classes, self.patch_size = base_channels, num_classes, patch_size
        emb_dim = max(128, 4 * base_channels)
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None  # last entry: no class
        self.slice_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(),
                                       nn.Linear(emb_dim, emb_dim)) if slice_positions else None
        self.no_slice = nn.Parameter(torch.zeros(emb_dim)) if slice_positions else None
        self.covariate_mlps = nn.ModuleList(nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(),
                                                          nn.Linear(emb_dim, emb_dim)) for _ in range(covariates))
        self.no_covariate = nn.Parameter(torch.zeros(covariates, emb_dim)) if covariates else None
        if num_classes:
            nn.init.zeros_(self.label_emb.weight)  # conditions start as no-ops and are learned from there
        for mlp in ([self.slice_mlp] if slice_positions else []) + list(self.covariate_mlps):
            nn.init.zeros_(mlp[-1].weight)
            nn.init.zeros_(mlp[-1].bias)
        self.stem = nn.Conv2d(channels * patch_size ** 2, base_channels, 3, padding=1)

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
        self.out = nn.Sequential(nn.GroupNorm(groups(ch), ch), nn.SiLU(),
                                 nn.Conv2d(ch, channels * patch_size ** 2, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def number_embedding(self, mlp, not_given, value):
        """A number's embedding (sinusoidal features, then its MLP); the learned `not_given` where it is NaN."""
        given = mlp(timestep_embedding(value.nan_to_num(), self.base_channels))
        return torch.where(value.isnan()[:, None], not_given.to(given.dtype), given)

    def forward(self, x, t, labels=None, positions=None, covariates=None):
        emb = self.time_mlp(timestep_embedding(t, self.base_channels))
        if self.label_emb is not None:
            labels = torch.full_like(t, -1) if labels is None else labels
            emb = emb + self.label_emb(torch.where(labels < 0, self.num_classes, labels))
        if self.slice_mlp is not None:
            positions = torch.full(t.shape, math.nan, device=t.device) if positions is None else positions
            emb = emb + self.number_embedding(self.slice_mlp, self.no_slice, SLICE_SCALE * positions)
        if len(self.covariate_mlps):
            covariates = torch.full((len(t), len(self.covariate_mlps)), math.nan, device=t.device) \
                if covariates is None else covariates
            for j, mlp in enumerate(self.covariate_mlps):
                emb = emb + self.number_embedding(mlp, self.no_covariate[j], COVARIATE_SCALE * covariates[:, j])
        h = self.stem(F.pixel_unshuffle(x, self.patch_size))
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, Level) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], dim=1), emb) if isinstance(layer, Level) else layer(h)
        return F.pixel_shuffle(self.out(h), self.patch_size)


def build_model(cfg, num_classes=0):
    """The U-Net described by a configuration dict (the constants of utils.py) and the number of classes."""
    return UNet(cfg["IMAGE_SIZE"], cfg["CHANNELS"], cfg["BASE_CHANNELS"], tuple(cfg["CHANNEL_MULT"]),
                cfg["NUM_RES_BLOCKS"], tuple(cfg["ATTN_RESOLUTIONS"]), cfg["NUM_HEADS"], cfg["DROPOUT"], num_classes,
                utils.conditions_of(cfg)[1], cfg["PATCH_SIZE"], len(utils.covariates_of(cfg)))


def load_network(cfg, num_classes, weights, device, bf16):
    """build_model(cfg, num_classes) holding these weights, on device in the memory format that suits bf16 or fp32
    there, for inference."""
    model = build_model(cfg, num_classes)
    model.load_state_dict(weights)
    return model.to(device, memory_format=utils.memory_format(bf16, device)).eval().requires_grad_(False)


def call(model, x, t, labels, positions, covariates=None):
    """model(x, t, labels, positions, covariates) as torch.compile serves it best (the same for an eager model): conditions not
    given passed as their 'not given' values (-1, NaN) rather than None, and the batch dimension of every input marked
    dynamic, so that one graph serves every call a sampler makes (classifier-free guidance's doubled batch, the last
    partial batch, slices denoised without their conditions) where each change would otherwise compile another."""
    labels = torch.full_like(t, -1) if labels is None else labels
    positions = torch.full(t.shape, math.nan, device=t.device) if positions is None else positions
    given = (x, t, labels, positions) + (() if covariates is None else (covariates,))  # networks without covariates too
    for v in given:
        torch._dynamo.maybe_mark_dynamic(v, 0)
    return model(*given)


GUIDED = ("all", "class", "covariates", "class+covariates")  # guided_output: what guidance drops on its other side


def guided_output(model, x, t, labels=None, positions=None, scale=1.0, guided="all", covariates=None):
    """The model's output under classifier-free guidance (Ho & Salimans 2022), uncond + scale * (cond - uncond), the
    pair in one batched call; scale 0 is the unconditional model, 1 the conditional one. Conditions as for UNet; the
    unconditional side drops the conditions `guided` names (GUIDED: all of them, the class alone, the covariates
    alone, or both but the height), so that only those are guided."""
    drop = {"labels": guided in ("all", "class", "class+covariates"), "positions": guided == "all",
            "covariates": guided in ("all", "covariates", "class+covariates")}
    given = {"labels": labels, "positions": positions, "covariates": covariates}
    unguided = {k: None if drop[k] else v for k, v in given.items()}
    if scale == 0:
        return call(model, x, t, unguided["labels"], unguided["positions"], unguided["covariates"]).float()
    if scale == 1 or all(given[k] is None for k in given if drop[k]):
        return call(model, x, t, labels, positions, covariates).float()
    not_given = {"labels": lambda c: torch.full_like(c, -1), "positions": lambda c: torch.full_like(c, math.nan),
                 "covariates": lambda c: torch.full_like(c, math.nan)}
    pair = {k: None if v is None else torch.cat([v, not_given[k](v) if drop[k] else v]) for k, v in given.items()}
    cond, uncond = call(model, torch.cat([x, x]), torch.cat([t, t]), pair["labels"], pair["positions"],
                        pair["covariates"]).float().chunk(2)
    return uncond + scale * (cond - uncond)


class Denoiser:
    """What the samplers call, net(x_t, t): the model under classifier-free guidance for fixed conditions, in bf16
    where asked; given a guide (an early snapshot of the same model), also under autoguidance (Karras et al. 2024):
    guide + autoguidance * (model - guide), which pushes the output away from the errors the early model makes
    more of (in the quick profile: speckle in the white matter)."""

    def __init__(self, model, labels=None, positions=None, guidance=1.0, guide=None, autoguidance=1.0, bf16=False,
                 guided="all", covariates=None):
        self.model, self.labels, self.positions, self.guidance = model, labels, positions, guidance
        self.guide, self.autoguidance, self.bf16, self.guided = guide, autoguidance, bf16, guided
        self.covariates = covariates

    def __call__(self, x, t):
        x = x.contiguous(memory_format=utils.memory_format(self.bf16, x.device))
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            conditions = (self.labels, self.positions, self.guidance, self.guided, self.covariates)
            out = guided_output(self.model, x, t, *conditions)
            if self.guide is None or self.autoguidance == 1:
                return out
            weak = guided_output(self.guide, x, t, *conditions)
            return weak + self.autoguidance * (out - weak)


class Probe(nn.Module):
    """A small CNN that reads a slice (any size, resized to `size`): its features, and from them class logits,
    the slice position, and which of four quarter turns the slice was given (a task that needs no labels); and from
    the features, `age` reads the age (scaled as its trainer scales it)."""

    def __init__(self, num_classes=0, size=64, widths=(16, 32, 64, 128)):
        super().__init__()
        self.size, layers, ch = size, [], 1
        for w in widths:  # BatchNorm, not GroupNorm: it keeps each image's own brightness and contrast
            layers += [nn.Conv2d(ch, w, 3, padding=1), nn.BatchNorm2d(w), nn.SiLU(),
                       nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.SiLU(), nn.AvgPool2d(2)]
            ch = w
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classes = nn.Linear(ch, num_classes) if num_classes else None
        self.position = nn.Linear(ch, 1)
        self.turn = nn.Linear(ch, 4)
        self.age = nn.Linear(ch, 1)

    def features(self, x):
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="area" if x.shape[-1] > self.size else "bilinear")
        return self.body(x)

    def forward(self, x):
        """(features, class logits or None, position in [0, 1] (unbounded outside), quarter-turn logits)."""
        f = self.features(x)
        return f, self.classes(f) if self.classes is not None else None, self.position(f)[:, 0], self.turn(f)
