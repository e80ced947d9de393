"""train.py end to end on tiny configurations (CPU)."""
import csv
import os
import signal
import subprocess
import sys
import time

import torch

from conftest import ROOT, TINY, run_script


def weights(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["model"]


def test_training_writes_everything(tiny_run):
    for name in ("checkpoint.pt", "best.pt", "log.csv", "loss.png", "samples/epoch_0002.png"):
        assert os.path.exists(os.path.join(tiny_run, name)), name
    rows = list(csv.DictReader(open(os.path.join(tiny_run, "log.csv"))))
    assert set(rows[0]) == {"step", "epoch", "loss", "val_loss", "lr", "img_per_s", "elapsed_s"}
    assert sum(r["val_loss"] != "" for r in rows) == 2  # one validation per epoch
    state = torch.load(os.path.join(tiny_run, "checkpoint.pt"), weights_only=True)
    assert state["step"] == 8 and state["config"]["IMAGE_SIZE"] == 32 and "optimizer" in state
    ema, raw = state["ema"]["out.2.weight"], state["model"]["out.2.weight"]  # the last layer starts at zero
    assert ema.abs().sum() > 0 and (ema - raw).norm() < raw.norm()  # the EMA followed the weights
    guide = state["guide"]  # the EMA copied for autoguidance once GUIDE_AT (0.25) of the 8 steps was done
    assert guide["step"] == 2 and not torch.equal(guide["weights"]["out.2.weight"], ema)


def test_resume_equals_straight_run(tiny_data, tmp_path):
    common = ["--data-dir", tiny_data, *TINY, "--lr-decay", "constant", "--checkpoint-every", "3"]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    assert run_script("train.py", "--output-dir", straight, "--epochs", "2", *common).returncode == 0
    assert run_script("train.py", "--output-dir", resumed, "--epochs", "1", *common).returncode == 0
    r = run_script("train.py", "--output-dir", resumed, "--epochs", "2", *common)
    assert r.returncode == 0 and "resuming" in r.stdout
    a, b = weights(straight), weights(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_contradicting_config_is_refused(tiny_run, tiny_data):
    r = run_script("train.py", "--output-dir", tiny_run, "--data-dir", tiny_data, *TINY, "--base-channels", "16",
                   "--epochs", "3")
    assert r.returncode == 2 and "BASE_CHANNELS=8" in r.stderr and "--fresh" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_data, tmp_path):
    out = str(tmp_path / "out")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--data-dir", tiny_data,
                             "--output-dir", out, "--epochs", "1000", *TINY], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = os.path.join(out, "log.csv")
    deadline = time.time() + 120
    while time.time() < deadline and (not os.path.exists(log) or len(open(log).readlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "checkpoint saved" in stdout
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["step"] >= 4


def test_nonfinite_losses_stop_training(tiny_data, tmp_path):
    r = run_script("train.py", "--data-dir", tiny_data, "--output-dir", str(tmp_path), *TINY, "--epochs", "20",
                   "--lr", "1e30", "--max-nonfinite", "3")
    assert r.returncode == 2 and "not finite" in r.stderr and "Traceback" not in r.stderr


def test_two_processes_match_one(tiny_data, tmp_path):
    """DDP on CPU (gloo): 2 ranks x batch 4 give the weights of 1 process x batch 8, identical on both ranks."""
    common = ["--data-dir", tiny_data, *TINY, "--epochs", "1", "--compile", "false", "--bf16", "false"]  # fp32 sums
    single = run_script("train.py", "--output-dir", str(tmp_path / "one"), *common)
    assert single.returncode == 0, single.stderr
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                          os.path.join(ROOT, "train.py"), "--output-dir", str(tmp_path / "two"),
                          *common, "--batch-size", "4"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert ddp.returncode == 0, ddp.stderr
    assert "weights identical on all 2 ranks" in ddp.stdout
    a, b = weights(str(tmp_path / "one")), weights(str(tmp_path / "two"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- the pieces of a training step
import math  # noqa: E402

import pytest  # noqa: E402

import distributed  # noqa: E402
import objective  # noqa: E402
import train  # noqa: E402
import utils  # noqa: E402
from modules import UNet, build_model, load_network  # noqa: E402


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet(16, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), num_heads=2)


def test_ema_follows_the_documented_warmup():
    """After n updates the EMA moves by 1 - min(EMA_DECAY, (1+n)/(10+n)); the first update copies the weights."""
    model, max_decay = tiny_unet(), 0.6  # the warm-up reaches the cap at n = 13
    ema = train.make_ema(model, {"EMA_DECAY": max_decay})
    expected = None
    for n in range(20):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update_parameters(model)
        weights = [p.detach().clone() for p in model.parameters()]
        decay = min(max_decay, (1 + n) / (10 + n))
        expected = weights if expected is None else [decay * e + (1 - decay) * w for e, w in zip(expected, weights)]
        for e, a in zip(expected, ema.module.parameters()):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("floor", [0.1, 0.0])
def test_learning_rate_warmup_then_cosine_to_the_floor(floor):
    cfg = {"LR": 1e-3, "WARMUP_STEPS": 10, "LR_DECAY": "cosine", "LR_FLOOR": floor}
    lr = lambda step: train.learning_rate(cfg, step, 110)  # noqa: E731  100 steps of decay
    assert [lr(s) for s in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])
    assert lr(10) == pytest.approx(1e-3)
    assert lr(35) == pytest.approx(1e-3 * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 0.25))))
    assert lr(60) == pytest.approx(1e-3 * (1 + floor) / 2)
    assert lr(110) == pytest.approx(1e-3 * floor, abs=1e-12) and lr(500) == pytest.approx(1e-3 * floor, abs=1e-12)
    assert train.learning_rate(dict(cfg, LR_DECAY="constant"), 60, 110) == pytest.approx(1e-3)
    assert train.learning_rate(cfg, 60, None) == pytest.approx(1e-3)  # a time budget's plan not made yet: the peak


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_min_snr_gamma_zero_is_a_plain_mse(prediction):
    """MIN_SNR_GAMMA 0 turns the weighting off: the loss is a plain MSE of what the network predicts."""
    schedule = utils.NoiseSchedule(1000, "cosine", prediction)
    t = torch.tensor([0, 100, 400, 700, 999])
    assert torch.equal(schedule.loss_weight(t, 0.0), torch.ones(5))
    assert not torch.allclose(schedule.loss_weight(t, 1.0), torch.ones(5))


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_min_snr_weights(prediction):
    """The weight equals the formula, and weight x MSE(target) = min(SNR, gamma) x MSE(x0) for every target."""
    schedule, gamma = utils.NoiseSchedule(1000, "cosine", prediction), 5.0
    t = torch.tensor([0, 100, 400, 700, 999])
    abar = schedule.alphas_cumprod[t].float()
    snr = abar / (1 - abar)
    formula = {"eps": snr.clamp(max=gamma) / snr, "v": snr.clamp(max=gamma) / (snr + 1),
               "x0": snr.clamp(max=gamma)}[prediction]
    torch.testing.assert_close(schedule.loss_weight(t, gamma), formula)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(5, 1, 8, 8, generator=gen) * 2 - 1, torch.randn(5, 1, 8, 8, generator=gen)
    x_t = schedule.q_sample(x0, t, noise)
    alpha, sigma = schedule.alpha_sigma(t, x0)
    wrong_x0 = x0 + 0.1 * torch.randn(x0.shape, generator=gen)  # a prediction off by this much in x0 ...
    wrong_eps = (x_t - alpha * wrong_x0) / sigma
    out = {"eps": wrong_eps, "x0": wrong_x0, "v": alpha * wrong_eps - sigma * wrong_x0}[prediction]
    weighted = (out - schedule.target(x0, noise, t)).pow(2).mean((1, 2, 3)) * schedule.loss_weight(t, gamma)
    torch.testing.assert_close(weighted, snr.clamp(max=gamma) * (wrong_x0 - x0).pow(2).mean((1, 2, 3)),
                               rtol=1e-3, atol=1e-6)  # ... costs the same whatever the network predicts


def batch_config(**overrides):
    return {**utils.constants(), "TIMESTEPS": 100, "COND_DROP": 0.0, "HFLIP": False, **overrides}


def test_hflip_flips_about_half_when_on_and_none_when_off():
    images = torch.zeros(256, 1, 8, 8, dtype=torch.uint8)
    images[:, :, :, :3] = 255  # bright on the left: a flipped image is bright on the right
    idx, gen = torch.arange(256), torch.Generator().manual_seed(0)
    for hflip, low, high in ((False, 0, 0), (True, 0.4, 0.6)):
        x0 = objective.make_batch(images, idx, gen, batch_config(HFLIP=hflip), 0, 1, torch.device("cpu"))[0]
        flipped = (x0[:, 0, 0, -1] > 0).float().mean().item()
        assert low <= flipped <= high, (hflip, flipped)
        assert torch.equal(x0[:, 0, 0, 0] > 0, x0[:, 0, 0, -1] < 0)  # each image is either as stored or flipped


@pytest.mark.parametrize("sampling, middle_half", [("uniform", 0.5), ("logit-normal", 0.728)])
def test_training_timesteps_follow_timestep_sampling(sampling, middle_half):
    """uniform: every t equally often; logit-normal: t/T = sigmoid(z), so P(T/4 <= t < 3T/4) = P(|z| < ln 3) = 0.728."""
    n = 20000
    images, idx, gen = torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.arange(n), torch.Generator().manual_seed(0)
    t = objective.make_batch(images, idx, gen, batch_config(TIMESTEP_SAMPLING=sampling), 0, 1, torch.device("cpu"))[1]
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 99
    assert abs(((t >= 25) & (t < 75)).float().mean().item() - middle_half) < 0.015
    assert abs(t.float().mean().item() - 49.5) < 1.0  # both symmetric about the middle


@pytest.mark.parametrize("mean, std", [(-1.2, 1.2), (0.5, 0.6)])
def test_edm_timesteps_put_ln_sigma_on_a_normal(mean, std):
    """edm: t is the first step whose noise-to-signal ratio sigma_t reaches a sigma with ln sigma ~ N(mean, std^2),
    so P(t <= k) = Phi((ln sigma_k - mean) / std) for every k."""
    n = 20000
    cfg = batch_config(TIMESTEPS=1000, TIMESTEP_SAMPLING="edm", EDM_MEAN=mean, EDM_STD=std)
    images, idx, gen = torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.arange(n), torch.Generator().manual_seed(0)
    t = objective.make_batch(images, idx, gen, cfg, 0, 1, torch.device("cpu"))[1]
    levels = utils.noise_to_signal(cfg["BETA_SCHEDULE"], 1000)
    normal = torch.distributions.Normal(mean, std)
    for k in (30, 100, 200, 400, 700):
        assert abs((t <= k).float().mean() - normal.cdf(levels[k].log())) < 0.015, k
    assert t.min() >= 0 and t.max() <= 999


def test_conditions_are_dropped_independently_at_cond_drop():
    n = 4000
    images, idx = torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.arange(n)
    labels, positions, covariates = torch.randint(0, 2, (n,)), torch.rand(n), torch.rand(n, 2)
    covariates[:5, 1] = float("nan")  # not in the table: stays not given
    gen = torch.Generator().manual_seed(0)
    _, _, _, (got_labels, got_positions, got_covariates) = objective.make_batch(
        images, idx, gen, batch_config(COND_DROP=0.3), 0, 1, torch.device("cpu"), labels, positions, covariates)
    no_class, no_slice, no_age, no_other = got_labels == -1, got_positions.isnan(), *got_covariates.isnan().T
    for dropped in (no_class, no_slice, no_age, no_other[5:]):
        assert abs(dropped.float().mean() - 0.3) < 0.03
    for a, b in ((no_class, no_slice), (no_class, no_age), (no_age, no_other)):
        assert abs((a & b).float().mean() - 0.09) < 0.02  # independent: 0.3 x 0.3
    assert no_other[:5].all() and torch.equal(got_covariates[~no_age, 0], covariates[~no_age, 0])
    assert torch.equal(got_labels[~no_class], labels[~no_class])
    assert torch.equal(got_positions[~no_slice], positions[~no_slice])
    _, _, _, cond = objective.make_batch(images, idx, gen, batch_config(), 0, 1, torch.device("cpu"))
    assert cond == (None, None, None)


def test_a_nonfinite_loss_skips_the_update():
    model = tiny_unet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    schedule, cfg = utils.NoiseSchedule(100, "cosine", "v"), batch_config(GRAD_CLIP=1.0, MIN_SNR_GAMMA=5.0)
    x0, t, noise = torch.rand(4, 1, 16, 16) * 2 - 1, torch.tensor([5, 30, 60, 90]), torch.randn(4, 1, 16, 16)
    train.train_step(model, model, optimizer, schedule, x0, t, noise, (None, None), cfg, False)  # a good step first
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [optimizer.state[p]["exp_avg"].clone() for p in model.parameters()]
    poisoned = x0.clone()
    poisoned[0, 0, 0, 0] = float("nan")
    loss, bad = train.train_step(model, model, optimizer, schedule, poisoned, t, noise, (None, None), cfg, bf16=False)
    assert bool(bad) and not torch.isfinite(loss)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for m, p in zip(moments, model.parameters()):
        assert torch.equal(m, optimizer.state[p]["exp_avg"])
    _, bad = train.train_step(model, model, optimizer, schedule, x0, t, noise, (None, None), cfg, bf16=False)
    assert not bool(bad) and any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_mid_epoch_under_cosine_decay_equals_a_straight_run(tiny_data, tmp_path):
    """A run killed after its step-6 checkpoint (mid epoch 2 of 2) and restarted ends in the straight run's
    weights and EMA: same batches, same learning rates, same EMA warm-up."""
    common = ["--data-dir", tiny_data, *TINY, "--epochs", "2", "--checkpoint-every", "3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_script("train.py", "--output-dir", straight, *common).returncode == 0
    state = torch.load(straight / "checkpoint.prev.pt", weights_only=True)
    assert state["step"] == 6 and state["step"] % 4  # 4 steps an epoch: the middle of the second one
    resumed.mkdir()
    torch.save(state, resumed / "checkpoint.pt")  # what a kill -9 right after that checkpoint leaves
    r = run_script("train.py", "--output-dir", resumed, *common)
    assert r.returncode == 0 and "resuming" in r.stdout and "at step 6" in r.stdout, r.stdout + r.stderr
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (straight, resumed))
    assert a["step"] == b["step"] == 8
    for part in ("model", "ema"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=0, atol=0, msg=f"{part}.{k}")
    assert a["guide"]["step"] == b["guide"]["step"] == 2  # the early snapshot travels in the checkpoint
    torch.testing.assert_close(a["guide"]["weights"], b["guide"]["weights"], rtol=0, atol=0)


def test_stop_request_first_asks_then_interrupts():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        stop = distributed.StopRequest()
        assert signal.getsignal(signal.SIGTERM) == stop.handle and not stop.requested
        stop.handle(signal.SIGTERM, None)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            stop.handle(signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


# ---------------------------------------------------------------- a time budget, on a fake clock
class FakeClock:
    """Seconds that pass only when training does: 1 a step (2 once `slow_after` steps are done), 1/32 a validation of
    the 2 held-out blobs, 2.8125 a sample grid (what a validation's forward passes say: 36 images x 5 steps x 1/64)."""

    def __init__(self, monkeypatch, slow_after=None, step_after=2.0):
        self.t, self.steps, self.slow_after, self.step_after = 1000.0, 0, slow_after, step_after
        monkeypatch.setattr(train, "now", lambda: self.t)
        monkeypatch.setattr(train, "PLAN_SKIP", 1)
        monkeypatch.setattr(train, "PLAN_STEPS", 2)
        for name, cost in (("train_step", None), ("validation_loss", 1 / 32), ("sample_grid", 2.8125)):
            monkeypatch.setattr(train, name, self.costing(getattr(train, name), cost))

    def costing(self, function, seconds):
        def timed(*args, **kwargs):
            if seconds is None:  # a training step
                self.steps += 1
                self.t += self.step_after if self.slow_after is not None and self.steps > self.slow_after else 1.0
            else:
                self.t += seconds
            return function(*args, **kwargs)
        return timed


def train_in_process(monkeypatch, *args):
    """train.py's main() in this process (so that it runs on the fake clock); its checkpoint."""
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(sys, "argv", ["train.py", *map(str, args)])
    try:
        train.main()
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    return torch.load(os.path.join(args[args.index("--output-dir") + 1], "checkpoint.pt"), weights_only=True)


BUDGET_FLAGS = [*TINY, "--epochs", "1000", "--sample-every", "1000", "--lr", "1e-3", "--autoguidance", "1"]


def test_a_time_budget_becomes_a_plan_that_ends_inside_it(tiny_data, tmp_path, monkeypatch, capsys):
    """30 fake seconds, 4 steps an epoch: steps 2-3 are timed (1 s each), then a validation (1/32 s) and a checkpoint
    (0 s) are timed; a grid is told from the validation (2.8125 s). A step with its share of the epoch-end validations
    and grids costs 1.0085 s; 30 - 3.03 s spent - 2.84 s kept for the end buy 23 more steps: a plan of 26, ending at
    29.06 s, the learning rate at its floor on the last step, the early snapshot at step 7 (GUIDE_AT of 26)."""
    FakeClock(monkeypatch)
    state = train_in_process(monkeypatch, "--data-dir", tiny_data, "--output-dir", tmp_path, *BUDGET_FLAGS,
                             "--train-minutes", "0.5")
    assert "plan: this machine trains 8 images/s: 26 steps fill the 0.5-minute budget" in capsys.readouterr().out
    assert state["plan"] == {"steps": 26, "minutes": 0.5, "final_s": 2.84375, "made_for": (0.5, 0, 0.0),
                             "deadline": 0.5, "costs": {"step": 1.0, "validation": 1 / 32, "checkpoint": 0.0,
                                                        "grid": 2.8125}}
    assert state["step"] == 26 and state["elapsed_s"] == 29.0625
    assert state["guide"]["step"] == 7
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert float(rows[-1]["lr"]) == pytest.approx(1e-4) and float(rows[-1]["step"]) == 26
    lrs = [float(r["lr"]) for r in rows if int(r["step"]) > 2]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[0] > 0.9e-3  # a cosine laid over the plan
    assert sorted(os.listdir(tmp_path / "samples")) == ["epoch_0007.png"]


def test_a_step_floor_lengthens_the_budget_and_says_so(tiny_data, tmp_path, monkeypatch, capsys):
    """The same 30 s buy 26 steps; --min-steps 40 asks for more: the plan takes the 43.2 s that 40 steps need
    (3.03 s spent, 37 steps at 1.0085 s, 2.84 s for the end) and the run ends inside them, at 43.16 s."""
    FakeClock(monkeypatch)
    state = train_in_process(monkeypatch, "--data-dir", tiny_data, "--output-dir", tmp_path, *BUDGET_FLAGS,
                             "--train-minutes", "0.5", "--min-steps", "40")
    assert ("0.5 minutes buy 26 steps, fewer than the 40 these samples need (MIN_STEPS): training 0.7 minutes for "
            "them (--min-steps 0 keeps 0.5)") in capsys.readouterr().out
    assert state["plan"]["steps"] == 40 and state["plan"]["minutes"] * 60 == pytest.approx(43.19, abs=0.01)
    assert state["step"] == 40 and state["elapsed_s"] == 43.15625


def test_images_per_second_leave_validation_and_grids_out(tiny_data, tmp_path, monkeypatch):
    """A grid every epoch (2.8 s each) does not make the logged speed, or the clock's safety net, think training
    slowed: every row says 8 images/s (8 a step, 1 s a step), and the run ends as planned."""
    FakeClock(monkeypatch)
    state = train_in_process(monkeypatch, "--data-dir", tiny_data, "--output-dir", tmp_path, *BUDGET_FLAGS,
                             "--train-minutes", "0.5", "--sample-every", "1")
    rates = {float(r["img_per_s"]) for r in csv.DictReader(open(tmp_path / "log.csv"))}
    assert rates == {8.0} and state["step"] == state["plan"]["steps"]


def test_a_machine_that_slows_down_still_ends_inside_the_budget(tiny_data, tmp_path, monkeypatch, capsys):
    """Steps cost 2 s once the plan (26 steps at 1 s) is made: at step 6 the plan follows (15 steps at 2 s), and the
    clock's safety net stops the run at the first log point where the next window (4 s) and the end (2.84 s) no
    longer fit: step 14, at 27.97 s, the learning rate near its floor."""
    FakeClock(monkeypatch, slow_after=3)
    state = train_in_process(monkeypatch, "--data-dir", tiny_data, "--output-dir", tmp_path, *BUDGET_FLAGS,
                             "--train-minutes", "0.5")
    said = capsys.readouterr().out
    assert "plan revised at step 6: this machine trains 4 images/s: 15 steps fill the 0.5-minute budget" in said
    assert "stopping at step 14 of 15 to end within 0.5 minutes" in said
    assert state["step"] == 14 and state["elapsed_s"] == 27.96875
    assert float(list(csv.DictReader(open(tmp_path / "log.csv")))[-1]["lr"]) < 1.2e-4  # the cosine over 15 steps


@pytest.mark.parametrize("limit, steps", [("2", (40, 80.15625)), ("1", (28, 56.0625))])
def test_a_slowdown_under_a_floor_costs_time_not_steps(tiny_data, tmp_path, monkeypatch, capsys, limit, steps):
    """Steps cost 2 s once the plan (40 steps, 43.2 s, for --min-steps 40) is made: the run takes the time it needs,
    up to MAX_TRAIN_MINUTES: with 2 minutes all 40 steps, at 80.16 s; with 1 the plan follows at step 6 (29 steps)
    and the clock stops it at step 28, 56.06 s, where the next window (4 steps, 8 s) and the end (2.84 s) no longer
    fit in 60 s."""
    FakeClock(monkeypatch, slow_after=3)
    state = train_in_process(monkeypatch, "--data-dir", tiny_data, "--output-dir", tmp_path, *BUDGET_FLAGS,
                             "--train-minutes", "0.5", "--min-steps", "40", "--max-train-minutes", limit)
    assert state["plan"]["steps"] == (40 if limit == "2" else 29) and state["plan"]["deadline"] == float(limit)
    assert (state["step"], state["elapsed_s"]) == steps
    assert ("to end within 1 minutes" in capsys.readouterr().out) == (limit == "1")


@pytest.mark.parametrize("follows", [True, False])
def test_a_machine_that_speeds_up_reaches_the_floor_its_limit_allows(tiny_data, tmp_path, monkeypatch, capsys,
                                                                    follows):
    """Planned while the machine was busy (1 s a step), 60 steps would take 63 s: the 1-minute limit buys 56. Steps
    then cost 0.5 s: the plan follows the speed (revised at steps 14 and 16) and reaches all 60 steps in 38.3 s.
    A plan made once (REPLAN_CHANGE out of reach) stops at its 56."""
    FakeClock(monkeypatch, slow_after=10, step_after=0.5)
    if not follows:
        monkeypatch.setattr(train, "REPLAN_CHANGE", 1e9)
    state = train_in_process(monkeypatch, "--data-dir", tiny_data, "--output-dir", tmp_path, *BUDGET_FLAGS,
                             "--train-minutes", "0.5", "--min-steps", "60", "--max-train-minutes", "1")
    assert "training the 1-minute limit (MAX_TRAIN_MINUTES) for 56 steps" in capsys.readouterr().out
    assert (state["step"], state["elapsed_s"]) == ((60, 38.3125) if follows else (56, 36.28125))
    assert state["elapsed_s"] < 60


def test_adam_beta2_reaches_the_optimizer_also_on_resume(tiny_data, tmp_path, monkeypatch):
    common = ["--data-dir", tiny_data, "--output-dir", tmp_path, *TINY, "--sample-every", "1000"]
    first = train_in_process(monkeypatch, *common, "--epochs", "1", "--adam-beta2", "0.95")
    assert first["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    second = train_in_process(monkeypatch, *common, "--epochs", "2", "--adam-beta2", "0.99")
    assert second["step"] > first["step"] and second["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)


def test_a_resumed_run_keeps_its_budget(tiny_data, tmp_path, monkeypatch):
    """Stopped by a 15 s budget (a plan of 12 steps, ending at 14.94 s) and resumed under a 30 s one, the run counts
    the time already spent: it plans again from its own first steps, 24 in all, ending at 29.88 s. Resumed under
    the same budget, its plan stands."""
    FakeClock(monkeypatch)
    common = ["--data-dir", tiny_data, "--output-dir", tmp_path, *BUDGET_FLAGS]
    first = train_in_process(monkeypatch, *common, "--train-minutes", "0.25")
    assert first["step"] == 12 and first["elapsed_s"] == 14.9375
    second = train_in_process(monkeypatch, *common, "--train-minutes", "0.5")
    assert second["plan"]["steps"] == 24 and second["step"] == 24 and second["elapsed_s"] == 29.875
    third = train_in_process(monkeypatch, *common, "--train-minutes", "0.5")
    assert third["plan"] == second["plan"] and third["step"] == 24


def test_training_grids_sample_in_grid_steps(tmp_path):
    calls = []

    def net(x, t, *cond):
        calls.append(int(t[0]))
        return torch.zeros_like(x)
    schedule = utils.NoiseSchedule(1000, "cosine", "v")
    for sample_steps, expected in ((100, train.GRID_STEPS), (10, 10)):  # previews: GRID_STEPS, at most SAMPLE_STEPS
        calls.clear()
        cfg = dict(utils.constants(), IMAGE_SIZE=8, SAMPLE_STEPS=sample_steps)
        train.sample_grid(net, None, schedule, cfg, torch.device("cpu"), str(tmp_path / "grid.png"), [])
        assert len(calls) == expected and os.path.exists(tmp_path / "grid.png")


# ---------------------------------------------------------------- bf16 autocast
@pytest.mark.parametrize("setting, device, amx, expected", [
    ("auto", "cuda", False, True), ("auto", "cpu", True, True), ("auto", "cpu", False, False),
    ("auto", "mps", False, False), ("true", "cpu", False, True), ("false", "cuda", True, False)])
def test_bf16_auto_means_cuda_and_cpus_with_amx(setting, device, amx, expected, monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": amx})
    assert utils.wants_bf16({"BF16": setting}, torch.device(device)) is expected


@pytest.mark.parametrize("bf16", [True, False])
def test_training_runs_the_network_in_bf16_when_asked(bf16):
    """BF16: the U-Net's layers compute in bf16 and the loss still comes out in fp32."""
    model, seen = tiny_unet(), []
    model.stem.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    cfg = batch_config(BF16=str(bf16).lower(), MIN_SNR_GAMMA=0.0)
    x0, t, noise, cond = objective.make_batch(torch.zeros(4, 1, 16, 16, dtype=torch.uint8), torch.arange(4),
                                          torch.Generator().manual_seed(0), cfg, 0, 1, torch.device("cpu"))
    loss = objective.batch_loss(model, utils.NoiseSchedule(100, "cosine", "v"), x0, t, noise, cond, cfg, bf16)
    assert seen == [torch.bfloat16 if bf16 else torch.float32] and loss.dtype == torch.float32


@pytest.mark.parametrize("bf16, device, layout", [
    (True, "cpu", torch.contiguous_format), (False, "cpu", torch.channels_last), (True, "cuda", torch.channels_last)])
def test_networks_are_laid_out_for_their_precision(bf16, device, layout):
    """Channels-last, except under bf16 on a CPU (its channels-last GroupNorm runs several times slower)."""
    assert utils.memory_format(bf16, torch.device(device)) == layout
    if device == "cpu":
        cfg = dict(utils.constants(), IMAGE_SIZE=16, BASE_CHANNELS=8, CHANNEL_MULT=(1, 2), NUM_RES_BLOCKS=1,
                   ATTN_RESOLUTIONS=(), NUM_HEADS=2)
        net = load_network(cfg, 0, build_model(cfg).state_dict(), torch.device(device), bf16)
        assert net.out[-1].weight.is_contiguous(memory_format=layout)  # 8 channels in: the two layouts differ
        assert not net.out[-1].weight.is_contiguous(memory_format=torch.channels_last if bf16 else
                                                    torch.contiguous_format)


def test_sampling_follows_bf16_in_training_grids(tmp_path):
    """The training grid's sampler calls the network under bf16 autocast exactly when BF16 asks for it."""
    seen = []

    def net(x, t, *cond):
        seen.append(torch.is_autocast_enabled("cpu"))
        return torch.zeros_like(x)
    schedule = utils.NoiseSchedule(1000, "cosine", "v")
    for setting in ("true", "false"):
        cfg = dict(utils.constants(), IMAGE_SIZE=8, SAMPLE_STEPS=4, BF16=setting)
        train.sample_grid(net, None, schedule, cfg, torch.device("cpu"), str(tmp_path / "grid.png"), [])
    assert seen == [True] * 4 + [False] * 4


# ---------------------------------------------------------------- live curves (TensorBoard, where installed)
class FakeWriter:
    """What torch.utils.tensorboard.SummaryWriter is asked to record."""
    made = []

    def __init__(self, logdir):
        self.logdir, self.scalars, self.images, self.closed = logdir, [], [], False
        FakeWriter.made.append(self)

    def add_scalar(self, name, value, step):
        self.scalars.append((name, step))

    def add_images(self, name, images, step):
        self.images.append((name, tuple(images.shape), float(images.min()), float(images.max()), step))

    def close(self):
        self.closed = True


def test_tensorboard_gets_the_curves_and_grids_where_it_is_installed(tiny_data, tmp_path, monkeypatch, capsys):
    import types
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    FakeWriter.made.clear()
    train_in_process(monkeypatch, "--data-dir", tiny_data, "--output-dir", tmp_path, *TINY, "--epochs", "2",
                     "--sample-every", "1")
    assert f"live curves: tensorboard --logdir {tmp_path / 'tb'}" in capsys.readouterr().out
    (writer,) = FakeWriter.made
    assert writer.logdir == str(tmp_path / "tb") and writer.closed
    names = {name for name, _ in writer.scalars}
    assert names == {"loss", "lr", "img_per_s", "val_loss"} and ("val_loss", 8) in writer.scalars
    assert [(name, shape, step) for name, shape, _, _, step in writer.images] == [
        ("samples", (36, 1, 32, 32), 4), ("samples", (36, 1, 32, 32), 8)]
    assert all(0 <= low <= high <= 1 for _, _, low, high, _ in writer.images)


def test_without_tensorboard_nothing_changes(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails: not installed
    train_in_process(monkeypatch, "--data-dir", tiny_data, "--output-dir", tmp_path, *TINY, "--epochs", "1")
    assert "live curves" not in capsys.readouterr().out and not (tmp_path / "tb").exists()
