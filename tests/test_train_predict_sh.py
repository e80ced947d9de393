"""The whole job in one command, end to end, on a tiny CPU profile."""
import os
import subprocess

from conftest import ROOT, TINY


def test_train_predict_sh_runs_end_to_end(tiny_data, tmp_path):
    out = str(tmp_path / "out")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run(["bash", os.path.join(ROOT, "train_predict.sh"), "--data-dir", tiny_data, "--output-dir", out,
                        *TINY, "--epochs", "1"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "CPU quick profile" in r.stdout and f"samples in {out}/predict/" in r.stdout
    for name in ("checkpoint.pt", "loss.png", "predict/grid.png", "predict/process.gif", "predict/metrics.json",
                 "predict/sample_035.png"):
        assert os.path.exists(os.path.join(out, name)), name


def test_a_failing_stage_is_named(tmp_path):
    r = subprocess.run(["bash", os.path.join(ROOT, "train_predict.sh"), "--data-dir", str(tmp_path / "missing"),
                        "--output-dir", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 2 and "training (train.py) failed with exit code 2" in r.stderr
