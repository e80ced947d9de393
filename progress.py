"""This slice years on, with a model trained with an age covariate: each slice inverted under its own class, height
and age (DDIM), then decoded under the later age (and, with --to-label, another class), guided on what changed and,
by default, changed only where that change is (the counterfactuals' change mask); a strip, a GIF of the years,
difference maps and, for a scan, its stacks. On the labelled demo's held-out slices, measured against each slice's
rendered future and two baselines: no change, and the population's mean change at that height and age.

    python progress.py                                       # held-out demo slices 5 and 10 years on, measured
    python progress.py --input scan.nii.gz --age 72 --label NC --years 10   # your scan ten years on
"""
import json
import os

import torch
from scipy import ndimage
from torchvision.utils import make_grid

import demo
import edit
import evaluate
import pictures
import truth
import utils
from predict import load_heldout, open_checkpoint, sampling_parser
from utils import InputError

YEARS = "5,10"  # --years: how many years on each slice is shown
PROGRESS_SLICES = 48  # held-out slices progressed by default, evenly picked over the split (all classes)
PROGRESS_MASKS = ("change", "none")  # --edit-mask: where progression may change a slice (default: the first)
AGE_WINDOW = 5.0  # the mean-change baseline: training slices within this many years of an age
HEIGHT_WINDOW = 0.05  # the mean-change baseline: and within this of a height
DARK_LEVEL = 90  # ventricle area: a brain pixel this dark (of 255) or darker counts whole as CSF
TISSUE_LEVEL = 120  # ventricle area: one this bright or brighter not at all; between, its share (partial volume)
CENTRAL_SHARE = 0.3  # ventricle area: pixels this share of the brain's greatest depth or deeper (scales with it)
DISEASE = "AD"  # the class whose slices the ventricle and brain area changes are averaged over, where there is one
OUTPUTS = ("progression.*", "progression_*.nii.gz", "edits/*.png")  # a run's files, replaced whole by the next


def age_covariates(sampling, ages):
    """The model's covariates for slices of these ages (years; NaN: not known), the others not given."""
    values = torch.full((len(ages), len(sampling.covariate_ranges)), float("nan"))
    values[:, utils.age_column(sampling.covariate_ranges)] = ages.float()
    return values


def progressed(sampling, x, labels, positions, ages, years, depth, guidance, mask_setting, targets=None):
    """x inverted once under its own classes, heights and ages, then decoded under each later age (ages + each of
    `years`; the targets' class where given): guided on the age (and the class) by `guidance`, and with mask_setting
    'change' decoded again inside the change mask of that first decoding (DiffEdit's masked decoding), unchanged
    outside it. Returns (N x len(years) x C x S x S slices, their feathered masks (all 1 for 'none'), the null
    reconstruction: x decoded under its own conditions)."""
    own = age_covariates(sampling, ages)
    latent, path, end = edit.inverted(sampling, x, labels, positions, depth, own)
    null = edit.decoded(sampling, latent, end, sampling.plain(labels, positions, covariates=own))
    later, masks = [], []
    for y in years:
        older = own.clone()
        older[:, utils.age_column(sampling.covariate_ranges)] += y
        asked = sampling.plain(labels if targets is None else targets, positions, guidance, older,
                               "covariates" if targets is None else "class+covariates")
        free = edit.decoded(sampling, latent, end, asked)
        if mask_setting == "none":
            later.append(free)
            masks.append(torch.ones_like(free[:, :1]))
            continue
        masks.append(edit.feathered(edit.change_mask(x.cpu(), free)[1]))
        later.append(edit.decoded(sampling, latent, end, asked, path=path, edit=masks[-1].to(sampling.device)))
    return torch.stack(later, 1), torch.stack(masks, 1), null


def mean_change(data, labels, positions, ages, years):
    """The population's mean change of each slice over `years`, as the (cross-sectional) training split shows it:
    the mean training slice of its class within HEIGHT_WINDOW of its height and AGE_WINDOW of its age + years, less
    the mean one at its age; in [-1, 1] units."""
    pool, train_ages = data.train.float() / 127.5 - 1, evaluate.heldout_ages(data)[0]
    changes = []
    for k in range(len(ages)):
        near = torch.ones(len(pool), dtype=torch.bool)
        if labels is not None and data.train_labels is not None:
            near &= data.train_labels == labels[k]
        if positions is not None and data.train_positions is not None:
            near &= (data.train_positions - positions[k]).abs() <= HEIGHT_WINDOW
        at = lambda age: pool[near & ((train_ages - age).abs() <= AGE_WINDOW)].mean(0)  # noqa: E731
        changes.append((at(ages[k] + years) - at(ages[k])).nan_to_num())
    return torch.stack(changes)


def ventricle_area(x):
    """Per slice, the ventricles' area in pixels: the CSF share of each pixel (1 at DARK_LEVEL and darker, 0 at
    TISSUE_LEVEL) summed over the brain's core, the pixels at least CENTRAL_SHARE of its greatest depth inside its
    filled outline. The core scales with the brain, so a brain that shrinks whole keeps its ventricle area."""
    lo, hi = DARK_LEVEL / 127.5 - 1, TISSUE_LEVEL / 127.5 - 1
    areas = []
    for image in x[:, 0]:
        depth = ndimage.distance_transform_edt(ndimage.binary_fill_holes((image > -0.9).numpy()))
        core = torch.from_numpy(depth >= CENTRAL_SHARE * max(depth.max(), 1.0))
        areas.append((((hi - image) / (hi - lo)).clamp(0, 1) * core).sum())
    return torch.stack(areas).float()


def against_future(x, later, future, null, baseline, labels, classes, read_age, asked_ages):
    """One horizon's figures against the truth (all [-1, 1]; mean absolute differences inside the brain, with or
    without the years): how close the progressed slices, the inputs and the mean-change baseline come to the future;
    ventricle and brain area changes beside the true ones (of DISEASE slices, where classes are known); each class's change
    beside its true change; the change outside where the years changed anything beside the null's; the probe's
    age reading of the progressed slices and of the true futures."""
    region = (x > -0.9) | (future > -0.9)
    to_uint8 = lambda a: ((a + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
    outside = ~demo.changed(to_uint8(x), to_uint8(future)) & region
    mean = lambda a, b, where: (a - b).abs()[where].mean().item()  # noqa: E731
    ad = classes.index(DISEASE) if labels is not None and DISEASE in classes else None
    disease = slice(None) if ad is None else labels == ad
    vent, brain = ventricle_area, lambda a: (a > -0.9).flatten(1).sum(1).float()  # noqa: E731
    figures = {"to_future": mean(later, future, region), "input_to_future": mean(x, future, region),
               "mean_change_to_future": mean(baseline, future, region),
               "ventricle_change": (vent(later) - vent(x))[disease].mean().item(),
               "true_ventricle_change": (vent(future) - vent(x))[disease].mean().item(),
               "mean_change_ventricle_change": (vent(baseline) - vent(x))[disease].mean().item(),
               "brain_area_change": (brain(later).sum() / brain(x).sum() - 1).item(),
               "true_brain_area_change": (brain(future).sum() / brain(x).sum() - 1).item(),
               "change_outside_true_change": mean(later, x, outside), "null_change_outside": mean(null, x, outside),
               "input_ventricles": vent(x)[disease].mean().item()}
    for k, name in enumerate(classes if labels is not None else []):
        own = (labels == k)[:, None, None, None] & region
        figures.update({f"change_{name}": mean(later, x, own), f"true_change_{name}": mean(future, x, own)})
    if read_age is not None:
        figures.update({"asked_age": asked_ages.mean().item(), "probe_age": read_age(later).mean().item(),
                        "probe_age_future": read_age(future).mean().item(),
                        "probe_age_mae": (read_age(later) - asked_ages).abs().mean().item(),
                        "probe_age_mae_future": (read_age(future) - asked_ages).abs().mean().item()})
    return figures


def heldout(data, count):
    """`count` held-out slices evenly picked over the split, as edit.Slices, with their ages (years)."""
    pick = torch.linspace(0, len(data.val) - 1, min(count, len(data.val))).round().long()
    slices = edit.Slices(data.val[pick].float() / 127.5 - 1, [pictures.slice_name(data.val_names[i])
                                                              for i in pick.tolist()],
                         None if data.val_labels is None else data.val_labels[pick],
                         None if data.val_positions is None else data.val_positions[pick])
    return slices, evaluate.heldout_ages(data)[1][pick], pick


def futures(data, pick, years):
    """The demo's rendered futures of the picked held-out slices at each of `years` ([-1, 1]), or None."""
    found = {}
    for y in years:
        future = truth.read_future(data, y)
        if future is None:
            return None
        where = {i: k for k, i in enumerate(future[0].tolist())}
        if not all(i in where for i in pick.tolist()):
            return None
        found[y] = future[1][torch.tensor([where[i] for i in pick.tolist()])].float() / 127.5 - 1
    return found


def save(slices, later, masks, years, future, out):
    """progression.png (a row a slice: the input, each horizon, the last one's difference and mask, its truth),
    progression.gif (the years, 8 slices a frame), edits/NAME_+Yy.png and a scan's progression_+Yy.nii.gz."""
    x, last = slices.images, years[-1]
    columns = {"input": x, **{f"+{y} years": later[:, k] for k, y in enumerate(years)},
               f"difference +{last}": later[:, -1] - x, f"edit mask +{last}": masks[:, -1] * 2 - 1}
    if future is not None:
        columns[f"truth +{last}"] = future[last]
    pictures.save_edits(columns, slices.names, os.path.join(out, "progression.png"),
                        f"{', '.join(f'+{y}' for y in years)} years")
    few = torch.cat([x[:8, None], later[:8]], 1)  # slices x (now, horizons)
    frames = [make_grid(few[:, k], nrow=4, padding=2)[:1] for k in range(few.shape[1])]
    pictures.save_gif(frames, os.path.join(out, "progression.gif"), duration=700)
    for k, y in enumerate(years):
        for name, image in zip(slices.names, later[:, k]):
            utils.save_png(image, os.path.join(out, "edits", f"{name}_+{y}y.png"))
        if slices.scan:
            pictures.save_stack(later[:, k], os.path.join(out, f"progression_+{y}y.nii.gz"), edit.SCAN_SLICE_MM,
                                edit.SCAN_SLICE_MM)


# ---------------------------------------------------------------- what the user asks for
def parse_settings(argv=None):
    """The run's settings and progress.py's own flags, each checked."""
    parser = sampling_parser(__doc__)
    parser.add_argument("--input", help="your slices: an image, a folder of images, or a scan (default: held-out "
                                        "slices); --age gives their age, --label their class")
    parser.add_argument("--years", default=YEARS, help="how many years on, comma-separated (e.g. 5,10)")
    parser.add_argument("--to-label", metavar="NAME", help="also as this class (e.g. AD: this slice if the disease "
                                                            "came)")
    parser.add_argument("--depth", type=float, default=edit.DEPTH, help="the share of T the slices are inverted to")
    parser.add_argument("--edit-mask", default=PROGRESS_MASKS[0], choices=PROGRESS_MASKS,
                        help="where the years may change a slice: change (where the unmasked decoding changes it "
                             "most; decoded twice), none (anywhere)")
    settings, args = utils.parse_settings(parser, argv)
    try:
        args.years = [float(y) for y in args.years.split(",")]
    except ValueError:
        args.years = []
    if not args.years or not all(0 < y <= 100 for y in args.years):
        raise InputError(f"--years {parser.parse_args(argv).years}: give years on, comma-separated, each in (0, 100] "
                         f"(e.g. 5,10)")
    args.years = [int(y) if y.is_integer() else y for y in args.years]
    if not 0 < args.depth <= 1:
        raise InputError(f"--depth must be in (0, 1] (a share of the diffusion steps), got {args.depth}")
    if args.input is None and (args.label, args.slice_position, args.age) != (None, None, None):
        raise InputError("--label, --slice-position and --age describe --input slices; held-out slices carry their "
                         "own: drop them, or pass --input")
    return settings, args


def main():
    settings, args = parse_settings()
    out = utils.fresh_folder(os.path.join(settings["OUTPUT_DIR"], "progress"), OUTPUTS)
    sampling, _, _ = open_checkpoint(settings, args, utils.get_device())
    if utils.age_column(sampling.covariate_ranges) is None:
        raise InputError("progress.py needs a model trained with an age covariate: train with --covariates age (and "
                         "a table of ages; the labelled demo has one)")
    target = None if args.to_label is None else edit.target_class(args.to_label, sampling.class_names)
    data = load_heldout(sampling) if args.input is None else None
    if data is None:
        slices = edit.given_conditions(edit.given_slices(args.input, sampling.cfg["IMAGE_SIZE"]), sampling, args)
        if sampling.ages is None:
            raise InputError("the age of the --input slices is not known: pass --age YEARS (or A:B, spread over them "
                             "in order)")
        ages = torch.linspace(*sampling.ages, len(slices.images))
    else:
        slices, ages, pick = heldout(data, PROGRESS_SLICES)
    positions = slices.positions if utils.conditions_of(sampling.cfg)[1] else None
    labels = slices.labels if sampling.class_names else None
    targets = None if target is None else torch.full((len(ages),), target, dtype=torch.long)
    guidance, years = settings["EDIT_GUIDANCE"], args.years
    print(f"progressing {len(ages)} slices by {', '.join(map(str, years))} years (depth {args.depth:g}, guidance "
          f"{guidance:g}, edit mask {args.edit_mask})")
    os.makedirs(os.path.join(out, "edits"), exist_ok=True)
    later, masks, null = utils.in_batches(
        lambda x, y, s, a, t: progressed(sampling, x, y, s, a, years, args.depth, guidance, args.edit_mask, t),
        settings["SAMPLE_BATCH"], slices.images, labels, positions, ages, targets)
    future = None if data is None else futures(data, pick, years)
    save(slices, later, masks, years, future, out)
    figures = {"years": years, "slices": len(ages), "depth": args.depth, "guidance": guidance,
               "edit_mask": args.edit_mask, "null_change": (null - slices.images).abs().mean().item()}
    if future is not None:
        probe = evaluate.probe_for(data, sampling.device)[0]
        read_age = lambda images: evaluate.read_ages(probe, images, sampling.device)  # noqa: E731
        for k, y in enumerate(years):
            baseline = slices.images + mean_change(data, labels, positions, ages, y)
            figures[f"+{y}"] = against_future(slices.images, later[:, k], future[y], null, baseline.clamp(-1, 1),
                                              labels, sampling.class_names, read_age, ages + y)
    with open(os.path.join(out, "progression.json"), "w") as f:
        json.dump(figures, f, indent=2)
    print(f"-> {out}/progression.png, progression.gif, progression.json, edits/")
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    utils.run_main(main)
