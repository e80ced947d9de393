"""The knobs and the noise schedule shared by train.py and predict.py.

Edit the constants below, or override any of them on the command line
(`python train.py --image-size 64 --channel-mult 1,2,2`).
"""
import argparse
import functools
import math
import os
import re
import sys

import torch

# ---------------------------------------------------------------- constants
# Data
DATA_DIR = "data"  # dataset folder: OASIS, ADNI or any image folder; the demo is built here when empty
OUTPUT_DIR = "outputs"  # checkpoints, sample PNGs, plots and logs
IMAGE_SIZE = 128  # side of the square images the model sees (a multiple of 2**(len(CHANNEL_MULT)-1))
CHANNELS = 1  # image channels (grayscale MRI)
HFLIP = False  # random horizontal flips during training
OASIS_TRAIN_ON_TEST = False  # OASIS: also train on the test split, as earlier projects did
CONDITION = "none"  # what generation can be asked for: 'none' | 'class' (e.g. AD/NC) | 'slice' (height) | 'class+slice'
LABELS = ""  # a CSV or TSV of labels for the classes (ADNI, OASIS-1, BIDS participants.tsv), instead of class folders
LABEL_COLUMN = ""  # LABELS: its label column (default: the first of Group, DX, DX_bl, diagnosis, group, CDR)
ID_COLUMN = ""  # LABELS: its id column (default: Image Data ID, Subject, PTID, ID, participant_id, all that are there)
COVARIATES = ""  # table columns generation is also conditioned on, comma-separated (e.g. age or age,sex,MMSE)
LABEL_MAP = ""  # LABELS: values to classes, e.g. CN=NC,SMC=NC,EMCI=MCI,LMCI=MCI,Dementia=AD (others: unlabelled)
BIDS_SUFFIX = "T1w"  # a BIDS dataset (dataset_description.json): the anat scans read, *_T1w.nii[.gz]
# Network
BASE_CHANNELS = 64  # width of the first U-Net level
CHANNEL_MULT = (1, 2, 2, 4, 4)  # width multiplier per level; each level after the first halves the resolution
PATCH_SIZE = 1  # pixels per side folded into channels before the U-Net (2: a 64 px image enters it as 32 px)
NUM_RES_BLOCKS = 2  # residual blocks per level on the way down
ATTN_RESOLUTIONS = (16, 8)  # resolutions (pixels of the U-Net's feature maps) that get self-attention
NUM_HEADS = 4  # attention heads
DROPOUT = 0.0  # dropout inside residual blocks
# Diffusion
TIMESTEPS = 1000  # diffusion steps T
BETA_SCHEDULE = "cosine"  # 'linear' | 'cosine' | 'sigmoid'
PREDICTION = "v"  # what the network predicts: 'eps' | 'v' | 'x0'
MIN_SNR_GAMMA = 5.0  # min-SNR-gamma loss weighting (0 turns it off: a plain MSE of the prediction)
TIMESTEP_SAMPLING = "uniform"  # training timesteps: 'uniform' | 'logit-normal' (mid levels often, as SD3) | 'edm' (low)
EDM_MEAN = -1.2  # 'edm' (Karras et al. 2022): mean of ln of the noise-to-signal ratio sqrt((1 - abar) / abar)
EDM_STD = 1.2  # 'edm': spread of that logarithm
COND_DROP = 0.1  # CONDITION, COVARIATES: chance that training drops each condition on its own, for guidance
GUIDANCE = 2.0  # CONDITION: classifier-free guidance scale (0 unconditional, 1 conditional, >1 more so)
AUTOGUIDANCE = 1.25  # sampling: early + w (model - early), steering away from an early snapshot's errors (1: off)
GUIDE_AT = 0.25  # AUTOGUIDANCE: the share of training done when the EMA is copied as that early snapshot
# Training
BATCH_SIZE = 64  # images per step (per GPU under torchrun)
LR = 3e-4  # peak learning rate of AdamW
WEIGHT_DECAY = 0.0  # AdamW weight decay
WARMUP_STEPS = 250  # linear learning-rate warm-up
LR_DECAY = "cosine"  # after warm-up: 'constant' | 'cosine'
LR_FLOOR = 0.1  # the cosine decay ends at this share of LR
ADAM_BETA2 = 0.999  # AdamW's decay of its squared-gradient average (0.99 adapts faster)
GRAD_CLIP = 1.0  # gradient-norm clipping
TRAIN_MINUTES = 20.0  # train for this many minutes of wall time, learning rate laid over them (0: EPOCHS decide)
EPOCHS = 250  # passes over the training split, when TRAIN_MINUTES is 0
MIN_STEPS = 0  # a time budget's floor: where TRAIN_MINUTES buys fewer steps, training takes longer to reach these
MAX_TRAIN_MINUTES = 0.0  # MIN_STEPS: the longest training may then take (0: no limit)
EMA_DECAY = 0.999  # exponential moving average of the weights (with warm-up)
COMPILE = "auto"  # torch.compile the model: 'auto' (on CUDA only) | 'true' | 'false'
BF16 = "auto"  # bf16 autocast: 'auto' (on CUDA, and on CPUs with AMX bf16 units) | 'true' | 'false'
SAMPLE_EVERY = 25  # epochs between sample grids (and loss plots)
CHECKPOINT_EVERY = 1000  # steps between checkpoints (one is also written at the end and on Ctrl-C)
LOG_EVERY = 50  # steps between log lines and loss checks
MAX_NONFINITE = 20  # non-finite losses in a row that stop training
# Sampling
SAMPLER = "dpm++sde"  # 'ddpm' (all T steps) | 'ddim' | 'dpm++' (ODE) | 'dpm++sde' (as varied as ddpm in 50 steps)
SAMPLE_STEPS = 50  # steps of ddim and dpm++(sde): 50 draw as well as 100, 25 less varied (docs/quality.md)
EDIT_STEPS = 100  # edit.py's counterfactuals: DDIM steps of their inversion and decoding (docs/editing.md)
EDIT_GUIDANCE = 3.0  # edit.py's counterfactuals: classifier-free guidance toward the asked class (docs/editing.md)
STEP_SPACING = 2.0  # ddim/dpm++(sde) timesteps t_i = T * (1 - i/n) ** STEP_SPACING: 1 even in t, 2 denser near the image
DDIM_ETA = 0.0  # ddim noise: 0 deterministic, 1 like ddpm
NUM_SAMPLES = 64  # images predict.py generates
SAMPLE_BATCH = 64  # images sampled at once
SEED = 0  # seed for data order, noise and sampling


CONDITIONS = ("none", "class", "slice", "class+slice")
PREDICTIONS = ("eps", "v", "x0")
CHOICES = {"CONDITION": CONDITIONS, "PREDICTION": PREDICTIONS, "LR_DECAY": ("constant", "cosine"),
           "TIMESTEP_SAMPLING": ("uniform", "logit-normal", "edm"), "COMPILE": ("auto", "true", "false"),
           "BF16": ("auto", "true", "false")}  # settings with a fixed set of values (schedules, samplers: below)


class InputError(ValueError):
    """Settings, data, files or a checkpoint that cannot be used; the message says what is wrong and how to fix it.
    The scripts print it as one line (run_main); code calling the library can catch it as a ValueError."""


def run_main(main):
    """Run a script's main(), turning an InputError into one 'error:' line and exit code 2."""
    try:
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# ---------------------------------------------------------------- configuration
def constants():
    """The constants above as {NAME: default}."""
    return {k: v for k, v in globals().items()
            if re.fullmatch(r"[A-Z][A-Z0-9_]*", k) and k not in ("CONDITIONS", "PREDICTIONS")
            and isinstance(v, (bool, int, float, str, tuple))}


def _help_texts():
    """One-line comments of the constants, read from this file."""
    with open(__file__, encoding="utf-8") as f:
        return dict(re.findall(r"^([A-Z][A-Z0-9_]*) = .*?  # (.*)$", f.read(), re.M))


def _parse_bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _parse_tuple(s):
    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


class _Parser(argparse.ArgumentParser):
    """One 'error:' line for bad flags; `@FILE` arguments read flags from a file (any number a line, # comments)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")

    def convert_arg_line_to_args(self, arg_line):
        return arg_line.split("#")[0].split()


class _DefaultsOnce(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's lines; shows each flag's default, unless its help text already does."""

    def _get_help_string(self, action):
        return action.help if "(default:" in (action.help or "") else super()._get_help_string(action)


def build_parser(description):
    """An argparse parser with one --kebab-name flag per constant; `@configs/cpu_quick.args` reads a preset."""
    parser = _Parser(description=description, formatter_class=_DefaultsOnce, fromfile_prefix_chars="@")
    helps = _help_texts()
    for name, default in constants().items():
        kind = {bool: _parse_bool, tuple: _parse_tuple}.get(type(default), type(default))
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        parser.add_argument(flag(name), dest=name, type=kind, default=default,
                            metavar=type(default).__name__.upper(), help=f"{helps.get(name, '')} (default: {shown})")
    return parser


def flag(name):
    """The command-line flag of a constant: IMAGE_SIZE -> --image-size."""
    return "--" + name.lower().replace("_", "-")


def parse_settings(parser, argv=None):
    """(the constants with the command line's overrides, checked; the parsed arguments)."""
    args = parser.parse_args(argv)
    return check_config({name: getattr(args, name) for name in constants()}), args


def check_config(cfg):
    """Refuse contradictory or out-of-range settings with one clear line: the one place the settings are checked."""
    for name in ("IMAGE_SIZE", "PATCH_SIZE", "BATCH_SIZE", "BASE_CHANNELS", "TIMESTEPS", "EPOCHS", "SAMPLE_STEPS",
                 "EDIT_STEPS", "NUM_SAMPLES", "SAMPLE_BATCH", "CHANNELS", "NUM_HEADS", "SAMPLE_EVERY",
                 "CHECKPOINT_EVERY", "LOG_EVERY", "NUM_RES_BLOCKS"):
        if cfg[name] <= 0:
            raise InputError(f"{name} must be positive, got {cfg[name]}: use {flag(name)} N")
    for name, value in cfg.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{name} must be a finite number, got {value}: use {flag(name)} X")
    for name, allowed in ((n, (0, math.inf)) for n in ("TRAIN_MINUTES", "GUIDANCE", "WARMUP_STEPS", "MIN_STEPS",
                                                        "MAX_TRAIN_MINUTES")):
        if not allowed[0] <= cfg[name] < allowed[1]:
            raise InputError(f"{name} must be 0 or more, got {cfg[name]}: use {flag(name)} X")
    if not cfg["LR"] > 0:
        raise InputError(f"LR must be positive, got {cfg['LR']}: use --lr 2e-4")
    for name, low, high in (("EMA_DECAY", 0, 1), ("ADAM_BETA2", 0, 1), ("COND_DROP", 0, 1), ("DROPOUT", 0, 1)):
        if not low <= cfg[name] < high:
            raise InputError(f"{name} must be in [{low}, {high}), got {cfg[name]}: use {flag(name)} X")
    if cfg["AUTOGUIDANCE"] < 1 or not 0 < cfg["GUIDE_AT"] < 1:
        raise InputError(f"AUTOGUIDANCE must be 1 (off) or more and GUIDE_AT in (0, 1), got {cfg['AUTOGUIDANCE']} "
                         f"and {cfg['GUIDE_AT']}: use --autoguidance 1.5 --guide-at 0.25")
    if not cfg["STEP_SPACING"] > 0:
        raise InputError(f"STEP_SPACING must be positive (1: steps even in t, 2: denser near the image), got "
                         f"{cfg['STEP_SPACING']}: use --step-spacing 2")
    if not 0 <= cfg["DDIM_ETA"] <= 1:
        raise InputError(f"DDIM_ETA must be in [0, 1] (0 deterministic, 1 like ddpm), got {cfg['DDIM_ETA']}: use "
                         f"--ddim-eta 0")
    if not 0 <= cfg["LR_FLOOR"] <= 1:
        raise InputError(f"LR_FLOOR must be in [0, 1] (a share of LR), got {cfg['LR_FLOOR']}: use --lr-floor 0.1")
    for name, allowed in (*CHOICES.items(), ("BETA_SCHEDULE", BETA_SCHEDULES), ("SAMPLER", SAMPLERS)):
        if cfg[name] not in allowed:
            raise InputError(f"unknown {name} {cfg[name]!r}: choose one of {', '.join(allowed)}")
    if not cfg["CHANNEL_MULT"] or min(cfg["CHANNEL_MULT"]) <= 0:
        raise InputError(f"CHANNEL_MULT must be positive integers, got {cfg['CHANNEL_MULT']}")
    factor = cfg["PATCH_SIZE"] * 2 ** (len(cfg["CHANNEL_MULT"]) - 1)
    if cfg["IMAGE_SIZE"] % factor:
        raise InputError(f"IMAGE_SIZE {cfg['IMAGE_SIZE']} is not a multiple of {factor}, the U-Net's downsampling "
                         f"factor for PATCH_SIZE {cfg['PATCH_SIZE']} and CHANNEL_MULT {cfg['CHANNEL_MULT']}: pick a "
                         f"multiple of {factor}")
    sizes = unet_resolutions(cfg)
    for r in cfg["ATTN_RESOLUTIONS"]:
        if r not in sizes:
            raise InputError(f"ATTN_RESOLUTIONS has {r}, which never occurs in the U-Net at IMAGE_SIZE "
                             f"{cfg['IMAGE_SIZE']} (resolutions: {sorted(sizes)})")
    if cfg["SAMPLE_STEPS"] > cfg["TIMESTEPS"]:
        raise InputError(f"SAMPLE_STEPS {cfg['SAMPLE_STEPS']} is more than TIMESTEPS {cfg['TIMESTEPS']}")
    return cfg


def unet_resolutions(cfg):
    """The sides of the U-Net's feature maps, level by level (after PATCH_SIZE's folding)."""
    return [cfg["IMAGE_SIZE"] // cfg["PATCH_SIZE"] // 2 ** i for i in range(len(cfg["CHANNEL_MULT"]))]


def conditions_of(cfg):
    """(class-conditional, slice-conditional) for a configuration."""
    return "class" in cfg["CONDITION"], "slice" in cfg["CONDITION"]


def covariates_of(cfg):
    """The covariates (table columns) a configuration conditions on, in order; [] for none."""
    return [c.strip() for c in cfg.get("COVARIATES", "").split(",") if c.strip()]


def age_column(names):
    """The index of the age among covariate names (named age, any case), or None."""
    return next((i for i, name in enumerate(names) if name.lower() == "age"), None)


def covariate_ranges(values):
    """Each column's (lowest, highest) value given (NaN: not given), from N x K covariates."""
    return [(column[~column.isnan()].min().item(), column[~column.isnan()].max().item()) for column in values.T]


def scaled_covariates(values, ranges):
    """Covariate values (N x K, NaN: not given) as the model takes them: each scaled to [0, 1] over its training range
    (lo, hi); a constant covariate is 0.5."""
    lo, hi = (torch.tensor([r[i] for r in ranges], dtype=torch.float32) for i in (0, 1))
    return ((values.float() - lo) / (hi - lo)).where(hi > lo, 0.5 + 0 * values.float())


def spread_conditions(n, classes, positions=(0.0, 1.0)):
    """Conditions for n samples: class indices cycling through `classes` (a list of indices, or None for no class),
    and slice positions evenly spread from positions[0] to positions[1] (None for no position)."""
    labels = torch.tensor([classes[i % len(classes)] for i in range(n)]) if classes else None
    return labels, torch.linspace(*positions, n) if positions is not None else None


# ---------------------------------------------------------------- noise schedule
# Notation (Kingma et al. 2021): x_t = alpha_t x_0 + sigma_t eps, alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t).
def linear_betas(timesteps):
    """Ho et al. 2020: betas rising linearly from 1e-4 to 0.02 (for T = 1000; scaled for other T)."""
    scale = 1000 / timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)


def cosine_betas(timesteps, offset=0.008):
    """Nichol & Dhariwal 2021, eq. 17: abar_t = f(t) / f(0), f(t) = cos((t/T + s) / (1 + s) * pi/2)^2."""
    t = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((t + offset) / (1 + offset) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)


def sigmoid_betas(timesteps, start=-3.0, end=3.0):
    """Jabri et al. 2022: abar follows a sigmoid in t (from start to end, tau 1)."""
    t = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64) / timesteps
    v0, v1 = (torch.sigmoid(torch.tensor(v, dtype=torch.float64)) for v in (start, end))
    f = (v1 - torch.sigmoid(t * (end - start) + start)) / (v1 - v0)
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)


BETA_SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas, "sigmoid": sigmoid_betas}


@functools.lru_cache
def noise_to_signal(schedule, timesteps, device="cpu"):
    """sigma_t / alpha_t = sqrt((1 - abar_t) / abar_t) for t = 0..T-1 (rising): the noise riding on the unscaled
    image x_t / alpha_t, EDM's sigma. Made once per device: training looks it up every step, with no copy."""
    abar = NoiseSchedule(timesteps, schedule).alphas_cumprod
    return ((1 - abar) / abar).sqrt().float().to(device)


class NoiseSchedule:
    """The forward process q(x_t | x_0) over T discrete steps, the training target, and the reverse samplers."""

    def __init__(self, timesteps=TIMESTEPS, schedule=BETA_SCHEDULE, prediction=PREDICTION):
        self.timesteps, self.prediction = timesteps, prediction
        self.betas = BETA_SCHEDULES[schedule](timesteps)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, 0)

    def alpha_sigma(self, t, x):
        """alpha_t and sigma_t for integer steps t, shaped to broadcast over x."""
        abar = self.alphas_cumprod.to(x.device)[t].float().view(-1, *([1] * (x.dim() - 1)))
        return abar.sqrt(), (1 - abar).sqrt()

    def q_sample(self, x0, t, noise):
        """x_t = alpha_t x0 + sigma_t noise."""
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    def target(self, x0, noise, t):
        """What the network is trained to output for this x0, noise and t."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * noise - sigma * x0  # v (Salimans & Ho 2022)

    def snr(self, t):
        abar = self.alphas_cumprod.to(t.device)[t].float()
        return abar / (1 - abar)

    def loss_weight(self, t, gamma):
        """Min-SNR-gamma weights (Hang et al. 2023): every prediction type weighs x0 errors by min(SNR, gamma);
        gamma 0 turns the weighting off (a plain MSE of what the network predicts)."""
        snr = self.snr(t)
        if gamma <= 0:
            return torch.ones_like(snr)
        return snr.clamp(max=gamma) / {"eps": snr, "v": snr + 1, "x0": torch.ones_like(snr)}[self.prediction]

    def split(self, out, x, alpha, sigma):
        """Turn a network output at x_t into (eps, x0) predictions."""
        if self.prediction == "eps":
            return out, (x - sigma * out) / alpha
        if self.prediction == "x0":
            return (x - alpha * out) / sigma, out
        return sigma * x + alpha * out, alpha * x - sigma * out

    def denoise(self, model, x, t, clip):
        """(eps, x0) predicted by model at x_t, step t (an int); with clip, x0 clamped to [-1, 1] and eps made to
        agree with it."""
        abar = self.alphas_cumprod.to(x.device)[t].float()
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        out = model(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)).float()
        eps, x0 = self.split(out, x, alpha, sigma)
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = (x - alpha * x0) / sigma
        return eps, x0

    # ------------------------------------------------------------ sampling
    def sampling_steps(self, start_t, steps, power=STEP_SPACING):
        """`steps` distinct timesteps start_t * (1 - i/(steps-1)) ** power, ending at 0."""
        n = max(1, min(steps, start_t + 1))
        frac = torch.linspace(1, 0, n, dtype=torch.float64) ** power
        return sorted({int(round(v)) for v in (start_t * frac).tolist()}, reverse=True)

    @torch.no_grad()
    def sample(self, model, shape=None, sampler=SAMPLER, steps=SAMPLE_STEPS, eta=DDIM_ETA, x=None, start_t=None,
               generator=None, device="cpu", clip=True, callback=None, spacing=STEP_SPACING, path=None, edit=None):
        """Run the reverse process with one of SAMPLERS and return x_0.

        model(x_t, t) returns the network output; `x` and `start_t` start part-way (denoise a noised image),
        otherwise from N(0, I) of `shape` at t = T-1. `spacing` is STEP_SPACING's power; `callback(i, n, x_t,
        x0_pred)` sees every step. Masked decoding (DiffEdit, Couairon et al. 2023, sec. 3.2): given `path`, {t: x_t}
        of every step (invert's, with keep), and `edit` (a mask in [0, 1], 1 where the sampler draws), each step lands
        on edit * x_t' + (1 - edit) * path[t'], and the last on path[0] outside the mask.
        """
        start_t = self.timesteps - 1 if start_t is None else int(start_t)
        if x is None:
            x = torch.randn(shape, generator=generator, device=device)
        ts = list(range(start_t, -1, -1)) if sampler == "ddpm" else self.sampling_steps(start_t, steps, spacing)
        update = functools.partial(ddim_step, eta=eta) if sampler == "ddim" else SAMPLERS[sampler]
        noise = functools.partial(torch.randn, x.shape, generator=generator, device=x.device)
        abar, previous = self.alphas_cumprod.to(x.device).float(), None
        for i, (t, t_next) in enumerate(zip(ts, ts[1:] + [-1])):
            eps, x0 = self.denoise(model, x, t, clip)
            if t_next < 0:  # the last step lands on the model's image
                x = x0
            else:
                x, previous = update(x, x0, eps, abar[t], abar[t_next], noise, previous)
            if path is not None:
                x = edit * x + (1 - edit) * path[max(t_next, 0)]
            if callback is not None:
                callback(i, len(ts), x, x0)
        return x

    @torch.no_grad()
    def inpaint(self, model, known, fill, sampler=SAMPLER, steps=SAMPLE_STEPS, resample=1, jump=1, eta=DDIM_ETA,
                generator=None, clip=True, spacing=STEP_SPACING):
        """RePaint (Lugmayr et al. 2022, Alg. 1) with this schedule and one of SAMPLERS: from noise at T-1, every step
        keeps the sampler's draw where `fill` is true and the known image noised to the same step elsewhere; every
        `jump` steps the sample is noised back up `jump` steps (q(x_t' | x_t): scale sqrt(abar_t' / abar_t)) and
        denoised again, `resample` passes over each stretch in all, so that the two parts come to agree. The last
        step lands on the model's image in the fill and on `known` exactly elsewhere."""
        ts = list(range(self.timesteps - 1, -1, -1)) if sampler == "ddpm" else \
            self.sampling_steps(self.timesteps - 1, steps, spacing)
        update = functools.partial(ddim_step, eta=eta) if sampler == "ddim" else SAMPLERS[sampler]
        noise = functools.partial(torch.randn, known.shape, generator=generator, device=known.device)
        abar, previous, passes = self.alphas_cumprod.to(known.device).float(), None, {}
        x, k = noise(), 0
        while True:
            eps, x0 = self.denoise(model, x, ts[k], clip)
            if k + 1 == len(ts):
                return torch.where(fill, x0, known)
            x, previous = update(x, x0, eps, abar[ts[k]], abar[ts[k + 1]], noise, previous)
            x = torch.where(fill, x, abar[ts[k + 1]].sqrt() * known + (1 - abar[ts[k + 1]]).sqrt() * noise())
            k += 1
            if k % jump == 0 and k + 1 < len(ts) and passes.get(k, 1) < resample:  # back up, and down again
                passes[k] = passes.get(k, 1) + 1
                ratio = abar[ts[k - jump]] / abar[ts[k]]
                x, k, previous = ratio.sqrt() * x + (1 - ratio).sqrt() * noise(), k - jump, None

    @torch.no_grad()
    def invert(self, model, x, end_t, steps, spacing=STEP_SPACING, keep=False):
        """DDIM inversion (Song et al. 2021, eq. 12 with eta 0, run from the image up; Dhariwal & Nichol 2021, app. F):
        the image x, taken as x at step 0, to x_{end_t} along the same deterministic path, the model's x0 never
        clipped. The steps are sample()'s in reverse, so ddim with them (eta 0, no clipping) from the result returns x
        up to the discretisation error: each step evaluates the model where it leaves, not where it arrives. With
        keep: (x_{end_t}, {t: x_t} of every step, x itself at 0), the path sample() follows outside an edit mask."""
        ts = self.sampling_steps(end_t, steps, spacing)[::-1]
        abar = self.alphas_cumprod.to(x.device).float()
        path = {ts[0]: x}
        for t, t_next in zip(ts, ts[1:]):
            eps, x0 = self.denoise(model, x, t, clip=False)
            x, _ = ddim_step(x, x0, eps, abar[t], abar[t_next], None, None)
            path[t_next] = x
        return (x, path) if keep else x


# ---------------------------------------------------------------- samplers: one step each, from t to t' < t
# Each takes x_t, the model's (x0, eps) at t, abar_t and abar_t', a source of fresh N(0, I) noise, and what the
# previous step left (multistep solvers); it returns x_t' and what the next step needs.
def ddpm_step(x, x0, eps, abar, abar_next, noise, previous):
    """Ancestral sampling, Ho et al. 2020 eq. 6-7: a draw from the posterior q(x_t' | x_t, x0) with mean
    (sqrt(abar_t') beta x0 + sqrt(1 - beta) (1 - abar_t') x_t) / (1 - abar_t) and variance beta (1 - abar_t') /
    (1 - abar_t), where beta = 1 - abar_t / abar_t' (t' = t - 1 here)."""
    beta = 1 - abar / abar_next
    mean = (abar_next.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - abar_next) * x) / (1 - abar)
    variance = beta * (1 - abar_next) / (1 - abar)
    return mean + variance.sqrt() * noise(), None


def ddim_step(x, x0, eps, abar, abar_next, noise, previous, eta=0.0):
    """DDIM, Song et al. 2021 eq. 12: x_t' = sqrt(abar_t') x0 + sqrt(1 - abar_t' - s^2) eps + s z, with
    s = eta sqrt((1 - abar_t') / (1 - abar_t) (1 - abar_t / abar_t')) (eq. 16): eta 0 deterministic, 1 like ddpm."""
    if eta == 0:  # also the step inversion takes, upwards (where the noisy spread has no meaning)
        return abar_next.sqrt() * x0 + (1 - abar_next).sqrt() * eps, None
    spread = eta * ((1 - abar_next) / (1 - abar) * (1 - abar / abar_next)).sqrt()
    return abar_next.sqrt() * x0 + (1 - abar_next - spread ** 2).sqrt() * eps + spread * noise(), None


def _log_snr_step(abar, abar_next):
    """alpha_t', sigma_t', sigma_t' / sigma_t and h = lambda_t' - lambda_t, lambda = log(alpha / sigma)."""
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    alpha_next, sigma_next = abar_next.sqrt(), (1 - abar_next).sqrt()
    return alpha_next, sigma_next, sigma_next / sigma, torch.log(alpha_next / sigma_next) - torch.log(alpha / sigma)


def _second_order_x0(x0, h, previous):
    """DPM-Solver++(2M)'s x0 estimate, Lu et al. 2022 Alg. 2: (1 + 1/(2r)) x0 - 1/(2r) x0_prev, r = h_prev / h;
    the first step (no previous x0) is first order."""
    if previous is None:
        return x0
    x0_prev, h_prev = previous
    r = h_prev / h
    return (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev


def dpmpp_2m_step(x, x0, eps, abar, abar_next, noise, previous):
    """DPM-Solver++(2M), Lu et al. 2022 Alg. 2 (the probability-flow ODE in log-SNR time):
    x_t' = (sigma_t' / sigma_t) x_t - alpha_t' (e^-h - 1) D, D the second-order x0 estimate."""
    alpha_next, _, ratio, h = _log_snr_step(abar, abar_next)
    return ratio * x - alpha_next * torch.expm1(-h) * _second_order_x0(x0, h, previous), (x0, h)


def dpmpp_2m_sde_step(x, x0, eps, abar, abar_next, noise, previous):
    """DPM-Solver++(2M) SDE, Lu et al. 2022 (arXiv:2211.01095, eq. 18 with the 2M data estimate):
    x_t' = (sigma_t' / sigma_t) e^-h x_t + alpha_t' (1 - e^-2h) D + sigma_t' sqrt(1 - e^-2h) z."""
    alpha_next, sigma_next, ratio, h = _log_snr_step(abar, abar_next)
    fresh = -torch.expm1(-2 * h)  # 1 - e^-2h: the share of fresh noise at t'
    z = noise()
    return (ratio * torch.exp(-h) * x + alpha_next * fresh * _second_order_x0(x0, h, previous)
            + sigma_next * fresh.sqrt() * z), (x0, h)


SAMPLERS = {"ddpm": ddpm_step, "ddim": ddim_step, "dpm++": dpmpp_2m_step, "dpm++sde": dpmpp_2m_sde_step}


# ---------------------------------------------------------------- helpers
def show_path(path):
    """A path that prints anywhere, whatever bytes its name holds."""
    return os.fsencode(path).decode("utf-8", "replace")


def io_threads():
    """Threads that decode, resample and write images and scans (numpy, PIL, nibabel and torch release the GIL)."""
    return min(8, os.cpu_count() or 1)


def get_device():
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def wants_compile(cfg, device):
    """Whether COMPILE asks for torch.compile on this device ('auto': on CUDA only)."""
    return cfg["COMPILE"] == "true" or (cfg["COMPILE"] == "auto" and device.type == "cuda")


def wants_bf16(cfg, device):
    """Whether BF16 asks for bf16 autocast on this device ('auto': on CUDA, and on a CPU with AMX bf16 matrix units,
    where the quick profile trains 1.5x faster; elsewhere a CPU runs bf16 slower than fp32)."""
    if cfg["BF16"] != "auto":
        return cfg["BF16"] == "true"
    if device.type == "cpu":  # a torch too old to have the CPU feature query stays in fp32
        return bool(getattr(torch.cpu, "get_capabilities", dict)().get("amx_bf16"))
    return device.type == "cuda"


def memory_format(bf16, device):
    """channels_last, except under bf16 on a CPU, where its GroupNorm and attention kernels run several times slower."""
    return torch.contiguous_format if bf16 and device.type == "cpu" else torch.channels_last


def to_device_if_fits(images, device):
    """A uint8 split on the GPU when it takes under a quarter of the free memory, else in (pinned) host memory."""
    if device.type != "cuda":
        return images
    return images.to(device) if images.numel() < 0.25 * torch.cuda.mem_get_info(device)[0] else images.pin_memory()


def to_unit(x):
    """[-1, 1] images to [0, 1] for saving."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def save_png(x, path, nrow=None):
    """One [-1, 1] image, or a grid of many (nrow per row, default square), as an 8-bit grayscale PNG."""
    from torchvision.transforms.functional import to_pil_image
    from torchvision.utils import make_grid
    img = x if x.dim() == 3 else make_grid(x.float(), nrow=nrow or math.ceil(math.sqrt(len(x))), padding=2)[:1]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    to_pil_image((to_unit(img.cpu()) * 255).round().to(torch.uint8)).save(path)  # rounded: uint8 images come back


def in_batches(function, batch, *tensors):
    """function over consecutive batches of the tensors (None stays None), the results concatenated."""
    n, parts = len(tensors[0]), []
    for i in range(0, n, batch):
        parts.append(function(*(None if t is None else t[i:i + batch] for t in tensors)))
    return [torch.cat(p) for p in zip(*parts)] if isinstance(parts[0], tuple) else torch.cat(parts)


def fresh_folder(path, stale=()):
    """Make the folder, and fail with one line before any heavy work when it cannot be written; delete the files an
    earlier run left there that this run's set replaces (names matching the `stale` glob patterns). Returns path."""
    import glob
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
        for pattern in stale:
            for old in glob.glob(os.path.join(path, pattern)):
                os.remove(old)
    except OSError as e:
        raise InputError(f"cannot write to {show_path(path)} ({e.strerror or e}): pick another --output-dir") from None
    return path
