"""docs/gpu_check.sh rehearsed on the CPU with a tiny profile: each part writes its outputs and its summary line, and
a part that fails or runs out of time is recorded while the next ones run."""
import json
import os
import subprocess
import sys
import tarfile

from conftest import ROOT, TINY

SCRIPT = os.path.join(ROOT, "docs", "gpu_check.sh")
PARTS = ["setup", "tests", "bench", "train_predict", "inpaint", "counterfactual"]
PROFILE = " ".join(TINY + ["--image-size", "16", "--attn-resolutions", "8"])  # conftest's conditional_run
REHEARSAL = {"PYTHON": sys.executable, "INSTALL": "0", "CUDA_VISIBLE_DEVICES": "", "TESTS": "tests/test_cuda.py",
             "PROFILE": PROFILE, "TRAIN_FLAGS": "--train-minutes 0 --epochs 1",
             "BENCH_FLAGS": "--steps 2 --rounds 1 --warmup 1 --ddpm-batch 2 --sample-batch 2"}


def gpu_check(out, **env):
    return subprocess.run(["bash", SCRIPT, str(out)], capture_output=True, text=True, timeout=400,
                          env=dict(os.environ, **REHEARSAL, **env))


def summary(out):
    return {p["part"]: p for p in json.load(open(os.path.join(out, "summary.json")))["parts"]}


def test_every_part_writes_its_outputs_and_summary_line(disks_data, tmp_path):
    r = gpu_check(tmp_path, DATA_DIR=disks_data)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in PARTS:
        assert f"== {name}: at most " in r.stdout and f"output in {tmp_path}/{name}/" in r.stdout
    lines = open(tmp_path / "summary.txt").read().splitlines()
    assert [line.split()[0] for line in lines] == PARTS and all(line.split()[1] == "ok" for line in lines)
    parts = summary(tmp_path)
    assert list(parts) == PARTS and all(p["status"] == "ok" and 0 < p["seconds"] <= p["limit_s"] for p in parts.values())
    assert "skipped" in parts["tests"]["line"] and "train" in parts["bench"]["line"]
    assert "steps" in parts["train_predict"]["line"] and "repaint" in parts["inpaint"]["line"]
    for name in ("tests/junit.xml", "bench/bench.json", "train_predict/log.csv", "train_predict/predict/grid.png",
                 "train_predict/predict/metrics.json", "train_predict/checkpoint.pt", "inpaint/edit/inpaint.json",
                 "counterfactual/edit/counterfactual.json", "counterfactual/edit/counterfactual.png"):
        assert os.path.exists(tmp_path / name), name
    bundled = tarfile.open(tmp_path / "gpu_check.tgz").getnames()
    assert "train_predict/predict/metrics.json" in bundled and "summary.json" in bundled
    assert not [n for n in bundled if n.endswith(".pt")]


def test_a_failed_or_late_part_is_recorded_and_the_next_ones_run(tmp_path):
    r = gpu_check(tmp_path, DATA_DIR=str(tmp_path / "missing"), LIMIT_TESTS="1", PARTS="tests bench counterfactual")
    assert r.returncode == 1
    parts = summary(tmp_path)
    assert list(parts) == ["tests", "bench", "counterfactual"] and parts["tests"]["status"] == "timed out"
    assert parts["bench"]["status"] == parts["counterfactual"]["status"] == "failed (2)"
    assert "is not a folder" in parts["bench"]["line"]  # a failure's line: the error it ended with


def test_a_spent_run_skips_the_parts_left(tmp_path):
    r = gpu_check(tmp_path, TOTAL="0")
    assert r.returncode == 1
    assert [p["status"] for p in summary(tmp_path).values()] == ["skipped"] * len(PARTS)
