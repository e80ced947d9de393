"""Inpainting: masks as users give them (a box, an image, a folder named like the slices), RePaint fills with the
run's sampler, random boxes over the brain to measure them by, and the scores of a fill against what was there."""
import os

import numpy as np
import torch
import torch.nn.functional as F

import dataset
import pictures
import utils
from evaluate import SSIM_KERNEL
from utils import InputError

RESAMPLE = 10  # inpainting (--resample): passes over each stretch of steps (RePaint's r; 1: no resampling)
JUMP = 5  # inpainting (--jump): sampler steps noised back up at a time (RePaint's j)


# ---------------------------------------------------------------- masks
def parse_box(spec, flag="--mask"):
    """(x0, y0, x1, y1) from box:X0,Y0,X1,Y1, fractions of the image's width and height."""
    try:
        x0, y0, x1, y1 = (float(v) for v in spec[4:].split(","))
    except ValueError:
        x0 = y0 = x1 = y1 = -1.0
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise InputError(f"{flag} {spec}: give box:X0,Y0,X1,Y1, fractions of the image with X0 < X1 and Y0 < Y1")
    return x0, y0, x1, y1


def read_mask(path, size, said):
    """One mask file as bool 1 x S x S (white: fill), laid into the frame as the slices are (padded to a square, never
    stretched, and resized) and thresholded at half, with a notice once each."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            mask = image.convert("L")
    except (OSError, UnidentifiedImageError):
        raise InputError(f"{utils.show_path(path)} is not a mask image PIL can read: pass a black-and-white image") \
            from None
    if mask.size != (size, size):
        said.add(f"notice: masks laid into the model's {size}x{size} frame as the slices are, padded to a square "
                 f"and resized (the first was {mask.size[0]}x{mask.size[1]})")
        mask = dataset.pad_to_square(mask).resize((size, size), Image.NEAREST)
    values = torch.from_numpy(np.asarray(mask).copy())
    if not torch.isin(values, torch.tensor([0, 255], dtype=values.dtype)).all():
        said.add("notice: masks that are not black and white are thresholded at half grey")
    return (values >= 128)[None]


def read_masks(spec, names, size, flag="--mask"):
    """--mask (or another flag): a box (box:X0,Y0,X1,Y1), one mask image for all the slices, or a folder of masks
    paired with the slices by file name; white is filled. Returns bool N x 1 x S x S."""
    said = set()
    if spec.startswith("box:"):
        x0, y0, x1, y1 = parse_box(spec, flag)
        mask = torch.zeros(1, size, size, dtype=torch.bool)
        mask[:, round(y0 * size):max(round(y1 * size), round(y0 * size) + 1),
             round(x0 * size):max(round(x1 * size), round(x0 * size) + 1)] = True
        masks = mask.expand(len(names), -1, -1, -1)
    elif os.path.isfile(spec):
        masks = read_mask(spec, size, said).expand(len(names), -1, -1, -1)
    elif os.path.isdir(spec):
        found = {pictures.slice_name(p): p for p in dataset.list_images(spec)}
        if missing := [n for n in names if n not in found]:
            raise InputError(f"no mask for {missing[0]} in {utils.show_path(spec)} (masks pair with slices by file "
                             f"name): add one, or give one mask file for all")
        if unused := sorted(set(found) - set(names)):
            raise InputError(f"the mask {utils.show_path(found[unused[0]])} has no slice of its name in --input")
        masks = torch.stack([read_mask(found[n], size, said) for n in names])
    else:
        raise InputError(f"{flag} {spec} is neither box:X0,Y0,X1,Y1 nor a mask image or folder")
    for line in sorted(said):
        print(line)
    return masks.clone()


def repaint(sampling, x, fill, labels, positions, resample, jump):
    """RePaint with the run's sampler, guidance and autoguidance: x ([-1, 1]) with the `fill` pixels drawn anew."""
    s, device = sampling.settings, sampling.device
    gen = torch.Generator(device=device).manual_seed(s["SEED"])
    return sampling.schedule.inpaint(sampling.denoiser(labels, positions), x.to(device), fill.to(device),
                                     s["SAMPLER"], s["SAMPLE_STEPS"], resample, jump, s["DDIM_ETA"], gen,
                                     spacing=s["STEP_SPACING"]).cpu()


def fill_and_save(sampling, slices, masks, labels, resample, jump, out, stale=()):
    """Inpaint each slice where its mask is white; files, and inpaint.png (input with the mask outlined, the result).
    Slices with an empty mask come back as they are, said once. Returns the results."""
    empty = ~masks.flatten(1).any(1)
    if empty.any():
        print(f"notice: {int(empty.sum())} of the masks are empty: those slices come back unchanged")
    positions = slices.positions if utils.conditions_of(sampling.cfg)[1] else None
    results = utils.in_batches(lambda *b: repaint(sampling, *b, resample, jump), sampling.settings["SAMPLE_BATCH"],
                         slices.images, masks, labels, positions)
    results[empty] = slices.images[empty]
    utils.fresh_folder(out, stale)  # this run's set replaces the last one's whole
    os.makedirs(os.path.join(out, "inpaint"), exist_ok=True)
    for name, image in zip(slices.names, results):
        utils.save_png(image, os.path.join(out, "inpaint", f"{name}_filled.png"))
    pictures.save_edits({"input, mask outlined": slices.images, "filled": results}, slices.names, os.path.join(out, "inpaint.png"),
                        f"inpainting (RePaint, {resample} passes, jumps of {jump})", outlines=masks)
    return results


def random_boxes(images, seed, share=(0.10, 0.25), tries=100):
    """A box per [-1, 1] slice covering a random share (in `share`) of its brain (the pixels above -0.9), centred on
    a brain pixel, of a random aspect from 3:4 to 4:3."""
    gen, size = torch.Generator().manual_seed(seed), images.shape[-1]
    masks = torch.zeros(images.shape, dtype=torch.bool)
    for mask, brain in zip(masks, images > -0.9):
        cells = torch.nonzero(brain[0])
        if not len(cells):  # a blank slice: nothing to cover
            continue
        for _ in range(tries):
            target = share[0] + (share[1] - share[0]) * torch.rand((), generator=gen).item()
            aspect = 0.75 + (4 / 3 - 0.75) * torch.rand((), generator=gen).item()
            cy, cx = cells[torch.randint(len(cells), (), generator=gen)].tolist()
            h = max(1, round((target * len(cells) * aspect) ** 0.5))
            w = max(1, round(target * len(cells) / h))
            box = torch.zeros(size, size, dtype=torch.bool)
            box[max(0, cy - h // 2):cy - h // 2 + h, max(0, cx - w // 2):cx - w // 2 + w] = True
            if share[0] <= (box & brain[0]).sum() / len(cells) <= share[1]:
                mask[0] = box
                break
    return masks


# ---------------------------------------------------------------- scores of a fill
def biharmonic_fill(images, masks):
    """The classical fill: scikit-image's biharmonic inpainting of each [-1, 1] image where its mask is true."""
    from skimage.restoration import inpaint_biharmonic
    filled = [inpaint_biharmonic(x[0].numpy(), m[0].numpy()) if m.any() else x[0].numpy()
              for x, m in zip(images.float(), masks)]
    return torch.from_numpy(np.stack(filled))[:, None].float()


def border(masks):
    """The pixels on either side of each mask's edge (a 1-pixel ring out, a 1-pixel ring in)."""
    grown = F.max_pool2d(masks.float(), 3, 1, 1) > 0
    shrunk = -F.max_pool2d(-masks.float(), 3, 1, 1) > 0
    return grown & ~shrunk


def gradient(images):
    """The gradient's magnitude at each pixel (central differences, edges replicated)."""
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    gx = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) / 2
    gy = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) / 2
    return (gx ** 2 + gy ** 2).sqrt()


def fill_scores(filled, truth, masks):
    """A fill against the truth inside the masks, on a [0, 1] scale: MAE, PSNR and SSIM (torchmetrics' SSIM map,
    averaged inside); and the seam: the mean gradient across the masks' borders (the truth's beside it is the
    reference: a seamless fill changes it little)."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim
    a, b = utils.to_unit(filled), utils.to_unit(truth)
    error = (a - b)[masks]
    _, ssim_map = ssim(a, b, data_range=1.0, kernel_size=SSIM_KERNEL, return_full_image=True)
    ring = border(masks)
    return {"mae": error.abs().mean().item(), "psnr": (10 * torch.log10(1 / error.square().mean())).item(),
            "ssim": ssim_map[masks].mean().item(), "seam_gradient": gradient(a)[ring].mean().item(),
            "seam_gradient_truth": gradient(b)[ring].mean().item()}
