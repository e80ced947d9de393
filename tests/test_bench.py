"""bench.py runs on CPU in a tiny configuration and writes its JSON."""
import json
import os
from types import SimpleNamespace

import torch

import bench
import utils
from conftest import TINY, run_script


def test_bench_writes_json(tiny_data, tmp_path):
    r = run_script("bench.py", "--data-dir", tiny_data, "--output-dir", str(tmp_path), *TINY, "--steps", "2",
                   "--rounds", "2", "--warmup", "1", "--ddpm-batch", "2", "--sample-batch", "2", "--profile")
    assert r.returncode == 0, r.stderr
    result = json.load(open(os.path.join(tmp_path, "bench.json")))
    ours = result["ours"]
    assert ours["train_img_per_s"] > 0 and ours["train_gflops_per_img"] > 0
    assert result["matmul_tflops"] > 0 and 0 < ours["matmul_utilisation"] < 1.5
    assert ours["sample_dpm++sde25_img_per_s"] > 0 and ours["sample_ddpm1000_img_per_s"] > 0
    assert "img/s" in r.stdout and "% of matmul" in r.stdout
    assert "convolution" in r.stdout  # the profile's operator table
    assert os.path.getsize(os.path.join(tmp_path, "bench_trace.json")) > 0


def test_bench_ingest_times_scans_and_cleans_up(tmp_path):
    r = run_script("bench.py", "--ingest", "2", "--image-size", "32", "--output-dir", str(tmp_path),
                   env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert r.returncode == 0, r.stderr
    assert "2 scans" in r.stdout and "cold" in r.stdout and "warm" in r.stdout and "cache" in r.stdout
    assert not [f for f in os.listdir(tmp_path) if f.startswith("bench_ingest_")]  # the scans are deleted


class CountingNet(torch.nn.Module):
    """A network that outputs zeros and counts its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, t, *cond):
        self.calls += 1
        return torch.zeros_like(x)


def test_sampling_speed_times_the_guides_call_too():
    for autoguidance, calls_per_step in ((1.25, 2), (1.0, 1)):
        net = CountingNet()
        cfg = dict(utils.constants(), IMAGE_SIZE=8, AUTOGUIDANCE=autoguidance)
        run = SimpleNamespace(cfg=cfg, device=torch.device("cpu"), ema=SimpleNamespace(module=net), net=net, model=net,
                              schedule=utils.NoiseSchedule(100, "cosine", "v"), bf16=False)
        assert bench.sampling_speed(run, "dpm++sde", 5, 2) > 0
        assert net.calls == 2 * 5 * calls_per_step  # a warm-up batch and a timed one, 5 steps each


def test_sampling_speed_with_cuda_graphs_calls_the_replayed_network_as_often():
    """--cuda-graphs: the network compiled in mode 'reduce-overhead' (on a CPU, plainly compiled), its outputs
    copied out of the graph's memory, each step calling it and the guide's stand-in."""
    net = CountingNet()
    cfg = dict(utils.constants(), IMAGE_SIZE=8, AUTOGUIDANCE=1.25)
    run = SimpleNamespace(cfg=cfg, device=torch.device("cpu"), ema=SimpleNamespace(module=net), net=net, model=net,
                          schedule=utils.NoiseSchedule(100, "cosine", "v"), bf16=False)
    assert bench.sampling_speed(run, "dpm++sde", 5, 2, cuda_graphs=True) > 0
    assert net.calls == 2 * 5 * 2
