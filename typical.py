"""How typical is this slice, to a trained model: its likelihood in bits per dimension (the variational bound,
likelihood.py), where in the slice the bits go, an out-of-distribution score with a plain verdict (quality control
before training on, or asking questions about, a scan), and, for a class-conditional model, the class under which the
slice is most likely (a diffusion classifier, Li et al. 2023) beside the probe network's reading.

    python typical.py                          # 64 held-out slices scored
    python typical.py --input scan.nii.gz      # your scan: each slice's score and verdict, and the scan's
    python typical.py --corruptions            # the score against corrupted held-out slices: AUROC per corruption
"""
import csv
import json
import math
import os
import textwrap
import time
from dataclasses import dataclass

import torch

import corruptions
import edit
import evaluate
import likelihood
import pictures
import utils
from cohorts import subject_of
from predict import load_heldout, open_checkpoint, sampling_parser
from utils import InputError

SCORED_SLICES = 64  # held-out slices scored when no --input is given, evenly picked
CALIBRATION_SLICES = 160  # held-out slices whose scores set the typical range (cached beside the checkpoint)
QUANTILE = 0.99  # the verdict's threshold: this quantile of the calibration slices' scores
OOD_METHOD = "denoising"  # the score (ood_score: METHODS), chosen by --corruptions (docs/typical.md)
METHODS = ("all", "reconstruction", "denoising", "rms", "bits")  # --corruptions measures each
RECON_LEVELS = (0.1, 0.25, 0.4, 0.55, 0.7)  # reconstruction (Graham et al. 2023): shares of T each slice is noised to
RECON_STEPS = 8  # and the DDIM steps it is brought back in, with nothing given
SCAN_SHARE = 0.1  # a scan (or held-out subject) is atypical when more than this share of its slices is
SHOWN = 4  # typical.png: the most and the least typical slices, this many each
EVAL_SLICES = 64  # --corruptions: clean held-out slices (and as many of each corruption) scored
TINY = 1e-6  # floor of a level's nats before its logarithm (a blank slice denoises perfectly)
SCORING_OUTPUTS = ("typical.*",)  # a scoring run's files, replaced whole by the next
CORRUPTION_OUTPUTS = ("corruptions.*",)  # --corruptions' files, likewise


@dataclass
class Scores:
    """Each slice's likelihood under the model with nothing given, and under each class where it has classes."""
    bits: torch.Tensor  # N: bits per dimension
    stderr: torch.Tensor  # N: their standard error (the steps drawn, the noise)
    levels: torch.Tensor  # N x strata: the bound's nats spent in each band of noise levels
    pixels: torch.Tensor  # N x 1 x S x S: bits per pixel
    class_bits: torch.Tensor | None = None  # N x classes: bits per dimension under each class (height as known)
    recon: torch.Tensor | None = None  # N x RECON_LEVELS: mean squared error of the slice reconstructed from each


@dataclass
class Calibration:
    """The typical range: held-out slices' level and bit statistics, and the verdict's threshold."""
    mean: list  # per level: mean of log nats
    std: list  # per level: their spread
    bits_mean: float
    bits_std: float
    threshold: float = math.inf  # QUANTILE of the calibration slices' scores under OOD_METHOD


def scored(sampling, x, positions=None, seed=0, per_class=False, reconstruct=OOD_METHOD in ("all", "reconstruction",
                                                                                          "rms")):
    """Scores of slices x in [-1, 1] (on the model's device in batches of SAMPLE_BATCH), with per_class also under each
    class (and the heights given), with reconstruct also their reconstruction errors; every slice sees the same steps
    and noises for a seed, under every condition, so that the classes compare paired."""
    dims = x[0].numel()
    net, schedule, classes = sampling.net, sampling.schedule, len(sampling.class_names) if per_class else 0

    def batch(xb, sb):
        xb = xb.to(sampling.device)
        sb = None if sb is None else sb.to(sampling.device)
        b = likelihood.bound(schedule, net, xb, seed=seed)
        per_class = [likelihood.bound(schedule, net, xb, torch.full((len(xb),), c, device=xb.device), sb,
                                      seed=seed).bits_per_dim(dims)[0] for c in range(classes)]
        bits, err = b.bits_per_dim(dims)
        unasked = bits[:, None]  # in_batches joins every part: a stand-in for the parts not asked for, dropped below
        found = (bits, err, b.levels, b.pixels / math.log(2), torch.stack(per_class, 1) if classes else unasked,
                 reconstruction_errors(sampling, xb, seed) if reconstruct else unasked)
        return tuple(t.cpu() for t in found)

    parts = utils.in_batches(batch, sampling.settings["SAMPLE_BATCH"], x, positions)
    return Scores(*parts[:4], parts[4] if classes else None, parts[5] if reconstruct else None)


def reconstruction_errors(sampling, x, seed):
    """Graham et al. (2023)'s multi-level reconstruction: x noised to each of RECON_LEVELS (seeded noise), brought back
    with DDIM in RECON_STEPS with nothing given, and the mean squared error to x of each: N x len(RECON_LEVELS). A
    slice unlike the training data comes back as the model's idea of a brain, far from where it started."""
    gen, schedule, denoise = torch.Generator().manual_seed(seed + 1), sampling.schedule, sampling.plain()
    errors = []
    for share in RECON_LEVELS:
        t = round(share * (schedule.timesteps - 1))
        xt = schedule.q_sample(x, torch.full((len(x),), t, device=x.device),
                               torch.randn(x.shape, generator=gen).to(x.device))
        back = schedule.sample(denoise, sampler="ddim", steps=RECON_STEPS, x=xt, start_t=t, device=x.device)
        errors.append((back - x).pow(2).flatten(1).mean(1))
    return torch.stack(errors, 1)


def features(scores):
    """Each slice's per-level errors as one vector, in logarithms: the bound's bands, then the reconstructions where
    scored."""
    return torch.cat([scores.levels] + ([] if scores.recon is None else [scores.recon]), 1).clamp(min=TINY).log()


def calibrate(scores):
    """The Calibration these (held-out) slices' scores give, its threshold at their QUANTILE."""
    logs = features(scores)
    cal = Calibration(logs.mean(0).tolist(), logs.std(0).clamp(min=1e-3).tolist(), scores.bits.mean().item(),
                      max(scores.bits.std().item(), 1e-3))
    cal.threshold = ood_score(scores, cal).quantile(QUANTILE).item()
    return cal


def ood_score(scores, cal, method=OOD_METHOD):
    """How far each slice is from the typical range, two-sided (too easy to denoise is as suspect as too hard): the
    largest |z-score| of its per-level errors (one level off is enough): of both kinds ('all'), of the reconstructions
    or the bound's bands alone ('reconstruction', 'denoising'), the root mean square of all ('rms'); or the |z| of its
    bits per dimension ('bits')."""
    z = (features(scores) - torch.tensor(cal.mean)) / torch.tensor(cal.std)
    bands = scores.levels.shape[1]
    if method == "bits":
        return ((scores.bits - cal.bits_mean) / cal.bits_std).abs()
    if method == "rms":
        return z.pow(2).mean(1).sqrt()
    return {"all": z, "reconstruction": z[:, bands:], "denoising": z[:, :bands]}[method].abs().amax(1)


def calibration(sampling, data, checkpoint, step, seed):
    """The Calibration of this checkpoint on CALIBRATION_SLICES held-out slices, cached beside it (made once)."""
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "typical_calibration.json")
    key = {"checkpoint": os.path.basename(checkpoint), "step": step, "seed": seed, "slices": CALIBRATION_SLICES,
           "strata": likelihood.STRATA, "draws": likelihood.DRAWS, "method": OOD_METHOD, "quantile": QUANTILE,
           "reconstruction": [list(RECON_LEVELS), RECON_STEPS]}  # as JSON gives it back
    if os.path.isfile(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return Calibration(**cached["calibration"])
    pick = evenly(len(data.val), CALIBRATION_SLICES)
    print(f"measuring the typical range on {len(pick)} held-out slices (cached in {utils.show_path(path)})...",
          flush=True)
    cal = calibrate(scored(sampling, data.val[pick].float() / 127.5 - 1, seed=seed))
    try:
        with open(path, "w") as f:
            json.dump({"key": key, "calibration": cal.__dict__}, f, indent=1)
    except OSError:
        print(f"notice: cannot cache the typical range in {utils.show_path(path)}: measured again next time")
    return cal


def evenly(n, count):
    return torch.linspace(0, n - 1, min(n, count)).round().long().unique()


# ---------------------------------------------------------------- outputs
def verdicts(score, threshold):
    return ["atypical" if s > threshold else "typical" for s in score.tolist()]


def write_table(path, names, scores, score, threshold, classes, probe_read):
    """typical.csv: a row a slice, its bits/dim (and error), score, verdict, and the classes' readings."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slice", "bits_per_dim", "bits_stderr", "ood_score", "verdict"]
                   + [f"bits_per_dim_{c}" for c in classes] + (["diffusion_class", "probe_class"] if classes else []))
        for i, name in enumerate(names):
            row = [name, f"{scores.bits[i]:.4f}", f"{scores.stderr[i]:.4f}", f"{score[i]:.3f}",
                   verdicts(score[i:i + 1], threshold)[0]]
            if classes:
                row += [f"{b:.4f}" for b in scores.class_bits[i].tolist()]
                row += [classes[scores.class_bits[i].argmin()], classes[probe_read[i]]]
            w.writerow(row)


def save_picture(x, names, scores, score, path):
    """typical.png: the SHOWN most typical slices and the SHOWN least, each beside its bits-per-pixel map."""
    order = score.argsort()
    rows = torch.cat([order[:SHOWN], order[-SHOWN:]]).unique_consecutive() if len(order) > 2 * SHOWN else order
    labels = [f"{pictures.row_label(names[i], 14)} {score[i]:.1f}" for i in rows.tolist()]
    pictures.save_edits({"input": x[rows], "bits map": scores.pixels[rows]}, labels, path,
                        "most typical (top) to least: name, score", rows=len(rows), as_named=True)


def per_scan(names, score, threshold, scan):
    """{scan or subject: {slices, atypical share, verdict}}."""
    groups = {}
    for name, s in zip(names, score.tolist()):
        groups.setdefault(scan or subject_of(name), []).append(s > threshold)
    return {k: {"slices": len(v), "atypical_share": sum(v) / len(v),
                "verdict": "atypical" if sum(v) / len(v) > SCAN_SHARE else "typical"} for k, v in groups.items()}


# ---------------------------------------------------------------- the corruptions measured
def auroc(clean, corrupt):
    from torchmetrics.functional.classification import binary_auroc
    return binary_auroc(torch.cat([clean, corrupt]), torch.cat([torch.zeros(len(clean)), torch.ones(len(corrupt))]
                                                                ).long()).item()


def split_subjects(names):
    """Held-out slice indices in two halves by subject (alternate subjects): calibration, evaluation."""
    subjects = sorted({subject_of(n) for n in names})
    first = set(subjects[::2])
    a = [i for i, n in enumerate(names) if subject_of(n) in first]
    b = [i for i, n in enumerate(names) if subject_of(n) not in first]
    return torch.tensor(a), torch.tensor(b)


def corruption_eval(sampling, data, seed, out):
    """corruptions.json: AUROC of each OOD method for each corruption and level (calibrated on half the held-out
    subjects, measured on the other half), training beside held-out bits/dim, and the diffusion classifier beside the
    probe; corruptions.png: one slice under each corruption with its score."""
    if len(data.val) < 4:
        raise InputError(f"--corruptions needs held-out slices; {utils.show_path(data.root)} has {len(data.val)}")
    half_a, half_b = split_subjects(data.val_names) if data.val_names else (torch.arange(0, len(data.val), 2),
                                                                             torch.arange(1, len(data.val), 2))
    to_float = lambda u8: u8.float() / 127.5 - 1  # noqa: E731
    cal_scores = scored(sampling, to_float(data.val[half_a[evenly(len(half_a), CALIBRATION_SLICES)]]), seed=seed,
                        reconstruct=True)
    cal = calibrate(cal_scores)
    pick = half_b[evenly(len(half_b), EVAL_SLICES)]
    clean_x = to_float(data.val[pick])
    clean = scored(sampling, clean_x, seed=seed, reconstruct=True)
    methods = METHODS
    gen = torch.Generator().manual_seed(seed)
    figures, shown = {}, {"clean": (clean_x[:1], ood_score(clean, cal)[0].item())}
    for name, levels in corruptions.CORRUPTIONS.items():
        for level, corrupt in levels.items():
            x = corrupt(clean_x, gen)
            s = scored(sampling, x, seed=seed, reconstruct=True)
            figures[f"{name} ({level})"] = {m: auroc(ood_score(clean, cal, m), ood_score(s, cal, m)) for m in methods}
            figures[f"{name} ({level})"]["flagged"] = (ood_score(s, cal) > cal.threshold).float().mean().item()
            shown[f"{name} ({level})"] = (x[:1], ood_score(s, cal)[0].item())
            print(f"{name} ({level}): AUROC " + ", ".join(f"{m} {v:.3f}" for m, v in figures[name + f' ({level})']
                                                           .items()), flush=True)
    train = scored(sampling, to_float(data.train[evenly(len(data.train), EVAL_SLICES)]), seed=seed)
    result = {"calibration_slices": len(cal_scores.bits), "eval_slices": len(pick), "method": OOD_METHOD,
              "clean_flagged": (ood_score(clean, cal) > cal.threshold).float().mean().item(), "auroc": figures,
              "bits_per_dim": {"train": train.bits.mean().item(), "heldout": clean.bits.mean().item(),
                               "heldout_over_train": clean.bits.mean().item() / train.bits.mean().item(),
                               "stderr_mean": clean.stderr.mean().item()}}
    if sampling.class_names and data.val_labels is not None:
        every = evenly(len(data.val), 2 * EVAL_SLICES)
        positions = data.val_positions[every] if utils.conditions_of(sampling.cfg)[1] else None
        read = scored(sampling, to_float(data.val[every]), positions, seed, per_class=True).class_bits.argmin(1)
        probe = evaluate.probe_for(data, sampling.device)[0]
        probe_read = evaluate.read_slices(probe, data.val[every], sampling.device)[1]
        truth = data.val_labels[every]
        result["classifier"] = {"slices": len(every), "diffusion_accuracy": (read == truth).float().mean().item(),
                                "probe_accuracy": (probe_read == truth).float().mean().item()}
    images = torch.cat([v[0] for v in shown.values()])
    labels = [f"{textwrap.fill(k, 14)}\nscore {v[1]:.1f}" for k, v in shown.items()]
    pictures.save_labelled_grid(images, [""], labels, os.path.join(out, "corruptions.png"),
                                f"one held-out slice corrupted, its OOD score (threshold {cal.threshold:.2f})",
                                label_lines=max(label.count("\n") + 1 for label in labels))
    with open(os.path.join(out, "corruptions.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"-> {out}/corruptions.json, corruptions.png")
    print(json.dumps({k: v for k, v in result.items() if k != "auroc"}, indent=1))


# ---------------------------------------------------------------- what the user asks for
def parse_settings(argv=None):
    """The run's settings and typical.py's own flags, each checked."""
    parser = sampling_parser(__doc__)
    parser.add_argument("--input", help="slices to score: an image, a folder of images, or a scan (default: "
                                        f"{SCORED_SLICES} held-out slices)")
    parser.add_argument("--corruptions", action="store_true",
                        help="measure the score against corrupted held-out slices (AUROC per corruption)")
    parser.add_argument("--read-class", action="store_true",
                        help="class-conditional models: also the class each slice is most likely under")
    settings, args = utils.parse_settings(parser, argv)
    if args.corruptions and args.input:
        raise InputError("--corruptions corrupts held-out slices; it takes no --input: drop one of them")
    if args.age is not None:
        raise InputError("--age: typical.py scores slices with nothing given (and, for --read-class, under each "
                         "class); drop --age")
    return settings, args


def main():
    settings, args = parse_settings()
    out = utils.fresh_folder(os.path.join(settings["OUTPUT_DIR"], "typical"),
                             CORRUPTION_OUTPUTS if args.corruptions else SCORING_OUTPUTS)
    sampling, path, step = open_checkpoint(settings, args, utils.get_device())
    if args.read_class and not sampling.class_names:
        raise InputError("--read-class: this model was not trained with class conditioning (train with --condition "
                         "class or class+slice)")
    seed = settings["SEED"]
    data = load_heldout(sampling)
    if args.corruptions:
        return corruption_eval(sampling, data, seed, out)
    if args.input is None:
        pick = evenly(len(data.val), SCORED_SLICES)
        names = [data.val_names[i] if data.val_names else f"heldout_{i}" for i in pick.tolist()]
        slices = edit.Slices(data.val[pick].float() / 127.5 - 1, names, positions=None if data.val_positions is None
                             else data.val_positions[pick])
    else:
        slices = edit.given_slices(args.input, sampling.cfg["IMAGE_SIZE"])
        if args.read_class:  # the heights the per-class bounds are given
            slices = edit.given_conditions(slices, sampling, args)
    cal = calibration(sampling, data, path, step, seed)
    started = time.perf_counter()
    positions = slices.positions if utils.conditions_of(sampling.cfg)[1] else None
    scores = scored(sampling, slices.images, positions, seed, args.read_class)
    seconds = time.perf_counter() - started
    score = ood_score(scores, cal)
    classes = sampling.class_names if args.read_class else []
    probe_read = None
    if classes:
        probe = evaluate.probe_for(data, sampling.device)[0]
        probe_read = evaluate.read_slices(probe, ((utils.to_unit(slices.images) * 255).round()).to(torch.uint8),
                                          sampling.device)[1].tolist()
    write_table(os.path.join(out, "typical.csv"), slices.names, scores, score, cal.threshold, classes, probe_read)
    save_picture(slices.images, slices.names, scores, score, os.path.join(out, "typical.png"))
    flagged = int((score > cal.threshold).sum())
    summary = {"slices": len(score), "seconds": seconds, "bits_per_dim_mean": scores.bits.mean().item(),
               "bits_stderr_mean": scores.stderr.mean().item(), "threshold": cal.threshold, "method": OOD_METHOD,
               "atypical": flagged, "scans": per_scan(slices.names, score, cal.threshold, slices.scan)}
    with open(os.path.join(out, "typical.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"{len(score)} slices scored in {seconds:.1f} s: {scores.bits.mean():.3f} bits/dim on average (standard "
          f"error {scores.stderr.mean():.3f}); {flagged} atypical (score above {cal.threshold:.2f}, the held-out "
          f"{QUANTILE:.0%})")
    print(f"-> {out}/typical.csv, typical.png, typical.json")


if __name__ == "__main__":
    utils.run_main(main)
