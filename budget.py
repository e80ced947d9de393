"""How long a run trains: a time budget turned into a number of steps (the plan) from what the first steps cost."""
from dataclasses import dataclass


@dataclass
class Plan:
    """How long a run trains: its steps (EPOCHS passes, or what a time budget of `minutes` buys, with `final_s` seconds
    kept free for the last validation, samples and checkpoint)."""
    steps: int
    minutes: float = 0.0
    final_s: float = 0.0


@dataclass
class Costs:
    """Seconds that parts of a run take, measured in its first steps."""
    step: float  # one optimizer step
    validation: float  # one validation pass
    checkpoint: float  # one checkpoint save
    grid: float  # one training sample grid


def network_calls(cfg):
    """Network calls per sampling step: two under autoguidance, twice that under classifier-free guidance."""
    guided = cfg["CONDITION"] != "none" and cfg["GUIDANCE"] not in (0, 1)
    return (2 if cfg["AUTOGUIDANCE"] != 1 else 1) * (2 if guided else 1)


def grid_seconds(cfg, validation_s, val_images, grid_images, grid_steps):
    """A sample grid's seconds, told from a validation pass's: both are forward passes of the same network, one per
    validation image, grid_steps x network_calls per grid image."""
    return validation_s / val_images * grid_images * grid_steps * network_calls(cfg)


def plan_steps(cfg, step, elapsed_s, costs, steps_per_epoch):
    """The plan for a time budget of TRAIN_MINUTES, at `step` after elapsed_s seconds: a step costs costs.step plus
    its share of the validations (one an epoch), sample grids (every SAMPLE_EVERY epochs) and checkpoints (every
    CHECKPOINT_EVERY steps); the last validation, grid and checkpoint are kept free."""
    per_step = (costs.step + costs.validation / steps_per_epoch + costs.grid / (steps_per_epoch * cfg["SAMPLE_EVERY"])
                + costs.checkpoint / cfg["CHECKPOINT_EVERY"])
    final_s = costs.validation + costs.grid + costs.checkpoint
    more = max(0, int((60 * cfg["TRAIN_MINUTES"] - elapsed_s - final_s) / per_step))
    return Plan(step + more, cfg["TRAIN_MINUTES"], final_s)


def describe(plan, costs, images_per_step):
    """The plan in one line."""
    return (f"plan: {images_per_step / costs.step:,.0f} images/s here: {plan.steps:,} steps fill the {plan.minutes:g}-"
            f"minute budget ({plan.final_s:.0f} s kept for the last validation, samples and checkpoint)")
