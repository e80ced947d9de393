"""The built-in demo sets: axial slices of the MNI ICBM152 brain template that nilearn ships, each seen through
its own random deformation, written in the OASIS layout (unlabelled) or the ADNI layout (AD/NC, with simulated
atrophy for 'AD'), so that dataset.py reads them like real data."""
import csv
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cohorts import ADNI_CLASSES, OASIS
from utils import io_threads, show_path

TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"  # MNI ICBM152 2009 maps shipped with nilearn
DEMO_FILL = 0.8  # demo: share of the frame the largest brain slice spans
DEMO_PER_CASE = 32  # demo: slices per case, spread through the brain like OASIS
DEMO_MIN_AREA = 0.5  # demo: slices whose brain area is at least this share of the largest
DEMO_FIELD = 64  # demo: resolution of the deformation and bias fields, bilinearly upsampled
DEMO_CHUNK = 64  # demo: slices deformed at once
LABELLED_SUBJECTS = (48, 10)  # labelled demo: subjects per class in train and in test
LABELLED_SLICES = 24  # labelled demo: slices per subject, spread through the brain
VENTRICLE_MM = 6  # atrophy at severity 1: ventricles grow by this much into the tissue around them
CORTEX_MM = 3  # atrophy at severity 1: the cortex recedes by this much from the CSF and the outside (wider sulci)
BRAIN_SHRINK = 0.06  # atrophy at severity 1: the whole brain is this much smaller
DEMO_AGES = (60, 90)  # labelled demo: each subject's age at its scan is uniform in this range (years)
AGE_ONSET, AGE_RATE = 50, 0.012  # labelled demo: everyone's atrophy severity grows by AGE_RATE a year after AGE_ONSET
AD_ONSETS = (55, 70)  # labelled demo: an 'AD' subject's disease began at an age uniform in this range
AD_RATES = (0.025, 0.045)  # labelled demo: and its severity grows since by a rate uniform in this, a year
AD_SCANNED_AFTER = 5  # labelled demo: 'AD' subjects are scanned this many years after onset or later (up to age 90)
FUTURE_YEARS = (5, 10)  # labelled demo: held-out subjects are also rendered this many years on (truth/future_N/)
TABLE = "ADNI_demo_collection.csv"  # labelled demo: in AD_NC/, each subject's row as an ADNI collection CSV writes it
TRUTH = "truth"  # labelled demo: beside AD_NC/, the twins and masks of held-out AD slices (TRUTH_KINDS) and the futures
TRUTH_KINDS = ("healthy", "mask", "local_healthy", "local_mask")  # truth/: whole-disease twin and mask, atrophy's alone
TRUTH_LEVEL = 12  # labelled demo: a pixel the atrophy changed by more than this (of 255) is in the true effect mask
LABELLED_VERSION = "labelled demo 4: ages, age atrophy, disease progression, the held-out subjects' futures"  # in DONE


def _template(size):
    """The MNI ICBM152 T1, its labels (0 background, 1 CSF, 2 GM, 3 WM), a mask of the lateral ventricles and one
    of the outer 12 mm of the brain (where the cortex is) as Z x 4 x Y x X axial slices, nose up and radiological,
    cropped to the brain where it is large; and the millimetres per demo pixel."""
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
    outer = ndimage.distance_transform_edt(brain) <= 12  # the outer 12 mm, in millimetres from the surface
    deep_csf = brain & ~outer & (gm + wm < 0.7) & (ndimage.uniform_filter(wm, 7) > ndimage.uniform_filter(gm, 7))
    parts, n = ndimage.label(deep_csf)  # CSF deep in white matter: its two big pieces are the lateral ventricles
    ventricles = np.isin(parts, 1 + np.nonzero(ndimage.sum(deep_csf, parts, range(1, n + 1)) > 500)[0])
    vol = np.stack([t1, labels, ventricles, brain & outer]).transpose(3, 0, 2, 1)[:, :, ::-1, ::-1]  # anterior up
    area = (vol[:, 1] > 0).sum((1, 2))
    z = np.nonzero(area >= DEMO_MIN_AREA * area.max())[0]
    vol = vol[z[0]:z[-1] + 1]
    y, x = (np.nonzero((vol[:, 1] > 0).any((0, a)))[0] for a in (2, 1))
    vol = vol[:, :, y[0]:y[-1] + 1, x[0]:x[-1] + 1]  # the brain's box: its centre is the frame's centre
    return torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32)), max(vol.shape[2:]) / (DEMO_FILL * size)


def _grow(mask, step):
    """The mask grown by one pixel: a square step, or a cross one (alternating, they grow it as an octagon)."""
    kernel = torch.ones(1, 1, 3, 3) if step % 2 else torch.tensor([[[[0.0, 1, 0], [1, 1, 1], [0, 1, 0]]]])
    return F.conv2d(mask[:, None].float(), kernel, padding=1)[:, 0] > 0


def _atrophy(planes, severity):
    """Alzheimer's-like atrophy of template planes (N x 4 x Y x X, 1 mm pixels) of the given severities (0 none, 1
    a strong 'AD', more with age and time): ventricles grown by VENTRICLE_MM times the severity, and the cortex given
    up to the sulci and the outside by CORTEX_MM times it (wider sulci, a thinner cortex); the tissue lost becomes
    CSF, or background at the brain's surface."""
    t1, labels, ventricles, cortex = planes[:, 0], planes[:, 1], planes[:, 2] > 0.5, planes[:, 3] > 0.5
    csf = t1[ventricles].quantile(0.1)  # CSF proper, without the partial volume at the ventricles' edges
    sulci, outside = (labels == 1) & cortex, labels == 0
    for mm in range(math.ceil(max(VENTRICLE_MM, CORTEX_MM) * max(1.0, severity.max().item()))):
        ventricles |= (mm < severity * VENTRICLE_MM)[:, None, None] & _grow(ventricles, mm) & (labels >= 2)
        thinning = (mm < severity * CORTEX_MM)[:, None, None] & cortex
        sulci |= thinning & _grow(sulci, mm) & (labels == 2)
        outside |= thinning & _grow(outside, mm) & (labels >= 1)
    blur = lambda mask: F.avg_pool2d(mask[:, None].float(), 3, 1, 1)[:, 0]  # noqa: E731  soft edges
    lost = (sulci & (labels >= 2)) | (ventricles & (labels >= 1) & (severity > 0)[:, None, None])  # all CSF now
    to_csf, to_outside = blur(lost), blur(outside & (labels >= 1))
    t1 = (t1 * (1 - to_csf) + csf * to_csf) * (1 - to_outside)
    labels = torch.where(outside, 0.0, torch.where(lost, 1.0, labels))
    return torch.stack([t1, labels, ventricles.float(), cortex.float()], 1)


@dataclass
class Look:
    """The random parts of demo slices, one row each: rotation (degrees), zoom (a little more on one axis), shift
    (mm), an elastic displacement and a log bias field (coarse grids, bicubically upsampled), gamma and contrast."""
    angle: torch.Tensor
    zoom: torch.Tensor
    stretch: torch.Tensor
    shift: torch.Tensor
    elastic: torch.Tensor
    bias: torch.Tensor
    gamma: torch.Tensor
    contrast: torch.Tensor


def _random_look(n, g):
    """The random parts of n demo slices, drawn from g in a fixed order."""
    u = lambda lo, hi, *shape: lo + (hi - lo) * torch.rand(n, *shape, generator=g)  # noqa: E731
    angle, zoom, stretch, shift = u(-10, 10), u(0.9, 1.1, 1, 1), u(0.95, 1.05, 2, 1), u(-3, 3, 2, 1)
    elastic, bias = torch.randn(n, 2, 5, 5, generator=g) * 3.0, torch.randn(n, 2, 4, 4, generator=g) * 0.1
    return Look(angle, zoom, stretch, shift, elastic, bias, u(1.1, 1.8, 1, 1), u(0.9, 1.15, 1, 1))


def _demo_slices(vol, z, look, size, mm, severity=None, shrink=None):
    """Axial slices at positions z (voxels), seen through their Look, with atrophy of the given severities (None:
    none, as 0), the brain made smaller by the atrophy of `shrink` (default: the same severities): uint8 images and
    4-level masks, len(z) x size x size."""
    n, (_, _, ny, nx) = len(z), vol.shape
    to_grid = torch.tensor([2 / (nx - 1), 2 / (ny - 1)]).view(1, 2, 1)  # voxels to grid_sample units
    angle = look.angle * math.pi / 180
    rot = torch.stack([angle.cos(), -angle.sin(), angle.sin(), angle.cos()], 1).view(n, 2, 2)
    rot = rot / (look.zoom * look.stretch) * (size - 1) / 2 * mm
    shrink = severity if shrink is None else shrink
    if shrink is not None:  # an atrophied brain is smaller
        rot = rot / (1 - BRAIN_SHRINK * shrink).view(n, 1, 1)
    theta = torch.cat([rot, look.shift], 2) * to_grid
    smooth = lambda grid: F.interpolate(grid, size=(DEMO_FIELD,) * 2, mode="bicubic", align_corners=True)  # noqa: E731
    field = F.affine_grid(theta, [n, 1, DEMO_FIELD, DEMO_FIELD], align_corners=True).permute(0, 3, 1, 2)
    field = field + smooth(look.elastic) * to_grid[..., None]  # elastic: a coarse random displacement grid (mm)
    field = torch.cat([field, smooth(look.bias)[:, :1]], 1)  # and a log bias field
    field = F.interpolate(field, size=(size, size), mode="bilinear", align_corners=True)
    planes = vol[z.round().long()] if severity is None else _atrophy(vol[z.round().long()], severity)
    t1 = F.grid_sample(planes[:, :1], field[:, :2].permute(0, 2, 3, 1), align_corners=True)[:, 0]
    labels = F.grid_sample(planes[:, 1:2], field[:, :2].permute(0, 2, 3, 1), mode="nearest", align_corners=True)[:, 0]
    img = t1.clamp(0, 1) ** look.gamma * look.contrast * field[:, 2].exp()  # gamma, contrast, bias
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), (labels * 85).to(torch.uint8)  # OASIS mask levels


def build_demo(out_dir, n_train=3000, n_val=300, n_test=300, size=256, seed=0):
    """Write an OASIS-like set of skull-stripped axial slices (and masks) made from the MNI ICBM152 template."""
    start = time.time()
    print(f"building the demo set from the MNI ICBM152 template into {show_path(out_dir)} (first run only)...", flush=True)
    vol, mm = _template(size)
    g, base, case = torch.Generator().manual_seed(seed), os.path.join(out_dir, OASIS + "data"), 0
    save = lambda a, path: Image.fromarray(a.numpy(), "L").save(path, compress_level=1)
    with ThreadPoolExecutor(io_threads()) as pool:
        for split, n in (("train", n_train), ("validate", n_val), ("test", n_test)):
            img_dir, seg_dir = os.path.join(base, OASIS + split), os.path.join(base, OASIS + "seg_" + split)
            for d in (img_dir, seg_dir):
                os.makedirs(d, exist_ok=True)
            for i0 in range(0, n, DEMO_CHUNK):
                i = torch.arange(i0, min(n, i0 + DEMO_CHUNK))
                k = i % DEMO_PER_CASE  # slice k of its case, k-th of DEMO_PER_CASE bands from bottom to top
                z = (k + torch.rand(len(i), generator=g)) / DEMO_PER_CASE * (len(vol) - 1)
                imgs, segs = _demo_slices(vol, z, _random_look(len(z), g), size, mm)
                names = [f"{case + j // DEMO_PER_CASE + 1:03d}_slice_{j % DEMO_PER_CASE}.nii.png" for j in i.tolist()]
                list(pool.map(save, list(imgs) + list(segs), [os.path.join(img_dir, "case_" + f) for f in names]
                              + [os.path.join(seg_dir, "seg_" + f) for f in names]))
            case += math.ceil(n / DEMO_PER_CASE)
    with open(os.path.join(out_dir, "DONE"), "w") as f:  # written last: a half-built demo is rebuilt
        f.write(f"MNI ICBM152 demo: {n_train} train, {n_val} validate, {n_test} test, {size}px, seed {seed}\n")
    print(f"built the demo: {n_train} train, {n_val} validate, {n_test} test slices in {time.time() - start:.0f} s")


def age_severity(age):
    """The atrophy severity everyone carries at an age (years): AGE_RATE a year after AGE_ONSET."""
    return AGE_RATE * max(0.0, age - AGE_ONSET)


@dataclass
class Subject:
    """A labelled demo subject: its id (ADNI-like), class, age and sex at its scan; for 'AD' the age its disease began
    and the severity the disease gains a year since (0 for 'NC')."""
    id: str
    label: str
    age: float
    sex: str
    onset: float = 0.0
    rate: float = 0.0

    def disease(self, years=0.0):
        """The disease's atrophy severity `years` after the scan."""
        return self.rate * max(0.0, self.age + years - self.onset)

    def atrophy(self, years=0.0):
        """The whole atrophy severity `years` after the scan: the age's and the disease's."""
        return age_severity(self.age + years) + self.disease(years)


def _subject(number, label, g):
    """A subject drawn from g: its sex and age at the scan (uniform in DEMO_AGES; for 'AD', from AD_SCANNED_AFTER
    years after its onset on, so that older 'AD' subjects are on average further into the disease, as in a real
    cross-sectional cohort), and for 'AD' its onset and rate."""
    u = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g).item()  # noqa: E731
    sex = "F" if torch.rand((), generator=g).item() < 0.5 else "M"
    if label != "AD":
        return Subject(f"941_S_{number:04d}", label, round(u(*DEMO_AGES), 1), sex)
    onset = u(*AD_ONSETS)
    age = u(max(DEMO_AGES[0], onset + AD_SCANNED_AFTER), DEMO_AGES[1])
    return Subject(f"941_S_{number:04d}", label, round(age, 1), sex, round(onset, 1), u(*AD_RATES))


def build_labelled_demo(out_dir, subjects=LABELLED_SUBJECTS, slices=LABELLED_SLICES, size=256, seed=0):
    """Write an ADNI-like labelled set, AD_NC/{train,test}/{AD,NC}/SUBJECT_K.png, from the MNI ICBM152 template, with
    AD_NC/TABLE giving each subject's age and sex: everyone carries the atrophy of their age, 'AD' subjects a disease
    atrophy of graded severity on top. K is the template slice number. Beside AD_NC/, where dataset.py never reads,
    truth/subjects.csv (each subject's onset, rate and severity) and the held-out subjects' truth: truth/future_N/ (and
    _mask), each slice N years on (age and disease grown, the same look); for 'AD' slices, truth/healthy/ and
    truth/mask/, the slice without the disease (its atrophy and the brain's shrink; the age's kept) and white where
    the disease changed it by more than TRUTH_LEVEL; truth/local_healthy/ and truth/local_mask/, the same without the
    disease's tissue loss alone (the shrink kept): where the atrophy is."""
    start = time.time()
    print(f"building the labelled demo set (simulated AD/NC) into {show_path(out_dir)} (first run only)...", flush=True)
    vol, mm = _template(size)
    g = torch.Generator().manual_seed(seed)
    save = lambda a, path: Image.fromarray(a.numpy(), "L").save(path, compress_level=1)  # noqa: E731
    kinds = TRUTH_KINDS + tuple(f"future_{y}{m}" for y in FUTURE_YEARS for m in ("", "_mask"))
    truth = {kind: os.path.join(out_dir, TRUTH, kind) for kind in kinds}
    for folder in truth.values():
        os.makedirs(folder, exist_ok=True)
    white = lambda mask: mask.to(torch.uint8) * 255  # noqa: E731
    table, number = [], 0
    with ThreadPoolExecutor(io_threads()) as pool:
        for split, per_class in zip(("train", "test"), subjects):
            for name in ADNI_CLASSES:
                folder = os.path.join(out_dir, "AD_NC", split, name)
                os.makedirs(folder, exist_ok=True)
                for _ in range(per_class):
                    number += 1
                    who = _subject(number, name, g)
                    table.append((who, split))
                    band = len(vol) // slices  # one slice in each of `slices` bands from bottom to top, all different
                    z = (torch.arange(slices) * len(vol) / slices).floor() + torch.randint(band, (slices,), generator=g)
                    look, names = _random_look(slices, g), [f"{who.id}_{int(v)}.png" for v in z]
                    render = lambda severity, shrink=None: _demo_slices(  # noqa: E731
                        vol, z, look, size, mm, torch.full((slices,), severity),
                        None if shrink is None else torch.full((slices,), shrink))[0]
                    imgs = render(who.atrophy())
                    images = {}
                    if split == "test":
                        for years in FUTURE_YEARS:
                            future = render(who.atrophy(years))
                            images.update({f"future_{years}": future, f"future_{years}_mask": white(changed(future, imgs))})
                    if split == "test" and name == "AD":
                        aged = age_severity(who.age)
                        whole, local = render(aged), render(aged, who.atrophy())  # no disease; its shrink kept
                        images.update({"healthy": whole, "mask": white(changed(imgs, whole, local)),
                                       "local_healthy": local, "local_mask": white(changed(imgs, local))})
                    list(pool.map(save, [imgs[i] for i in range(slices)] + [a for k in images for a in images[k]],
                                  [os.path.join(folder, f) for f in names]
                                  + [os.path.join(truth[k], f) for k in images for f in names]))
    write_tables(out_dir, table)
    with open(os.path.join(out_dir, "DONE"), "w") as f:  # written last: a half-built demo is rebuilt
        f.write(f"{LABELLED_VERSION}\nMNI ICBM152, simulated atrophy: {subjects} subjects per class, {slices} slices, "
                f"{size}px, seed {seed}\n")
    print(f"built the labelled demo: {2 * sum(subjects) * slices} slices in {time.time() - start:.0f} s")


def write_tables(out_dir, subjects):
    """AD_NC/TABLE, as ADNI's collection CSVs write a subject's row (its group NC written CN, as ADNI does), and
    truth/subjects.csv with what the demo drew for each ((Subject, split) pairs)."""
    with open(os.path.join(out_dir, "AD_NC", TABLE), "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["Subject", "Group", "Sex", "Age", "Visit", "Modality"])
        rows.writerows([who.id, "CN" if who.label == "NC" else who.label, who.sex, f"{who.age:.1f}", "sc", "MRI"]
                       for who, _ in subjects)
    with open(os.path.join(out_dir, TRUTH, "subjects.csv"), "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["subject", "split", "class", "age", "sex", "onset", "rate_per_year", "disease_severity"])
        rows.writerows([who.id, split, who.label, f"{who.age:.1f}", who.sex, f"{who.onset:.1f}", f"{who.rate:.4f}",
                        f"{who.disease():.4f}"] for who, split in subjects)


def changed(images, *twins):
    """A true effect mask: where uint8 slices differ from any of their twins by more than TRUTH_LEVEL (the
    whole disease's mask is taken against both twins, so that it holds the atrophy's)."""
    return torch.stack([(images.int() - twin.int()).abs() > TRUTH_LEVEL for twin in twins]).any(0)


def is_built(out_dir, labelled):
    """Whether a demo was built completely (DONE is written last), and for the labelled one, by this version."""
    try:
        with open(os.path.join(out_dir, "DONE")) as f:
            return not labelled or f.readline().strip() == LABELLED_VERSION
    except OSError:
        return False
