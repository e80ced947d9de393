"""Train the brain-MRI DDPM. Resumes from OUTPUT_DIR/checkpoint.pt unless --fresh.

    python train.py                      # the constants in utils.py
    python train.py --image-size 64      # any constant, overridden
    torchrun --nproc_per_node=4 train.py # several GPUs (BATCH_SIZE is per GPU)
"""
import csv
import functools
import math
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

import dataset
import utils
from modules import Denoiser, build_model, load_network
from utils import UserError

# settings a checkpoint must share with the run that resumes it
MODEL_KEYS = ("IMAGE_SIZE", "PATCH_SIZE", "CHANNELS", "BASE_CHANNELS", "CHANNEL_MULT", "NUM_RES_BLOCKS",
              "ATTN_RESOLUTIONS", "NUM_HEADS", "TIMESTEPS", "BETA_SCHEDULE", "PREDICTION", "CONDITION")
# what a checkpoint must hold to be resumed from (best.pt, for one, has no optimizer)
RESUME_KEYS = ("model", "ema", "optimizer", "noise_rng", "cpu_rng", "step", "best_val", "history")
VAL_IMAGES = 512  # validation images (fixed subset, fixed noise and timesteps)
GRID_SAMPLES = 36  # images in each training sample grid
GRID_STEPS = 25  # sampler steps of the training grids, previews that should not eat the budget (at most SAMPLE_STEPS)


def setup_distributed():
    """(rank, world size, device): torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; otherwise one process."""
    if "RANK" not in os.environ:
        return 0, 1, utils.get_device()
    local = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def check_writable(path):
    """Fail before any heavy work when the output folder can't be written."""
    try:
        os.makedirs(os.path.join(path, "samples"), exist_ok=True)
        probe = os.path.join(path, f".write_test{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to OUTPUT_DIR {path!r} ({e.strerror}): pick another with --output-dir") from None


def remove_stale_temps(path):
    """Delete the half-written files (NAME.tmpPID, .write_testPID) of a run that was killed while writing them."""
    for name in os.listdir(path):
        if (m := re.fullmatch(r".+\.tmp(\d+)|\.write_test(\d+)", name)) and not _alive(int(m[1] or m[2])):
            os.remove(os.path.join(path, name))


def _alive(pid):
    """Whether process pid exists (and may still be writing its temporary file)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    return True


def load_resume_state(ckpt_path):
    """(state, path) to resume from: checkpoint.pt, or checkpoint.prev.pt where that one is missing or unusable.

    (None, None) when there is neither; a UserError pointing at --fresh when neither can be used.
    """
    prev, problems = utils.prev_path(ckpt_path), []
    for path in (ckpt_path, prev):
        if not os.path.exists(path):
            continue
        try:
            state = utils.load_checkpoint(path, advice="")
            if missing := [k for k in RESUME_KEYS if k not in state]:
                raise UserError(f"{path} cannot be resumed from (no {', '.join(missing)} in it)")
        except UserError as e:
            print(f"notice: {e}")
            problems.append(str(e))
            continue
        if path == prev:
            print(f"notice: resuming from the previous checkpoint, {prev}"
                  + ("" if problems else f" ({ckpt_path} is missing)"))
        return state, path
    if problems:
        if not os.path.exists(prev):
            problems.append(f"there is no {os.path.basename(prev)} to fall back on")
        raise UserError(f"cannot resume: {'; '.join(problems)}: start over with --fresh (or choose another "
                        f"--output-dir)")
    return None, None


def now():
    """Wall-clock seconds (a function of its own, so that a test can train on a fake clock)."""
    return time.time()


def learning_rate(cfg, step, decay_progress):
    """Linear warm-up over WARMUP_STEPS, then constant, or a cosine decay to LR_FLOOR * LR as decay_progress goes
    from 0 to 1 (the share of the steps after warm-up, or of the time budget, that is done)."""
    if step < cfg["WARMUP_STEPS"]:
        return cfg["LR"] * (step + 1) / cfg["WARMUP_STEPS"]
    if cfg["LR_DECAY"] == "constant":
        return cfg["LR"]
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, decay_progress))))
    return cfg["LR"] * (cfg["LR_FLOOR"] + (1 - cfg["LR_FLOOR"]) * cosine)


def make_ema(model, cfg):
    """EMA of the weights (torch.optim.swa_utils): after n updates the decay is min(EMA_DECAY, (1+n)/(10+n)); the
    first update copies the weights."""
    ema = AveragedModel(model, multi_avg_fn=functools.partial(ema_lerp, max_decay=cfg["EMA_DECAY"]), use_buffers=True)
    ema.n_averaged = ema.n_averaged.cpu()  # keeps AveragedModel's bookkeeping off the GPU (no sync per step)
    return ema


def ema_lerp(ema_params, params, num_averaged, max_decay):
    """Move the EMA toward the weights with the warm-up decay, on the device (no host sync)."""
    decay = ((1 + num_averaged) / (10 + num_averaged)).clamp(max=max_decay)
    torch._foreach_lerp_(ema_params, params, 1 - decay)


def batch_loss(model, schedule, x0, t, noise, cond, cfg, bf16):
    """Per-image min-SNR-weighted MSE of the network's prediction (under bf16 autocast if asked); cond = (class
    labels, slice positions), either None where the model has no such condition."""
    x_t = schedule.q_sample(x0, t, noise)
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(x_t, t, *cond)
    err = (out.float() - schedule.target(x0, noise, t)).pow(2).mean(dim=(1, 2, 3))
    return err * schedule.loss_weight(t, cfg["MIN_SNR_GAMMA"])


def make_batch(images, idx, gen, cfg, rank, world, device, labels=None, positions=None):
    """This rank's share of a global batch: x0 in [-1, 1], t, noise, and cond = (class labels, slice positions),
    each condition dropped on its own with chance COND_DROP (to -1 and NaN: 'not given'), None where not given.

    Every rank draws the whole global batch's random numbers, so any world size sees the same ones.
    """
    n, mine = len(idx), slice(rank * (len(idx) // world), (rank + 1) * (len(idx) // world))
    noise = torch.randn((n, *images.shape[1:]), generator=gen, device=device)[mine]
    if cfg["TIMESTEP_SAMPLING"] == "uniform":
        t = torch.randint(0, cfg["TIMESTEPS"], (n,), generator=gen, device=device)[mine]
    elif cfg["TIMESTEP_SAMPLING"] == "logit-normal":  # t / T = sigmoid(z), z ~ N(0, 1)
        u = torch.randn(n, generator=gen, device=device).sigmoid()
        t = (u * cfg["TIMESTEPS"]).long().clamp(max=cfg["TIMESTEPS"] - 1)[mine]
    else:  # edm: ln sigma ~ N(EDM_MEAN, EDM_STD^2), each sigma taken to the first step t whose sigma_t reaches it
        sigma = (cfg["EDM_MEAN"] + cfg["EDM_STD"] * torch.randn(n, generator=gen, device=device)).exp()
        levels = utils.noise_levels(cfg["BETA_SCHEDULE"], cfg["TIMESTEPS"], device)
        t = torch.searchsorted(levels, sigma).clamp(max=cfg["TIMESTEPS"] - 1)[mine]
    flip = torch.rand(n, generator=gen, device=device)[mine] < 0.5
    drop_class, drop_slice = torch.rand(2, n, generator=gen, device=device)[:, mine] < cfg["COND_DROP"]
    x0 = images[idx[mine]].to(device, non_blocking=True).float().div_(127.5).sub_(1)
    layout = utils.memory_format(utils.wants_bf16(cfg, device), device)
    x0 = x0.contiguous(memory_format=layout)
    if cfg["HFLIP"]:
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    y = None if labels is None else torch.where(drop_class, -1, labels[idx[mine]])
    s = None if positions is None else torch.where(drop_slice, torch.nan, positions[idx[mine]])
    return x0, t, noise.contiguous(memory_format=layout), (y, s)


def train_step(net, model, optimizer, schedule, x0, t, noise, cond, cfg, bf16):
    """One optimizer step; returns (loss, skipped) as device tensors, without syncing with the host."""
    loss = batch_loss(net, schedule, x0, t, noise, cond, cfg, bf16).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["GRAD_CLIP"])
    bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
    optimizer.found_inf = bad.float()  # fused AdamW skips the update when this is 1: no host sync
    optimizer.step()
    return loss.detach(), bad


@torch.no_grad()
def validation_loss(model, schedule, val, val_cond, cfg, device, bf16):
    """Loss on a fixed validation subset at fixed timesteps and fixed noise, given the conditions the model takes
    (val_cond: held-out labels and positions, or None): comparable across epochs."""
    gen = torch.Generator(device="cpu").manual_seed(cfg["SEED"] + 1)
    n = min(len(val), VAL_IMAGES)
    pick = torch.randperm(len(val), generator=gen)[:n]
    x0 = val[pick].float() / 127.5 - 1
    cond = [None if c is None else c[pick] for c in val_cond]
    t = torch.linspace(0, cfg["TIMESTEPS"] - 1, n).round().long()
    noise = torch.randn(x0.shape, generator=gen)
    total = 0.0
    for i in range(0, n, cfg["BATCH_SIZE"]):
        sl = slice(i, i + cfg["BATCH_SIZE"])
        part = [None if c is None else c[sl].to(device) for c in cond]
        total += batch_loss(model, schedule, x0[sl].to(device), t[sl].to(device), noise[sl].to(device), part,
                            cfg, bf16).sum().item()
    return total / n


def sample_grid(ema_model, guide, schedule, cfg, device, path, classes):
    """A grid of EMA samples with the fast sampler in GRID_STEPS steps and a fixed seed (comparable across epochs),
    autoguided by the guide once there is one; conditional models cycle through the classes (rows of the grid) and
    spread the slice positions from bottom to top."""
    gen = torch.Generator(device=device).manual_seed(cfg["SEED"])
    positions = (0.0, 1.0) if utils.conditions_of(cfg)[1] else None
    y, s = utils.spread_conditions(GRID_SAMPLES, list(range(len(classes))), positions)
    y, s = (None if c is None else c.to(device) for c in (y, s))
    denoiser = Denoiser(ema_model, y, s, cfg["GUIDANCE"], guide, cfg["AUTOGUIDANCE"], utils.wants_bf16(cfg, device))
    x = schedule.sample(denoiser,
                        (GRID_SAMPLES, cfg["CHANNELS"], cfg["IMAGE_SIZE"], cfg["IMAGE_SIZE"]), "dpm++sde",
                        min(GRID_STEPS, cfg["SAMPLE_STEPS"]), generator=gen, device=device, spacing=cfg["STEP_SPACING"])
    utils.save_png(x, path, nrow=6)


def csv_row(row):
    """One history entry as a log.csv row."""
    return [f"{v:.6g}" if isinstance(v, float) else v for v in row.values()]


def plot_losses(history, path):
    """Training and validation loss against step, log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train", lw=1)
    val = [h for h in history if h["val_loss"] != ""]
    ax.plot([h["step"] for h in val], [h["val_loss"] for h in val], "o-", label="validation (EMA)")
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- the run
@dataclass
class Run:
    """The fixed parts of a training run, built once."""
    cfg: dict
    rank: int
    world: int
    device: torch.device
    data: dataset.Data
    images: torch.Tensor  # the training split, on the GPU when it fits
    classes: list  # the class names, when the model is class-conditional
    labels: torch.Tensor | None  # the training split's class labels, when the model is class-conditional
    positions: torch.Tensor | None  # its slice positions, when the model is slice-conditional
    batch: int  # per process
    steps_per_epoch: int
    total_steps: int
    schedule: utils.NoiseSchedule
    model: torch.nn.Module
    ema: AveragedModel
    optimizer: torch.optim.Optimizer
    net: torch.nn.Module  # the model as trained: compiled and/or wrapped in DDP
    noise_gen: torch.Generator
    bf16: bool  # bf16 autocast (BF16 on this device)

    @property
    def master(self):
        return self.rank == 0

    def path(self, name):
        return os.path.join(self.cfg["OUTPUT_DIR"], name)


@dataclass
class Progress:
    """What changes as a run goes: the step, the best validation loss and the history travel in the checkpoint;
    the device-side accumulators are read every LOG_EVERY steps (the only host syncs)."""
    device: torch.device
    step: int = 0
    best_val: float = math.inf
    history: list = field(default_factory=list)  # the rows of log.csv
    best_ema: dict | None = None  # EMA weights of the lowest validation loss, not yet written to best.pt
    guide: dict | None = None  # {"step", "weights"}: the EMA at GUIDE_AT of the run, for autoguidance
    elapsed_before: float = 0.0  # seconds of training before this process started
    started: float = field(default_factory=lambda: now())
    spent: float = 0.0  # seconds of training so far, as last read from rank 0's clock (every LOG_EVERY steps)
    spent_at_step: int = 0  # the step at which it was read
    seconds_per_step: float = 0.0  # over the last log window: extrapolates `spent` step by step between reads
    end_seconds: float = 0.0  # rank 0: the longest end-of-epoch work so far (validation, samples, plot)
    save_seconds: float = 0.0  # rank 0: the longest checkpoint save so far
    reserve: float = 0.0  # the two above, as rank 0 last said: time kept free at the end of a time budget
    window_start: float = field(default_factory=time.perf_counter)  # the current log window
    window_steps: int = 0
    loss_sum: torch.Tensor = field(init=False)
    bad_run: torch.Tensor = field(init=False)  # non-finite losses in a row
    bad_total: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.loss_sum, self.bad_run, self.bad_total = (torch.zeros((), device=self.device) for _ in range(3))
        self.spent, self.spent_at_step = self.elapsed_before, self.step

    def record(self, loss, bad):
        """Count one optimizer step: its loss (unless skipped) and whether it was skipped."""
        self.bad_run.mul_(bad).add_(bad)
        self.bad_total.add_(bad)
        self.loss_sum.add_(torch.where(bad, 0.0, loss))
        self.step += 1
        self.window_steps += 1


def read_clock(run, progress, rate=True):
    """The seconds trained so far and the time to keep free at the end, as rank 0 reads them, on every rank (all
    ranks then agree on the learning rate and on when a time budget is spent); with rate, also the seconds per step
    since the last reading (not across an end-of-epoch pause)."""
    clock = torch.tensor([progress.elapsed_before + now() - progress.started,
                          progress.end_seconds + progress.save_seconds], dtype=torch.float64, device=run.device)
    if run.world > 1:
        dist.broadcast(clock, 0)
    spent, progress.reserve = clock.tolist()
    if rate and progress.step > progress.spent_at_step:
        progress.seconds_per_step = (spent - progress.spent) / (progress.step - progress.spent_at_step)
    progress.spent, progress.spent_at_step = spent, progress.step


def done_share(run, progress):
    """The share of the run that is done: of its steps (EPOCHS), or of its time budget (TRAIN_MINUTES), with the
    time the last validation, samples and checkpoint will take counted as spent."""
    if not run.cfg["TRAIN_MINUTES"]:
        return progress.step / run.total_steps
    spent = progress.spent + (progress.step - progress.spent_at_step) * progress.seconds_per_step
    return (spent + progress.reserve) / (60 * run.cfg["TRAIN_MINUTES"])


def decay_progress(run, progress):
    """How far the learning-rate decay has gone: over the steps after warm-up, or over the time budget."""
    if run.cfg["TRAIN_MINUTES"]:
        return done_share(run, progress)
    warmup = run.cfg["WARMUP_STEPS"]
    return (progress.step - warmup) / max(1, run.total_steps - warmup)


class StopRequest:
    """Ctrl-C or SIGTERM: the first asks the run to stop after the current step (it then saves and exits with
    code 130); a second interrupts at once."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, _signum, _frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


def parse_settings():
    """The configuration from the constants and the command line, checked; and whether to start over."""
    parser = utils.build_parser(__doc__)
    parser.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start over")
    args = parser.parse_args()
    return utils.check_config(utils.config_from_args(args)), args.fresh


def prepare_process(cfg, rank, device):
    """Seed this process, check the output folder (rank 0), and pick the fast paths of a GPU."""
    if rank == 0:
        check_writable(cfg["OUTPUT_DIR"])
        remove_stale_temps(cfg["OUTPUT_DIR"])
    torch.manual_seed(cfg["SEED"] + rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def load_training_data(cfg, rank, world):
    """The dataset; rank 0 builds the demo set or the cache first, the other ranks then read it."""
    if rank > 0:
        dist.barrier()
    data = dataset.load_data(cfg)
    if world > 1 and rank == 0:
        dist.barrier()
    if rank == 0:
        print(data.summary())
    return data


def build_run(cfg, data, rank, world, device):
    """Model, EMA, optimizer, schedule and batch plan for this data on this device."""
    by_class, by_slice = utils.conditions_of(cfg)  # dataset.load_data made sure the data has what these need
    classes = data.classes if by_class else []
    images = utils.to_device_if_fits(data.train, device)
    batch = cfg["BATCH_SIZE"]
    if len(images) < batch * world:
        batch = max(1, len(images) // world)
        if rank == 0:
            print(f"notice: only {len(images)} training images: using batches of {batch} instead of "
                  f"{cfg['BATCH_SIZE']}")
    steps_per_epoch = len(images) // (batch * world)
    bf16 = utils.wants_bf16(cfg, device)
    model = build_model(cfg, len(classes)).to(device, memory_format=utils.memory_format(bf16, device))
    compiled = torch.compile(model) if utils.wants_compile(cfg, device) else model
    cuda = device.type == "cuda"
    return Run(
        cfg=cfg, rank=rank, world=world, device=device, data=data, images=images,
        classes=classes, labels=data.train_labels.to(device) if by_class else None,
        positions=data.train_positions.to(device) if by_slice else None, batch=batch,
        steps_per_epoch=steps_per_epoch, total_steps=steps_per_epoch * cfg["EPOCHS"],
        schedule=utils.NoiseSchedule(cfg["TIMESTEPS"], cfg["BETA_SCHEDULE"], cfg["PREDICTION"]), model=model,
        ema=make_ema(model, cfg),
        optimizer=torch.optim.AdamW(model.parameters(), lr=cfg["LR"], betas=(0.9, cfg["ADAM_BETA2"]),
                                    weight_decay=cfg["WEIGHT_DECAY"], fused=True),
        net=DistributedDataParallel(compiled, device_ids=[device.index] if cuda else None) if world > 1 else compiled,
        noise_gen=torch.Generator(device=device).manual_seed(cfg["SEED"]),
        bf16=bf16)


def resume(run, fresh):
    """The progress of the checkpoint in OUTPUT_DIR, with model, EMA, optimizer and RNGs restored; or a new start."""
    state, resumed_from = (None, None) if fresh else load_resume_state(run.path("checkpoint.pt"))
    if state is None:
        return Progress(run.device)
    as_tuple = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    changed = [f"{k}={state['config'].get(k)} (now {run.cfg[k]})" for k in MODEL_KEYS
               if as_tuple(state["config"].get(k)) != as_tuple(run.cfg[k])]
    if changed:
        raise UserError(f"{resumed_from} was trained with {', '.join(changed)}: restore those settings, "
                        f"or start over with --fresh (or another --output-dir)")
    if state.get("fingerprint") != run.data.fingerprint and run.master:
        print(f"notice: the data changed since {resumed_from} was written; resuming on the new data")
    run.model.load_state_dict(state["model"])
    run.ema.module.load_state_dict(state["ema"])
    run.ema.n_averaged.fill_(state["step"])
    run.optimizer.load_state_dict(state["optimizer"])
    for group in run.optimizer.param_groups:  # the settings of this run, not those saved with the moments
        group.update(betas=(0.9, run.cfg["ADAM_BETA2"]), weight_decay=run.cfg["WEIGHT_DECAY"])
    run.noise_gen.set_state(state["noise_rng"])
    torch.set_rng_state(state["cpu_rng"])
    if run.master:
        print(f"resuming from {resumed_from} at step {state['step']:,} (use --fresh to start over)")
    history = state["history"]
    end_seconds, save_seconds = state.get("reserve_s", (0.0, 0.0))
    return Progress(run.device, state["step"], state["best_val"], history, guide=state.get("guide"),
                    end_seconds=end_seconds, save_seconds=save_seconds,
                    elapsed_before=state.get("elapsed_s", history[-1]["elapsed_s"] if history else 0.0))


def describe(run):
    """One line: the model's size and the batch plan."""
    length = (f"{run.cfg['TRAIN_MINUTES']:g} minutes of training" if run.cfg["TRAIN_MINUTES"] else
              f"{run.total_steps:,} steps")
    print(f"model: {sum(p.numel() for p in run.model.parameters()) / 1e6:.1f}M parameters, {run.cfg['IMAGE_SIZE']} px, "
          f"batch {run.batch} x {run.world} process(es), {run.steps_per_epoch:,} steps/epoch, {length}, {run.device}"
          + (", bf16" if run.bf16 else ""))


def start_log(run, progress):
    """log.csv from the checkpoint's history: rows a killed run logged after its last checkpoint are dropped."""
    with open(run.path("log.csv"), "w", newline="") as f:
        csv.writer(f).writerows([["step", "epoch", "loss", "val_loss", "lr", "img_per_s", "elapsed_s"]]
                                + [csv_row(row) for row in progress.history])


def log_row(run, progress, val_loss=""):
    """Close the current log window: a history row (appended to log.csv on rank 0), returned."""
    if progress.window_steps:
        loss = (progress.loss_sum / progress.window_steps).item()
        rate = progress.window_steps * run.batch * run.world / (time.perf_counter() - progress.window_start)
    else:  # an epoch that ended right on a log step
        last = progress.history[-1] if progress.history else {"loss": float("nan"), "img_per_s": 0.0}
        loss, rate = last["loss"], last["img_per_s"]
    row = {"step": progress.step, "epoch": progress.step / run.steps_per_epoch, "loss": loss, "val_loss": val_loss,
           "lr": learning_rate(run.cfg, progress.step, decay_progress(run, progress)), "img_per_s": rate,
           "elapsed_s": progress.elapsed_before + now() - progress.started}
    progress.loss_sum.zero_()
    progress.window_start, progress.window_steps = time.perf_counter(), 0
    if run.master:
        progress.history.append(row)
        with open(run.path("log.csv"), "a", newline="") as f:
            csv.writer(f).writerow(csv_row(row))
    return row


def save(run, progress):
    """checkpoint.pt (everything needed to resume), and best.pt when a new best EMA is waiting."""
    started = now()
    state = {"model": run.model.state_dict(), "ema": run.ema.module.state_dict(), "config": run.cfg,
             "step": progress.step, "epoch": progress.step // max(1, run.steps_per_epoch),
             "best_val": progress.best_val, "history": progress.history, "fingerprint": run.data.fingerprint,
             "classes": run.classes, "noise_rng": run.noise_gen.get_state(),
             "cpu_rng": torch.get_rng_state(), "optimizer": run.optimizer.state_dict(),
             "elapsed_s": progress.elapsed_before + started - progress.started,
             "reserve_s": [progress.end_seconds, progress.save_seconds], "guide": progress.guide}
    utils.save_checkpoint(state, run.path("checkpoint.pt"))
    if progress.best_ema is not None:
        best = {k: v for k, v in state.items() if k not in ("optimizer", "model", "ema")}
        utils.save_checkpoint(dict(best, model=progress.best_ema, ema=progress.best_ema), run.path("best.pt"))
        progress.best_ema = None
    progress.save_seconds = max(progress.save_seconds, now() - started)


def train_epoch(run, progress, stop):
    """The rest of the current epoch, one optimizer step at a time; logs and checkpoints on the way."""
    cfg = run.cfg
    epoch, first = divmod(progress.step, run.steps_per_epoch)
    order = torch.randperm(len(run.images), generator=torch.Generator().manual_seed(cfg["SEED"] + epoch))
    order, global_batch = order.to(run.images.device), run.batch * run.world
    bar = tqdm(total=run.steps_per_epoch, initial=first, disable=not run.master, leave=False, dynamic_ncols=True,
               desc=f"epoch {epoch + 1}" + ("" if cfg["TRAIN_MINUTES"] else f"/{cfg['EPOCHS']}"),
               mininterval=1 if sys.stderr.isatty() else 60)
    for i in range(first, run.steps_per_epoch):
        idx = order[i * global_batch:(i + 1) * global_batch]
        x0, t, noise, cond = make_batch(run.images, idx, run.noise_gen, cfg, run.rank, run.world, run.device,
                                        run.labels, run.positions)
        for group in run.optimizer.param_groups:
            group["lr"] = learning_rate(cfg, progress.step, decay_progress(run, progress))
        loss, bad = train_step(run.net, run.model, run.optimizer, run.schedule, x0, t, noise, cond, cfg,
                               run.bf16)
        run.ema.update_parameters(run.model)
        progress.record(loss, bad)
        keep_guide(run, progress)
        bar.update()
        if progress.step % cfg["LOG_EVERY"] == 0:
            read_clock(run, progress)
            if progress.bad_run.item() >= cfg["MAX_NONFINITE"]:
                raise UserError(f"the loss was not finite for {int(progress.bad_run.item())} steps in a row at step "
                                f"{progress.step}: lower --lr or --batch-size; the last good checkpoint is kept")
            row = log_row(run, progress)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.1e}", img_s=f"{row['img_per_s']:.0f}")
        if run.master and progress.step % cfg["CHECKPOINT_EVERY"] == 0:
            save(run, progress)
        if stop.requested or done_share(run, progress) >= 1:
            break
    bar.close()


def keep_guide(run, progress):
    """Once GUIDE_AT of the run is done, copy the EMA weights (to the CPU): the early snapshot autoguidance uses."""
    if progress.guide is None and done_share(run, progress) >= run.cfg["GUIDE_AT"]:
        progress.guide = {"step": progress.step,
                          "weights": {k: v.detach().cpu().clone() for k, v in run.ema.module.state_dict().items()}}


def guide_model(run, progress):
    """The early snapshot as a network, or None before it is taken."""
    if progress.guide is None:
        return None
    return load_network(run.cfg, len(run.classes), progress.guide["weights"], run.device, run.bf16)


def validate(run, progress):
    """Rank 0, after an epoch (or the part of one a time budget left): validation loss, the best EMA kept in memory,
    a log row and a line; returns its seconds."""
    cfg, epoch, started = run.cfg, math.ceil(progress.step / run.steps_per_epoch), now()
    paused = time.perf_counter()
    val_cond = (run.data.val_labels if run.labels is not None else None,
                run.data.val_positions if run.positions is not None else None)
    val = validation_loss(run.ema.module, run.schedule, run.data.val, val_cond, cfg, run.device, run.bf16)
    progress.window_start += time.perf_counter() - paused  # keep img/s a training figure
    row = log_row(run, progress, val)
    if val < progress.best_val:  # written with the next checkpoint
        progress.best_val = val
        progress.best_ema = {k: v.detach().to("cpu", copy=True) for k, v in run.ema.module.state_dict().items()}
    skipped, budget = int(progress.bad_total.item()), cfg["TRAIN_MINUTES"]
    print(f"epoch {epoch}" + ("" if budget else f"/{cfg['EPOCHS']}") + f"  step {progress.step:,}  loss "
          f"{row['loss']:.4f}  val {val:.4f}  lr {row['lr']:.1e}  {row['img_per_s']:,.0f} img/s  "
          f"{row['elapsed_s'] / 60:.1f}" + (f"/{budget:g}" if budget else "") + " min"
          + (f"  ({skipped} non-finite steps skipped)" if skipped else ""))
    return now() - started


def samples_due(run, progress, last):
    """Whether this epoch's end draws a sample grid: every SAMPLE_EVERY epochs, at the end, and (with a time budget,
    to learn how long it takes) after the first."""
    epoch = math.ceil(progress.step / run.steps_per_epoch)
    return last or epoch % run.cfg["SAMPLE_EVERY"] == 0 or bool(run.cfg["TRAIN_MINUTES"] and epoch == 1)


def draw_samples(run, progress, val_seconds):
    """Rank 0: the sample grid and the loss plot; the end-of-epoch time they took with the validation is kept as
    the reserve a time budget leaves for the end."""
    started, epoch = now(), math.ceil(progress.step / run.steps_per_epoch)
    sample_grid(run.ema.module, guide_model(run, progress), run.schedule, run.cfg, run.device,
                run.path(os.path.join("samples", f"epoch_{epoch:04d}.png")), run.classes)
    plot_losses(progress.history, run.path("loss.png"))
    progress.end_seconds = max(progress.end_seconds, val_seconds + now() - started)


def end_epoch(run, progress):
    """After an epoch: validation (rank 0), then, with every rank agreeing, whether the run is done; samples when due.
    Returns whether the run is done."""
    val_seconds = validate(run, progress) if run.master else 0.0
    read_clock(run, progress, rate=False)
    last = done_share(run, progress) >= 1
    if samples_due(run, progress, last):
        if run.master:
            draw_samples(run, progress, val_seconds)
        read_clock(run, progress, rate=False)
    return last


def check_ranks_agree(run):
    """Every rank must hold the same weights after DDP training; say so, cheaply."""
    flat = torch.cat([p.detach().reshape(-1) for p in run.model.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, 0)
    gap = (flat - reference).abs().max()
    dist.all_reduce(gap, op=dist.ReduceOp.MAX)
    if run.master:
        print(f"weights identical on all {run.world} ranks" if gap.item() == 0 else
              f"warning: ranks differ by {gap.item():.2e}")
    dist.barrier()  # no rank tears its connections down while another still uses them
    dist.destroy_process_group()


def finish(run, progress, stop):
    """Save; exit with code 130 when stopped early."""
    if stop.requested:
        if run.master:
            save(run, progress)
            print(f"\nstopped at step {progress.step:,}: checkpoint saved to {run.path('checkpoint.pt')}; "
                  f"run train.py again to resume")
        raise SystemExit(130)
    if run.world > 1:
        check_ranks_agree(run)
    if run.master:
        save(run, progress)
        print(f"done: {progress.step:,} steps; checkpoint {run.path('checkpoint.pt')}, samples in "
              f"{run.path('samples')}")


def main():
    cfg, fresh = parse_settings()
    rank, world, device = setup_distributed()
    prepare_process(cfg, rank, device)
    data = load_training_data(cfg, rank, world)
    run = build_run(cfg, data, rank, world, device)
    progress = resume(run, fresh)
    stop = StopRequest()
    if run.master:
        describe(run)
        start_log(run, progress)
    try:
        while not stop.requested and done_share(run, progress) < 1:
            train_epoch(run, progress, stop)
            if stop.requested or end_epoch(run, progress):
                break
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"CUDA ran out of memory at batch {run.batch}, {cfg['IMAGE_SIZE']} px: try a smaller "
                        f"--batch-size or --image-size") from None
    finish(run, progress, stop)


if __name__ == "__main__":
    utils.run(main)
