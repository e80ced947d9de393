"""Issue 37's last target: the healthy template (no look, no disease) aged 10 years by a model with an age covariate,
its change outside the true atrophy beside the null reconstruction's. The template's slices are rendered by the
labelled demo's own story at AGE and at AGE + YEARS (its truth), then progressed under class NC.

    python docs/age_the_template.py --output-dir outputs [--edit-mask none --edit-guidance 6]
"""
import json
import os
import sys
import tempfile

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dataset  # noqa: E402
import demo  # noqa: E402
import pictures  # noqa: E402
import progress  # noqa: E402
import utils  # noqa: E402
from predict import open_checkpoint  # noqa: E402

AGE, YEARS = 70.0, 10  # the template's age as rendered, and how many years on it is aged
SLICES = 16  # template slices, evenly spread from bottom to top
RENDER_SIZE = 256  # rendered as the demo renders, then read at the model's size as dataset.py reads the demo


def rendered(severity, size):
    """The template's SLICES slices with the atrophy of `severity`, no random look (mean gamma), read at `size`:
    ([-1, 1] images, their heights)."""
    vol, mm = demo._template(RENDER_SIZE)
    z = torch.linspace(0, len(vol) - 1, SLICES)
    n = len(z)
    look = demo.Look(torch.zeros(n), torch.ones(n, 1, 1), torch.ones(n, 2, 1), torch.zeros(n, 2, 1),
                     torch.zeros(n, 2, 5, 5), torch.zeros(n, 2, 4, 4), torch.full((n, 1, 1), 1.45), torch.ones(n, 1, 1))
    images = demo._demo_slices(vol, z, look, RENDER_SIZE, mm, torch.full((n,), severity))[0]
    with tempfile.TemporaryDirectory() as folder:
        paths = [os.path.join(folder, f"{k}.png") for k in range(n)]
        for image, path in zip(images, paths):
            Image.fromarray(image.numpy(), "L").save(path)
        read = dataset.decode_all(paths, size)[0]
    return read.float() / 127.5 - 1, z / (len(vol) - 1)


def main():
    settings, args = progress.parse_settings(sys.argv[1:])
    sampling, _, _ = open_checkpoint(settings, args, utils.get_device())
    size = sampling.cfg["IMAGE_SIZE"]
    (now, heights), (later_truth, _) = (rendered(demo.age_severity(a), size) for a in (AGE, AGE + YEARS))
    nc = torch.full((SLICES,), sampling.class_names.index("NC"), dtype=torch.long)
    later, masks, null = progress.progressed(sampling, now.to(sampling.device), nc, heights, torch.full((SLICES,), AGE),
                                             [YEARS], args.depth, settings["EDIT_GUIDANCE"], args.edit_mask)
    later, null = later[:, 0].cpu(), null.cpu()
    figures = {"age": AGE, "years": YEARS, "depth": args.depth, "guidance": settings["EDIT_GUIDANCE"],
               "edit_mask": args.edit_mask,
               **progress.against_future(now, later, later_truth, null, now, None, [], None, None)}
    out = os.path.join(settings["OUTPUT_DIR"], "progress")
    os.makedirs(out, exist_ok=True)
    tag = f"template_{args.edit_mask}_g{settings['EDIT_GUIDANCE']:g}"
    pictures.save_edits({"input": now, "+10 years": later, "difference": later - now,
                         "truth +10": later_truth, "true difference": later_truth - now},
                        [f"height_{100 * h:.0f}" for h in heights.tolist()], os.path.join(out, f"{tag}.png"), "the template +10 years")
    with open(os.path.join(out, f"{tag}.json"), "w") as f:
        json.dump(figures, f, indent=2)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    utils.run_main(main)
