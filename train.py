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

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

import dataset
import utils
from modules import build_model
from utils import UserError

# settings a checkpoint must share with the run that resumes it
MODEL_KEYS = ("IMAGE_SIZE", "CHANNELS", "BASE_CHANNELS", "CHANNEL_MULT", "NUM_RES_BLOCKS", "ATTN_RESOLUTIONS",
              "NUM_HEADS", "TIMESTEPS", "BETA_SCHEDULE", "PREDICTION", "CONDITIONAL")
# what a checkpoint must hold to be resumed from (best.pt, for one, has no optimizer)
RESUME_KEYS = ("model", "ema", "optimizer", "noise_rng", "cpu_rng", "step", "best_val", "history")
VAL_IMAGES = 512  # validation images (fixed subset, fixed noise and timesteps)
GRID_SAMPLES = 36  # images in each training sample grid


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


def learning_rate(cfg, step, total_steps):
    """Linear warm-up, then constant or cosine decay to 10% of LR."""
    if step < cfg["WARMUP_STEPS"]:
        return cfg["LR"] * (step + 1) / cfg["WARMUP_STEPS"]
    if cfg["LR_DECAY"] == "constant":
        return cfg["LR"]
    progress = min(1.0, (step - cfg["WARMUP_STEPS"]) / max(1, total_steps - cfg["WARMUP_STEPS"]))
    return cfg["LR"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_ema(model, cfg):
    """EMA of the weights (torch.optim.swa_utils): after n updates, decay min(EMA_DECAY, (1+n)/(10+n)); the first copies."""
    ema = AveragedModel(model, multi_avg_fn=functools.partial(ema_lerp, max_decay=cfg["EMA_DECAY"]), use_buffers=True)
    ema.n_averaged = ema.n_averaged.cpu()  # keeps AveragedModel's bookkeeping off the GPU (no sync per step)
    return ema


def ema_lerp(ema_params, params, num_averaged, max_decay):
    """Move the EMA toward the weights with the warm-up decay, on the device (no host sync)."""
    decay = ((1 + num_averaged) / (10 + num_averaged)).clamp(max=max_decay)
    torch._foreach_lerp_(ema_params, params, 1 - decay)


def batch_loss(model, schedule, x0, t, noise, y, cfg, autocast):
    """Per-image min-SNR-weighted MSE of the network's prediction."""
    x_t = schedule.q_sample(x0, t, noise)
    with autocast:
        out = model(x_t, t, y) if y is not None else model(x_t, t)
    err = (out.float() - schedule.target(x0, noise, t)).pow(2).mean(dim=(1, 2, 3))
    return err * schedule.loss_weight(t, cfg["MIN_SNR_GAMMA"])


def make_batch(images, labels, idx, gen, cfg, rank, world, device, num_classes=0):
    """This rank's share of a global batch: x0 in [-1, 1], t, noise, labels (with guidance dropout).

    Every rank draws the whole global batch's random numbers, so any world size sees the same ones.
    """
    n, mine = len(idx), slice(rank * (len(idx) // world), (rank + 1) * (len(idx) // world))
    noise = torch.randn((n, *images.shape[1:]), generator=gen, device=device)[mine]
    t = torch.randint(0, cfg["TIMESTEPS"], (n,), generator=gen, device=device)[mine]
    flip = torch.rand(n, generator=gen, device=device)[mine] < 0.5
    drop = torch.rand(n, generator=gen, device=device)[mine] < cfg["COND_DROP"]
    x0 = images[idx[mine]].to(device, non_blocking=True).float().div_(127.5).sub_(1)
    x0 = x0.contiguous(memory_format=torch.channels_last)
    if cfg["HFLIP"]:
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    y = torch.where(drop, num_classes, labels[idx[mine]]) if num_classes else None  # class num_classes = 'null'
    return x0, t, noise.contiguous(memory_format=torch.channels_last), y


def train_step(net, model, optimizer, schedule, x0, t, noise, y, cfg, autocast):
    """One optimizer step; returns (loss, skipped) as device tensors, without syncing with the host."""
    loss = batch_loss(net, schedule, x0, t, noise, y, cfg, autocast).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["GRAD_CLIP"])
    bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
    optimizer.found_inf = bad.float()  # fused AdamW skips the update when this is 1: no host sync
    optimizer.step()
    return loss.detach(), bad


@torch.no_grad()
def validation_loss(model, schedule, val, cfg, device, autocast):
    """Loss on a fixed validation subset at fixed timesteps and fixed noise: comparable across epochs."""
    gen = torch.Generator(device="cpu").manual_seed(cfg["SEED"] + 1)
    n = min(len(val), VAL_IMAGES)
    x0 = val[torch.randperm(len(val), generator=gen)[:n]].float() / 127.5 - 1
    t = torch.linspace(0, cfg["TIMESTEPS"] - 1, n).round().long()
    noise = torch.randn(x0.shape, generator=gen)
    total = 0.0
    for i in range(0, n, cfg["BATCH_SIZE"]):
        sl = slice(i, i + cfg["BATCH_SIZE"])
        total += batch_loss(model, schedule, x0[sl].to(device), t[sl].to(device), noise[sl].to(device), None,
                            cfg, autocast).sum().item()
    return total / n


def sample_grid(ema_model, schedule, cfg, device, autocast, path, num_classes):
    """A grid of EMA samples with the fast sampler and a fixed seed (comparable across epochs)."""
    gen = torch.Generator(device=device).manual_seed(cfg["SEED"])
    y = torch.arange(GRID_SAMPLES, device=device) % num_classes if num_classes else None

    def net(x, t):
        with autocast:
            return ema_model(x, t, y) if y is not None else ema_model(x, t)
    x = schedule.sample(net, (GRID_SAMPLES, cfg["CHANNELS"], cfg["IMAGE_SIZE"], cfg["IMAGE_SIZE"]), "dpm++sde",
                        cfg["SAMPLE_STEPS"], generator=gen, device=device, spacing=cfg["STEP_SPACING"])
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


def main():
    parser = utils.build_parser(__doc__)
    parser.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start over")
    args = parser.parse_args()
    cfg = utils.check_config(utils.config_from_args(args))
    rank, world, device = setup_distributed()
    master = rank == 0
    out = cfg["OUTPUT_DIR"]
    ckpt_path = os.path.join(out, "checkpoint.pt")
    if master:
        check_writable(out)
        remove_stale_temps(out)
    torch.manual_seed(cfg["SEED"] + rank)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    # ---- data: one uint8 tensor per split, kept on the GPU when it fits
    if not master:  # rank 0 builds the demo set or the cache first, the others then read it
        dist.barrier()
    data = dataset.load_data(cfg)
    if world > 1 and master:
        dist.barrier()
    if master:
        print(data.summary())
    num_classes = len(data.classes) if cfg["CONDITIONAL"] else 0
    if cfg["CONDITIONAL"] and not num_classes:
        raise UserError("CONDITIONAL needs a dataset with classes (ADNI's AD/NC): use --conditional false")
    train_images = utils.to_device_if_fits(data.train, device)
    train_labels = data.train_labels.to(device) if num_classes else None
    batch = cfg["BATCH_SIZE"]
    if len(train_images) < batch * world:
        batch = max(1, len(train_images) // world)
        if master:
            print(f"notice: only {len(train_images)} training images: using batches of {batch} instead of {cfg['BATCH_SIZE']}")
    global_batch = batch * world
    steps_per_epoch = len(train_images) // global_batch
    total_steps = steps_per_epoch * cfg["EPOCHS"]

    # ---- model, EMA, optimizer, schedule
    schedule = utils.NoiseSchedule(cfg["TIMESTEPS"], cfg["BETA_SCHEDULE"], cfg["PREDICTION"])
    model = build_model(cfg, num_classes).to(device, memory_format=torch.channels_last)
    ema = make_ema(model, cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["LR"], weight_decay=cfg["WEIGHT_DECAY"], fused=True)
    noise_gen = torch.Generator(device=device).manual_seed(cfg["SEED"])
    step, best_val, history = 0, float("inf"), []

    state, resumed_from = (None, None) if args.fresh else load_resume_state(ckpt_path)
    if state is not None:
        as_tuple = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
        changed = [f"{k}={state['config'].get(k)} (now {cfg[k]})" for k in MODEL_KEYS
                   if as_tuple(state["config"].get(k)) != as_tuple(cfg[k])]
        if changed:
            raise UserError(f"{resumed_from} was trained with {', '.join(changed)}: restore those settings, "
                            f"or start over with --fresh (or another --output-dir)")
        if state.get("fingerprint") != data.fingerprint and master:
            print(f"notice: the data changed since {resumed_from} was written; resuming on the new data")
        model.load_state_dict(state["model"])
        ema.module.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        noise_gen.set_state(state["noise_rng"])
        torch.set_rng_state(state["cpu_rng"])
        step, best_val, history = state["step"], state["best_val"], state["history"]
        ema.n_averaged.fill_(step)
        if master:
            print(f"resuming from {resumed_from} at step {step:,} (use --fresh to start over)")
    if master:
        print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {cfg['IMAGE_SIZE']} px, "
              f"batch {batch} x {world} process(es), {steps_per_epoch:,} steps/epoch, {total_steps:,} steps, {device}")

    compiled = torch.compile(model) if utils.wants_compile(cfg, device) else model
    net = DistributedDataParallel(compiled, device_ids=[device.index] if cuda else None) if world > 1 else compiled

    best_ema = None  # EMA weights of the lowest validation loss not yet written to best.pt

    def save_all():
        """checkpoint.pt (everything needed to resume), and best.pt when a new best is waiting."""
        nonlocal best_ema
        state = {"model": model.state_dict(), "ema": ema.module.state_dict(), "config": cfg, "step": step,
                 "epoch": step // max(1, steps_per_epoch), "best_val": best_val, "history": history,
                 "fingerprint": data.fingerprint, "classes": data.classes if num_classes else [],
                 "noise_rng": noise_gen.get_state(), "cpu_rng": torch.get_rng_state(),
                 "optimizer": optimizer.state_dict()}
        utils.save_checkpoint(state, ckpt_path)
        if best_ema is not None:
            best = {k: v for k, v in state.items() if k not in ("optimizer", "model", "ema")}
            utils.save_checkpoint(dict(best, model=best_ema, ema=best_ema), os.path.join(out, "best.pt"))
            best_ema = None

    # ---- Ctrl-C / SIGTERM: finish the step, save, exit
    stop = {"requested": False}

    def request_stop(signum, _frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    log_path = os.path.join(out, "log.csv")
    if master:  # the checkpoint's history: rows a killed run logged after its last checkpoint are dropped
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerows([["step", "epoch", "loss", "val_loss", "lr", "img_per_s", "elapsed_s"]]
                                    + [csv_row(row) for row in history])
    bad_run = torch.zeros((), device=device)  # non-finite losses in a row
    bad_total = torch.zeros((), device=device)
    loss_sum = torch.zeros((), device=device)
    start, window_start, window_steps = time.time(), time.perf_counter(), 0
    elapsed0 = history[-1]["elapsed_s"] if history else 0.0

    def log_row(val_loss=""):
        nonlocal window_start, window_steps
        if window_steps:
            loss = (loss_sum / window_steps).item()  # the only host sync, every LOG_EVERY steps
            rate = window_steps * global_batch / (time.perf_counter() - window_start)
        else:  # an epoch that ended right on a log step
            loss, rate = (history[-1]["loss"], history[-1]["img_per_s"]) if history else (float("nan"), 0.0)
        row = {"step": step, "epoch": step / steps_per_epoch, "loss": loss, "val_loss": val_loss,
               "lr": learning_rate(cfg, step, total_steps), "img_per_s": rate,
               "elapsed_s": elapsed0 + time.time() - start}
        loss_sum.zero_()
        window_start, window_steps = time.perf_counter(), 0
        if master:
            history.append(row)
            with open(log_path, "a", newline="") as f:
                csv.writer(f).writerow(csv_row(row))
        return row

    try:
        while step < total_steps and not stop["requested"]:
            epoch, first = divmod(step, steps_per_epoch)
            order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(cfg["SEED"] + epoch))
            order = order.to(train_images.device)
            bar = tqdm(range(first, steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg['EPOCHS']}", disable=not master,
                       leave=False, dynamic_ncols=True, mininterval=1 if sys.stderr.isatty() else 60)
            for i in bar:
                idx = order[i * global_batch:(i + 1) * global_batch]
                x0, t, noise, y = make_batch(train_images, train_labels, idx, noise_gen, cfg, rank, world, device,
                                               num_classes)
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(cfg, step, total_steps)
                loss, bad = train_step(net, model, optimizer, schedule, x0, t, noise, y, cfg, autocast)
                ema.update_parameters(model)
                bad_run.mul_(bad).add_(bad)
                bad_total.add_(bad)
                loss_sum.add_(torch.where(bad, 0.0, loss.detach()))
                step += 1
                window_steps += 1

                if step % cfg["LOG_EVERY"] == 0:
                    if bad_run.item() >= cfg["MAX_NONFINITE"]:
                        raise UserError(f"the loss was not finite for {int(bad_run.item())} steps in a row at step "
                                        f"{step}: lower --lr or --batch-size; the last good checkpoint is kept")
                    row = log_row()
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.1e}", img_s=f"{row['img_per_s']:.0f}")
                if master and step % cfg["CHECKPOINT_EVERY"] == 0:
                    save_all()
                if stop["requested"]:
                    break
            bar.close()
            if stop["requested"]:
                break

            # ---- end of epoch: validation, best checkpoint, samples, plot
            epoch += 1
            if master:
                paused = time.perf_counter()
                val = validation_loss(ema.module, schedule, data.val, cfg, device, autocast)
                window_start += time.perf_counter() - paused  # keep img/s a training figure
                row = log_row(val)
                if val < best_val:  # kept in memory, written with the next checkpoint
                    best_val, best_ema = val, {k: v.detach().to("cpu", copy=True) for k, v in
                                               ema.module.state_dict().items()}
                skipped = int(bad_total.item())
                print(f"epoch {epoch}/{cfg['EPOCHS']}  step {step:,}  loss {row['loss']:.4f}  val {val:.4f}  "
                      f"lr {row['lr']:.1e}  {row['img_per_s']:,.0f} img/s  {row['elapsed_s'] / 60:.1f} min"
                      + (f"  ({skipped} non-finite steps skipped)" if skipped else ""))
                if epoch % cfg["SAMPLE_EVERY"] == 0 or step >= total_steps:
                    sample_grid(ema.module, schedule, cfg, device, autocast,
                                os.path.join(out, "samples", f"epoch_{epoch:04d}.png"), num_classes)
                    plot_losses(history, os.path.join(out, "loss.png"))
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"CUDA ran out of memory at batch {batch}, {cfg['IMAGE_SIZE']} px: try a smaller "
                        f"--batch-size or --image-size") from None
    if stop["requested"]:
        if master:
            save_all()
            print(f"\nstopped at step {step:,}: checkpoint saved to {ckpt_path}; run train.py again to resume")
        raise SystemExit(130)
    if world > 1:  # every rank must hold the same weights; say so, cheaply
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        reference = flat.clone()
        dist.broadcast(reference, 0)
        gap = (flat - reference).abs().max()
        dist.all_reduce(gap, op=dist.ReduceOp.MAX)
        if master:
            print(f"weights identical on all {world} ranks" if gap.item() == 0 else f"warning: ranks differ by {gap.item():.2e}")
        dist.destroy_process_group()
    if master:
        save_all()
        print(f"done: {step:,} steps; checkpoint {ckpt_path}, samples in {os.path.join(out, 'samples')}")


if __name__ == "__main__":
    utils.run(main)
