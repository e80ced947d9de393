"""Train the brain-MRI DDPM. Resumes from OUTPUT_DIR/checkpoint.pt unless --fresh.

    python train.py                          # the constants in utils.py
    python train.py --image-size 64          # any constant, overridden
    python train.py @configs/cpu_quick.args  # a preset: the flags in that file (flags after it override them)
    torchrun --nproc_per_node=4 train.py     # several GPUs (BATCH_SIZE is per GPU)

With a time budget (TRAIN_MINUTES) the first steps are timed and the budget is turned into a number of steps, the
plan, printed before training goes on and made again when the speed moves; the learning rate decays over its steps.
"""
import csv
import dataclasses
import functools
import math
import os
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
import objective
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
REPLAN_CHANGE = 0.15  # a time budget's plan is made again when steps since it cost more than this share off it
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


def train_step(net, model, optimizer, schedule, x0, t, noise, cond, cfg, bf16):
    """One optimizer step; returns (loss, skipped) as device tensors, without syncing with the host."""
    loss = objective.batch_loss(net, schedule, x0, t, noise, cond, cfg, bf16).mean()
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
        total += objective.batch_loss(model, schedule, x0[part].to(device), t[part].to(device),
                                      noise[part].to(device), given, cfg, bf16).sum().item()
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
    return x


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
    covariates: torch.Tensor | None  # its covariates (N x K, NaN: not in the table), scaled to [0, 1], when asked
    covariate_ranges: list  # each covariate's (lowest, highest) training value: what the scaling maps to 0 and 1
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
    board: object = None  # a TensorBoard SummaryWriter into OUTPUT_DIR/tb/ (rank 0, where tensorboard is installed)

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
    snapshot: dict | None = None  # {"step", "weights"}: the EMA at GUIDE_AT of the run, the guide of autoguidance
    elapsed_before: float = 0.0  # seconds of training before this process started
    started: float = field(default_factory=lambda: now())
    out_of_time: bool = False  # the clock says the budget is spent, whatever the plan said
    first_step: int = field(init=False)  # the step this process started at
    timer: float = 0.0  # when the plan's timed steps began
    window_start: float = field(default_factory=lambda: now())  # the current log window
    window_steps: int = 0
    paced_s: float = 0.0  # training seconds since the plan was made or revised (validations and grids left out)
    paced_steps: int = 0  # and the steps they took
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
    ranges = utils.covariate_ranges(data.train_covariates) if utils.covariates_of(cfg) else []
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
        positions=data.train_positions.to(device) if by_slice else None,
        covariates=utils.scaled_covariates(data.train_covariates, ranges).to(device) if ranges else None,
        covariate_ranges=ranges, batch=batch,
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
        return Plan.from_saved(saved)
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
                    snapshot=state.get("guide"),
                    elapsed_before=state.get("elapsed_s", history[-1]["elapsed_s"] if history else 0.0))


def say_model(run):
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
    progress.paced_s += now() - progress.window_start
    progress.paced_steps += progress.window_steps
    row = {"step": progress.step, "epoch": progress.step / run.steps_per_epoch, "loss": loss, "val_loss": val_loss,
           "lr": learning_rate(run.cfg, progress.step, progress.total()), "img_per_s": rate,
           "elapsed_s": progress.elapsed()}
    progress.loss_sum.zero_()
    progress.window_start, progress.window_steps = now(), 0
    if run.board is not None:
        for name in ("loss", "lr", "img_per_s") + (("val_loss",) if val_loss != "" else ()):
            run.board.add_scalar(name, row[name], progress.step)
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
             "classes": run.classes, "covariates": dict(zip(utils.covariates_of(run.cfg), run.covariate_ranges)),
             "noise_rng": run.noise_gen.get_state(),
             "cpu_rng": torch.get_rng_state(), "optimizer": run.optimizer.state_dict(),
             "elapsed_s": progress.elapsed(), "plan": progress.plan and asdict(progress.plan),
             "guide": progress.snapshot}
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
        step_s = (now() - progress.timer) / PLAN_STEPS
        make_plan(run, progress, measure_costs(run, progress, step_s) if run.master else None)


def measure_costs(run, progress, step_s):
    """Rank 0: what the parts of a run cost: steps of step_s seconds, a validation and a checkpoint timed now, a
    sample grid told from the validation."""
    val_s, save_s, val_images = validate(run, progress), save(run, progress), min(VAL_IMAGES, len(run.data.val))
    return budget.Costs(step_s, val_s, save_s,
                        budget.grid_seconds(run.cfg, val_s, val_images, GRID_SAMPLES, grid_steps(run.cfg)))


def make_plan(run, progress, costs, revised=False):
    """budget.plan_steps from these costs on rank 0 (None elsewhere), said in words; every rank gets its answer. The
    steps taken from now on are timed afresh (follow_speed)."""
    cfg, answer = run.cfg, torch.zeros(4, dtype=torch.float64, device=run.device)
    if run.master:
        at = (cfg, progress.step, progress.elapsed(), costs, run.steps_per_epoch)
        plan = budget.plan_steps(*at)
        forward_s = costs.validation / min(VAL_IMAGES, len(run.data.val))  # one image through the network
        print(budget.plan_in_words(*at, run.batch * run.world / costs.step, run.setup_s,
                                   budget.sampling_seconds(cfg, forward_s, cfg["NUM_SAMPLES"]), revised), flush=True)
        answer = torch.tensor([plan.steps, plan.minutes, plan.final_s, plan.deadline], dtype=torch.float64,
                              device=run.device)
    steps, minutes, final_s, deadline = distributed.from_rank0(answer, run.world).tolist()
    progress.plan = budget.Plan(int(steps), minutes, final_s, budget.made_for(cfg), deadline, costs)
    progress.paced_s, progress.paced_steps = progress.window_start - now(), -progress.window_steps  # from now on


def follow_speed(run, progress):
    """At a log point under a time budget: where the steps since the plan (at least PLAN_STEPS of them) cost more
    than REPLAN_CHANGE away from what it was made from, plan again from their cost (rank 0 decides)."""
    if not run.cfg["TRAIN_MINUTES"] or progress.plan is None:
        return
    step_s = progress.paced_s / max(1, progress.paced_steps)
    moved = run.master and progress.paced_steps >= PLAN_STEPS and budget.speed_moved(progress.plan, step_s,
                                                                                      REPLAN_CHANGE)
    moved, step_s = distributed.from_rank0(torch.tensor([float(moved), step_s], dtype=torch.float64,
                                                        device=run.device), run.world).tolist()
    if moved:
        make_plan(run, progress, dataclasses.replace(progress.plan.costs, step=step_s) if run.master else None,
                  revised=True)


def check_clock(run, progress, window_s):
    """A safety net for a machine that slows down faster than the plan follows: stop where the next log window of
    window_s seconds and the last validation, grid and checkpoint would no longer fit before the plan's deadline, by
    rank 0's clock."""
    if progress.plan is None or not progress.plan.deadline:
        return
    late = progress.elapsed() + window_s + progress.plan.final_s > 60 * progress.plan.deadline
    late = distributed.from_rank0(torch.tensor(float(late), device=run.device), run.world)
    if late.item() and not progress.finished() and run.master:
        print(f"notice: training slowed down since the plan: stopping at step {progress.step:,} of "
              f"{progress.plan.steps:,} to end within {progress.plan.deadline:g} minutes")
    progress.out_of_time = bool(late.item())


# ---------------------------------------------------------------- what the loop calls
def keep_snapshot(run, progress):
    """Once GUIDE_AT of the run is done, copy the EMA weights (to the CPU): the early snapshot autoguidance uses."""
    if progress.snapshot is None and progress.plan and progress.step >= run.cfg["GUIDE_AT"] * progress.plan.steps:
        progress.snapshot = {"step": progress.step,
                          "weights": {k: v.detach().cpu().clone() for k, v in run.ema.module.state_dict().items()}}


def guide_model(run, progress):
    """The early snapshot as a network (the guide of autoguidance), or None before it is taken."""
    if progress.snapshot is None:
        return None
    return load_network(run.cfg, len(run.classes), progress.snapshot["weights"], run.device, run.bf16)


def validate(run, progress):
    """Rank 0: validation loss, the best EMA kept in memory, a log row and a line; returns its seconds."""
    cfg, epoch, started = run.cfg, math.ceil(progress.step / run.steps_per_epoch), now()
    val_cond = (run.data.val_labels if run.labels is not None else None,
                run.data.val_positions if run.positions is not None else None,
                utils.scaled_covariates(run.data.val_covariates, run.covariate_ranges) if run.covariate_ranges else None)
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
    every SAMPLE_EVERY epochs and at the end."""
    epoch, last = math.ceil(progress.step / run.steps_per_epoch), progress.finished()
    if run.master:
        validate(run, progress)
        if last or epoch % run.cfg["SAMPLE_EVERY"] == 0:
            started = now()
            grid = sample_grid(run.ema.module, guide_model(run, progress), run.schedule, run.cfg, run.device,
                               run.path(os.path.join("samples", f"epoch_{epoch:04d}.png")), run.classes)
            if run.board is not None:
                run.board.add_images("samples", utils.to_unit(grid.float().cpu()), progress.step)
            pictures.save_loss_plot(progress.history, run.path("loss.png"))
            progress.window_start += now() - started  # keep img/s a training figure


def finish(run, progress, stop):
    """Save; exit with code 130 when stopped early."""
    if run.board is not None:
        run.board.close()
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


def live_curves(run):
    """Rank 0, where tensorboard is installed: a SummaryWriter into OUTPUT_DIR/tb/, said once; else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        return None
    print(f"live curves: tensorboard --logdir {run.path('tb')}")
    return SummaryWriter(run.path("tb"))


def epoch_bar(run, epoch, first):
    """The progress bar of an epoch (rank 0), starting at its step `first`."""
    return tqdm(total=run.steps_per_epoch, initial=first, disable=not run.master, leave=False, dynamic_ncols=True,
                desc=f"epoch {epoch + 1}" + ("" if run.cfg["TRAIN_MINUTES"] else f"/{run.cfg['EPOCHS']}"),
                mininterval=1 if sys.stderr.isatty() else 60)


# ---------------------------------------------------------------- the training loop
def train(cfg, fresh):
    """A whole training run, top to bottom (under torchrun, on every rank)."""
    # -- set-up: this process, the data, the model and where the run stands
    rank, world, device = distributed.setup_distributed()
    prepare_process(cfg, rank, device)
    data = distributed.load_once(dataset.load_data, cfg, rank, world)
    if rank == 0:
        print(data.summary())
    run = build_run(cfg, data, rank, world, device)
    progress, stop, bar = resume(run, fresh), distributed.StopRequest(), None
    if run.master:
        say_model(run)
        start_log(run, progress)
        run.board = live_curves(run)
    global_batch = run.batch * run.world
    try:
        while not (stop.requested or progress.finished()):
            # -- an epoch starts (or resumes part-way): its order of the images, its progress bar
            epoch, i = divmod(progress.step, run.steps_per_epoch)
            if bar is None:
                order = torch.randperm(len(run.images), generator=torch.Generator().manual_seed(cfg["SEED"] + epoch))
                order, bar = order.to(run.images.device), epoch_bar(run, epoch, i)

            # -- one optimizer step, and the EMA
            x0, t, noise, cond = objective.make_batch(run.images, order[i * global_batch:(i + 1) * global_batch],
                                            run.noise_gen, cfg, run.rank, run.world, run.device, run.labels,
                                            run.positions, run.covariates)
            for group in run.optimizer.param_groups:
                group["lr"] = learning_rate(cfg, progress.step, progress.total())
            loss, bad = train_step(run.net, run.model, run.optimizer, run.schedule, x0, t, noise, cond, cfg,
                                   run.bf16)
            run.ema.update_parameters(run.model)
            progress.record(loss, bad)

            # -- the plan, from the first steps of a time budget; the early snapshot, at GUIDE_AT of it
            if progress.plan is None:
                time_first_steps(run, progress)
            keep_snapshot(run, progress)
            bar.update()

            # -- every LOG_EVERY steps: a log row, the loss's health, the plan following the speed, the clock
            if progress.step % cfg["LOG_EVERY"] == 0:
                if progress.bad_run.item() >= cfg["MAX_NONFINITE"]:
                    raise InputError(f"the loss was not finite for {int(progress.bad_run.item())} steps in a row at "
                                     f"step {progress.step}: lower --lr or --batch-size; the last good checkpoint is "
                                     f"kept")
                row = log_row(run, progress)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.1e}", img_s=f"{row['img_per_s']:.0f}")
                follow_speed(run, progress)
                check_clock(run, progress, cfg["LOG_EVERY"] * global_batch / max(row["img_per_s"], 1e-9))

            # -- every CHECKPOINT_EVERY steps: a checkpoint
            if run.master and progress.step % cfg["CHECKPOINT_EVERY"] == 0:
                save(run, progress)

            # -- an epoch ends (or the run): validation; a sample grid every SAMPLE_EVERY epochs and at the end
            if stop.requested:
                break
            if progress.step % run.steps_per_epoch == 0 or progress.finished():
                bar.close()
                bar = None
                end_epoch(run, progress)
    except torch.cuda.OutOfMemoryError:
        raise InputError(f"CUDA ran out of memory at batch {run.batch}, {cfg['IMAGE_SIZE']} px: try a smaller "
                         f"--batch-size or --image-size") from None
    finish(run, progress, stop)


def main():
    train(*parse_settings())


if __name__ == "__main__":
    utils.run_main(main)
