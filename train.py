"""Train the brain-MRI DDPM. Resumes from OUTPUT_DIR/checkpoint.pt unless --fresh.

    python train.py                          # the constants in utils.py
    python train.py --image-size 64          # any constant, overridden
    python train.py @configs/cpu_quick.args  # a preset: the flags in that file (flags after it override them)
    torchrun --nproc_per_node=4 train.py     # several GPUs (BATCH_SIZE is per GPU)

With a time budget (TRAIN_MINUTES) the first steps are timed and the budget is turned into a number of steps, the
plan, printed before training goes on; the learning rate then follows the step alone.
"""
import csv
import functools
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

import budget
import checkpoints
import dataset
import distributed
import evaluate
import pictures
import utils
from budget import Plan
from modules import Denoiser, build_model, load_network
from utils import InputError

# settings a checkpoint must share with the run that resumes it
MODEL_KEYS = ("IMAGE_SIZE", "PATCH_SIZE", "CHANNELS", "BASE_CHANNELS", "CHANNEL_MULT", "NUM_RES_BLOCKS",
              "ATTN_RESOLUTIONS", "NUM_HEADS", "TIMESTEPS", "BETA_SCHEDULE", "PREDICTION", "CONDITION")
VAL_IMAGES = 512  # validation images (fixed subset, fixed noise and timesteps)
GRID_SAMPLES = 36  # images in each training sample grid
GRID_STEPS = 25  # sampler steps of the training grids, previews that should not eat the budget (at most SAMPLE_STEPS)
PLAN_SKIP = 10  # a time budget's plan: first steps of a process left untimed (compilation, memory allocation)
PLAN_STEPS = 40  # a time budget's plan: steps timed after those, to turn the budget into a number of steps
PROCESS_START = time.time()  # when this process started (the demo and the data are read before training)


def now():
    """Wall-clock seconds (a function of its own, so that a test can train on a fake clock)."""
    return time.time()


# ---------------------------------------------------------------- one training step
def learning_rate(cfg, step, total):
    """Linear warm-up over WARMUP_STEPS, then constant, or a cosine decay that reaches LR_FLOOR * LR at step `total`
    (None while a time budget's plan is not made yet: the peak)."""
    if step < cfg["WARMUP_STEPS"]:
        return cfg["LR"] * (step + 1) / cfg["WARMUP_STEPS"]
    if cfg["LR_DECAY"] == "constant" or total is None:
        return cfg["LR"]
    done = (step - cfg["WARMUP_STEPS"]) / max(1, total - cfg["WARMUP_STEPS"])
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, done))))
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


def training_timesteps(cfg, n, gen, device):
    """n training timesteps: uniform, logit-normal (t / T = sigmoid(z), z ~ N(0, 1)), or edm (ln of the noise-to-signal
    ratio ~ N(EDM_MEAN, EDM_STD^2), each taken to the first step t whose ratio reaches it)."""
    if cfg["TIMESTEP_SAMPLING"] == "uniform":
        return torch.randint(0, cfg["TIMESTEPS"], (n,), generator=gen, device=device)
    if cfg["TIMESTEP_SAMPLING"] == "logit-normal":
        u = torch.randn(n, generator=gen, device=device).sigmoid()
        return (u * cfg["TIMESTEPS"]).long().clamp(max=cfg["TIMESTEPS"] - 1)
    ratio = (cfg["EDM_MEAN"] + cfg["EDM_STD"] * torch.randn(n, generator=gen, device=device)).exp()
    levels = utils.noise_to_signal(cfg["BETA_SCHEDULE"], cfg["TIMESTEPS"], device)
    return torch.searchsorted(levels, ratio).clamp(max=cfg["TIMESTEPS"] - 1)


def make_batch(images, idx, gen, cfg, rank, world, device, labels=None, positions=None):
    """This rank's share of a global batch: x0 in [-1, 1], t, noise, and cond = (class labels, slice positions),
    each condition dropped on its own with chance COND_DROP (to -1 and NaN: 'not given'), None where not given.

    Every rank draws the whole global batch's random numbers, so any world size sees the same ones.
    """
    n, mine = len(idx), slice(rank * (len(idx) // world), (rank + 1) * (len(idx) // world))
    noise = torch.randn((n, *images.shape[1:]), generator=gen, device=device)[mine]
    t = training_timesteps(cfg, n, gen, device)[mine]
    flip = torch.rand(n, generator=gen, device=device)[mine] < 0.5
    drop_class, drop_slice = torch.rand(2, n, generator=gen, device=device)[:, mine] < cfg["COND_DROP"]
    x0 = images[idx[mine]].to(device, non_blocking=True).float().div_(127.5).sub_(1)
    layout = utils.memory_format(utils.wants_bf16(cfg, device), device)
    x0 = x0.contiguous(memory_format=layout)
    if cfg["HFLIP"]:
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    labels = None if labels is None else torch.where(drop_class, -1, labels[idx[mine]])
    positions = None if positions is None else torch.where(drop_slice, torch.nan, positions[idx[mine]])
    return x0, t, noise.contiguous(memory_format=layout), (labels, positions)


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


# ---------------------------------------------------------------- what a run writes besides checkpoints
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
        part = slice(i, i + cfg["BATCH_SIZE"])
        given = [None if c is None else c[part].to(device) for c in cond]
        total += batch_loss(model, schedule, x0[part].to(device), t[part].to(device), noise[part].to(device), given,
                            cfg, bf16).sum().item()
    return total / n


def grid_steps(cfg):
    return min(GRID_STEPS, cfg["SAMPLE_STEPS"])


def sample_grid(ema_model, guide, schedule, cfg, device, path, classes):
    """A grid of EMA samples with the fast sampler in GRID_STEPS steps and a fixed seed (comparable across epochs),
    autoguided by the guide once there is one; conditional models cycle through the classes (rows of the grid) and
    spread the slice positions from bottom to top."""
    gen = torch.Generator(device=device).manual_seed(cfg["SEED"])
    spread = (0.0, 1.0) if utils.conditions_of(cfg)[1] else None
    labels, positions = utils.spread_conditions(GRID_SAMPLES, list(range(len(classes))), spread)
    labels, positions = (None if c is None else c.to(device) for c in (labels, positions))
    denoiser = Denoiser(ema_model, labels, positions, cfg["GUIDANCE"], guide, cfg["AUTOGUIDANCE"],
                        utils.wants_bf16(cfg, device))
    x = schedule.sample(denoiser, (GRID_SAMPLES, cfg["CHANNELS"], cfg["IMAGE_SIZE"], cfg["IMAGE_SIZE"]), "dpm++sde",
                        grid_steps(cfg), generator=gen, device=device, spacing=cfg["STEP_SPACING"])
    utils.save_png(x, path, nrow=6)


def csv_row(row):
    """One history entry as a log.csv row."""
    return [f"{v:.6g}" if isinstance(v, float) else v for v in row.values()]


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
    schedule: utils.NoiseSchedule
    model: torch.nn.Module
    ema: AveragedModel
    optimizer: torch.optim.Optimizer
    net: torch.nn.Module  # the model as trained: compiled and/or wrapped in DDP
    noise_gen: torch.Generator
    bf16: bool  # bf16 autocast (BF16 on this device)
    setup_s: float  # seconds this process took before training (the demo, the data, the model)

    @property
    def master(self):
        return self.rank == 0

    def path(self, name):
        return os.path.join(self.cfg["OUTPUT_DIR"], name)


@dataclass
class Progress:
    """What changes as a run goes: the step, the best validation loss, the history and the plan travel in the
    checkpoint; the device-side accumulators are read every LOG_EVERY steps (the only host syncs)."""
    device: torch.device
    step: int = 0
    best_val: float = math.inf
    history: list = field(default_factory=list)  # the rows of log.csv
    plan: Plan | None = None  # None until a time budget's first steps are timed
    best_ema: dict | None = None  # EMA weights of the lowest validation loss, not yet written to best.pt
    guide: dict | None = None  # {"step", "weights"}: the EMA at GUIDE_AT of the run, for autoguidance
    elapsed_before: float = 0.0  # seconds of training before this process started
    started: float = field(default_factory=lambda: now())
    out_of_time: bool = False  # the clock says the budget is spent, whatever the plan said
    first_step: int = field(init=False)  # the step this process started at
    timer: float = 0.0  # when the plan's timed steps began
    window_start: float = field(default_factory=lambda: now())  # the current log window
    window_steps: int = 0
    loss_sum: torch.Tensor = field(init=False)
    bad_run: torch.Tensor = field(init=False)  # non-finite losses in a row
    bad_total: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.loss_sum, self.bad_run, self.bad_total = (torch.zeros((), device=self.device) for _ in range(3))
        self.first_step = self.step

    def record(self, loss, bad):
        """Count one optimizer step: its loss (unless skipped) and whether it was skipped."""
        self.bad_run.mul_(bad).add_(bad)
        self.bad_total.add_(bad)
        self.loss_sum.add_(torch.where(bad, 0.0, loss))
        self.step += 1
        self.window_steps += 1

    def elapsed(self):
        """Seconds of training so far, this process's and those before it."""
        return self.elapsed_before + now() - self.started

    def finished(self):
        return self.out_of_time or (self.plan is not None and self.step >= self.plan.steps)

    def total(self):
        """The run's steps, where known: what the learning rate decays over."""
        return self.plan.steps if self.plan else None


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
    cfg, args = utils.parse_settings(parser)
    return cfg, args.fresh


def prepare_process(cfg, rank, device):
    """Seed this process, check the output folder (rank 0), and pick the fast paths of a GPU."""
    if rank == 0:
        checkpoints.check_writable(cfg["OUTPUT_DIR"])
        checkpoints.remove_stale_temps(cfg["OUTPUT_DIR"])
    torch.manual_seed(cfg["SEED"] + rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


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
    bf16 = utils.wants_bf16(cfg, device)
    model = build_model(cfg, len(classes)).to(device, memory_format=utils.memory_format(bf16, device))
    compiled = torch.compile(model) if utils.wants_compile(cfg, device) else model
    cuda = device.type == "cuda"
    return Run(
        cfg=cfg, rank=rank, world=world, device=device, data=data, images=images,
        classes=classes, labels=data.train_labels.to(device) if by_class else None,
        positions=data.train_positions.to(device) if by_slice else None, batch=batch,
        steps_per_epoch=len(images) // (batch * world),
        schedule=utils.NoiseSchedule(cfg["TIMESTEPS"], cfg["BETA_SCHEDULE"], cfg["PREDICTION"]), model=model,
        ema=make_ema(model, cfg),
        optimizer=torch.optim.AdamW(model.parameters(), lr=cfg["LR"], betas=(0.9, cfg["ADAM_BETA2"]),
                                    weight_decay=cfg["WEIGHT_DECAY"], fused=True),
        net=DistributedDataParallel(compiled, device_ids=[device.index] if cuda else None) if world > 1 else compiled,
        noise_gen=torch.Generator(device=device).manual_seed(cfg["SEED"]),
        bf16=bf16, setup_s=time.time() - PROCESS_START)


def kept_plan(run, saved):
    """The plan a run starts with: EPOCHS passes; or a checkpoint's plan for the same time budget; or None (to be
    made from this process's first steps)."""
    if not run.cfg["TRAIN_MINUTES"]:
        return Plan(run.steps_per_epoch * run.cfg["EPOCHS"])
    if saved and tuple(saved["made_for"]) == budget.made_for(run.cfg):
        return Plan(**saved)
    return None


def resume(run, fresh):
    """The progress of the checkpoint in OUTPUT_DIR, with model, EMA, optimizer and RNGs restored; or a new start."""
    state, resumed_from = (None, None) if fresh else checkpoints.load_resume_state(run.path("checkpoint.pt"))
    if state is None:
        return Progress(run.device, plan=kept_plan(run, None))
    as_tuple = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    changed = [f"{k}={state['config'].get(k)} (now {run.cfg[k]})" for k in MODEL_KEYS
               if as_tuple(state["config"].get(k)) != as_tuple(run.cfg[k])]
    if changed:
        raise InputError(f"{resumed_from} was trained with {', '.join(changed)}: restore those settings, "
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
    return Progress(run.device, state["step"], state["best_val"], history, kept_plan(run, state.get("plan")),
                    guide=state.get("guide"),
                    elapsed_before=state.get("elapsed_s", history[-1]["elapsed_s"] if history else 0.0))


def describe(run):
    """One line: the model's size and the batch plan."""
    cfg = run.cfg
    length = (f"a {cfg['TRAIN_MINUTES']:g}-minute budget" + (f" (at least {cfg['MIN_STEPS']:,} steps)"
              if cfg["MIN_STEPS"] else "") if cfg["TRAIN_MINUTES"] else f"{run.steps_per_epoch * cfg['EPOCHS']:,} steps")
    print(f"model: {sum(p.numel() for p in run.model.parameters()) / 1e6:.1f}M parameters, {cfg['IMAGE_SIZE']} px, "
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
        rate = progress.window_steps * run.batch * run.world / max(now() - progress.window_start, 1e-9)
    else:  # an epoch that ended right on a log step
        last = progress.history[-1] if progress.history else {"loss": float("nan"), "img_per_s": 0.0}
        loss, rate = last["loss"], last["img_per_s"]
    row = {"step": progress.step, "epoch": progress.step / run.steps_per_epoch, "loss": loss, "val_loss": val_loss,
           "lr": learning_rate(run.cfg, progress.step, progress.total()), "img_per_s": rate,
           "elapsed_s": progress.elapsed()}
    progress.loss_sum.zero_()
    progress.window_start, progress.window_steps = now(), 0
    if run.master:
        progress.history.append(row)
        with open(run.path("log.csv"), "a", newline="") as f:
            csv.writer(f).writerow(csv_row(row))
    return row


def save(run, progress):
    """checkpoint.pt (everything needed to resume), and best.pt when a new best EMA is waiting; returns its seconds."""
    started = now()
    state = {"model": run.model.state_dict(), "ema": run.ema.module.state_dict(), "config": run.cfg,
             "step": progress.step, "epoch": progress.step // max(1, run.steps_per_epoch),
             "best_val": progress.best_val, "history": progress.history, "fingerprint": run.data.fingerprint,
             "classes": run.classes, "noise_rng": run.noise_gen.get_state(),
             "cpu_rng": torch.get_rng_state(), "optimizer": run.optimizer.state_dict(),
             "elapsed_s": progress.elapsed(), "plan": progress.plan and asdict(progress.plan), "guide": progress.guide}
    checkpoints.save_checkpoint(state, run.path("checkpoint.pt"))
    if progress.best_ema is not None:
        best = {k: v for k, v in state.items() if k not in ("optimizer", "model", "ema")}
        checkpoints.save_checkpoint(dict(best, model=progress.best_ema, ema=progress.best_ema), run.path("best.pt"))
        progress.best_ema = None
    return now() - started


# ---------------------------------------------------------------- a time budget, turned into steps
def time_first_steps(run, progress):
    """With a time budget and no plan: time this process's steps PLAN_SKIP to PLAN_SKIP + PLAN_STEPS, then plan."""
    done = progress.step - progress.first_step
    if done in (PLAN_SKIP, PLAN_SKIP + PLAN_STEPS) and run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    if done == PLAN_SKIP:
        progress.timer = now()
    elif done == PLAN_SKIP + PLAN_STEPS:
        make_plan(run, progress, (now() - progress.timer) / PLAN_STEPS)


def make_plan(run, progress, step_s):
    """budget.plan_steps on rank 0, every rank getting its answer; a validation, a checkpoint and a few steps of the
    probe network's training (for predict.py's time) are timed now."""
    cfg, answer = run.cfg, torch.zeros(3, dtype=torch.float64, device=run.device)
    if run.master:
        val_s, save_s, val_images = validate(run, progress), save(run, progress), min(VAL_IMAGES, len(run.data.val))
        costs = budget.Costs(step_s, val_s, save_s,
                             budget.grid_seconds(cfg, val_s, val_images, GRID_SAMPLES, grid_steps(cfg)))
        at = (cfg, progress.step, progress.elapsed(), costs, run.steps_per_epoch)
        plan = budget.plan_steps(*at)
        predict_s = budget.predict_seconds(cfg, len(run.classes), val_s / val_images,
                                           evaluate.probe_seconds(run.data, run.device))
        print(budget.describe(*at, run.batch * run.world / step_s, run.setup_s, predict_s), flush=True)
        answer = torch.tensor([plan.steps, plan.minutes, plan.final_s, plan.deadline], dtype=torch.float64,
                              device=run.device)
    steps, minutes, final_s, deadline = distributed.from_rank0(answer, run.world).tolist()
    progress.plan = budget.Plan(int(steps), minutes, final_s, budget.made_for(cfg), deadline)


def check_clock(run, progress, window_s):
    """A safety net for a machine that slows down after the plan: stop where the next log window of window_s seconds
    and the last validation, grid and checkpoint would no longer fit before the plan's deadline, by rank 0's clock."""
    if progress.plan is None or not progress.plan.deadline:
        return
    late = progress.elapsed() + window_s + progress.plan.final_s > 60 * progress.plan.deadline
    late = distributed.from_rank0(torch.tensor(float(late), device=run.device), run.world)
    if late.item() and not progress.finished() and run.master:
        print(f"notice: training slowed down since the plan: stopping at step {progress.step:,} of "
              f"{progress.plan.steps:,} to end within {progress.plan.deadline:g} minutes")
    progress.out_of_time = bool(late.item())


# ---------------------------------------------------------------- epochs
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
            group["lr"] = learning_rate(cfg, progress.step, progress.total())
        loss, bad = train_step(run.net, run.model, run.optimizer, run.schedule, x0, t, noise, cond, cfg,
                               run.bf16)
        run.ema.update_parameters(run.model)
        progress.record(loss, bad)
        if progress.plan is None:
            time_first_steps(run, progress)
        keep_guide(run, progress)
        bar.update()
        if progress.step % cfg["LOG_EVERY"] == 0:
            if progress.bad_run.item() >= cfg["MAX_NONFINITE"]:
                raise InputError(f"the loss was not finite for {int(progress.bad_run.item())} steps in a row at step "
                                 f"{progress.step}: lower --lr or --batch-size; the last good checkpoint is kept")
            row = log_row(run, progress)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.1e}", img_s=f"{row['img_per_s']:.0f}")
            check_clock(run, progress, cfg["LOG_EVERY"] * run.batch * run.world / max(row["img_per_s"], 1e-9))
        if run.master and progress.step % cfg["CHECKPOINT_EVERY"] == 0:
            save(run, progress)
        if stop.requested or progress.finished():
            break
    bar.close()


def keep_guide(run, progress):
    """Once GUIDE_AT of the run is done, copy the EMA weights (to the CPU): the early snapshot autoguidance uses."""
    if progress.guide is None and progress.plan and progress.step >= run.cfg["GUIDE_AT"] * progress.plan.steps:
        progress.guide = {"step": progress.step,
                          "weights": {k: v.detach().cpu().clone() for k, v in run.ema.module.state_dict().items()}}


def guide_model(run, progress):
    """The early snapshot as a network, or None before it is taken."""
    if progress.guide is None:
        return None
    return load_network(run.cfg, len(run.classes), progress.guide["weights"], run.device, run.bf16)


def validate(run, progress):
    """Rank 0: validation loss, the best EMA kept in memory, a log row and a line; returns its seconds."""
    cfg, epoch, started = run.cfg, math.ceil(progress.step / run.steps_per_epoch), now()
    val_cond = (run.data.val_labels if run.labels is not None else None,
                run.data.val_positions if run.positions is not None else None)
    val = validation_loss(run.ema.module, run.schedule, run.data.val, val_cond, cfg, run.device, run.bf16)
    progress.window_start += now() - started  # keep img/s a training figure
    row = log_row(run, progress, val)
    if val < progress.best_val:  # written with the next checkpoint
        progress.best_val = val
        progress.best_ema = {k: v.detach().to("cpu", copy=True) for k, v in run.ema.module.state_dict().items()}
    skipped = int(progress.bad_total.item())
    minutes = progress.plan.minutes if cfg["TRAIN_MINUTES"] and progress.plan else cfg["TRAIN_MINUTES"]
    print(f"epoch {epoch}" + ("" if minutes else f"/{cfg['EPOCHS']}") + f"  step {progress.step:,}  loss "
          f"{row['loss']:.4f}  val {val:.4f}  lr {row['lr']:.1e}  {row['img_per_s']:,.0f} img/s  "
          f"{row['elapsed_s'] / 60:.1f}" + (f"/{minutes:.1f}" if minutes else "") + " min"
          + (f"  ({skipped} non-finite steps skipped)" if skipped else ""))
    return now() - started


def end_epoch(run, progress):
    """After an epoch (or the part of one that ended the run), rank 0: validation; a sample grid and the loss plot
    every SAMPLE_EVERY epochs and at the end. Returns whether the run is done."""
    epoch, last = math.ceil(progress.step / run.steps_per_epoch), progress.finished()
    if run.master:
        validate(run, progress)
        if last or epoch % run.cfg["SAMPLE_EVERY"] == 0:
            started = now()
            sample_grid(run.ema.module, guide_model(run, progress), run.schedule, run.cfg, run.device,
                        run.path(os.path.join("samples", f"epoch_{epoch:04d}.png")), run.classes)
            pictures.save_loss_plot(progress.history, run.path("loss.png"))
            progress.window_start += now() - started  # keep img/s a training figure
    return last


def finish(run, progress, stop):
    """Save; exit with code 130 when stopped early."""
    if stop.requested:
        if run.master:
            save(run, progress)
            print(f"\nstopped at step {progress.step:,}: checkpoint saved to {run.path('checkpoint.pt')}; "
                  f"run train.py again to resume")
        raise SystemExit(130)
    if run.world > 1:
        distributed.check_ranks_agree(run.model, run.rank, run.world)
    if run.master:
        save(run, progress)
        print(f"done: {progress.step:,} steps in {progress.elapsed() / 60:.1f} min; checkpoint "
              f"{run.path('checkpoint.pt')}, samples in {run.path('samples')}")


def main():
    cfg, fresh = parse_settings()
    rank, world, device = distributed.setup_distributed()
    prepare_process(cfg, rank, device)
    data = distributed.load_once(dataset.load_data, cfg, rank, world)
    if rank == 0:
        print(data.summary())
    run = build_run(cfg, data, rank, world, device)
    progress = resume(run, fresh)
    stop = StopRequest()
    if run.master:
        describe(run)
        start_log(run, progress)
    try:
        while not stop.requested and not progress.finished():
            train_epoch(run, progress, stop)
            if stop.requested or end_epoch(run, progress):
                break
    except torch.cuda.OutOfMemoryError:
        raise InputError(f"CUDA ran out of memory at batch {run.batch}, {cfg['IMAGE_SIZE']} px: try a smaller "
                         f"--batch-size or --image-size") from None
    finish(run, progress, stop)


if __name__ == "__main__":
    utils.run_main(main)
