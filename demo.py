"""The built-in demo set: axial slices of the MNI ICBM152 brain template that nilearn ships, each seen through
its own random deformation, written in the OASIS layout so that dataset.py reads it like real data."""
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dataset import OASIS, WORKERS, _show

TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"  # MNI ICBM152 2009 maps shipped with nilearn
DEMO_FILL = 0.8  # demo: share of the frame the largest brain slice spans
DEMO_PER_CASE = 32  # demo: slices per case, spread through the brain like OASIS
DEMO_MIN_AREA = 0.5  # demo: slices whose brain area is at least this share of the largest
DEMO_FIELD = 64  # demo: resolution of the deformation and bias fields, bilinearly upsampled
DEMO_CHUNK = 64  # demo: slices deformed at once


def _template(size):
    """The MNI ICBM152 T1 and its labels (0 background, 1 CSF, 2 GM, 3 WM) as Z x 2 x Y x X axial slices,
    nose up and radiological, cropped to the brain where it is large; and the millimetres per demo pixel."""
    import nibabel
    import nilearn
    from scipy import ndimage
    folder = os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data")
    t1, gm, wm = (nibabel.load(os.path.join(folder, TEMPLATE.format(k))).get_fdata(dtype=np.float32) / 255
                  for k in ("t1", "gm", "wm"))  # X x Y x Z (RAS), 1 mm
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)  # fill holes slice by slice
    t1 *= ndimage.binary_dilation(gm + wm > 0.3, iterations=3)  # strip any skull (a no-op: this T1 is stripped)
    brain = ndimage.binary_fill_holes(t1 > 0.02, structure=in_plane)
    labels = np.where(brain, 1 + np.argmax(np.stack([brain - gm - wm, gm, wm]), 0), 0)
    vol = np.stack([t1, labels]).transpose(3, 0, 2, 1)[:, :, ::-1, ::-1]  # Z x 2 x Y x X, anterior up, right left
    area = (vol[:, 1] > 0).sum((1, 2))
    z = np.nonzero(area >= DEMO_MIN_AREA * area.max())[0]
    vol = vol[z[0]:z[-1] + 1]
    y, x = (np.nonzero((vol[:, 1] > 0).any((0, a)))[0] for a in (2, 1))
    vol = vol[:, :, y[0]:y[-1] + 1, x[0]:x[-1] + 1]  # the brain's box: its centre is the frame's centre
    return torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32)), max(vol.shape[2:]) / (DEMO_FILL * size)


def _demo_slices(vol, z, g, size, mm):
    """Deformed axial slices at positions z (voxels): uint8 images and 4-level masks, len(z) x size x size."""
    n, (_, _, ny, nx) = len(z), vol.shape
    u = lambda lo, hi, *shape: lo + (hi - lo) * torch.rand(n, *shape, generator=g)
    smooth = lambda std, k: F.interpolate(torch.randn(n, 2, k, k, generator=g) * std, size=(DEMO_FIELD,) * 2,
                                          mode="bicubic", align_corners=True)
    to_grid = torch.tensor([2 / (nx - 1), 2 / (ny - 1)]).view(1, 2, 1)  # voxels to grid_sample units
    angle = u(-10, 10) * math.pi / 180  # rotation, zoom (a little more on one axis) and shift
    rot = torch.stack([angle.cos(), -angle.sin(), angle.sin(), angle.cos()], 1).view(n, 2, 2)
    rot = rot / (u(0.9, 1.1, 1, 1) * u(0.95, 1.05, 2, 1)) * (size - 1) / 2 * mm
    theta = torch.cat([rot, u(-3, 3, 2, 1)], 2) * to_grid
    field = F.affine_grid(theta, [n, 1, DEMO_FIELD, DEMO_FIELD], align_corners=True).permute(0, 3, 1, 2)
    field = field + smooth(3.0, 5) * to_grid[..., None]  # elastic: a coarse random displacement grid (mm)
    field = torch.cat([field, smooth(0.1, 4)[:, :1]], 1)  # and a log bias field
    field = F.interpolate(field, size=(size, size), mode="bilinear", align_corners=True)
    planes = vol[z.round().long()]
    t1 = F.grid_sample(planes[:, :1], field[:, :2].permute(0, 2, 3, 1), align_corners=True)[:, 0]
    labels = F.grid_sample(planes[:, 1:], field[:, :2].permute(0, 2, 3, 1), mode="nearest", align_corners=True)[:, 0]
    img = t1.clamp(0, 1) ** u(1.1, 1.8, 1, 1) * u(0.9, 1.15, 1, 1) * field[:, 2].exp()  # gamma, contrast, bias
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), (labels * 85).to(torch.uint8)  # OASIS mask levels


def build_demo(out_dir, n_train=3000, n_val=300, n_test=300, size=256, seed=0):
    """Write an OASIS-like set of skull-stripped axial slices (and masks) made from the MNI ICBM152 template."""
    start = time.time()
    print(f"building the demo set from the MNI ICBM152 template into {_show(out_dir)} (first run only)...", flush=True)
    vol, mm = _template(size)
    g, base, case = torch.Generator().manual_seed(seed), os.path.join(out_dir, OASIS + "data"), 0
    save = lambda a, path: Image.fromarray(a.numpy(), "L").save(path, compress_level=1)
    with ThreadPoolExecutor(WORKERS) as pool:
        for split, n in (("train", n_train), ("validate", n_val), ("test", n_test)):
            img_dir, seg_dir = os.path.join(base, OASIS + split), os.path.join(base, OASIS + "seg_" + split)
            for d in (img_dir, seg_dir):
                os.makedirs(d, exist_ok=True)
            for i0 in range(0, n, DEMO_CHUNK):
                i = torch.arange(i0, min(n, i0 + DEMO_CHUNK))
                k = i % DEMO_PER_CASE  # slice k of its case, k-th of DEMO_PER_CASE bands from bottom to top
                z = (k + torch.rand(len(i), generator=g)) / DEMO_PER_CASE * (len(vol) - 1)
                imgs, segs = _demo_slices(vol, z, g, size, mm)
                names = [f"{case + j // DEMO_PER_CASE + 1:03d}_slice_{j % DEMO_PER_CASE}.nii.png" for j in i.tolist()]
                list(pool.map(save, list(imgs) + list(segs), [os.path.join(img_dir, "case_" + f) for f in names]
                              + [os.path.join(seg_dir, "seg_" + f) for f in names]))
            case += math.ceil(n / DEMO_PER_CASE)
    with open(os.path.join(out_dir, "DONE"), "w") as f:  # written last: a half-built demo is rebuilt
        f.write(f"MNI ICBM152 demo: {n_train} train, {n_val} validate, {n_test} test, {size}px, seed {seed}\n")
    print(f"built the demo: {n_train} train, {n_val} validate, {n_test} test slices in {time.time() - start:.0f} s")
