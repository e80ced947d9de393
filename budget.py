"""How long a run trains: a time budget turned into a number of steps (the plan) from what the first steps cost,
with a floor of steps where the budget buys too few, and what the whole job will then take."""
from dataclasses import dataclass


@dataclass
class Costs:
    """Seconds that parts of a run take, measured in its first steps (a step's again as the run goes)."""
    step: float  # one optimizer step
    validation: float  # one validation pass
    checkpoint: float  # one checkpoint save
    grid: float  # one training sample grid


@dataclass
class Plan:
    """How long a run trains: its steps (EPOCHS passes, or what a time budget buys), the minutes they fill (the budget,
    or more to reach MIN_STEPS), the seconds kept for the last validation, samples and checkpoint, the settings it
    was made for (a resumed run with others plans again), the minutes after which the clock stops a run that
    slowed down more than a revised plan can follow (the deadline: see plan_steps; 0: never), and the costs it was
    made from (None: EPOCHS decide)."""
    steps: int
    minutes: float = 0.0
    final_s: float = 0.0
    made_for: tuple = ()
    deadline: float = 0.0
    costs: Costs | None = None

    @classmethod
    def from_saved(cls, saved):
        """A Plan as a checkpoint stores it (asdict)."""
        costs = saved.get("costs")
        return cls(**{**saved, "costs": costs and Costs(**costs)})


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
    validation, grid and checkpoint are kept free.

    The rule, stated here once: TRAIN_MINUTES sets the time, and its deadline. Where it buys fewer than MIN_STEPS
    steps, training takes the time it needs to reach them, at most MAX_TRAIN_MINUTES (0: no limit), which is then
    the deadline: a slowdown costs time, not steps, up to it."""
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
    return Plan(steps, minutes, final_s, made_for(cfg), deadline, costs)


def sampling_seconds(cfg, forward_s, images):
    """Seconds to draw `images` samples with the configured sampler, told from one image's forward pass."""
    steps = cfg["TIMESTEPS"] if cfg["SAMPLER"] == "ddpm" else cfg["SAMPLE_STEPS"]
    return forward_s * network_calls(cfg) * steps * images


def speed_moved(plan, step_s, change):
    """Whether steps now cost step_s seconds, more than `change` (a share) away from what the plan was made from."""
    return plan.costs is not None and abs(step_s / plan.costs.step - 1) > change


def plan_in_words(cfg, step, elapsed_s, costs, steps_per_epoch, speed, setup_s, sample_s, revised=False):
    """The plan in words, for a run training `speed` images/s after setup_s seconds of demo, data and model: the steps,
    the time training will take and why, and roughly the whole job's, with sample_s seconds for predict.py's
    NUM_SAMPLES samples."""
    plan = plan_steps(cfg, step, elapsed_s, costs, steps_per_epoch)
    bought = plan_steps(dict(cfg, MIN_STEPS=0), step, elapsed_s, costs, steps_per_epoch).steps
    say = f"plan{' revised at step ' + format(step, ',') if revised else ''}: this machine trains {speed:,.0f} images/s: "
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
    total = setup_s + 60 * plan.minutes + sample_s
    return say + (f"; then predict.py's {cfg['NUM_SAMPLES']} samples, about {sample_s / 60:.0f} min: about "
                  f"{total / 60:.0f} minutes in all")
