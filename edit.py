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
from dataclasses import dataclass

import torch
from torchvision.transforms.functional import gaussian_blur

import dataset
import edit_scores
import inpainting
import pictures
import utils
import volumes
from predict import Sampling, load_heldout, open_checkpoint, sampling_parser
from utils import InputError

EDIT_SLICES = 32  # held-out slices edited by default, evenly picked among those of the classes other than the target
DEPTH = 1.0  # counterfactuals: the share of T the slices are inverted to (--depth; measured in docs/editing.md)
ANOMALY_DEPTH = 0.7  # effect maps (--anomaly): the share of T the slices are noised to (--depth; docs/editing.md)
ANOMALY_SEEDS = 2  # effect maps (--anomaly): noise draws whose reconstructions are averaged
MAP_BLUR = 1.0  # effect maps: the Gaussian smoothing of |input - reconstruction|, in pixels (sigma)
HEALTHY = ("nc", "cn", "hc", "control", "controls", "healthy", "normal")  # what --to-label healthy may name
SCAN_SLICE_MM = 1.0  # counterfactual.nii.gz from a scan: nominal millimetres per pixel and per slice
BRAIN_LEVEL = 12  # a held-out slice with no pixel above this (of 255) is blank: no brain to fill a box in
EDITS = ("counterfactual.png", "counterfactual.json", "counterfactual.nii.gz", "effect_map.nii.gz", "edits/*.png")
FILLS = ("inpaint.png", "inpaint.json", "inpaint/*.png")  # a run's output sets, each replaced as a whole


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
    truth = [None] * 4
    if (found := dataset.read_truth(data)) is not None:
        where = {i: k for k, i in enumerate(found[0].tolist())}
        if all(i in where for i in pick.tolist()):  # the labelled demo: every non-NC slice has its truth
            rows = torch.tensor([where[i] for i in pick.tolist()])
            truth = [t[rows] if t.dtype == torch.bool else t[rows].float() / 127.5 - 1 for t in found[1:]]
    return Slices(data.val[pick].float() / 127.5 - 1, [pictures.slice_name(data.val_names[i]) for i in pick.tolist()],
                  None if labels is None else labels[pick],
                  None if data.val_positions is None else data.val_positions[pick], *truth)


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
    images, paths = dataset.read_folder(path, size, with_names=True)
    positions = dataset.slice_positions(paths, "folder")[0]
    return Slices(images.float() / 127.5 - 1, unique_names(paths, path), positions=positions)


def unique_names(paths, root):
    """A name per file for what is made from it: its stem, or where stems repeat (AD/s_1.png, NC/s_1.png), its path
    under root with the folders joined by '_'."""
    names = [pictures.slice_name(p) for p in paths]
    if len(set(names)) == len(names) or os.path.isfile(root):
        return names
    return [pictures.slice_name(os.path.relpath(p, root).replace(os.sep, "_")) for p in paths]


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


def edit_and_score(sampling, slices, target, depth, guidance, anomaly_depth, data, out):
    """Counterfactuals of the slices toward class `target` (when given; inverted to depth) and effect maps (with an
    anomaly_depth): files, the picture, and, where the truth or labels allow, the figures in counterfactual.json with
    the settings (none: {}). Returns them."""
    utils.fresh_folder(out, EDITS)  # this run's set replaces the last one's whole
    os.makedirs(os.path.join(out, "edits"), exist_ok=True)
    batch, x, classes = sampling.settings["SAMPLE_BATCH"], slices.images, sampling.class_names
    if utils.conditions_of(sampling.cfg)[1] and slices.positions is None:
        print("notice: the input carries no slice heights (a scan, or NAME_slice_K file names): editing with none")
    positions = slices.positions if utils.conditions_of(sampling.cfg)[1] else None
    figures, columns = {}, {"input": x}
    region = None if slices.twins is None else (x > -0.9) | (slices.twins > -0.9)  # the brain, with or without disease
    truths = {"": (slices.twins, slices.masks), "local_": (slices.local_twins, slices.local_masks)}
    if target is not None:
        targets = torch.full((len(x),), target, dtype=torch.long)
        cf, null = utils.in_batches(lambda *b: counterfactual(sampling, *b, depth, guidance), batch, x, slices.labels,
                              positions, targets)
        columns.update({"counterfactual": cf, "difference": cf - x})
        for name, image, change in zip(slices.names, cf, effect_map(cf - x)):
            utils.save_png(image, os.path.join(out, "edits", f"{name}_to_{classes[target]}.png"))
            utils.save_png(change.clamp(0, 1) * 2 - 1, os.path.join(out, "edits", f"{name}_to_{classes[target]}_map.png"))
        if slices.scan:
            pictures.save_stack(cf, os.path.join(out, "counterfactual.nii.gz"), SCAN_SLICE_MM, SCAN_SLICE_MM)
        if slices.labels is not None:
            figures.update(edit_scores.effectiveness(x, cf, target, data, sampling.device))
            figures.update(round_trips(sampling, slices, positions, cf, null, target, depth, guidance, data))
        if region is not None:
            baseline = effect_map(x - edit_scores.mean_by_height(data, target, slices.positions))
            figures.update(edit_scores.against_truths(x, cf, null, truths, {"counterfactual": effect_map(cf - x),
                                                                             "baseline": baseline}, region))
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


def round_trips(sampling, slices, positions, cf, null, target, depth, guidance, data):
    """Reversibility: the counterfactuals taken back to their own classes, against the inputs; and held-out slices of
    the target class asked to stay in it, against their null intervention (mean absolute changes, [-1, 1] scale)."""
    batch, x = sampling.settings["SAMPLE_BATCH"], slices.images
    targets = torch.full((len(x),), target, dtype=torch.long)
    back, _ = utils.in_batches(lambda *b: counterfactual(sampling, *b, depth, guidance), batch, cf, targets, positions,
                         slices.labels)
    staying = torch.nonzero(data.val_labels == target)[:, 0]
    staying = staying[torch.linspace(0, len(staying) - 1, min(len(x), len(staying))).round().long()]
    own = data.val[staying].float() / 127.5 - 1
    kept, kept_null = utils.in_batches(lambda *b: counterfactual(sampling, *b, depth, guidance), batch, own,
                                 data.val_labels[staying], None if positions is None else data.val_positions[staying],
                                 data.val_labels[staying])
    return {"round_trip_change": (back - x).abs().mean().item(), "null_change": (null - x).abs().mean().item(),
            "stay_change": (kept - own).abs().mean().item(), "stay_null_change": (kept_null - own).abs().mean().item()}


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
    for case, (slices, masks, truth, labels) in cases.items():
        labels, positions = labels if sampling.class_names else None, slices.positions if by_slice else None
        fill = lambda r, j: utils.in_batches(lambda *b: inpainting.repaint(sampling, *b, r, j),  # noqa: E731
                                             batch, slices.images, masks, labels, positions)
        mean = edit_scores.mean_by_height(data, None if labels is None else int(labels[0]), slices.positions)
        fills = {"repaint": fill(resample, jump), "no_resampling": fill(1, 1),
                 "biharmonic": inpainting.biharmonic_fill(slices.images, masks),
                 "height_mean": torch.where(masks, mean, slices.images)}
        figures[case] = {"slices": len(masks), "mask_share": masks.float().mean().item(),
                         **{name: inpainting.fill_scores(f, truth, masks) for name, f in fills.items()}}
        if case == "boxes":
            pictures.save_edits({"input, mask outlined": slices.images, "filled": fills["repaint"], "original": truth},
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
    if args.resample < 1 or args.jump < 1:
        raise InputError(f"--resample and --jump must be 1 or more, got {args.resample} and {args.jump}")
    return settings, args


def edit_slices(sampling: Sampling, args, out):
    """--to-label, --anomaly: counterfactuals and effect maps of the given slices or of held-out ones."""
    depth = DEPTH if args.depth is None else args.depth
    anomaly_depth = (ANOMALY_DEPTH if args.depth is None else args.depth) if args.anomaly else None
    target = None if args.to_label is None else target_class(args.to_label, sampling.class_names)
    if args.to_label is not None and target is None:
        print(f"notice: --to-label healthy: none of this model's classes ({', '.join(sampling.class_names)}) is a "
              f"control group: no counterfactuals (--to-label NAME picks one)")
        if not args.anomaly:
            return
    data = load_heldout(sampling) if args.input is None else None
    slices = (given_slices(args.input, sampling.cfg["IMAGE_SIZE"]) if args.input else
              heldout_slices(data, target, EDIT_SLICES))
    guidance = sampling.settings["GUIDANCE"]
    print(f"editing {len(slices.images)} slices" + (f" into {sampling.class_names[target]} (depth {depth:g}, "
                                                    f"guidance {guidance:g})" if target is not None else "")
          + (f", effect maps (depth {anomaly_depth:g})" if args.anomaly else ""))
    figures = edit_and_score(sampling, slices, target, depth, guidance, anomaly_depth, data, out)
    print(f"-> {out}/counterfactual.png, {out}/edits/" + (f", {out}/counterfactual.json" if figures else ""))
    print("\n".join(f"  {k:32s} {v:.4f}" if isinstance(v, float) else f"  {k:32s} {v}" for k, v in figures.items()))


def fill_given(sampling: Sampling, args, out):
    """--mask: inpaint the given slices where the mask is white."""
    size = sampling.cfg["IMAGE_SIZE"]
    slices = given_slices(args.input, size)
    masks = inpainting.read_masks(args.mask, slices.names, size)
    if args.slice_position is not None:
        slices.positions = torch.full((len(masks),), sampling.positions[0])
    labels = torch.full((len(masks),), sampling.labels[0]) if args.label not in (None, "all") else None
    inpainting.fill_and_save(sampling, slices, masks, labels, args.resample, args.jump, out, FILLS)
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
