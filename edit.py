"""Ask about a brain you hold: the same slice under another class (a counterfactual: DDIM inversion, then guided
decoding), and effect maps of where a slice differs from what the model calls healthy; for your slices or scan, or
for held-out slices, measured against the labelled demo's truth. predict.py calls these with --to-label, --anomaly."""
import json
import os
from dataclasses import dataclass

import torch
from torchvision.transforms.functional import gaussian_blur

import dataset
import evaluate
import pictures
import utils
import volumes
from utils import InputError

EDIT_SLICES = 32  # held-out slices edited by default, evenly picked among those of the classes other than the target
DEPTH = 0.5  # the share of T that counterfactuals are inverted to and effect maps noised to (--depth)
ANOMALY_SEEDS = 2  # effect maps (--anomaly): noise draws whose reconstructions are averaged
MAP_BLUR = 1.0  # effect maps: the Gaussian smoothing of |input - reconstruction|, in pixels (sigma)
HEALTHY = ("nc", "cn", "hc", "control", "controls", "healthy", "normal")  # what --to-label healthy may name
SCAN_SLICE_MM = 1.0  # counterfactual.nii.gz from a scan: nominal millimetres per pixel and per slice


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
    if not 0 < depth <= 1:
        raise InputError(f"--depth must be in (0, 1] (a share of the diffusion steps), got {depth}")


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
    return Slices(data.val[pick].float() / 127.5 - 1, [stem(data.val_names[i]) for i in pick.tolist()],
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
    return Slices(images.float() / 127.5 - 1, [stem(n) for n in names], positions=positions)


def stem(name):
    """A slice's name for the files made from it: its file's name without folder and extension (a scan's: NAME_K)."""
    return os.path.basename(name).split(".")[0] + (f"_{name.rsplit(':', 1)[1]}" if ":" in name else "")


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


def run(sampling, slices, target, depth, guidance, anomaly, data, out):
    """Counterfactuals of the slices toward class `target` (when given) and effect maps (with anomaly): files, the
    picture, and, where the truth or labels allow, the figures in counterfactual.json. Returns the figures."""
    os.makedirs(os.path.join(out, "edits"), exist_ok=True)
    batch, x, classes = sampling.settings["SAMPLE_BATCH"], slices.images, sampling.classes
    if utils.conditions_of(sampling.cfg)[1] and slices.positions is None:
        print("notice: the input carries no slice heights (a scan, or NAME_slice_K file names): editing with none")
    positions = slices.positions if utils.conditions_of(sampling.cfg)[1] else None
    figures, columns = {"depth": depth, "guidance": guidance, "slices": len(x)}, {"input": x}
    region = None if slices.twins is None else (x > -0.9) | (slices.twins > -0.9)  # the brain, with or without atrophy
    if target is not None:
        targets = torch.full((len(x),), target, dtype=torch.long)
        cf, null = in_batches(lambda *b: counterfactual(sampling, *b, depth, guidance), batch, x, slices.labels,
                              positions, targets)
        columns.update({"counterfactual": cf, "difference": cf - x})
        for name, image in zip(slices.names, cf):
            utils.save_png(image, os.path.join(out, "edits", f"{name}_to_{classes[target]}.png"))
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
    if anomaly:
        maps = in_batches(lambda *b: anomaly_maps(sampling, *b, target, depth), batch, x, positions)
        columns["effect map"] = maps
        for name, image in zip(slices.names, maps):
            utils.save_png(image.clamp(0, 1) * 2 - 1, os.path.join(out, "edits", f"{name}_effect.png"))
        if region is not None:
            figures.update(evaluate.map_scores("anomaly", maps, slices.masks, region))
    if slices.twins is not None:
        columns.update({"healthy twin (truth)": slices.twins, "atrophy (truth)": slices.masks.float() * 2 - 1})
    pictures.save_edits(columns, slices.names, os.path.join(out, "counterfactual.png"),
                        f"to {classes[target]}, depth {depth:g}, guidance {guidance:g}" if target is not None else
                        f"effect maps, depth {depth:g}")
    if len(figures) > 3:
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
