"""Measure training and sampling speed of the configured model on this device.

    python bench.py                          # the constants in utils.py (any --flag overrides them)
    python bench.py --vs-diffusers           # also diffusers' UNet2DModel of matched size, alternating
    python bench.py --profile                # also where the step's time goes (top operators, a trace file)
    python bench.py --cuda-graphs            # also sampling with CUDA graphs (torch.compile mode reduce-overhead)
    python bench.py --ingest 200             # instead, the time to read 200 synthetic scans, cold and cached
Prints a table and writes OUTPUT_DIR/bench.json. Utilisation is given twice: against the device's
spec-sheet peak (MFU, CUDA) and against a dense matmul timed in the same run (any device).
"""
import json
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import nibabel
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import dataset
import objective
import train
import utils
from modules import Denoiser, build_model, groups

PEAK_BF16_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10G": 70, "A10": 125,
                    "RTX 4090": 165, "RTX 3090": 71, "V100": 125}  # dense bf16 (fp16 for V100) tensor-core peaks
WARM_STEPS = 10  # sampling: at most this many steps in the untimed warm-up batch (compilation, CUDA graph recording)
INGEST_SHAPE = (256, 256, 170)  # --ingest: voxels of each synthetic scan (int16, 1 x 1 x 1.2 mm, gzipped NIfTI)


class DiffusersUNet(torch.nn.Module):
    """diffusers' UNet2DModel with our widths, depths, attention resolutions and pixel folding, called like ours."""

    def __init__(self, cfg):
        super().__init__()
        from diffusers import UNet2DModel
        self.patch = cfg["PATCH_SIZE"]
        size, channels = cfg["IMAGE_SIZE"] // self.patch, cfg["CHANNELS"] * self.patch ** 2
        widths = [cfg["BASE_CHANNELS"] * m for m in cfg["CHANNEL_MULT"]]
        attn = [size // 2 ** i in cfg["ATTN_RESOLUTIONS"] for i in range(len(widths))]
        self.net = UNet2DModel(
            sample_size=size, in_channels=channels, out_channels=channels,
            layers_per_block=cfg["NUM_RES_BLOCKS"], block_out_channels=widths, norm_num_groups=groups(widths[0]),
            down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
            up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
            attention_head_dim=widths[-1] // cfg["NUM_HEADS"], dropout=cfg["DROPOUT"])

    def forward(self, x, t, y=None, s=None):
        return F.pixel_shuffle(self.net(F.pixel_unshuffle(x, self.patch), t).sample, self.patch)


def peak_tflops(device, override):
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_tflops(device):
    """Dense matmul throughput in the training dtype (bf16 on CUDA, fp32 on CPU): the reachable peak."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(6):
        sync(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 4 * 2 * n ** 3 / min(times[1:]) / 1e12


def flops_per_image(model, cfg, device):
    """Training FLOPs (forward + backward) per image, counted by torch.utils.flop_counter."""
    x = torch.randn(2, cfg["CHANNELS"], cfg["IMAGE_SIZE"], cfg["IMAGE_SIZE"], device=device)
    t = torch.randint(0, cfg["TIMESTEPS"], (2,), device=device)
    with FlopCounterMode(display=False) as counter:
        model(x, t).square().mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


class TrainingRun:
    """The real training step (train.py) of one model on the real data, timed in rounds."""

    def __init__(self, model, cfg, images, device):
        self.cfg, self.images, self.device = cfg, images, device
        self.bf16 = utils.wants_bf16(cfg, device)
        self.model = model.to(device, memory_format=utils.memory_format(self.bf16, device))
        self.net = torch.compile(self.model) if utils.wants_compile(cfg, device) else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        self.ema = train.make_ema(self.model, cfg)
        self.schedule = utils.NoiseSchedule(cfg["TIMESTEPS"], cfg["BETA_SCHEDULE"], cfg["PREDICTION"])
        self.gen = torch.Generator(device=device).manual_seed(0)

    def run(self, steps):
        """Images per second over `steps` steps."""
        sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            idx = torch.randint(0, len(self.images), (self.cfg["BATCH_SIZE"],), device=self.images.device)
            x0, t, noise, cond = objective.make_batch(self.images, idx, self.gen, self.cfg, 0, 1, self.device)
            train.train_step(self.net, self.model, self.optimizer, self.schedule, x0, t, noise, cond, self.cfg,
                             self.bf16)
            self.ema.update_parameters(self.model)
        sync(self.device)
        return steps * self.cfg["BATCH_SIZE"] / (time.perf_counter() - start)


def replayed(model):
    """model compiled with CUDA graphs (torch.compile mode 'reduce-overhead'): each call's kernels are launched as one
    recorded graph, with no gaps between the launches; its output is copied out, since the next replay overwrites
    it. On a CPU, the plain compiled model."""
    net = torch.compile(model, mode="reduce-overhead")
    return lambda *args: net(*args).clone()


def sampling_speed(run, sampler, steps, batch, cuda_graphs=False):
    """Images per second of one batch through the sampler as predict.py runs it (the network, and under
    AUTOGUIDANCE a second, same-sized call standing in for the early snapshot), after a warm-up batch of at most
    WARM_STEPS steps; with cuda_graphs, the network replayed() instead."""
    cfg, device = run.cfg, run.device
    model = run.ema.module.eval()
    net = replayed(model) if cuda_graphs else torch.compile(model) if run.net is not run.model else model
    call = Denoiser(net, guide=net, autoguidance=cfg["AUTOGUIDANCE"], bf16=run.bf16)
    shape = (batch, cfg["CHANNELS"], cfg["IMAGE_SIZE"], cfg["IMAGE_SIZE"])
    times = []
    for start_t in (min(WARM_STEPS, cfg["TIMESTEPS"]) - 1, None):
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            run.schedule.sample(call, shape, sampler, steps, device=device, spacing=cfg["STEP_SPACING"],
                                start_t=start_t)
        sync(device)
        times.append(time.perf_counter() - start)
    model.train()
    return batch / times[-1]


def profile_steps(run, steps, path):
    """Print the operators that take the most time in `steps` training steps; write a Chrome trace."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run.run(steps)
    key = "self_cuda_time_total" if run.device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=20))
    prof.export_chrome_trace(path)
    print(f"trace: {path} (open in chrome://tracing or ui.perfetto.dev)")


def synthetic_head(shape, seed):
    """A head-like int16 NIfTI scan: a textured ellipsoid brain inside a skull shell, with scanner noise."""
    g = torch.Generator().manual_seed(seed)
    axes = [torch.linspace(-1, 1, n).view([-1 if i == j else 1 for j in range(3)]) for i, n in enumerate(shape)]
    radii = torch.tensor([0.75, 0.85, 0.8]) * (1 + 0.05 * torch.randn(3, generator=g))
    r = sum((a / ra) ** 2 for a, ra in zip(axes, radii))
    texture = torch.nn.functional.interpolate(torch.rand(1, 1, 24, 24, 16, generator=g), size=shape,
                                              mode="trilinear")[0, 0]
    vol = torch.where(r < 0.75, 400 + 500 * texture, torch.where((r > 0.85) & (r < 1), 250.0, 0.0))
    vol = (vol + 30 * torch.randn(shape, generator=g)).abs().round().to(torch.int16)
    return nibabel.Nifti1Image(vol.numpy(), torch.diag(torch.tensor([1.0, 1.0, 1.2, 1.0])).numpy())


def ingest_speed(n, cfg):
    """Write n synthetic scans to a temporary folder, time dataset.py reading them cold (decoding) and warm (the
    cache only), print the figures with the cache size, and delete the scans."""
    folder = tempfile.mkdtemp(prefix="bench_ingest_")
    try:
        print(f"writing {n} synthetic {'x'.join(map(str, INGEST_SHAPE))} int16 scans into {folder}...", flush=True)
        with ThreadPoolExecutor(utils.io_threads()) as pool:
            list(pool.map(lambda i: nibabel.save(synthetic_head(INGEST_SHAPE, i), f"{folder}/scan_{i:03d}.nii.gz"),
                          range(n)))
        scans = sum(e.stat().st_size for e in os.scandir(folder))
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            data = dataset.load_data(dict(cfg, DATA_DIR=folder))
            seconds.append(time.perf_counter() - start)
        cache = sum(e.stat().st_size for e in os.scandir(data.cache))
        print(f"{n} scans ({scans / 2 ** 30:.2f} GiB), {len(data.train) + len(data.val)} slices at {cfg['IMAGE_SIZE']} "
              f"px: cold {seconds[0]:.1f} s ({n / seconds[0]:.1f} scans/s, {utils.io_threads()} threads), warm "
              f"{seconds[1]:.2f} s; cache {cache / 2 ** 20:.0f} MiB")
    finally:
        shutil.rmtree(folder)


def parse_settings():
    """The configuration (constants and flags, checked) and the benchmark's own flags."""
    parser = utils.build_parser(__doc__)
    parser.add_argument("--vs-diffusers", action="store_true", help="also time diffusers' UNet2DModel, alternating")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (the median is reported)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation, autotuning)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU")
    parser.add_argument("--ddpm-batch", type=int, default=64, help="batch for the 1000-step ddpm timing (0 skips)")
    parser.add_argument("--profile", action="store_true", help="also profile a few training steps of ours")
    parser.add_argument("--cuda-graphs", action="store_true", help="also time sampling with the network replayed as "
                        "CUDA graphs (torch.compile mode 'reduce-overhead'), beside today's path")
    parser.add_argument("--ingest", type=int, metavar="N", help="instead, time reading N synthetic scans (see above)")
    return utils.parse_settings(parser)


def build_runs(cfg, images, device, vs_diffusers):
    """{name: TrainingRun}: ours, and diffusers' U-Net of matched size when asked for."""
    runs = {"ours": TrainingRun(build_model(cfg), cfg, images, device)}
    if vs_diffusers:
        try:
            runs["diffusers"] = TrainingRun(DiffusersUNet(cfg), cfg, images, device)
        except ImportError:
            raise utils.InputError("--vs-diffusers needs diffusers: pip install diffusers") from None
    return runs


def time_training(runs, args, device):
    """{name: images/s of each round}, after a warm-up; the models alternate so drifts in clock or load hit all."""
    for name, run in runs.items():
        print(f"warming up {name} ({args.warmup} steps, compiling if on)...", flush=True)
        run.run(args.warmup)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rates = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            rates[name].append(run.run(args.steps))
            print(f"  {name}: {rates[name][-1]:.1f} img/s", flush=True)
    return rates


def summarise(runs, rates, cfg, device, args):
    """bench.json's content: speeds, FLOPs, utilisation, memory, speed-up and sampling rates."""
    peak, matmul = peak_tflops(device, args.peak_tflops), matmul_tflops(device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              f"cpu ({torch.get_num_threads()} threads)", "image_size": cfg["IMAGE_SIZE"],
              "batch_size": cfg["BATCH_SIZE"], "torch": torch.__version__,
              "compile": runs["ours"].net is not runs["ours"].model, "bf16": runs["ours"].bf16, "peak_tflops": peak,
              "matmul_tflops": matmul}
    for name, run in runs.items():
        rate, flops = statistics.median(rates[name]), flops_per_image(run.model, cfg, device)
        result[name] = {"params_m": sum(p.numel() for p in run.model.parameters()) / 1e6,
                        "train_img_per_s": rate, "train_gflops_per_img": flops / 1e9,
                        "mfu": flops * rate / (peak * 1e12) if peak else None,
                        "matmul_utilisation": flops * rate / (matmul * 1e12)}
    if device.type == "cuda":
        result["ours"]["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    if "diffusers" in runs:
        result["train_speedup_vs_diffusers"] = result["ours"]["train_img_per_s"] / result["diffusers"]["train_img_per_s"]
    result["sample_autoguidance"] = cfg["AUTOGUIDANCE"]  # above 1, every sampling step calls two networks
    for graphs in (False, True) if args.cuda_graphs else (False,):
        tag = "_cudagraphs" if graphs else ""
        result["ours"][f"sample_dpm++sde25{tag}_img_per_s"] = sampling_speed(runs["ours"], "dpm++sde", 25,
                                                                            cfg["SAMPLE_BATCH"], graphs)
        if args.ddpm_batch:
            result["ours"][f"sample_ddpm1000{tag}_img_per_s"] = sampling_speed(runs["ours"], "ddpm", cfg["TIMESTEPS"],
                                                                              args.ddpm_batch, graphs)
    return result


def print_report(result, cfg):
    """The figures as a few lines of text."""
    print(f"{result['device']}, {cfg['IMAGE_SIZE']} px, batch {cfg['BATCH_SIZE']}, torch {torch.__version__}, "
          f"compile {result['compile']}, bf16 {result['bf16']}, dense matmul {result['matmul_tflops']:.2f} TFLOP/s")
    for name in ("ours", "diffusers"):
        if r := result.get(name):
            print(f"  {name:10s} {r['params_m']:6.1f}M params  train {r['train_img_per_s']:9.1f} img/s  "
                  f"{r['train_gflops_per_img']:7.1f} GFLOP/img  {100 * r['matmul_utilisation']:.0f}% of matmul"
                  + (f"  MFU {100 * r['mfu']:.1f}%" if r["mfu"] else ""))
    if "train_speedup_vs_diffusers" in result:
        print(f"  speed-up vs diffusers: {result['train_speedup_vs_diffusers']:.2f}x")
    rates = ", ".join(f"{k[len('sample_'):-len('_img_per_s')]} {v:.1f} img/s" for k, v in result["ours"].items()
                      if k.startswith("sample_"))
    print(f"  sampling (autoguidance {result['sample_autoguidance']:g}): {rates}")


def main():
    cfg, args = parse_settings()
    if args.ingest:
        return ingest_speed(args.ingest, cfg)
    device = utils.get_device()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    images = utils.to_device_if_fits(dataset.load_data(cfg).train, device)
    runs = build_runs(cfg, images, device, args.vs_diffusers)
    rates = time_training(runs, args, device)
    result = summarise(runs, rates, cfg, device, args)
    print_report(result, cfg)
    os.makedirs(cfg["OUTPUT_DIR"], exist_ok=True)
    if args.profile:
        profile_steps(runs["ours"], args.steps, os.path.join(cfg["OUTPUT_DIR"], "bench_trace.json"))
    with open(os.path.join(cfg["OUTPUT_DIR"], "bench.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    utils.run_main(main)
