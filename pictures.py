"""The figures the project draws: the loss curve, the denoising process, animations, grids with named rows and
columns, edits beside their inputs, and slice stacks that open in an MRI viewer."""
import os

import torch
from torchvision.utils import make_grid

import utils


def save_process(states, out, columns=10, frames=40):
    """process.png: rows are samples, `columns` evenly spaced steps from noise to image; process.gif, `frames` of them."""
    cols = [states[round(i * (len(states) - 1) / (columns - 1))] for i in range(columns)]
    rows = torch.stack(cols, dim=1).flatten(0, 1)  # sample-major: each row is one sample's process
    utils.save_png(rows, os.path.join(out, "process.png"), nrow=columns)
    picks = [states[round(i * (len(states) - 1) / (frames - 1))] for i in range(frames)]
    save_gif([make_grid(x, nrow=len(x), padding=2)[:1] for x in picks] + [make_grid(picks[-1], nrow=len(picks[-1]),
                                                                                   padding=2)[:1]] * 10,
             os.path.join(out, "process.gif"))


def save_gif(frames, path, duration=80):
    """[-1, 1] images (1 x H x W) as a looping GIF."""
    from PIL import Image
    gif = [Image.fromarray((utils.to_unit(f[0]) * 255).byte().numpy()) for f in frames]
    gif[0].save(path, save_all=True, append_images=gif[1:], duration=duration, loop=0)


def save_labelled_grid(images, row_names, column_names, path, title, label_lines=1):
    """A grid of [-1, 1] images (rows x columns, row-major) with its rows and columns named (the column names up to
    label_lines lines each)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, cols = len(row_names), len(column_names)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols + 0.8, 1.3 * rows + 0.6 + 0.35 * (label_lines - 1)),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.imshow(utils.to_unit(images[i, 0]).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        if i % cols == 0:
            ax.set_ylabel(row_names[i // cols])
        if i >= (rows - 1) * cols:
            ax.set_xlabel(column_names[i % cols])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def to_ras(slices):
    """Axial slices as displayed here (N x S x S: anterior up, the patient's right on the left) as an
    S x S x N array whose axes run to the right, anterior and superior (RAS+, what NIfTI viewers expect)."""
    return slices.flip(1, 2).permute(2, 1, 0).numpy()


def save_stack(slices, path, pixel_mm, step_mm):
    """[-1, 1] axial slices (N x 1 x S x S, bottom to top, as shown here) as a uint8 NIfTI stack with these voxel
    sizes, oriented for MRI viewers."""
    import nibabel
    volume = (utils.to_unit(slices[:, 0]) * 255).round().to(torch.uint8)
    nibabel.save(nibabel.Nifti1Image(to_ras(volume), torch.diag(torch.tensor([pixel_mm, pixel_mm, step_mm, 1])).numpy()),
                 path)


def slice_name(name, sep="_"):
    """A slice's name for what is made from it: its file's name without folder and extensions (a scan's slice K:
    NAME, sep, K)."""
    return os.path.basename(name).split(".")[0] + (f"{sep}{name.rsplit(':', 1)[1]}" if ":" in name else "")


def row_label(name, longest=18):
    """A slice's name as a row label: its stem, its end kept where it is long."""
    label = slice_name(str(name), ":")
    return label if len(label) <= longest else "..." + label[-(longest - 3):]


def save_edits(columns, names, path, title, rows=8, outlines=None, as_named=False):
    """counterfactual.png: a row a slice (up to `rows`, evenly picked), a column each of `columns` ({name: [-1, 1]
    images}): 'difference...' (signed, counterfactual - input) as a diverging colour overlay on the input, 'effect
    map' and 'bits map' as heat maps, each with its colour bar; the rest in grey; `outlines` (bool masks) drawn on the
    first column; the rows labelled with the slices' names (as_named: as they are given, else their file stems)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    picked = torch.linspace(0, len(names) - 1, min(rows, len(names))).round().long().tolist()
    keys = list(columns)
    fig, axes = plt.subplots(len(picked), len(keys), figsize=(1.4 * len(keys) + 1.0, 1.4 * len(picked) + 0.5),
                             squeeze=False, layout="constrained")
    heat = ("difference", "effect map", "bits map")  # the columns drawn in colour, each with its own scale
    limit = {k: max(columns[k].abs().max().item(), 1e-3) for k in keys if k.startswith(heat)}
    shown = {}
    for r, i in enumerate(picked):
        for c, key in enumerate(keys):
            ax, image = axes[r, c], columns[key][i, 0]
            ax.set_xticks([])
            ax.set_yticks([])
            if key.startswith("difference"):
                ax.imshow(utils.to_unit(columns["input"][i, 0]), cmap="gray", vmin=0, vmax=1)
                strength = (image.abs() / limit[key]).clamp(0, 1).sqrt().numpy()
                shown[c] = ax.imshow(image, cmap="RdBu_r", vmin=-limit[key], vmax=limit[key], alpha=strength)
            elif key in ("effect map", "bits map"):
                shown[c] = ax.imshow(image, cmap="magma", vmin=0, vmax=limit[key])
            else:
                ax.imshow(utils.to_unit(image), cmap="gray", vmin=0, vmax=1)
            if c == 0 and outlines is not None and outlines[i].any():
                ax.contour(outlines[i, 0].float().numpy(), levels=[0.5], colors="red", linewidths=0.8)
            if r == 0:
                ax.set_title(key, fontsize=8)
            if c == 0:
                ax.set_ylabel(names[i] if as_named else row_label(names[i]), fontsize=7)
    for c, image in shown.items():
        bar = fig.colorbar(image, ax=list(axes[:, c]), shrink=0.5, aspect=30)
        bar.ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_loss_plot(history, path):
    """Training and validation loss against step, log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train", lw=1)
    val = [h for h in history if h["val_loss"] != ""]
    ax.plot([h["step"] for h in val], [h["val_loss"] for h in val], "o-", label="validation (EMA)")
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
