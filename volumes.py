"""Scans to slices: a NIfTI, Analyze or MGZ brain scan, read with nibabel, becomes the axial slices the model sees.

Each scan is reoriented to the closest canonical (RAS) orientation, its intensities clipped to robust percentiles,
its slices chosen inside the brain's extent, and each slice laid out as the rest of the project shows slices
(nose up, the patient's right on the image's left), on square pixels, padded to a square and resized.
"""
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from utils import show_path

SCAN_EXTS = (".nii", ".nii.gz", ".hdr", ".mgz")  # files read as scans (any case); an Analyze .hdr needs its .img
PERCENTILES = (0.5, 99.5)  # per scan, intensities are clipped to these percentiles of the non-zero voxels
PERCENTILE_VOXELS = 2_000_000  # the percentiles are taken on an even lattice of about this many voxels at most
BRAIN_LEVEL = 0.1  # voxels above this share of the clipped range count as brain (or head) when measuring slices
EXTENT_MIN_AREA = 0.02  # the brain's extent, positions 0 to 1: slices with at least this share of the largest area
SLICE_MIN_AREA = 0.5  # slices kept: brain area at least this share of the scan's largest slice (as DEMO_MIN_AREA)
SLICE_BAND = (0.0, 1.0)  # slices kept: positions within this band of the brain's extent, e.g. (0.3, 0.8)

logging.getLogger("nibabel.global").setLevel(logging.ERROR)  # its notes on header fixes name no file: ours do


class NotAScan(Exception):
    """Why a file nibabel can open is still no usable scan."""


def settings():
    """The constants above that change the slices, for the cache key."""
    return repr((PERCENTILES, BRAIN_LEVEL, EXTENT_MIN_AREA, SLICE_MIN_AREA, SLICE_BAND)).encode()


def image_of(path):
    """The image file beside an Analyze (or NIfTI pair) header, or None for single-file formats."""
    stem, ext = os.path.splitext(path)
    return stem + (".IMG" if ext == ".HDR" else ".img") if ext.lower() == ".hdr" else None


def load_ras(path):
    """A scan's voxels as float32 X x Y x Z in RAS orientation (x to the right, y to the front, z up), its voxel
    sizes in mm along those axes, and a notice when it held more than one volume. NotAScan says why not."""
    import nibabel
    from nibabel.openers import ImageOpener
    from nibabel.orientations import apply_orientation, io_orientation
    if os.path.getsize(path) == 0:
        raise NotAScan("empty file")
    if image_of(path) and not os.path.exists(image_of(path)):
        raise NotAScan(f"an Analyze header without its image {os.path.basename(image_of(path))}")
    img = nibabel.load(path)
    shape = img.shape
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise NotAScan(f"a 2-D scan ({'x'.join(map(str, shape))} voxels), not a volume")
    with ImageOpener(path) as f:  # the header as stored: nibabel's loader sets a zero voxel size to 1
        zooms = np.array(type(img.header).from_fileobj(f, check=False).get_zooms()[:3], dtype=np.float64)
    if not (np.isfinite(zooms) & (zooms > 0)).all():
        raise NotAScan(f"voxel sizes {'x'.join(map(str, zooms))} mm: a zero or NaN voxel size")
    extra = int(np.prod(shape[3:]))
    notice = f"holds {extra} volumes ({'x'.join(map(str, shape))}): reading the first" if extra > 1 else None
    data = np.asarray(img.dataobj[(slice(None),) * 3 + (0,) * (len(shape) - 3)], dtype=np.float32)
    ornt = io_orientation(img.affine)  # for each voxel axis: the RAS axis it runs along, and whether reversed
    ras_zooms = np.empty(3)
    ras_zooms[ornt[:, 0].astype(int)] = zooms
    # a view of nibabel's read-only buffer (a float32 X x Y x Z x 1 scan) is copied: normalise writes in place
    return np.require(apply_orientation(data, ornt), requirements="W"), ras_zooms, notice


def normalise(vol):
    """Intensities clipped to PERCENTILES of the non-zero voxels and mapped to [0, 1], in place; zero, NaN and
    infinite voxels are background (0)."""
    np.nan_to_num(vol, copy=False, nan=0, posinf=0, neginf=0)
    step = max(1, round((vol.size / PERCENTILE_VOXELS) ** (1 / 3)))
    sample = vol[::step, ::step, ::step]  # an even lattice in RAS order: the same voxels however the file is stored
    values = sample[sample != 0]
    if not len(values):
        raise NotAScan("every voxel is zero or not finite")
    lo, hi = np.percentile(values, PERCENTILES)
    if hi <= lo:
        raise NotAScan("no contrast: its non-zero voxels all have one value")
    background = vol == 0
    np.clip(vol, lo, hi, out=vol)
    vol -= lo
    vol /= hi - lo
    vol[background] = 0
    return vol


def read_scan(path, size):
    """One scan's kept axial slices, bottom to top: (uint8 K x S x S, their positions in [0, 1] within the brain's
    extent, 'XxYxZ AxBxC mm', notice or None)."""
    vol, (dx, dy, dz), notice = load_ras(path)
    area = (normalise(vol) > BRAIN_LEVEL).sum((0, 1))
    bottom, top = np.nonzero(area >= EXTENT_MIN_AREA * area.max())[0][[0, -1]]
    positions = (np.arange(len(area)) - bottom) / max(top - bottom, 1)
    band = (positions >= max(SLICE_BAND[0], 0)) & (positions <= min(SLICE_BAND[1], 1))  # inside the extent
    keep = np.nonzero(band & (area >= SLICE_MIN_AREA * area.max()))[0]
    # K x Y x X, laid out as demo.py lays out the template: nose up, the patient's right on the image's left
    slices = torch.from_numpy(vol[:, :, keep].transpose(2, 1, 0)[:, ::-1, ::-1].copy())
    nx, ny = vol.shape[:2]
    side = max(nx * dx, ny * dy)  # mm: the frame is square in millimetres, the scan's field of view centred in it
    h, w = max(1, round(size * ny * dy / side)), max(1, round(size * nx * dx / side))
    slices = F.interpolate(slices[:, None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    top_pad, left = (size - h) // 2, (size - w) // 2
    slices = F.pad(slices[:, 0], (left, size - w - left, top_pad, size - h - top_pad))
    desc = "x".join(map(str, vol.shape)) + " " + "x".join(f"{z:g}" for z in (dx, dy, dz)) + " mm"
    return (slices.clamp(0, 1) * 255).round().to(torch.uint8), torch.from_numpy(positions[keep]).float(), desc, notice


def read_scans(paths, size, workers):
    """Every scan's slices, decoded by a thread pool holding one scan per worker: (uint8 N x 1 x S x S, positions
    (N,), slices kept per path (0 where skipped), scan sizes found, skip messages, notices)."""
    def one(p):
        shown = show_path(p)
        try:
            images, positions, desc, notice = read_scan(p, size)
            return images, positions, desc, notice and f"{shown} {notice}"
        except Exception as e:  # unreadable, corrupt, truncated, not a volume: skipped
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            return f"{shown} ({reason if isinstance(e, NotAScan) else 'not a readable scan: ' + reason})"
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(one, paths))
    read = [r for r in results if not isinstance(r, str)]
    images = torch.cat([r[0] for r in read])[:, None] if read else torch.empty(0, 1, size, size, dtype=torch.uint8)
    positions = torch.cat([r[1] for r in read]) if read else torch.empty(0)
    counts = torch.tensor([0 if isinstance(r, str) else len(r[0]) for r in results], dtype=torch.long)
    return (images, positions, counts, dict(Counter(r[2] for r in read)), [r for r in results if isinstance(r, str)],
            [r[3] for r in read if r[3]])
