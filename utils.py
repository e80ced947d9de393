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
import warnings

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
EDM_MEAN = -1.2  # 'edm' (Karras et al. 2022): mean of ln sigma, sigma = sqrt((1 - abar) / abar) the noise's scale
EDM_STD = 1.2  # 'edm': spread of ln sigma
COND_DROP = 0.1  # CONDITION: chance that training drops each condition (class, slice) on its own, for guidance
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
EMA_DECAY = 0.999  # exponential moving average of the weights (with warm-up)
COMPILE = "auto"  # torch.compile the model: 'auto' (on CUDA only) | 'true' | 'false'
BF16 = "auto"  # bf16 autocast: 'auto' (on CUDA, and on CPUs with AMX bf16 units) | 'true' | 'false'
SAMPLE_EVERY = 25  # epochs between sample grids (and loss plots)
CHECKPOINT_EVERY = 1000  # steps between checkpoints (one is also written at the end and on Ctrl-C)
LOG_EVERY = 50  # steps between log lines and loss checks
MAX_NONFINITE = 20  # non-finite losses in a row that stop training
# Sampling
SAMPLER = "dpm++sde"  # 'ddpm' (all T steps) | 'ddim' | 'dpm++' (ODE) | 'dpm++sde' (as varied as ddpm at 100 steps)
SAMPLE_STEPS = 100  # steps of ddim and dpm++(sde); at 25 the samples are less varied (README, "Fast sampler")
STEP_SPACING = 2.0  # ddim/dpm++(sde) timesteps t_i = T * (1 - i/n) ** STEP_SPACING: 1 even in t, 2 denser near the image
DDIM_ETA = 0.0  # ddim noise: 0 deterministic, 1 like ddpm
NUM_SAMPLES = 64  # images predict.py generates
SAMPLE_BATCH = 64  # images sampled at once
SEED = 0  # seed for data order, noise and sampling

CONDITIONS = ("none", "class", "slice", "class+slice")
SCHEDULES = ("linear", "cosine", "sigmoid")
SAMPLERS = ("ddpm", "ddim", "dpm++", "dpm++sde")
PREDICTIONS = ("eps", "v", "x0")


class UserError(Exception):
    """A problem the user can fix; reported as one line, no traceback."""


def run(main):
    """Run a script's main(), turning a UserError into one line and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# ---------------------------------------------------------------- configuration
def constants():
    """The constants above as {NAME: default}."""
    return {k: v for k, v in globals().items()
            if re.fullmatch(r"[A-Z][A-Z0-9_]*", k) and k not in ("CONDITIONS", "SCHEDULES", "SAMPLERS", "PREDICTIONS")
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


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


class _DefaultsOnce(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's lines; shows each flag's default, unless its help text already does."""

    def _get_help_string(self, action):
        return action.help if "(default:" in (action.help or "") else super()._get_help_string(action)


def build_parser(description):
    """An argparse parser with one --kebab-name flag per constant."""
    parser = _OneLineParser(description=description, formatter_class=_DefaultsOnce)
    helps = _help_texts()
    for name, default in constants().items():
        kind = {bool: _parse_bool, tuple: _parse_tuple}.get(type(default), type(default))
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        parser.add_argument("--" + name.lower().replace("_", "-"), dest=name, type=kind, default=default,
                            metavar=type(default).__name__.upper(), help=f"{helps.get(name, '')} (default: {shown})")
    return parser


def config_from_args(args):
    """The constants, with command-line overrides, as a plain dict."""
    return {name: getattr(args, name) for name in constants()}


def check_config(cfg):
    """Refuse contradictory or out-of-range settings with one clear line."""
    for name in ("IMAGE_SIZE", "PATCH_SIZE", "BATCH_SIZE", "BASE_CHANNELS", "TIMESTEPS", "EPOCHS", "SAMPLE_STEPS",
                 "NUM_SAMPLES", "SAMPLE_BATCH", "CHANNELS", "NUM_HEADS", "SAMPLE_EVERY", "CHECKPOINT_EVERY",
                 "LOG_EVERY"):
        if cfg[name] <= 0:
            raise UserError(f"{name} must be positive, got {cfg[name]}: use --{name.lower().replace('_', '-')} N")
    for name, value in cfg.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{name} must be a finite number, got {value}: use --{name.lower().replace('_', '-')} X")
    if cfg["TRAIN_MINUTES"] < 0:
        raise UserError(f"TRAIN_MINUTES must be 0 (train for EPOCHS) or more, got {cfg['TRAIN_MINUTES']}")
    if not cfg["LR"] > 0:
        raise UserError(f"LR must be positive, got {cfg['LR']}: use --lr 2e-4")
    if not 0 <= cfg["COND_DROP"] < 1 or cfg["GUIDANCE"] < 0:
        raise UserError(f"COND_DROP must be in [0, 1) and GUIDANCE at least 0, got {cfg['COND_DROP']} and "
                        f"{cfg['GUIDANCE']}")
    for name in ("EMA_DECAY", "ADAM_BETA2"):
        if not 0 <= cfg[name] < 1:
            raise UserError(f"{name} must be in [0, 1), got {cfg[name]}: use --{name.lower().replace('_', '-')} X")
    if cfg["AUTOGUIDANCE"] < 1 or not 0 < cfg["GUIDE_AT"] < 1:
        raise UserError(f"AUTOGUIDANCE must be 1 (off) or more and GUIDE_AT in (0, 1), got {cfg['AUTOGUIDANCE']} and "
                        f"{cfg['GUIDE_AT']}: use --autoguidance 1.5 --guide-at 0.25")
    if not 0 <= cfg["LR_FLOOR"] <= 1:
        raise UserError(f"LR_FLOOR must be in [0, 1] (a share of LR), got {cfg['LR_FLOOR']}: use --lr-floor 0.1")
    for name, allowed in (("CONDITION", CONDITIONS), ("BETA_SCHEDULE", SCHEDULES), ("SAMPLER", SAMPLERS),
                          ("PREDICTION", PREDICTIONS), ("LR_DECAY", ("constant", "cosine")),
                          ("TIMESTEP_SAMPLING", ("uniform", "logit-normal", "edm")),
                          ("COMPILE", ("auto", "true", "false")), ("BF16", ("auto", "true", "false"))):
        if cfg[name] not in allowed:
            raise UserError(f"unknown {name} {cfg[name]!r}: choose one of {', '.join(allowed)}")
    if not cfg["CHANNEL_MULT"] or min(cfg["CHANNEL_MULT"]) <= 0:
        raise UserError(f"CHANNEL_MULT must be positive integers, got {cfg['CHANNEL_MULT']}")
    factor = cfg["PATCH_SIZE"] * 2 ** (len(cfg["CHANNEL_MULT"]) - 1)
    if cfg["IMAGE_SIZE"] % factor:
        raise UserError(f"IMAGE_SIZE {cfg['IMAGE_SIZE']} is not a multiple of {factor}, the U-Net's downsampling "
                        f"factor for PATCH_SIZE {cfg['PATCH_SIZE']} and CHANNEL_MULT {cfg['CHANNEL_MULT']}: pick a "
                        f"multiple of {factor}")
    sizes = {cfg["IMAGE_SIZE"] // cfg["PATCH_SIZE"] // 2 ** i for i in range(len(cfg["CHANNEL_MULT"]))}
    for r in cfg["ATTN_RESOLUTIONS"]:
        if r not in sizes:
            raise UserError(f"ATTN_RESOLUTIONS has {r}, which never occurs in the U-Net at IMAGE_SIZE "
                            f"{cfg['IMAGE_SIZE']} (resolutions: {sorted(sizes)})")
    if cfg["SAMPLE_STEPS"] > cfg["TIMESTEPS"]:
        raise UserError(f"SAMPLE_STEPS {cfg['SAMPLE_STEPS']} is more than TIMESTEPS {cfg['TIMESTEPS']}")
    if cfg["NUM_RES_BLOCKS"] < 1 or cfg["DROPOUT"] < 0 or cfg["DROPOUT"] >= 1:
        raise UserError("NUM_RES_BLOCKS must be at least 1 and DROPOUT in [0, 1)")
    return cfg


def conditions_of(cfg):
    """(class-conditional, slice-conditional) for a configuration."""
    return "class" in cfg["CONDITION"], "slice" in cfg["CONDITION"]


def spread_conditions(n, classes, positions=(0.0, 1.0)):
    """Conditions for n samples: class indices cycling through `classes` (a list of indices, or None for no class),
    and slice positions evenly spread from positions[0] to positions[1] (None for no position)."""
    y = torch.tensor([classes[i % len(classes)] for i in range(n)]) if classes else None
    return y, torch.linspace(*positions, n) if positions is not None else None


# ---------------------------------------------------------------- noise schedule
@functools.lru_cache
def noise_levels(schedule, timesteps, device="cpu"):
    """sigma_t = sqrt((1 - abar_t) / abar_t), the noise-to-signal ratio of each step t = 0..T-1 (rising), made
    once per device: training looks sigmas up in it every step, with no host-to-device copy."""
    abar = NoiseSchedule(timesteps, schedule).alphas_cumprod
    return ((1 - abar) / abar).sqrt().float().to(device)


def make_betas(schedule, timesteps):
    """Betas in float64: 'linear' (Ho et al. 2020), 'cosine' (Nichol & Dhariwal 2021) or 'sigmoid'."""
    if schedule == "linear":
        scale = 1000 / timesteps  # keeps the schedule's shape for other T
        return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    if schedule == "cosine":
        s = 0.008
        t = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    if schedule == "sigmoid":  # Jabri et al. 2022: abar follows a sigmoid in t (start -3, end 3, tau 1)
        t = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64) / timesteps
        v0, v1 = torch.sigmoid(torch.tensor(-3.0, dtype=torch.float64)), torch.sigmoid(torch.tensor(3.0, dtype=torch.float64))
        f = (v1 - torch.sigmoid(t * 6 - 3)) / (v1 - v0)
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise UserError(f"unknown BETA_SCHEDULE {schedule!r}: choose one of {', '.join(SCHEDULES)}")


class NoiseSchedule:
    """The forward process q(x_t | x_0) and three reverse samplers over T discrete steps."""

    def __init__(self, timesteps=TIMESTEPS, schedule=BETA_SCHEDULE, prediction=PREDICTION):
        if prediction not in PREDICTIONS:
            raise UserError(f"unknown PREDICTION {prediction!r}: choose one of {', '.join(PREDICTIONS)}")
        self.timesteps, self.prediction = timesteps, prediction
        self.betas = make_betas(schedule, timesteps)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, 0)

    def _ab(self, t, x):
        """sqrt(abar_t) and sqrt(1 - abar_t) for integer steps t, shaped to broadcast over x."""
        abar = self.alphas_cumprod.to(x.device)[t].float().view(-1, *([1] * (x.dim() - 1)))
        return abar.sqrt(), (1 - abar).sqrt()

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        a, s = self._ab(t, x0)
        return a * x0 + s * noise

    def target(self, x0, noise, t):
        """What the network is trained to output for this x0, noise and t."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        a, s = self._ab(t, x0)
        return a * noise - s * x0  # v (Salimans & Ho 2022)

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

    def split(self, out, x, a, s):
        """Turn a network output at x_t into (eps, x0) predictions."""
        if self.prediction == "eps":
            return out, (x - s * out) / a
        if self.prediction == "x0":
            return (x - a * out) / s, out
        return s * x + a * out, a * x - s * out

    # ------------------------------------------------------------ sampling
    def sampling_steps(self, start_t, steps, power=STEP_SPACING):
        """`steps` distinct timesteps start_t * (1 - i/(steps-1)) ** power, ending at 0."""
        n = max(1, min(steps, start_t + 1))
        frac = torch.linspace(1, 0, n, dtype=torch.float64) ** power
        return sorted({int(round(v)) for v in (start_t * frac).tolist()}, reverse=True)

    @torch.no_grad()
    def sample(self, model, shape=None, sampler=SAMPLER, steps=SAMPLE_STEPS, eta=DDIM_ETA, x=None, start_t=None,
               generator=None, device="cpu", clip=True, callback=None, spacing=STEP_SPACING):
        """Run the reverse process and return x_0.

        model(x_t, t) returns the network output; `x` and `start_t` start part-way (denoise a noised
        image), otherwise from N(0, I) of `shape` at t = T-1. `spacing` is STEP_SPACING's power;
        `callback(i, n, x_t, x0_pred)` sees every step.
        """
        if sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
        start_t = self.timesteps - 1 if start_t is None else int(start_t)
        if x is None:
            x = torch.randn(shape, generator=generator, device=device)
        ts = list(range(start_t, -1, -1)) if sampler == "ddpm" else self.sampling_steps(start_t, steps, spacing)
        abar = self.alphas_cumprod.to(x.device)
        x0_prev, h_prev = None, None
        for i, t in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            ab_t = abar[t].float()
            ab_p = abar[t_prev].float() if t_prev >= 0 else torch.ones((), device=x.device)
            a, s = ab_t.sqrt(), (1 - ab_t).sqrt()
            out = model(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)).float()
            eps, x0 = self.split(out, x, a, s)
            if clip:
                x0 = x0.clamp(-1, 1)
                eps = (x - a * x0) / s
            if t_prev < 0:
                x = x0
            elif sampler == "ddpm":  # ancestral step with the posterior variance
                beta = 1 - ab_t / ab_p
                mean = (ab_p.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - ab_p) * x) / (1 - ab_t)
                var = beta * (1 - ab_p) / (1 - ab_t)
                x = mean + var.sqrt() * torch.randn(x.shape, generator=generator, device=x.device)
            elif sampler == "ddim":
                sigma = eta * ((1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p)).sqrt()
                x = ab_p.sqrt() * x0 + (1 - ab_p - sigma ** 2).sqrt() * eps
                if eta > 0:
                    x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device)
            else:  # DPM-Solver++(2M) (Lu et al. 2022) in log-SNR time: the ODE, or with 'dpm++sde' the SDE
                a_p, s_p = ab_p.sqrt(), (1 - ab_p).sqrt()
                h = torch.log(a_p / s_p) - torch.log(a / s)
                d = x0
                if x0_prev is not None:
                    r = h_prev / h
                    d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
                if sampler == "dpm++":
                    x = (s_p / s) * x - a_p * torch.expm1(-h) * d
                else:
                    fresh = -torch.expm1(-2 * h)  # 1 - exp(-2h): the share of fresh noise at t_prev
                    noise = torch.randn(x.shape, generator=generator, device=x.device)
                    x = (s_p / s) * torch.exp(-h) * x + a_p * fresh * d + s_p * fresh.sqrt() * noise
                x0_prev, h_prev = x0, h
            if callback is not None:
                callback(i, len(ts), x, x0)
        return x


# ---------------------------------------------------------------- helpers
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
    to_pil_image(to_unit(img.cpu())).save(path)


def save_checkpoint(state, path):
    """Write atomically: temporary file, fsync, then rename; the old file becomes NAME.prev.pt."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path):  # keep the last good one, never leaving `path` missing
            _copy_replace(path, prev_path(path))
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"could not write {path} ({e.strerror}): free some disk space or choose another "
                        f"--output-dir; the previous checkpoint is untouched") from None


def prev_path(path):
    """Where save_checkpoint keeps the previous version of path: NAME.prev.pt."""
    return path[:-3] + ".prev.pt" if path.endswith(".pt") else path + ".prev"


def _copy_replace(src, dst):
    """Atomically make dst a copy of src (a hard link where the file system allows)."""
    if os.path.exists(dst) and os.path.samefile(src, dst):
        return  # one file already (killed between the renames): rename() onto its own hard link would do nothing
    tmp = f"{dst}.tmp{os.getpid()}"
    try:
        try:
            os.link(src, tmp)
        except OSError:  # file system without hard links
            import shutil
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _load_failure(e, path):
    """Why torch.load refused a file, in a few plain words."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch's message holds terminal colour codes
    if unsafe := re.search(r"Unsupported global: GLOBAL (\S+)", text):
        return f"it holds Python objects ({unsafe.group(1)}) that could run code, so it is never unpickled"
    if isinstance(e, OSError):
        return e.strerror or text
    return "empty file" if os.path.getsize(path) == 0 else "truncated or corrupt"


def load_checkpoint(path, advice="delete it or pass another --checkpoint"):
    """Load a checkpoint safely (weights_only=True: no code in it ever runs)."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: train first (python train.py) or pass --checkpoint PATH")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickles before refusing them: one line is enough
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({_load_failure(e, path)})"
                        + (f": {advice}" if advice else "")) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"{path} is not a checkpoint of this project (no model or config in it)")
    if "CONDITION" not in state["config"]:  # written before CONDITION: CONDITIONAL=True meant class conditioning
        state["config"]["CONDITION"] = "class" if state["config"].pop("CONDITIONAL", False) else "none"
    state["config"].setdefault("PATCH_SIZE", 1)  # written before PATCH_SIZE: no pixels were folded
    return state
