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


def test_contradicting_config_is_refused(tiny_run):
    r = run_script("train.py", "--output-dir", tiny_run, *TINY, "--base-channels", "16", "--epochs", "3")
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
    common = ["--data-dir", tiny_data, *TINY, "--epochs", "1", "--compile", "false"]
    single = run_script("train.py", "--output-dir", str(tmp_path / "one"), *common)
    assert single.returncode == 0, single.stderr
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                          os.path.join(ROOT, "train.py"), "--output-dir", str(tmp_path / "two"),
                          *common, "--batch-size", "4"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert ddp.returncode == 0, ddp.stderr
    assert "weights identical on all 2 ranks" in ddp.stdout
    a, b = weights(str(tmp_path / "one")), weights(str(tmp_path / "two"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
