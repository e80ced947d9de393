"""A time budget turned into a plan of steps, with a floor of steps and a limit, on known costs."""
import pytest

import budget

COSTS = budget.Costs(step=0.5, validation=2.0, checkpoint=1.0, grid=4.0)


def settings(**overrides):
    return {"TRAIN_MINUTES": 1.0, "MIN_STEPS": 0, "MAX_TRAIN_MINUTES": 0.0, "SAMPLE_EVERY": 2, "CHECKPOINT_EVERY": 100,
            "CONDITION": "none", "GUIDANCE": 2.0, "AUTOGUIDANCE": 1.25, "NUM_SAMPLES": 64, "SAMPLE_STEPS": 100,
            "SAMPLER": "dpm++sde", "TIMESTEPS": 1000, **overrides}


def plan(**overrides):
    return budget.plan_steps(settings(**overrides), step=20, elapsed_s=15.0, costs=COSTS, steps_per_epoch=10)


def test_a_step_costs_its_share_of_validations_grids_and_checkpoints():
    """0.5 s a step + 2 s of validation each 10-step epoch + a 4 s grid every 2 epochs + a 1 s checkpoint every 100
    steps = 0.91 s a step; 60 s - 15 s spent - 7 s for the last validation, grid and checkpoint = 38 s: 41 steps."""
    assert plan() == budget.Plan(61, 1.0, 7.0, (1.0, 0, 0.0), 1.0, COSTS)


def test_a_budget_already_spent_plans_no_more_steps():
    assert budget.plan_steps(settings(), 20, 58.0, COSTS, 10).steps == 20


def test_the_floor_lengthens_a_budget_that_buys_too_few_steps():
    """100 steps at 0.91 s from step 20 after 15 s, and 7 s for the end: (15 + 80 x 0.91 + 7) / 60 = 1.58 minutes."""
    floored = plan(MIN_STEPS=100)
    assert floored.steps == 100 and floored.minutes == pytest.approx((15 + 80 * 0.91 + 7) / 60)
    assert plan(MIN_STEPS=50).steps == plan().steps == 61  # a floor the budget reaches changes nothing
    assert plan().deadline == 1.0 and floored.deadline == 0.0  # the clock stops a budget; a floor without limit: never


def test_the_limit_caps_the_floor():
    """At most 2 minutes: (120 - 15 - 7) / 0.91 = 107.7, 107 steps more than the 20."""
    capped = plan(MIN_STEPS=1000, MAX_TRAIN_MINUTES=2.0)
    assert capped.steps == 127 and capped.minutes == capped.deadline == 2.0
    assert plan(MIN_STEPS=100, MAX_TRAIN_MINUTES=2.0).deadline == 2.0  # a slowdown may take the floor up to the limit
    assert plan(MIN_STEPS=1000, MAX_TRAIN_MINUTES=0.5).steps == 61  # a limit below the budget: the budget


@pytest.mark.parametrize("overrides, words", [
    ({}, "61 steps fill the 1-minute budget"),
    ({"MIN_STEPS": 100}, "1 minutes buy 61 steps, fewer than the 100 these samples need (MIN_STEPS): training 1.6 "
                         "minutes for them (--min-steps 0 keeps 1)"),
    ({"MIN_STEPS": 1000, "MAX_TRAIN_MINUTES": 2.0}, "the 1,000 steps these samples need (MIN_STEPS) would take 15 "
     "minutes: training the 2-minute limit (MAX_TRAIN_MINUTES) for 127 steps, expect grainier samples "
     "(--max-train-minutes 15 reaches them)")])
def test_the_plan_is_said_in_words(overrides, words):
    """With 30 s before training and 90 s for predict.py's samples: the whole job's minutes too; a revised plan says
    so, and where."""
    said = budget.plan_in_words(settings(**overrides), 20, 15.0, COSTS, 10, speed=32.0, setup_s=30.0, sample_s=90.0)
    assert said.startswith("plan: this machine trains 32 images/s: " + words)
    minutes = plan(**overrides).minutes
    assert said.endswith(f"then predict.py's 64 samples, about 2 min: about {(30 + 60 * minutes + 90) / 60:.0f} "
                         f"minutes in all")
    revised = budget.plan_in_words(settings(**overrides), 20, 15.0, COSTS, 10, 32.0, 30.0, 90.0, revised=True)
    assert revised.startswith("plan revised at step 20: this machine trains 32 images/s: " + words)


@pytest.mark.parametrize("overrides, calls", [
    ({}, 2), ({"AUTOGUIDANCE": 1.0}, 1), ({"CONDITION": "class"}, 4), ({"CONDITION": "slice", "GUIDANCE": 1.0}, 2),
    ({"CONDITION": "class+slice", "GUIDANCE": 0.0, "AUTOGUIDANCE": 1.0}, 1)])
def test_a_grid_costs_what_its_network_calls_cost(overrides, calls):
    """A validation of 8 images in 2 s: 0.25 s an image and call; a grid of 36 images in 25 steps makes 36 x 25 x
    calls of them (two networks under autoguidance, a guided pair under classifier-free guidance)."""
    assert budget.network_calls(settings(**overrides)) == calls
    assert budget.grid_seconds(settings(**overrides), 2.0, 8, 36, 25) == pytest.approx(0.25 * 36 * 25 * calls)


def test_sampling_time_counts_samples_steps_and_calls():
    """64 samples, 100 steps (T for ddpm), 2 calls each under autoguidance, 0.01 s a call."""
    assert budget.sampling_seconds(settings(), 0.01, 64) == pytest.approx(0.01 * 2 * 100 * 64)
    assert budget.sampling_seconds(settings(SAMPLER="ddpm", TIMESTEPS=1000), 0.01, 64) == pytest.approx(0.01 * 2 * 1000
                                                                                                         * 64)


def test_a_plan_follows_a_speed_that_moved_more_than_its_margin():
    made = plan()
    assert made.costs == COSTS
    assert not budget.speed_moved(made, 0.55, 0.15) and budget.speed_moved(made, 0.4, 0.15)
    assert budget.speed_moved(made, 0.6, 0.15) and not budget.speed_moved(budget.Plan(100), 0.1, 0.15)


@pytest.mark.parametrize("setup_s, sample_s, sampling_min, total_min", [(420.0, 149.4, 2, 10), (418.6, 152.0, 3, 11)])
def test_the_whole_jobs_minutes_are_rounded_from_exact_seconds(setup_s, sample_s, sampling_min, total_min):
    """A 1-minute plan: (setup + 60 + sampling) seconds in all, each figure near a rounding boundary (10.49 and 10.51
    minutes; 2.49 and 2.53), so that a wrong factor anywhere shows."""
    said = budget.plan_in_words(settings(), 20, 15.0, COSTS, 10, 32.0, setup_s, sample_s)
    assert said.endswith(f"samples, about {sampling_min} min: about {total_min} minutes in all"), said


def test_a_plan_comes_back_from_a_checkpoint_as_it_was_saved():
    from dataclasses import asdict
    made = plan()
    assert budget.Plan.from_saved(asdict(made)) == made and budget.Plan.from_saved(asdict(made)).costs == COSTS
    assert budget.Plan.from_saved({"steps": 5}) == budget.Plan(5)  # a plan saved before it kept its costs
