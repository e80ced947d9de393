"""Ask about slices you hold, with a trained model: the same slice under another class (a counterfactual: DDIM
inversion, then guided decoding), effect maps of where a slice differs from what the model calls healthy, and a
region filled anew with anatomy that fits the rest (inpainting, RePaint); for your slices or scan, or for held-out
slices, measured against what was there and the labelled demo's truth.

    python edit.py --to-label healthy --anomaly          # held-out AD slices without the disease, and where it was
    python edit.py --to-label NC --input scan.nii.gz     # your scan's slices as NC, and a counterfactual.nii.gz
    python edit.py --input my_slices/ --mask box:0.3,0.3,0.6,0.6   # fill a box (or --mask masks/: one per slice)
    python edit.py --inpaint-eval                        # inpainting measured against what was there
"""
import json
import os
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

import dataset
import edit_scores
import inpainting
import pictures
import truth
import utils
import volumes
from cohorts import ADNI_NAME, SLICE_NAME
from predict import Sampling, load_heldout, open_checkpoint, sampling_parser
from utils import InputError

EDIT_SLICES = 32  # held-out slices edited by default, evenly picked among those of the classes other than the target
DEPTH = 1.0  # counterfactuals: the share of T the slices are inverted to (--depth; measured in docs/editing.md)
ANOMALY_DEPTH = 0.7  # effect maps (--anomaly): the share of T the slices are noised to (--depth; docs/editing.md)
ANOMALY_SEEDS = 2  # effect maps (--anomaly): noise draws whose reconstructions are averaged
MAP_BLUR = 1.0  # effect maps: the Gaussian smoothing of |input - reconstruction|, in pixels (sigma)
EDIT_MASK = "change"  # counterfactuals (--edit-mask): where they may change the slice: none, change, auto or masks
MASK_NOISINGS = 10  # --edit-mask auto (DiffEdit): noisings of the slice over which the class contrast is averaged
MASK_DEPTH = 0.5  # --edit-mask auto: the share of T those noisings reach
MASK_CLAMP = 3.0  # --edit-mask auto, change: the map is clamped at this multiple of its mean, rescaled to [0, 1]
MASK_THRESHOLD = 0.5  # --edit-mask auto: the rescaled contrast above this is edited (DiffEdit's)
CHANGE_THRESHOLD = 0.7  # --edit-mask change: the rescaled effect map above this is edited (docs/editing.md)
MASK_MARGIN = 0.04  # --edit-mask auto, change: the brain grown by this share of the side (a shrunk brain may regrow)
MASK_FEATHER = 1.0  # edit masks: their edge fades out over a Gaussian of this many pixels (sigma), so no seam shows
NULL_CYCLES = 10  # composition: the null intervention applied this many times (and once)
CYCLED_SLICES = 8  # composition: the first slices that are cycled NULL_CYCLES times (it costs 10 inversions each)
HEALTHY = ("nc", "cn", "hc", "control", "controls", "healthy", "normal")  # what --to-label healthy may name
NAMED_STACK = 8  # --input files: their names give heights where each subject has this many slices or more
SCAN_SLICE_MM = 1.0  # counterfactual.nii.gz from a scan: nominal millimetres per pixel and per slice
BRAIN_LEVEL = 12  # a held-out slice with no pixel above this (of 255) is blank: no brain to fill a box in
EDITS = ("counterfactual.*", "effect_map.nii.gz", "edits/*.png")  # counterfactuals' files, replaced whole by a run
FILLS = ("inpaint.png", "inpaint.json", "inpaint/*.png")  # inpainting's files, replaced whole by a run


@dataclass
class Slices:
    """Slices to edit, in [-1, 1], with what is known of them (None: not known)."""
    images: torch.Tensor
    names: list
    labels: torch.Tensor | None = None  # their classes (held-out slices)
    positions: torch.Tensor | None = None  # their heights in the brain, 0 to 1 (the model sees them if it takes them)
    twins: torch.Tensor | None = None  # the labelled demo's truth: each slice without the disease, in [-1, 1]
    masks: torch.Tensor | None = None  # and the pixels the disease changed (atrophy and the brain's shrink)
    local_twins: torch.Tensor | None = None  # the second truth: each slice without the atrophy alone (shrink kept)
    local_masks: torch.Tensor | None = None  # and the pixels the atrophy changed
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


def heldout_slices(data, target, count, with_brain=False):
    """`count` held-out slices of the classes other than target (any, with no target or no classes), evenly picked
    (with_brain: among those that are not blank), with their labels, positions and, for the labelled demo, the
    truth."""
    labels = data.val_labels if data.val_labels is not None and target is not None else None
    others = torch.arange(len(data.val)) if labels is None else torch.nonzero(labels != target)[:, 0]
    if with_brain:
        others = others[(data.val[others] > BRAIN_LEVEL).flatten(1).any(1)]
    if not len(others):
        raise InputError(f"the held-out split has no {'non-blank ' if with_brain else ''}slices "
                         f"{'' if labels is None else 'of another class '}to edit: pass --input")
    pick = others[torch.linspace(0, len(others) - 1, min(count, len(others))).round().long()]
    known = [None] * 4
    if (found := truth.read_truth(data)) is not None:
        where = {i: k for k, i in enumerate(found[0].tolist())}
        if all(i in where for i in pick.tolist()):  # the labelled demo: every non-NC slice has its truth
            rows = torch.tensor([where[i] for i in pick.tolist()])
            known = [t[rows] if t.dtype == torch.bool else t[rows].float() / 127.5 - 1 for t in found[1:]]
    return Slices(data.val[pick].float() / 127.5 - 1, [pictures.slice_name(data.val_names[i]) for i in pick.tolist()],
                  None if labels is None else labels[pick],
                  None if data.val_positions is None else data.val_positions[pick], *known)


def given_slices(path, size):
    """--input: a scan (its kept slices, with their heights), or an image file or folder (heights from the names
    where they are reliable, see named_heights, else not given)."""
    if os.path.isfile(path) and path.lower().endswith(volumes.SCAN_EXTS):
        try:
            images, positions, _, _ = volumes.read_scan(path, size)
        except Exception as e:  # unreadable, corrupt, not a volume
            raise InputError(f"cannot read the scan {utils.show_path(path)} ({str(e).splitlines()[0]})") from None
        names = [f"slice_{k:03d}" for k in range(len(images))]
        return Slices(images[:, None].float() / 127.5 - 1, names, positions=positions, scan=path)
    images, paths = dataset.read_folder(path, size, with_names=True)
    return Slices(images.float() / 127.5 - 1, unique_names(paths, path), positions=named_heights(paths))


def named_heights(paths):
    """Heights from file names (OASIS-style NAME_slice_K, else ADNI-style SUBJECT_K): the rank of K among its
    subject's slices, as training reads them. Only where every subject has NAMED_STACK slices or more, so that the
    ranks span a stack (three slices of a subject would read as its bottom, middle and top); else None."""
    for layout, pattern in (("folder", SLICE_NAME), ("adni", ADNI_NAME)):
        positions, _ = dataset.slice_positions(paths, layout)
        if positions is not None:
            stacks = Counter((os.path.dirname(p), pattern.fullmatch(os.path.basename(p).split(".")[0])[1])
                             for p in paths)
            return positions if min(stacks.values()) >= NAMED_STACK else None
    return None


def given_conditions(slices, sampling, args):
    """--input slices' own class (--label, else not known) and heights (--slice-position F, or A:B spread over them
    in order; else what the scan or the names give), as the model takes them."""
    classes, by_slice = utils.conditions_of(sampling.cfg)
    n = len(slices.images)
    if args.label not in (None, "all"):
        slices.labels = torch.full((n,), sampling.labels[0], dtype=torch.long)
    if args.slice_position is not None:
        slices.positions = torch.linspace(*sampling.positions, n)
    if by_slice and slices.positions is None:
        print(f"notice: the heights of the --input slices are not known (a folder without {NAMED_STACK} or more "
              f"NAME_slice_K or SUBJECT_K slices a subject): editing them as of any height; --slice-position F says")
    if classes and slices.labels is None:
        print("notice: the class of the --input slices is not given: editing them as of any class; --label NAME says")
    return slices


def unique_names(paths, root):
    """A name per file for what is made from it: its stem, or where stems repeat (AD/s_1.png, NC/s_1.png), its path
    under root with the folders joined by '_'."""
    names = [pictures.slice_name(p) for p in paths]
    if len(set(names)) == len(names) or os.path.isfile(root):
        return names
    return [pictures.slice_name(os.path.relpath(p, root).replace(os.sep, "_")) for p in paths]


def inverted(sampling, x, sources, positions, depth, covariates=None):
    """DDIM inversion of x to depth*T under its own classes (None: no class), positions and covariates, with the
    model alone (no guidance, no clipping, fp32): (the latent, every intermediate on the way, the step it reached)."""
    settings, schedule = sampling.settings, sampling.schedule
    end = max(1, round(depth * schedule.timesteps) - 1)
    net = sampling.plain(sources, positions, covariates=covariates)
    latent, path = schedule.invert(net, x.to(sampling.device), end, settings["EDIT_STEPS"], settings["STEP_SPACING"],
                                   keep=True)
    return latent, path, end


def decoded(sampling, latent, end, net, **blend):
    """ddim back from a latent at step `end` with the inversion's steps, in [-1, 1]; blend: DiffEdit's path and mask."""
    settings = sampling.settings
    return sampling.schedule.sample(net, sampler="ddim", steps=settings["EDIT_STEPS"], eta=0.0, x=latent.clone(),
                                    start_t=end, clip=False, spacing=settings["STEP_SPACING"],
                                    **blend).cpu().clamp(-1, 1)


def counterfactual(sampling, x, sources, positions, targets, depth, guidance, edit=None):
    """x inverted (see inverted), then decoded under the target classes with classifier-free guidance on the class,
    and under the sources unguided (the null intervention, which returns x up to the discretisation error). With an
    edit mask (in [0, 1]), the decoding under the targets follows the inversion's own path outside it (DiffEdit's
    masked decoding): there it returns x. Returns (counterfactuals, null reconstructions), in [-1, 1]."""
    latent, path, end = inverted(sampling, x, sources, positions, depth)
    blend = {} if edit is None else {"path": path, "edit": edit.to(sampling.device)}
    return (decoded(sampling, latent, end, sampling.plain(targets, positions, guidance), **blend),
            decoded(sampling, latent, end, sampling.plain(sources, positions)))


def changed_counterfactual(sampling, x, sources, positions, targets, depth, guidance):
    """--edit-mask change: x inverted once, decoded under the targets unmasked, then again within change_mask of that
    first answer (DiffEdit's masked decoding along the same inversion). Returns (counterfactuals, null
    reconstructions, the feathered masks, the map they were thresholded from)."""
    latent, path, end = inverted(sampling, x, sources, positions, depth)
    asked = sampling.plain(targets, positions, guidance)
    contrast, found = change_mask(x.cpu(), decoded(sampling, latent, end, asked))
    masks = feathered(found)
    return (decoded(sampling, latent, end, asked, path=path, edit=masks.to(sampling.device)),
            decoded(sampling, latent, end, sampling.plain(sources, positions)), masks, contrast)


def null_cycles(sampling, x, sources, positions, depth, cycles):
    """Composition (Monteiro et al. 2023): the null intervention (inverted and decoded under the own class) applied
    `cycles` times."""
    for _ in range(cycles):
        latent, _, end = inverted(sampling, x, sources, positions, depth)
        x = decoded(sampling, latent, end, sampling.plain(sources, positions))
    return x


def near_brain(x):
    """Where an automatic edit may reach: the brain (pixels above BRAIN_LEVEL) grown by MASK_MARGIN of the side."""
    r = max(1, round(MASK_MARGIN * x.shape[-1]))
    brain = (x > BRAIN_LEVEL / 127.5 - 1).any(1, keepdim=True).float()
    return F.max_pool2d(brain, 2 * r + 1, 1, r)


def auto_mask(sampling, x, sources, positions, targets):
    """DiffEdit's edit mask (Couairon et al. 2023, sec. 3.1), on the class: x noised to MASK_DEPTH x T with
    MASK_NOISINGS draws, the model's noise predictions under the target and the source classes (None: no class)
    contrasted, |difference| averaged over draws and channels, clamped at MASK_CLAMP x its mean and rescaled to
    [0, 1], near the brain only. Returns (that map, the mask: the map above MASK_THRESHOLD)."""
    schedule, device = sampling.schedule, sampling.device
    t = max(1, round(MASK_DEPTH * schedule.timesteps) - 1)
    gen = torch.Generator(device=device).manual_seed(sampling.settings["SEED"])
    x, models = x.to(device), [sampling.plain(c, positions) for c in (targets, sources)]
    contrast = torch.zeros_like(x[:, :1])
    for _ in range(MASK_NOISINGS):
        noise = torch.randn(x.shape, generator=gen, device=device)
        x_t = schedule.q_sample(x, torch.full((len(x),), t, device=device), noise)
        (eps, _), (eps_source, _) = (schedule.denoise(model, x_t, t, clip=False) for model in models)
        contrast += (eps - eps_source).abs().mean(1, keepdim=True) / MASK_NOISINGS
    return thresholded(contrast.cpu(), x.cpu(), MASK_THRESHOLD)


def change_mask(x, cf):
    """Where the unmasked counterfactual cf changes x most: its effect map, thresholded as DiffEdit's contrast is.
    Returns (the rescaled map, the mask)."""
    return thresholded(effect_map(cf - x).mean(1, keepdim=True), x, CHANGE_THRESHOLD)


def thresholded(contrast, x, threshold):
    """DiffEdit's recipe on a map of where to edit: clamped at MASK_CLAMP x its mean over each slice, rescaled to
    [0, 1], near x's brain only. Returns (that map, the mask: the map above threshold)."""
    limit = MASK_CLAMP * contrast.mean((1, 2, 3), keepdim=True)
    scaled = contrast.clamp(max=limit) / limit.clamp(min=1e-12) * near_brain(x)  # 0 where nothing differs
    return scaled, scaled > threshold


def feathered(mask):
    """A mask softened outward so that no seam shows: 1 on it, fading over a Gaussian of MASK_FEATHER pixels around
    it (all white stays all 1, empty stays 0)."""
    size = 2 * round(3 * MASK_FEATHER) + 1
    return torch.maximum(mask.float(), gaussian_blur(mask.float(), [size, size], [MASK_FEATHER, MASK_FEATHER]))


def edit_masks(sampling, setting, slices, sources, positions, targets):
    """Where counterfactuals may change the slices (--edit-mask): (feathered masks, None for 'none' and 'change'
    (made from the counterfactual itself); DiffEdit's contrast map for 'auto', else None). An empty mask leaves its
    slice as it is."""
    if setting in ("none", "change"):
        return None, None
    if setting != "auto":
        return feathered(inpainting.read_masks(setting, slices.names, sampling.cfg["IMAGE_SIZE"], "--edit-mask")), None
    contrast, masks = utils.in_batches(lambda *b: auto_mask(sampling, *b), sampling.settings["SAMPLE_BATCH"],
                                       slices.images, sources, positions, targets)
    return feathered(masks), contrast


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


def edit_and_score(sampling, slices, target, depth, guidance, anomaly_depth, data, out, mask_setting=EDIT_MASK):
    """Counterfactuals of the slices toward class `target` (when given; inverted to depth, changed where mask_setting
    says) and effect maps (with an anomaly_depth): files, the picture, and the figures in counterfactual.json with the
    settings (soundness for every slice; more where the truth or labels allow). Returns them."""
    utils.fresh_folder(out, EDITS)  # this run's set replaces the last one's whole
    os.makedirs(os.path.join(out, "edits"), exist_ok=True)
    batch, x, classes = sampling.settings["SAMPLE_BATCH"], slices.images, sampling.class_names
    positions = slices.positions if utils.conditions_of(sampling.cfg)[1] else None
    figures, columns = {}, {"input": x}
    region = None if slices.twins is None else (x > -0.9) | (slices.twins > -0.9)  # the brain, with or without disease
    truths = {"": (slices.twins, slices.masks), "local_": (slices.local_twins, slices.local_masks)}
    if target is not None:
        targets = torch.full((len(x),), target, dtype=torch.long)
        cf, null, masks, contrast = counterfactuals(sampling, slices, slices.labels, positions, targets, depth,
                                                    guidance, mask_setting)
        save_counterfactuals(slices, cf, masks, classes[target], out)
        columns.update({"counterfactual": cf, "difference": cf - x})
        if masks is not None:
            columns["edit mask"] = masks * 2 - 1
            figures.update({"edit_mask": mask_setting, "edit_mask_share": masks.mean().item(),
                            "empty_edit_masks": int((masks.flatten(1).amax(1) == 0).sum())})
            if figures["empty_edit_masks"]:
                print(f"notice: {figures['empty_edit_masks']} of {len(x)} edit masks are empty (nothing to change "
                      f"there: a blank slice, or one the class leaves as it is): those slices are written unchanged")
        figures.update(soundness(sampling, slices, positions, cf, null, target, depth, guidance, mask_setting))
        if data is not None and slices.labels is not None:
            figures.update(edit_scores.effectiveness(x, cf, target, data, sampling.device))
            figures.update(stays(sampling, data, len(x), target, depth, guidance, mask_setting))
        if region is not None:
            baseline = effect_map(x - edit_scores.mean_by_height(data, target, slices.positions))
            maps = {"counterfactual": effect_map(cf - x), "baseline": baseline,
                    **({} if contrast is None else {"edit_mask": contrast})}
            figures.update(edit_scores.against_truths(x, cf, null, truths, maps, region))
            figures.update(edit_scores.brain_area_changes(x, {"cf": cf, "twin": slices.twins,
                                                              "local_twin": slices.local_twins}))
    if anomaly_depth is not None:
        maps = utils.in_batches(lambda *b: anomaly_maps(sampling, *b, target, anomaly_depth), batch, x, positions)
        columns["effect map"] = maps
        for name, image in zip(slices.names, maps):
            utils.save_png(image.clamp(0, 1) * 2 - 1, os.path.join(out, "edits", f"{name}_effect.png"))
        if slices.scan:
            pictures.save_stack(maps.clamp(0, 1) * 2 - 1, os.path.join(out, "effect_map.nii.gz"), SCAN_SLICE_MM,
                                SCAN_SLICE_MM)
        if region is not None:
            figures.update(edit_scores.against_truths(x, None, None, truths, {"anomaly": maps}, region))
    if slices.twins is not None:
        columns.update({"healthy twin (truth)": slices.twins, "disease (truth)": slices.masks.float() * 2 - 1})
    pictures.save_edits(columns, slices.names, os.path.join(out, "counterfactual.png"),
                        f"to {classes[target]}, depth {depth:g}, guidance {guidance:g}" if target is not None else
                        f"effect maps, depth {anomaly_depth:g}")
    if figures:
        figures = {"depth": depth if target is not None else None, "guidance": guidance, "anomaly_depth": anomaly_depth,
                   "slices": len(x), **figures}
        with open(os.path.join(out, "counterfactual.json"), "w") as f:
            json.dump(figures, f, indent=2)
    return figures


def counterfactuals(sampling, slices, sources, positions, targets, depth, guidance, mask_setting):
    """counterfactual() of every slice, in batches, changed where mask_setting says (changed_counterfactual for
    'change'): (counterfactuals, null reconstructions, the feathered edit masks or None, the map the masks were
    thresholded from or None)."""
    batch = sampling.settings["SAMPLE_BATCH"]
    if mask_setting == "change":
        return utils.in_batches(lambda *b: changed_counterfactual(sampling, *b, depth, guidance), batch,
                                slices.images, sources, positions, targets)
    masks, contrast = edit_masks(sampling, mask_setting, slices, sources, positions, targets)
    cf, null = utils.in_batches(lambda x, s, p, t, m: counterfactual(sampling, x, s, p, t, depth, guidance, m),
                                batch, slices.images, sources, positions, targets, masks)
    return cf, null, masks, contrast


def save_counterfactuals(slices, cf, masks, to, out):
    """edits/NAME_to_CLASS.png, its effect map (_map) and edit mask (_mask, where one is used); the scan's stack."""
    for k, (name, image, change) in enumerate(zip(slices.names, cf, effect_map(cf - slices.images))):
        utils.save_png(image, os.path.join(out, "edits", f"{name}_to_{to}.png"))
        utils.save_png(change.clamp(0, 1) * 2 - 1, os.path.join(out, "edits", f"{name}_to_{to}_map.png"))
        if masks is not None:
            utils.save_png(masks[k] * 2 - 1, os.path.join(out, "edits", f"{name}_to_{to}_mask.png"))
    if slices.scan:
        pictures.save_stack(cf, os.path.join(out, "counterfactual.nii.gz"), SCAN_SLICE_MM, SCAN_SLICE_MM)


def soundness(sampling, slices, positions, cf, null, target, depth, guidance, mask_setting):
    """Monteiro et al. 2023, against the inputs (mean absolute changes, [-1, 1] scale; no truth needed): the
    counterfactuals' change beside the null intervention's; composition, the null intervention once and, on the first
    CYCLED_SLICES, NULL_CYCLES times (beside once on those); reversibility, the counterfactuals taken back to the
    slices' own classes (to no class where they are not known) by the same edit."""
    batch, x, few = sampling.settings["SAMPLE_BATCH"], slices.images, slice(0, CYCLED_SLICES)
    targets = torch.full((len(x),), target, dtype=torch.long)
    back = counterfactuals(sampling, Slices(cf, slices.names), targets, positions, slices.labels, depth, guidance,
                           mask_setting)[0]
    cycled = utils.in_batches(lambda *b: null_cycles(sampling, *b, depth, NULL_CYCLES), batch, x[few],
                              None if slices.labels is None else slices.labels[few],
                              None if positions is None else positions[few])
    return {"change": (cf - x).abs().mean().item(), "null_change": (null - x).abs().mean().item(),
            f"null_change_first_{CYCLED_SLICES}": (null[few] - x[few]).abs().mean().item(),
            f"null_{NULL_CYCLES}_cycles_change_first_{CYCLED_SLICES}": (cycled - x[few]).abs().mean().item(),
            "round_trip_change": (back - x).abs().mean().item()}


def stays(sampling, data, count, target, depth, guidance, mask_setting):
    """Held-out slices of the target class asked to stay in it (automatic masks, or none), against themselves, beside
    their null intervention."""
    staying = torch.nonzero(data.val_labels == target)[:, 0]
    staying = staying[torch.linspace(0, len(staying) - 1, min(count, len(staying))).round().long()]
    own = Slices(data.val[staying].float() / 127.5 - 1, [pictures.slice_name(data.val_names[i]) for i in
                                                         staying.tolist()], data.val_labels[staying])
    positions = data.val_positions[staying] if utils.conditions_of(sampling.cfg)[1] else None
    setting = mask_setting if mask_setting in ("auto", "change", "none") else "none"  # a user's are for others
    kept, kept_null, _, _ = counterfactuals(sampling, own, own.labels, positions, own.labels, depth, guidance, setting)
    return {"stay_change": (kept - own.images).abs().mean().item(),
            "stay_null_change": (kept_null - own.images).abs().mean().item()}


# ---------------------------------------------------------------- inpainting measured
def inpaint_eval(sampling, data, resample, jump, out):
    """--inpaint-eval: held-out slices filled in random boxes over 10-25% of their brain, against what was there; and
    on the labelled demo, the 'AD' slices' atrophy filled with the control class, against their local-atrophy twins.
    Inside the masks: RePaint as asked, beside RePaint without resampling, scikit-image's biharmonic fill and the mean
    training slice of the same height; and the seams. inpaint.json and inpaint.png (the boxes). Returns the figures."""
    healthy = target_class("healthy", sampling.class_names) if sampling.class_names else None
    batch, by_slice = sampling.settings["SAMPLE_BATCH"], utils.conditions_of(sampling.cfg)[1]
    boxes = heldout_slices(data, None, EDIT_SLICES, with_brain=True)
    cases = {"boxes": (boxes, inpainting.random_boxes(boxes.images, sampling.settings["SEED"]), boxes.images,
                       boxes.labels)}
    if healthy is not None and (atrophy := heldout_slices(data, healthy, EDIT_SLICES)).twins is not None:
        cases["atrophy"] = (atrophy, atrophy.local_masks, atrophy.local_twins,
                            torch.full((len(atrophy.images),), healthy))
    figures = {"resample": resample, "jump": jump}
    utils.fresh_folder(out, FILLS)  # this run's set replaces the last one's whole
    for case, (slices, masks, original, labels) in cases.items():
        labels, positions = labels if sampling.class_names else None, slices.positions if by_slice else None
        fill = lambda r, j: utils.in_batches(lambda *b: inpainting.repaint(sampling, *b, r, j),  # noqa: E731
                                             batch, slices.images, masks, labels, positions)
        mean = edit_scores.mean_by_height(data, None if labels is None else int(labels[0]), slices.positions)
        fills = {"repaint": fill(resample, jump), "no_resampling": fill(1, 1),
                 "biharmonic": inpainting.biharmonic_fill(slices.images, masks),
                 "height_mean": torch.where(masks, mean, slices.images)}
        figures[case] = {"slices": len(masks), "mask_share": masks.float().mean().item(),
                         **{name: inpainting.fill_scores(f, original, masks) for name, f in fills.items()}}
        if case == "boxes":
            pictures.save_edits({"input, mask outlined": slices.images, "filled": fills["repaint"], "original": original},
                                slices.names, os.path.join(out, "inpaint.png"),
                                f"inpainting (RePaint, {resample} passes, jumps of {jump})", outlines=masks)
    with open(os.path.join(out, "inpaint.json"), "w") as f:
        json.dump(figures, f, indent=2)
    return figures


# ---------------------------------------------------------------- what the user asks for
def parse_settings(argv=None):
    """The run's settings and edit.py's own flags, each checked, incompatible ones refused together."""
    parser = sampling_parser(__doc__)
    parser.add_argument("--input", help="your slices: an image, a folder of images, or a scan (default: held-out "
                                        "slices)")
    parser.add_argument("--to-label", metavar="NAME", help="counterfactuals: the slices (--input, or held-out ones of "
                        "the other classes) as this class (a name, an index, or healthy: NC, CN, ...)")
    parser.add_argument("--anomaly", action="store_true", help="effect maps: each slice noised part way and "
                        "reconstructed (toward --to-label's class, if given); where they differ")
    parser.add_argument("--depth", type=float, help="--to-label, --anomaly: how far into the diffusion the slices are "
                        f"taken, a share of its steps in (0, 1] (default: {DEPTH:g} for counterfactuals, "
                        f"{ANOMALY_DEPTH:g} for effect maps)")
    parser.add_argument("--edit-mask", metavar="change|auto|none|PATH", help="--to-label: where counterfactuals may "
                        "change the slice: change (where the unmasked counterfactual changes it most; decoded twice), "
                        "auto (where the model's predictions under the two classes differ, DiffEdit), none (anywhere), "
                        f"or a mask image or a folder of masks named like the slices (default: {EDIT_MASK})")
    parser.add_argument("--mask", help="inpainting of --input where the mask is white: box:X0,Y0,X1,Y1 (fractions of "
                        "the image), one mask image, or a folder of masks named like the slices")
    parser.add_argument("--resample", type=int, default=inpainting.RESAMPLE, help="inpainting: RePaint's passes over "
                        "each stretch of steps (1: none)")
    parser.add_argument("--jump", type=int, default=inpainting.JUMP, help="inpainting: steps noised back up at a time")
    parser.add_argument("--inpaint-eval", action="store_true", help="measure inpainting on held-out slices (random "
                        "boxes; the labelled demo's atrophy) beside simpler fills: inpaint.json")
    settings, args = utils.parse_settings(parser, argv)
    editing = args.to_label is not None or args.anomaly
    if not (editing or args.mask or args.inpaint_eval):
        raise InputError("say what to do: --to-label NAME (counterfactuals), --anomaly (effect maps), --mask SPEC "
                         "--input SLICES (inpainting) or --inpaint-eval (see python edit.py --help)")
    if args.inpaint_eval and (editing or args.mask or args.input):
        raise InputError("--inpaint-eval measures on held-out slices with masks of its own: run it without --to-label, "
                         "--anomaly, --mask and --input (python edit.py --inpaint-eval)")
    if args.mask and editing:
        raise InputError("--mask fills; --to-label and --anomaly edit: run them one at a time (python edit.py --mask "
                         "SPEC --input SLICES, then python edit.py --to-label NAME --input SLICES)")
    if args.mask and args.input is None:
        raise InputError("--mask needs the slices to fill: pass --input IMAGE_OR_FOLDER (or a scan)")
    if args.depth is not None and not 0 < args.depth <= 1:
        raise InputError(f"--depth must be in (0, 1] (a share of the diffusion steps), got {args.depth}")
    if args.edit_mask is not None and args.to_label is None:
        raise InputError("--edit-mask says where counterfactuals may change a slice: use it with --to-label NAME")
    if args.edit_mask not in (None, "auto", "change", "none") and not (args.edit_mask.startswith("box:") or
                                                            os.path.exists(args.edit_mask)):
        raise InputError(f"--edit-mask {args.edit_mask}: no such mask file or folder (give auto, none, or a mask image "
                         f"or folder of masks named like the slices)")
    if args.input is None and (args.label, args.slice_position) != (None, None) and editing:
        raise InputError("--label and --slice-position describe --input slices (their class and heights); held-out "
                         "slices carry their own: drop them, or pass --input")
    if args.age is not None:
        raise InputError("--age: edit.py edits with the age not given (the model's 'any age'); for a slice at another "
                         "age, use progress.py --age YEARS --years N")
    if args.resample < 1 or args.jump < 1:
        raise InputError(f"--resample and --jump must be 1 or more, got {args.resample} and {args.jump}")
    return settings, args


def edit_slices(sampling: Sampling, args, out):
    """--to-label, --anomaly: counterfactuals and effect maps of the given slices or of held-out ones."""
    depth = DEPTH if args.depth is None else args.depth
    anomaly_depth = (ANOMALY_DEPTH if args.depth is None else args.depth) if args.anomaly else None
    if args.edit_mask is not None and not sampling.class_names:
        raise InputError(f"--edit-mask {args.edit_mask}: this model was not trained with class conditioning, and an "
                         f"edit mask shapes class counterfactuals (train with --condition class or class+slice)")
    target = None if args.to_label is None else target_class(args.to_label, sampling.class_names)
    if args.to_label is not None and target is None:
        print(f"notice: --to-label healthy: none of this model's classes ({', '.join(sampling.class_names)}) is a "
              f"control group: no counterfactuals (--to-label NAME picks one)")
        if not args.anomaly:
            return
    data = load_heldout(sampling) if args.input is None else None
    slices = (given_conditions(given_slices(args.input, sampling.cfg["IMAGE_SIZE"]), sampling, args) if args.input
              else heldout_slices(data, target, EDIT_SLICES))
    guidance = sampling.settings["EDIT_GUIDANCE"]
    mask_setting = EDIT_MASK if args.edit_mask is None else args.edit_mask
    print(f"editing {len(slices.images)} slices" + (f" into {sampling.class_names[target]} (depth {depth:g}, "
                                                    f"guidance {guidance:g}, edit mask {mask_setting})"
                                                    if target is not None else "")
          + (f", effect maps (depth {anomaly_depth:g})" if args.anomaly else ""))
    figures = edit_and_score(sampling, slices, target, depth, guidance, anomaly_depth, data, out, mask_setting)
    print(f"-> {out}/counterfactual.png, {out}/edits/" + (f", {out}/counterfactual.json" if figures else ""))
    print("\n".join(f"  {k:32s} {v:.4f}" if isinstance(v, float) else f"  {k:32s} {v}" for k, v in figures.items()))


def fill_given(sampling: Sampling, args, out):
    """--mask: inpaint the given slices where the mask is white."""
    size = sampling.cfg["IMAGE_SIZE"]
    slices = given_conditions(given_slices(args.input, size), sampling, args)
    masks = inpainting.read_masks(args.mask, slices.names, size)
    inpainting.fill_and_save(sampling, slices, masks, slices.labels, args.resample, args.jump, out, FILLS)
    print(f"filled {len(masks)} slices -> {out}/inpaint.png, {out}/inpaint/")


def main():
    settings, args = parse_settings()
    out = utils.fresh_folder(os.path.join(settings["OUTPUT_DIR"], "edit"))
    sampling, _, _ = open_checkpoint(settings, args, utils.get_device())
    if args.inpaint_eval:
        figures = inpaint_eval(sampling, load_heldout(sampling), args.resample, args.jump, out)
        print(f"-> {out}/inpaint.json, {out}/inpaint.png")
        print(json.dumps(figures, indent=1))
    elif args.mask:
        fill_given(sampling, args, out)
    else:
        edit_slices(sampling, args, out)


if __name__ == "__main__":
    utils.run_main(main)
