"""Generate brain slices with a trained DDPM, show the denoising process, and measure the result.

    python predict.py                              # NUM_SAMPLES images from OUTPUT_DIR/checkpoint.pt
    python predict.py --sampler ddim --sample-steps 50
    python predict.py --input my_slices/ --strength 0.5   # noise given images part-way, then denoise them
"""
import json
import math
import os
import time

import torch
from torchvision.utils import make_grid

import dataset
import utils
from modules import build_model
from utils import UserError

PROCESS_ROWS = 6  # samples shown in process.png / process.gif
PROCESS_COLUMNS = 10  # evenly spaced steps in process.png
GIF_FRAMES = 40  # frames of process.gif
SSIM_KERNEL = 7  # Gaussian window of SSIM / MS-SSIM (small images need a small one)
DIVERSITY_PAIRS = 200  # random pairs for the MS-SSIM diversity figures


def load_model(path, use_ema, device):
    """The network and noise schedule exactly as the checkpoint describes them."""
    state = utils.load_checkpoint(path)
    cfg, classes = state["config"], state.get("classes", [])
    try:
        model = build_model(cfg, len(classes))
        model.load_state_dict(state["ema" if use_ema else "model"])
    except (KeyError, RuntimeError, TypeError) as e:
        raise UserError(f"{path} does not match this project's U-Net ({str(e).splitlines()[0][:100]})") from None
    model = model.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
    schedule = utils.NoiseSchedule(cfg["TIMESTEPS"], cfg["BETA_SCHEDULE"], cfg["PREDICTION"])
    return model, schedule, cfg, classes, state.get("step", 0)


def make_net(model, device, labels=None, guidance=1.0, compile_model=False):
    """model(x_t, t) for the samplers: bf16 on CUDA, classifier-free guidance when labels are given."""
    net = torch.compile(model) if compile_model else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def call(x, t):
        with autocast:
            if labels is None:
                return net(x.contiguous(memory_format=torch.channels_last), t)
            n = len(x)
            y = torch.cat([labels[:n], torch.full_like(labels[:n], model.num_classes)])
            cond, uncond = net(torch.cat([x, x]), torch.cat([t, t]), y).float().chunk(2)
            return uncond + guidance * (cond - uncond)
    return call


def generate(net, schedule, cfg, run, device, out):
    """NUM_SAMPLES images in batches; returns them and the snapshots of the first batch's process."""
    gen = torch.Generator(device=device).manual_seed(run["SEED"])
    size, samples, frames = cfg["IMAGE_SIZE"], [], []
    for start in range(0, run["NUM_SAMPLES"], run["SAMPLE_BATCH"]):
        n = min(run["SAMPLE_BATCH"], run["NUM_SAMPLES"] - start)
        x = torch.randn((n, cfg["CHANNELS"], size, size), generator=gen, device=device)
        if not start:  # the first batch's process, from its noise on
            frames.append(x[:PROCESS_ROWS].cpu())
        keep = (lambda i, total, x_t, x0: frames.append(x_t[:PROCESS_ROWS].float().cpu())) if not start else None
        x = schedule.sample(net, sampler=run["SAMPLER"], steps=run["SAMPLE_STEPS"], eta=run["DDIM_ETA"], x=x,
                            generator=gen, device=device, callback=keep, spacing=run["STEP_SPACING"])
        samples.append(x.float().cpu())
    samples = torch.cat(samples)
    for i, img in enumerate(samples):
        utils.save_png(img, os.path.join(out, f"sample_{i:03d}.png"))
    utils.save_png(samples, os.path.join(out, "grid.png"))
    return samples, frames


def save_process(states, out):
    """process.png: rows are samples, columns evenly spaced steps from noise to image; process.gif."""
    from PIL import Image
    cols = [states[round(i * (len(states) - 1) / (PROCESS_COLUMNS - 1))] for i in range(PROCESS_COLUMNS)]
    rows = torch.stack(cols, dim=1).flatten(0, 1)  # sample-major: each row is one sample's process
    utils.save_png(rows, os.path.join(out, "process.png"), nrow=PROCESS_COLUMNS)
    picks = [states[round(i * (len(states) - 1) / (GIF_FRAMES - 1))] for i in range(GIF_FRAMES)]
    gif = [Image.fromarray((utils.to_unit(make_grid(x, nrow=len(x), padding=2)[0]) * 255).byte().numpy())
           for x in picks]
    gif[0].save(os.path.join(out, "process.gif"), save_all=True, append_images=gif[1:] + [gif[-1]] * 10,
                duration=80, loop=0)


def denoise(net, schedule, images, run, strength, device, out):
    """Noise each image to step strength*T, denoise it back; writes input | noised | result rows."""
    if not 0 < strength <= 1:
        raise UserError(f"--strength must be in (0, 1], got {strength}")
    gen = torch.Generator(device=device).manual_seed(run["SEED"])
    x0 = images.to(device).float() / 127.5 - 1
    start_t = max(0, round(strength * schedule.timesteps) - 1)
    noise = torch.randn(x0.shape, generator=gen, device=device)
    noised = schedule.q_sample(x0, torch.full((len(x0),), start_t, device=device), noise)
    result = schedule.sample(net, sampler=run["SAMPLER"], steps=run["SAMPLE_STEPS"], eta=run["DDIM_ETA"], x=noised,
                             start_t=start_t, generator=gen, device=device, spacing=run["STEP_SPACING"])
    for i, img in enumerate(result):
        utils.save_png(img, os.path.join(out, f"denoised_{i:03d}.png"))
    triples = torch.stack([x0, noised.clamp(-1, 1), result.float()], dim=1).flatten(0, 1).cpu()
    utils.save_png(triples, os.path.join(out, "denoise.png"), nrow=3)
    return result


def nearest(a, b, device):
    """For each image of a, the index and RMSE of its nearest image (L2) in b; both [0, 1]."""
    a2 = a.flatten(1).to(device)
    best_d, best_i = torch.full((len(a),), float("inf"), device=device), torch.zeros(len(a), dtype=torch.long,
                                                                                       device=device)
    for s in range(0, len(b), 4096):
        bb = b[s:s + 4096].flatten(1).to(device).float() / 255
        d = (a2.square().sum(1, keepdim=True) - 2 * a2 @ bb.T + bb.square().sum(1)).clamp(min=0)
        dmin, imin = d.min(1)
        better = dmin < best_d
        best_d, best_i = torch.where(better, dmin, best_d), torch.where(better, imin + s, best_i)
    return best_i.cpu(), (best_d / a2.shape[1]).sqrt().cpu()


def ms_ssim_pairs(x, gen):
    """Mean MS-SSIM over random pairs of distinct images: lower means more diverse."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim
    i = torch.randint(0, len(x), (DIVERSITY_PAIRS,), generator=gen)
    j = (i + torch.randint(1, len(x), (DIVERSITY_PAIRS,), generator=gen)) % len(x)
    scales = max(1, min(5, int(math.log2(x.shape[-1] / (SSIM_KERNEL - 1))) + 1))
    betas = torch.tensor((0.0448, 0.2856, 0.3001, 0.2363, 0.1333)[:scales])
    return ms_ssim(x[i], x[j], data_range=1.0, kernel_size=SSIM_KERNEL, betas=tuple((betas / betas.sum()).tolist()),
                   normalize="relu").item()


def metrics(samples, data, device):
    """Fidelity (SSIM/PSNR to the nearest held-out image), diversity (MS-SSIM), and memorisation checks."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    fake = utils.to_unit(samples)
    heldout = data.val.float() / 255
    idx, _ = nearest(fake, data.val, device)
    ssim = structural_similarity_index_measure(fake, heldout[idx], data_range=1.0, kernel_size=SSIM_KERNEL,
                                               reduction="none")
    psnr = peak_signal_noise_ratio(fake, heldout[idx], data_range=1.0, reduction="none", dim=(1, 2, 3))
    _, fake_to_train = nearest(fake, data.train, device)
    _, real_to_train = nearest(heldout[:len(fake) * 4], data.train, device)
    copy_threshold = torch.quantile(real_to_train, 0.05).item()  # closer than 95% of unseen real images
    gen = torch.Generator().manual_seed(0)
    return {"num_samples": len(fake), "heldout_images": len(heldout),
            "ssim_to_nearest_heldout": ssim.mean().item(), "psnr_to_nearest_heldout": psnr.mean().item(),
            "ms_ssim_between_samples": ms_ssim_pairs(fake, gen) if len(fake) > 1 else None,
            "ms_ssim_between_real": ms_ssim_pairs(heldout, gen) if len(heldout) > 1 else None,
            "rmse_sample_to_nearest_train": fake_to_train.mean().item(),
            "rmse_heldout_to_nearest_train": real_to_train.mean().item(),
            "possible_copies": int((fake_to_train < copy_threshold).sum())}


def main():
    parser = utils.build_parser(__doc__)
    parser.add_argument("--checkpoint", help="checkpoint to load (default: OUTPUT_DIR/checkpoint.pt)")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of their EMA")
    parser.add_argument("--input", help="denoise the images in this folder (default: a few held-out images)")
    parser.add_argument("--strength", type=float, default=0.5, help="noise level for denoising, in (0, 1]")
    parser.add_argument("--no-metrics", action="store_true", help="skip metrics.json")
    args = parser.parse_args()
    run = utils.check_config(utils.config_from_args(args))
    device = utils.get_device()
    path = args.checkpoint or os.path.join(run["OUTPUT_DIR"], "checkpoint.pt")
    model, schedule, cfg, classes, step = load_model(path, not args.no_ema, device)
    out = os.path.join(run["OUTPUT_DIR"], "predict")
    os.makedirs(out, exist_ok=True)
    labels = (torch.arange(max(run["NUM_SAMPLES"], run["SAMPLE_BATCH"]), device=device) % len(classes)
              if classes else None)
    net = make_net(model, device, labels, run["GUIDANCE"], utils.wants_compile(run, device))
    print(f"{path}: step {step:,}, {cfg['IMAGE_SIZE']} px, {run['SAMPLER']} with "
          f"{cfg['TIMESTEPS'] if run['SAMPLER'] == 'ddpm' else run['SAMPLE_STEPS']} steps, {device}")

    started = time.perf_counter()
    samples, frames = generate(net, schedule, cfg, run, device, out)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    print(f"{len(samples)} samples in {seconds:.1f} s ({len(samples) / seconds:.2f} images/s) -> {out}/grid.png")
    save_process(frames, out)

    data = None
    if args.input is None or not args.no_metrics:
        data_cfg = dict(cfg, DATA_DIR=run["DATA_DIR"] if run["DATA_DIR"] != utils.DATA_DIR else cfg["DATA_DIR"])
        data = dataset.load_data(data_cfg)
    images = dataset.read_folder(args.input, cfg["IMAGE_SIZE"]) if args.input else data.val[:8]
    denoise(make_net(model, device, labels, run["GUIDANCE"]), schedule, images[:run["SAMPLE_BATCH"]], run,
            args.strength, device, out)
    print(f"denoised {min(len(images), run['SAMPLE_BATCH'])} images at strength {args.strength} -> {out}/denoise.png")

    if not args.no_metrics:
        result = metrics(samples, data, device)
        result.update(sampler=run["SAMPLER"], steps=cfg["TIMESTEPS"] if run["SAMPLER"] == "ddpm" else run["SAMPLE_STEPS"], images_per_s=len(samples) / seconds,
                      checkpoint=path, step=step)
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(result, f, indent=2)
        print("\n".join(f"  {k:32s} {v:.4f}" if isinstance(v, float) else f"  {k:32s} {v}"
                        for k, v in result.items()))


if __name__ == "__main__":
    utils.run(main)
