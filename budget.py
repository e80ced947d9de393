"""How long a run trains: a time budget turned into a number of steps (the plan) from what the first steps cost,
with a floor of steps where the budget buys too few, and what the whole job will then take."""
from dataclasses import dataclass


@dataclass
class Plan:
    """How long a run trains: its steps (EPOCHS passes, or what a time budget buys), the minutes they fill (the budget,
    or more to reach MIN_STEPS), the seconds kept for the last validation, samples and checkpoint, the settings it
    was made for (a resumed run with others plans again), and the minutes after which the clock stops a run that
    slowed down: the budget's; for a floor, MAX_TRAIN_MINUTES, so that a slowdown costs time, not steps (0: never)."""
    steps: int
    minutes: float = 0.0
    final_s: float = 0.0
    made_for: tuple = ()
    deadline: float = 0.0


@dataclass
class Costs:
    """Seconds that parts of a run take, measured in its first steps."""
    step: float  # one optimizer step
    validation: float  # one validation pass
    checkpoint: float  # one checkpoint save
    grid: float  # one training sample grid


def made_for(cfg):
    """The settings a plan depends on."""
    return cfg["TRAIN_MINUTES"], cfg["MIN_STEPS"], cfg["MAX_TRAIN_MINUTES"]


def network_calls(cfg):
    """Network calls per sampling step: two under autoguidance, twice that under classifier-free guidance."""
    guided = cfg["CONDITION"] != "none" and cfg["GUIDANCE"] not in (0, 1)
    return (2 if cfg["AUTOGUIDANCE"] != 1 else 1) * (2 if guided else 1)


def grid_seconds(cfg, validation_s, val_images, grid_images, grid_steps):
    """A sample grid's seconds, told from a validation pass's: both are forward passes of the same network, one per
    validation image, grid_steps x network_calls per grid image."""
    return validation_s / val_images * grid_images * grid_steps * network_calls(cfg)


def plan_steps(cfg, step, elapsed_s, costs, steps_per_epoch):
    """The plan at `step`, elapsed_s seconds into the run: a step costs costs.step plus its share of the validations
    (one an epoch), sample grids (every SAMPLE_EVERY epochs) and checkpoints (every CHECKPOINT_EVERY steps); the last
    validation, grid and checkpoint are kept free. TRAIN_MINUTES sets the time, unless it buys fewer than MIN_STEPS
    steps: then the time it takes to reach them, at most MAX_TRAIN_MINUTES (0: no limit)."""
    per_step = (costs.step + costs.validation / steps_per_epoch + costs.grid / (steps_per_epoch * cfg["SAMPLE_EVERY"])
                + costs.checkpoint / cfg["CHECKPOINT_EVERY"])
    final_s = costs.validation + costs.grid + costs.checkpoint
    within = lambda minutes: step + max(0, int((60 * minutes - elapsed_s - final_s) / per_step))  # noqa: E731
    minutes, steps = cfg["TRAIN_MINUTES"], within(cfg["TRAIN_MINUTES"])
    deadline = minutes
    if steps < cfg["MIN_STEPS"]:
        minutes, steps = (elapsed_s + (cfg["MIN_STEPS"] - step) * per_step + final_s) / 60, cfg["MIN_STEPS"]
        deadline = max(cfg["MAX_TRAIN_MINUTES"], cfg["TRAIN_MINUTES"]) if cfg["MAX_TRAIN_MINUTES"] else 0.0
        if deadline and minutes > deadline:
            minutes, steps = deadline, within(deadline)
    return Plan(steps, minutes, final_s, made_for(cfg), deadline)


def predict_seconds(cfg, num_classes, forward_s, probe_s):
    """predict.py's seconds as train_predict.sh runs it, told from one image's forward pass (forward_s) and one
    training of the probe network (probe_s, 0 when it is cached): NUM_SAMPLES samples in SAMPLE_STEPS steps and 8
    held-out slices denoised from half-way; for conditional models also conditions.png, the slice sweep, and the
    train-on-synthetic test (256 samples, two more trainings of the probe's kind); start-up, pictures and metrics."""
    images, trainings = cfg["NUM_SAMPLES"] + 8 / 2, 1
    if cfg["CONDITION"] != "none":
        images += PREDICT_COLUMNS * max(1, num_classes)
    if "slice" in cfg["CONDITION"]:
        images += PREDICT_COLUMNS * 2 * max(1, num_classes)
    if "class" in cfg["CONDITION"]:
        images, trainings = images + 256, 3
    return forward_s * network_calls(cfg) * cfg["SAMPLE_STEPS"] * images + trainings * probe_s + PREDICT_OVERHEAD_S


PREDICT_COLUMNS = 8  # conditions.png: samples per class (a slice sweep: twice as many)
PREDICT_OVERHEAD_S = 12  # predict.py's start-up, pictures and metrics (quick profile, 2-core CPU: 12 s measured)


def describe(cfg, step, elapsed_s, costs, steps_per_epoch, speed, setup_s, predict_s):
    """The plan in words, for a run training `speed` images/s after setup_s seconds of demo, data and model: the steps,
    the time training will take and why, and the whole job's."""
    plan = plan_steps(cfg, step, elapsed_s, costs, steps_per_epoch)
    bought = plan_steps(dict(cfg, MIN_STEPS=0), step, elapsed_s, costs, steps_per_epoch).steps
    say = f"plan: this machine trains {speed:,.0f} images/s: "
    if plan.steps <= bought:
        say += f"{plan.steps:,} steps fill the {plan.minutes:g}-minute budget"
    elif plan.steps >= cfg["MIN_STEPS"]:
        say += (f"{cfg['TRAIN_MINUTES']:g} minutes buy {bought:,} steps, fewer than the {cfg['MIN_STEPS']:,} these "
                f"samples need (MIN_STEPS): training {plan.minutes:.1f} minutes for them (--min-steps 0 keeps "
                f"{cfg['TRAIN_MINUTES']:g})")
    else:
        needed = plan_steps(dict(cfg, MAX_TRAIN_MINUTES=0), step, elapsed_s, costs, steps_per_epoch).minutes
        say += (f"the {cfg['MIN_STEPS']:,} steps these samples need (MIN_STEPS) would take {needed:.0f} minutes: "
                f"training the {plan.minutes:g}-minute limit (MAX_TRAIN_MINUTES) for {plan.steps:,} steps, expect "
                f"grainier samples (--max-train-minutes {needed:.0f} reaches them)")
    total = setup_s + 60 * plan.minutes + predict_s
    return say + f"; then predict.py, about {predict_s / 60:.0f} min: about {total / 60:.0f} minutes in all"
