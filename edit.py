"""Ask about a brain you hold: the same slice under another class (a counterfactual: DDIM inversion, then guided
decoding), effect maps of where a slice differs from what the model calls healthy, and a region filled anew with
anatomy that fits the rest (inpainting, RePaint); for your slices or scan, or for held-out slices, measured against
what was there and the labelled demo's truth. predict.py calls these with --to-label, --anomaly, --mask and
--inpaint-eval."""
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms.functional import gaussian_blur

import dataset
import evaluate
import pictures
import utils
import volumes
from utils import InputError

EDIT_SLICES = 32  # held-out slices edited by default, evenly picked among those of the classes other than the target
DEPTH = 1.0  # counterfactuals: the share of T the slices are inverted to (--depth; measured in docs/editing.md)
ANOMALY_DEPTH = 0.7  # effect maps (--anomaly): the share of T the slices are noised to (--depth; docs/editing.md)
ANOMALY_SEEDS = 2  # effect maps (--anomaly): noise draws whose reconstructions are averaged
MAP_BLUR = 1.0  # effect maps: the Gaussian smoothing of |input - reconstruction|, in pixels (sigma)
HEALTHY = ("nc", "cn", "hc", "control", "controls", "healthy", "normal")  # what --to-label healthy may name
SCAN_SLICE_MM = 1.0  # counterfactual.nii.gz from a scan: nominal millimetres per pixel and per slice
RESAMPLE = 10  # inpainting (--resample): passes over each stretch of steps (RePaint's r; 1: no resampling)
JUMP = 5  # inpainting (--jump): sampler steps noised back up at a time (RePaint's j)


@dataclass
class Slices:
    """Slices to edit, in [-1, 1], with what is known of them (None: not known)."""
    images: torch.Tensor
    names: list
    labels: torch.Tensor | None = None  # their classes (held-out slices)
    positions: torch.Tensor | None = None  # their heights in the brain, 0 to 1 (the model sees them if it takes them)
    twins: torch.Tensor | None = None  # the labelled demo's truth: each slice without the atrophy, in [-1, 1]
    masks: torch.Tensor | None = None  # and the pixels the atrophy changed
    scan: str | None = None  # the scan they came from


def target_class(name, classes):
    """The class index --to-label names (a name, an index, or 'healthy': the control class whatever the data calls
    it); None for 'healthy' when no class is one (the caller says so and edits nothing)."""
    if not classes:
        raise InputError(f"--to-label {name}: this model was not trained with class conditioning (train with "
                         f"--condition class or class+slice)")
    if name.lower() == "healthy":
        return next((i for i, c in enumerate(classes) if c.lower() in HEALTHY), None)
    if name in classes:
        return classes.index(name)
    if name.isdigit() and int(name) < len(classes):
        return int(name)
    raise InputError(f"--to-label {name} is not one of this model's classes: {', '.join(classes)} (or 0-"
                     f"{len(classes) - 1}, or healthy)")


def check_depth(depth):
    """depth, when in (0, 1]."""
    if not 0 < depth <= 1:
        raise InputError(f"--depth must be in (0, 1] (a share of the diffusion steps), got {depth}")
    return depth


def heldout_slices(data, target, count):
    """`count` held-out slices of the classes other than target (any, with no target or no classes), evenly picked,
    with their labels, positions and, for the labelled demo, the truth."""
    labels = data.val_labels if data.val_labels is not None and target is not None else None
    others = torch.arange(len(data.val)) if labels is None else torch.nonzero(labels != target)[:, 0]
    if not len(others):
        raise InputError("the held-out split has no slices of another class to edit: pass --input")
    pick = others[torch.linspace(0, len(others) - 1, min(count, len(others))).round().long()]
    twins = masks = None
    if (truth := dataset.read_truth(data)) is not None:
        where = {i: k for k, i in enumerate(truth[0].tolist())}
        if all(i in where for i in pick.tolist()):  # the labelled demo: every non-NC slice has its truth
            rows = torch.tensor([where[i] for i in pick.tolist()])
            twins, masks = truth[1][rows].float() / 127.5 - 1, truth[2][rows]
    return Slices(data.val[pick].float() / 127.5 - 1, [pictures.stem(data.val_names[i]) for i in pick.tolist()],
                  None if labels is None else labels[pick],
                  None if data.val_positions is None else data.val_positions[pick], twins, masks)


def given_slices(path, size):
    """--input: a scan (its kept slices, with their heights), or an image file or folder (heights from the names
    where they carry slice numbers, else not given)."""
    if os.path.isfile(path) and path.lower().endswith(volumes.SCAN_EXTS):
        try:
            images, positions, _, _ = volumes.read_scan(path, size)
        except Exception as e:  # unreadable, corrupt, not a volume
            raise InputError(f"cannot read the scan {utils.show_path(path)} ({str(e).splitlines()[0]})") from None
        names = [f"slice_{k:03d}" for k in range(len(images))]
        return Slices(images[:, None].float() / 127.5 - 1, names, positions=positions, scan=path)
    images, names = dataset.read_folder(path, size, with_names=True)
    positions = dataset.slice_positions(names, "folder")[0]
    return Slices(images.float() / 127.5 - 1, [pictures.stem(n) for n in names], positions=positions)


def in_batches(function, batch, *tensors):
    """function over consecutive batches of the tensors (None stays None), the results concatenated."""
    n, parts = len(tensors[0]), []
    for i in range(0, n, batch):
        parts.append(function(*(None if t is None else t[i:i + batch] for t in tensors)))
    return [torch.cat(p) for p in zip(*parts)] if isinstance(parts[0], tuple) else torch.cat(parts)


def counterfactual(sampling, x, sources, positions, targets, depth, guidance):
    """DDIM inversion of x to depth*T under its own classes (None: no class) and positions, with the model alone (no
    guidance, no clipping, fp32), then ddim back with the same steps: under the target classes with classifier-free
    guidance on the class, and under the sources unguided (the null intervention, which returns x up to the
    discretisation error). Returns (counterfactuals, null reconstructions), in [-1, 1]."""
    settings, schedule = sampling.settings, sampling.schedule
    end, steps = max(1, round(depth * schedule.timesteps) - 1), settings["SAMPLE_STEPS"]
    latent = schedule.invert(sampling.plain(sources, positions), x.to(sampling.device), end, steps,
                             settings["STEP_SPACING"])
    decode = lambda net: schedule.sample(net, sampler="ddim", steps=steps, eta=0.0, x=latent.clone(),  # noqa: E731
                                         start_t=end, clip=False, spacing=settings["STEP_SPACING"]).cpu().clamp(-1, 1)
    return decode(sampling.plain(targets, positions, guidance)), decode(sampling.plain(sources, positions))


def effect_map(difference):
    """Where two slices differ: |difference| smoothed with a Gaussian of MAP_BLUR pixels."""
    size = 2 * round(3 * MAP_BLUR) + 1
    return gaussian_blur(difference.abs(), [size, size], [MAP_BLUR, MAP_BLUR])


def anomaly_maps(sampling, x, positions, target, depth):
    """AnoDDPM-style effect maps (Wyatt et al. 2022): x noised to depth*T with ANOMALY_SEEDS noise draws, each
    reconstructed by the run's sampler under the target class (None: unconditionally), and the effect map of x and
    the mean reconstruction."""
    start_t = max(1, round(depth * sampling.schedule.timesteps) - 1)
    labels = None if target is None else torch.full((len(x),), target, dtype=torch.long)
    gen = torch.Generator(device=sampling.device).manual_seed(sampling.settings["SEED"])
    x = x.to(sampling.device)
    recons = []
    for _ in range(ANOMALY_SEEDS):
        noise = torch.randn(x.shape, generator=gen, device=sampling.device)
        x_t = sampling.schedule.q_sample(x, torch.full((len(x),), start_t, device=sampling.device), noise)
        recons.append(sampling.sample(x_t, labels, positions, generator=gen, start_t=start_t))
    return effect_map(x.cpu() - torch.stack(recons).mean(0))


def run(sampling, slices, target, depth, guidance, anomaly_depth, data, out):
    """Counterfactuals of the slices toward class `target` (when given; inverted to depth) and effect maps (with an
    anomaly_depth): files, the picture, and, where the truth or labels allow, the figures in counterfactual.json with
    the settings (none: {}). Returns them."""
    os.makedirs(os.path.join(out, "edits"), exist_ok=True)
    batch, x, classes = sampling.settings["SAMPLE_BATCH"], slices.images, sampling.classes
    if utils.conditions_of(sampling.cfg)[1] and slices.positions is None:
        print("notice: the input carries no slice heights (a scan, or NAME_slice_K file names): editing with none")
    positions = slices.positions if utils.conditions_of(sampling.cfg)[1] else None
    figures, columns = {}, {"input": x}
    region = None if slices.twins is None else (x > -0.9) | (slices.twins > -0.9)  # the brain, with or without atrophy
    if target is not None:
        targets = torch.full((len(x),), target, dtype=torch.long)
        cf, null = in_batches(lambda *b: counterfactual(sampling, *b, depth, guidance), batch, x, slices.labels,
                              positions, targets)
        columns.update({"counterfactual": cf, "difference": cf - x})
        for name, image, change in zip(slices.names, cf, effect_map(cf - x)):
            utils.save_png(image, os.path.join(out, "edits", f"{name}_to_{classes[target]}.png"))
            utils.save_png(change.clamp(0, 1) * 2 - 1, os.path.join(out, "edits", f"{name}_to_{classes[target]}_map.png"))
        if slices.scan:
            pictures.save_stack(cf, os.path.join(out, "counterfactual.nii.gz"), SCAN_SLICE_MM, SCAN_SLICE_MM)
        if slices.labels is not None:
            figures.update(evaluate.effectiveness(x, cf, target, data, sampling.device))
            figures.update(round_trips(sampling, slices, positions, cf, null, target, depth, guidance, data))
        if region is not None:
            figures.update(evaluate.truth_scores(x, cf, null, slices.twins, slices.masks, region))
            figures.update(evaluate.map_scores("counterfactual", effect_map(cf - x), slices.masks, region))
            baseline = effect_map(x - evaluate.mean_by_height(data, target, slices.positions))
            figures.update(evaluate.map_scores("baseline", baseline, slices.masks, region))
    if anomaly_depth is not None:
        maps = in_batches(lambda *b: anomaly_maps(sampling, *b, target, anomaly_depth), batch, x, positions)
        columns["effect map"] = maps
        for name, image in zip(slices.names, maps):
            utils.save_png(image.clamp(0, 1) * 2 - 1, os.path.join(out, "edits", f"{name}_effect.png"))
        if slices.scan:
            pictures.save_stack(maps.clamp(0, 1) * 2 - 1, os.path.join(out, "effect_map.nii.gz"), SCAN_SLICE_MM,
                                SCAN_SLICE_MM)
        if region is not None:
            figures.update(evaluate.map_scores("anomaly", maps, slices.masks, region))
    if slices.twins is not None:
        columns.update({"healthy twin (truth)": slices.twins, "atrophy (truth)": slices.masks.float() * 2 - 1})
    pictures.save_edits(columns, slices.names, os.path.join(out, "counterfactual.png"),
                        f"to {classes[target]}, depth {depth:g}, guidance {guidance:g}" if target is not None else
                        f"effect maps, depth {anomaly_depth:g}")
    if figures:
        figures = {"depth": depth if target is not None else None, "guidance": guidance, "anomaly_depth": anomaly_depth,
                   "slices": len(x), **figures}
        with open(os.path.join(out, "counterfactual.json"), "w") as f:
            json.dump(figures, f, indent=2)
    return figures


def round_trips(sampling, slices, positions, cf, null, target, depth, guidance, data):
    """Reversibility: the counterfactuals taken back to their own classes, against the inputs; and held-out slices of
    the target class asked to stay in it, against their null intervention (mean absolute changes, [-1, 1] scale)."""
    batch, x = sampling.settings["SAMPLE_BATCH"], slices.images
    targets = torch.full((len(x),), target, dtype=torch.long)
    back, _ = in_batches(lambda *b: counterfactual(sampling, *b, depth, guidance), batch, cf, targets, positions,
                         slices.labels)
    staying = torch.nonzero(data.val_labels == target)[:, 0]
    staying = staying[torch.linspace(0, len(staying) - 1, min(len(x), len(staying))).round().long()]
    own = data.val[staying].float() / 127.5 - 1
    kept, kept_null = in_batches(lambda *b: counterfactual(sampling, *b, depth, guidance), batch, own,
                                 data.val_labels[staying], None if positions is None else data.val_positions[staying],
                                 data.val_labels[staying])
    return {"round_trip_change": (back - x).abs().mean().item(), "null_change": (null - x).abs().mean().item(),
            "stay_change": (kept - own).abs().mean().item(), "stay_null_change": (kept_null - own).abs().mean().item()}


# ---------------------------------------------------------------- inpainting (RePaint)
def parse_box(spec):
    """(x0, y0, x1, y1) from box:X0,Y0,X1,Y1, fractions of the image's width and height."""
    try:
        x0, y0, x1, y1 = (float(v) for v in spec[4:].split(","))
    except ValueError:
        x0 = y0 = x1 = y1 = -1.0
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise InputError(f"--mask {spec}: give box:X0,Y0,X1,Y1, fractions of the image with X0 < X1 and Y0 < Y1")
    return x0, y0, x1, y1


def read_mask(path, size, said):
    """One mask file as bool 1 x S x S (white: fill); resized and thresholded at half, with a notice once each."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            mask = image.convert("L")
    except (OSError, UnidentifiedImageError):
        raise InputError(f"{utils.show_path(path)} is not a mask image PIL can read: pass a black-and-white image") \
            from None
    if mask.size != (size, size):
        said.add(f"notice: masks resized to the model's {size}x{size} (the first was {mask.size[0]}x{mask.size[1]})")
        mask = mask.resize((size, size), Image.NEAREST)
    values = torch.from_numpy(np.asarray(mask).copy())
    if not torch.isin(values, torch.tensor([0, 255], dtype=values.dtype)).all():
        said.add("notice: masks that are not black and white are thresholded at half grey")
    return (values >= 128)[None]


def read_masks(spec, names, size):
    """--mask: a box (box:X0,Y0,X1,Y1), one mask image for all the slices, or a folder of masks paired with the
    slices by file name; white is filled. Returns bool N x 1 x S x S."""
    said = set()
    if spec.startswith("box:"):
        x0, y0, x1, y1 = parse_box(spec)
        mask = torch.zeros(1, size, size, dtype=torch.bool)
        mask[:, round(y0 * size):max(round(y1 * size), round(y0 * size) + 1),
             round(x0 * size):max(round(x1 * size), round(x0 * size) + 1)] = True
        masks = mask.expand(len(names), -1, -1, -1)
    elif os.path.isfile(spec):
        masks = read_mask(spec, size, said).expand(len(names), -1, -1, -1)
    elif os.path.isdir(spec):
        found = {pictures.stem(p): p for p in dataset.list_images(spec)}
        if missing := [n for n in names if n not in found]:
            raise InputError(f"no mask for {missing[0]} in {utils.show_path(spec)} (masks pair with slices by file "
                             f"name): add one, or give one mask file for all")
        if unused := sorted(set(found) - set(names)):
            raise InputError(f"the mask {utils.show_path(found[unused[0]])} has no slice of its name in --input")
        masks = torch.stack([read_mask(found[n], size, said) for n in names])
    else:
        raise InputError(f"--mask {spec} is neither box:X0,Y0,X1,Y1 nor a mask image or folder")
    for line in sorted(said):
        print(line)
    return masks.clone()


def inpaint(sampling, x, fill, labels, positions, resample, jump):
    """RePaint with the run's sampler, guidance and autoguidance: x ([-1, 1]) with the `fill` pixels drawn anew."""
    s, device = sampling.settings, sampling.device
    gen = torch.Generator(device=device).manual_seed(s["SEED"])
    return sampling.schedule.inpaint(sampling.denoiser(labels, positions), x.to(device), fill.to(device),
                                     s["SAMPLER"], s["SAMPLE_STEPS"], resample, jump, s["DDIM_ETA"], gen,
                                     spacing=s["STEP_SPACING"]).cpu()


def fill_slices(sampling, slices, masks, labels, resample, jump, out):
    """Inpaint each slice where its mask is white; files, and inpaint.png (input with the mask outlined, the result).
    Slices with an empty mask come back as they are, said once. Returns the results."""
    empty = ~masks.flatten(1).any(1)
    if empty.any():
        print(f"notice: {int(empty.sum())} of the masks are empty: those slices come back unchanged")
    positions = slices.positions if utils.conditions_of(sampling.cfg)[1] else None
    results = in_batches(lambda *b: inpaint(sampling, *b, resample, jump), sampling.settings["SAMPLE_BATCH"],
                         slices.images, masks, labels, positions)
    results[empty] = slices.images[empty]
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


def inpaint_eval(sampling, data, resample, jump, out):
    """--inpaint-eval: held-out slices filled in random boxes over 10-25% of their brain, against what was there; and
    on the labelled demo, the 'AD' slices' atrophy filled with the control class, against their healthy twins.
    Inside the masks: RePaint as asked, beside RePaint without resampling, scikit-image's biharmonic fill and the mean
    training slice of the same height; and the seams. inpaint.json and inpaint.png (the boxes). Returns the figures."""
    healthy = target_class("healthy", sampling.classes) if sampling.classes else None
    batch, by_slice = sampling.settings["SAMPLE_BATCH"], utils.conditions_of(sampling.cfg)[1]
    boxes = heldout_slices(data, None, EDIT_SLICES)
    cases = {"boxes": (boxes, random_boxes(boxes.images, sampling.settings["SEED"]), boxes.images, boxes.labels)}
    if healthy is not None and (atrophy := heldout_slices(data, healthy, EDIT_SLICES)).twins is not None:
        cases["atrophy"] = (atrophy, atrophy.masks, atrophy.twins, torch.full((len(atrophy.images),), healthy))
    figures = {"resample": resample, "jump": jump}
    os.makedirs(out, exist_ok=True)
    for case, (slices, masks, truth, labels) in cases.items():
        labels, positions = labels if sampling.classes else None, slices.positions if by_slice else None
        fill = lambda r, j: in_batches(lambda *b: inpaint(sampling, *b, r, j), batch, slices.images,  # noqa: E731
                                       masks, labels, positions)
        mean = evaluate.mean_by_height(data, None if labels is None else int(labels[0]), slices.positions)
        fills = {"repaint": fill(resample, jump), "no_resampling": fill(1, 1),
                 "biharmonic": evaluate.biharmonic_fill(slices.images, masks),
                 "height_mean": torch.where(masks, mean, slices.images)}
        figures[case] = {"slices": len(masks), "mask_share": masks.float().mean().item(),
                         **{name: evaluate.fill_scores(f, truth, masks) for name, f in fills.items()}}
        if case == "boxes":
            pictures.save_edits({"input, mask outlined": slices.images, "filled": fills["repaint"], "original": truth},
                                slices.names, os.path.join(out, "inpaint.png"),
                                f"inpainting (RePaint, {resample} passes, jumps of {jump})", outlines=masks)
    with open(os.path.join(out, "inpaint.json"), "w") as f:
        json.dump(figures, f, indent=2)
    return figures
