"""What goes wrong with scans before they reach a model, made on purpose: each corruption takes slices in [-1, 1]
(N x 1 x S x S, background at -1) and returns them corrupted, quantised to 8 bits as a file would hold them. Used by
typical.py --corruptions to measure how well the out-of-distribution score finds them."""
import torch
import torch.nn.functional as F

BRAIN = -0.95  # a pixel above this (in [-1, 1]) is brain, not background
GHOST_SHIFT = 0.5  # ghosting: the copy's shift along the phase-encoding (vertical) axis, a share of the side
SMALL_SHARE = 0.2  # another height: slices with the smallest brains, this share of them, scaled up to fill the frame
FILL = 0.8  # another height: the scaled brain's larger side, a share of the image's side


def quantised(u):
    """Unit images [0, 1] back to [-1, 1] on 256 levels."""
    return (u.clamp(0, 1) * 255).round() / 127.5 - 1


def unit(x):
    return (x + 1) / 2


def flipped(x, _):
    return x.flip(-2)  # front to back


def rotated(x, _):
    return x.rot90(1, (-2, -1))


def inverted(x, _):
    """Contrast inverted inside the brain (dark tissue bright, as a T2 shows it), the background kept dark."""
    brain = x > BRAIN
    u = unit(x)
    return quantised(torch.where(brain, 1 - u + unit(torch.tensor(BRAIN)), u))


def noisy(sigma):
    return lambda x, gen: quantised(unit(x) + sigma * torch.randn(x.shape, generator=gen))


def ghosted(amplitude):
    def ghost(x, _):
        u = unit(x)
        return quantised(u + amplitude * u.roll(round(GHOST_SHIFT * x.shape[-2]), -2))
    return ghost


def bias_field(strength):
    """Multiplied by exp(strength * g), g a ramp along the diagonal from -1 to 1 across the middle half of the frame
    (where the brain lies), -2 to 2 corner to corner: a receive coil's uneven sensitivity."""
    def biased(x, _):
        ramp = torch.linspace(-1, 1, x.shape[-1])
        g = ramp[:, None] + ramp[None, :]
        return quantised(unit(x) * torch.exp(strength * g))
    return biased


def cropped(share):
    """The field of view cut: the top `share` of each brain's height lost (background), as a scan that stopped short."""
    def crop(x, _):
        out = x.clone()
        for i in range(len(x)):
            rows = torch.nonzero((x[i, 0] > BRAIN).any(1)).flatten().tolist()
            if rows:
                out[i, :, :rows[0] + round(share * (rows[-1] + 1 - rows[0])), :] = -1
        return out
    return crop


def other_height(x, _):
    """Each slice replaced by one of the smallest brains among x (a slice near the top or bottom of a head), its brain
    scaled up to fill the frame as a mid slice does."""
    area = (x > BRAIN).flatten(1).float().mean(1)
    brainy = area > 0
    pool = torch.nonzero(brainy & (area <= area[brainy].quantile(SMALL_SHARE))).flatten()
    size, out = x.shape[-1], []
    for i in pool[torch.arange(len(x)) % len(pool)].tolist():
        rows, cols = torch.nonzero(x[i, 0] > BRAIN, as_tuple=True)
        box = x[i:i + 1, :, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        scale = FILL * size / max(box.shape[-2:])
        h, w = (max(1, min(size, round(n * scale))) for n in box.shape[-2:])
        big = F.interpolate(box, size=(h, w), mode="bilinear", align_corners=False)
        frame = torch.full((1, 1, size, size), -1.0)
        top, left = (size - h) // 2, (size - w) // 2
        frame[..., top:top + h, left:left + w] = big
        out.append(frame)
    return quantised(unit(torch.cat(out)))


# name -> {level: corruption(x, generator)}; 'strong' is the level the AUROC target of 0.95 is set for, 'mild' 0.85
CORRUPTIONS = {
    "flipped front-to-back": {"strong": flipped},
    "rotated 90 degrees": {"strong": rotated},
    "contrast inverted": {"strong": inverted},
    "gaussian noise": {"mild": noisy(0.03), "strong": noisy(0.1)},
    "ghosting": {"mild": ghosted(0.15), "strong": ghosted(0.4)},
    "bias field": {"mild": bias_field(0.3), "strong": bias_field(0.8)},
    "cropped field of view": {"mild": cropped(0.15), "strong": cropped(0.3)},
    "another height, scaled": {"strong": other_height},
}
