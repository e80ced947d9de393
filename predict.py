"""Generate brain slices with a trained DDPM, show the denoising process, and measure the result.

    python predict.py                              # NUM_SAMPLES images from OUTPUT_DIR/checkpoint.pt
    python predict.py --sampler ddim --sample-steps 50
    python predict.py --input my_slices/ --strength 0.5   # noise given images part-way, then denoise them
    python predict.py --label AD --slice-position 0.4:0.7 # a conditional model: AD-like slices from mid-brain
    python predict.py --slice-sweep 16 --tstr 512         # one noise through 16 heights; train-on-synthetic test

Questions about slices you hold (counterfactuals, effect maps, inpainting) are edit.py's.
"""
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from torchvision.utils import make_grid

import checkpoints
import dataset
import evaluate
import pictures
import utils
from modules import Denoiser, load_network
from utils import InputError

PROCESS_ROWS = 6  # samples shown in process.png / process.gif
PROCESS_COLUMNS = 10  # evenly spaced steps in process.png
GIF_FRAMES = 40  # frames of process.gif
DENOISE_IMAGES = 8  # held-out slices noised part way and denoised (denoise.png) when no --input is given
CONDITION_COLUMNS = 8  # conditions.png: slice positions (or samples) per class
SWEEP_FIELD_MM = 200  # slice_sweep.nii.gz: the width of the frame, in millimetres (nominal, for viewers)
SWEEP_HEIGHT_MM = 120  # slice_sweep.nii.gz: the height slice positions 0 to 1 span, in millimetres (nominal)


@dataclass
class Trained:
    """A checkpoint's network and schedule, as its configuration describes them."""
    net: torch.nn.Module  # the EMA weights (or the raw ones), for inference
    schedule: utils.NoiseSchedule
    cfg: dict  # the configuration it was trained with
    class_names: list  # its classes (empty: not class-conditional)
    step: int
    guide: torch.nn.Module | None  # the early snapshot autoguidance steers away from (None: the checkpoint has none)
    guide_step: int = 0  # the step that snapshot was taken at
    covariates: dict = field(default_factory=dict)  # its covariates: {name: (lowest, highest) training value}


def load_model(path, use_ema, device, bf16=False):
    """The checkpoint at path as a Trained model, with its early snapshot, in the memory format for bf16 or fp32
    sampling on device."""
    state = checkpoints.load_checkpoint(path)
    cfg, class_names, snapshot = state["config"], state.get("classes", []), state.get("guide")

    def network(weights):
        try:
            return load_network(cfg, len(class_names), weights, device, bf16)
        except (KeyError, RuntimeError, TypeError) as e:
            raise InputError(f"{path} does not match this project's U-Net ({str(e).splitlines()[0][:100]})") from None

    schedule = utils.NoiseSchedule(cfg["TIMESTEPS"], cfg["BETA_SCHEDULE"], cfg["PREDICTION"])
    return Trained(network(state.get("ema" if use_ema else "model")), schedule, cfg, class_names, state.get("step", 0),
                   snapshot and network(snapshot["weights"]), snapshot["step"] if snapshot else 0,
                   state.get("covariates", {}))


# ---------------------------------------------------------------- what the user asks for
MOVED_TO_EDIT = ("--to-label", "--anomaly", "--depth", "--mask", "--resample", "--jump", "--inpaint-eval")  # edit.py's


def sampling_parser(description):
    """The constants' flags and those of every script that samples from a checkpoint (predict.py, edit.py)."""
    parser = utils.build_parser(description)
    parser.add_argument("--checkpoint", help="checkpoint to load (default: OUTPUT_DIR/checkpoint.pt)")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of their EMA")
    parser.add_argument("--label", help="class-conditional models: a class name or index, or 'all' to cycle through "
                                        "the classes (default: all)")
    parser.add_argument("--slice-position", help="slice-conditional models: a position F in [0, 1] (bottom to top), "
                                                 "or A:B, spread evenly over the samples (default: 0:1)")
    parser.add_argument("--age", help="models conditioned on an age covariate: an age in years, or A:B spread evenly "
                                      "over the samples (default: not given, any age)")
    return parser


def parse_settings(argv=None):
    """The run's settings (constants and flags) and predict.py's own flags, each checked."""
    argv = sys.argv[1:] if argv is None else argv
    if moved := [a.split("=")[0] for a in argv if a.split("=")[0] in MOVED_TO_EDIT]:
        raise InputError(f"{moved[0]} is edit.py's now: python edit.py {' '.join(argv)}")
    parser = sampling_parser(__doc__)
    parser.add_argument("--input", help="images to noise part way and denoise: an image or a folder (default: 8 "
                                        "held-out slices)")
    parser.add_argument("--strength", type=float, default=0.5, help="noise level for denoising, in (0, 1]")
    parser.add_argument("--no-metrics", action="store_true", help="skip metrics.json")
    parser.add_argument("--slice-sweep", type=int, default=0, metavar="N",
                        help="slice-conditional models: also take one noise through N positions (PNG, GIF, .nii.gz)")
    parser.add_argument("--tstr", type=int, default=0, metavar="N",
                        help="class-conditional models: also train a classifier on N labelled samples and test it "
                             "on the real held-out slices")
    settings, args = utils.parse_settings(parser, argv)
    if not 0 < args.strength <= 1:
        raise InputError(f"--strength must be in (0, 1], got {args.strength}")
    if args.slice_sweep < 0 or args.tstr < 0:
        raise InputError("--slice-sweep and --tstr take a number of samples, 0 or more")
    return settings, args


def chosen_classes(label, class_names):
    """The class indices --label asks for: all of them by default."""
    if label is None or label == "all":
        return list(range(len(class_names)))
    if not class_names:
        raise InputError(f"--label {label}: this model was not trained with class conditioning (train with "
                         f"--condition class or class+slice)")
    if label in class_names:
        return [class_names.index(label)]
    if label.isdigit() and int(label) < len(class_names):
        return [int(label)]
    raise InputError(f"--label {label} is not one of this model's classes: {', '.join(class_names)} (or 0-"
                     f"{len(class_names) - 1}, or all)")


def range_given(text):
    """The numbers of 'F' or 'A:B' as a list of one or two floats; [] where the text is neither."""
    try:
        ends = [float(v) for v in text.split(":")]
    except ValueError:
        return []
    return ends if len(ends) in (1, 2) else []


def chosen_positions(text, by_slice):
    """(A, B) from --slice-position F or A:B (default 0:1); None for a model without slice conditioning."""
    if text is None:
        return (0.0, 1.0) if by_slice else None
    if not by_slice:
        raise InputError(f"--slice-position {text}: this model was not trained with slice conditioning (train with "
                        f"--condition slice or class+slice)")
    ends = range_given(text)
    if not ends or not all(0 <= v <= 1 for v in ends):
        raise InputError(f"--slice-position {text}: give a position in [0, 1] (0 bottom, 1 top) or a range A:B")
    return ends[0], ends[-1]


def chosen_ages(text, covariates):
    """(A, B) from --age A or A:B; None where not asked. Refused for a model without an age covariate; outside the
    trained range, a notice names it."""
    if text is None:
        return None
    column = utils.age_column(covariates)
    if column is None:
        raise InputError(f"--age {text}: this model was not trained with an age covariate (train with --covariates "
                         f"age and a table of ages)")
    ends = range_given(text)
    if not ends or not all(math.isfinite(v) for v in ends):
        raise InputError(f"--age {text}: give an age in years (75) or a range A:B (60:90)")
    lo, hi = list(covariates.values())[column]
    if min(ends) < lo or max(ends) > hi:
        print(f"notice: --age {text} is outside the ages this model was trained on ({lo:g} to {hi:g}): the samples "
              f"extrapolate")
    return ends[0], ends[-1]


def check_extras(args, class_names, by_slice):
    """--slice-sweep and --tstr only make sense for models with the matching condition."""
    if args.slice_sweep and not by_slice:
        raise InputError("--slice-sweep: this model was not trained with slice conditioning")
    if args.tstr and not class_names:
        raise InputError("--tstr: this model was not trained with class conditioning")


# ---------------------------------------------------------------- sampling
@dataclass
class Sampling:
    """A trained model and how this run samples from it."""
    net: torch.nn.Module  # the model, compiled where COMPILE asks
    schedule: utils.NoiseSchedule
    cfg: dict  # the checkpoint's configuration
    settings: dict  # this run's settings
    device: torch.device
    guide: torch.nn.Module | None = None  # the early snapshot autoguidance steers away from (None: no autoguidance)
    bf16: bool = False  # bf16 autocast (BF16 on this device)
    class_names: list = field(default_factory=list)  # the checkpoint's classes (empty: not class-conditional)
    labels: list = field(default_factory=list)  # the class indices --label asks for (empty: no class)
    positions: tuple | None = None  # the range of slice positions --slice-position asks for (None: no position)
    covariate_ranges: dict = field(default_factory=dict)  # the checkpoint's covariates: {name: (lowest, highest)}
    ages: tuple | None = None  # the range of ages --age asks for (None: not given)

    def steps(self):
        """Network evaluations of the sampler along the way: T for ddpm, SAMPLE_STEPS otherwise."""
        return self.cfg["TIMESTEPS"] if self.settings["SAMPLER"] == "ddpm" else self.settings["SAMPLE_STEPS"]

    def noise(self, n, gen):
        return torch.randn((n, self.cfg["CHANNELS"], self.cfg["IMAGE_SIZE"], self.cfg["IMAGE_SIZE"]), generator=gen,
                           device=self.device)

    def scaled(self, covariates):
        """Covariates in their own units (N x K, NaN: not given) as the model takes them; None stays None."""
        if covariates is None:
            return None
        return utils.scaled_covariates(covariates, list(self.covariate_ranges.values())).to(self.device)

    def spread_covariates(self, n):
        """The covariates for n samples: the ages --age asks for, spread evenly; the others not given (None: none)."""
        if self.ages is None:
            return None
        values = torch.full((n, len(self.covariate_ranges)), math.nan)
        values[:, utils.age_column(self.covariate_ranges)] = torch.linspace(*self.ages, n)
        return values

    def denoiser(self, labels=None, positions=None, covariates=None):
        """What the samplers call for these conditions (None: not given; covariates in their own units): guided,
        autoguided, in bf16 where asked."""
        to = lambda c: None if c is None else c.to(self.device)  # noqa: E731
        return Denoiser(self.net, to(labels), to(positions), self.settings["GUIDANCE"], self.guide,
                        self.settings["AUTOGUIDANCE"], self.bf16, covariates=self.scaled(covariates))

    def plain(self, labels=None, positions=None, guidance=1.0, covariates=None, guided="class"):
        """The model alone for these conditions, in fp32 (what DDIM inversion and its decoding need): no autoguidance,
        classifier-free guidance (on the class only, or what `guided` names) where guidance is not 1."""
        to = lambda c: None if c is None else c.to(self.device)  # noqa: E731
        return Denoiser(self.net, to(labels), to(positions), guidance, guided=guided,
                        covariates=self.scaled(covariates))

    def sample(self, noise, labels=None, positions=None, callback=None, generator=None, start_t=None, covariates=None):
        """Samples from the given starting noise (at step start_t, default T-1) for these conditions, with the run's
        sampler."""
        s = self.settings
        return self.schedule.sample(self.denoiser(labels, positions, covariates), sampler=s["SAMPLER"],
                                    steps=s["SAMPLE_STEPS"],
                                    eta=s["DDIM_ETA"], x=noise, start_t=start_t, generator=generator,
                                    device=self.device, callback=callback, spacing=s["STEP_SPACING"]).float().cpu()


def generate(sampling, n, out, labels=None, positions=None, covariates=None):
    """n images in batches of SAMPLE_BATCH for these conditions, saved one by one and as grid.png; returns them and
    the snapshots of the first batch's process."""
    gen = torch.Generator(device=sampling.device).manual_seed(sampling.settings["SEED"])
    batch, samples, frames = sampling.settings["SAMPLE_BATCH"], [], []
    for start in range(0, n, batch):
        x = sampling.noise(min(batch, n - start), gen)
        if not start:  # the first batch's process, from its noise on
            frames.append(x[:PROCESS_ROWS].cpu())
        keep = (lambda i, total, x_t, x0: frames.append(x_t[:PROCESS_ROWS].float().cpu())) if not start else None
        part = [None if c is None else c[start:start + len(x)] for c in (labels, positions, covariates)]
        samples.append(sampling.sample(x, *part[:2], callback=keep, generator=gen, covariates=part[2]))
    samples = torch.cat(samples)
    utils.fresh_folder(out, ("sample_*.png",))  # no sample of a longer earlier run stays beside these
    for i, img in enumerate(samples):
        utils.save_png(img, os.path.join(out, f"sample_{i:03d}.png"))
    utils.save_png(samples, os.path.join(out, "grid.png"))
    return samples, frames


def same_noise(sampling, labels, positions):
    """One sample per (label, position) pair, all from the same noise and the same noise on the way (seed SEED)."""
    images = []
    for i in range(len(positions)):
        gen = torch.Generator(device=sampling.device).manual_seed(sampling.settings["SEED"])
        images.append(sampling.sample(sampling.noise(1, gen), None if labels is None else labels[i:i + 1],
                                      positions[i:i + 1], generator=gen))
    return torch.cat(images)


# ---------------------------------------------------------------- pictures
def conditions_grid(sampling, by_slice, out):
    """conditions.png: rows are the classes, columns slice positions from bottom to top (or more samples)."""
    rows = sampling.class_names or ["any class"]
    positions = torch.linspace(0.05, 0.95, CONDITION_COLUMNS) if by_slice else None
    labels = torch.arange(len(rows)).repeat_interleave(CONDITION_COLUMNS) if sampling.class_names else None
    gen = torch.Generator(device=sampling.device).manual_seed(sampling.settings["SEED"])
    images = sampling.sample(sampling.noise(len(rows) * CONDITION_COLUMNS, gen), labels,
                             positions.repeat(len(rows)) if by_slice else None, generator=gen)
    columns = [f"{p:.2f}" for p in positions.tolist()] if by_slice else [str(i + 1) for i in range(CONDITION_COLUMNS)]
    pictures.save_labelled_grid(images, rows, columns, os.path.join(out, "conditions.png"),
                       ("slice position, bottom to top" if by_slice else "samples")
                       + f" (guidance {sampling.settings['GUIDANCE']:g})")


def ages_grid(sampling, out):
    """conditions_age.png: rows are the classes (at mid-height on slice-conditional models), columns ages over the
    trained range; each row one noise and the deterministic dpm++ sampler, so that the columns show the same brain
    at other ages."""
    rows = sampling.class_names or ["any class"]
    lo, hi = sampling.covariate_ranges[list(sampling.covariate_ranges)[utils.age_column(sampling.covariate_ranges)]]
    ages = torch.linspace(lo, hi, CONDITION_COLUMNS)
    covariates = torch.full((len(rows) * CONDITION_COLUMNS, len(sampling.covariate_ranges)), math.nan)
    covariates[:, utils.age_column(sampling.covariate_ranges)] = ages.repeat(len(rows))
    labels = torch.arange(len(rows)).repeat_interleave(CONDITION_COLUMNS) if sampling.class_names else None
    positions = torch.full((len(covariates),), 0.5) if utils.conditions_of(sampling.cfg)[1] else None
    gen = torch.Generator(device=sampling.device).manual_seed(sampling.settings["SEED"])
    noise = sampling.noise(len(rows), gen).repeat_interleave(CONDITION_COLUMNS, 0)
    images = sampling.schedule.sample(sampling.denoiser(labels, positions, covariates), sampler="dpm++",
                                      steps=sampling.settings["SAMPLE_STEPS"], x=noise, device=sampling.device,
                                      spacing=sampling.settings["STEP_SPACING"]).float().cpu()
    pictures.save_labelled_grid(images, rows, [f"{a:.0f}" for a in ages.tolist()],
                                os.path.join(out, "conditions_age.png"),
                                f"age in years, one noise per row (guidance {sampling.settings['GUIDANCE']:g})")


def slice_sweep(sampling, n, out):
    """One starting noise through n slice positions, for each chosen class: slice_sweep.png (rows are the
    classes), slice_sweep.gif, and slice_sweep[_CLASS].nii.gz stacks that open in an MRI viewer."""
    names = [sampling.class_names[c] for c in sampling.labels] if sampling.labels else [None]
    labels = torch.tensor(sampling.labels).repeat_interleave(n) if sampling.labels else None
    images = same_noise(sampling, labels, torch.linspace(0, 1, n).repeat(len(names)))
    strips = images.view(len(names), n, *images.shape[1:])
    utils.save_png(images, os.path.join(out, "slice_sweep.png"), nrow=n)
    pictures.save_gif([make_grid(strips[:, i], nrow=len(names), padding=2)[:1] for i in range(n)],
             os.path.join(out, "slice_sweep.gif"), duration=150)
    pixel, step = SWEEP_FIELD_MM / sampling.cfg["IMAGE_SIZE"], SWEEP_HEIGHT_MM / max(1, n - 1)
    for name, strip in zip(names, strips):
        pictures.save_stack(strip, os.path.join(out, f"slice_sweep{'_' + name if name else ''}.nii.gz"), pixel, step)


def noise_and_restore(sampling, images, strength, out):
    """Noise each image to step strength*T, denoise it back with the sampler (unconditionally); writes input | noised
    | result rows."""
    device = sampling.device
    gen = torch.Generator(device=device).manual_seed(sampling.settings["SEED"])
    x0 = images.to(device).float() / 127.5 - 1
    start_t = max(0, round(strength * sampling.schedule.timesteps) - 1)
    noise = torch.randn(x0.shape, generator=gen, device=device)
    noised = sampling.schedule.q_sample(x0, torch.full((len(x0),), start_t, device=device), noise)
    result = sampling.sample(noised, start_t=start_t, generator=gen)
    for i, img in enumerate(result):
        utils.save_png(img, os.path.join(out, f"denoised_{i:03d}.png"))
    triples = torch.stack([x0.cpu(), noised.clamp(-1, 1).cpu(), result], dim=1).flatten(0, 1)
    utils.save_png(triples, os.path.join(out, "denoise.png"), nrow=3)
    return result


# ---------------------------------------------------------------- measuring
def measure(sampling, samples, cond, data, tstr):
    """metrics.json's figures: fidelity, diversity and memorisation; for conditional models the probe's reading of
    the conditions asked for (cond); with tstr > 0 the train-on-synthetic test on that many new samples."""
    result = evaluate.metrics(samples, data, sampling.device)
    labels, positions, covariates = cond
    if any(c is not None for c in cond):
        ages = None if covariates is None else covariates[:, utils.age_column(sampling.covariate_ranges)]
        result.update(evaluate.control(samples, labels, positions, data, sampling.device, ages))
    if tstr:
        labels, positions = utils.spread_conditions(tstr, list(range(len(data.classes))), sampling.positions)
        out = os.path.join(sampling.settings["OUTPUT_DIR"], "predict", "tstr")
        images, _ = generate(sampling, tstr, out, labels, positions)
        result.update(evaluate.train_on_synthetic(images, labels, data, sampling.device))
    return result


def open_checkpoint(settings, args, device):
    """The Sampling this run asks for (with the classes and positions asked for), the checkpoint's path and step;
    says what it loaded."""
    path = args.checkpoint or os.path.join(settings["OUTPUT_DIR"], "checkpoint.pt")
    bf16 = utils.wants_bf16(settings, device)
    trained = load_model(path, not args.no_ema, device, bf16)
    if trained.guide is None and settings["AUTOGUIDANCE"] != 1:
        print(f"notice: {path} holds no early snapshot (trained before autoguidance, or stopped before GUIDE_AT): "
              f"sampling without autoguidance")
        settings["AUTOGUIDANCE"] = 1.0
    cfg, by_slice = trained.cfg, utils.conditions_of(trained.cfg)[1]
    compiled = (lambda m: torch.compile(m) if utils.wants_compile(settings, device) else m)  # noqa: E731
    sampling = Sampling(compiled(trained.net), trained.schedule, cfg, settings, device,
                        trained.guide and compiled(trained.guide), bf16, trained.class_names,
                        chosen_classes(args.label, trained.class_names), chosen_positions(args.slice_position, by_slice),
                        trained.covariates, chosen_ages(args.age, trained.covariates))
    print(f"{path}: step {trained.step:,}, {cfg['IMAGE_SIZE']} px, {settings['SAMPLER']} with {sampling.steps()} steps, "
          f"{device}" + (", bf16" if bf16 else "")
          + (f", condition {cfg['CONDITION']} (guidance {settings['GUIDANCE']:g})" if cfg["CONDITION"] != "none" else "")
          + (", covariates " + ", ".join(f"{k} ({lo:g}-{hi:g})" for k, (lo, hi) in trained.covariates.items())
             if trained.covariates else "")
          + (f", autoguidance {settings['AUTOGUIDANCE']:g} from step {trained.guide_step:,}"
             if settings["AUTOGUIDANCE"] != 1 else ""))
    return sampling, path, trained.step


def load_heldout(sampling):
    """The data the checkpoint was trained on (or DATA_DIR, where the command line names another folder)."""
    cfg, asked = sampling.cfg, sampling.settings["DATA_DIR"]
    return dataset.load_data(dict(cfg, DATA_DIR=asked if asked != utils.DATA_DIR else cfg["DATA_DIR"]))


def main():
    settings, args = parse_settings()
    out = utils.fresh_folder(os.path.join(settings["OUTPUT_DIR"], "predict"))  # writable, before any sampling
    sampling, path, step = open_checkpoint(settings, args, utils.get_device())
    by_slice = utils.conditions_of(sampling.cfg)[1]
    check_extras(args, sampling.class_names, by_slice)
    cond = (*utils.spread_conditions(settings["NUM_SAMPLES"], sampling.labels, sampling.positions),
            sampling.spread_covariates(settings["NUM_SAMPLES"]))

    started = time.perf_counter()
    samples, frames = generate(sampling, settings["NUM_SAMPLES"], out, *cond)
    seconds = time.perf_counter() - started
    print(f"{len(samples)} samples in {seconds:.1f} s ({len(samples) / seconds:.2f} images/s) -> {out}/grid.png")
    pictures.save_process(frames, out, PROCESS_COLUMNS, GIF_FRAMES)
    if sampling.class_names or by_slice:
        conditions_grid(sampling, by_slice, out)
        print(f"samples by condition -> {out}/conditions.png")
    if utils.age_column(sampling.covariate_ranges) is not None:
        ages_grid(sampling, out)
        print(f"one noise per row through the trained ages -> {out}/conditions_age.png")
    if args.slice_sweep:
        slice_sweep(sampling, args.slice_sweep, out)
        print(f"one noise through {args.slice_sweep} slice positions -> {out}/slice_sweep.png, .gif, .nii.gz")

    data = load_heldout(sampling) if args.input is None or not args.no_metrics else None
    images = dataset.read_folder(args.input, sampling.cfg["IMAGE_SIZE"]) if args.input else data.val[:DENOISE_IMAGES]
    noise_and_restore(sampling, images[:settings["SAMPLE_BATCH"]], args.strength, out)
    print(f"denoised {min(len(images), settings['SAMPLE_BATCH'])} images at strength {args.strength} -> "
          f"{out}/denoise.png")

    if not args.no_metrics:
        result = measure(sampling, samples, cond, data, args.tstr)
        result.update(sampler=settings["SAMPLER"], steps=sampling.steps(), guidance=settings["GUIDANCE"],
                      autoguidance=settings["AUTOGUIDANCE"], bf16=sampling.bf16, images_per_s=len(samples) / seconds,
                      checkpoint=path, step=step)
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(result, f, indent=2)
        print("\n".join(f"  {k:32s} {v:.4f}" if isinstance(v, float) else f"  {k:32s} {v}"
                        for k, v in result.items()))

if __name__ == "__main__":
    utils.run_main(main)
